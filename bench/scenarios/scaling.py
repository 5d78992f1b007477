"""Scenario ``scaling``: how throughput and latency grow with the pool and with the load.

Two sweeps of a short I/O-bound step (a 5 ms sleep):

* pool size: for each of ``scaling_workers``, a Supervisor with that many workers runs
  ``scaling_tasks`` steps submitted at once (a closed batch). Throughput is tasks / time
  to the last result, against the ideal ``workers * 1000 / 5`` per second; latency is each
  task's submit-to-resolved time, so it includes the wait in the queue.
* offered load: one Supervisor of ``load_workers`` gets open-loop arrivals at a fixed rate
  for ``load_seconds`` (submissions on schedule whatever the results do, so a slow system
  cannot slow its own load down). Latency runs from each task's *scheduled* arrival, not
  its actual submission (no coordinated omission). The rate rises by ``load_rate_factor``
  until the queue grows: more than :data:`SATURATION_BACKLOG_FRACTION` of the level's
  arrivals still queued when its arrivals end.
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import List

from governor import QueueFull, Supervisor

from governor.bench import bench_steps
from governor.bench.core import ScenarioContext, ScenarioResult, scenario
from governor.bench.probes import PATIENCE_S, ResolutionStamp, queue_depth
from governor.bench.stats import Summary, Throughput

#: The step's sleep. Short enough that the governor's per-task cost shows, long enough to
#: be an I/O-bound step and not a no-op.
STEP_MS = 5

#: The queue "grows" when more than this share of a level's arrivals still wait in it as the
#: level's arrivals end. Below capacity the queue stays near empty; past it, the backlog
#: grows by (rate - capacity) per second, so 10 % separates the two without tripping on a
#: momentary burst.
SATURATION_BACKLOG_FRACTION = 0.10

#: Warm-up steps per worker before each measurement.
WARMUP_STEPS_PER_WORKER = 2


def _warm(supervisor: Supervisor, workers: int, units: int) -> None:
    for _ in range(units):
        supervisor.run_batch([("sleep_ms", (STEP_MS,), {})] * (WARMUP_STEPS_PER_WORKER * workers))


def _settle(stamps: List[ResolutionStamp], futures: List[concurrent.futures.Future], step: str) -> float:
    """Wait for every future, fail on any error; return the last resolution time."""
    for stamp in stamps:
        stamp.wait(PATIENCE_S)
    failed = [future for future in futures if future.exception() is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} {step} steps failed, first: {failed[0].exception()!r}")
    return max(stamp.at for stamp in stamps)


def _closed_batch(supervisor: Supervisor, tasks: int) -> tuple:
    """Submit ``tasks`` steps at once; return (Throughput, latencies in s)."""
    submitted, stamps, futures = [], [], []
    start = time.perf_counter()
    for _ in range(tasks):
        submitted.append(time.perf_counter())
        future = supervisor.submit("sleep_ms", STEP_MS)
        futures.append(future)
        stamps.append(ResolutionStamp(future))
    last = _settle(stamps, futures, "sleep_ms")
    latencies = [stamp.at - at for stamp, at in zip(stamps, submitted)]
    return Throughput(tasks, last - start), latencies


def _open_loop_level(supervisor: Supervisor, rate: float, seconds: float) -> tuple:
    """Offer ``rate`` arrivals per second for ``seconds``.

    Returns:
        (the level's figures for the JSON, its latency Summary).
    """
    count = max(1, round(rate * seconds))
    scheduled, stamps, futures = [], [], []
    rejected = 0
    start = time.perf_counter()
    for index in range(count):
        due = start + index / rate
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        try:
            future = supervisor.submit("sleep_ms", STEP_MS)
        except QueueFull:  # the queue did more than grow: it is full
            rejected += 1
            continue
        scheduled.append(due)
        futures.append(future)
        stamps.append(ResolutionStamp(future))
    arrivals_end = time.perf_counter()
    backlog = queue_depth(supervisor)
    last = _settle(stamps, futures, "sleep_ms")
    latency = Summary.of_seconds([stamp.at - due for stamp, due in zip(stamps, scheduled)])
    return {
        "offered_per_s": rate,
        "submitted_per_s": round(count / max(arrivals_end - start, 1e-9), 1),
        "completed_per_s": round(len(futures) / (last - start), 1),
        "tasks": count,
        "latency": latency.to_json(),
        "queued_at_end": backlog,
        "rejected_queue_full": rejected,
        "saturated": rejected > 0 or backlog > SATURATION_BACKLOG_FRACTION * count,
    }, latency


@scenario("scaling")
def scaling(ctx: ScenarioContext) -> ScenarioResult:
    """Throughput and p95 latency of 5 ms steps against pool size and against open-loop offered load."""
    size, result = ctx.size, ScenarioResult()
    result.put("step_ms", STEP_MS, "step: sleep", "ms")
    throughput_curve = result.curve("Scaling: throughput vs pool workers", "pool workers", "tasks/s", log_x=True)
    latency_curve = result.curve("Scaling: latency vs pool workers (closed batch)", "pool workers", "ms",
                                 log_x=True)
    by_workers = []
    for workers in size.scaling_workers:
        ctx.progress(f"{workers} workers: {size.scaling_tasks} steps of {STEP_MS} ms")
        with Supervisor(bench_steps.registry, workers=workers) as supervisor:
            _warm(supervisor, workers, size.warmup)
            throughput, latencies = _closed_batch(supervisor, size.scaling_tasks)
        latency = Summary.of_seconds(latencies)
        ideal = workers * 1000 / STEP_MS
        by_workers.append({"workers": workers, "throughput": throughput.to_json(), "latency": latency.to_json(),
                           "ideal_per_s": ideal, "efficiency": round(throughput.per_s / ideal, 3)})
        result.row(f"{workers:>2} workers", f"{throughput.describe()}, "
                                f"{100 * throughput.per_s / ideal:.0f} % of ideal; latency {latency.describe()}")
        throughput_curve.series.setdefault("measured", []).append([workers, round(throughput.per_s, 1)])
        throughput_curve.series.setdefault(f"ideal ({STEP_MS} ms steps)", []).append([workers, ideal])
        latency_curve.series.setdefault("p50", []).append([workers, round(latency.p50, 3)])
        latency_curve.series.setdefault("p95", []).append([workers, round(latency.p95, 3)])
    result.put("by_workers", by_workers)

    ctx.progress(f"open-loop load on {size.load_workers} workers, from {size.load_start_rate:g}/s")
    levels = []
    load_latency = result.curve("Open-loop load: latency vs offered rate", "offered tasks/s", "ms", log_x=True)
    load_rate = result.curve("Open-loop load: completed vs offered rate", "offered tasks/s", "tasks/s", log_x=True)
    with Supervisor(bench_steps.registry, workers=size.load_workers) as supervisor:
        _warm(supervisor, size.load_workers, size.warmup)
        rate = size.load_start_rate
        while rate <= size.load_max_rate:
            ctx.progress(f"offering {rate:g}/s for {size.load_seconds:g} s")
            level, latency = _open_loop_level(supervisor, rate, size.load_seconds)
            levels.append(level)
            result.row(f"offered {rate:>6g}/s", f"completed {level['completed_per_s']:,.0f}/s; "
                                    f"latency {latency.describe()}; queued at end {level['queued_at_end']}"
                                    + ("  <- queue grows" if level["saturated"] else ""))
            load_latency.series.setdefault("p50", []).append([rate, round(latency.p50, 3)])
            load_latency.series.setdefault("p95", []).append([rate, round(latency.p95, 3)])
            load_rate.series.setdefault("completed", []).append([rate, level["completed_per_s"]])
            load_rate.series.setdefault("offered", []).append([rate, rate])
            if level["saturated"]:
                break
            rate = round(rate * size.load_rate_factor)  # whole arrivals per second, for readable labels
    result.put("load.workers", size.load_workers, "open-loop load: pool workers")
    result.put("load.levels", levels)
    saturated = [level["offered_per_s"] for level in levels if level["saturated"]]
    sustained = [level["offered_per_s"] for level in levels if not level["saturated"]]
    result.put("load.max_sustained_per_s", max(sustained) if sustained else None,
               "highest offered rate without queue growth", "/s")
    result.put("load.saturated_at_per_s", saturated[0] if saturated else None,
               "first offered rate where the queue grew", "/s")
    if not saturated:
        result.note(f"The queue never grew up to {size.load_max_rate:g}/s, the sweep's ceiling.")
    result.note(f"Closed batches: {size.scaling_tasks} steps submitted at once per pool size, latency from each "
                "submit to its resolution (queue wait included). Open loop: arrivals on a fixed schedule, "
                "latency from the scheduled arrival; a level is saturated when more than "
                f"{SATURATION_BACKLOG_FRACTION:.0%} of its arrivals are still queued as its arrivals end.")
    return result
