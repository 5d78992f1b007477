"""Scenario ``sandbox``: what the pool lane's sandbox (Landlock and seccomp) costs (issues 17, 27).

Sandbox on (``"auto"``: what this kernel offers) against off, in the same run, each pair
of supervisors up for the whole scenario and measured in alternating rounds (the order
rotates), so a noisy spell on the shared machine hits both alike:

* round trip: one no-op on the pool lane, submitted and waited for, repeated; Landlock
  costs a sandboxed worker nothing per task (its rules are checked only on the calls they
  handle, and a no-op makes none of them), the seccomp filter runs on every system call
  the worker makes (a few dozen BPF instructions each);
* worker start: the same round trip on ``Supervisor(workers=1, spares=0,
  max_tasks_per_worker=1)``, where every task waits for a fresh worker (forked from the
  template, sandboxed, connected): the round trip *through a new worker*;
* ``apply()`` alone: ``sandbox.apply(policy)`` timed inside a fresh child (the part of
  a worker's start the sandbox adds).

Costs are ``100 * (p50 on / p50 off - 1)``; the issue's target is at most 5 %.
"""

from __future__ import annotations

import multiprocessing.connection
import time
from typing import Dict, List

from governor import Supervisor
from governor.workers import sandbox
from governor.bench import bench_steps
from governor.bench.core import ScenarioContext, ScenarioResult, scenario
from governor.bench.peers import worker_context
from governor.bench.scenarios.overhead import _roundtrips  # a Supervisor submits as a peer does
from governor.bench.stats import Summary

#: The issue's bound on the sandbox's cost, round trip and worker start, in percent.
COST_TARGET_PCT = 5.0

#: Samples of the worker-start round trip per mode, per ``Size.limit_reps`` (each costs a
#: fork and a worker's start, ~10-30 ms of a core).
STARTS_PER_LIMIT_REP = 3

MODES = ("auto", "off")


def _apply_seconds(policy: sandbox.SandboxPolicy) -> float:
    """``sandbox.apply(policy)`` timed in a fresh child (it is for life: never here).

    The child comes from the peers' forkserver, not a fork of this process, which runs
    threads (a child forked from it could inherit a lock one of them held).
    """
    context = worker_context()
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_time_apply, args=(policy, sender), name="governor-bench-apply")
    child.start()
    sender.close()
    try:
        elapsed = receiver.recv()
    except EOFError:
        elapsed = None
    finally:
        receiver.close()
        child.join()
    if child.exitcode != 0 or elapsed is None:
        raise RuntimeError(f"sandbox.apply failed in its child (exit code {child.exitcode})")
    return elapsed


def _time_apply(policy: sandbox.SandboxPolicy, sender: multiprocessing.connection.Connection) -> None:
    """In the child: what the template does before it forks a worker, then ``apply`` timed."""
    sandbox.prepare(policy)
    start = time.perf_counter()
    sandbox.apply(policy)
    sender.send(time.perf_counter() - start)


def _cost_pct(on: Summary, off: Summary) -> float:
    return 100 * (on.p50 / off.p50 - 1)


@scenario("sandbox")
def run(ctx: ScenarioContext) -> ScenarioResult:
    """The pool sandbox's cost: round trip and worker start, sandbox on vs off."""
    size, result = ctx.size, ScenarioResult()
    workers = size.peer_workers
    starts = STARTS_PER_LIMIT_REP * size.limit_reps
    per_round = max(1, size.roundtrips // size.roundtrip_rounds)
    roundtrip: Dict[str, List[float]] = {mode: [] for mode in MODES}
    fresh: Dict[str, List[float]] = {mode: [] for mode in MODES}
    ctx.progress("starting 4 supervisors (sandbox on/off x warm pool/fresh worker per task)")
    warm = {mode: Supervisor(bench_steps.registry, workers=workers, sandbox=mode).start() for mode in MODES}
    recycling = {mode: Supervisor(bench_steps.registry, workers=1, spares=0, max_tasks_per_worker=1,
                                  sandbox=mode).start() for mode in MODES}
    try:
        label = warm["auto"].metrics()["sandbox"]["pool"]
        for mode in MODES:
            _roundtrips(warm[mode], size.warmup * 10)
            _roundtrips(recycling[mode], size.warmup)
        ctx.progress(f"round trips: {size.roundtrip_rounds} rounds of {per_round} per mode; "
                     f"worker starts: {starts} per mode")
        for index in range(size.roundtrip_rounds):
            order = MODES if index % 2 == 0 else MODES[::-1]
            for mode in order:
                roundtrip[mode] += _roundtrips(warm[mode], per_round)
            for mode in order:
                fresh[mode] += _roundtrips(recycling[mode], max(1, starts // size.roundtrip_rounds))
        policy = warm["auto"].sandbox_policy
    finally:
        for supervisor in (*warm.values(), *recycling.values()):
            supervisor.shutdown(wait=True)
    applies = [_apply_seconds(policy) for _ in range(starts)]

    result.put("label", label, "sandbox of the pool workers (on)")
    if label == "none":
        result.note("this kernel offers no Landlock: 'on' applied nothing, so the costs below are noise")
    summaries = {}
    for name, samples, text in (("roundtrip", roundtrip, "round trip"),
                                ("worker_start", fresh, "round trip through a fresh worker")):
        for mode in MODES:
            summaries[(name, mode)] = result.put(f"{name}.{mode}", Summary.of_seconds(samples[mode]),
                                                 f"{text}, sandbox {'on' if mode == 'auto' else 'off'}")
        cost = result.put(f"{name}.cost_pct", _cost_pct(summaries[(name, "auto")], summaries[(name, "off")]),
                          f"{text}: p50 on / off - 1", "%")
        result.target(f"sandbox cost: {text} (p50)", cost, COST_TARGET_PCT, "%")
    apply_summary = result.put("apply", Summary.of_seconds(applies), "sandbox.apply() in a fresh child")
    # The direct estimate: what apply() adds to a worker's start, next to that start (the
    # on/off difference of two noisy ~20 ms round trips cannot resolve a few ms).
    result.put("apply.share_of_fresh_pct", 100 * apply_summary.p50 / summaries[("worker_start", "off")].p50,
               "apply() p50 / fresh-worker round trip p50 (off)", "%")
    return result
