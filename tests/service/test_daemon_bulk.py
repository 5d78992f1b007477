"""The daemon's per-task overheads kept in bulk: a waiting submit answered by one reply, the
ends of many tasks delivered to the loop by one wake-up, the replies of one turn of the loop
written to a connection at once."""

import asyncio
import concurrent.futures
import socket
import threading
import types

import pytest

from daemon_harness import InProcessDaemon
from governor.client import Client
from governor.errors import StepFailed, UnknownStep
from governor.service import connections
from governor.service.ends import EndInbox

from test_daemon_hardening import frame, read_frame

#: A deadlock detector for waits on events, not a timing.
PATIENCE_S = 60.0


def test_a_waiting_submit_without_ack_gets_one_reply_the_final_one(tmp_path):
    with InProcessDaemon(tmp_path) as running, socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(PATIENCE_S)
        sock.connect(str(running.socket))
        sock.sendall(frame({"v": 1, "id": 1, "op": "submit", "step": "echo", "params": {"value": 7},
                            "wait": True, "ack": False}))
        sock.sendall(frame({"v": 1, "id": 2, "op": "ping"}))
        replies = [read_frame(sock) for _ in range(2)]
        answer = next(reply for reply in replies if reply["id"] == 1)
        assert answer["ok"] and answer["final"], replies  # no acknowledgement came first
        assert answer["task"]["state"] == "done" and answer["task"]["result"] == 7
        assert [reply["id"] for reply in replies].count(1) == 1
        with Client(running.socket) as client:  # durable: the journal has it
            assert client.status(answer["task"]["task_id"])["state"] == "done"
            assert client.run("echo", value=3) == 3
            with pytest.raises(UnknownStep):
                client.run("no.such.step")
            with pytest.raises(StepFailed):
                client.run("boom")


def test_a_submit_sent_without_ack_field_is_acknowledged_first():
    from governor import protocol
    assert "ack" not in protocol.Submit(1, "noop", wait=True).to_wire()  # what an older daemon accepts
    assert protocol.Submit(1, "noop", wait=True, ack=False).to_wire()["ack"] is False


def test_ends_that_come_while_the_loop_is_busy_reach_it_in_one_drain():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-loop")
    thread.start()
    try:
        delivered, drains, all_in = [], [], threading.Event()

        def on_end(record_id):
            delivered.append(record_id)
            if len(delivered) == 100:
                all_in.set()

        inbox = EndInbox(loop, on_end)
        drain = inbox._drain
        inbox._drain = lambda: (drains.append(1), drain())  # counts the loop's wake-ups for ends
        paused, resume = threading.Event(), threading.Event()
        loop.call_soon_threadsafe(lambda: (paused.set(), resume.wait(PATIENCE_S)))
        assert paused.wait(PATIENCE_S)
        futures = [concurrent.futures.Future() for _ in range(100)]
        for record_id, future in enumerate(futures):
            inbox.watch(record_id, future)
        for future in futures:  # resolved on this thread, as the manager resolves them on its own
            future.set_result(None)
        resume.set()
        assert all_in.wait(PATIENCE_S)
        assert delivered == list(range(100))
        assert len(drains) == 1  # one call_soon_threadsafe per end would be 100
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(PATIENCE_S)
        loop.close()


def test_the_replies_of_one_turn_of_the_loop_go_out_in_one_write(tmp_path, monkeypatch):
    writes, real_write_now = [], connections.gilio.write_now

    def write_now(fd, data):
        writes.append(len(data))
        return real_write_now(fd, data)

    with InProcessDaemon(tmp_path) as running, socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(PATIENCE_S)
        sock.connect(str(running.socket))
        with Client(running.socket) as client:
            assert client.ping()  # the daemon is serving
        monkeypatch.setattr(connections, "gilio", types.SimpleNamespace(write_now=write_now))
        paused, resume = threading.Event(), threading.Event()
        running.loop.call_soon_threadsafe(lambda: (paused.set(), resume.wait(PATIENCE_S)))
        assert paused.wait(PATIENCE_S)
        sock.sendall(b"".join(frame({"v": 1, "id": n, "op": "ping"}) for n in range(20)))
        resume.set()
        replies = [read_frame(sock) for _ in range(20)]
        assert sorted(reply["id"] for reply in replies) == list(range(20))
        assert len(writes) == 1, writes  # one per reply before
