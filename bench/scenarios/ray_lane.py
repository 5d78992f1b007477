"""Scenario ``ray``: the pool lane on a local Ray node, next to the loky lane, in one run.

It runs only when asked for (``--backend ray`` or ``--scenario ray``): it needs the ``ray``
extra (``pip install -e '.[ray]'``), and without it the scenario fails with Governor's
``BackendUnavailable``, which names the extra.

One Ray node serves the whole scenario: the Ray this process already initialised (used
as it is and left running), else a private local node started here (127.0.0.1, no
dashboard) and shut down at the end. Two Supervisors that differ only in ``backend``
(the peers ``governor`` and ``governor-ray`` of :mod:`bench.peers`) are measured the same
way, in rounds that rotate the two, so a noisy spell hits both alike:

* no-op round trip and throughput with ``peer_workers`` workers, as the ``overhead``
  scenario measures them (:func:`bench.scenarios.overhead.measure_noops`);
* kill latency on a one-worker Supervisor of each backend, as the ``governor`` scenario
  measures it: a busy step with a timeout (its future resolved after the deadline
  ``dispatched_at + timeout_s``, the kill fired after the deadline, the queued next task
  started after the kill) and ``cancel()`` of a running busy step (until its future
  resolved, and until it resolved and the worker process is dead).
* memory overshoot of the ``governor`` scenario's allocating step under the same limit, on
  the same one-worker Supervisors.

Ratios are Ray / loky: above 1, the Ray lane is slower (latency) or faster (throughput).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Dict, Iterator, List

from governor.engine.ray_lane import import_ray

from governor.bench.core import ScenarioContext, ScenarioResult, scenario
from governor.bench.peers import GovernorPeer, GovernorRayPeer
from governor.bench.probes import live_workers, wait_restaffed
from governor.bench.scenarios.governor_limits import (KILL_WARMUP, MEMORY_LIMIT_MB, TIMEOUT_S, cancel_sample,
                                             overshoot_sample, timeout_sample)
from governor.bench.scenarios.overhead import measure_noops, put_ratios, rotated, start_peers
from governor.bench.stats import Summary, to_ms

#: The loky lane first, so it is warm before Ray's workers compete for the cores.
LANES = [GovernorPeer, GovernorRayPeer]

#: The Ray lane, whose figures are divided by the loky lane's.
OURS, THEIRS = GovernorRayPeer.name, GovernorPeer.name

#: Pool workers of the Supervisors that kill: one, so the next task must wait for the kill.
KILL_WORKERS = 1

#: What :func:`timeout_sample` and then :func:`cancel_sample` return, in order, named as
#: the ``governor`` scenario names the same figures.
KILL_FIGURES = ("timeout_precision", "timeout_kill_late", "next_task_after_kill", "cancel_busy_resolved",
                "cancel_busy")

#: The kill figures compared, by Ray / loky ratios and in the picture; the other three
#: time the timer, the worker's death and the next worker's start rather than the kill.
KILL_COMPARED = ("timeout_precision", "cancel_busy_resolved")


@contextlib.contextmanager
def _ray_node(cpus: int, ctx: ScenarioContext, result: ScenarioResult) -> Iterator[None]:
    """Use the Ray this process initialised, else start a private local node until the end.

    Args:
        cpus: logical CPUs the scenario's Ray tasks need at once; a node started here gets
            exactly these (Ray prestarts a worker per CPU, and more would only crowd the cores).

    Raises:
        governor.BackendUnavailable: Ray is not installed.
    """
    ray = import_ray()
    started_here = not ray.is_initialized()
    # Ray's driver prints a line to stdout for every worker that dies (every kill measured
    # here), whatever log_to_driver says; stdout is the table's, so they go to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        if started_here:
            ctx.progress(f"starting a local Ray node ({cpus} logical CPUs)")
            ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
        else:
            ctx.progress("using the Ray node this process already initialised")
        try:
            node_cpus = ray.cluster_resources().get("CPU", 0)
            result.put("node.started_by_scenario", started_here, "Ray node started by this scenario")
            result.put("node.cpus", node_cpus, "Ray node's logical CPUs")
            if node_cpus < cpus:
                result.note(f"The Ray node has {node_cpus:g} logical CPUs for the {cpus} tasks this scenario runs "
                            "at once: the rest wait in Ray's queue, and the Ray lane's figures include that wait.")
            yield
        finally:
            if started_here:
                ctx.progress("shutting the Ray node down")
                ray.shutdown()


def _kill_samples(lanes: List[GovernorPeer], ctx: ScenarioContext) -> Dict[str, Dict[str, List[float]]]:
    """Time out, then cancel, a busy step on each lane, rotating the lanes each round.

    Returns:
        lane name -> figure of :data:`KILL_FIGURES` -> samples in seconds (warm-ups dropped).
    """
    # Whatever a lane counts as warm right after its start (a loky lane counts its spare,
    # a Ray lane its capacity) is its full strength to wait for before each sample.
    full_strength = {peer.name: live_workers(peer.supervisor) for peer in lanes}
    samples = {peer.name: {figure: [] for figure in KILL_FIGURES} for peer in lanes}
    for index in range(KILL_WARMUP + ctx.size.limit_reps):
        for peer in rotated(lanes, index):
            wait_restaffed(peer.supervisor, full_strength[peer.name])
            timed_out = timeout_sample(peer.supervisor)
            wait_restaffed(peer.supervisor, full_strength[peer.name])
            cancelled = cancel_sample(peer.supervisor, "busy", ctx.scratch / f"{peer.name}-{index}", True)
            if index >= KILL_WARMUP:
                for figure, value in zip(KILL_FIGURES, timed_out + cancelled):
                    samples[peer.name][figure].append(value)
    return samples


def _overshoot_samples(lanes: List[GovernorPeer], ctx: ScenarioContext) -> Dict[str, List[float]]:
    """The memory overshoot (MiB past the limit) of the ``governor`` scenario's allocating
    step on each lane, rotating the lanes each round."""
    samples: Dict[str, List[float]] = {peer.name: [] for peer in lanes}
    full_strength = {peer.name: live_workers(peer.supervisor) for peer in lanes}
    for index in range(ctx.size.memory_reps):
        for peer in rotated(lanes, index):
            wait_restaffed(peer.supervisor, full_strength[peer.name])
            samples[peer.name].append(overshoot_sample(peer.supervisor))
    return samples


def _put_kill_figures(samples: Dict[str, Dict[str, List[float]]], result: ScenarioResult) -> None:
    for name, figures in samples.items():
        for figure, values in figures.items():
            label = f"{name}: {figure.replace('_', ' ')}"
            result.put(f"peers.{name}.{figure}", Summary.of_seconds(values), label)
            if figure in KILL_COMPARED:
                result.distribution("Kill latency: Ray lane vs loky lane", label, to_ms(values))
    for figure in KILL_COMPARED:
        put_ratios(result, figure, {name: Summary.of_seconds(figures[figure]) for name, figures in samples.items()},
                   OURS, THEIRS)


@scenario("ray", backend="ray")
def ray_lane(ctx: ScenarioContext) -> ScenarioResult:
    """The pool lane on a local Ray node vs on loky: no-op round trip, throughput, kill latency, memory overshoot."""
    size, result = ctx.size, ScenarioResult()
    with contextlib.ExitStack() as stack:
        # Entered first, so closed last: the Ray lane's Supervisors stop before their node.
        stack.enter_context(_ray_node(size.peer_workers + KILL_WORKERS, ctx, result))
        peers = start_peers(stack, LANES, size.peer_workers, ctx, result)
        measure_noops(peers, OURS, "No-op round trip: Ray lane vs loky lane", ctx, result)
        killers = start_peers(stack, LANES, KILL_WORKERS, ctx, result)
        ctx.progress(f"timeouts and cancels of a busy step: {KILL_WARMUP} warm-up, {size.limit_reps} samples per lane")
        samples = _kill_samples(killers, ctx)
        ctx.progress(f"memory overshoot under {MEMORY_LIMIT_MB} MiB: {size.memory_reps} samples per lane")
        overshoot = _overshoot_samples(killers, ctx)
        ctx.progress("shutting the Supervisors down")
    result.put("kill.workers", KILL_WORKERS, "pool workers of the killing Supervisors")
    result.put("kill.timeout_s", TIMEOUT_S, "timeout of the busy step", "s")
    _put_kill_figures(samples, result)
    for name, values in overshoot.items():
        result.put(f"peers.{name}.memory_overshoot", Summary.of(values, "MiB"),
                   f"{name}: memory overshoot past {MEMORY_LIMIT_MB} MiB")
    result.note("Round trips and throughput are measured as in the overhead scenario, kills as in the governor "
                "scenario (a one-worker Supervisor per lane, the loky one with its warm spare); every round "
                "rotates the two lanes. Ratios are Ray / loky.")
    result.note("On the Ray lane the timeout counts from the moment the step reports running from its Ray "
                "worker (task.dispatched_at is reset then), and a killed task's future resolves once the "
                "worker's link to the supervisor closes (the worker killed its own tree and itself). Its next "
                "task then runs on an idle Ray worker or one Ray starts. The memory overshoot is the governor "
                "scenario's allocating step (about 500 MiB/s) under the same limit on both lanes; on Ray the "
                "limit counts the Ray worker's own RSS (about 80 MiB) too.")
    return result
