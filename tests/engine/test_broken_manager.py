"""A manager thread that fails ends every task it held the way any end does: through
``Manager.conclude``, workflows and queue counts included."""

import sys
import threading
import time

import pytest

from governor import Call, Limits, StepSkipped, SupervisorBroken, WorkflowFailed
from step_library import wait_for_path


def test_a_broken_manager_fails_a_waiting_workflow_and_empties_the_queue_counts(make_supervisor, tmp_path):
    # The injected clock is the one seam that reaches the manager's own loop: when it
    # fails there once, the loop itself fails (not one guarded handler), as a bug in it
    # would; it works again for the clean-up after (killing the workers reads it too).
    broken = threading.Event()

    def clock() -> float:
        if broken.is_set() and threading.current_thread().name == "governor-manager":
            broken.clear()
            raise RuntimeError("the clock broke")
        return time.monotonic()

    sup = make_supervisor(workers=1, clock=clock)
    started, go = str(tmp_path / "started"), str(tmp_path / "go")
    # A timeout gives the manager a deadline, so its loop reads the clock on every turn.
    flow = sup.workflow([Call("hold_until", (started, go), limits=Limits(timeout_s=600)), Call("echo", (2,))])
    wait_for_path(started)
    broken.set()
    later = sup.submit("critical_record", 1)  # wakes the manager; queued behind the workflow

    with pytest.raises(WorkflowFailed) as failed:
        flow.result(timeout=30)  # the deadlock detector: before, the workflow's future never ended
    assert isinstance(failed.value.error, SupervisorBroken) and failed.value.skipped == ["echo"]
    with pytest.raises(StepSkipped):
        flow.steps[1].result(timeout=5)
    with pytest.raises(SupervisorBroken):
        later.result(timeout=5)
    assert sup.metrics()["queue_depth"] == {"critical": 0, "pool": 0}
    with pytest.raises(SupervisorBroken):
        sup.submit("echo", 3)


def test_a_submission_that_reached_the_inbox_as_the_manager_failed_fails_too(make_supervisor):
    # The clock breaks in the middle of a manager turn that no submission started, and
    # holds the turn there until a submission has reached the inbox: the loop that would
    # have queued it is gone, so the failure path must end it.
    breaking, submitted = threading.Event(), threading.Event()
    broken = threading.Event()

    def clock() -> float:
        # In the loop itself (not in a guarded handler, which would only log it).
        in_loop = sys._getframe(1).f_code.co_name in ("run", "_next_timeout")
        if broken.is_set() and in_loop and threading.current_thread().name == "governor-manager":
            broken.clear()
            breaking.set()
            submitted.wait(30)
            raise RuntimeError("the clock broke")
        return time.monotonic()

    sup = make_supervisor(workers=1, clock=clock)
    broken.set()
    # Any message wakes the manager into a turn that reads the clock; not a submission.
    def wake() -> None:
        try:
            sup.describe_workers(timeout=30)
        except Exception:  # answered or not: the manager broke while it was asked
            pass

    waker = threading.Thread(target=wake)
    waker.start()
    assert breaking.wait(30)
    later = sup.submit("critical_record", 1)  # the manager is not broken yet: accepted
    submitted.set()
    with pytest.raises(SupervisorBroken):
        later.result(timeout=30)
    waker.join(30)
