"""The picture: the verdicts first, then latency distributions, curves and memory, one panel each.

Drawn from the run's JSON document alone (``python -m governor.bench.plot RUN.json OUT.png``
redraws a stored run), so the picture never shows a figure the JSON does not hold:

* **Targets** (top, full width): each target is a row, its measured value divided by its
  limit on a log axis; the vertical line at 1 is the target, so a dot left of it (green) is
  met and one right of it (red) is missed, whatever the unit. The measured value and the
  limit are written beside it.
* every scenario's distributions become ECDF panels (share of samples <= x; a log axis
  when they span more than a decade). A target of the same scenario in ms whose limit lies
  in the panel's range is drawn on it as a vertical line, with a dot at the share its
  percentile names (the p95 target: 0.95): the curve must pass above and left of the dot.
* its curves become line panels.
* **Memory**, when the memory scenario ran: what Governor's workers and supervisor add
  (USS, stacked by role) next to the same number of bare loky workers, with the budget as
  a horizontal line.

matplotlib is optional (the ``bench`` extra): without it the picture is skipped with a
message saying how to get it.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import textwrap
from typing import Any, Dict, List, Optional, Tuple

from governor.bench.report import run_title

#: The picture's resolution, dots per inch.
DPI = 100

#: Columns of the panel grid; each panel is PANEL_SIZE inches.
COLUMNS = 2
PANEL_SIZE = (6.4, 4.2)

#: Height of one target's row in the verdict panel, inches (plus TARGETS_MARGIN for axes),
#: for labels of up to two lines; rows grow with longer labels.
TARGET_ROW_IN = 0.42

#: Target labels are wrapped at this many characters: a long name must not squeeze the
#: panel until the layout gives up and the name falls off the picture's left edge.
LABEL_WIDTH_CHARS = 60
TARGETS_MARGIN_IN = 1.3

#: Samples spanning more than this ratio (max / min) get a log latency axis.
LOG_SPAN = 10.0

#: An ms target is drawn on a distribution panel when its limit is within this factor of
#: the panel's samples: far outside, the line would only stretch the axis.
TARGET_RANGE_FACTOR = 3.0

#: The verdict panel's x range (measured / limit), so one wild figure cannot squash the rest.
RATIO_RANGE = (0.02, 50.0)

MET, MISSED, UNMEASURED = "tab:green", "tab:red", "tab:gray"


def write_plot(bench_run, path: os.PathLike) -> Optional[str]:
    """Draw the run into a PNG at ``path``.

    Returns:
        ``None`` when written, else why it was skipped (a sentence for the user).
    """
    return write_document_plot(bench_run.document, path)


def write_document_plot(document: Dict[str, Any], path: os.PathLike) -> Optional[str]:
    """Draw a run's JSON document into a PNG at ``path``; ``None`` when written, else why not."""
    try:
        import matplotlib  # optional: the 'bench' extra

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return "picture skipped: matplotlib is not installed (pip install matplotlib, or the 'bench' extra)"
    figure = draw(document)
    if figure is None:
        return "picture skipped: no scenario produced a target, a distribution or a curve"
    # "tight": the picture grows to hold every label (a long target name on the left of
    # the verdict panel, the legends), rather than cutting what the layout pushed out.
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return None


def _targets(document: Dict[str, Any]) -> List[Tuple[str, Dict[str, Any]]]:
    return [(name, target) for name, entry in document["scenarios"].items() for target in entry.get("targets", ())]


def draw(document: Dict[str, Any]):
    """The matplotlib figure of a run's document, or ``None`` when there is nothing to draw."""
    import matplotlib.pyplot as plt

    panels: List[Tuple[str, str, Any, str]] = []  # (kind, title, data, scenario)
    for name, entry in document["scenarios"].items():
        panels += [("ecdf", title, series, name) for title, series in entry.get("distributions", {}).items()]
        panels += [("curve", title, curve, name) for title, curve in entry.get("curves", {}).items()]
    memory = document["scenarios"].get("memory", {})
    if memory.get("figures", {}).get("per_worker"):
        panels.append(("memory", "Memory: what Governor adds, against bare loky workers", memory, "memory"))
    targets = _targets(document)
    if not panels and not targets:
        return None
    rows = math.ceil(len(panels) / COLUMNS)
    lines = max([_target_label(scenario, target).count("\n") + 1 for scenario, target in targets] + [1])
    targets_height = TARGETS_MARGIN_IN + TARGET_ROW_IN * max(1.0, lines / 2) * len(targets) if targets else 0.0
    panels_height = PANEL_SIZE[1] * rows
    # Two subfigures, each laid out on its own: the targets' long labels must not push the
    # panels' grid aside.
    figure = plt.figure(figsize=(PANEL_SIZE[0] * COLUMNS, targets_height + panels_height + 0.4), layout="constrained")
    top, bottom = figure.subfigures(2, 1, height_ratios=[max(targets_height, 1e-3), max(panels_height, 1e-3)])
    if targets:
        _draw_targets(top.subplots(), targets)
    grid = bottom.add_gridspec(max(rows, 1), COLUMNS)
    for index, (kind, title, data, scenario) in enumerate(panels):
        axis = bottom.add_subplot(grid[index // COLUMNS, index % COLUMNS])
        if kind == "ecdf":
            _draw_ecdf(axis, data, [target for name, target in targets if name == scenario])
        elif kind == "curve":
            _draw_curve(axis, data)
        else:
            _draw_memory(axis, data)
        axis.set_title(title, fontsize=10)
        axis.grid(True, alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.suptitle(f"{run_title(document)}, {document['machine']['cpu_count']} CPUs", fontsize=11)
    return figure


def _verdict(target: Dict[str, Any]) -> Tuple[str, str]:
    met = target.get("met")
    return {True: ("met", MET), False: ("MISSED", MISSED), None: ("not measured", UNMEASURED)}[met]


def _amount(value: float, unit: str) -> str:
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return f"{text} {unit}" if unit not in ("x", "%") else f"{text}{unit}"


def _target_label(scenario: str, target: Dict[str, Any]) -> str:
    """A target's name and scenario, wrapped at :data:`LABEL_WIDTH_CHARS`."""
    return textwrap.fill(f"{target['name']} [{scenario}]", LABEL_WIDTH_CHARS)


def _draw_targets(axis, targets: List[Tuple[str, Dict[str, Any]]]) -> None:
    low, high = RATIO_RANGE
    for row, (scenario, target) in enumerate(targets):
        verdict, colour = _verdict(target)
        if target["value"] is None:
            axis.annotate(verdict, (1, row), xytext=(8, 0), textcoords="offset points", va="center", fontsize=8,
                          color=colour)
            continue
        ratio = target["value"] / target["limit"] if target["limit"] else high
        shown = min(max(ratio, low), high)
        axis.plot([1, shown], [row, row], color=colour, linewidth=2.5, solid_capstyle="butt")
        axis.plot([shown], [row], "o", color=colour, markersize=7)
        text = f"{verdict}: {_amount(target['value'], target['unit'])} vs {_amount(target['limit'], target['unit'])}"
        axis.annotate(text, (shown, row), xytext=(4, 5), textcoords="offset points", ha="left", va="bottom",
                      fontsize=8, color=colour)
    axis.set_yticks(range(len(targets)), [_target_label(scenario, target) for scenario, target in targets],
                    fontsize=8)
    for label, (_, target) in zip(axis.get_yticklabels(), targets):
        label.set_color(_verdict(target)[1])
    axis.axvline(1, color="black", linewidth=1.5)
    axis.annotate("target", (1, len(targets) - 0.5), xytext=(0, 2), textcoords="offset points", ha="center",
                  va="bottom", fontsize=8)
    axis.set_xscale("log")
    axis.set_xlim(low, high)
    axis.set_ylim(len(targets) - 0.5, -0.7)
    axis.set_xlabel("measured / target limit (log): left of the line is met (green), right of it missed (red)")
    axis.set_title("Targets of this run", fontsize=10)


def _share_of(name: str) -> Optional[float]:
    """The share a target's percentile names: ``"... p95"`` -> 0.95 (``None`` when it names none)."""
    found = re.search(r"\bp(\d{2})\b", name)
    return int(found.group(1)) / 100 if found else None


def _draw_ecdf(axis, series: Dict[str, List[float]], targets: List[Dict[str, Any]]) -> None:
    values = [value for samples in series.values() for value in samples]
    for label, samples in series.items():
        ordered = sorted(samples)
        if not ordered:
            continue
        # Start at share 0 so even a single sample draws a visible step.
        shares = [0.0] + [(index + 1) / len(ordered) for index in range(len(ordered))]
        axis.step([ordered[0]] + ordered, shares, where="post", label=f"{label} (n={len(ordered)})")
    if values:
        low, high = min(values) / TARGET_RANGE_FACTOR, max(values) * TARGET_RANGE_FACTOR
        for target in targets:
            if target["unit"] != "ms" or not low <= target["limit"] <= high:
                continue
            verdict, colour = _verdict(target)
            axis.axvline(target["limit"], color=colour, linestyle="--", linewidth=1.2,
                         label=f"target: {target['name']} ({verdict})")
            share = _share_of(target["name"])
            if share is not None:
                axis.plot([target["limit"]], [share], "D", color=colour, markersize=6)
    if values and min(values) > 0 and max(values) / min(values) > LOG_SPAN:
        axis.set_xscale("log")
    axis.set_xlabel("ms")
    axis.set_ylabel("share of samples <= x")


def _draw_curve(axis, curve: Dict[str, Any]) -> None:
    ticks = set()
    for label, points in curve["series"].items():
        xs, ys = [point[0] for point in points], [point[1] for point in points]
        ticks.update(xs)
        style = "--" if label.startswith(("ideal", "offered")) else "-o"
        axis.plot(xs, ys, style, label=label, markersize=4)
    if curve.get("log_x"):
        axis.set_xscale("log", base=2)
        axis.minorticks_off()
    # Tick the measured x values themselves, written as plain numbers (not 2^k).
    axis.set_xticks(sorted(ticks), [f"{tick:g}" for tick in sorted(ticks)])
    axis.set_xlabel(curve["x_label"])
    axis.set_ylabel(curve["y_label"])


def _draw_memory(axis, entry: Dict[str, Any]) -> None:
    figures = entry["figures"]
    workers = figures["per_worker"]
    roles: Dict[str, float] = {}
    for worker in workers:
        roles[worker["role"]] = roles.get(worker["role"], 0.0) + worker["uss_mb"]
    growth = figures.get("supervisor", {}).get("rss_growth_mb", 0.0)
    stack = [(f"{role} workers ({sum(1 for worker in workers if worker['role'] == role)})", mib)
             for role, mib in sorted(roles.items())] + [("supervisor's own growth", growth)]
    bottom = 0.0
    for label, mib in stack:
        axis.bar(0, mib, bottom=bottom, width=0.6, label=f"{label}: {mib:.1f} MiB")
        bottom += mib
    axis.annotate(f"{bottom:.1f} MiB", (0, bottom), xytext=(0, 3), textcoords="offset points", ha="center",
                  fontsize=8)
    names = ["Governor"]
    loky_uss = figures.get("baseline", {}).get("raw_loky_worker_uss_mb")
    if loky_uss is not None:
        axis.bar(1, loky_uss * len(workers), width=0.6, color="tab:gray",
                 label=f"{len(workers)} bare loky workers: {loky_uss * len(workers):.1f} MiB")
        names.append(f"{len(workers)} bare loky workers")
    for target in entry.get("targets", ()):
        if target["unit"] == "MiB":
            verdict, colour = _verdict(target)
            axis.axhline(target["limit"], color=colour, linestyle="--", linewidth=1.5,
                         label=f"target <= {target['limit']:g} MiB ({verdict})")
    axis.set_xticks(range(len(names)), names)
    axis.set_xlim(-0.8, len(names) - 0.2)
    tallest = max([bottom] + [patch.get_height() for patch in axis.patches] + [line.get_ydata()[0]
                                                                             for line in axis.get_lines()])
    axis.set_ylim(0, tallest * 1.8)  # room above the bars for the legend
    axis.set_ylabel("MiB of private memory (USS)")


def main(argv: List[str]) -> int:
    """``python -m governor.bench.plot RUN.json OUT.png``: redraw a stored run's picture."""
    if len(argv) != 2:
        print("usage: python -m governor.bench.plot RUN.json OUT.png", file=sys.stderr)
        return 2
    with open(argv[0]) as stream:
        skipped = write_document_plot(json.load(stream), argv[1])
    print(skipped or f"picture written to {argv[1]}", file=sys.stderr)
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
