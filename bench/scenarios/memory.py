"""Scenario ``memory``: what the governor costs in memory with its pool full of work.

A Supervisor with ``memory_workers`` pool workers runs as many steps at once, each holding
its worker (announced by a marker file) while the harness measures, with psutil:

* this process's RSS before the Supervisor was started, and while the steps run;
* every Governor process's RSS, USS and PSS (``memory_full_info``): the worker template
  (this process's child) and the workers it forked: the busy pool workers, the pool's
  warm spare and the critical lane's worker and spare.

The honest "additional memory" is the sum of their USS (the pages only that process
holds, which its death would free) plus the growth of this process's RSS. The sum of RSS
counts the interpreter's and libraries' shared pages once per worker and overstates the
cost several times; it is reported next to it only to show by how much. PSS (shared pages
split among their sharers) lands in between.
"""

from __future__ import annotations

import os
from typing import Dict, List

import loky
import psutil

from governor import Supervisor

from governor.bench import bench_steps
from governor.bench.core import ScenarioContext, ScenarioResult, scenario
from governor.bench.probes import PATIENCE_S, governor_processes, read_pid
from governor.bench.stats import Summary

#: The issue's budget for the additional memory of a full pool (issue 12: goal 60 MiB).
BUDGET_MB = 100.0

#: The warm-up: each worker runs one such sleep, so every one has imported the step module.
WARMUP_SLEEP_MS = 20

MIB = 2 ** 20


def _own_rss_mb() -> float:
    return psutil.Process().memory_info().rss / MIB


def _measure(workers: List[psutil.Process], running: set) -> List[Dict[str, object]]:
    found = []
    for process in workers:
        try:
            info = process.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if process.ppid() == os.getpid():
            role = "template"
        else:
            role = "running" if process.pid in running else "idle"
        found.append({"pid": process.pid, "role": role,
                      "rss_mb": round(info.rss / MIB, 2), "uss_mb": round(info.uss / MIB, 2),
                      "pss_mb": round(info.pss / MIB, 2)})
    return found


def _raw_loky_worker_mb() -> Dict[str, float]:
    """RSS and USS of one raw loky worker that ran ``os.getpid``: the per-process floor.

    ``os.getpid`` pickles by reference to a builtin, so the worker imports nothing beyond
    loky itself; the gap to a Governor worker is what Governor and the step modules add.
    """
    executor = loky.ProcessPoolExecutor(max_workers=1)
    try:
        pid = executor.submit(os.getpid).result(PATIENCE_S)
        info = psutil.Process(pid).memory_full_info()
    finally:
        executor.shutdown(wait=True)
    return {"rss_mb": round(info.rss / MIB, 2), "uss_mb": round(info.uss / MIB, 2)}


@scenario("memory")
def memory(ctx: ScenarioContext) -> ScenarioResult:
    """Supervisor RSS and every worker's RSS/USS with the pool full, against a 100 MB budget."""
    size, result = ctx.size, ScenarioResult()
    count = size.memory_workers
    ctx.progress("baseline: one raw loky worker")
    baseline = _raw_loky_worker_mb()
    before_mb = _own_rss_mb()
    ctx.progress(f"starting a Supervisor with {count} workers")
    with Supervisor(bench_steps.registry, workers=count) as supervisor:
        ctx.progress("warm-up: one step per worker")
        for _ in range(size.warmup):
            supervisor.run_batch([("sleep_ms", (WARMUP_SLEEP_MS,), {})] * count)
        idle = _measure(governor_processes(), set())
        ctx.progress(f"holding {count} steps at once and measuring")
        release = ctx.scratch / "release"
        markers = [ctx.scratch / f"hold-{index}" for index in range(count)]
        futures = [supervisor.submit("hold", str(marker), str(release)) for marker in markers]
        try:
            running = {read_pid(marker) for marker in markers}
            during_mb = _own_rss_mb()
            measured = _measure(governor_processes(), running)
        finally:
            release.touch()
            for future in futures:
                future.result(PATIENCE_S)

    def total(rows: List[Dict[str, object]], key: str, role: str = "") -> float:
        return sum(row[key] for row in rows if not role or row["role"] == role)

    growth_mb = during_mb - before_mb
    busy = [row for row in measured if row["role"] == "running"]
    template = [row for row in measured if row["role"] == "template"]
    result.put("workers", count, "pool workers = steps held at once")
    result.put("worker_processes", len(measured) - len(template),
               "Governor worker processes (pool + spares + critical)")
    result.put("template_uss_mb", total(measured, "uss_mb", "template"), "USS of the worker template", "MiB")
    result.put("supervisor.rss_before_mb", before_mb, "this process's RSS before the Supervisor", "MiB")
    result.put("supervisor.rss_running_mb", during_mb, "this process's RSS, steps running", "MiB")
    result.put("supervisor.rss_growth_mb", growth_mb, "this process's RSS growth", "MiB")
    if busy:
        result.put("running_worker.rss", Summary.of([row["rss_mb"] for row in busy], "MiB"),
                   "RSS per running worker")
        result.put("running_worker.uss", Summary.of([row["uss_mb"] for row in busy], "MiB"),
                   "USS per running worker")
    idle_workers = [row for row in idle if row["role"] == "idle"]
    result.put("idle_worker_uss_mb", Summary.of([row["uss_mb"] for row in idle_workers], "MiB") if idle_workers else None,
               "USS per worker, all idle (before the hold)")
    result.put("totals.sum_rss_mb", total(measured, "rss_mb"), "sum of workers' RSS (overstated)", "MiB")
    result.put("totals.sum_pss_mb", total(measured, "pss_mb"), "sum of workers' PSS", "MiB")
    result.put("totals.sum_uss_mb", total(measured, "uss_mb"), "sum of workers' USS", "MiB")
    result.put("totals.running_sum_uss_mb", total(measured, "uss_mb", "running"),
               "sum of USS, the running pool workers only", "MiB")
    result.put("baseline.raw_loky_worker_rss_mb", baseline["rss_mb"], "baseline: a raw loky worker's RSS (no step module)", "MiB")
    result.put("baseline.raw_loky_worker_uss_mb", baseline["uss_mb"], "baseline: a raw loky worker's USS (no step module)", "MiB")
    additional = result.put("additional_mb", total(measured, "uss_mb") + growth_mb,
                            "additional memory: sum USS + own RSS growth (honest)", "MiB")
    result.put("additional_rss_mb", total(measured, "rss_mb") + growth_mb,
               "additional memory by RSS (overstated)", "MiB")
    result.put("budget_mb", BUDGET_MB)
    result.put("per_worker", measured)
    result.target(f"additional memory with {count} workers busy (USS + own growth)", additional, BUDGET_MB, "MiB")
    result.note("Additional memory = the sum of every Governor worker's USS (pages that only it holds; "
                "what stopping it frees) + the growth of this process's RSS since before the Supervisor "
                "was started. It is the honest figure; the sum of RSS counts the interpreter's and "
                "libraries' shared pages once per worker. The processes counted: the worker template (this "
                "process's child named governor-template) and every worker it forked, the pool's spare and "
                "the critical lane's worker and spare included; per_worker lists each one's USS.")
    result.note("Baseline: one worker of a raw loky.ProcessPoolExecutor that ran os.getpid (so it "
                "imported nothing but loky), measured the same way before the Supervisor starts: the "
                "per-process floor. A Governor worker's USS above it is what importing Governor and "
                "the step modules costs each worker.")
    return result
