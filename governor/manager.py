"""The supervisor's manager thread: the one owner of the lanes, their workers and running tasks.

Data flow::

    user threads ──── submit / cancel / shutdown / describe ──┐
    backend threads ── call_soon(fn, *args) ──────────────────┤  (messages on the inbox,
      (loky callbacks, spawn threads, Ray callbacks,          │   then a byte on the
       the Ray link acceptor)                                 ┘   wakeup pipe)
                                                 v
                     manager thread: selector.select(timeout = the backends' next deadline)
                       ├─ wakeup pipe             -> drain the inbox
                       ├─ a backend's file        -> backend.on_readable (worker sockets)
                       └─ a backend's deadline    -> backend.on_time (timeouts, graces, samples)
                                                 v
                     backend.dispatch(): queued task -> free worker;  backend.maintain()

The lanes' workers belong to *lane backends* (``governor.backend``): the local loky lanes
(``governor.loky_lanes``) and, for ``backend="ray"``, the pool lane on Ray
(``governor.ray_lane``). The manager keeps what is the same for both: the inbox, the
loop, and the end of a task (its state, its metrics, its future, its workflow).

Only this thread touches the backends' state. Other threads put messages on the inbox;
the one exception is cancelling a queued task (see ``governor.task``). Done-callbacks of
the users' futures run on this thread, or on the loky thread that ended the task.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import selectors
import threading
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence

import attrs

from governor import worker
from governor.backend import LaneBackend
from governor.errors import InvalidTransition, MemoryLimitExceeded, StepFailed, WorkerStartFailed
from governor.limits import Lane
from governor.loky_lanes import LokyConfig, LokyLanes
from governor.metrics import MetricsRecorder
from governor.proctree import mib
from governor.task import CancelRequest, Task, TaskState

log = logging.getLogger("governor")


@attrs.frozen
class ManagerConfig:
    """What the manager needs to know to run the lanes; built by the Supervisor.

    ``local`` describes the loky lanes; with ``ray`` (a ``governor.ray_lane.RayConfig``)
    the pool lane runs on Ray instead and ``local`` covers the critical lane alone.
    """

    local: LokyConfig
    pool_workers: int
    on_dispatch: Optional[Callable[[Task], None]] = None
    ray: Optional[Any] = None


class Manager(threading.Thread):
    """The manager thread. Public methods other threads may call: ``post``, ``append``,
    ``wake``, ``call_soon``, ``connect`` and ``start`` (before it runs), ``warm`` (an Event)
    and ``start_error``; the rest is the host API of ``governor.backend.LaneHost`` and
    runs on this thread."""

    def __init__(self, config: ManagerConfig, metrics: MetricsRecorder,
                 on_left_queue: Callable[[Task], None], cancel_task: Callable[[Task, CancelRequest], bool],
                 clock: Callable[[], float]):
        super().__init__(name="governor-manager", daemon=True)
        self._config = config
        self.metrics = metrics
        self.left_queue = on_left_queue
        self._cancel_task = cancel_task  # the Supervisor's: the one place a cancel is made
        self.clock = clock
        self.warm = threading.Event()
        self.start_error: Optional[BaseException] = None
        self._closing = False

        self._inbox: Deque[tuple] = collections.deque()
        self._wakeup_reader, self._wakeup_writer = os.pipe()
        self._wakeup_lock = threading.Lock()
        os.set_blocking(self._wakeup_reader, False)
        os.set_blocking(self._wakeup_writer, False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self._wakeup_reader, selectors.EVENT_READ, (None, None))

        local = LokyLanes(self, config.local)
        self._all: List[LaneBackend] = [local]
        if config.ray is not None:
            from governor.ray_lane import RayLane  # Ray is an optional extra
            self._all.append(RayLane(self, config.ray, config.pool_workers, config.local.steps, config.local.spares))
        self._backends: Dict[Lane, LaneBackend] = {lane: backend for backend in self._all for lane in backend.lanes}
        metrics.lane_gauges = self._gauges

    def _gauges(self) -> Dict[str, Any]:
        return {lane: gauges for backend in self._all for lane, gauges in backend.gauges().items()}

    def connect(self) -> None:
        """Before :meth:`start`, on the caller's thread: let each backend reach its workers'
        infrastructure (join the Ray cluster). If one fails, everything is released."""
        try:
            for backend in self._all:
                backend.connect()
        except BaseException:
            self._close()
            raise

    # ----------------------------------------------------------------- other threads

    def post(self, *message: Any) -> None:
        """Put a message on the inbox and wake the manager (any thread)."""
        self._inbox.append(message)
        self.wake()

    def append(self, *message: Any) -> None:
        """Put a message on the inbox without waking the manager; call :meth:`wake` after.

        For a caller that must order messages under its own lock but should not wake the
        manager while holding it (the manager would wake straight into that lock).
        """
        self._inbox.append(message)

    def call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the manager thread (any thread; a backend's news)."""
        self.post("call", fn, *args)

    def wake(self) -> None:
        """Wake the manager to read its inbox (any thread)."""
        # Under the lock, so a late message (a loky callback after shutdown) never writes to
        # the pipe's fd number after _close() released it to be reused by another file.
        with self._wakeup_lock:
            if self._wakeup_writer is None:
                return  # the manager has exited: nothing is listening
            try:
                os.write(self._wakeup_writer, b"\0")
            except BlockingIOError:
                pass  # the pipe is full, so a wake-up is already pending

    # ----------------------------------------------------------------- the loop

    def run(self) -> None:
        try:
            for backend in self._all:
                backend.begin()
            while not self._finished():
                self._wait_for_events()
                self._drain_inbox()
                for backend in self._all:
                    backend.on_time()
                for backend in self._all:
                    backend.dispatch()
                if not self._closing:
                    for backend in self._all:
                        backend.maintain()
                if not self.warm.is_set() and all(backend.warm for backend in self._all):
                    self.warm.set()
        except BaseException as exc:  # a bug here must not leave workers behind
            log.critical("governor manager thread failed", exc_info=True)
            self.start_error = self.start_error or exc
            self._fail_everything(exc)
        finally:
            self.warm.set()
            self._close()

    def _finished(self) -> bool:
        return self._closing and all(backend.quiet for backend in self._all)

    def _wait_for_events(self) -> None:
        due = [when for when in (backend.next_deadline() for backend in self._all) if when is not None]
        timeout = max(0.0, min(due) - self.clock()) if due else None
        for key, _ in self.selector.select(timeout):
            backend, payload = key.data
            if backend is None:
                self._drain_wakeups()
            else:
                backend.on_readable(payload)

    def _drain_wakeups(self) -> None:
        # One read: if more than 4 KiB of wake-ups were pending, the (level-triggered) select
        # wakes again. A second read only to meet EAGAIN would cost a syscall, and with it a
        # GIL hand-off, on every round trip.
        try:
            os.read(self._wakeup_reader, 4096)
        except BlockingIOError:
            pass

    def _drain_inbox(self) -> None:
        while self._inbox:
            kind, *args = self._inbox.popleft()
            getattr(self, f"_on_{kind}")(*args)

    # ----------------------------------------------------------------- inbox messages

    def _on_call(self, fn: Callable[..., None], *args: Any) -> None:
        fn(*args)

    def _on_submit(self, tasks: Sequence[Task]) -> None:
        debug = log.isEnabledFor(logging.DEBUG)
        for task in tasks:
            self._backends[task.lane].queue(task.lane).append(task)
            if debug:
                log.debug("task %s (%s) queued", task.public_id, task.step,
                          extra={"task_id": task.public_id, "step": task.step, "lane": task.lane.value})

    def _on_cancel(self, task: Task) -> None:
        """A cancel was recorded on ``task``: stop it if it runs, settle its workflow if queued."""
        if task.state is TaskState.CANCELLED:
            self._settle_workflow(task, None)  # cancelled in its queue: the canceller did the rest
            return
        self._backends[task.lane].cancel(task)

    def _on_shutdown(self, cancel_pending: bool, cancel_running: bool) -> None:
        self._closing = True
        request = CancelRequest("shutdown", "the supervisor is shutting down")
        if cancel_pending:
            for queue in self._queues():
                for task in list(queue):
                    self._cancel_task(task, request)
        if cancel_running:
            for backend in self._all:
                for task in backend.running_tasks():
                    self._cancel_task(task, request)

    def _on_describe(self, reply: concurrent.futures.Future) -> None:
        """Answer ``Supervisor.describe_workers()``: one dict per live worker."""
        now = self.clock()
        reply.set_result([worker for backend in self._all for worker in backend.describe(now)])

    def _queues(self) -> List[Deque[Task]]:
        return [backend.queue(lane) for lane, backend in self._backends.items()]

    # ----------------------------------------------------------------- the host API (LaneHost)

    @property
    def closing(self) -> bool:
        return self._closing

    def fail_start(self, error: BaseException) -> None:
        self.start_error = error
        self._closing = True
        self.warm.set()

    def record_dispatch(self, task: Task) -> bool:
        """Run the ``on_dispatch`` hook (a journal's durable "started"); fail the task if it fails.

        A step whose start could not be recorded must not run: after a crash nobody could
        tell that it had, and a critical step would run twice.
        """
        if self._config.on_dispatch is None:
            return True
        try:
            self._config.on_dispatch(task)
        except Exception as exc:
            log.exception("could not record the start of task %s (%s)", task.id, task.step)
            self.finish(task, TaskState.FAILED, WorkerStartFailed(
                f"the start of step {task.step!r} could not be recorded, so it was not run: {exc}"))
            return False
        return True

    def fail_queued(self, task: Task, error: BaseException) -> None:
        """Fail a task that never left its queue (its lane has no worker to run it)."""
        task.error = error
        self._settle_unrun(task, TaskState.FAILED)
        self._settle_workflow(task, None)

    def end_from_outcome(self, task: Task, outcome: worker.Outcome) -> bool:
        """End a task from its worker's outcome (any thread); ``False`` if it had ended, or
        was claimed for a kill (the kill then decides how it ends)."""
        task.started_at, task.ended_at = outcome.started_at, outcome.ended_at
        if outcome.peak_rss_bytes is not None:
            task.peak_rss_bytes = max(task.peak_rss_bytes or 0, outcome.peak_rss_bytes)
        if outcome.kind == "ok":
            state, error = TaskState.DONE, None
        elif outcome.kind == "cancelled":
            state, error = TaskState.CANCELLED, task.cancelled_error()
        elif outcome.kind == "over_memory":
            state, error = TaskState.OVER_MEMORY, MemoryLimitExceeded(
                task.step, task.id, task.limits.effective_memory_mb, mib(task.peak_rss_bytes), outcome.pid,
                killed=False)
        else:
            state, error = TaskState.FAILED, StepFailed(
                task.step, task.id, outcome.exc_type, outcome.exc_message, outcome.traceback_text,
                outcome.exception)
        if not task.end(state, error):
            return False
        self.metrics.task_finished(task)  # before resolving: a caller that got its result sees it counted
        task.resolve(outcome.value)
        return True

    def finish(self, task: Task, state: TaskState, error: Optional[BaseException], by_kill: bool = False) -> None:
        """End a running task from the manager (a kill, a crash, a transport failure)."""
        if not task.end(state, error, by_kill):
            log.error("task %s (%s) had already ended when it was to end %s", task.id, task.step, state.value)
            return
        if task.ended_at is None:
            task.ended_at = self.clock()
        self.metrics.task_finished(task)
        task.resolve()
        self.task_ended(task, None)

    def task_ended(self, task: Task, result: Any) -> None:
        """The manager's share of a task's end: tables, log, workflow."""
        self._backends[task.lane].forget(task)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("task %s (%s) %s", task.public_id, task.step, task.state.value,
                      extra={"task_id": task.public_id, "step": task.step, "lane": task.lane.value, "pid": task.pid,
                             "reason": task.state.value})
        self._settle_workflow(task, result)

    def _settle_workflow(self, task: Task, result: Any) -> None:
        if task.workflow is None:
            return
        for later in task.workflow.step_finished(task, result):
            self._settle_unrun(later, TaskState.SKIPPED)

    def _settle_unrun(self, task: Task, state: TaskState) -> None:
        """End a queued task that will never run (failed or skipped), unless it was cancelled."""
        try:
            task.transition(state)
        except InvalidTransition:
            return  # cancelled meanwhile: it is settled already
        self.left_queue(task)
        self.metrics.task_finished(task)
        task.resolve()

    # ----------------------------------------------------------------- the end

    def _fail_everything(self, error: BaseException) -> None:
        for queue in self._queues():
            for task in queue:
                if task.request_cancel(CancelRequest("shutdown", f"manager failed: {error}"))[1]:
                    task.resolve()
        for backend in self._all:
            backend.abort()

    def _close(self) -> None:
        for backend in self._all:
            backend.close()
        self.selector.close()
        with self._wakeup_lock:
            os.close(self._wakeup_reader)
            os.close(self._wakeup_writer)
            self._wakeup_writer = None
