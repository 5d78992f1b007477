"""Human-readable output: the table printed on stdout and the markdown report.

Both are built from the :class:`~bench.runner.BenchRun`: the rows each scenario chose to
show (:meth:`ScenarioResult.put` with a label), its targets and its notes. Neither adds a
figure of its own, so the JSON stays the one source of numbers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import governor
from governor.bench.core import SCENARIOS, Target, describe
from governor.bench.scenarios import scenario_names

#: The checkout Governor runs from (when it runs from one), and the user's home: machine
#: paths that mean nothing on another machine, so the report writes them as placeholders.
_CHECKOUT = Path(governor.__file__).resolve().parent.parent
PORTABLE_PATHS = [(str(_CHECKOUT), "<checkout>"), (str(Path.home()), "~")] if (_CHECKOUT / "pyproject.toml").exists() \
    else [(str(Path.home()), "~")]


def portable(text: str) -> str:
    """``text`` with this machine's checkout and home paths replaced by placeholders."""
    for path, placeholder in PORTABLE_PATHS:
        text = text.replace(path, placeholder)
    return text


def run_title(document: Dict[str, Any]) -> str:
    """What the run was, for titles: ``Governor benchmark, all scenarios, size full, DATE``.

    A run of chosen scenarios is named by them (``Governor benchmark: ray, size full, DATE``).
    """
    parameters = document["parameters"]
    ran = parameters["scenarios"]
    every = scenario_names(None, parameters.get("backend", "loky"))
    what = ", all scenarios" if ran == every else f": {', '.join(ran)}"
    return f"Governor benchmark{what}, size {parameters['size']}, {document['date']}"


def _verdict(target: Target) -> str:
    return {True: "met", False: "MISSED", None: "not measured"}[target.met]


def _target_value(target: Target) -> str:
    return f"{describe(target.value, target.unit)} (limit {describe(float(target.limit), target.unit)})"


def _header_lines(bench_run) -> List[str]:
    document = bench_run.document
    machine, versions = document["machine"], document["versions"]
    installed = " · ".join(f"{name} {version or 'not installed'}" for name, version in versions.items())
    return [
        run_title(document),
        f"{machine['cpu_count']} CPUs ({machine['cpu_model']}), {machine['memory_total_mb']:,} MiB, "
        f"{machine['os']}, Python {machine['python']}, load {machine['load_average_1m_at_start']} at start",
        installed,
    ]


def format_table(bench_run) -> str:
    """The run as a plain-text table, one block per scenario, then every target."""
    lines = _header_lines(bench_run)
    width = max([len(row.label) for result in bench_run.results.values() for row in result.rows] + [30]) + 2
    for name, entry in bench_run.document["scenarios"].items():
        lines.append("")
        if "error" in entry:
            lines.append(f"== {name}: FAILED: {entry['error']}")
            continue
        result = bench_run.results[name]
        lines.append(f"== {name} ({result.elapsed_s:.1f} s): {SCENARIOS[name].description}")
        lines.extend(f"  {row.label:<{width}} {portable(row.text)}" for row in result.rows)
        lines.extend(f"  note: {portable(note)}" for note in result.notes if note.startswith("peer "))
    lines.append("")
    lines.append("== targets (this run, this machine)")
    for name, result in bench_run.results.items():
        for target in result.targets:
            label = f"{name}: {target.name}"
            lines.append(f"  {label:<{width + 20}} {_verdict(target):<7} {_target_value(target)}")
    leftovers = bench_run.document["checks"]["leftover_processes"]
    lines.append("")
    lines.append(f"leftover processes: {len(leftovers)}")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(bench_run, plot_path: Optional[os.PathLike] = None, relative_to: Optional[Path] = None) -> str:
    """The run as a markdown report.

    Args:
        bench_run: the run.
        plot_path: the picture to embed, if one was written.
        relative_to: the report's directory, to link the picture relatively.
    """
    header = _header_lines(bench_run)
    lines = [f"# {header[0]}", "", f"- Machine: {header[1]}", f"- Versions: {header[2]}",
             f"- Scenarios: {', '.join(bench_run.document['parameters']['scenarios'])}", ""]
    all_targets = [(name, target) for name, result in bench_run.results.items() for target in result.targets]
    if all_targets:
        lines += ["## Targets", "", "| scenario | target | measured | limit | verdict |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {_cell(target.name)} | {describe(target.value, target.unit)} | "
                  f"{describe(float(target.limit), target.unit)} | {_verdict(target)} |"
                  for name, target in all_targets]
        lines += ["", "Speed is measured on this run's machine, which is shared and noisy: a verdict is "
                  "this run's, not a guarantee.", ""]
    picture = bench_run.document["checks"].get("plot")
    if plot_path is not None and picture == "written":
        link = Path(plot_path)
        if relative_to is not None:
            link = Path(os.path.relpath(Path(plot_path).resolve(), relative_to.resolve()))
        lines += [f"![targets, latency distributions, curves and memory]({link.as_posix()})", ""]
    elif picture:
        lines += [f"_Picture: {picture}_", ""]
    for name, entry in bench_run.document["scenarios"].items():
        if "error" in entry:
            lines += [f"## {name}", "", f"**Failed:** `{entry['error']}`", ""]
            continue
        result = bench_run.results[name]
        lines += [f"## {name}", "", f"{SCENARIOS[name].description} ({result.elapsed_s:.1f} s)", "",
                  "| figure | value |", "|---|---|"]
        lines += [f"| {_cell(row.label)} | {_cell(portable(row.text))} |" for row in result.rows]
        lines.append("")
        lines += [f"- {portable(note)}" for note in result.notes]
        lines.append("")
    leftovers = bench_run.document["checks"]["leftover_processes"]
    lines.append(f"Processes left running after the run: {len(leftovers)}.")
    return "\n".join(lines) + "\n"


def write_markdown(bench_run, path: os.PathLike, plot_path: Optional[os.PathLike] = None) -> None:
    """Write :func:`markdown` to ``path``, linking the picture relative to it."""
    Path(path).write_text(markdown(bench_run, plot_path, Path(path).parent))
