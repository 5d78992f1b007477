"""The supervisor's manager thread: the one owner of the lanes, their workers and running tasks.

Data flow::

    user threads ──── enqueue / request_cancel / request_shutdown / request_describe ──┐
    backend threads ── call_soon(fn, *args) ────────────────────────────────────────────┤
      (spawn threads, Ray callbacks, the Ray link acceptor)                             │
                                 (a bound call on the inbox; one byte on the wake-up    │
                                  pipe only if the manager sleeps in select)           ─┘
                                                 v
                     manager thread: selector.ready(timeout = the backends' next deadline,
                                                     at most MAX_WAIT_S)
                       ├─ wake-up pipe        -> drain the inbox: each entry is a bound call
                       ├─ a backend's file    -> the callable it registered (worker outcomes,
                       │                         pidfds of dying workers, the template)
                       └─ a backend's deadline -> backend.on_time (timeouts, graces, samples)
                                                 v
                     backend.dispatch(): queued task -> free worker;  backend.maintain()
                                                 v
                     conclude(task, state, ...): the one place a task ends

The lanes' workers belong to *lane backends* (``governor.engine.backend``): the local lanes
(``governor.engine.lanes``) and, for ``backend="ray"``, the pool lane on Ray
(``governor.engine.ray_lane``). The manager keeps what is the same for both: the inbox, the
loop, and the end of a task (its state, its metrics, its future, its workflow).

Only this thread touches the backends' state. Other threads put bound calls on the
inbox; the one exception is cancelling a queued task, which the cancelling thread ends
itself (see :meth:`Manager.conclude_queued_cancel`). Done-callbacks of the users'
futures run on this thread, or on the thread that cancelled a queued task.

Nothing raised on this thread ends it silently: a handler that raises is logged and the
loop goes on (a task it concerned fails, where the handler knows one); if the loop
itself fails, every task is failed, the workers are killed and the supervisor is broken
(``submit`` raises ``SupervisorBroken``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import random
import selectors
import threading
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

import attrs

from governor.engine import gilio
from governor.workers.messages import Outcome, OutcomeKind
from governor.engine.backend import LaneBackend, ReadSelector
from governor.callbacks import CallbackRunner
from governor.errors import (MemoryLimitExceeded, QueueFull, ReadOnlyViolation, RemoteTraceback, StepFailed,
                             SupervisorBroken,
                             WorkerStartFailed)
from governor.limits import Lane
from governor.engine.lanes import LocalConfig, LocalLanes
from governor.engine.metrics import MetricsRecorder
from governor.engine.timers import Timers
from governor.workers.proctree import mib
from governor.task import CancelRequest, Task, TaskState

log = logging.getLogger("governor")

#: The ends a step's retries may turn into another attempt (``StepSpec.retries``): its own
#: error, or its worker's crash. Never a timeout, a memory kill or a cancel.
_RETRIED = frozenset({TaskState.FAILED, TaskState.CRASHED})


def _retried_on(error: Optional[BaseException], kinds: tuple) -> bool:
    """Whether ``error`` (or, for a wrapped ``StepFailed``, the step's own exception) is one of ``kinds``."""
    return isinstance(error, kinds) or isinstance(getattr(error, "original", None), kinds)

#: The longest the manager sleeps in one ``select``: a deadline further away (a 25-day
#: timeout) is waited for in slices, since epoll takes at most 2**31 ms. One extra
#: wake-up an hour costs nothing.
MAX_WAIT_S = 3600.0


@attrs.frozen
class ManagerConfig:
    """What the manager needs to know to run the lanes; built by the Supervisor.

    ``local`` describes the local lanes; with ``ray`` (a ``governor.engine.ray_lane.RayConfig``)
    the pool lane runs on Ray instead and ``local`` covers the critical lane alone.
    ``wrap_step_errors``: a step's exception ends its task as ``StepFailed`` even when it
    pickles (see ``Supervisor``). ``queue_size`` is how many tasks each lane may hold
    waiting (see :meth:`Manager.admit`).
    """

    local: LocalConfig
    pool_workers: int
    queue_size: int
    on_dispatch: Optional[Callable[[Task], None]] = None
    ray: Optional[Any] = None
    wrap_step_errors: bool = False


class Manager(threading.Thread):
    """The manager thread.

    Other threads may call :meth:`admit`, :meth:`enqueue`, :meth:`wake`, :meth:`call_soon`,
    :meth:`request_cancel`, :meth:`request_shutdown`, :meth:`request_describe`,
    :meth:`conclude_queued_cancel`, :meth:`queue_depth`, :meth:`queue_room`, :meth:`wait_for_room`,
    :meth:`wake_room_waiters`, :meth:`gauges`, and :meth:`connect`
    / :meth:`start` before it runs; read ``warm`` (an Event), ``start_error`` and ``broken``.
    The rest is the host API of ``governor.engine.backend.LaneHost`` and runs on this thread.
    """

    def __init__(self, config: ManagerConfig, metrics: MetricsRecorder,
                 cancel_task: Callable[[Task, CancelRequest], bool],
                 clock: Callable[[], float], callbacks: CallbackRunner):
        super().__init__(name="governor-manager", daemon=True)
        self._callbacks = callbacks
        self._config = config
        self.metrics = metrics
        # Tasks waiting in each lane's queue, counted in at admit() and out as each leaves
        # its queue (dispatched or ended): exact at any moment, unlike the deques, which
        # lag one inbox drain behind and keep cancelled tasks until dispatch skips them.
        self._queued = {lane: 0 for lane in Lane}
        self._queued_by_key: collections.Counter = collections.Counter()  # critical lane key -> queued
        self._queued_changed = threading.Condition(threading.Lock())  # guards _queued, _queued_by_key
        self._room_waiters = 0  # threads in wait_for_room
        self._cancel_task = cancel_task  # the Supervisor's: the one place a cancel is made
        self.clock = clock
        self.warm = threading.Event()
        self.start_error: Optional[BaseException] = None
        self.broken: Optional[BaseException] = None
        self._closing = False

        self._inbox: Deque[tuple] = collections.deque()
        self._ended: List[tuple] = []  # (task, result) concluded this turn, resolved at its end
        self._sleeping = False
        self._wakeup_reader, self._wakeup_writer = os.pipe()
        self._wakeup_lock = threading.Lock()
        os.set_blocking(self._wakeup_reader, False)
        os.set_blocking(self._wakeup_writer, False)
        self.selector = ReadSelector()
        self.selector.register(self._wakeup_reader, selectors.EVENT_READ, self._on_wakeup)
        self._woken = False
        self._due_at: Optional[float] = None  # the backends' earliest deadline, as of the last turn
        self._retries = Timers(clock)  # tasks waiting out a retry's backoff (see _retry_later)
        self._backing_off: Dict[int, Task] = {}  # pool tasks among them, by id (QUEUED, in no queue yet)
        self._random = random.Random()

        local = LocalLanes(self, config.local)
        self._all: List[LaneBackend] = [local]
        if config.ray is not None:
            from governor.engine.ray_lane import RayLane  # Ray is an optional extra
            self._all.append(RayLane(self, config.ray, config.pool_workers, config.local.steps, config.local.spares))
        self._backends: Dict[Lane, LaneBackend] = {lane: backend for backend in self._all for lane in backend.lanes}
        self._lane_queues = self._queues()  # each lane's deque, for a quick "anything waiting?"

    def gauges(self) -> Dict[str, Dict[str, Any]]:
        """Lane name -> busy / idle / starting / spares_ready / worker_pids (any thread)."""
        return {lane: gauges for backend in self._all for lane, gauges in backend.gauges().items()}

    def queue_depth(self) -> Dict[str, int]:
        """Lane name -> tasks waiting in its queue (any thread)."""
        with self._queued_changed:
            return {lane.value: count for lane, count in self._queued.items()}

    def key_depths(self, top: int) -> Dict[str, int]:
        """The ``top`` critical lane keys with the most tasks queued, and how many (any
        thread): a key's text (``str``) -> tasks queued, most first."""
        with self._queued_changed:
            return {str(key): count for key, count in self._queued_by_key.most_common(top)}

    def queue_room(self, lane: Lane) -> int:
        """How many more tasks ``lane``'s queue takes now (any thread)."""
        with self._queued_changed:
            return max(0, self._config.queue_size - self._queued[lane])

    def wait_for_room(self, lane: Lane, timeout: float) -> int:
        """Wait at most ``timeout`` seconds for ``lane``'s queue to take a task (any thread).

        Returns:
            how many tasks it takes now (0: still none, or :meth:`wake_room_waiters`).
        """
        with self._queued_changed:
            self._room_waiters += 1
            try:
                if self._queued[lane] >= self._config.queue_size:
                    self._queued_changed.wait(timeout)
                return max(0, self._config.queue_size - self._queued[lane])
            finally:
                self._room_waiters -= 1

    def wake_room_waiters(self) -> None:
        """Wake every :meth:`wait_for_room` now (the supervisor is shutting down)."""
        with self._queued_changed:
            self._queued_changed.notify_all()

    def connect(self) -> None:
        """Before :meth:`start`, on the caller's thread: let each backend reach its workers'
        infrastructure (start the warm template, join the Ray cluster). If one fails,
        everything is released."""
        try:
            for backend in self._all:
                backend.connect()
        except BaseException:
            self._close()
            raise

    # ----------------------------------------------------------------- other threads

    def call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the manager thread (any thread)."""
        self._inbox.append((fn, args))
        self.wake()

    def admit(self, tasks: Sequence[Task]) -> None:
        """Count ``tasks`` into their lanes' queues, all or none (any thread; :meth:`enqueue` them next).

        Raises:
            QueueFull: a lane would hold more than ``queue_size`` tasks waiting.
        """
        wanted: Dict[Lane, int] = {}
        for task in tasks:
            wanted[task.lane] = wanted.get(task.lane, 0) + 1
        keys = [task.key for task in tasks if task.key is not None]
        bound = self._config.queue_size
        with self._queued_changed:
            for lane, count in wanted.items():
                if self._queued[lane] + count > bound:
                    raise QueueFull(lane.value, bound)
            for lane, count in wanted.items():
                self._queued[lane] += count
            if keys:  # most work has no key: skip the Counter's call (~0.5 us a submit)
                self._queued_by_key.update(keys)

    def _left_queue(self, task: Task) -> None:
        with self._queued_changed:
            self._queued[task.lane] -= 1
            if task.key is not None:
                self._queued_by_key[task.key] -= 1
                if not self._queued_by_key[task.key]:
                    del self._queued_by_key[task.key]  # a key with nothing queued is forgotten
            if self._room_waiters:
                self._queued_changed.notify_all()

    def enqueue(self, tasks: Sequence[Task]) -> None:
        """Queue new tasks without waking the manager; call :meth:`wake` after.

        For a caller that orders submissions under its own lock but should not wake the
        manager while holding it (the manager would wake straight into that lock).
        """
        self._inbox.append((self._on_submit, (tasks,)))

    def request_cancel(self, task: Task) -> None:
        """A cancel was recorded on ``task`` (any thread): stop it if it runs."""
        self.call_soon(self._on_cancel, task)

    def request_shutdown(self, cancel_pending: bool, cancel_running: bool) -> None:
        """Stop taking work and end once what was accepted has ended (any thread)."""
        self.call_soon(self._on_shutdown, cancel_pending, cancel_running)

    def request_describe(self, reply: concurrent.futures.Future) -> None:
        """Answer ``reply`` with one dict per live worker (any thread)."""
        self.call_soon(self._on_describe, reply)

    def wake(self) -> None:
        """Make sure the manager reads its inbox soon (any thread).

        Writes a byte only while the manager sleeps in ``select``: the manager raises its
        flag *before* it looks at the inbox one last time, and a caller appends *before*
        it reads the flag, so a message is either seen by that look or wakes the select.
        A busy manager costs a submitter no syscall at all.
        """
        if not self._sleeping:
            return
        # Under the lock, so a late message (a callback after shutdown) never writes to the
        # pipe's fd number after _close() released it to be reused by another file.
        with self._wakeup_lock:
            if self._wakeup_writer is None:
                return  # the manager has exited: nothing is listening
            try:
                gilio.write_now(self._wakeup_writer, b"\0")
            except BlockingIOError:
                pass  # the pipe is full, so a wake-up is already pending

    # ----------------------------------------------------------------- the loop

    def run(self) -> None:
        self._callbacks.protect()  # users' done-callbacks never run here (governor.callbacks)
        try:
            for backend in self._all:
                backend.begin()
            timeout = 0.0
            while True:
                self._wait_for_events(timeout)
                self._drain_inbox()
                if self._due_at is not None and self.clock() >= self._due_at:
                    for backend in self._all:
                        self._guarded(backend.on_time)
                    for handler, task in self._retries.pop_due():
                        self._guarded(handler, task)
                for backend in self._all:
                    self._guarded(backend.dispatch)
                if not self._closing:
                    for backend in self._all:
                        self._guarded(backend.maintain)
                if not self.warm.is_set() and all(backend.warm for backend in self._all):
                    self.warm.set()
                finished = self._finished()
                if not finished:
                    timeout = self._next_timeout()
                    if self._woken:
                        self._drain_wakeups()
                # Last before the select: a caller woken here finds the GIL free, instead
                # of waiting for this thread to finish its turn.
                self._resolve_ended()
                if finished:
                    break
        except BaseException as exc:  # a bug here must not leave workers or futures behind
            # Broken first, then the log: a submit that checks ``broken`` meanwhile must be
            # refused, not slip into an inbox no one reads again.
            self.broken = exc
            log.critical("governor manager thread failed; the supervisor is broken", exc_info=True)
            self.start_error = self.start_error or exc
            self._fail_everything(exc)
        finally:
            self.warm.set()
            self._close()
            self._callbacks.close(wait=False)  # the callbacks due run on; none is waited for here

    def _guarded(self, handler: Callable[..., None], *args: Any) -> None:
        """Run one handler; if it raises, log it and go on: one bad event must not stop
        every task. (Handlers that concern one task fail that task themselves.)"""
        try:
            handler(*args)
        except Exception:
            log.exception("governor manager: %s failed; carrying on", getattr(handler, "__qualname__", handler))

    def _finished(self) -> bool:
        return (self._closing and not any(task.state is TaskState.QUEUED for task in self._backing_off.values())
                and all(backend.quiet for backend in self._all))

    def _next_timeout(self) -> float:
        """How long the next select may sleep: until the backends' earliest deadline
        (kept in ``_due_at``, so the turn after it runs ``on_time`` only when one is due)."""
        due = [when for when in (backend.next_deadline() for backend in self._all) if when is not None]
        if self._retries:
            due.append(self._retries.next_due())
        self._due_at = min(due) if due else None
        return MAX_WAIT_S if self._due_at is None else min(MAX_WAIT_S, max(0.0, self._due_at - self.clock()))

    def _wait_for_events(self, timeout: float) -> None:
        self._sleeping = True
        if self._inbox:
            timeout = 0.0  # a message came before the flag went up: no byte was written for it
        handlers = self.selector.ready(timeout)
        self._sleeping = False
        for handler in handlers:
            self._guarded(handler)

    def _on_wakeup(self) -> None:
        # The inbox is read in this turn anyway: the byte is read just before the next
        # select, so no syscall (which lets go of the GIL, to a submitter that keeps it
        # until it blocks) stands between a submit and its task's dispatch.
        self._woken = True

    def _drain_wakeups(self) -> None:
        # One read: if more than 4 KiB of wake-ups were pending, the (level-triggered) select
        # wakes again.
        self._woken = False
        try:
            os.read(self._wakeup_reader, 4096)
        except BlockingIOError:
            pass

    def _drain_inbox(self) -> None:
        while self._inbox:
            fn, args = self._inbox.popleft()
            self._guarded(fn, *args)

    # ----------------------------------------------------------------- inbox messages

    def _on_submit(self, tasks: Sequence[Task]) -> None:
        debug = log.isEnabledFor(logging.DEBUG)
        for task in tasks:
            self._backends[task.lane].queue(task.lane).append(task)
            if debug:
                log.debug("task %s (%s) queued", task.public_id, task.step,
                          extra={"task_id": task.public_id, "step": task.step, "lane": task.lane.value})

    def _on_cancel(self, task: Task) -> None:
        if task.state.terminal:
            return  # it ended before the request reached this thread
        self._backends[task.lane].cancel(task)

    def _on_shutdown(self, cancel_pending: bool, cancel_running: bool) -> None:
        self._closing = True
        request = CancelRequest("shutdown", "the supervisor is shutting down")
        if cancel_pending:
            for task in self._queued_tasks():
                self._cancel_task(task, request)
        if cancel_running:
            for backend in self._all:
                for task in backend.running_tasks():
                    self._cancel_task(task, request)

    def _on_describe(self, reply: concurrent.futures.Future) -> None:
        now = self.clock()
        reply.set_result([worker for backend in self._all for worker in backend.describe(now)])

    def _queues(self) -> List[Any]:
        return [backend.queue(lane) for lane, backend in self._backends.items()]

    def _queued_tasks(self) -> List[Task]:
        """Every task in a lane's queue, and those waiting out a retry's backoff (queued too)."""
        return [task for queue in self._queues() for task in queue] + list(self._backing_off.values())

    # ----------------------------------------------------------------- the host API (LaneHost)

    @property
    def closing(self) -> bool:
        return self._closing

    def fail_start(self, error: BaseException) -> None:
        self.start_error = error
        self._closing = True
        self.warm.set()

    def dispatching(self, task: Task) -> bool:
        """``task`` left its lane's queue for a worker (it is ``RUNNING``): count it out of
        the queue, and run the ``on_dispatch`` hook (a journal's durable "started"); fail
        the task if the hook fails.

        A step whose start could not be recorded must not run: after a crash nobody could
        tell that it had, and a critical step would run twice.
        """
        self._left_queue(task)
        if self._config.on_dispatch is None:
            return True
        # The tasks ended this turn are resolved first: a journal that records ends from
        # their futures then sees the last critical step's end before the next one's start,
        # so after a crash at most one critical step reads "may have run".
        self._resolve_ended()
        try:
            self._config.on_dispatch(task)
        except Exception as exc:
            log.exception("could not record the start of task %s (%s)", task.id, task.step)
            self.conclude(task, TaskState.FAILED, WorkerStartFailed(
                f"the start of step {task.step!r} could not be recorded, so it was not run: {exc}"))
            return False
        return True

    def conclude_outcome(self, task: Task, outcome: Outcome) -> bool:
        """End a task from its worker's ``Outcome`` (see :meth:`conclude`)."""
        task.started_at, task.ended_at = outcome.started_at, outcome.ended_at
        if outcome.peak_rss_bytes is not None:
            task.peak_rss_bytes = max(task.peak_rss_bytes or 0, outcome.peak_rss_bytes)
        kind = outcome.kind
        if kind is OutcomeKind.OK:
            state, error = TaskState.DONE, None
        elif kind is OutcomeKind.CANCELLED:
            state, error = TaskState.CANCELLED, task.cancelled_error()
        elif kind is OutcomeKind.OVER_MEMORY:
            state, error = TaskState.OVER_MEMORY, MemoryLimitExceeded(
                task.step, task.id, task.limits.effective_memory_mb, mib(task.peak_rss_bytes), outcome.pid,
                killed=False)
        elif outcome.denied_path is not None:
            state, error = TaskState.FAILED, self._read_only_violation(task, outcome)
        else:
            state, error = TaskState.FAILED, self._step_error(task, outcome)
        return self.conclude(task, state, error, outcome.value)

    def _step_error(self, task: Task, outcome: Outcome) -> BaseException:
        """What a step raised, as its future raises it: the exception itself with the worker's
        traceback as ``__cause__`` (as ``ProcessPoolExecutor`` does), or ``StepFailed`` when it
        did not pickle or the supervisor wraps every step error."""
        own = outcome.exception
        if own is None or self._config.wrap_step_errors:
            return StepFailed(task.step, task.id, outcome.exc_type, outcome.exc_message, outcome.traceback_text, own)
        own.__cause__ = RemoteTraceback(outcome.traceback_text)
        return own

    def _read_only_violation(self, task: Task, outcome: Outcome) -> ReadOnlyViolation:
        """A pool step the sandbox refused a write: say so loudly, with the way out."""
        error = ReadOnlyViolation(task.step, task.id, outcome.denied_path, outcome.exc_type, outcome.exc_message,
                                  outcome.traceback_text, outcome.exception)
        self.metrics.sandbox_denied(task.step)
        log.warning("task %s: %s", task.public_id, error,
                    extra={"task_id": task.public_id, "step": task.step, "lane": task.lane.value, "pid": outcome.pid,
                           "reason": "read_only_violation"})
        return error

    def conclude(self, task: Task, state: TaskState, error: Optional[BaseException] = None,
                 result: Any = None, *, by_kill: bool = False) -> bool:
        """End ``task`` in ``state``: the one place a task ends, from any path (its outcome,
        a kill, a crash, a cancel, a skip, shutdown, a transport error, no worker, a
        broken manager).

        In order: the state (under the task's lock; a task claimed for a kill ends only
        ``by_kill``, and a task with a cancel request ends cancelled), then the rest of
        the end (:meth:`_ended`). A backend that calls this has already let go of the
        task's run: the end never calls back down into it.

        Returns:
            whether this call ended the task (``False``: it had ended already).
        """
        if state in _RETRIED:
            spec = self._config.local.steps.get(task.step)
            if spec is not None and spec.retries and _retried_on(error, spec.retry_on):
                if task.attempt <= spec.retries:
                    if self._retry_later(task, spec.retry_backoff, error):
                        return False
                else:
                    state = TaskState.EXHAUSTED
                    error.add_note(f"step {task.step!r}: all {task.attempt} attempts failed")
        left = task.end(state, error, by_kill)
        if left is None:
            return False
        self._ended_now(task, left, result)
        return True

    def _retry_later(self, task: Task, backoff: Tuple[float, float], error: BaseException) -> bool:
        """Queue ``task``'s next attempt after a backoff drawn from ``backoff``
        (``StepSpec.retry_backoff``); ``False`` if it was cancelled meanwhile (it then ends
        as :meth:`conclude` says). A cancel, a timeout or a memory kill never gets here
        (:data:`_RETRIED`)."""
        if not task.requeue():
            return False
        first, most = backoff
        delay = self._random.uniform(first, max(first, min(most, first * 2 ** (task.attempt - 2))))
        self.metrics.task_retried(task.lane, task.step)
        log.info("task %s (%s) failed its attempt %d (%r); attempt %d in %.2fs", task.public_id, task.step,
                 task.attempt - 1, error, task.attempt, delay,
                 extra={"task_id": task.public_id, "step": task.step, "lane": task.lane.value, "reason": "retry"})
        with self._queued_changed:
            self._queued[task.lane] += 1  # queued again (past the bound: it was admitted once)
            if task.key is not None:
                self._queued_by_key[task.key] += 1
        if task.lane is Lane.CRITICAL:
            # In order: the next attempt waits at the head of the queue, where it was, so
            # nothing ordered after it (its key's later steps; every later step, for a
            # keyless one or a one-worker lane) starts during the backoff.
            task.backing_off = True
            self._backends[task.lane].queue(task.lane).appendleft(task)
            self._retries.after(delay, self._backoff_over, task)
            return True
        self._backing_off[task.id] = task
        self._retries.after(delay, self._requeue, task)
        return True

    @staticmethod
    def _backoff_over(task: Task) -> None:
        """A critical retry's backoff is over: it may start (this turn's dispatch follows)."""
        task.backing_off = False

    def _requeue(self, task: Task) -> None:
        """A retry's backoff is over: the task joins its lane's queue, unless cancelled meanwhile."""
        del self._backing_off[task.id]
        if task.state is TaskState.QUEUED:
            self._on_submit([task])

    def conclude_queued_cancel(self, task: Task) -> None:
        """The end of a queued task that a user's thread just cancelled (any thread).

        The one end whose transition is not made by :meth:`conclude`: ``future.cancel()``
        must leave the future cancelled when it returns, as any ``Future`` does, so the
        canceller's ``Task.request_cancel`` moves the task out of ``QUEUED`` under the
        task's lock (a dispatch racing it loses, and skips the task). The rest of the end
        is the same as every other's.
        """
        self._ended_now(task, TaskState.QUEUED, None, on_this_thread=False)

    def _ended_now(self, task: Task, left: TaskState, result: Any, on_this_thread: bool = True) -> None:
        """Everything an end does once the task's state is terminal, whatever ended it.

        In order: its queue count (it left ``left``), its end time, metrics (before the
        future resolves: a caller who has its result sees it counted), the log, the
        workflow, the future. On this thread the future is resolved at once if no task
        waits in a lane's queue; otherwise at the end of the manager's turn, once the
        freed workers have their next tasks: a caller woken earlier would take the GIL
        while the manager waits to send them. On a canceller's thread
        (``on_this_thread=False``) it is resolved there and then, and the workflow, which
        this thread owns, is settled here next.
        """
        if left is TaskState.QUEUED:
            self._left_queue(task)
        elif task.ended_at is None:
            task.ended_at = self.clock()
        self.metrics.task_finished(task)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("task %s (%s) %s", task.public_id, task.step, task.state.value,
                      extra={"task_id": task.public_id, "step": task.step, "lane": task.lane.value, "pid": task.pid,
                             "reason": task.state.value})
        if not on_this_thread:
            task.resolve(result)
            if task.workflow is not None:
                self.call_soon(self._settle_workflow, task, result)
            return
        self._ended.append((task, result))
        if task.workflow is not None:
            self._settle_workflow(task, result)
        if not any(self._lane_queues):
            # Nothing waits for a worker, so no task is held up if the caller wakes now
            # rather than at the end of the turn (a third of a millisecond sooner when the
            # machine was idle, and a closed loop's next task arrives before the select).
            self._resolve_ended()

    def _resolve_ended(self) -> None:
        ended, self._ended = self._ended, []
        for task, result in ended:
            try:
                task.resolve(result)
            except Exception:  # as _guarded, without a call per task
                log.exception("governor manager: resolving task %s failed; carrying on", task.id)

    def _settle_workflow(self, task: Task, result: Any) -> None:
        for later in task.workflow.step_finished(task, result):
            self.conclude(later, TaskState.SKIPPED, later.error)

    # ----------------------------------------------------------------- the end

    def _fail_everything(self, error: BaseException) -> None:
        self._resolve_ended()
        broken = SupervisorBroken(f"the supervisor's manager thread failed: {error!r}")
        for backend in self._all:
            self._guarded(backend.abort)
        # The running first: a workflow's steps end in their order (its running step, then
        # its queued ones, which it skips).
        tasks = [task for backend in self._all for task in backend.running_tasks()]
        tasks += self._queued_tasks() + self._submitted_unread()
        for task in tasks:
            try:
                self.conclude(task, TaskState.FAILED, broken, by_kill=True)
            except Exception:
                log.exception("could not fail task %s", task.id)
        self._resolve_ended()

    def _submitted_unread(self) -> List[Task]:
        """The tasks of submissions still in the inbox, taken out of it (the loop that
        would have queued them has failed): they end like every other task held."""
        tasks: List[Task] = []
        kept: List[tuple] = []
        while self._inbox:
            fn, args = self._inbox.popleft()
            if fn == self._on_submit:
                tasks.extend(args[0])
            else:
                kept.append((fn, args))
        self._inbox.extend(kept)
        return tasks

    def _close(self) -> None:
        for backend in self._all:
            self._guarded(backend.close)
        self.selector.close()
        with self._wakeup_lock:
            os.close(self._wakeup_reader)
            os.close(self._wakeup_writer)
            self._wakeup_writer = None
