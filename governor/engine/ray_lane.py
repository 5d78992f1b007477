"""The pool lane on a Ray cluster: a lane backend (``governor.engine.backend``), like ``governor.engine.lanes``.

With ``Supervisor(registry, backend="ray")`` the critical lane stays local and serial, and
pool-lane steps run as Ray tasks (``governor.workers.ray_worker.run``, through its ``entry``), at
most ``workers`` at a time. Every promise of the local lane holds, by the same means where
Ray has none:

* **Timeouts, cancels, scopes.** Each Ray worker keeps a link (TCP, JSON frames, a shared
  token) to the supervisor, like a local worker's control socket. ``running`` comes up it
  when a step starts (the timeout counts from there); a cancel goes down it (the step's
  context flag, then a kill after ``cancel_grace_s``); a kill goes down it and the worker
  kills its own process tree, daemonised grandchildren included. ``ray.cancel(force=True)``
  backs the kill up after :data:`FORCE_CANCEL_AFTER_S`, and removes a task Ray has not
  started yet.
* **Memory.** Ray has no per-task cap (``memory=`` only guides placement). A watchdog
  thread in the task's wrapper samples the worker's process tree every 10 ms; over the
  limit it reports the peak up the link and kills the tree. The hard cap works, loosely
  (a Ray worker has address space reserved that RSS can grow into unseen by the cap).
* **Crashes.** Tasks are submitted with ``max_retries=0``: a worker that dies fails its one
  task as ``WorkerCrashed`` (Ray does not say how the worker ended, so ``exitcode`` and
  ``signal`` are ``None``), and Ray retries nothing behind our back. A task whose worker
  died before its step started is submitted again: it never ran.
* **A warm spare.** With ``spares``, one Ray task holds a linked worker idle ("standby")
  and is released when a worker dies, so the next step need not wait for Ray to start one.

Only the manager thread touches this object's state. The link acceptor thread and Ray's
callback threads only ``call_soon`` on the manager.
"""

from __future__ import annotations

import concurrent.futures
import enum
import functools
import hmac
import itertools
import json
import logging
import secrets
import select
import selectors
import socket
import struct
import threading
import uuid
from multiprocessing.connection import Connection, wait as wait_for_connections
from typing import Any, Dict, List, Mapping, Optional

import attrs
import psutil

from governor.workers import ray_worker
from governor.engine.queues import RankedQueue
from governor.engine.backend import worker_view
from governor.errors import (BackendUnavailable, InvalidTransition, MemoryLimitExceeded, StepFailed, StepTimeout,
                             WorkerCrashed, WorkerStartFailed)
from governor.workers.frames import Frames
from governor.limits import Lane
from governor.logs import log_death
from governor.workers.proctree import mib, wait_dead
from governor.task import KillOrder, Task, TaskState
from governor.engine.timers import Timers

log = logging.getLogger("governor")

#: How long after asking a Ray worker to kill its own tree the supervisor has Ray kill it.
#: The worker's own kill takes about 35 ms (a scan of /proc); this only fires if its link
#: thread cannot run (C code holding the GIL) or the link is broken.
FORCE_CANCEL_AFTER_S = 1.0

#: How long a task cancelled before it started may take to say it started (then it is
#: cancelled as a running step) before Ray is told to drop it from its queue.
UNSTARTED_CANCEL_AFTER_S = 0.5

#: How long a killed worker on this host may take to be seen dead after its link closed
#: before its task ends anyway (SIGKILL is not refusable: this only bounds a stuck exit).
KILL_CONFIRM_S = 2.0

#: How often the lane looks again for a killed worker's death (see ``_end_killed``).
REAP_POLL_S = 0.002

#: How many times a task whose Ray worker died before the step started is submitted again.
UNSTARTED_RETRIES = 3

#: How long a new link may take to say hello before it is dropped.
HELLO_TIMEOUT_S = 5.0

#: How long ``connect`` waits for a first task to run through the wrapper on the cluster.
WARM_UP_TIMEOUT_S = 120.0

#: How long ``connect`` waits for Ray to start the workers it warms up (best effort).
WARM_WAIT_S = 10.0

_ACCEPT_POLL_S = 0.1


def _timeval(seconds: float) -> bytes:
    """A ``struct timeval`` for SO_RCVTIMEO."""
    return struct.pack("@ll", int(seconds), int((seconds % 1) * 1_000_000))


def import_ray():
    """Import Ray, or say which extra installs it."""
    try:
        import ray
    except ImportError as exc:
        raise BackendUnavailable(
            "the Ray backend needs Ray: pip install 'governor[ray]' (or pip install -e '.[ray]')") from exc
    return ray


@functools.lru_cache(maxsize=None)
def entry_function(ray: Any) -> Any:
    """This process's one Ray remote function, ``ray_worker.entry``, shared by every
    supervisor: Ray exports it once per job (see ``ray_worker.entry``)."""
    return ray.remote(ray_worker.entry)


class RayTimer(enum.Enum):
    """What a timer of the Ray lane is for (its entries' kind)."""

    TIMEOUT = "timeout"  # the step ran past its timeout_s
    GRACE = "grace"  # a cancelled step had its grace: kill it
    FORCE = "force"  # the worker did not kill itself: ray.cancel(force=True)
    UNSTARTED = "unstarted"  # a task cancelled before it started: have Ray drop it
    REAP = "reap"  # look again whether a killed worker on this host is dead


@attrs.frozen
class RayConfig:
    """How the pool lane reaches Ray.

    Attributes:
        address: a Ray cluster to join (``"auto"``, ``"ray://..."``, ``"host:port"``), or
            ``None`` to use the Ray the process already initialised, else to start a
            private local node on 127.0.0.1 with the dashboard off.
        task_options: extra ``.options()`` for every task (``num_cpus``, ``resources``,
            ``runtime_env`` ...). The lane owns ``max_retries`` (always 0),
            ``retry_exceptions`` and ``name``: giving them is an error.
        callback_host: the address of this host that Ray workers connect back to; by
            default 127.0.0.1 for a private node, else this host's address as Ray sees it.
    """

    address: Optional[str] = None
    task_options: Mapping[str, Any] = attrs.field(factory=dict, converter=dict)
    callback_host: Optional[str] = None

    @task_options.validator
    def _lane_owned_options_are_not_given(self, attribute, value) -> None:
        owned = sorted(set(value) & {"max_retries", "retry_exceptions", "name"})
        if owned:
            raise ValueError(f"ray_options may not set {', '.join(owned)}: the lane sets them (a task is never "
                             "retried by Ray: a step must not run twice behind the supervisor's back)")


@attrs.define(eq=False)
class RayRun:
    """One pool task handed to Ray, as the manager sees it."""

    task: Task
    ref: Any = None
    future: Optional[concurrent.futures.Future] = None
    attempts: int = 0
    link: Optional["RayLink"] = None
    kill: Optional[KillOrder] = None
    kill_deadline: Optional[float] = None


@attrs.define(eq=False)
class Standby:
    """The lane's warm spare: a Ray task holding a linked worker idle until released."""

    hold_id: int
    ref: Any
    future: concurrent.futures.Future
    link: Optional["RayLink"] = None


@attrs.define(eq=False)
class RayLink:
    """One Ray worker's connection to this supervisor."""

    connection: Connection
    pid: int
    node: str
    frames: Frames = attrs.field(factory=Frames)  # what has come of its messages so far


class RayLane:
    """The pool lane as Ray tasks: a ``governor.engine.backend.LaneBackend``.

    Args:
        host: the manager (a ``governor.engine.backend.LaneHost``).
        workers: Ray tasks in flight at most.
        steps: the supervisor's step table (shipped to the cluster once).
        spares: with 1 or more, the lane keeps one warm Ray worker standing by (see
            :meth:`maintain`), which Ray counts as one more task in flight.
    """

    lanes = (Lane.POOL,)
    warm = True  # by the end of connect()

    def __init__(self, host: Any, config: RayConfig, workers: int, steps: Dict[str, Any], spares: int):
        self._host, self._config, self.workers, self._steps, self._spares = host, config, workers, steps, spares
        self._metrics, self._clock = host.metrics, host.clock
        self._timers = Timers(host.clock)
        self._queue = RankedQueue()
        self._runs: Dict[int, RayRun] = {}
        self._links: Dict[int, RayLink] = {}
        self._remote: Dict[str, Any] = {}
        self._ray = None
        self._owns_ray = False
        self._listener: Optional[socket.socket] = None
        self._acceptor: Optional[threading.Thread] = None
        self._stop_accepting = threading.Event()
        self._token = secrets.token_hex(32)
        self._info: Optional[ray_worker.LinkInfo] = None
        self._steps_ref = None
        self._standby: Optional[Standby] = None
        self._hold_ids = itertools.count(ray_worker.WARM_UP_HOLD + 1)
        self._published = (0, (), 0)
        self._linked = threading.Condition()
        self._early_links: Optional[List[RayLink]] = []

    # ----------------------------------------------------------------- life (caller thread)

    def connect(self) -> None:
        """Join (or start) Ray, open the link listener, ship the steps, run one warm-up task.

        Raises:
            BackendUnavailable: Ray is not installed.
            WorkerStartFailed: the cluster could not run the wrapper (steps not importable
                there, the callback address not reachable ...).
        """
        ray = self._ray = import_ray()
        if not ray.is_initialized():
            if self._config.address is None:
                ray.init(num_cpus=self.workers + min(self._spares, 1), include_dashboard=False,
                         _node_ip_address="127.0.0.1", log_to_driver=False)
            else:
                ray.init(address=self._config.address, log_to_driver=False)
            self._owns_ray = True
        host = self._config.callback_host or (
            "127.0.0.1" if self._owns_ray and self._config.address is None else ray.util.get_node_ip_address())
        self._listener = socket.create_server((host, 0))
        self._acceptor = threading.Thread(target=self._accept_links, name="governor-ray-accept", daemon=True)
        self._acceptor.start()
        self._steps_ref = ray.put(self._steps)
        self._info = ray_worker.LinkInfo(host, self._listener.getsockname()[1], self._token, uuid.uuid4().hex)
        try:
            self._warm_up()
        except Exception as exc:
            self.close()
            raise WorkerStartFailed(f"the Ray cluster could not run a governor task: {exc}") from exc
        finally:
            with self._linked:
                self._early_links = None

    def _warm_up(self) -> None:
        """Run the wrapper once (a broken setup fails here, not on the first step), then warm
        as many Ray workers as can run this supervisor's tasks at once, up to ``workers``.

        Ray starts workers on demand and hands a finished task's worker the next task, so
        without this the first batch after a start would run one step at a time while new
        workers start. The warm-up tasks hold until that many workers have linked up (or
        :data:`WARM_WAIT_S` passes: the cluster may be busier than it said), so each lands
        on a worker of its own.
        """
        ray = self._ray
        entry = entry_function(ray)
        check = entry.options(name="governor:check", max_retries=0, **self._config.task_options)
        self._standby_remote = entry.options(name="governor:standby", max_retries=0, **self._config.task_options)
        for attempt in range(UNSTARTED_RETRIES + 1):
            try:
                # The first task exports the entry function, here, on the starting thread.
                ray.get(check.remote("check", self._info, [self._steps_ref], 0.0), timeout=WARM_UP_TIMEOUT_S)
                break
            except ray.exceptions.WorkerCrashedError:  # a dying worker leased (see _never_started)
                if attempt == UNSTARTED_RETRIES:
                    raise
        cpus_per_task = float(self._config.task_options.get("num_cpus", 1))
        free = int(ray.available_resources().get("CPU", 0) // cpus_per_task) if cpus_per_task else self.workers
        count = max(1, min(self.workers, free))
        if count == 1:
            return
        holding = [check.remote("check", self._info, [self._steps_ref], WARM_WAIT_S) for _ in range(count)]
        with self._linked:
            self._linked.wait_for(lambda: len({link.pid for link in self._early_links}) >= count, WARM_WAIT_S)
            for link in self._early_links:
                self._send(link, ["release", ray_worker.WARM_UP_HOLD])
        ray.get(holding, timeout=WARM_UP_TIMEOUT_S)

    def close(self) -> None:
        """Stop accepting links, drop them, and stop Ray if this supervisor started it."""
        self._stop_accepting.set()
        if self._acceptor is not None:
            self._acceptor.join()
        if self._listener is not None:
            self._listener.close()
        with self._linked:  # a failed start: links accepted while warming never reach the manager
            for link in self._early_links or ():
                link.connection.close()
        if self._standby is not None and self._standby.link is None:
            self._ray.cancel(self._standby.ref, force=True)  # still waiting for a worker
        for link in list(self._links.values()):
            self._drop_link(link)
        if self._owns_ray:
            self._ray.shutdown()
            self._owns_ray = False

    # ----------------------------------------------------------------- the acceptor thread

    def _accept_links(self) -> None:
        """Accept links; each is admitted on a thread of its own (see :meth:`_admit`)."""
        while not self._stop_accepting.is_set():
            if not select.select([self._listener], [], [], _ACCEPT_POLL_S)[0]:
                continue
            try:
                sock, peer = self._listener.accept()
            except OSError:
                continue
            threading.Thread(target=self._admit, args=(sock, peer), name="governor-ray-hello", daemon=True).start()

    def _admit(self, sock: socket.socket, peer: Any) -> None:
        """Check a new link's token; the manager gets only authenticated links.

        On its own thread, so a peer that connects and says nothing holds up no other link
        (it is dropped after :data:`HELLO_TIMEOUT_S`).
        """
        sock.setblocking(True)
        # A peer that sends part of a hello and stops must not hold this thread for ever:
        # the read gives up after HELLO_TIMEOUT_S (EAGAIN), and the peer is refused.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(HELLO_TIMEOUT_S))
        connection = Connection(sock.detach())
        try:
            hello = json.loads(connection.recv_bytes(4096)) if connection.poll(HELLO_TIMEOUT_S) else {}
        except (EOFError, OSError, ValueError):
            hello = {}
        if not isinstance(hello, dict) or not hmac.compare_digest(str(hello.get("token")), self._token):
            log.warning("refused a Ray link from %s: no valid token", peer)
            connection.close()
            return
        link = RayLink(connection, int(hello["pid"]), str(hello.get("node")))
        with self._linked:  # close() takes this lock after it stops accepting: no link slips past it
            if self._stop_accepting.is_set():
                connection.close()
                return
            if self._early_links is not None:  # connect() is warming workers up
                self._early_links.append(link)
                self._linked.notify_all()
            self._host.call_soon(self._on_link, link)

    # ----------------------------------------------------------------- LaneBackend (manager thread)

    def queue(self, lane: Lane) -> Any:
        return self._queue

    def begin(self) -> None:
        """Nothing to start: Ray starts its workers on demand (``connect`` warmed them)."""

    @property
    def quiet(self) -> bool:
        return not self._runs and not any(task.state is TaskState.QUEUED for task in self._queue)

    def maintain(self) -> None:
        """Keep one warm worker standing by, as the local lanes keep a warm spare.

        It is a Ray task (``ray_worker.standby``) that holds its worker idle until the
        lane releases it: when a worker dies, its task's successor would otherwise wait for
        Ray to start a process (60-320 ms measured). A new standby is asked for only once
        no killed worker is still dying and nothing waits in the queue, so the worker a
        release frees goes to the step that comes next, not to the next standby.
        """
        if self._spares and self._standby is None and not self._queue and not any(
                run.kill is not None for run in self._runs.values()):
            hold_id = next(self._hold_ids)
            ref = self._standby_remote.remote("standby", self._info, [self._steps_ref], hold_id)
            standby = self._standby = Standby(hold_id, ref, ref.future())
            standby.future.add_done_callback(lambda done: self._host.call_soon(self._on_standby_done, standby, done))

    def _on_standby_done(self, standby: "Standby", future: concurrent.futures.Future) -> None:
        if self._standby is standby:  # it ended unreleased: its worker died, or the link failed
            log.info("the Ray lane's standby worker ended: %r", future.exception())
            self._standby = None
            self._publish()

    def _release_standby(self) -> None:
        """A worker died: free the standby's warm worker for the step that comes next."""
        standby, self._standby = self._standby, None
        if standby is not None and standby.link is not None:
            self._send(standby.link, ["release", standby.hold_id])
            self._publish()
        # Not standing by yet: it is released when it says it is (see on_readable).

    def next_deadline(self) -> Optional[float]:
        return self._timers.next_due()

    def running_tasks(self) -> List[Task]:
        return [run.task for run in self._runs.values()]

    def abort(self) -> None:
        """Nothing to do: ``close`` drops the links, and a worker whose link drops while it
        runs one of our steps kills its own tree."""

    def dispatch(self) -> None:
        """Hand queued tasks to Ray while fewer than ``workers`` are in flight."""
        while self._queue and len(self._runs) < self.workers:
            task = self._queue.popleft()
            try:
                task.transition(TaskState.RUNNING)
            except InvalidTransition:
                continue  # cancelled while it waited: lazy removal, as in the local lanes
            if not self._host.dispatching(task):
                continue
            run = self._runs[task.id] = RayRun(task)
            self._submit(run)
            self._publish()

    def _submit(self, run: RayRun) -> None:
        """Hand a run's task to Ray (again, after a worker that died before it started)."""
        task, limits = run.task, run.task.limits
        run.attempts += 1
        run.ref = self._remote_for(task.step).remote(
            "run", self._info, [self._steps_ref], task.id, task.step, task.args, task.kwargs,
            ray_worker.TaskLimits(limits.effective_memory_mb,
                                  limits.effective_memory_mb if limits.memory_hard_cap else None), task.chunk)
        run.future = run.ref.future()
        task.dispatched_at = self._clock()  # until the step starts: then from its start
        run.future.add_done_callback(lambda future: self._host.call_soon(self._on_done, run, future))

    def _remote_for(self, step: str):
        remote = self._remote.get(step)
        if remote is None:
            remote = self._remote[step] = entry_function(self._ray).options(
                name=f"governor:{step}", max_retries=0, retry_exceptions=False, **self._config.task_options)
        return remote

    def _on_link(self, link: RayLink) -> None:
        self._links[link.connection.fileno()] = link
        self._host.selector.register(link.connection, selectors.EVENT_READ, lambda: self.on_readable(link))
        # A worker says "running" right after its hello: read it now, before the inbox's
        # next message (a cancel of that very task) is handled.
        while not link.connection.closed and link.connection.poll(0):
            self.on_readable(link)

    def on_readable(self, link: RayLink) -> None:
        """Read what the link has (one ``read``, which cannot block: the link is readable)
        and act on each whole message. A message cut in two by the network waits for its
        rest in ``link.frames``; the manager never waits for it (a read of a whole message
        would, for as long as the network between here and that worker takes)."""
        try:
            alive = link.frames.feed(link.connection.fileno())
        except OSError:
            alive = False
        try:
            frame = link.frames.pop()
            while frame is not None and not link.connection.closed:
                self._on_message(link, frame)
                frame = link.frames.pop()
        except ValueError:  # a frame over the cap: not our worker's, the link cannot be trusted
            alive = False
        if not alive and not link.connection.closed:
            self._link_lost(link)

    def _on_message(self, link: RayLink, frame: bytes) -> None:
        try:
            kind, task_id, *rest = json.loads(frame)
        except (ValueError, TypeError):  # not our worker's: the link cannot be trusted
            self._link_lost(link)
            return
        if kind == "standing_by":
            if self._standby is not None and self._standby.hold_id == task_id:
                self._standby.link = link
                self._publish()
            else:  # a standby released before it stood by
                self._send(link, ["release", task_id])
            return
        run = self._runs.get(task_id)
        if run is None or run.task.state.terminal:
            return  # a late word about a task that already ended
        if kind == "running":
            self._started(run, link)
        elif kind == "over_memory":
            task = run.task
            task.peak_rss_bytes = max(task.peak_rss_bytes or 0, int(rest[0]))
            limit_mb = task.limits.effective_memory_mb
            peak_mb = mib(task.peak_rss_bytes)
            # The worker kills itself right after this report; the kill is the worker's own.
            self._claim(run, "memory", TaskState.OVER_MEMORY,
                        MemoryLimitExceeded(task.step, task.id, limit_mb, peak_mb, link.pid), limit_mb, peak_mb,
                        send_kill=False)

    def _started(self, run: RayRun, link: RayLink) -> None:
        task = run.task
        run.link = link
        task.pid, task.dispatched_at = link.pid, self._clock()
        self._publish()
        if task.limits.effective_timeout_s is not None:
            self._timers.after(task.limits.effective_timeout_s, RayTimer.TIMEOUT, task)
        if task.cancel_request is not None:
            self.cancel(task)  # cancelled between its dispatch and its start

    def _link_lost(self, link: RayLink) -> None:
        """A worker's link closed: the worker died (or will: it kills its own tree when its
        link closes mid-step). A task claimed for a kill ends now, as in the local lane on
        its worker's EOF: Ray would report the death only after it has waited up to 1 s for
        its cause (``timeout_ms_task_wait_for_death_info``). Any other task ends by Ray's
        report, which alone says whether its outcome got out first."""
        self._drop_link(link)
        for run in [run for run in self._runs.values() if run.link is link and run.kill is not None]:
            self._end_killed(run)

    def _end_killed(self, run: RayRun) -> None:
        """End a task claimed for a kill once its worker is dead.

        On this host that means seen dead (gone or a zombie), as in the local lane: a
        dying process closes its sockets a moment before it is a zombie, a moment that a
        loaded machine stretches. The lane polls for it without blocking, up to
        :data:`KILL_CONFIRM_S`. On another host, the closed link (or Ray's report) is all
        there is to go by.
        """
        if run.kill_deadline is None:
            run.kill_deadline = self._clock() + KILL_CONFIRM_S
        pid = run.link.pid if run.link is not None else None
        if (pid is not None and run.link.node == socket.gethostname() and not wait_dead(pid, 0)
                and self._clock() < run.kill_deadline):
            self._timers.after(REAP_POLL_S, RayTimer.REAP, run.task)
            return
        self._forget_run(run)
        self._host.conclude(run.task, run.kill.state, run.kill.error, by_kill=True)

    def _forget_run(self, run: RayRun) -> None:
        del self._runs[run.task.id]
        self._publish()

    def _on_done(self, run: RayRun, future: concurrent.futures.Future) -> None:
        """Ray reports the task's end: its outcome, or why it has none."""
        task = run.task
        if self._runs.get(task.id) is not run or future is not run.future:
            return  # it ended when its killed worker's link closed, or this is an old attempt's
        if run.kill is not None:
            self._end_killed(run)
            return
        error = future.exception()
        if error is not None and self._never_started(run, error):
            return
        self._forget_run(run)
        if error is None:
            outcome = future.result()
            self._host.conclude_outcome(task, outcome)
        elif isinstance(error, self._ray.exceptions.TaskCancelledError):
            # Only a cancel before the step started gets here (later ones go through a kill).
            self._host.conclude(task, TaskState.CANCELLED, task.cancelled_error(killed=run.link is not None))
        elif isinstance(error, self._ray.exceptions.RayTaskError):
            # The wrapper itself failed (the step table or a module would not load there).
            cause = error.as_instanceof_cause() if hasattr(error, "as_instanceof_cause") else error
            self._host.conclude(task, TaskState.FAILED, StepFailed(
                task.step, task.id, type(cause).__qualname__, str(error).splitlines()[-1], str(error)))
        else:
            crash = WorkerCrashed(task.step, task.id, task.pid, None, None)
            self._metrics.worker_killed(Lane.POOL, "crash")
            self._log_death(run, f"{crash} ({type(error).__name__})", "crash", None, None)
            self._host.conclude(task, TaskState.CRASHED, crash)
            self._release_standby()

    def _never_started(self, run: RayRun, error: BaseException) -> bool:
        """Submit again a task whose Ray worker died before the step started; say if so.

        Ray can lease a worker that is already dying (seen under load: "the leased worker
        has unrecoverable failure"), and with ``max_retries=0`` it fails the task; but the
        step never ran, so failing it would make an innocent task pay for another's kill.
        A step says "running" before it starts, so a task with no "running" (once every
        link's pending messages are read) never started. Pool steps are read-only, so even
        a "running" lost on a failing network costs at most a second harmless run.
        """
        if (not isinstance(error, self._ray.exceptions.WorkerCrashedError) or run.attempts > UNSTARTED_RETRIES
                or run.task.cancel_request is not None):
            return False
        self._read_pending_links()
        if run.link is not None:
            return False
        log.info("Ray worker died before task %s (%s) started; submitting it again", run.task.id, run.task.step)
        self._submit(run)
        return True

    def _read_pending_links(self) -> None:
        ready = wait_for_connections([link.connection for link in self._links.values()], timeout=0)
        for link in [link for link in list(self._links.values()) if link.connection in ready]:
            self.on_readable(link)

    def cancel(self, task: Task) -> None:
        """A cancel was recorded on a task in flight: ask it to stop, kill it after its grace."""
        run = self._runs.get(task.id)
        if run is None or run.kill is not None:
            return
        if run.link is None:
            # Not started as far as we know; but its "running" may be on its way (a new
            # worker's link is accepted on another thread). If it comes, _started cancels
            # it like any running step, tree kill included; if not, Ray drops it.
            self._timers.after(UNSTARTED_CANCEL_AFTER_S, RayTimer.UNSTARTED, task)
            return
        request = task.cancel_request
        grace = task.limits.effective_cancel_grace_s
        self._send(run.link, ["cancel", task.id, request.reason, request.detail])
        if grace == 0:
            self._claim(run, "cancel", TaskState.CANCELLED, task.cancelled_error(killed=True), 0.0, None)
        else:
            self._timers.after(grace, RayTimer.GRACE, task)

    def on_time(self) -> None:
        for kind, task in self._timers.pop_due():
            self._fire(kind, task)
        self._timers.prune_if_stale(len(self._runs), lambda kind, task: task.state is TaskState.RUNNING)

    def _fire(self, kind: "RayTimer", task: Task) -> None:
        run = self._runs.get(task.id)
        if run is None or run.task is not task:
            return  # it ended before its timer
        if kind is RayTimer.REAP and run.kill is not None:
            self._end_killed(run)
        elif kind is RayTimer.FORCE:
            log.warning("Ray worker %s did not end task %s itself; ray.cancel(force=True)", task.pid, task.id)
            self._ray.cancel(run.ref, force=True)
            self._kill_local_worker(run)
        elif kind is RayTimer.UNSTARTED and run.link is None:
            self._ray.cancel(run.ref, force=True)  # still in Ray's queue: Ray drops it
        elif run.kill is not None:
            return
        elif kind is RayTimer.TIMEOUT:
            limit = task.limits.effective_timeout_s
            elapsed = self._clock() - task.dispatched_at
            self._claim(run, "timeout", TaskState.TIMED_OUT, StepTimeout(task.step, task.id, limit, elapsed, task.pid),
                        limit, elapsed)
        elif kind is RayTimer.GRACE:
            self._claim(run, "cancel", TaskState.CANCELLED, task.cancelled_error(killed=True),
                        task.limits.effective_cancel_grace_s, None)

    def _claim(self, run: RayRun, reason: str, state: TaskState, error: BaseException,
               limit: Optional[float], observed: Optional[float], send_kill: bool = True) -> None:
        """Decide how a task ends and have its worker (and that worker's tree) killed.

        The task ends when its worker's link closes (or Ray reports the worker dead), so
        "the future is resolved" implies "the step stopped", as in the local lane.
        """
        task = run.task
        if not task.claim_for_kill():
            return  # its outcome came back first
        run.kill = KillOrder(reason, state, error)
        self._metrics.worker_killed(Lane.POOL, reason)
        self._log_death(run, f"killing Ray worker {task.pid}: {error}", reason, limit, observed)
        if send_kill and run.link is not None:
            self._send(run.link, ["kill", task.id])
        self._release_standby()  # now, so its worker is idle in Ray by the time this one is dead
        self._timers.after(FORCE_CANCEL_AFTER_S, RayTimer.FORCE, task)

    @staticmethod
    def _kill_local_worker(run: RayRun) -> None:
        """SIGKILL a worker on this host that did not end its task itself (a step holding
        the GIL): Ray's forced cancel goes through its raylet, which a loaded host slowed
        past :data:`KILL_CONFIRM_S`, and the task would then end with its worker alive."""
        link = run.link
        if link is None or link.connection.closed or link.node != socket.gethostname():
            return
        try:
            psutil.Process(link.pid).kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass  # already gone

    def _send(self, link: RayLink, message: list) -> None:
        try:
            link.connection.send_bytes(json.dumps(message).encode())
        except OSError:
            pass  # the worker just died: Ray reports the task's end

    def _drop_link(self, link: RayLink) -> None:
        if link.connection.closed:
            return
        if self._links.pop(link.connection.fileno(), None) is not None:
            self._host.selector.unregister(link.connection)
        link.connection.close()

    @staticmethod
    def _log_death(run: RayRun, message: str, reason: str, limit: Optional[float], observed: Optional[float]) -> None:
        log_death(message, run.task, Lane.POOL, run.task.pid, reason, limit, observed,
                  run.link.node if run.link else None)

    # ----------------------------------------------------------------- views

    def describe(self, now: float) -> List[Dict[str, Any]]:
        """One dict per task in flight, and the standby worker (Ray's idle workers are the
        cluster's, not ours to list)."""
        standby = self._standby
        spare = [] if standby is None or standby.link is None else [
            worker_view(standby.link.pid, Lane.POOL, "idle", now, node=standby.link.node)]
        return spare + [worker_view(run.task.pid, Lane.POOL, "busy" if run.link else "starting", now, run.task,
                                    node=run.link.node if run.link else None) for run in self._runs.values()]

    def gauges(self) -> Dict[str, Dict[str, Any]]:
        """The lane's gauges, in the local lanes' shape (safe from any thread: it reads one
        tuple the manager replaces whenever a task starts or ends)."""
        busy, pids, spares = self._published
        return {Lane.POOL.value: {"busy": busy, "idle": max(0, self.workers - busy), "starting": 0,
                                  "spares_ready": spares, "worker_pids": pids}}

    def _publish(self) -> None:
        standing_by = self._standby is not None and self._standby.link is not None
        self._published = (len(self._runs), tuple(run.task.pid for run in self._runs.values() if run.link),
                           int(standing_by))
