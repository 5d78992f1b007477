"""Crash recovery per lane key: each key's ends journaled before its next start, idempotent
critical steps and workflows run again after a kill -9, the others interrupted.

What each step did is counted from a SQLite ledger the steps append to
(``governor.bench.ledger_steps``), not assumed from the journal.
"""

import json
import signal
import sqlite3
import threading

import psutil

from conftest import alive, wait_until
from daemon_harness import DaemonProcess, InProcessDaemon
from governor import Call
from governor.client import Client
from governor.bench.ledger_steps import runs as ledger_runs


def _state(journal_path, task_id):
    """A task's state as a separate reader of the journal file sees it (what a crash would leave)."""
    db = sqlite3.connect(f"file:{journal_path}?mode=ro", uri=True, timeout=30)
    try:
        return db.execute("SELECT state FROM tasks WHERE id = ?", (task_id,)).fetchone()[0]
    finally:
        db.close()


def test_a_keys_end_is_committed_before_its_next_start_while_other_keys_run(tmp_path):
    """With two critical workers, a1 ends while b1 still runs (b1 started last), and a2
    starts while the daemon's loop cannot commit a1's end: a1's end must be committed by
    the start of a2, or a crash now would leave a1 and a2 both "running"."""
    ledger, gate_a, gate_b = (str(tmp_path / name) for name in ("ledger.db", "gate-a", "gate-b"))
    loop_held, release_loop = threading.Event(), threading.Event()
    with InProcessDaemon(tmp_path, critical_workers=2) as daemon, Client(daemon.socket) as client:
        a1 = client.submit("ledger_once", ledger=ledger, key="a", name="a1", gate=gate_a).wait_for_id(60)
        assert wait_until(lambda: ledger_runs(ledger) == ["a1"], timeout=60)
        b1 = client.submit("ledger_once", ledger=ledger, key="b", name="b1", gate=gate_b).wait_for_id(60)
        a2 = client.submit("ledger_once", ledger=ledger, key="a", name="a2").wait_for_id(60)
        assert wait_until(lambda: ledger_runs(ledger) == ["a1", "b1"], timeout=60)

        def hold():
            loop_held.set()
            release_loop.wait(120)
        daemon.loop.call_soon_threadsafe(hold)
        try:
            assert loop_held.wait(60)
            open(gate_a, "w").close()
            assert wait_until(lambda: _state(daemon.journal, a2) != "queued", timeout=60)
            assert (_state(daemon.journal, a1), _state(daemon.journal, b1)) == ("done", "running")
        finally:
            release_loop.set()
        open(gate_b, "w").close()
        assert [client.wait(task_id, timeout=120)["state"] for task_id in (a1, b1, a2)] == ["done"] * 3


def test_after_a_kill_idempotent_steps_run_again_and_others_stay_interrupted(tmp_path):
    ledger, gate = str(tmp_path / "ledger.db"), str(tmp_path / "gate")
    first = DaemonProcess(tmp_path, workers=1, extra_args=("--critical-workers", "3")).start()
    with Client(first.socket) as client:
        def step(name, key, again=True, held=False):
            return client.submit("ledger_again" if again else "ledger_once", ledger=ledger, key=key, name=name,
                                 gate=gate if held else "").wait_for_id(60)
        a1, a2 = step("a1", "a"), step("a2", "a", held=True)
        b1, b2 = step("b1", "b", again=False, held=True), step("b2", "b", again=False)
        flow = client.workflow([("ledger_again", {"ledger": ledger, "key": "c", "name": name,
                                                  "gate": gate if name == "c2" else ""})
                                for name in ("c1", "c2", "c3")]).wait_for_id(60)
        assert wait_until(lambda: set(ledger_runs(ledger)) == {"a1", "a2", "b1", "c1", "c2"}, timeout=60)
    workers = psutil.Process(first.process.pid).children(recursive=True)
    first.stop(signal.SIGKILL)
    assert wait_until(lambda: not any(alive(worker.pid) for worker in workers), timeout=30)
    open(gate, "w").close()

    second = DaemonProcess(tmp_path, workers=1, extra_args=("--critical-workers", "3")).start()
    try:
        with Client(second.socket) as client:
            records = {task_id: client.wait(task_id, timeout=120) for task_id in (a1, a2, b1, b2, flow)}
    finally:
        assert second.stop() == 0
    assert {task_id: record["state"] for task_id, record in records.items()} == {
        a1: "done", a2: "done", b1: "interrupted", b2: "done", flow: "done"}
    assert records[a2]["interrupted"] and records[a2]["attempts"] == 2
    assert records[flow]["result"] == ["c1", "c2", "c3"] and records[flow]["lane_key"] == "c"
    starts = ledger_runs(ledger)
    assert sorted(starts) == ["a1", "a2", "a2", "b1", "b2", "c1", "c2", "c2", "c3"], \
        "a step ran twice that should not have, or one did not run"
    assert starts.index("b2") > starts.index("b1") and starts.index("c3") > starts.index("c2")


def test_a_resumed_workflow_that_fails_names_its_step_in_the_whole_workflow(tmp_path):
    """Killed while its second step runs, the workflow resumes at that step and fails at its
    third: the error says step 2 with both earlier results, not step 1 of the resumed tail."""
    ledger, gate = str(tmp_path / "ledger.db"), str(tmp_path / "gate")
    calls = [("ledger_again", {"ledger": ledger, "key": "c", "name": "c1"}),
             ("ledger_again", {"ledger": ledger, "key": "c", "name": "c2", "gate": gate}),
             ("noted_boom", {"message": "late"})]
    first = DaemonProcess(tmp_path, workers=1).start()
    with Client(first.socket) as client:
        flow = client.workflow(calls).wait_for_id(60)
        assert wait_until(lambda: ledger_runs(ledger) == ["c1", "c2"], timeout=60)
    workers = psutil.Process(first.process.pid).children(recursive=True)
    first.stop(signal.SIGKILL)
    assert wait_until(lambda: not any(alive(worker.pid) for worker in workers), timeout=30)
    open(gate, "w").close()

    second = DaemonProcess(tmp_path, workers=1).start()
    try:
        with Client(second.socket) as client:
            record = client.wait(flow, timeout=120)
    finally:
        assert second.stop() == 0
    assert ledger_runs(ledger) == ["c1", "c2", "c2"]  # resumed at c2, not from the start
    assert record["state"] == "failed"
    error = record["error"]
    assert error["type"] == "WorkflowFailed" and error["message"].startswith("workflow failed at step 2:")
    assert (error["fields"]["index"], error["fields"]["results"], error["fields"]["skipped"]) == (2, ["c1", "c2"], [])


def test_a_task_resumed_after_a_kill_keeps_its_priority(tmp_path):
    """Four tasks queued behind a held pool worker, the last at priority 100; after kill -9
    and a restart they run again from the journal, and the last still starts first."""
    started, go = str(tmp_path / "started"), str(tmp_path / "go")
    first = DaemonProcess(tmp_path, workers=1).start()
    with Client(first.socket) as client:
        client.submit("hold_until", marker=started, go=go).wait_for_id(60)
        assert wait_until(lambda: (tmp_path / "started").exists(), timeout=60)
        queued = [client.submit_call(Call("timed_sleep", kwargs={"ms": 0, "tag": tag}, priority=priority))
                  .wait_for_id(60) for tag, priority in (("a", 0), ("b", 0), ("c", 0), ("urgent", 100))]
    workers = psutil.Process(first.process.pid).children(recursive=True)
    first.stop(signal.SIGKILL)
    assert wait_until(lambda: not any(alive(worker.pid) for worker in workers), timeout=30)

    second = DaemonProcess(tmp_path, workers=1).start()  # the held step resumes first, and holds the worker
    try:
        shown = second.cli("status", str(queued[-1]))
        assert shown.returncode == 0 and "priority" in shown.stdout and "100" in shown.stdout, shown.stdout
        assert json.loads(second.cli("status", str(queued[-1]), "--json").stdout)["priority"] == 100
        open(go, "w").close()
        with Client(second.socket) as client:
            records = [client.wait(task_id, timeout=120) for task_id in queued]
    finally:
        assert second.stop() == 0
    assert [record["state"] for record in records] == ["done"] * 4
    starts = {record["result"][0]: record["result"][1] for record in records}
    assert min(starts, key=starts.get) == "urgent", starts
