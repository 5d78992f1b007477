"""The harness's vocabulary: run sizes, the scenario registry, and what a scenario returns.

A scenario is one function registered with :func:`scenario`. It gets a
:class:`ScenarioContext` (the run's :class:`Size`, a progress callback, a scratch
directory) and returns a :class:`ScenarioResult`, which it fills through a few methods:

* :meth:`ScenarioResult.put` stores a figure under a dotted key in the JSON and, when given
  a label, also shows it as a row of the table and the report;
* :meth:`ScenarioResult.target` records a figure against its target (``value <= limit``);
* :meth:`ScenarioResult.distribution` and :meth:`ScenarioResult.curve` add samples and
  (x, y) series that the picture draws, one panel per title.

Adding a scenario (the coming ``daemon`` one, say) is therefore one decorated function in
a module that ``bench.scenarios`` imports; the CLI, JSON, report and picture pick it up.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO, Tuple

import attrs

from governor.bench.stats import Summary, Throughput, format_ms


@attrs.frozen
class Size:
    """How much work every scenario does: the knobs that trade precision for time.

    Attributes:
        warmup: iterations run and discarded before each measured loop.
        view_reps: view-switch repetitions (three steps), sequential and batched.
        view_parallel_reps: repetitions of the ten-step variant.
        view_parallel_workers: pool workers of the ten-step variant (ten, one per step).
        peer_workers: pool workers given to the Supervisor and to every peer.
        roundtrips: no-op round trips per peer.
        roundtrip_rounds: the round trips are measured in this many rounds, rotating
            the peers' order, so a noisy spell on the machine hits every peer alike.
        throughput_tasks: no-ops per throughput run.
        throughput_repeats: throughput runs per peer (the median is reported).
        limit_reps: samples of each governor measurement (timeouts, cancels).
        memory_reps: memory-overshoot samples (each allocates ~200 MB).
        memory_workers: pool workers (and concurrently held steps) in the memory scenario.
        scaling_workers: pool sizes the scaling scenario sweeps.
        scaling_tasks: 5 ms steps per pool size.
        load_workers: pool workers under the open-loop load.
        load_start_rate: the first offered load, in arrivals per second.
        load_rate_factor: each level offers this many times the previous one.
        load_max_rate: the sweep stops here even if the queue never grew.
        load_seconds: how long each level offers its load.
        view_load_users: user counts of the view-load sweep (``seed`` profile; none: no sweep).
        view_load_bar_users: users of the view-load ``seed-753`` run (the issue's bar: 10).
        view_load_seconds: how long each view-load run offers its load.
        view_load_workers: pool workers of every view-load engine.
    """

    warmup: int
    view_reps: int
    view_parallel_reps: int
    view_parallel_workers: int
    peer_workers: int
    roundtrips: int
    roundtrip_rounds: int
    throughput_tasks: int
    throughput_repeats: int
    limit_reps: int
    memory_reps: int
    memory_workers: int
    scaling_workers: Tuple[int, ...]
    scaling_tasks: int
    load_workers: int
    load_start_rate: float
    load_rate_factor: float
    load_max_rate: float
    load_seconds: float
    view_load_users: Tuple[int, ...]
    view_load_bar_users: int
    view_load_seconds: float
    view_load_workers: int


#: The three sizes. ``full`` is the default; ``quick`` (``--quick``) must finish under 60 s
#: on 2 cores; ``tiny`` is for the smoke test only: every code path, no meaningful numbers.
SIZES: Dict[str, Size] = {
    "full": Size(warmup=5, view_reps=40, view_parallel_reps=20, view_parallel_workers=10,
                 peer_workers=4, roundtrips=2000, roundtrip_rounds=10, throughput_tasks=5000,
                 throughput_repeats=3, limit_reps=30, memory_reps=10, memory_workers=10,
                 scaling_workers=(1, 2, 4, 8, 16), scaling_tasks=800, load_workers=4,
                 load_start_rate=50, load_rate_factor=1.5, load_max_rate=6400, load_seconds=3.0,
                 view_load_users=(1, 10, 25, 50), view_load_bar_users=10, view_load_seconds=15.0,
                 view_load_workers=16),
    "quick": Size(warmup=2, view_reps=10, view_parallel_reps=5, view_parallel_workers=10,
                  peer_workers=4, roundtrips=600, roundtrip_rounds=3, throughput_tasks=1000,
                  throughput_repeats=3, limit_reps=10, memory_reps=3, memory_workers=10,
                  scaling_workers=(1, 2, 4, 8), scaling_tasks=200, load_workers=4,
                  load_start_rate=100, load_rate_factor=2.0, load_max_rate=3200, load_seconds=0.75,
                  view_load_users=(10, 50), view_load_bar_users=10, view_load_seconds=4.0,
                  view_load_workers=16),
    "tiny": Size(warmup=1, view_reps=2, view_parallel_reps=1, view_parallel_workers=10,
                 peer_workers=2, roundtrips=10, roundtrip_rounds=2, throughput_tasks=20,
                 throughput_repeats=1, limit_reps=1, memory_reps=1, memory_workers=3,
                 scaling_workers=(1, 2), scaling_tasks=10, load_workers=2,
                 load_start_rate=50, load_rate_factor=4.0, load_max_rate=200, load_seconds=0.2,
                 view_load_users=(), view_load_bar_users=2, view_load_seconds=1.0,
                 view_load_workers=2),
}


@attrs.frozen
class Target:
    """A measured figure against its target; met when ``value <= limit``.

    Attributes:
        name: what is compared, for humans (e.g. ``"batch p50 <= 117 ms + 5 ms"``).
        value: the measured figure (``None`` if it could not be measured).
        limit: the target's bound.
        unit: the unit of both.
    """

    name: str
    value: Optional[float]
    limit: float
    unit: str

    @property
    def met(self) -> Optional[bool]:
        """Whether the target was met (``None`` when nothing was measured)."""
        return None if self.value is None else self.value <= self.limit

    def to_json(self) -> Dict[str, Any]:
        """The schema's target object: ``{"name", "value", "limit", "unit", "met"}``."""
        value = None if self.value is None else round(self.value, 4)
        return {"name": self.name, "value": value, "limit": self.limit, "unit": self.unit, "met": self.met}


@attrs.frozen
class Row:
    """One line of the human-readable table: a label and its formatted value."""

    label: str
    text: str


@attrs.define
class Curve:
    """A panel of (x, y) series for the picture, e.g. throughput against pool size.

    Attributes:
        x_label, y_label: the axes' titles.
        series: label -> list of ``[x, y]`` points, in x order.
        log_x: draw the x axis on a log scale.
    """

    x_label: str
    y_label: str
    series: Dict[str, List[List[float]]] = attrs.field(factory=dict)
    log_x: bool = False

    def to_json(self) -> Dict[str, Any]:
        """The schema's curve object: ``{"x_label", "y_label", "log_x", "series"}``."""
        return {"x_label": self.x_label, "y_label": self.y_label, "log_x": self.log_x, "series": self.series}


@attrs.define
class ScenarioResult:
    """What one scenario measured; see the module docstring for how a scenario fills it."""

    figures: Dict[str, Any] = attrs.field(factory=dict)
    rows: List[Row] = attrs.field(factory=list)
    targets: List[Target] = attrs.field(factory=list)
    notes: List[str] = attrs.field(factory=list)
    distributions: Dict[str, Dict[str, List[float]]] = attrs.field(factory=dict)
    curves: Dict[str, Curve] = attrs.field(factory=dict)
    elapsed_s: float = 0.0

    def put(self, key: str, value: Any, label: Optional[str] = None, unit: str = "") -> Any:
        """Store ``value`` at the dotted ``key`` of the figures; with ``label``, show it as a row.

        Args:
            key: where in :attr:`figures`, e.g. ``"parallel10.batch"``.
            value: a :class:`~bench.stats.Summary`, :class:`~bench.stats.Throughput`, number,
                string, or a JSON-serialisable list or dict.
            label: the row's label in the table and the report (no row when ``None``).
            unit: appended to a plain number in its row (``"%"``, ``"MiB"``, ``"ms"``...).

        Returns:
            ``value``, so a figure can be stored and used in one expression.
        """
        *parents, leaf = key.split(".")
        node = self.figures
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = _jsonable(value)
        if label is not None:
            self.rows.append(Row(label, describe(value, unit)))
        return value

    def row(self, label: str, text: str) -> None:
        """Add a row to the table that is not a stored figure (e.g. one line per sweep step)."""
        self.rows.append(Row(label, text))

    def target(self, name: str, value: Optional[float], limit: float, unit: str) -> Target:
        """Record ``value`` against the target ``value <= limit``; return the :class:`Target`."""
        target = Target(name, value, limit, unit)
        self.targets.append(target)
        return target

    def note(self, text: str) -> None:
        """Add a sentence the reader needs to interpret the figures (method, caveat, skip)."""
        self.notes.append(text)

    def distribution(self, panel: str, label: str, samples_ms: Sequence[float]) -> None:
        """Add the samples (ms) of one series to the latency-distribution panel ``panel``."""
        self.distributions.setdefault(panel, {})[label] = [round(sample, 4) for sample in samples_ms]

    def curve(self, panel: str, x_label: str, y_label: str, log_x: bool = False) -> Curve:
        """The (x, y) panel called ``panel``, created on first use; add series to ``.series``."""
        return self.curves.setdefault(panel, Curve(x_label, y_label, log_x=log_x))

    def to_json(self) -> Dict[str, Any]:
        """The scenario's object in the JSON (see ``bench/README.md``)."""
        return {
            "elapsed_s": round(self.elapsed_s, 3),
            "figures": self.figures,
            "targets": [target.to_json() for target in self.targets],
            "notes": list(self.notes),
            "distributions": self.distributions,
            "curves": {panel: curve.to_json() for panel, curve in self.curves.items()},
        }


def describe(value: Any, unit: str = "") -> str:
    """Format a figure for the table: summaries, throughputs, numbers and the rest."""
    if isinstance(value, (Summary, Throughput)):
        return value.describe()
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if unit == "ms":
            return format_ms(value)
        text = f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"
        return f"{text} {unit}".rstrip() if unit != "%" else f"{text} %"
    return f"{value} {unit}".rstrip()


def _jsonable(value: Any) -> Any:
    if isinstance(value, (Summary, Throughput)):
        return value.to_json()
    if isinstance(value, float):
        return round(value, 4)
    return value


class Progress:
    """Progress lines on stderr: ``[bench  12.3s] overhead: measuring loky round trips``.

    Args:
        stream: where to write (default ``sys.stderr``).
        enabled: write nothing when false.
    """

    def __init__(self, stream: Optional[TextIO] = None, enabled: bool = True):
        self._stream = stream
        self._enabled = enabled
        self._started = time.perf_counter()
        self.scenario = ""

    def __call__(self, message: str) -> None:
        """Report what the harness starts doing now."""
        if not self._enabled:
            return
        stream = self._stream or sys.stderr
        prefix = f"{self.scenario}: " if self.scenario else ""
        stream.write(f"[bench {time.perf_counter() - self._started:6.1f}s] {prefix}{message}\n")
        stream.flush()


#: Where every scenario's scratch directory is made. Pool steps that announce themselves
#: write marker files there, so they declare it (``writes=``), as any pool step that
#: writes must: the pool lane's sandbox refuses every undeclared write.
SCRATCH_ROOT = os.path.join(tempfile.gettempdir(), f"governor-bench-{os.getuid()}")


@attrs.frozen
class ScenarioContext:
    """What a scenario function is given.

    Attributes:
        size: how much work to do.
        size_name: ``"full"``, ``"quick"`` or ``"tiny"``.
        progress: call it with a short sentence when a new phase starts.
        scratch: a private directory for marker files, removed after the scenario.
    """

    size: Size
    size_name: str
    progress: Callable[[str], None]
    scratch: Path


@attrs.frozen
class Scenario:
    """A registered scenario.

    Attributes:
        name: what ``--scenario`` calls it.
        fn: the function that measures.
        description: one line, from the function's docstring.
        backend: the pool-lane backend it measures besides the default loky one (``"ray"``),
            or ``None``. Such a scenario needs that backend's extra, so it runs only when
            that backend is asked for (``--backend``) or the scenario is named.
        named_only: runs only when named (``--scenario``): a stress run rather than a
            measurement (``chaos``: minutes at the full size), kept out of the default run.
    """

    name: str
    fn: Callable[[ScenarioContext], ScenarioResult]
    description: str
    backend: Optional[str] = None
    named_only: bool = False


#: Every scenario, by name, in registration order (the order ``python -m governor.bench`` runs them).
SCENARIOS: Dict[str, Scenario] = {}


def scenario(name: str, backend: Optional[str] = None, named_only: bool = False
             ) -> Callable[[Callable[[ScenarioContext], ScenarioResult]], Callable[[ScenarioContext], ScenarioResult]]:
    """Register the decorated function as the scenario ``name``.

    The function takes a :class:`ScenarioContext` and returns a :class:`ScenarioResult`;
    its docstring's first line is the scenario's description.

    Args:
        name: the scenario's name.
        backend: see :attr:`Scenario.backend`.
        named_only: see :attr:`Scenario.named_only`.

    Raises:
        ValueError: if ``name`` is taken.
    """
    def register(fn: Callable[[ScenarioContext], ScenarioResult]) -> Callable[[ScenarioContext], ScenarioResult]:
        if name in SCENARIOS:
            raise ValueError(f"scenario {name!r} is already registered")
        description = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        SCENARIOS[name] = Scenario(name, fn, description, backend, named_only)
        return fn

    return register
