"""The live picture of a running daemon, for ``governor top`` and the status page (issue 15).

Data flow::

    task future done ──> Daemon._task_done (loop thread) ──> LiveModel.task_ended(record_id, future)
                                                              ring of ends: kills, per-step windows, series
    `live` request / page tick ──> LiveModel.snapshot(supervisor, journal)
                                     supervisor.metrics()           lanes: queue depth, in flight, spares
                                     supervisor.describe_workers()  workers: pid, step, running time, RSS, limits
                                     journal.recent()               recent tasks and their states
                                     the ring                       kills and crashes, throughput, p50/p95

Everything shown is what the supervisor and the journal report; the ring only keeps what the
daemon saw end. The model belongs to the daemon's event loop thread: ``task_ended`` and
``snapshot`` run there (the supervisor calls go through the default executor, as the
daemon's ``workers`` and ``metrics`` ops do).

This module stays light (attrs only): the CLI imports it for the ``serve`` options.
"""

from __future__ import annotations

import asyncio
import collections
import importlib.util
import ipaddress
import math
import os
import time
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Tuple

import attrs
import click

from governor.errors import HttpAddressError
from governor.task import TaskState

#: Version of the snapshot's shape; a viewer refuses a snapshot of another version.
SNAPSHOT_VERSION = 1

#: Per-step throughput and p50/p95 are taken over the tasks that ended in this window.
WINDOW_S = 60.0

#: The charts: one point per bucket, this many buckets (10 minutes). A shorter bucket draws a
#: finer chart but makes each point's quantiles rest on fewer tasks.
SERIES_BUCKET_S = 5.0
SERIES_BUCKETS = 120

#: The most task ends kept for the window and the charts. At this many the oldest go first,
#: so under a very high rate the window covers less than WINDOW_S; the snapshot says how
#: much it covers (``window_s``) rather than pretend.
MAX_ENDS = 20_000

#: Kills and crashes kept for the list, newest first.
MAX_KILLS = 50

#: Recent tasks in a snapshot (journal rows, newest first). More costs every viewer bytes
#: several times a second; the journal keeps them all for ``governor status``.
RECENT_TASKS = 40

#: The end states that mean a worker was killed or died under a task.
_KILL_STATES = {TaskState.TIMED_OUT: "timeout", TaskState.OVER_MEMORY: "memory", TaskState.CRASHED: "crash"}


@attrs.frozen
class TaskEnd:
    """One step that ended, as the supervisor recorded it (times on its monotonic clock)."""

    task_id: int  # the daemon's id (the journal row); a workflow's steps share their workflow's
    step: str
    lane: str
    state: str
    ended_at: float
    latency_s: float  # submit to end: queue_s + run_s, as the caller waited
    queue_s: float  # submit to dispatch (to the end, for a task that never left the queue)
    run_s: Optional[float]  # in a worker; None when it never reached one

    @classmethod
    def of(cls, task_id: int, task: Any) -> "TaskEnd":
        """The end of ``task`` (which has ended), its latency split as the metrics split it."""
        left_queue = task.dispatched_at if task.dispatched_at is not None else task.ended_at
        started = task.started_at if task.started_at is not None else task.dispatched_at
        return cls(task_id, task.step, task.lane.value, task.state.value, task.ended_at,
                   max(0.0, task.ended_at - task.submitted_at), max(0.0, left_queue - task.submitted_at),
                   None if started is None else max(0.0, task.ended_at - started))


@attrs.frozen
class Kill:
    """A worker killed (timeout, memory, cancel) or dead (crash) under a task.

    ``limit`` and ``observed`` are the figures the supervisor's error carries, with their
    unit (``s`` or ``MiB``); a crash has no limit, and its ``observed`` is how it ended.
    """

    task_id: int
    step: str
    lane: str
    reason: str
    limit: Optional[str]
    observed: Optional[str]
    pid: Optional[int]
    at: float  # wall clock, for display
    message: str

    @classmethod
    def from_task(cls, task_id: int, task: Any, wall_now: float) -> Optional["Kill"]:
        """The kill behind ``task``'s end, or ``None`` if its worker survived it."""
        error = task.error
        reason = _KILL_STATES.get(task.state)
        limit = observed = None
        if task.state is TaskState.TIMED_OUT:
            limit, observed = _figure(error.limit_s, "s"), _figure(error.elapsed_s, "s")
        elif task.state is TaskState.OVER_MEMORY:
            if not error.killed:
                return None  # refused by the address-space cap: the worker lived on
            limit, observed = _figure(error.limit_mb, "MiB"), _figure(error.peak_mb, "MiB")
        elif task.state is TaskState.CRASHED:
            observed = (f"signal {error.signal}" if error.signal is not None
                        else f"exit code {error.exitcode}" if error.exitcode is not None else "unknown")
        elif task.state is TaskState.CANCELLED and getattr(error, "killed", False):
            reason = "cancel"
            limit = _figure(task.limits.effective_cancel_grace_s, "s grace")
            observed = error.reason if error.detail is None else f"{error.reason}: {error.detail}"
        if reason is None:
            return None
        return cls(task_id, task.step, task.lane.value, reason, limit, observed,
                   getattr(error, "pid", None) or task.pid, wall_now, str(error))


def _split_quantiles(ends: List[TaskEnd]) -> Dict[str, Optional[float]]:
    """p50 and p95 of the latency (``p50_s``, ``p95_s``: submit to end) and of its two parts,
    the wait in the queue (``queue_p50_s``...) and the run in a worker (``run_p50_s``...)."""
    figures: Dict[str, Optional[float]] = {}
    for prefix, values in (("", [end.latency_s for end in ends]), ("queue_", [end.queue_s for end in ends]),
                           ("run_", [end.run_s for end in ends if end.run_s is not None])):
        values.sort()
        figures[f"{prefix}p50_s"], figures[f"{prefix}p95_s"] = _quantile(values, 0.5), _quantile(values, 0.95)
    return figures


def _figure(value: Optional[float], unit: str) -> Optional[str]:
    return None if value is None else f"{value:.4g} {unit}"


def _quantile(ordered: List[float], q: float) -> Optional[float]:
    """Nearest-rank quantile (as ``governor.engine.metrics`` uses), ``None`` for no samples."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class LiveModel:
    """The ring of recent ends and kills behind the live views; owned by the daemon's loop thread.

    Args:
        clock: the supervisor's clock (``time.monotonic``), which stamps its tasks.
        wall_clock: for the times shown.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self._clock, self._wall_clock = clock, wall_clock
        self._born = clock()
        self._ends: Deque[TaskEnd] = collections.deque(maxlen=MAX_ENDS)
        self._kills: Deque[Kill] = collections.deque(maxlen=MAX_KILLS)

    def task_ended(self, task_id: int, future: Any) -> None:
        """Record the steps behind a finished daemon task (one, or a workflow's)."""
        for task in _tasks_of(future):
            if task.ended_at is None:
                continue  # skipped or dropped before it ran: no latency to show
            self._ends.append(TaskEnd.of(task_id, task))
            kill = Kill.from_task(task_id, task, self._wall_clock())
            if kill is not None:
                self._kills.appendleft(kill)

    def figures(self) -> Dict[str, Any]:
        """Kills, per-step figures over the window and the chart series, from the ring."""
        now, wall_now = self._clock(), self._wall_clock()
        window = [end for end in self._ends if end.ended_at >= now - WINDOW_S]
        # The window covers less than WINDOW_S just after a start, or once the ring dropped
        # ends the window still needs: the rates are over what it covers, and it says how much.
        covered = min(WINDOW_S, now - self._born)
        if len(self._ends) == MAX_ENDS:
            covered = min(covered, now - self._ends[0].ended_at)
        per_step: Dict[Tuple[str, str], List[TaskEnd]] = collections.defaultdict(list)
        for end in window:
            per_step[(end.step, end.lane)].append(end)
        steps = []
        for (step, lane), ends in sorted(per_step.items()):
            steps.append({"step": step, "lane": lane, "count": len(ends),
                          "per_s": len(ends) / covered if covered > 0 else None,
                          **_split_quantiles(ends)})
        return {"window_s": covered, "steps": steps, "kills": [attrs.asdict(kill) for kill in self._kills],
                "series": self._series(now, wall_now)}

    def _series(self, now: float, wall_now: float) -> Dict[str, Any]:
        """One point per bucket over the last SERIES_BUCKETS buckets, oldest first, buckets aligned
        on the wall clock so that successive snapshots agree on them."""
        newest = math.floor(wall_now / SERIES_BUCKET_S)
        buckets: Dict[int, List[float]] = collections.defaultdict(list)
        for end in self._ends:
            index = math.floor((wall_now - (now - end.ended_at)) / SERIES_BUCKET_S)
            if index > newest - SERIES_BUCKETS:
                buckets[index].append(end.latency_s)
        points = []
        for index in range(newest - SERIES_BUCKETS + 1, newest + 1):
            latencies = sorted(buckets.get(index, ()))
            points.append({"t": index * SERIES_BUCKET_S, "count": len(latencies),
                           "p50_s": _quantile(latencies, 0.5), "p95_s": _quantile(latencies, 0.95)})
        return {"bucket_s": SERIES_BUCKET_S, "points": points}

    async def snapshot(self, supervisor: Any, journal: Any) -> Dict[str, Any]:
        """The whole picture as one JSON object (see the module docstring for its sources)."""
        loop = asyncio.get_running_loop()
        metrics = await loop.run_in_executor(None, supervisor.metrics)
        workers = await loop.run_in_executor(None, supervisor.describe_workers)
        recent = [record.to_wire(summary=True) for record in journal.recent(RECENT_TASKS)]
        return {"version": SNAPSHOT_VERSION, "at": self._wall_clock(), "daemon_pid": os.getpid(),
                "lanes": _lanes(metrics), "workers": [_worker(worker) for worker in workers],
                "tasks": recent, "memory": metrics["memory"], "worker_kills": metrics["worker_kills"],
                "critical_keys": [{"key": key, "queued": queued}
                                  for key, queued in metrics["critical_queue_by_key"].items()],
                **self.figures()}


def _tasks_of(future: Any) -> Iterable[Any]:
    steps = getattr(future, "steps", None)  # a WorkflowFuture: each step's own task
    return [step.task for step in steps] if steps is not None else [future.task]


def _lanes(metrics: Dict[str, Any]) -> List[Dict[str, Any]]:
    names = sorted(set(metrics["workers"]) | set(metrics["queue_depth"]))
    return [{"lane": lane, "queue_depth": metrics["queue_depth"].get(lane, 0),
             "in_flight": metrics["in_flight"].get(lane, 0), "warm_spares": metrics["warm_spares"].get(lane, 0),
             "workers": metrics["workers"].get(lane, {})} for lane in names]


def _worker(worker: Dict[str, Any]) -> Dict[str, Any]:
    """A worker as the live views show it. Its ``task_id`` is already the daemon's (the
    journal's, ``Task.public_id``): one id per task everywhere; the step's own tag is not shown."""
    return {key: value for key, value in worker.items() if key != "tag"}


# --------------------------------------------------------------------------- the HTTP page's settings

#: ``governor serve --http-addr`` default port (the page is off unless the flag is given).
DEFAULT_HTTP_PORT = 8765


@attrs.frozen
class HttpConfig:
    """Where and how the daemon serves its status page.

    Attributes:
        host, port: the address to bind (port 0: any free port).
        allow_cancel: the page may cancel tasks (``POST /api/cancel``); read-only otherwise.
        token: the secret every request must present; ``None`` draws a fresh one per start.
    """

    host: str
    port: int
    allow_cancel: bool = False
    token: Optional[str] = None

    @classmethod
    def parse(cls, address: str, allow_remote: bool = False, allow_cancel: bool = False,
              token: Optional[str] = None) -> "HttpConfig":
        """Build from ``HOST:PORT`` (``[::1]:PORT`` for IPv6).

        Raises:
            HttpAddressError: malformed, or a host other than loopback without ``allow_remote``:
                the page shows step parameters, and a token alone should not be all that
                stands between them and the network.
        """
        host, _, port = address.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise HttpAddressError(f"expected HOST:PORT, got {address!r}")
        if not allow_remote and not _is_loopback(host):
            raise HttpAddressError(f"{host} is not a loopback address; pass --http-allow-remote to serve the "
                                   "status page beyond this host")
        return cls(host, int(port), allow_cancel, token)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it could resolve anywhere


def http_options(command: Callable) -> Callable:
    """The ``serve`` options of the status page (declared here so cli.py stays a few lines)."""
    options = [
        click.option("--http-addr", default=None, metavar="HOST:PORT",
                     help=f"Serve the live status page, its JSON and /metrics here (e.g. "
                          f"127.0.0.1:{DEFAULT_HTTP_PORT}); needs the live extra. Loopback only unless "
                          "--http-allow-remote. Prints a URL with the access token at start."),
        click.option("--http-allow-remote", is_flag=True,
                     help="Let --http-addr be a non-loopback address (the token still guards every request)."),
        click.option("--http-allow-cancel", is_flag=True,
                     help="Let the status page cancel tasks (read-only without it)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def http_config_from_options(http_addr: Optional[str], http_allow_remote: bool,
                             http_allow_cancel: bool) -> Optional[HttpConfig]:
    """The :class:`HttpConfig` the ``serve`` options ask for, or ``None`` without ``--http-addr``."""
    if http_addr is None:
        if http_allow_remote or http_allow_cancel:
            raise click.BadParameter("needs --http-addr", param_hint="--http-allow-remote/--http-allow-cancel")
        return None
    if importlib.util.find_spec("aiohttp") is None:  # refuse before the daemon starts anything
        raise click.BadParameter("the status page needs the live extra: pip install 'governor[live]'",
                                 param_hint="--http-addr")
    try:
        return HttpConfig.parse(http_addr, http_allow_remote, http_allow_cancel)
    except HttpAddressError as error:
        raise click.BadParameter(str(error), param_hint="--http-addr") from None
