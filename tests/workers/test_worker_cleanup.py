"""A step's processes live no longer than its task, and a worker is clean for every task
(issue 16, items 2-4), with real workers, real escapes and real deaths.

Each escape kind (a child in the worker's group, a child in a new session, a
double-forked daemon) meets each end (the worker segfaults, calls ``os._exit``, is
SIGKILLed from outside, or the step just returns): afterwards psutil finds nothing of
the step. Ordering comes from files the steps publish, never from sleeps.
"""

import os
import signal

import psutil
import pytest

from conftest import wait_until
from governor import Call, WorkerCrashed
from step_library import ENDS, ESCAPES, wait_for_path


def read_pid(path) -> int:
    wait_for_path(str(path))
    return int(path.read_text())


def still_running(process: psutil.Process) -> bool:
    """Whether ``process`` runs (``is_running`` compares start times: a reused pid is not it)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("end", ENDS)
@pytest.mark.parametrize("escape", ESCAPES)
def test_nothing_a_step_started_outlives_its_task(make_supervisor, tmp_path, escape, end):
    sup = make_supervisor(workers=1, spares=0)
    future = sup.submit("escape_then_end", str(tmp_path), escape, end)
    escaped = psutil.Process(read_pid(tmp_path / "escaped"))
    assert still_running(escaped)  # the escape worked: it is there to be killed
    worker = read_pid(tmp_path / "worker")
    (tmp_path / "go").touch()
    if end == "outside_kill":
        os.kill(worker, signal.SIGKILL)
    if end == "return":
        assert future.result(timeout=60) == worker
    else:
        with pytest.raises(WorkerCrashed):
            future.result(timeout=60)
    assert wait_until(lambda: not still_running(escaped)), f"{escape} process {escaped.pid} outlived its task ({end})"
    # The lane still serves, from a clean worker.
    assert sup.submit("echo", "next").result(timeout=60) == "next"


def test_the_next_task_finds_the_worker_as_it_started(make_supervisor, tmp_path):
    sup = make_supervisor(workers=1, spares=0)
    before = sup.submit("inherited_state").result(timeout=60)
    messy = sup.submit("leave_a_mess", str(tmp_path)).result(timeout=60)
    after = sup.submit("inherited_state").result(timeout=60)
    assert messy == before["pid"] == after["pid"]  # the same worker: it was cleaned, not replaced
    assert after == before
    assert sup.metrics()["worker_recycles"].get("pool", {}).get("dirty", 0) == 0


def test_a_call_runs_in_its_cwd_and_the_worker_goes_back_to_its_own(make_supervisor, tmp_path):
    sup = make_supervisor(workers=1, spares=0)
    before = sup.submit("inherited_state").result(timeout=60)
    assert before["cwd"] != str(tmp_path)
    inside = sup.submit_call(Call("inherited_state", cwd=str(tmp_path))).result(timeout=60)
    after = sup.submit("inherited_state").result(timeout=60)
    assert inside["cwd"] == str(tmp_path) and inside["pid"] == before["pid"]
    assert after == before  # the same worker, back in its own directory
    gone = tmp_path / "gone"
    with pytest.raises(FileNotFoundError, match="No such file or directory"):  # the caller's directory vanished
        sup.submit_call(Call("inherited_state", cwd=str(gone))).result(timeout=60)
    assert sup.submit("inherited_state").result(timeout=60) == before
    with pytest.raises(ValueError, match="absolute"):
        Call("inherited_state", cwd="relative/dir")


def test_a_worker_that_cannot_be_cleaned_is_recycled(make_supervisor):
    sup = make_supervisor(workers=1, spares=0)
    dirty = sup.submit("leave_a_thread").result(timeout=60)
    assert sup.submit("pid").result(timeout=60) != dirty
    assert sup.metrics()["worker_recycles"]["pool"]["dirty"] == 1
