"""Small statistics for latency samples: percentiles and the summaries the report prints.

Percentiles are Governor's one definition, :func:`governor.engine.metrics.percentiles`
(``statistics.quantiles(method="inclusive")``, numpy's default ``"linear"``), so the bench
and ``Supervisor.metrics()`` give the same p95 for the same samples. With few samples the
high percentiles approach the maximum; every summary carries its ``n`` so a reader can tell
a p99 of 10 samples (the max, really) from one of 10,000.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Sequence

import attrs

from governor.engine.metrics import percentiles


def percentile(values: Sequence[float], q: int) -> float:
    """The ``q``-th percentile of ``values`` (see :func:`governor.engine.metrics.percentiles`).

    Args:
        values: the samples, at least one, in any order.
        q: the percentile, a whole number from 0 to 100.

    Raises:
        ValueError: for no samples or ``q`` outside [0, 100].
    """
    if not values:
        raise ValueError("percentile of no samples")
    return percentiles(values, (q,))[0]


def median(values: Iterable[float]) -> float:
    """The median (p50) of ``values`` (in any order)."""
    return percentile(list(values), 50)


def _round(value: float, digits: int = 4) -> float:
    return round(value, digits)


@attrs.frozen
class Summary:
    """A distribution of samples: a latency in milliseconds (the usual), or another unit.

    Attributes:
        n: how many samples.
        p50, p95, p99: percentiles (see :func:`percentile`).
        mean, min, max: the usual.
        unit: the samples' unit, ``"ms"`` or ``"MiB"``; it suffixes the JSON keys.
    """

    n: int
    p50: float
    p95: float
    p99: float
    mean: float
    min: float
    max: float
    unit: str = "ms"

    @classmethod
    def of(cls, samples: Sequence[float], unit: str = "ms") -> "Summary":
        """Summarise ``samples`` given in ``unit``.

        Raises:
            ValueError: for no samples.
        """
        ordered = sorted(samples)
        if not ordered:
            raise ValueError("no samples to summarise")
        return cls(len(ordered), *percentiles(ordered, (50, 95, 99)), sum(ordered) / len(ordered), ordered[0],
                   ordered[-1], unit)

    @classmethod
    def of_seconds(cls, samples_s: Sequence[float]) -> "Summary":
        """Summarise durations in seconds (as clock differences come) as milliseconds."""
        return cls.of([sample * 1000 for sample in samples_s])

    def to_json(self) -> Dict[str, Any]:
        """The schema's distribution object: ``{"n", "p50_ms", "p95_ms", "p99_ms", "mean_ms",
        "min_ms", "max_ms"}`` (``_mib`` instead of ``_ms`` for a memory figure)."""
        suffix = self.unit.lower()
        return {"n": self.n, **{f"{name}_{suffix}": _round(getattr(self, name))
                                for name in ("p50", "p95", "p99", "mean", "min", "max")}}

    def describe(self) -> str:
        """One line for the table: ``p50 1.23 ms  p95 ...  p99 ...  (n=100)``."""
        show = format_ms if self.unit == "ms" else (lambda value: f"{value:.1f} {self.unit}")
        return f"p50 {show(self.p50)}  p95 {show(self.p95)}  p99 {show(self.p99)}  (n={self.n})"


@attrs.frozen
class Throughput:
    """How many tasks finished in how long.

    Attributes:
        tasks: tasks completed.
        seconds: wall time from the first submission to the last completion.
    """

    tasks: int
    seconds: float

    @property
    def per_s(self) -> float:
        """Tasks per second."""
        return self.tasks / self.seconds if self.seconds > 0 else math.inf

    def to_json(self) -> Dict[str, Any]:
        """The schema's throughput object: ``{"tasks", "seconds", "per_s"}``."""
        return {"tasks": self.tasks, "seconds": _round(self.seconds, 6), "per_s": _round(self.per_s, 1)}

    def describe(self) -> str:
        """One line for the table: ``4,512/s (5000 tasks in 1.108 s)``."""
        return f"{self.per_s:,.0f}/s ({self.tasks} tasks in {self.seconds:.3f} s)"


def format_ms(value: Optional[float]) -> str:
    """A duration in ms with as many decimals as its size deserves (``"—"`` for none)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    magnitude = abs(value)
    digits = 1 if magnitude >= 10 else 2 if magnitude >= 1 else 3
    return f"{value:.{digits}f} ms"


def ratio(ours: float, theirs: float) -> Optional[float]:
    """``ours / theirs`` rounded for the report, or ``None`` when ``theirs`` is zero."""
    return None if not theirs else _round(ours / theirs, 3)


def to_ms(samples_s: Iterable[float]) -> List[float]:
    """Seconds to milliseconds, rounded to 0.1 us (keeps the JSON small)."""
    return [_round(sample * 1000) for sample in samples_s]
