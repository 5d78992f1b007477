"""A manager thread that fails ends every task it held the way any end does: through
``Manager.conclude``, workflows and queue counts included."""

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
