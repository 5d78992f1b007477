"""The resource governor, with real processes: timeouts, memory, cancellation, crashes, recovery.

Every assertion about a process's death is checked with psutil; ordering comes from marker
files the steps write (cross-process events), never from sleeps.
"""

import concurrent.futures
import logging
import os
import random
import shutil
import signal
import sys
import time

import pytest

from conftest import BACKENDS, alive, wait_until
from governor import (Call, Limits, MemoryLimitExceeded, StepCancelled, StepTimeout, Supervisor,
                      TaskState, WorkerCrashed, WorkerStartFailed)
from governor.engine.starts import WORKER_START_TIMEOUT_S
from governor.steps import StepRegistry
from step_library import wait_for_path

# Every test with a supervisor runs on both backends of the pool lane, with the same
# assertions, unless it says why not: the local loky pool and a Ray node (conftest.ray_node).


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def read_pid(path) -> int:
    wait_for_path(str(path))
    return int(path.read_text())


def with_limits(step, *args, **limits):
    return Call(step, args, limits=Limits(**limits))


# regex_holding_the_gil: on Ray the worker's own kill cannot run (its link thread needs the
# GIL), so this is the test of the ray.cancel(force=True) backstop.
@pytest.mark.parametrize("step", ["busy_loop", "sleep_in_c", "regex_holding_the_gil"])
def test_timeout_kills_a_step_in_python_or_in_c(supervisor, tmp_path, step):
    marker = tmp_path / "pid"
    future = supervisor.submit_call(with_limits(step, str(marker), timeout_s=0.3))
    with pytest.raises(StepTimeout) as timed_out:
        future.result(timeout=30)
    error = timed_out.value
    assert error.limit_s == 0.3
    assert error.elapsed_s >= 0.3
    assert error.pid == read_pid(marker)
    assert not alive(error.pid)
    assert future.state is TaskState.TIMED_OUT
    assert supervisor.submit("echo", "still serving").result(timeout=30) == "still serving"


@pytest.mark.parametrize("step", ["child_sleeper", "daemonised_grandchild", "setsid_grandchild"])
def test_timeout_kills_what_the_step_started(supervisor, tmp_path, step):
    # A `sleep 1000` child in the worker's process group, one that left it (setsid), and a
    # grandchild that left it: Ray itself kills a worker's direct children, not that one.
    marker = tmp_path / "descendant"
    # Generous: the kill must come after the step published its descendant's pid, and a
    # shell starting `setsid sleep` on a loaded 2-core machine took over 0.5 s.
    future = supervisor.submit_call(with_limits(step, str(marker), timeout_s=3))
    descendant = read_pid(marker)
    with pytest.raises(StepTimeout):
        future.result(timeout=30)
    assert wait_until(lambda: not alive(descendant), timeout=5), f"{step}'s `sleep 1000` outlived the kill"


@pytest.mark.parametrize("step", ["child_sleeper", "setsid_grandchild"])
def test_cancel_kills_what_the_running_step_started(supervisor, tmp_path, step):
    marker = tmp_path / "descendant"
    future = supervisor.submit(step, str(marker))
    descendant = read_pid(marker)
    assert future.cancel("navigated away")
    with pytest.raises(StepCancelled) as cancelled:
        future.result(timeout=30)
    assert cancelled.value.killed, "the step ignored the cooperative cancel: its worker was killed"
    assert wait_until(lambda: not alive(descendant), timeout=5), f"{step}'s `sleep 1000` outlived the cancel"


def test_declared_step_timeout_applies(supervisor):
    with pytest.raises(StepTimeout):
        supervisor.submit("declared_timeout_loop").result(timeout=30)


def test_queue_wait_does_not_count_against_the_timeout(make_supervisor, tmp_path):
    sup = make_supervisor(workers=1)
    # Margins for a loaded machine: it waits 2 s in the queue, past its 1.5 s limit, and its
    # 100 ms run has 1.4 s to spare (a Ray worker at load 25 took 0.4 s for it).
    first = sup.submit("timed_sleep", 2000)
    second = sup.submit_call(Call("timed_sleep", (100,), limits=Limits(timeout_s=1.5)))
    assert first.result(timeout=30)
    assert second.result(timeout=30), "waited 2 s in the queue, ran 100 ms: no timeout"


def test_memory_limit_kills_a_growing_step(supervisor):
    future = supervisor.submit_call(Call("allocate", kwargs={"chunk_mb": 50, "total_mb": 2048},
                                         limits=Limits(max_memory_mb=200)))
    with pytest.raises(MemoryLimitExceeded) as over:
        future.result(timeout=60)
    error = over.value
    assert error.limit_mb == 200
    assert error.peak_mb >= 200
    assert error.killed
    assert not alive(error.pid)
    assert future.state is TaskState.OVER_MEMORY
    assert supervisor.submit("echo", 1).result(timeout=30) == 1


def test_memory_limit_counts_what_the_step_started(supervisor, tmp_path):
    marker = tmp_path / "child"
    future = supervisor.submit_call(Call("child_allocates", (str(marker), 300), limits=Limits(max_memory_mb=200)))
    with pytest.raises(MemoryLimitExceeded) as over:
        future.result(timeout=60)
    assert over.value.peak_mb >= 200 and over.value.killed
    child = read_pid(marker)
    assert wait_until(lambda: not alive(child), timeout=5), "the child holding the memory outlived the kill"


# Loky only: a Ray worker has address space reserved but untouched (measured: RSS grew
# 250 MiB while the address space grew 208), so the cap lets RSS pass the limit and the
# watchdog kills first more often than not. The limit holds either way (README, Ray).
@pytest.mark.parametrize("backend", ["loky"])
def test_memory_hard_cap_refuses_the_allocation_and_keeps_the_worker(supervisor):
    future = supervisor.submit_call(Call("allocate", kwargs={"chunk_mb": 50, "total_mb": 2048, "pause_s": 0},
                                         limits=Limits(max_memory_mb=300, memory_hard_cap=True)))
    with pytest.raises(MemoryLimitExceeded) as over:
        future.result(timeout=60)
    assert not over.value.killed
    assert alive(over.value.pid), "the hard cap fails the allocation; the worker lives on"


def test_cancel_kills_a_running_busy_step_and_its_worker(supervisor, tmp_path):
    marker = tmp_path / "pid"
    future = supervisor.submit("busy_loop", str(marker))
    worker = read_pid(marker)
    assert future.running()
    assert future.cancel("user navigated away")
    with pytest.raises(StepCancelled) as cancelled:
        future.result(timeout=30)
    assert future.cancelled()
    assert cancelled.value.reason == "explicit"
    assert cancelled.value.detail == "user navigated away"
    assert cancelled.value.killed
    assert wait_until(lambda: not alive(worker), timeout=5)
    assert future.cancel(), "cancel() stays True once cancelled"


def test_cooperative_cancel_keeps_the_worker(supervisor, tmp_path):
    marker = tmp_path / "pid"
    future = supervisor.submit_call(Call("cooperative", (str(marker),), limits=Limits(cancel_grace_s=30)))
    worker = read_pid(marker)
    future.cancel()
    with pytest.raises(StepCancelled) as cancelled:
        future.result(timeout=30)
    assert not cancelled.value.killed
    assert alive(worker)


def test_cancel_of_a_queued_step_never_runs_it(make_supervisor, tmp_path):
    sup = make_supervisor(workers=1)
    blocker = sup.submit("hold_until", str(tmp_path / "started"), str(tmp_path / "go"))
    wait_for_path(str(tmp_path / "started"))
    queued = sup.submit("hold_until", str(tmp_path / "never"), str(tmp_path / "go"))
    assert queued.cancel()
    assert queued.cancelled() and queued.done()
    (tmp_path / "go").touch()
    blocker.result(timeout=30)
    assert sup.submit("echo", 1).result(timeout=30) == 1
    assert not (tmp_path / "never").exists()


def test_scope_cancel_stops_running_and_drops_queued(make_supervisor, tmp_path):
    sup = make_supervisor(workers=2)
    with pytest.raises(RuntimeError):
        with sup.scope() as scope:
            running = [scope.submit("busy_loop", str(tmp_path / f"running-{n}")) for n in range(2)]
            pids = [read_pid(tmp_path / f"running-{n}") for n in range(2)]
            queued = [scope.submit("hold_until", str(tmp_path / f"queued-{n}"), str(tmp_path / "go"))
                      for n in range(5)]
            assert scope.cancel("view switched") == 7
            late = scope.submit("echo", 1)
            raise RuntimeError("leave the block")
    for future in running + queued + [late]:
        with pytest.raises(StepCancelled) as cancelled:
            future.result(timeout=30)
        assert cancelled.value.reason == "scope"
    assert not any((tmp_path / f"queued-{n}").exists() for n in range(5))
    assert all(wait_until(lambda pid=pid: not alive(pid), timeout=5) for pid in pids)


@pytest.mark.parametrize("backend", ["loky"])  # stops local workers from outside
def test_a_worker_that_stops_reading_holds_up_no_other_task(make_supervisor):
    # A pool worker stopped (SIGSTOP, a debugger, a frozen cgroup) while an argument larger
    # than its socket's buffer is on its way: the manager thread used to block in that
    # write, and with it every timer, kill and dispatch of both lanes.
    sup = make_supervisor(workers=1, spares=0)
    assert sup.submit("echo", 1).result(timeout=30) == 1
    stopped = [worker["pid"] for worker in sup.describe_workers() if worker["lane"] == "pool"]
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        large = sup.submit_call(Call("echo", ("x" * (16 << 20),), limits=Limits(timeout_s=1)))
        assert sup.submit("critical_record", 1, "meanwhile").result(timeout=30)[0] == "meanwhile"
        with pytest.raises(StepTimeout):
            large.result(timeout=30)  # its timeout still fires: the kill ends the stopped worker
        assert all(wait_until(lambda pid=pid: not alive(pid), timeout=10) for pid in stopped)
        assert sup.submit("echo", 2).result(timeout=30) == 2, "a new worker serves the pool lane"
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


@pytest.mark.parametrize("step, exitcode, signal_number", [("die", 3, None), ("segfault", None, signal.SIGSEGV)])
def test_a_crash_fails_only_its_own_task(make_supervisor, backend, tmp_path, step, exitcode, signal_number):
    go = str(tmp_path / "go")
    sup = make_supervisor(workers=9)
    siblings = [sup.submit("hold_until", str(tmp_path / f"sibling-{n}"), go) for n in range(8)]
    for n in range(8):
        wait_for_path(str(tmp_path / f"sibling-{n}"))
    crashing = sup.submit(step)
    with pytest.raises(WorkerCrashed) as crashed:
        crashing.result(timeout=30)
    # Ray reports a dead worker without saying how it ended.
    expected = (exitcode, signal_number) if backend == "loky" else (None, None)
    assert (crashed.value.exitcode, crashed.value.signal) == expected
    assert crashed.value.pid is not None and not alive(crashed.value.pid)
    assert crashing.state is TaskState.CRASHED
    (tmp_path / "go").touch()
    assert all(future.result(timeout=30) > 0 for future in siblings), "no sibling paid for the crash"


def test_twenty_kills_then_full_parallel_capacity(make_supervisor, tmp_path):
    workers = 4
    sup = make_supervisor(workers=workers)
    for round_ in range(5):
        doomed = [
            sup.submit_call(with_limits("busy_loop", timeout_s=0.2)),
            sup.submit_call(Call("allocate", kwargs={"chunk_mb": 50, "total_mb": 2048},
                                 limits=Limits(max_memory_mb=150))),
            sup.submit("die", 5),
            sup.submit("busy_loop", str(tmp_path / f"cancel-{round_}")),
        ]
        read_pid(tmp_path / f"cancel-{round_}")
        doomed[3].cancel()
        concurrent.futures.wait(doomed, timeout=60)
        assert [type(f.exception()) if not f.cancelled() else StepCancelled for f in doomed] == [
            StepTimeout, MemoryLimitExceeded, WorkerCrashed, StepCancelled]
    meeting = tmp_path / "meeting"
    meeting.mkdir()
    names = sup.run_batch([("meet", {"directory": str(meeting), "name": f"w{n}", "expected": workers})
                           for n in range(workers)], timeout=60)
    assert names == [f"w{n}" for n in range(workers)], f"{workers} steps ran at once after 20 kills"
    assert sup.metrics()["worker_kills"]["pool"] == {"timeout": 5, "memory": 5, "crash": 5, "cancel": 5}


@pytest.mark.parametrize("backend", ["loky"])  # the critical lane is local on every backend
def test_critical_lane_recovers_in_order_after_a_timeout(supervisor):
    first = supervisor.submit("critical_record", 1, tag="first")
    killed = supervisor.submit_call(with_limits("critical_busy_loop", timeout_s=0.3))
    after = [supervisor.submit("critical_record", 1, tag=f"after-{n}") for n in range(3)]
    with pytest.raises(StepTimeout):
        killed.result(timeout=30)
    records = [first.result(timeout=30)] + [f.result(timeout=30) for f in after]
    assert [r[0] for r in records] == ["first", "after-0", "after-1", "after-2"]
    starts = [r[1] for r in records]
    assert starts == sorted(starts)
    assert records[0][3] != records[1][3], "a new worker took over the critical lane"


@pytest.mark.parametrize("backend", ["loky"])  # Ray keeps its own worker pool: no spares
def test_a_warm_spare_takes_over_after_a_kill(make_supervisor, tmp_path):
    sup = make_supervisor(workers=1, spares=1)
    warm = {w["pid"] for w in sup.describe_workers() if w["lane"] == "pool"}
    assert len(warm) == 2, "the pool worker and its spare are warm after start"
    marker = tmp_path / "pid"
    doomed = sup.submit_call(with_limits("busy_loop", str(marker), timeout_s=0.3))
    killed_pid = read_pid(marker)
    # Queued behind the doomed task (one worker runs at a time): the manager's turn that
    # sees the kill dispatches it, before a replacement for the killed worker can be up.
    following = sup.submit("pid")
    with pytest.raises(StepTimeout):
        doomed.result(timeout=30)
    survivor = following.result(timeout=30)
    assert survivor in warm - {killed_pid}, "the spare, warm before the kill, ran the next task"


@pytest.mark.parametrize("backend", ["loky"])  # recycling is the local lanes'
def test_workers_are_recycled_after_max_tasks(make_supervisor):
    sup = make_supervisor(workers=1, spares=0, max_tasks_per_worker=3)
    pids = [sup.submit("pid").result(timeout=30) for _ in range(6)]
    assert pids[0] == pids[1] == pids[2]
    assert pids[3] == pids[4] == pids[5] != pids[0]
    assert sup.metrics()["worker_recycles"]["pool"]["max_tasks"] >= 1


@pytest.mark.parametrize("backend", ["loky"])  # recycling is the local lanes'
def test_a_leaking_worker_is_recycled(make_supervisor):
    sup = make_supervisor(workers=1, spares=0, recycle_rss_mb=150)
    leaky = sup.submit("grow_idle_memory", 200).result(timeout=30)
    assert sup.submit("pid").result(timeout=30) != leaky
    assert wait_until(lambda: not alive(leaky), timeout=10)


def test_limits_are_validated_where_they_are_built():
    with pytest.raises(ValueError):
        Limits(timeout_s=0)
    with pytest.raises(TypeError):
        Limits(max_memory_mb="lots")
    with pytest.raises(ValueError):
        Limits(memory_hard_cap=True)
    with pytest.raises(TypeError):
        Call("echo", limits={"timeout_s": 1})


def test_a_keyed_scope_supersedes_the_previous_one(supervisor, tmp_path):
    first = supervisor.scope(key="view:workspace")
    old = [first.submit("busy_loop", str(tmp_path / f"old-{n}")) for n in range(2)]
    for n in range(2):
        read_pid(tmp_path / f"old-{n}")
    second = supervisor.scope(key="view:workspace")
    new = second.submit("echo", "fresh")
    assert new.result(timeout=30) == "fresh"
    for future in old:
        with pytest.raises(StepCancelled) as cancelled:
            future.result(timeout=30)
        assert cancelled.value.reason == "superseded"
    other = supervisor.scope(key="view:other")
    assert other.submit("echo", 1).result(timeout=30) == 1 and not second.cancelled


def test_a_keyed_scope_that_comes_late_by_its_order_is_the_one_superseded(supervisor):
    newer = supervisor.scope(key="view:ordered", order=2)
    late = supervisor.scope(key="view:ordered", order=1)
    with pytest.raises(StepCancelled) as cancelled:
        late.submit("echo", "stale").result(timeout=30)
    assert cancelled.value.reason == "superseded" and "came first" in cancelled.value.detail
    assert not newer.cancelled and newer.submit("echo", "fresh").result(timeout=30) == "fresh"
    unordered = supervisor.scope(key="view:ordered")  # without an order, arrival decides
    assert newer.cancelled and not unordered.cancelled


def test_a_scope_tells_its_cancel_once_before_its_running_steps_have_stopped(supervisor, tmp_path):
    scope = supervisor.scope(key="view:told")
    running = scope.submit("deaf_to_cancel", str(tmp_path / "running"))  # it cannot have ended when told
    pid = read_pid(tmp_path / "running")
    told = []
    scope.on_cancel(lambda request: told.append((request.reason, running.done())))
    supervisor.scope(key="view:told")  # supersedes it
    scope.cancel("again")
    scope.on_cancel(lambda request: told.append((request.reason, "late")))

    assert told == [("superseded", False), ("superseded", "late")]
    os.kill(pid, signal.SIGKILL)  # spare the test the grace
    with pytest.raises(StepCancelled):
        running.result(timeout=30)


def test_workers_view_names_the_running_step(supervisor, backend, tmp_path):
    future = supervisor.submit("hold_until", str(tmp_path / "started"), str(tmp_path / "go"))
    wait_for_path(str(tmp_path / "started"))
    described = supervisor.describe_workers()
    running = [w for w in described if w["step"] == "hold_until"]
    assert len(running) == 1 and running[0]["state"] == "busy"
    if backend == "loky":  # a Ray worker may be on another host: its RSS is not sampled here
        assert running[0]["rss_bytes"] > 0
    assert {w["lane"] for w in described} == {"critical", "pool"}
    (tmp_path / "go").touch()
    future.result(timeout=30)


def test_a_failing_dispatch_hook_fails_the_task_without_running_it(make_supervisor, tmp_path):
    def refuse(task):
        if task.step == "hold_until":
            raise OSError("disk full")

    sup = make_supervisor(workers=1, on_dispatch=refuse)
    future = sup.submit("hold_until", str(tmp_path / "ran"), str(tmp_path / "go"))
    with pytest.raises(WorkerStartFailed, match="disk full"):
        future.result(timeout=30)
    assert not (tmp_path / "ran").exists()
    assert sup.submit("echo", 2).result(timeout=30) == 2


# ----------------------------------------------------------------- the local fast path

@pytest.mark.parametrize("backend", ["loky"])  # the template is the local lanes'
def test_a_task_imports_nothing_its_template_had_not(make_supervisor):
    sup = make_supervisor(workers=1, spares=0)
    assert sup.submit("imported_since_fork").result(timeout=30) == [], "the first task found all preloaded"
    sup.submit("echo", 1).result(timeout=30)
    with pytest.raises(ValueError):
        sup.submit("boom").result(timeout=30)
    sup.submit_call(Call("echo", (2,), limits=Limits(max_memory_mb=500, memory_hard_cap=True))).result(timeout=30)
    assert sup.submit("imported_since_fork").result(timeout=30) == [], "a result, an error, a hard cap"
    sup.submit("import_lazily").result(timeout=30)
    assert "colorsys" in sup.submit("imported_since_fork").result(timeout=30), "the check can see one"


def test_a_step_module_that_will_not_import_fails_the_start(tmp_path, monkeypatch, caplog):
    module = tmp_path / "vanishing_steps.py"
    module.write_text("def hello():\n    return 'hi'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import vanishing_steps

    registry = StepRegistry()
    registry.register(vanishing_steps.hello, critical=False)
    module.write_text("raise ImportError('this module breaks in a fresh interpreter')\n")
    shutil.rmtree(tmp_path / "__pycache__", ignore_errors=True)
    with pytest.raises(WorkerStartFailed, match="this module breaks in a fresh interpreter"):
        Supervisor(registry, workers=1).start()
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR], "released cleanly"
    monkeypatch.delitem(sys.modules, "vanishing_steps")


@pytest.mark.parametrize("backend", ["loky"])  # a Ray worker is Ray's process
def test_a_step_that_forks_and_returns_in_the_child_leaves_one_worker(make_supervisor):
    sup = make_supervisor(workers=1, spares=0)
    worker = sup.submit("pid").result(timeout=30)
    assert sup.submit("fork_and_return").result(timeout=30) == worker
    assert {sup.submit("pid").result(timeout=30) for _ in range(20)} == {worker}, "no second worker took tasks"


@pytest.mark.parametrize("backend", ["loky"])  # pidfds are the local lanes'
def test_a_dead_worker_whose_socket_lives_on_in_a_child_is_seen_dead(make_supervisor, tmp_path):
    sup = make_supervisor(workers=1)
    marker = tmp_path / "holder"
    future = sup.submit("die_leaving_a_socket_holder", str(marker))
    with pytest.raises(WorkerCrashed) as crashed:
        future.result(timeout=30)
    assert crashed.value.exitcode == 3
    assert wait_until(lambda: not alive(read_pid(marker)), timeout=5), "the dead worker's group was killed"
    assert sup.submit("echo", 1).result(timeout=30) == 1


@pytest.mark.parametrize("backend", ["loky"])  # seats are the local lanes'
def test_tasks_sent_to_an_idle_worker_killed_from_outside_run_elsewhere(make_supervisor):
    sup = make_supervisor(workers=1, spares=0)
    for n in range(10):
        victim = sup.submit("pid").result(timeout=30)
        os.kill(victim, signal.SIGKILL)  # the OOM killer, an operator: nobody told the supervisor
        assert sup.run_batch([("echo", {"value": n})] * 3, timeout=30) == [n] * 3, "no innocent task failed"


def test_a_timeout_of_25_days_is_a_timeout_like_any_other(make_supervisor):
    offset = [0.0]
    sup = make_supervisor(workers=1, clock=lambda: time.monotonic() + offset[0])
    offset[0] = WORKER_START_TIMEOUT_S + 1  # past the deadlines set at start: the 25 days come next
    long = Limits(timeout_s=25 * 86400)
    assert sup.submit_call(Call("timed_sleep", (50,), limits=long)).result(timeout=30)[0] == ""
    assert sup.submit("echo", 1).result(timeout=30) == 1, "the manager thread lives on"


@pytest.mark.parametrize("backend", ["loky"])  # outside kills of local workers
def test_chaos_fails_no_innocent_task_and_hangs_none(make_supervisor, tmp_path):
    """Random outside kills, cancels, timeouts and crashes among a few hundred tasks: every
    task ends, and each failure is its own (its limit, its crash, its cancel) or an outside
    kill of the very worker that ran it."""
    sup = make_supervisor(workers=4, spares=1)
    rng = random.Random(12)
    killed = set()
    submitted = []
    for n in range(300):
        roll = rng.random()
        if roll < 0.04:
            submitted.append(("timeout", sup.submit_call(with_limits("busy_loop", timeout_s=0.05))))
        elif roll < 0.08:
            submitted.append(("crash", sup.submit("die", 3)))
        elif roll < 0.14:
            future = sup.submit("timed_sleep", 20)
            future.cancel()
            submitted.append(("cancel", future))
        else:
            submitted.append(("ok", sup.submit("echo", n)))
        started = [w["pid"] for w in sup.describe_workers() if w["pid"] is not None]
        if rng.random() < 0.05 and started:  # (every worker may be a replacement still starting)
            victim = rng.choice(started)
            killed.add(victim)
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass  # it died meanwhile (a task's own crash or kill)
    futures = [future for _, future in submitted]
    _, hanging = concurrent.futures.wait(futures, timeout=60)
    assert not hanging, f"{len(hanging)} tasks never ended"
    expected = {"ok": type(None), "timeout": StepTimeout, "crash": WorkerCrashed, "cancel": StepCancelled}
    innocent = []
    for kind, future in submitted:
        error = _error_of(future)
        if isinstance(error, expected[kind]) or (isinstance(error, WorkerCrashed) and error.pid in killed):
            continue
        innocent.append((kind, future.step, error))
    assert not innocent, f"{len(innocent)} innocent failures: {innocent[:5]}"
    meeting = tmp_path / "meeting"
    meeting.mkdir()
    names = sup.run_batch([("meet", {"directory": str(meeting), "name": f"w{n}", "expected": 4})
                           for n in range(4)], timeout=60)
    assert names == [f"w{n}" for n in range(4)], "full capacity after the chaos"


def _error_of(future):
    try:
        future.result(timeout=0)
    except BaseException as error:  # noqa: B902 - the error is the datum
        return error
    return None
