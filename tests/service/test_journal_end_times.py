"""The journal's end of a task is when the task ended, not when the daemon wrote it: the
write waits for the loop's next group commit, and a reader of the journal (``status``, the
view bench's work after a supersede) takes ``ended_at - started_at`` for time spent running."""

import sqlite3
import time

from conftest import wait_until
from daemon_harness import InProcessDaemon
from governor import Call
from governor.client import Client
from governor.service.starts import ending


def test_an_end_written_late_carries_the_time_the_step_ended(tmp_path, caplog):
    # Another process holds the journal's write lock as a pool step ends: its end is
    # written only after the lock is freed, a busy timeout and more after the step ended.
    marker, go = tmp_path / "started", tmp_path / "go"
    with InProcessDaemon(tmp_path) as running, Client(running.socket) as client:
        future = client.submit("hold_until", marker=str(marker), go=str(go))
        assert wait_until(marker.exists, timeout=60)
        other = sqlite3.connect(running.journal, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            let_go = time.time()
            go.touch()
            # The loop's first try to commit the end failed: the step had ended before it.
            assert wait_until(lambda: "database is locked" in caplog.text, timeout=60)
            freed = time.time()
        finally:
            other.execute("ROLLBACK")
            other.close()
        future.result(timeout=30)
        record = client.status(future.task_id)
    assert record["state"] == "done"
    assert record["started_at"] <= let_go <= record["ended_at"] < freed, (let_go, freed, record)


def test_a_steps_and_a_workflows_end_is_their_last_steps_own(make_supervisor):
    sup = make_supervisor(workers=1)
    step = sup.submit("echo", 1)
    flow = sup.workflow([Call("echo", (2,)), Call("echo", (3,))])
    assert step.result(timeout=60) == 1 and flow.result(timeout=60) == [2, 3]
    answered = time.time()  # after both ended: a time taken when the end is written is later
    for future in (step, flow):
        state, ended, result, error = ending(future, 1, [])
        assert (state, error) == ("done", None)
        assert ended < answered
    # The workflow ended with its last step, not its first.
    _, first_ended, _, _ = ending(flow.steps[0], 1, [])
    assert first_ended <= ending(flow, 1, [])[1]
