"""Scenario ``overhead``: what a task costs beyond its work, Governor next to its peers.

Two measurements of the no-op step, on every peer of :mod:`bench.peers` in the same run:

* round trip: submit one no-op, wait for its result, repeat (a closed loop of one), timed
  with ``perf_counter`` around each ``submit(...).result()``;
* throughput: submit ``throughput_tasks`` no-ops at once, wait for all, tasks / wall time;
  and what each no-op cost in CPU during those runs: in this process (the pool's own
  threads and the submitting one) and in the workers' main threads, and how often a
  worker went to sleep per task (each time, something had to wake it). Where the time of
  a pool goes, next to its peers.

Every peer is started and warmed (each worker ran a step) before anything is measured,
and all of them stay up for the whole scenario; the measurements are taken in rounds that
rotate the peers' order, so a noisy spell on the shared machine is spread over all of them.
Ratios are ours / theirs: below 1 is better for latency, above 1 is better for throughput.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Type

import attrs

from governor.bench.core import ScenarioContext, ScenarioResult, scenario
from governor.bench.peers import PEERS, Peer
from governor.bench.probes import main_thread_usage
from governor.bench.stats import Summary, Throughput, ratio, to_ms

#: Unmeasured round trips per peer and per ``Size.warmup`` before the first round: enough
#: to settle each pool's threads and caches after the warm-up's sleeps.
ROUNDTRIP_WARMUP_PER_UNIT = 25

#: Issue 12's bars, each as "ours against a peer's, at most 1x": the round-trip p50 at
#: most pebble's; pebble's throughput at most ours; mp.Pool's throughput at most ours
#: with ``map(chunksize=MAP_CHUNKSIZE)``.
RATIO_TARGET = 1.0

#: The bars against ``multiprocessing.Pool``, the fastest peer here: a no-op's round trip p50
#: at most 1.25x its own, and its throughput at most 1.25x ours (ours at least 0.8x its).
MP_POOL_RATIO_TARGET = 1.25

#: Calls per task in the ``map`` throughput run.
MAP_CHUNKSIZE = 100

OURS = "governor"


def rotated(items: List[Any], shift: int) -> List[Any]:
    """``items`` rotated left by ``shift``: round ``shift`` of a rotation starts at a new one."""
    shift %= len(items)
    return items[shift:] + items[:shift]


def _roundtrips(peer: Peer, count: int) -> List[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        peer.submit("noop").result()
        samples.append(time.perf_counter() - start)
    return samples


@attrs.frozen
class NoopRun:
    """One throughput run: its throughput, and per task the microseconds of CPU used in this
    process and in the workers' main threads, and the workers' sleeps."""

    throughput: Throughput
    process_us: float
    workers_us: float
    worker_sleeps: float


def _throughput(peer: Peer, tasks: int) -> NoopRun:
    pids = peer.worker_pids()
    workers_before, sleeps_before = main_thread_usage(pids)
    cpu_before = time.process_time()
    start = time.perf_counter()
    futures = [peer.submit("noop") for _ in range(tasks)]
    done, _ = concurrent.futures.wait(futures)
    seconds = time.perf_counter() - start
    process_s = time.process_time() - cpu_before
    workers_s, sleeps = main_thread_usage(pids)
    failed = sum(1 for future in done if future.exception() is not None)
    if failed:
        raise RuntimeError(f"{failed} of {tasks} no-ops failed on {peer.name}")
    return NoopRun(Throughput(tasks, seconds), process_s / tasks * 1e6, (workers_s - workers_before) / tasks * 1e6,
                   (sleeps - sleeps_before) / tasks)


def start_peers(stack: contextlib.ExitStack, peer_classes: Sequence[Type[Peer]], workers: int,
                ctx: ScenarioContext, result: ScenarioResult) -> List[Peer]:
    """Start and warm each peer that can run here, on ``stack``; note the ones skipped.

    Args:
        stack: closes the peers when the caller is done with them.
        peer_classes: the peers, in the order they start.
        workers: the pool size of every peer.
        ctx: the scenario's context (its size sets the warm-up).
        result: gets a note per peer that cannot run here.

    Returns:
        The started peers, every worker of each warm.
    """
    peers: List[Peer] = []
    for peer_class in peer_classes:
        reason = peer_class.unavailable()
        if reason is not None:
            result.note(f"peer {peer_class.name} skipped: {reason}")
            continue
        ctx.progress(f"starting and warming {peer_class.name} ({workers} workers)")
        peer = stack.enter_context(peer_class(workers))
        peer.warm()  # at once: every worker pays its first-call costs before it is timed
        _roundtrips(peer, ROUNDTRIP_WARMUP_PER_UNIT * ctx.size.warmup)
        peers.append(peer)
    return peers


def measure_noops(peers: List[Peer], ours: str, panel: str, ctx: ScenarioContext, result: ScenarioResult) -> None:
    """Measure no-op round trips and throughput of ``peers`` in rotating rounds; store them.

    Stores ``peers.<name>.{config, roundtrip, throughput, throughput_runs_per_s,
    cpu_per_task_us, worker_sleeps_per_task}`` (``cpu_per_task_us``: ``process`` and
    ``workers``, medians over the throughput runs) and, for every peer but ``ours``,
    ``ratios.<name>.{roundtrip_p50, roundtrip_p95, throughput}`` (``ours`` / that peer's),
    and draws the round trips in the distribution panel ``panel``.
    """
    size = ctx.size
    per_round = max(1, size.roundtrips // size.roundtrip_rounds)
    roundtrips: Dict[str, List[float]] = {peer.name: [] for peer in peers}
    ctx.progress(f"round trips: {per_round * size.roundtrip_rounds} per peer in {size.roundtrip_rounds} rounds")
    for round_number in range(size.roundtrip_rounds):
        for peer in rotated(peers, round_number):
            roundtrips[peer.name].extend(_roundtrips(peer, per_round))

    runs: Dict[str, List[NoopRun]] = {peer.name: [] for peer in peers}
    ctx.progress(f"throughput: {size.throughput_tasks} no-ops x {size.throughput_repeats} per peer")
    for repeat in range(size.throughput_repeats):
        for peer in rotated(peers, repeat):
            runs[peer.name].append(_throughput(peer, size.throughput_tasks))

    summaries = {name: Summary.of_seconds(samples) for name, samples in roundtrips.items()}
    throughputs = {name: _median([run.throughput for run in found], lambda run: run.per_s)
                   for name, found in runs.items()}
    for peer in peers:
        name, found = peer.name, runs[peer.name]
        process_us, workers_us, sleeps = (_median([getattr(run, field) for run in found])
                                          for field in ("process_us", "workers_us", "worker_sleeps"))
        result.put(f"peers.{name}.config", peer.describe())
        result.put(f"peers.{name}.roundtrip", summaries[name], f"{name}: no-op round trip")
        result.put(f"peers.{name}.throughput", throughputs[name], f"{name}: throughput (median run)")
        result.put(f"peers.{name}.throughput_runs_per_s", [round(run.throughput.per_s, 1) for run in found])
        result.put(f"peers.{name}.cpu_per_task_us", {"process": round(process_us, 1), "workers": round(workers_us, 1)})
        result.put(f"peers.{name}.worker_sleeps_per_task", round(sleeps, 2))
        result.row(f"{name}: CPU per no-op, this process / workers",
                   f"{process_us:.1f} / {workers_us:.1f} us; workers slept {sleeps:.2f} times per task")
        result.distribution(panel, name, to_ms(roundtrips[name]))
    if ours not in summaries:
        return
    for name in summaries:
        if name == ours:
            continue
        put_ratios(result, "roundtrip", summaries, ours, name)
        result.put(f"ratios.{name}.throughput", ratio(throughputs[ours].per_s, throughputs[name].per_s),
                   f"throughput, {ours} / {name}", "x")


def _median(values: List[Any], key: Callable[[Any], float] = float) -> Any:
    """The middle of ``values`` by ``key`` (the upper one of an even count)."""
    return sorted(values, key=key)[len(values) // 2]


def put_ratios(result: ScenarioResult, figure: str, summaries: Dict[str, Summary], ours: str, theirs: str) -> None:
    """Store ``ratios.<theirs>.<figure>_p50`` and ``_p95``: ``ours``' percentile / ``theirs``'."""
    for percentile in ("p50", "p95"):
        result.put(f"ratios.{theirs}.{figure}_{percentile}",
                   ratio(getattr(summaries[ours], percentile), getattr(summaries[theirs], percentile)),
                   f"{figure} {percentile}, {ours} / {theirs}", "x")


def _map_throughput(peer: Peer, tasks: int) -> Throughput:
    """``tasks`` no-op calls through ``Supervisor.map`` (ours) or ``multiprocessing.Pool.map``."""
    start = time.perf_counter()
    if peer.name == OURS:
        results = list(peer.supervisor.map("echo", range(tasks), chunksize=MAP_CHUNKSIZE))
    else:
        results = peer.pool.map(peer._functions["echo"], range(tasks), chunksize=MAP_CHUNKSIZE)
    seconds = time.perf_counter() - start
    if len(results) != tasks:
        raise RuntimeError(f"map on {peer.name} returned {len(results)} of {tasks} results")
    return Throughput(tasks, seconds)


def measure_map(peers: List[Peer], ctx: ScenarioContext, result: ScenarioResult) -> Dict[str, Throughput]:
    """Throughput of ``map(chunksize=MAP_CHUNKSIZE)`` on ours and on ``mp.Pool`` (median run)."""
    mappers = [peer for peer in peers if peer.name in (OURS, "mp-pool")]
    runs: Dict[str, List[Throughput]] = {peer.name: [] for peer in mappers}
    ctx.progress(f"map throughput: {ctx.size.throughput_tasks} calls, chunksize {MAP_CHUNKSIZE}")
    for repeat in range(ctx.size.throughput_repeats):
        for peer in rotated(mappers, repeat):
            runs[peer.name].append(_map_throughput(peer, ctx.size.throughput_tasks))
    medians = {name: _median(found, lambda run: run.per_s) for name, found in runs.items()}
    for name, median in medians.items():
        result.put(f"peers.{name}.map_throughput", median, f"{name}: map(chunksize={MAP_CHUNKSIZE}) throughput")
    return medians


def _peer_over_ours(result: ScenarioResult, name: str, figure: str) -> Optional[float]:
    """A peer's throughput over ours (at most 1: ours is at least as fast), or ``None``."""
    peers = result.figures.get("peers", {})
    theirs, ours = peers.get(name, {}).get(figure), peers.get(OURS, {}).get(figure)
    return None if theirs is None or ours is None else theirs["per_s"] / ours["per_s"]


@scenario("overhead")
def overhead(ctx: ScenarioContext) -> ScenarioResult:
    """No-op round trip and throughput: Supervisor vs mp.Pool, stdlib, pebble, mpire and raw loky."""
    size, result = ctx.size, ScenarioResult()
    with contextlib.ExitStack() as stack:
        peers = start_peers(stack, PEERS, size.peer_workers, ctx, result)
        measure_noops(peers, OURS, "No-op round trip by peer", ctx, result)
        mapped = measure_map(peers, ctx, result)
        ctx.progress("shutting the peers down")
    pebble_ratio = result.figures.get("ratios", {}).get("pebble", {}).get("roundtrip_p50")
    result.target(f"round-trip p50, ours / pebble's <= {RATIO_TARGET:g}x", pebble_ratio, RATIO_TARGET, "x")
    result.target(f"throughput of {size.throughput_tasks} no-ops, pebble's / ours <= {RATIO_TARGET:g}x",
                  _peer_over_ours(result, "pebble", "throughput"), RATIO_TARGET, "x")
    mp_pool_ratio = result.figures.get("ratios", {}).get("mp-pool", {}).get("roundtrip_p50")
    result.target(f"round-trip p50, ours / mp.Pool's <= {MP_POOL_RATIO_TARGET:g}x", mp_pool_ratio,
                  MP_POOL_RATIO_TARGET, "x")
    result.target(f"throughput of {size.throughput_tasks} no-ops, mp.Pool's / ours <= {MP_POOL_RATIO_TARGET:g}x",
                  _peer_over_ours(result, "mp-pool", "throughput"), MP_POOL_RATIO_TARGET, "x")
    map_ratio = (None if OURS not in mapped or "mp-pool" not in result.figures.get("peers", {})
                 else result.figures["peers"]["mp-pool"]["throughput"]["per_s"] / mapped[OURS].per_s)
    result.target(f"mp.Pool's throughput / our map(chunksize={MAP_CHUNKSIZE}) <= {RATIO_TARGET:g}x", map_ratio,
                  RATIO_TARGET, "x")
    result.note("Every peer gets the same worker count; the stdlib pools use the platform's default start "
                f"method. The map runs are {size.throughput_tasks} echo calls in chunks of {MAP_CHUNKSIZE} "
                "(Supervisor.map against multiprocessing.Pool.map). Round trips are timed one at a time with perf_counter around submit().result(); "
                f"throughput is the median of {size.throughput_repeats} run(s) of {size.throughput_tasks} "
                "no-ops submitted at once. Ratios are ours / theirs.")
    return result
