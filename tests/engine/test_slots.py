"""A worker's send path (``governor.engine.slots.Slot``) on a real socket pair: the frames a
dispatch pass queues for one worker go down together, when the pass is over."""

import multiprocessing

import pytest

from governor.engine.backend import ReadSelector
from governor.engine.slots import Slot
from governor.limits import Lane


@pytest.fixture
def slot_and_worker_end():
    ours, theirs = multiprocessing.Pipe()
    selector = ReadSelector()
    slot = Slot(1, Lane.POOL, 0, None, selector, tasks=ours)
    yield slot, theirs
    slot.close_sockets()
    theirs.close()
    selector.close()


def test_queued_frames_wait_for_the_flush_then_arrive_whole_and_in_order(slot_and_worker_end):
    slot, worker_end = slot_and_worker_end
    slot.send(b"first task")
    slot.send(b"second task")
    assert not worker_end.poll(0)  # nothing is written while the pass goes on
    slot.flush()
    assert worker_end.recv_bytes() == b"first task"
    assert worker_end.recv_bytes() == b"second task"
    assert not slot.unsent
    slot.flush()  # nothing left: writes nothing
    assert not worker_end.poll(0)
