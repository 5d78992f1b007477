"""The SQLite journal: every method, recovery after a kill -9, pruning, threads, bad paths."""

import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from governor.errors import InvalidTransition, StepTimeout
from governor.service.journal import (INTERRUPTED, SCHEMA_VERSION, Journal, JournalError, NewTask, Recovery, TaskRecord)
from governor.limits import Lane, Limits
from governor.protocol import error_from_wire, error_to_wire
from governor.task import TaskState

REPO = Path(__file__).resolve().parents[2]

#: Bounds a subprocess test: a deadlock detector, never reached when things work.
SUBPROCESS_TIMEOUT_S = 60


@pytest.fixture
def path(tmp_path):
    return tmp_path / "state" / "journal.db"


@pytest.fixture
def journal(path):
    with Journal(path) as opened:
        yield opened


def step(name="echo", lane=Lane.POOL, **params):
    return NewTask.step_call(name, params, lane)


# ----------------------------------------------------------------------------- opening

def test_opening_creates_a_private_directory_and_a_wal_database(path):
    with Journal(path):
        pass
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert "tasks_state" in {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    connection.close()


def test_reopening_keeps_the_rows_and_continues_the_ids(path):
    with Journal(path) as journal:
        first = journal.submit([step(), step()])
    with Journal(path) as journal:
        assert [record.id for record in journal.by_state("queued")] == first
        assert journal.submit([step()]) == [first[-1] + 1]


def test_a_directory_is_not_a_journal(tmp_path):
    with pytest.raises(JournalError, match=f"cannot open the journal '{tmp_path}'"):
        Journal(tmp_path)


def test_a_parent_that_is_a_file_is_reported(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(JournalError, match="cannot open the journal") as raised:
        Journal(blocker / "journal.db")
    assert isinstance(raised.value.__cause__, OSError)


def test_a_file_that_is_not_a_database_is_reported(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(JournalError, match="not a database"):
        Journal(junk)


def test_another_sqlite_database_is_not_taken_over(tmp_path):
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE notes (text TEXT)")
    connection.close()
    with pytest.raises(JournalError, match="not a Governor journal"):
        Journal(other)


def test_a_journal_from_a_newer_governor_is_refused(path):
    with Journal(path):
        pass
    with sqlite3.connect(path) as connection:
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    connection.close()
    with pytest.raises(JournalError, match="newer Governor"):
        Journal(path)


def test_a_task_keeps_the_directory_it_was_submitted_from(journal):
    [step_id, flow_id, unknown_id] = journal.submit([
        NewTask.step_call("save", {"path": "out.txt"}, Lane.CRITICAL, cwd="/home/me/project"),
        NewTask.workflow([{"step": "save", "params": {}}], cwd="/srv/other"),
        NewTask.step_call("save", {}, Lane.CRITICAL)])
    assert [journal.get(task_id).cwd for task_id in (step_id, flow_id, unknown_id)] == \
        ["/home/me/project", "/srv/other", None]
    assert [record.cwd for record in journal.recover().resume] == ["/home/me/project", "/srv/other", None]


#: The tasks table as schema versions 1, 2 and 4 wrote it, word for word: the states listed in
#: its CHECK lack "exhausted" before version 3; version 2 added the cwd column, version 4 the
#: lane key and a workflow's progress.
_OLD_STATES = "('cancelled', 'crashed', 'done', 'failed', 'interrupted', 'over_memory', 'queued', 'running', " \
    "'skipped', 'timed_out')"
_V4_STATES = _OLD_STATES.replace("'done', ", "'done', 'exhausted', ")
_OLD_COLUMNS = {1: "", 2: ",\n    cwd TEXT", 4: ",\n    cwd TEXT,\n    lane_key TEXT,\n    progress TEXT"}
_OLD_TABLE = f"""CREATE TABLE tasks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL CHECK (kind IN ('step', 'workflow')),
    step TEXT NOT NULL,
    params TEXT NOT NULL,
    lane TEXT NOT NULL CHECK (lane IN ('critical', 'pool')),
    key TEXT,
    limits TEXT,
    state TEXT NOT NULL CHECK (state IN {{states}}),
    submitted_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL,
    result TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    interrupted INTEGER NOT NULL DEFAULT 0 CHECK (interrupted IN (0, 1)){{columns}}
)"""


def _old_journal(path, version):
    """A journal file as Governor's schema ``version`` (1, 2 or 4) left it: three tasks, the
    newest pruned (so the id counter is ahead of the rows), one pool task running."""
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute(_OLD_TABLE.format(states=_V4_STATES if version == 4 else _OLD_STATES,
                                         columns=_OLD_COLUMNS[version]))
    connection.execute("CREATE INDEX tasks_state ON tasks (state)")
    for step_name, lane, state in [("save", "critical", "done"), ("echo", "pool", "running"), ("gone", "pool", "done")]:
        connection.execute("INSERT INTO tasks (kind, step, params, lane, state, submitted_at, attempts) "
                           "VALUES ('step', ?, '{\"params\":{}}', ?, ?, 1.0, 1)", (step_name, lane, state))
    connection.execute("DELETE FROM tasks WHERE step = 'gone'")
    connection.execute(f"PRAGMA user_version = {version}")
    connection.commit()
    connection.close()


@pytest.mark.parametrize("version", [1, 2])
def test_a_journal_of_an_older_schema_is_rebuilt_and_takes_every_state(path, version):
    _old_journal(path, version)
    with Journal(path) as journal:
        saved, running = journal.get(1), journal.get(2)
        assert (saved.step, saved.state, saved.cwd, running.state) == ("save", "done", None, "running")
        journal.mark_finished(2, TaskState.EXHAUSTED)  # refused by the old CHECK
        assert journal.get(2).state == "exhausted"
        [new_id] = journal.submit([NewTask.step_call("save", {}, Lane.CRITICAL, cwd="/tmp")])
        assert new_id == 4, "an id was given twice: the pruned task 3 had it"
        assert journal.get(new_id).cwd == "/tmp"
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert {row[0] for row in connection.execute("SELECT name FROM sqlite_master")} >= {"tasks", "tasks_state"}
        assert "tasks_rebuilt" not in {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    connection.close()


def test_a_journal_of_schema_4_opens_its_tasks_at_priority_0_and_keeps_new_ones(path):
    _old_journal(path, 4)
    with Journal(path) as journal:
        assert (journal.get(2).state, journal.get(2).priority) == ("running", 0)
        [new_id] = journal.submit([NewTask.step_call("echo", {}, Lane.POOL, priority=-7)])
        assert new_id == 4 and journal.get(new_id).priority == -7
        assert journal.get(new_id).to_wire()["priority"] == -7
        assert [(record.id, record.priority) for record in journal.recover().resume] == [(2, 0), (4, -7)]


@pytest.mark.parametrize("retention_s", [0, -1, float("nan"), "1d", True])
def test_retention_must_be_positive(path, retention_s):
    with pytest.raises(ValueError, match="retention_s"):
        Journal(path, retention_s=retention_s)


def test_a_closed_journal_says_so(path):
    journal = Journal(path)
    journal.close()
    journal.close()
    with pytest.raises(JournalError, match="closed"):
        journal.submit([step()])
    with pytest.raises(JournalError, match="closed"):
        journal.get(1)


# ----------------------------------------------------------------------------- new tasks

def test_new_task_factories_shape_the_params():
    call = NewTask.step_call("git.status", {"repo": "."}, "pool", key="view", limits=Limits(timeout_s=2))
    assert (call.kind, call.params, call.lane, call.key) == ("step", {"params": {"repo": "."}}, Lane.POOL, "view")
    flow = NewTask.workflow([{"step": "a", "params": {}}, {"step": "b", "params": {"x": 1}}])
    assert (flow.kind, flow.step, flow.lane) == ("workflow", "workflow", Lane.CRITICAL)
    assert flow.params == {"calls": [{"step": "a", "params": {}}, {"step": "b", "params": {"x": 1}}]}


@pytest.mark.parametrize("arguments, error", [
    (("job", "s", {"params": {}}, "pool"), ValueError),
    (("step", "", {"params": {}}, "pool"), ValueError),
    (("step", "s", {"calls": []}, "pool"), ValueError),
    (("workflow", "w", {"params": {}}, "critical"), ValueError),
    (("step", "s", {"params": {}}, "cluster"), ValueError),
    (("step", "s", [], "pool"), TypeError),
])
def test_new_task_validates(arguments, error):
    with pytest.raises(error):
        NewTask(*arguments)


# ----------------------------------------------------------------------------- the life of a row

def test_submit_returns_ids_in_order_and_records_queued_rows(journal):
    limits = Limits(timeout_s=1.5, max_memory_mb=64)
    ids = journal.submit([NewTask.step_call("a", {"x": [1, 2]}, Lane.POOL, key="k", limits=limits),
                          NewTask.workflow([{"step": "b", "params": {}}]),
                          step("c", Lane.CRITICAL)], at=1000.0)
    assert ids == sorted(ids) and len(set(ids)) == 3
    record = journal.get(ids[0])
    assert record == TaskRecord(id=ids[0], kind="step", step="a", params={"params": {"x": [1, 2]}}, lane=Lane.POOL,
                                key="k", limits={"timeout_s": 1.5, "max_memory_mb": 64}, state="queued", submitted_at=1000.0, started_at=None,
                                ended_at=None, result=None, error=None, attempts=0, interrupted=False)
    assert not record.terminal and record.own_limits() == limits
    assert journal.get(ids[1]).params == {"calls": [{"step": "b", "params": {}}]}
    assert journal.get(ids[2]).limits is None


def test_submit_is_all_or_nothing(journal):
    with pytest.raises(TypeError):
        journal.submit([step(), "not a task"])
    with pytest.raises(ValueError):
        journal.submit([step(), step(x=float("nan"))])
    assert journal.recent() == []


def test_start_then_finish(journal):
    (task_id,) = journal.submit([step()], at=1.0)
    journal.mark_started(task_id, at=2.0)
    running = journal.get(task_id)
    assert (running.state, running.started_at, running.attempts) == ("running", 2.0, 1)
    journal.mark_finished(task_id, TaskState.DONE, at=3.0, result={"rows": [1, 2]})
    done = journal.get(task_id)
    assert (done.state, done.ended_at, done.result, done.error) == ("done", 3.0, {"rows": [1, 2]}, None)
    assert done.terminal


def test_a_failure_keeps_the_wire_error(journal):
    (task_id,) = journal.submit([step()])
    journal.mark_started(task_id)
    error = StepTimeout("echo", task_id, 1.0, 1.01, 4242)
    journal.mark_finished(task_id, "timed_out", error=error_to_wire(error))
    rebuilt = error_from_wire(journal.get(task_id).error)
    assert type(rebuilt) is StepTimeout and str(rebuilt) == str(error)


def test_a_queued_task_may_end_without_starting(journal):
    (task_id,) = journal.submit([step()])
    journal.mark_finished(task_id, "cancelled")
    assert journal.get(task_id).attempts == 0


def test_transitions_the_journal_refuses(journal):
    (task_id,) = journal.submit([step()])
    journal.mark_started(task_id)
    with pytest.raises(InvalidTransition, match="running -> running"):
        journal.mark_started(task_id)
    journal.mark_finished(task_id, "done", result=1)
    with pytest.raises(InvalidTransition, match="done -> failed"):
        journal.mark_finished(task_id, "failed")
    with pytest.raises(InvalidTransition, match="no such task"):
        journal.mark_started(task_id + 1)
    with pytest.raises(ValueError, match="not a final state"):
        journal.mark_finished(task_id, "running")
    with pytest.raises(ValueError, match="unknown task state"):
        journal.mark_finished(task_id, "exploded")
    assert journal.get(task_id).result == 1


def test_many_starts_in_one_group_say_which_tasks_were_not_queued(journal):
    queued = journal.submit([step(str(n)) for n in range(3)], at=1.0)
    (ended,) = journal.submit([step("ended")])
    journal.mark_finished(ended, "cancelled")
    with journal.group() as group:
        refused = group.mark_started_many([(queued[0], 2.0), (ended, 2.5), (queued[2], 3.0), (ended + 99, 4.0)])
    assert refused == {ended: "cancelled", ended + 99: "no such task"}
    assert [(record.state, record.started_at, record.attempts) for record in map(journal.get, queued)] == [
        ("running", 2.0, 1), ("queued", None, 0), ("running", 3.0, 1)]
    assert journal.get(ended).state == "cancelled"
    with journal.group() as group:
        assert group.mark_started_many([(queued[1], 5.0)]) == {}
    assert journal.get(queued[1]).state == "running"


def test_a_result_that_is_not_json_changes_nothing(journal):
    (task_id,) = journal.submit([step()])
    journal.mark_started(task_id)
    with pytest.raises(TypeError):
        journal.mark_finished(task_id, "done", result={1, 2})
    assert journal.get(task_id).state == "running"


def test_get_recent_and_by_state(journal):
    ids = journal.submit([step(str(n)) for n in range(5)])
    journal.mark_started(ids[1])
    journal.mark_started(ids[3])
    journal.mark_finished(ids[3], "failed")
    assert journal.get(ids[-1] + 100) is None
    assert [record.id for record in journal.recent(3)] == ids[:1:-1]
    assert [record.id for record in journal.recent()] == ids[::-1]
    assert [record.id for record in journal.by_state("queued")] == [ids[0], ids[2], ids[4]]
    assert [record.id for record in journal.by_state(TaskState.RUNNING, "failed")] == [ids[1], ids[3]]
    assert journal.by_state() == []
    with pytest.raises(ValueError):
        journal.by_state("finished")


def test_to_wire(journal):
    (step_id, flow_id) = journal.submit([NewTask.step_call("a", {"x": 1}, "pool", limits=Limits(timeout_s=2)),
                                         NewTask.workflow([{"step": "b", "params": {}}])], at=5.0)
    journal.mark_started(step_id, at=6.0)
    journal.mark_finished(step_id, "done", at=7.0, result=[1])
    assert journal.get(step_id).to_wire() == {
        "task_id": step_id, "kind": "step", "step": "a", "lane": "pool", "key": None, "limits": {"timeout_s": 2},
        "state": "done", "submitted_at": 5.0, "started_at": 6.0, "ended_at": 7.0, "error": None, "attempts": 1,
        "interrupted": False, "lane_key": None, "priority": 0, "steps_done": None, "params": {"x": 1}, "result": [1]}
    flow = journal.get(flow_id).to_wire()
    assert flow["calls"] == [{"step": "b", "params": {}}] and "params" not in flow
    summary = journal.get(step_id).to_wire(summary=True)
    assert "params" not in summary and "result" not in summary and summary["state"] == "done"


# ----------------------------------------------------------------------------- recovery

def test_recover_requeues_pool_and_interrupts_critical(journal):
    pool_running, critical_running, queued, done = journal.submit(
        [step("p"), step("c", Lane.CRITICAL), step("q", Lane.CRITICAL), step("d")])
    for task_id in (pool_running, critical_running, done):
        journal.mark_started(task_id, at=10.0)
    journal.mark_finished(done, "done", at=11.0)
    recovery = journal.recover(now=20.0)
    assert [record.id for record in recovery.resume] == [pool_running, queued]
    assert recovery.resume[0].interrupted and recovery.resume[0].attempts == 1
    assert not recovery.resume[1].interrupted
    (interrupted,) = recovery.interrupted
    assert interrupted == journal.get(critical_running)
    assert (interrupted.state, interrupted.ended_at, interrupted.interrupted) == (INTERRUPTED, 20.0, True)
    assert interrupted.terminal
    with pytest.raises(InvalidTransition):  # at most once: it can never start again
        journal.mark_started(critical_running)
    journal.mark_started(pool_running)  # at least once: it starts again
    assert journal.get(pool_running).attempts == 2
    again = journal.recover()  # a second crash while it re-ran: queued again
    assert again == Recovery(resume=[journal.get(pool_running), journal.get(queued)], interrupted=[])
    assert again.resume[0].attempts == 2


def test_recover_keeps_at_most_one_running_row_per_key_and_reruns_only_that_one(journal):
    """Per lane key, a running row followed by a later running row of its key (or a keyless
    one) had ended before that one started: it ran, its end lost. Only the last of each
    key may have been running; only that one may run again."""
    def critical(name, key):
        return NewTask.step_call(name, {}, Lane.CRITICAL, lane_key=key)
    a1, b1, a2, b2, a3 = journal.submit([critical("a1", "a"), critical("b1", "b"), critical("a2", "a"),
                                         critical("b2", "b"), critical("a3", "a")])
    for task_id in (a1, b1, a2):
        journal.mark_started(task_id, at=10.0)
    recovery = journal.recover(now=20.0, rerun=lambda record: True)
    assert [record.id for record in recovery.rerun] == [b1, a2]
    assert [record.id for record in recovery.interrupted] == [a1]
    assert [record.id for record in recovery.resume] == [b1, a2, b2, a3]
    assert [journal.get(task_id).state for task_id in (a1, b1, a2)] == ["interrupted", "queued", "queued"]
    assert journal.get(b1).interrupted and journal.get(a2).interrupted


def test_a_keyless_critical_row_orders_against_every_key(journal):
    barrier, keyed = journal.submit([NewTask.step_call("all", {}, Lane.CRITICAL),
                                     NewTask.step_call("one", {}, Lane.CRITICAL, lane_key=7)])
    for task_id in (barrier, keyed):
        journal.mark_started(task_id)
    recovery = journal.recover(rerun=lambda record: True)
    assert [record.id for record in recovery.interrupted] == [barrier]
    assert [(record.id, record.lane_key) for record in recovery.rerun] == [(keyed, "7")]


def test_recover_interrupts_what_rerun_refuses(journal):
    [task_id] = journal.submit([NewTask.step_call("save", {}, Lane.CRITICAL, lane_key="a")])
    journal.mark_started(task_id)
    recovery = journal.recover(rerun=lambda record: record.step != "save")
    assert [record.id for record in recovery.interrupted] == [task_id] and recovery.rerun == []


def test_attempts_and_a_workflows_progress_are_journaled(journal):
    step_id, flow_id = journal.submit([NewTask.step_call("flaky", {}, Lane.POOL),
                                       NewTask.workflow([{"step": "s", "params": {}}] * 3, lane_key="k")])
    with pytest.raises(InvalidTransition):
        journal.mark_attempt(step_id)  # not running
    journal.mark_started(step_id, at=1.0)
    journal.mark_attempt(step_id, at=2.0)
    assert (journal.get(step_id).attempts, journal.get(step_id).started_at) == (2, 2.0)
    journal.mark_started(flow_id)
    journal.mark_progress(flow_id, [{"n": 1}, None])
    record = journal.get(flow_id)
    assert record.progress == [{"n": 1}, None] and record.to_wire()["steps_done"] == 2
    assert record.lane_key == "k"
    with pytest.raises(ValueError):
        journal.mark_progress(flow_id, [float("nan")])


def test_a_killed_process_leaves_a_journal_that_recovers(path):
    """A process journals work, starts some of it and dies by SIGKILL: every commit is there."""
    script = textwrap.dedent(f"""
        import os, signal
        from governor.service.journal import Journal, NewTask
        journal = Journal({str(path)!r})
        ids = journal.submit([NewTask.step_call(name, {{"n": n}}, lane) for n, (name, lane) in enumerate([
            ("pool-running", "pool"), ("critical-running", "critical"), ("queued-1", "critical"),
            ("pool-done", "pool"), ("queued-2", "pool"), ("pool-running-2", "pool")])])
        for task_id in (ids[0], ids[1], ids[3], ids[5]):
            journal.mark_started(task_id)
        journal.mark_finished(ids[3], "done", result={{"ok": True}})
        print(*ids, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        print("still alive", flush=True)
    """)
    child = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                           timeout=SUBPROCESS_TIMEOUT_S)
    assert child.returncode == -signal.SIGKILL, child.stderr
    ids = [int(word) for word in child.stdout.split()]
    assert len(ids) == 6
    with Journal(path) as journal:
        recovery = journal.recover()
        assert [record.step for record in recovery.resume] == ["pool-running", "queued-1", "queued-2",
                                                               "pool-running-2"]
        assert [record.id for record in recovery.resume] == [ids[0], ids[2], ids[4], ids[5]]
        assert [record.interrupted for record in recovery.resume] == [True, False, False, True]
        assert [record.step for record in recovery.interrupted] == ["critical-running"]
        assert journal.get(ids[3]).result == {"ok": True}
        assert [record.params for record in recovery.resume][1] == {"params": {"n": 2}}


# ----------------------------------------------------------------------------- pruning

def test_prune_deletes_only_old_finished_rows(path):
    day = 24 * 3600.0
    with Journal(path, retention_s=day) as journal:
        old_done, old_cancelled, fresh_done, old_queued, old_running, old_critical = journal.submit(
            [step(), step(), step(), step(), step(), step(lane=Lane.CRITICAL)], at=0.0)
        for task_id in (old_done, fresh_done, old_running, old_critical):
            journal.mark_started(task_id, at=1.0)
        journal.mark_finished(old_done, "done", at=2.0)
        journal.mark_finished(old_cancelled, "cancelled", at=2.0)
        journal.mark_finished(fresh_done, "done", at=day + 100.0)
        journal.recover(now=3.0)  # old_critical: interrupted, ended at 3.0
        assert journal.prune(now=day + 10.0) == 3
        assert {record.id for record in journal.recent()} == {fresh_done, old_queued, old_running}
        assert journal.prune(now=day + 10.0) == 0
        assert journal.prune(now=10 * day) == 1  # fresh_done, at last; unfinished rows stay
        assert {record.id for record in journal.recent()} == {old_queued, old_running}
        (newest,) = journal.submit([step()])
        assert newest > old_critical  # ids are never reused


# ----------------------------------------------------------------------------- threads

def test_two_threads_writing_at_once(journal):
    """The daemon's loop thread submits while the manager thread starts and finishes tasks."""
    count = 300
    submitted = []
    barrier = threading.Barrier(2)
    submitting_over = threading.Event()
    failures = []

    def submitter():
        barrier.wait()
        try:
            for n in range(count):
                submitted.extend(journal.submit([step(str(n), Lane.CRITICAL if n % 2 else Lane.POOL)]))
        finally:
            submitting_over.set()

    def runner():
        barrier.wait()
        while True:
            over = submitting_over.is_set()  # read first: a row submitted after it is seen next round
            queued = journal.by_state("queued")
            for record in queued:
                journal.mark_started(record.id)
                journal.mark_finished(record.id, "done", result=record.step)
            if over and not queued:
                return

    threads = [threading.Thread(target=guard(target, failures)) for target in (submitter, runner)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    assert len(set(submitted)) == count
    done = journal.by_state("done")
    assert [record.id for record in done] == sorted(submitted)
    assert all(record.result == record.step and record.attempts == 1 for record in done)


def guard(target, failures):
    def run():
        try:
            target()
        except BaseException as error:  # reported by the test, not lost in a thread
            failures.append(error)
            raise
    return run


def test_another_process_can_read_while_the_journal_is_open(journal, path):
    (task_id,) = journal.submit([step()])
    reader = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import sqlite3
        connection = sqlite3.connect({str(path)!r})
        print(connection.execute("SELECT state FROM tasks WHERE id = {task_id}").fetchone()[0])
    """)], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert reader.stdout.strip() == "queued", reader.stderr
    journal.mark_started(task_id)


def test_mark_finished_returns_the_record_as_it_now_reads(tmp_path):
    with Journal(tmp_path / "journal.sqlite3") as journal:
        [task_id] = journal.submit([NewTask.step_call("echo", {"value": 1}, Lane.POOL)])
        record = journal.mark_finished(task_id, TaskState.DONE, at=3.0, result={"rows": [1]})
        assert record == journal.get(task_id)
        assert (record.state, record.ended_at, record.result) == ("done", 3.0, {"rows": [1]})
