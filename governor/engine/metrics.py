"""What the supervisor counts and measures, read as a dict snapshot or as Prometheus text.

One recorder per supervisor holds every figure; both views are built from it at read time:

* :meth:`MetricsRecorder.snapshot` -> a JSON-serialisable dict (``Supervisor.metrics()``);
* :class:`PrometheusCollector` -> Prometheus families on a ``CollectorRegistry`` owned by
  the supervisor (``Supervisor.prometheus_text()``), so two supervisors in one process never
  mix their series.

Recording happens once per finished task, on the manager thread or on the thread that
cancels a queued task (see ``Manager.conclude_queued_cancel``): one tuple appended to a
list, never a lock, a syscall or a prometheus_client call. The tuples are folded into the
counters and histograms in batches, by whoever reads next (every read folds first, so a
caller who has a task's result sees it counted) or once :data:`FOLD_AT` are pending.
Folding a batch takes a fraction of a per-task update's time (the bucket search and sums
run in C over each histogram's column), and it keeps four histograms' bookkeeping off the
manager's round trip: recording a task one histogram at a time was a quarter of the
manager's time per no-op. Histograms keep exact bucket counts, sum and count for
Prometheus, plus the last :data:`RESERVOIR_SIZE` samples for the p50/p95/p99 of the
snapshot.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import operator
import statistics
import threading
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Sequence, Tuple

import psutil
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import generate_latest

from governor.limits import Lane
from governor.task import Task, TaskState

#: Finished tasks recorded but not yet folded into the figures, at most: a bound on the
#: memory of a supervisor whose metrics nobody reads.
FOLD_AT = 4096

#: Samples kept per histogram for quantiles: enough for a stable p99 (about 20 samples
#: above it), small enough that sorting at snapshot time costs well under a millisecond.
RESERVOIR_SIZE = 2048

#: Bucket bounds in seconds: from 100 us (a no-op's queue wait) to 5 min (a long step).
SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

#: Bucket bounds in bytes for a task's peak RSS: 16 MiB to 8 GiB.
BYTES_BUCKETS = tuple(2 ** power for power in range(24, 34))

#: How each terminal state is counted in ``governor_tasks_total{outcome=...}``.
OUTCOMES = {
    TaskState.DONE: "ok", TaskState.FAILED: "failed", TaskState.TIMED_OUT: "timeout",
    TaskState.OVER_MEMORY: "memory", TaskState.CANCELLED: "cancelled", TaskState.CRASHED: "crashed",
    TaskState.SKIPPED: "skipped", TaskState.EXHAUSTED: "exhausted",
}

#: How many critical lane keys the queue depth per key shows, those with the most tasks
#: waiting: a bound on the labels a scrape carries however many chats a daemon serves.
TOP_KEYS = 10

#: The histograms recorded per (lane, step): name -> (bucket bounds, help text).
HISTOGRAMS = {
    "queue_wait_seconds": (SECONDS_BUCKETS, "Time a task waited in its lane's queue before a worker took it."),
    "duration_seconds": (SECONDS_BUCKETS, "Time a task ran in its worker."),
    "latency_seconds": (SECONDS_BUCKETS, "Time from submit to the task's end, as its caller saw it."),
    "peak_rss_bytes": (BYTES_BUCKETS, "Peak RSS of the task's worker (and sampled children) while it ran."),
}


#: The histograms :func:`_figures` gives the values of, in its order.
_FOLDED = ("queue_wait_seconds", "duration_seconds", "latency_seconds", "peak_rss_bytes")
_BY_STEP = operator.itemgetter(0, 1)


def _figures(rows: Sequence[tuple]) -> Tuple[List[float], ...]:
    """The queue waits, durations, latencies and peak RSS of finished tasks' rows
    (``MetricsRecorder.task_finished``), each figure only where it is known."""
    queue_waits, durations, latencies, peaks = [], [], [], []
    for _, _, _, submitted, dispatched, started, ended, peak in rows:
        if dispatched is not None:
            queue_waits.append(dispatched - submitted)
            if ended is not None:
                durations.append(max(0.0, ended - (started if started is not None else dispatched)))
            if peak is not None:
                peaks.append(peak)
        if ended is not None:
            latencies.append(max(0.0, ended - submitted))
    return queue_waits, durations, latencies, peaks


class Histogram:
    """Exact bucket counts, sum and count, plus a reservoir of recent samples for quantiles."""

    __slots__ = ("bounds", "buckets", "sum", "count", "recent")

    def __init__(self, bounds: Sequence[float]):
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0
        self.recent: Deque[float] = collections.deque(maxlen=RESERVOIR_SIZE)

    def observe(self, value: float) -> None:
        self.observe_many((value,))

    def observe_many(self, values: Sequence[float]) -> None:
        """Observe each of ``values``: one sort and a bisect per bound, whatever their number."""
        ordered = sorted(values)
        below = 0  # values at or under the previous bound
        for bucket, bound in enumerate(self.bounds):
            upto = bisect.bisect_right(ordered, bound, below)
            self.buckets[bucket] += upto - below
            below = upto
        self.buckets[-1] += len(ordered) - below
        self.sum += sum(values)
        self.count += len(values)
        self.recent.extend(values)

    def summary(self) -> Dict[str, Any]:
        """count, sum, and p50/p95/p99 of the recent samples (``None`` when empty)."""
        return {"count": self.count, "sum": self.sum,
                **dict(zip(("p50", "p95", "p99"), percentiles(self.recent, (50, 95, 99))))}

    def cumulative(self) -> List[Tuple[str, int]]:
        """Prometheus buckets: ``(le, cumulative count)``, ending with ``+Inf``."""
        running, result = 0, []
        for bound, count in zip([*map(_float_label, self.bounds), "+Inf"], self.buckets):
            running += count
            result.append((bound, running))
        return result


def percentiles(samples: Iterable[float], qs: Sequence[int]) -> List[Optional[float]]:
    """The ``qs``-th percentiles of ``samples`` (in any order); ``None`` each when there are none.

    The one definition Governor uses, here and in the bench: ``statistics.quantiles(...,
    method="inclusive")``, which is numpy's default (``"linear"``): the value at rank
    ``q/100 * (n - 1)`` of the sorted samples, interpolated between its neighbours. The
    0th is the minimum, the 100th the maximum, and a single sample is every percentile.

    Args:
        samples: the samples.
        qs: whole percents, 0 to 100.

    Raises:
        ValueError: a ``q`` that is not a whole number from 0 to 100.
    """
    if any(not isinstance(q, int) or not 0 <= q <= 100 for q in qs):
        raise ValueError(f"percentiles are whole numbers from 0 to 100, got {list(qs)}")
    data = list(samples)
    if len(data) < 2:  # statistics.quantiles needs two points; one is every percentile
        return [data[0] if data else None for _ in qs]
    cuts = [min(data), *statistics.quantiles(data, n=100, method="inclusive"), max(data)]
    return [cuts[q] for q in qs]


def _float_label(value: float) -> str:
    return repr(float(value))


class MetricsRecorder:
    """Every figure of one supervisor. Any thread may record or read: each record and each
    read holds one short lock.

    Args:
        lane_gauges: returns lane name -> busy, idle, starting, spares_ready, worker_pids
            (any thread; ``{}`` before the lanes exist). Read live at snapshot time rather
            than published per task: gauges change with every task, and publishing them
            cost the manager time on every round trip.
    """

    def __init__(self, lane_gauges: Callable[[], Dict[str, Dict[str, Any]]] = dict) -> None:
        self._lock = threading.Lock()
        # (lane, step, state, submitted, dispatched, started, ended, peak RSS) per finished
        # task, not yet folded in: appended without the lock (a deque's append is atomic).
        self._finished: Deque[tuple] = collections.deque()
        self._outcomes: Dict[Tuple[str, str, str], int] = collections.Counter()
        self._histograms: Dict[Tuple[str, str, str], Histogram] = {}
        self._spawns: Dict[str, int] = collections.Counter()
        self._kills: Dict[Tuple[str, str], int] = collections.Counter()
        self._recycles: Dict[Tuple[str, str], int] = collections.Counter()
        self._redispatches: Dict[str, int] = collections.Counter()
        self._retries: Dict[Tuple[str, str], int] = collections.Counter()
        self._sandbox_denials: Dict[str, int] = collections.Counter()
        # What holds the pool lane's workers (see sandbox_applied): "none" until then, or without one.
        self._sandbox = "none"
        self._lane_gauges = lane_gauges

    # ------------------------------------------------------------ recording (any thread)

    def task_finished(self, task: Task) -> None:
        """Count a task's outcome and observe its timings (once, as it ends)."""
        self._finished.append((task.lane.value, task.step, task.state, task.submitted_at, task.dispatched_at,
                               task.started_at, task.ended_at, task.peak_rss_bytes))
        if len(self._finished) >= FOLD_AT:
            with self._lock:
                self._fold()

    def _fold(self) -> None:
        """Fold the finished tasks recorded so far into the figures (holding the lock)."""
        finished = self._finished
        # Only what is there now (the manager may append meanwhile), in the order recorded.
        rows = [finished.popleft() for _ in range(len(finished))]
        rows.sort(key=_BY_STEP)  # stable: each step's rows stay in order, for the reservoirs
        for (lane, step), group in itertools.groupby(rows, _BY_STEP):
            group = list(group)
            self._outcomes.update((lane, step, OUTCOMES[row[2]]) for row in group)
            for name, values in zip(_FOLDED, _figures(group)):
                if values:
                    histogram = self._histograms.get((name, lane, step))
                    if histogram is None:
                        histogram = self._histograms[(name, lane, step)] = Histogram(HISTOGRAMS[name][0])
                    histogram.observe_many(values)

    def worker_spawned(self, lane: Lane) -> None:
        with self._lock:
            self._spawns[lane.value] += 1

    def worker_killed(self, lane: Lane, reason: str) -> None:
        """Count a worker that died: ``reason`` is timeout, memory, cancel, crash or
        malformed (it sent what no worker sends)."""
        with self._lock:
            self._kills[(lane.value, reason)] += 1

    def task_retried(self, lane: Lane, step: str) -> None:
        """Count a failed attempt that will run again (``StepSpec.retries``)."""
        with self._lock:
            self._retries[(lane.value, step)] += 1

    def task_redispatched(self, lane: Lane) -> None:
        """Count a task whose worker died before it took the task, sent to another worker."""
        with self._lock:
            self._redispatches[lane.value] += 1

    def worker_recycled(self, lane: Lane, reason: str) -> None:
        """Count a worker replaced after a task: ``reason`` is leak, max_tasks or dirty."""
        with self._lock:
            self._recycles[(lane.value, reason)] += 1

    def sandbox_applied(self, label: str) -> None:
        """A pool worker reported what holds it (``SandboxReport.label``, e.g. ``"landlock-v7"``)."""
        with self._lock:
            self._sandbox = label

    def sandbox_denied(self, step: str) -> None:
        """Count a pool step's write that the sandbox refused (a ``ReadOnlyViolation``)."""
        with self._lock:
            self._sandbox_denials[step] += 1

    # ------------------------------------------------------------ reading (any thread)

    def histogram_buckets(self, name: str) -> Dict[Tuple[str, str], Tuple[List[Tuple[str, int]], float]]:
        """For one histogram, ``{(lane, step): (cumulative buckets, sum)}``."""
        with self._lock:
            self._fold()
            return {(lane, step): (histogram.cumulative(), histogram.sum)
                    for (kind, lane, step), histogram in self._histograms.items() if kind == name}

    def snapshot(self, queue_depth: Dict[str, int], key_depth: Optional[Dict[str, int]] = None) -> Dict[str, Any]:
        """Every figure as a JSON-serialisable dict.

        Args:
            queue_depth: tasks waiting per lane, as counted at submit (exact, unlike the
                manager's view, which lags by one inbox drain).
            key_depth: tasks waiting in the critical lane per lane key, for the
                :data:`TOP_KEYS` keys with the most (``StepSpec.key``).
        """
        with self._lock:
            self._fold()
            tasks: Dict[str, Dict[str, Dict[str, int]]] = {}
            for (lane, step, outcome), count in self._outcomes.items():
                tasks.setdefault(lane, {}).setdefault(step, {})[outcome] = count
            timings: Dict[str, Dict[str, Dict[str, Any]]] = {}
            for (name, lane, step), histogram in self._histograms.items():
                timings.setdefault(lane, {}).setdefault(step, {})[name] = histogram.summary()
            spawns, kills, recycles = dict(self._spawns), _nest(self._kills), _nest(self._recycles)
            redispatches, denials = dict(self._redispatches), dict(self._sandbox_denials)
            retries = _nest(self._retries)
            sandbox = self._sandbox
        lanes = self._lane_gauges()
        memory = memory_figures(pid for state in lanes.values() for pid in state["worker_pids"])
        return {
            "tasks": tasks,
            "timings": timings,
            "queue_depth": dict(queue_depth),
            "critical_queue_by_key": dict(key_depth or {}),
            "in_flight": {lane: state["busy"] for lane, state in lanes.items()},
            "workers": {lane: {key: state[key] for key in ("busy", "idle", "starting")}
                        for lane, state in lanes.items()},
            "warm_spares": {lane: state["spares_ready"] for lane, state in lanes.items()},
            "memory": memory,
            "worker_spawns": spawns,
            "worker_kills": kills,
            "worker_recycles": recycles,
            "redispatched": redispatches,
            "retries": retries,
            "sandbox": {"pool": sandbox},
            "sandbox_denials": denials,
        }


def memory_figures(worker_pids: Iterable[int]) -> Dict[str, int]:
    """The supervisor's RSS, and the summed RSS of its workers (the additional memory)."""
    total = 0
    for pid in worker_pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return {"supervisor_rss_bytes": psutil.Process().memory_info().rss, "workers_rss_bytes": total}


def _nest(counter: Dict[Tuple[str, str], int]) -> Dict[str, Dict[str, int]]:
    nested: Dict[str, Dict[str, int]] = {}
    for (lane, reason), count in counter.items():
        nested.setdefault(lane, {})[reason] = count
    return nested


class PrometheusCollector:
    """Builds Prometheus families from a snapshot at scrape time (prometheus_client's custom
    collector protocol), so recording never touches prometheus_client."""

    def __init__(self, recorder: MetricsRecorder, queue_depth: Callable[[], Dict[str, int]],
                 key_depth: Callable[[], Dict[str, int]]) -> None:
        self._recorder = recorder
        self._queue_depth = queue_depth
        self._key_depth = key_depth

    def collect(self):
        snapshot = self._recorder.snapshot(self._queue_depth(), self._key_depth())
        yield _family(CounterMetricFamily, "governor_tasks", "Tasks that ended, by lane, step and outcome.",
                      ("lane", "step", "outcome"), snapshot["tasks"])
        for name, (_, help_text) in HISTOGRAMS.items():
            family = HistogramMetricFamily(f"governor_task_{name}", help_text, labels=("lane", "step"))
            for (lane, step), (buckets, total) in sorted(self._recorder.histogram_buckets(name).items()):
                family.add_metric((lane, step), buckets, total)
            yield family
        for kind, name, help_text, labels, values in (
                (GaugeMetricFamily, "governor_queue_depth", "Tasks waiting in the lane's queue.",
                 ("lane",), snapshot["queue_depth"]),
                (GaugeMetricFamily, "governor_critical_queue_depth_by_key",
                 f"Tasks waiting in the critical lane, for the {TOP_KEYS} lane keys with the most.",
                 ("key",), snapshot["critical_queue_by_key"]),
                (GaugeMetricFamily, "governor_tasks_in_flight", "Tasks running in the lane's workers.",
                 ("lane",), snapshot["in_flight"]),
                (GaugeMetricFamily, "governor_warm_spares", "Idle warm workers ready to replace a lost one.",
                 ("lane",), snapshot["warm_spares"]),
                (GaugeMetricFamily, "governor_workers", "Worker processes by lane and state.",
                 ("lane", "state"), snapshot["workers"]),
                (CounterMetricFamily, "governor_worker_spawns", "Worker processes started.",
                 ("lane",), snapshot["worker_spawns"]),
                (CounterMetricFamily, "governor_worker_kills",
                 "Workers that died: killed for a timeout, memory or cancel, or crashed.",
                 ("lane", "reason"), snapshot["worker_kills"]),
                (CounterMetricFamily, "governor_worker_recycles", "Healthy workers replaced (leak, max_tasks).",
                 ("lane", "reason"), snapshot["worker_recycles"]),
                (CounterMetricFamily, "governor_sandbox_denials",
                 "Pool steps' writes the read-only sandbox refused (ReadOnlyViolation).",
                 ("step",), snapshot["sandbox_denials"])):
            yield _family(kind, name, help_text, labels, values)
        sandbox = GaugeMetricFamily("governor_sandbox_info", "What holds the lane's workers (1 for the label).",
                                    labels=("lane", "sandbox"))
        for lane, label in snapshot["sandbox"].items():
            sandbox.add_metric((lane, label), 1)
        yield sandbox
        yield GaugeMetricFamily("governor_supervisor_rss_bytes", "RSS of the supervisor process.",
                                value=snapshot["memory"]["supervisor_rss_bytes"])
        yield GaugeMetricFamily("governor_workers_rss_bytes", "Summed RSS of every worker process.",
                                value=snapshot["memory"]["workers_rss_bytes"])


def _family(kind: type, name: str, help_text: str, labels: Tuple[str, ...], nested: Dict[str, Any]):
    """A metric family with one sample per leaf of ``nested`` (keyed by the label values)."""
    family = kind(name, help_text, labels=labels)
    for label_values, value in _leaves(nested, len(labels)):
        family.add_metric(label_values, value)
    return family


def _leaves(nested: Dict[str, Any], depth: int, prefix: Tuple[str, ...] = ()):
    for key, value in nested.items():
        if depth == 1:
            yield (*prefix, key), value
        else:
            yield from _leaves(value, depth - 1, (*prefix, key))


def prometheus_registry(recorder: MetricsRecorder, queue_depth: Callable[[], Dict[str, int]],
                        key_depth: Callable[[], Dict[str, int]]) -> CollectorRegistry:
    """A registry of one supervisor's metrics (never the global default registry)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PrometheusCollector(recorder, queue_depth, key_depth))
    return registry


def prometheus_text(registry: CollectorRegistry) -> str:
    """The Prometheus text exposition of ``registry``."""
    return generate_latest(registry).decode("utf-8")
