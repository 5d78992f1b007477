"""The picture: latency distributions and scaling curves, one panel each.

Every scenario's :attr:`~bench.core.ScenarioResult.distributions` become ECDF panels
(cumulative share of samples against latency; a log axis when the samples span more than
a decade) and its :attr:`~bench.core.ScenarioResult.curves` become line panels, so a new
scenario is drawn without touching this module. matplotlib is optional (the ``bench``
extra): without it the picture is skipped with a message saying how to get it.
"""

from __future__ import annotations

import math
import os
from typing import List, Optional, Tuple

#: Columns of the panel grid; each panel is PANEL_SIZE inches.
COLUMNS = 2
PANEL_SIZE = (6.4, 4.2)

#: Samples spanning more than this ratio (max / min) get a log latency axis.
LOG_SPAN = 10.0


def write_plot(bench_run, path: os.PathLike) -> Optional[str]:
    """Draw every panel of the run into a PNG at ``path``.

    Returns:
        ``None`` when written, else why it was skipped (a sentence for the user).
    """
    try:
        import matplotlib  # optional: the 'bench' extra

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return "picture skipped: matplotlib is not installed (pip install matplotlib, or the 'bench' extra)"
    panels: List[Tuple[str, str, object]] = []
    for result in bench_run.results.values():
        panels += [("ecdf", title, samples) for title, samples in result.distributions.items()]
        panels += [("curve", title, curve) for title, curve in result.curves.items()]
    if not panels:
        return "picture skipped: no scenario produced a distribution or a curve"
    rows = math.ceil(len(panels) / COLUMNS)
    figure, axes = plt.subplots(rows, COLUMNS, figsize=(PANEL_SIZE[0] * COLUMNS, PANEL_SIZE[1] * rows),
                                squeeze=False)
    for axis, (kind, title, data) in zip(axes.flat, panels):
        (_draw_ecdf if kind == "ecdf" else _draw_curve)(axis, data)
        axis.set_title(title, fontsize=10)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    document = bench_run.document
    figure.suptitle(f"Governor benchmark ({document['parameters']['size']}), {document['date']}, "
                    f"{document['machine']['cpu_count']} CPUs", fontsize=11)
    figure.tight_layout(rect=(0, 0, 1, 0.97))  # leave the top strip to the title
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return None


def _draw_ecdf(axis, series) -> None:
    values = [value for samples in series.values() for value in samples]
    for label, samples in series.items():
        ordered = sorted(samples)
        if not ordered:
            continue
        # Start at share 0 so even a single sample draws a visible step.
        shares = [0.0] + [(index + 1) / len(ordered) for index in range(len(ordered))]
        axis.step([ordered[0]] + ordered, shares, where="post", label=f"{label} (n={len(ordered)})")
    if values and min(values) > 0 and max(values) / min(values) > LOG_SPAN:
        axis.set_xscale("log")
    axis.set_xlabel("ms")
    axis.set_ylabel("share of samples <= x")


def _draw_curve(axis, curve) -> None:
    ticks = set()
    for label, points in curve.series.items():
        xs, ys = [point[0] for point in points], [point[1] for point in points]
        ticks.update(xs)
        style = "--" if label.startswith(("ideal", "offered")) else "-o"
        axis.plot(xs, ys, style, label=label, markersize=4)
    if curve.log_x:
        axis.set_xscale("log", base=2)
        axis.minorticks_off()
    # Tick the measured x values themselves, written as plain numbers (not 2^k).
    axis.set_xticks(sorted(ticks), [f"{tick:g}" for tick in sorted(ticks)])
    axis.set_xlabel(curve.x_label)
    axis.set_ylabel(curve.y_label)
