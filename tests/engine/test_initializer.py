"""``Supervisor(initializer=, initargs=, max_tasks_per_child=)``: per-worker set-up, as the stdlib's.

Each initializer writes what it did to a file named after its worker's pid, so the test
reads from the outside which worker ran it and how often; the tasks say what they saw.
"""

import collections
import os
import uuid

import pytest

from conftest import processes_marked, wait_until
from governor import Supervisor, WorkerStartFailed
from step_library import fail_to_initialize_once, record_initialized, registry, sleep_initializing


def test_every_worker_runs_the_initializer_once_before_its_first_task(tmp_path):
    with Supervisor(registry, workers=3, max_tasks_per_child=4, initializer=record_initialized,
                    initargs=(str(tmp_path), "connected")) as sup:
        seen = [sup.submit("initialized").result(timeout=60) for _ in range(30)]
        critical = sup.workflow([("initialized", {})]).result(timeout=60)  # a workflow runs in the critical lane
    ran = {int(name): (tmp_path / name).read_text().splitlines() for name in os.listdir(tmp_path)}
    assert all(value == "connected" for _, value in seen + critical), "every task saw its worker set up"
    pids = {pid for pid, _ in seen + critical}
    assert all(ran.get(pid) == ["connected"] for pid in pids), "each worker ran it once, before its tasks"
    assert max(collections.Counter(pid for pid, _ in seen).values()) <= 4, "max_tasks_per_child replaced workers"
    assert len(pids) >= 30 // 4 + 1


def test_an_initializer_that_raises_fails_start_with_its_traceback(tmp_path):
    flag, attempts = tmp_path / "flag", tmp_path / "attempts"
    flag.touch()
    sup = Supervisor(registry, workers=2, initializer=fail_to_initialize_once, initargs=(str(flag), str(attempts)))
    with pytest.raises(WorkerStartFailed, match="(?s)initializer raised.*ConnectionRefusedError: the database is gone"):
        sup.start()
    # One try per worker started at once (2 pool + 1 spare, the critical one + 1 spare), no more.
    assert len(attempts.read_text().splitlines()) <= 5, "no crash loop: start gave up at the first failure"


def test_a_replacement_worker_whose_initializer_fails_fails_the_queued_tasks(tmp_path):
    flag, attempts, opened = tmp_path / "flag", tmp_path / "attempts", tmp_path / "open"
    opened.touch()
    with Supervisor(registry, workers=1, spares=0, max_tasks_per_child=1, initializer=fail_to_initialize_once,
                    initargs=(str(flag), str(attempts))) as sup:
        # The first task creates the flag, so every worker started after it fails to initialise.
        assert sup.submit("hold_until", str(flag), str(opened)).result(timeout=60)
        with pytest.raises(WorkerStartFailed, match="no pool worker could be started"):
            sup.submit("initialized").result(timeout=60)
        tries = len(attempts.read_text().splitlines())
    assert tries <= 2 + 4, "a few attempts with back-off, not a crash loop"


@pytest.mark.slow
def test_an_initializer_that_does_not_end_in_time_fails_start_and_its_workers_end(monkeypatch):
    marker = uuid.uuid4().hex
    monkeypatch.setenv("GOVERNOR_TEST_MARK", marker)  # inherited by the template and its workers
    sup = Supervisor(registry, workers=1, spares=0, initializer=sleep_initializing, initargs=(600,),
                     initializer_timeout_s=1)
    with pytest.raises(WorkerStartFailed, match="ran its initializer and connected within 1s"):
        sup.start()
    # Workers still in their initializer had not connected, so the supervisor knew no pid
    # of theirs: each ends itself at the deadline, not 600 s later as an orphan.
    assert wait_until(lambda: not processes_marked(marker), timeout=30), processes_marked(marker)


def test_initializer_arguments_are_checked_at_construction():
    with pytest.raises(TypeError, match="callable"):
        Supervisor(registry, initializer="not a function")
    with pytest.raises(TypeError, match="not both"):
        Supervisor(registry, max_tasks_per_worker=2, max_tasks_per_child=3)
    with pytest.raises(ValueError):
        Supervisor(registry, initializer=record_initialized, initializer_timeout_s=0)
