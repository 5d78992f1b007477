"""Code that runs inside a Ray worker for the Ray pool lane (see ``governor.engine.ray_lane``).

Data flow for one task::

    Ray ──> run(link, steps, task_id, step, args, kwargs, limits) ──> Outcome ──> Ray
              │
              ├─ link to the supervisor (TCP, once per Ray worker and supervisor):
              │    up:   hello {token, pid, node}, ["running", task_id, pid], ["over_memory", task_id, peak]
              │    up:   ["standing_by", hold_id, pid] (the lane's warm spare)
              │    down: ["cancel", task_id, reason, detail], ["kill", task_id], ["release", hold_id]
              └─ memory watchdog thread (only with a memory limit): samples this worker's
                 process tree every 10 ms, reports a breach up the link, then kills the tree

It mirrors the local lane's worker (``governor.workers.worker``), whose step runner it reuses: the
same context, cooperative cancel, hard cap and memory figures. What differs is who kills.
A local worker is killed by the supervisor next to it; a Ray worker may be on another
host, so it kills itself, its whole process tree first, when the supervisor says so
(``kill``), when its memory breaks the limit, or when the supervisor is gone. The
supervisor's ``ray.cancel(force=True)`` backs this up, but Ray kills only the worker and its
direct children; a daemonised grandchild would outlive it.

Messages are JSON (never pickle: the link is a socket), framed by
``multiprocessing.connection``. The link authenticates with the supervisor's token.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from multiprocessing.connection import Client, Connection
from typing import Any, Dict, Optional, Tuple

import attrs

from governor import context as _context
from governor.workers import messages, worker
from governor.workers.proctree import MEMORY_SAMPLE_INTERVAL_S, TreeSampler, kill_own_tree


@attrs.frozen
class LinkInfo:
    """How a Ray worker reaches its supervisor: address, the shared token, and the key of
    the supervisor's step table in this worker's cache."""

    host: str
    port: int
    token: str
    steps_key: str


@attrs.frozen
class TaskLimits:
    """The limits the worker side enforces for one task."""

    max_memory_mb: Optional[float]
    hard_cap_mb: Optional[float]


#: The GIL switch interval while a step runs (Python's default is 5 ms). A step spinning in
#: Python holds the GIL, and the link thread and the watchdog get it back only when the
#: interval runs out, once per blocking call they make: a kill's process scan makes a few
#: hundred /proc reads, which took over a second at 5 ms (measured), and well under 100 ms at
#: this value. It costs the step nothing while no other thread wants the GIL.
STEP_SWITCH_INTERVAL_S = 0.0002

#: The switch interval while this worker kills itself (see :func:`_kill_self`).
KILL_SWITCH_INTERVAL_S = 0.00001


class _Link:
    """This worker's connection to one supervisor, and the thread that reads it."""

    def __init__(self, info: LinkInfo):
        self.connection: Connection = Client((info.host, info.port), family="AF_INET")
        self.steps_key = info.steps_key
        self._holds = threading.Condition()
        self._released: set = set()
        self._gone = False
        self._send_lock = threading.Lock()
        self.send({"token": info.token, "pid": os.getpid(), "node": socket.gethostname()})
        threading.Thread(target=self._read, name="governor-ray-link", daemon=True).start()

    def send(self, message: Any) -> None:
        with self._send_lock:
            self.connection.send_bytes(json.dumps(message).encode())

    def _read(self) -> None:
        while True:
            try:
                kind, task_id, *rest = json.loads(self.connection.recv_bytes())
            except (EOFError, OSError):
                self._supervisor_gone()
                return
            if kind == "cancel":
                worker.deliver_cancel(task_id, *rest)
            elif kind == "release":
                with self._holds:
                    self._released.add(task_id)
                    self._holds.notify_all()
            elif kind == "kill" and _running_task() == task_id:
                _kill_self()

    def _supervisor_gone(self) -> None:
        # A step of a supervisor that is gone must not run on: nobody would take its
        # result, and nobody could stop it. Another supervisor's step is none of ours.
        with _links_lock:
            for key, link in list(_links.items()):
                if link is self:
                    del _links[key]
            _steps.pop(self.steps_key, None)
        with self._holds:
            self._gone = True
            self._holds.notify_all()
        if _running_task() is not None and _running_link is self:
            _kill_self()

    def hold(self, hold_id: int, timeout: Optional[float] = None) -> None:
        """Block until the supervisor releases hold ``hold_id``, is gone, or ``timeout`` passes."""
        with self._holds:
            self._holds.wait_for(lambda: hold_id in self._released or self._gone, timeout)


def _kill_self() -> None:
    """Kill this worker's process tree, then this worker (never returns).

    The scan for descendants reads /proc a few hundred times, and a step spinning in
    Python takes the GIL back after each read: with the switch interval at its floor,
    each hand-back costs microseconds instead of the interval.
    """
    sys.setswitchinterval(KILL_SWITCH_INTERVAL_S)
    kill_own_tree()


_links: Dict[Tuple[str, int], _Link] = {}
_links_lock = threading.Lock()
_steps: Dict[str, Dict[str, Any]] = {}
_running_link: Optional[_Link] = None


def _running_task() -> Optional[int]:
    return _context.current_context().task_id


def _link_to(info: LinkInfo) -> _Link:
    with _links_lock:
        link = _links.get((info.host, info.port))
        if link is None:
            link = _links[(info.host, info.port)] = _Link(info)
        return link


#: The hold the supervisor's warm-up tasks wait on (each standby gets a hold of its own).
WARM_UP_HOLD = 0


def check(info: LinkInfo, steps: list, hold_s: float) -> int:
    """The warm-up task: load the step table and link up, as a first step would, then hold
    this worker (up to ``hold_s``) until the supervisor releases :data:`WARM_UP_HOLD`; the pid."""
    _table(info, steps)
    link = _link_to(info)
    if hold_s:
        link.hold(WARM_UP_HOLD, hold_s)
    return os.getpid()


def standby(info: LinkInfo, steps: list, hold_id: int) -> int:
    """The lane's warm spare: a worker that has loaded the steps and linked up, held idle
    until the supervisor releases it (a worker died, so the next step finds it free)."""
    _table(info, steps)
    link = _link_to(info)
    link.send(["standing_by", hold_id, os.getpid()])
    link.hold(hold_id)
    return os.getpid()


def _table(info: LinkInfo, steps: list) -> Dict[str, Any]:
    table = _steps.get(info.steps_key)
    if table is None:
        import ray  # only ever imported inside a Ray worker
        table = _steps[info.steps_key] = ray.get(steps[0])
    return table


def run(info: LinkInfo, steps: list, task_id: int, step: str, args: tuple, kwargs: dict,
        limits: TaskLimits, chunk: bool = False) -> messages.Outcome:
    """The Ray task: run one step for the supervisor that ``info`` names.

    ``steps`` is a one-element list holding the ``ObjectRef`` of the supervisor's step
    table: inside a list, Ray passes the reference instead of fetching the table for
    every task, and the table is fetched once per worker. ``chunk``: ``args`` holds one
    argument tuple per call (``Supervisor.map``).
    """
    global _running_link
    table = _table(info, steps)
    link = _link_to(info)
    _running_link = link
    link.send(["running", task_id, os.getpid()])
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(STEP_SWITCH_INTERVAL_S)
    watchdog = _Watchdog(link, task_id, limits.max_memory_mb) if limits.max_memory_mb else None
    try:
        outcome = worker.run_step(table[step], task_id, step, args, kwargs, limits.hard_cap_mb, chunk)
    finally:
        _running_link = None
        sys.setswitchinterval(switch_interval)
        if watchdog is not None:
            watchdog.stop()
    if watchdog is not None and watchdog.peak_bytes > (outcome.peak_rss_bytes or 0):
        outcome = outcome._replace(peak_rss_bytes=watchdog.peak_bytes)
    return outcome



def entry(kind: str, *args: Any) -> Any:
    """The one function the lane submits to Ray: :func:`check`, :func:`standby` or
    :func:`run`, by ``kind``, with ``args``.

    One function, so that Ray exports its definition to the cluster once per job, from the
    first warm-up task, on the thread that starts the supervisor. The first ``.remote()``
    of a function Ray has not exported yet makes synchronous calls to the GCS; made on the
    manager thread, they would hold up every timer, kill and dispatch of both lanes for as
    long as the GCS takes to answer.
    """
    return _ENTRIES[kind](*args)


_ENTRIES = {"check": check, "standby": standby, "run": run}

class _Watchdog:
    """Samples this worker's process tree while one task runs; over the limit, it reports
    the breach to the supervisor and kills the tree (this worker included)."""

    def __init__(self, link: _Link, task_id: int, limit_mb: float):
        self._link, self._task_id = link, task_id
        self._limit_bytes = int(limit_mb * 2 ** 20)
        self._sampler = TreeSampler(os.getpid())
        self._stopped = threading.Event()
        self.peak_bytes = 0
        self._thread = threading.Thread(target=self._watch, name="governor-ray-watchdog", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stopped.wait(MEMORY_SAMPLE_INTERVAL_S):
            rss = self._sampler.rss_bytes()
            self.peak_bytes = max(self.peak_bytes, rss)
            # Confirm with a second read, as the local lane does: a transient figure, or a
            # step that just finished and freed its memory, is no breach.
            if rss <= self._limit_bytes or self._stopped.is_set() or self._sampler.rss_bytes() <= self._limit_bytes:
                continue
            try:
                self._link.send(["over_memory", self._task_id, self.peak_bytes])
            except OSError:
                pass  # the supervisor is gone; the kill is due all the same
            _kill_self()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()
