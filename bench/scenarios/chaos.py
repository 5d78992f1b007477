"""Scenario ``chaos``: thousands of tasks under random outside kills, cancels, timeouts,
crashes and double forks. What it reports is what must stay at zero (issue 16):

* innocent failures: plain steps (``ok``, and ``ok`` that leaves children running) that did
  not return their value, except those whose (idle) worker the scenario itself killed from
  outside, counted apart as collateral;
* unexpected outcomes: a designated task that did not end as planned (a crash not reported
  as ``WorkerCrashed``, a timeout not as ``StepTimeout``, a cancel not cancelled);
* hangs: tasks still unresolved after :data:`HANG_PATIENCE_S` without any task ending;
* orphans: processes a step started that are alive :data:`ORPHAN_GRACE_S` after their task
  ended (each step's children carry the run's token and the task's index in their
  environment, so a scan of the system finds them wherever they were reparented; each one
  found is counted and killed), and any still alive after shutdown;
* the supervisor's own growth over the run: RSS, open fds and threads, from after a warm-up
  to the end (the supervisor runs in this process).

It runs only when named (``python -m governor.bench --scenario chaos``): a stress run of
minutes at the full size, not a measurement. Only the ``Supervisor``'s public API and psutil are used, so the scenario runs unchanged
on any engine behind that API. The plan is random with a fixed seed (the same plan each
run for a size), and has every kind of task at least :data:`MIN_EACH` times.
"""

from __future__ import annotations

import collections
import random
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

import attrs
import psutil

from governor import Call, Limits, StepTimeout, Supervisor, WorkerCrashed

from governor.bench import chaos_steps
from governor.bench.core import ScenarioContext, ScenarioResult, scenario

#: Tasks per run size (``quick`` must stay well under a minute on 2 cores: every crash,
#: kill and timeout costs a worker respawn).
TASKS = {"full": 5000, "quick": 400, "tiny": 40}

#: Pool workers, and how many tasks the scenario keeps in flight (so some queue behind).
WORKERS = 4
IN_FLIGHT = 3 * WORKERS

#: Each kind of task (or outside action) and its share of the plan. ``ok`` and ``leaves``
#: are the innocents; ``kill-idle`` is no task but a SIGKILL sent to an idle worker.
WEIGHTS = {"ok": 60, "leaves": 4, "crash": 6, "victim": 5, "timeout": 8, "cancel": 7,
           "cancel-queued": 5, "kill-idle": 5}

#: Every kind appears at least this often, whatever the size (the tiny run's coverage).
MIN_EACH = 2

#: The share of crashing, killed, timed-out and cancelled tasks that first start children
#: (``leaves`` always does): three each, one of them a double-forked daemon.
CHILDREN_SHARE = 0.3

#: Timeouts are drawn from this range (s): shorter than any hang, long enough to start children.
TIMEOUT_RANGE_S = (0.05, 0.3)

#: The random plan's seed: the same plan every run of a size, so runs compare.
SEED = 16

#: How long after its task ended a step's process may still live before it counts as an
#: orphan. The engine kills a tree before it resolves the task's future, so this only
#: covers the scan's own delay; generous, as the machine is shared.
ORPHAN_GRACE_S = 1.0

#: How often the system is scanned for tagged processes (a scan costs a few ms).
SWEEP_INTERVAL_S = 0.5

#: With tasks unresolved and none ending for this long, the rest count as hangs.
HANG_PATIENCE_S = 60.0

#: How often the driver looks at its tasks' markers and futures.
POLL_S = 0.002

#: Innocent failures shown in the JSON (the count is complete).
EXAMPLES = 10


@attrs.define(eq=False)
class Probe:
    """One planned task and what became of it."""

    index: int
    kind: str
    call: Optional[Call] = None
    future: Any = None
    marker: Optional[Path] = None
    cancelled_at_submit: Optional[bool] = None
    ended_at: Optional[float] = None
    acted: bool = False

    @property
    def innocent(self) -> bool:
        """Whether nothing was planned against this task: it must return its value."""
        return self.kind in ("ok", "leaves") or (self.kind == "cancel-queued" and self.cancelled_at_submit is False)


def make_plan(count: int, rng: random.Random) -> List[str]:
    """``count`` kinds: each at least :data:`MIN_EACH` times, the rest drawn by :data:`WEIGHTS`."""
    kinds = [kind for kind in WEIGHTS for _ in range(MIN_EACH)]
    kinds += rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()), k=max(0, count - len(kinds)))
    rng.shuffle(kinds)
    return kinds


def make_call(probe: Probe, rng: random.Random, token: str, scratch: Path) -> Call:
    """The call for ``probe``'s kind (its marker set where the driver must act on it)."""
    tag = f"{token}:{probe.index}"
    children = tag if rng.random() < CHILDREN_SHARE else ""
    if probe.kind == "ok":
        return Call("ok", (probe.index,), {"ms": rng.choice((0, 0, 1, 5))})
    if probe.kind == "leaves":
        return Call("ok", (probe.index,), {"tag": tag})
    if probe.kind == "cancel-queued":
        return Call("ok", (probe.index,), {"ms": 5})
    if probe.kind == "crash":
        return Call("crash", (rng.choice(("exit", "segv")),), {"tag": children})
    if probe.kind == "timeout":
        return Call("hang", ("",), {"tag": children}, limits=Limits(timeout_s=rng.uniform(*TIMEOUT_RANGE_S)))
    probe.marker = scratch / f"task-{probe.index}"
    return Call("hang", (str(probe.marker),), {"cooperative": probe.kind == "cancel" and rng.random() < 0.5,
                                               "tag": children})


class Driver:
    """Runs the plan on one supervisor and keeps the books."""

    def __init__(self, supervisor: Supervisor, kinds: List[str], token: str, scratch: Path, rng: random.Random):
        self.supervisor = supervisor
        self.token = token
        self.scratch = scratch
        self.rng = rng
        self.pending = collections.deque(Probe(index, kind) for index, kind in enumerate(kinds))
        self.probes: Dict[int, Probe] = {}
        self.live: Dict[int, Probe] = {}
        self.idle_kills: set = set()
        self.orphans: List[Dict[str, Any]] = []
        self.hangs: List[Probe] = []
        self._last_sweep = 0.0

    def run(self) -> None:
        """Submit, act, collect, sweep, until every task ended or the run hangs."""
        last_progress = time.monotonic()
        while self.pending or self.live:
            while self.pending and len(self.live) < IN_FLIGHT:
                self._start(self.pending.popleft())
            for probe in list(self.live.values()):
                if probe.marker is not None and not probe.acted and probe.marker.exists():
                    self._act(probe)
                if probe.future.done():
                    del self.live[probe.index]
                    last_progress = time.monotonic()
            now = time.monotonic()
            if now - self._last_sweep >= SWEEP_INTERVAL_S:
                self.sweep()
            if self.live and now - last_progress > HANG_PATIENCE_S:
                self.hangs = list(self.live.values())
                for probe in self.hangs:
                    probe.future.cancel("chaos: hung")
                break
            time.sleep(POLL_S)

    def _start(self, probe: Probe) -> None:
        if probe.kind == "kill-idle":
            self._kill_an_idle_worker()
            return
        probe.call = make_call(probe, self.rng, self.token, self.scratch)
        probe.future = self.supervisor.submit_call(probe.call)
        # Recorded from a done-callback: when the task ended, not when the loop noticed.
        probe.future.add_done_callback(lambda _, probe=probe: setattr(probe, "ended_at", time.monotonic()))
        if probe.kind == "cancel-queued":
            probe.cancelled_at_submit = probe.future.cancel("chaos: cancelled at submit")
        self.probes[probe.index] = probe
        self.live[probe.index] = probe

    def _act(self, probe: Probe) -> None:
        probe.acted = True
        if probe.kind == "victim":
            pid = int(probe.marker.read_text())
            try:
                psutil.Process(pid).send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        else:
            probe.future.cancel("chaos")

    def _kill_an_idle_worker(self) -> None:
        idle = [worker["pid"] for worker in self.supervisor.describe_workers()
                if worker.get("state") == "idle" and worker.get("pid")]
        if not idle:
            return
        pid = self.rng.choice(idle)
        try:
            psutil.Process(pid).send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            return
        self.idle_kills.add(pid)

    def sweep(self, final: bool = False) -> None:
        """Find the tagged processes of this run; count and kill those whose task ended
        over :data:`ORPHAN_GRACE_S` ago (``final``: every one left)."""
        self._last_sweep = now = time.monotonic()
        for process, index in tagged_processes(self.token):
            probe = self.probes.get(index)
            ended = probe is not None and probe.ended_at is not None
            if not final and not (ended and now - probe.ended_at > ORPHAN_GRACE_S):
                continue
            self.orphans.append({"task": index, "kind": probe.kind if probe else "?", "pid": process.pid,
                                 "after_shutdown": final})
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass

    def outcome(self, probe: Probe) -> Optional[str]:
        """``None`` if ``probe`` ended as planned, else what happened instead."""
        future = probe.future
        ended = "cancelled" if future.cancelled() else repr(future.exception())
        if probe.innocent:
            return None if ended == "None" and future.result() == probe.index else ended
        if probe.kind in ("cancel", "cancel-queued"):
            return None if future.cancelled() else f"expected cancelled, got {ended}"
        expected = StepTimeout if probe.kind == "timeout" else WorkerCrashed  # crash, victim
        if not future.cancelled() and isinstance(future.exception(), expected):
            return None
        return f"expected {expected.__name__}, got {ended}"


def tagged_processes(token: str):
    """``(process, task index)`` for every live process tagged with this run's ``token``."""
    found = []
    for process in psutil.process_iter(["name"]):
        if process.info["name"] not in ("sleep", "sh", "setsid"):
            continue
        try:
            tag = process.environ().get(chaos_steps.TAG, "")
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        run, _, index = tag.partition(":")
        if run == token:
            found.append((process, int(index)))
    return found


def supervisor_figures() -> Dict[str, float]:
    """This process's (the supervisor's) RSS in MiB, open fds and threads."""
    me = psutil.Process()
    return {"rss_mb": me.memory_info().rss / 2 ** 20, "fds": me.num_fds(), "threads": threading.active_count()}


@scenario("chaos", named_only=True)
def chaos(ctx: ScenarioContext) -> ScenarioResult:
    """Random outside kills, cancels, timeouts, crashes and double forks: innocents, hangs, orphans, growth."""
    result = ScenarioResult()
    rng = random.Random(SEED)
    kinds = make_plan(TASKS[ctx.size_name], rng)
    token = uuid.uuid4().hex
    ctx.progress(f"{len(kinds)} planned tasks and actions on a Supervisor(workers={WORKERS})")
    started = time.perf_counter()
    driver: Optional[Driver] = None
    try:
        with Supervisor(chaos_steps.registry, workers=WORKERS) as supervisor:
            for index in range(4 * WORKERS):  # warm every path once before the baseline
                supervisor.submit("ok", index).result(timeout=HANG_PATIENCE_S)
            before = supervisor_figures()
            driver = Driver(supervisor, kinds, token, ctx.scratch, rng)
            try:
                driver.run()
                ctx.progress("all tasks ended; last sweep for orphans")
                time.sleep(ORPHAN_GRACE_S)
                driver.sweep()
                after = supervisor_figures()
                result.put("supervisor_metrics", supervisor.metrics())
            finally:
                supervisor.shutdown(wait=True, cancel_futures=True, cancel_running=True)
        elapsed = time.perf_counter() - started
    finally:
        if driver is not None:
            driver.sweep(final=True)  # whatever outlived the supervisor; and the cleanup, come what may

    probes = list(driver.probes.values())
    innocent, collateral, unexpected = [], 0, []
    for probe in probes:
        if probe in driver.hangs:
            continue
        problem = driver.outcome(probe)
        if problem is None:
            continue
        error = None if probe.future.cancelled() else probe.future.exception()
        if isinstance(error, WorkerCrashed) and error.pid in driver.idle_kills:
            collateral += 1
        elif probe.innocent:
            innocent.append({"task": probe.index, "kind": probe.kind, "error": problem})
        else:
            unexpected.append({"task": probe.index, "kind": probe.kind, "error": problem})
    orphans_after_task = [orphan for orphan in driver.orphans if not orphan["after_shutdown"]]
    orphans_after_shutdown = [orphan for orphan in driver.orphans if orphan["after_shutdown"]]

    result.put("tasks", len(probes), "tasks run")
    result.put("by_kind", dict(collections.Counter(kinds)))
    result.put("outside_kills", len(driver.idle_kills) + sum(1 for p in probes if p.kind == "victim" and p.acted),
               "workers killed from outside (idle and busy)")
    result.put("innocent_failures", len(innocent), "innocent failures")
    result.put("innocent_examples", innocent[:EXAMPLES])
    result.put("collateral", collateral, "tasks lost with an idle worker killed from outside")
    result.put("unexpected", len(unexpected), "designated tasks that ended otherwise than planned")
    result.put("unexpected_examples", unexpected[:EXAMPLES])
    result.put("hangs", len(driver.hangs), "hangs")
    result.put("orphans.after_task", len(orphans_after_task), "processes alive after their task ended")
    result.put("orphans.after_task_by_kind", dict(collections.Counter(o["kind"] for o in orphans_after_task)))
    result.put("orphans.after_shutdown", len(orphans_after_shutdown), "processes alive after shutdown")
    for figure, unit, label in (("rss_mb", "MiB", "supervisor RSS"), ("fds", "", "supervisor open fds"),
                                ("threads", "", "supervisor threads")):
        result.put(f"supervisor.{figure}.before", before[figure])
        result.put(f"supervisor.{figure}.after", after[figure])
        result.put(f"supervisor.{figure}.growth", after[figure] - before[figure], f"{label} growth", unit)
    result.put("elapsed_s", elapsed, "wall clock", "s")
    result.put("tasks_per_s", len(probes) / elapsed, "tasks per second")
    result.note(f"Plan: seed {SEED}, shares {WEIGHTS} (kill-idle is a SIGKILL sent to an idle worker, "
                f"not a task), each at least {MIN_EACH} times; {CHILDREN_SHARE:.0%} of crashing, killed, "
                "timed-out and cancelled tasks first start three children: one in the worker's group, one in "
                "a new session, one double-forked daemon; 'leaves' tasks start them and return.")
    result.note(f"An orphan is a tagged process alive {ORPHAN_GRACE_S:g} s after its task ended (found by "
                "a scan of every process's environment, wherever it was reparented); each is killed when found.")
    result.note("Supervisor growth is measured in this process (the supervisor runs in it) from after a "
                f"warm-up of {4 * WORKERS} tasks to the end, before shutdown.")
    return result
