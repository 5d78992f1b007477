"""Run scenarios and assemble the JSON document (schema in ``bench/README.md``).

Data flow::

    run(scenarios, size) ──> for each scenario: fn(ScenarioContext) -> ScenarioResult
                         ──> BenchRun(document = {schema_version, machine, versions, date,
                                                  parameters, scenarios, checks}, results)
                         ──> write_json / report.write_markdown / plot.write_plot

A scenario that raises is recorded with an ``error`` and the run goes on with the next
one: a broken scenario must not cost the figures of the others.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import attrs
import psutil

import governor
from governor.engine.supervisor import BACKENDS

from governor.bench import plot, probes, report
from governor.bench.scenarios import scenario_names  # importing it registers every scenario
from governor.bench.core import SCENARIOS, SCRATCH_ROOT, SIZES, Progress, ScenarioContext, ScenarioResult

#: Bump when a key is renamed or removed or its meaning changes; adding keys does not.
SCHEMA_VERSION = 1

#: How long after the last scenario its processes may take to disappear before they count
#: as leftovers (loky reaps its workers asynchronously after ``shutdown``).
LEFTOVER_PATIENCE_S = 10.0


@attrs.define
class BenchRun:
    """One run of the harness.

    Attributes:
        document: the JSON document (see ``bench/README.md``).
        results: each scenario's result, by name (missing for a scenario that failed).
        errors: each failed scenario's traceback, by name.
    """

    document: Dict[str, Any]
    results: Dict[str, ScenarioResult] = attrs.field(factory=dict)
    errors: Dict[str, str] = attrs.field(factory=dict)

    @property
    def ok(self) -> bool:
        """Whether every scenario ran and nothing was left running."""
        return not self.errors and not self.document["checks"]["leftover_processes"]


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> Dict[str, Any]:
    """The schema's ``machine`` object: what the figures were measured on."""
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_total_mb": round(psutil.virtual_memory().total / 2 ** 20),
        "os": platform.platform(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
    }


def versions() -> Dict[str, Optional[str]]:
    """The schema's ``versions`` object (``None`` for a package that is not installed)."""
    # The version of the code that runs, not of whatever distribution metadata is installed:
    # run from a checkout, the two differ (or there is no metadata, and it is not "not installed").
    return {"governor": governor.__version__, "loky": _version("loky"), "psutil": _version("psutil"),
            "pebble": _version("pebble"), "matplotlib": _version("matplotlib"), "ray": _version("ray")}


def _run_one(name: str, size: str, progress: Progress) -> ScenarioResult:
    os.makedirs(SCRATCH_ROOT, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-", dir=SCRATCH_ROOT) as scratch:
        context = ScenarioContext(SIZES[size], size, progress, Path(scratch))
        start = time.perf_counter()
        result = SCENARIOS[name].fn(context)
        result.elapsed_s = time.perf_counter() - start
    return result


def run(scenarios: Optional[Iterable[str]] = None, size: str = "full", *, backend: str = "loky",
        progress: bool = True, json_path: Optional[os.PathLike] = None, report_path: Optional[os.PathLike] = None,
        plot_path: Optional[os.PathLike] = None) -> BenchRun:
    """Run scenarios and write the requested outputs.

    Args:
        scenarios: names to run, in the registry's order (default: see :func:`scenario_names`).
        size: ``"full"``, ``"quick"`` or ``"tiny"`` (see :data:`bench.core.SIZES`).
        backend: ``"loky"``, or ``"ray"`` to add the scenarios that measure the Ray lane.
        progress: report progress on stderr.
        json_path: write the JSON document there.
        report_path: write the markdown report there.
        plot_path: write the PNG there (skipped, with a note, without matplotlib).

    Returns:
        The :class:`BenchRun`.

    Raises:
        KeyError: for an unknown scenario, size or backend.
    """
    if size not in SIZES:
        raise KeyError(f"unknown size {size!r}; known: {sorted(SIZES)}")
    if backend not in BACKENDS:
        raise KeyError(f"unknown backend {backend!r}; known: {list(BACKENDS)}")
    names = scenario_names(scenarios, backend)
    reporter = Progress(enabled=progress)
    # Processes this one already had (a Ray node a caller initialised, with workers that come
    # and go) are not the run's to clean up: the leftover check leaves their trees alone.
    preexisting = psutil.Process().children()
    document: Dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "machine": machine(),
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "parameters": {"quick": size == "quick", "size": size, "backend": backend, "scenarios": names},
        "scenarios": {},
        "checks": {},
    }
    bench_run = BenchRun(document)
    for name in names:
        reporter.scenario = name
        reporter("starting")
        try:
            result = _run_one(name, size, reporter)
        except Exception as exc:  # record and go on: see the module docstring
            bench_run.errors[name] = traceback.format_exc()
            document["scenarios"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            reporter(f"FAILED: {type(exc).__name__}: {exc}")
            continue
        bench_run.results[name] = result
        document["scenarios"][name] = result.to_json()
        reporter(f"done in {result.elapsed_s:.1f} s")
    reporter.scenario = ""
    leftovers = _leftovers(preexisting)
    document["checks"]["leftover_processes"] = leftovers
    if leftovers:
        reporter(f"WARNING: processes left running: {leftovers}")
    if plot_path is not None:
        skipped = plot.write_plot(bench_run, plot_path)
        document["checks"]["plot"] = skipped or "written"
        reporter(skipped or f"picture written to {plot_path}")
    if json_path is not None:
        write_json(bench_run, json_path)
    if report_path is not None:
        report.write_markdown(bench_run, report_path, plot_path)
    return bench_run


def _leftovers(preexisting: List[psutil.Process]) -> List[Dict[str, Any]]:
    deadline = time.monotonic() + LEFTOVER_PATIENCE_S
    while True:
        left = probes.leftover_children(preexisting)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    found = []
    for process in left:
        try:
            found.append({"pid": process.pid, "cmdline": " ".join(process.cmdline())})
        except psutil.NoSuchProcess:  # it ended while we looked: not a leftover
            continue
    return found


def write_json(bench_run: BenchRun, path: os.PathLike) -> None:
    """Write the run's JSON document to ``path`` (indented, keys in schema order)."""
    Path(path).write_text(json.dumps(bench_run.document, indent=2) + "\n")
