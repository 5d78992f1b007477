"""The manager's epoll (``governor.engine.backend.ReadSelector``): what it hands back, and the
mistakes it refuses, as ``selectors`` would."""

import os
import selectors
import socket

import pytest

from governor.engine.backend import ReadSelector


@pytest.fixture
def selector():
    selector = ReadSelector()
    yield selector
    selector.close()


def test_it_hands_back_the_handlers_of_readable_files_only(selector):
    quiet_reader, quiet_writer = os.pipe()
    left, right = socket.socketpair()
    try:
        selector.register(quiet_reader, selectors.EVENT_READ, "the pipe's handler")
        selector.register(left, selectors.EVENT_READ, "the socket's handler")
        assert selector.ready(0) == []
        right.send(b"x")
        assert selector.ready(5) == ["the socket's handler"]
        selector.unregister(left)
        assert selector.ready(0) == []  # readable still, but no longer watched
    finally:
        for fd in (quiet_reader, quiet_writer):
            os.close(fd)
        left.close()
        right.close()


def test_it_refuses_a_second_registration_an_unknown_file_and_other_events(selector):
    reader, writer = os.pipe()
    try:
        selector.register(reader, selectors.EVENT_READ, "handler")
        with pytest.raises(KeyError):
            selector.register(reader, selectors.EVENT_READ, "another")
        with pytest.raises(KeyError):
            selector.unregister(writer)
        with pytest.raises(ValueError):
            selector.register(writer, selectors.EVENT_WRITE, "handler")
    finally:
        os.close(reader)
        os.close(writer)


def test_a_file_closed_before_it_is_unregistered_is_unregistered_quietly(selector):
    reader, writer = os.pipe()
    selector.register(reader, selectors.EVENT_READ, "handler")
    os.close(reader)  # the kernel drops it from the epoll set
    os.close(writer)
    selector.unregister(reader)
    assert selector.ready(0) == []


def test_a_file_is_watched_for_room_only_while_asked_and_still_for_reading(selector):
    left, right = socket.socketpair()
    left.setblocking(False)
    try:
        selector.register(left, selectors.EVENT_READ, "read")
        while True:  # fill the socket: the peer does not read
            try:
                left.send(b"x" * 65536)
            except BlockingIOError:
                break
        selector.watch_writable(left, "room")
        assert selector.ready(0) == [], "no room, nothing to read"
        right.send(b"y")
        assert selector.ready(5) == ["read"], "readable, still no room"
        left.recv(1)
        right.setblocking(False)
        drained = 0
        while True:  # the peer reads all there is: now there is room
            try:
                drained += len(right.recv(1 << 20))
            except BlockingIOError:
                break
        assert drained > 0 and selector.ready(5) == ["room"]
        selector.unwatch_writable(left)
        selector.unwatch_writable(left)  # a second time: nothing
        assert selector.ready(0) == []
    finally:
        left.close()
        right.close()


def test_watching_for_room_needs_a_registered_file_and_is_dropped_with_it(selector):
    left, right = socket.socketpair()
    try:
        with pytest.raises(KeyError):
            selector.watch_writable(left, "room")  # not registered for reading
        selector.register(left, selectors.EVENT_READ, "read")
        selector.watch_writable(left, "room")
        with pytest.raises(KeyError):
            selector.watch_writable(left, "room again")
        assert selector.ready(0) == ["room"], "an empty socket has room"
        selector.unregister(left)
        assert selector.ready(0) == []
        selector.register(left, selectors.EVENT_READ, "read")
        assert selector.ready(0) == [], "a new registration watches reading only"
    finally:
        left.close()
        right.close()
