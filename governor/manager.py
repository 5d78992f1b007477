"""The supervisor's manager thread: the one owner of lanes, slots, timers and running tasks.

Data flow::

    user threads ── submit / cancel / shutdown ──┐
    loky threads ── a slot's future is done ─────┤   (messages on the inbox, then a byte
    spawn threads ── a slot's worker is warm ────┘    on the wakeup pipe)
                                                 v
                     manager thread: selector.select(timeout = next timer)
                       ├─ wakeup pipe    -> drain the inbox
                       ├─ control socket -> a new worker says hello (pid)
                       ├─ worker socket  -> EOF: that worker is dead (killed or crashed)
                       └─ timers         -> timeouts, cancel grace, memory samples
                                                 v
                     dispatch: queued task -> idle slot -> loky executor.submit(run_task)

A *slot* is one loky ``ProcessPoolExecutor`` with a single worker. One dead worker breaks
a whole loky executor and fails every future on it (loky ``terminate_broken``); with one
worker per executor a death breaks exactly one slot, whose one task is the only one that
can fail. The broken executor is shut down in the background and an idle spare takes
the slot's place at once, so killing a worker costs neither innocent tasks nor capacity.

Each lane keeps ``workers + spares`` live slots and runs at most ``workers`` tasks at a
time: the critical lane is one worker (strict order) plus a warm spare.

Only this thread touches lanes, slots, timers and the running-task table. Other threads
put messages on the inbox; the one exception is cancelling a queued task (see
``governor.task``). Done-callbacks of the users' futures run on this thread.
"""

from __future__ import annotations

import collections
import concurrent.futures
import enum
import functools
import logging
import os
import re
import selectors
import shutil
import socket
import tempfile
import threading
import traceback
from multiprocessing.connection import Connection
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

import attrs
import loky
from loky.process_executor import BrokenProcessPool

from governor import worker
from governor.errors import (InvalidTransition, MemoryLimitExceeded, StepFailed, StepTimeout,
                             WorkerCrashed, WorkerStartFailed)
from governor.limits import Lane
from governor.metrics import MetricsRecorder
from governor.proctree import TreeSampler, exit_status, kill_tree
from governor.task import CancelRequest, KillOrder, Task, TaskState
from governor.timers import Timers

log = logging.getLogger("governor")

#: How often the RSS of each memory-limited task's process tree is sampled. At 10 ms a step
#: allocating 500 MB/s overshoots by about 5 MB before it is seen.
MEMORY_SAMPLE_INTERVAL_S = 0.01

#: How long a killed worker may take to show it is dead (EOF on its socket) before the
#: slot is written off anyway. SIGKILL is not refusable; this only guards a socket leaked
#: into a process that escaped the kill.
KILL_CONFIRM_S = 2.0

#: How long a new worker may take to start and warm up before the start counts as failed.
WORKER_START_TIMEOUT_S = 60.0

#: How long a lane that still has a warm spare waits before starting a replacement for a
#: lost worker. Starting a worker costs a core for ~0.1 s (a new interpreter), and doing it
#: at once slowed the confirmation of the kill that caused it; the spare covers capacity.
REPLACE_DELAY_S = 0.05

#: Back-off between attempts to replace a worker when starting one fails.
RESPAWN_BACKOFF_S = (0.1, 0.5, 2.0, 10.0)

#: After this many failed starts in a row, a lane with no worker fails its queued tasks.
MAX_START_FAILURES = 3


class SlotState(enum.Enum):
    """A slot's life: STARTING -> IDLE <-> BUSY -> (KILLING ->) DEAD, or -> RETIRING."""

    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    KILLING = "killing"
    RETIRING = "retiring"
    DEAD = "dead"


@attrs.define(eq=False)
class Slot:
    """One single-worker loky executor and what the manager knows about its worker."""

    id: int
    lane: Lane
    state: SlotState = SlotState.STARTING
    executor: Optional[loky.ProcessPoolExecutor] = None
    pid: Optional[int] = None
    control: Optional[Connection] = None
    task: Optional[Task] = None
    loky_future: Optional[concurrent.futures.Future] = None
    sampler: Optional[TreeSampler] = None
    kill: Optional[KillOrder] = None
    tasks_run: int = 0

    @property
    def ready(self) -> bool:
        return self.executor is not None and self.control is not None


@attrs.define(eq=False)
class LaneState:
    """A lane's queue and slots, as the manager sees them.

    Slot states change only through :meth:`move`, which keeps the per-state counts, the
    idle stack and the tuple of worker pids in step, so the hot loop reads them in O(1)
    and :meth:`gauges` can be read from any thread without a lock (each read is one int,
    one ``len`` or one tuple: a snapshot may be a task apart, never torn).
    """

    lane: Lane
    workers: int
    spares: int
    queue: Deque[Task] = attrs.field(factory=collections.deque)
    slots: Dict[int, Slot] = attrs.field(factory=dict)
    idle: List[Slot] = attrs.field(factory=list)
    counts: collections.Counter = attrs.field(factory=collections.Counter)
    start_failures: int = 0
    respawn_pending: bool = False
    pids: Tuple[int, ...] = ()

    def add(self, slot: Slot) -> None:
        self.slots[slot.id] = slot
        self.counts[slot.state] += 1

    def move(self, slot: Slot, state: SlotState) -> None:
        """Put ``slot`` in ``state``; DEAD and RETIRING slots leave the lane."""
        joins_or_leaves = slot.state is SlotState.STARTING or state in (SlotState.DEAD, SlotState.RETIRING)
        if slot.id in self.slots:
            self.counts[slot.state] -= 1
            if slot.state is SlotState.IDLE:
                if self.idle and self.idle[-1] is slot:
                    self.idle.pop()
                else:
                    self.idle.remove(slot)
        slot.state = state
        if state in (SlotState.DEAD, SlotState.RETIRING):
            self.slots.pop(slot.id, None)
        else:
            self.slots[slot.id] = slot
            self.counts[state] += 1
            if state is SlotState.IDLE:
                self.idle.append(slot)
        if joins_or_leaves:
            self.pids = tuple(slot.pid for slot in self.slots.values()
                              if slot.pid is not None and slot.state is not SlotState.STARTING)

    def count(self, *states: SlotState) -> int:
        return sum(self.counts[state] for state in states)

    @property
    def live(self) -> int:
        """Slots that are or will be able to run a task."""
        return self.count(SlotState.STARTING, SlotState.IDLE, SlotState.BUSY)

    @property
    def spares_ready(self) -> int:
        """Idle warm workers beyond those the lane may still put to work."""
        return max(0, len(self.idle) - (self.workers - self.counts[SlotState.BUSY]))

    def gauges(self) -> Dict[str, Any]:
        """The lane's gauges for metrics (safe to call from any thread)."""
        return {"busy": self.counts[SlotState.BUSY], "idle": len(self.idle),
                "starting": self.counts[SlotState.STARTING], "spares_ready": self.spares_ready,
                "worker_pids": self.pids}


@attrs.frozen
class ManagerConfig:
    """What the manager needs to know to run the lanes; built by the Supervisor."""

    steps: Dict[str, Any]
    step_modules: Sequence[str]
    workers: Dict[Lane, int]
    spares: int
    max_tasks_per_worker: Optional[int]
    recycle_rss_mb: Optional[float]
    on_dispatch: Optional[Callable[[Task], None]] = None
    ray: Optional[Any] = None  # a governor.ray_lane.RayConfig: the pool lane runs on Ray


class Manager(threading.Thread):
    """The manager thread. Public methods other threads may call: ``post``, ``start``,
    ``warm`` (an Event) and ``start_error``; everything else runs on this thread."""

    def __init__(self, config: ManagerConfig, metrics: MetricsRecorder,
                 on_left_queue: Callable[[Task], None], cancel_task: Callable[[Task, CancelRequest], bool],
                 clock: Callable[[], float]):
        super().__init__(name="governor-manager", daemon=True)
        self._config = config
        self._metrics = metrics
        self._on_left_queue = on_left_queue
        self._cancel_task = cancel_task  # the Supervisor's: the one place a cancel is made
        self._clock = clock
        self.warm = threading.Event()
        self.start_error: Optional[BaseException] = None

        self._inbox: Deque[tuple] = collections.deque()
        self._wakeup_reader, self._wakeup_writer = os.pipe()
        self._wakeup_lock = threading.Lock()
        os.set_blocking(self._wakeup_reader, False)
        os.set_blocking(self._wakeup_writer, False)

        self._socket_dir = tempfile.mkdtemp(prefix="governor-")
        self._control_address = os.path.join(self._socket_dir, "control")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self._control_address)
        self._listener.listen(64)
        self._listener.setblocking(False)

        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wakeup_reader, selectors.EVENT_READ, ("wakeup", None))
        self._selector.register(self._listener, selectors.EVENT_READ, ("accept", None))

        # The lanes of local slots; with a Ray backend the pool lane is self._ray instead.
        self._lanes: Dict[Lane, LaneState] = {
            lane: LaneState(lane, count, config.spares) for lane, count in config.workers.items()
            if not (lane is Lane.POOL and config.ray is not None)}
        self._slots: Dict[int, Slot] = {}
        self._slot_ids = iter(range(1, 2 ** 62))
        self._running: Dict[int, Slot] = {}
        self._memory_watched: Dict[int, Task] = {}
        self._next_sample_at: Optional[float] = None
        self._timers = Timers(clock)
        self._spawner = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="governor-spawn")
        self._pending_spawns = 0
        self._closing = False
        self._ray = None
        if config.ray is not None:
            from governor.ray_lane import RayLane  # Ray is an optional extra
            self._ray = RayLane(self, config.ray, config.workers[Lane.POOL], config.steps, metrics, self._timers,
                                self._selector, on_left_queue, clock)
        metrics.lane_gauges = self._gauges

    def _gauges(self) -> Dict[str, Any]:
        gauges = {lane.lane.value: lane.gauges() for lane in self._lanes.values()}
        if self._ray is not None:
            gauges[Lane.POOL.value] = self._ray.gauges()
        return gauges

    def connect(self) -> None:
        """Before :meth:`start`, on the caller's thread: join the cluster of a remote lane.

        Raises what ``RayLane.connect`` raises; the manager then holds no resources.
        """
        if self._ray is not None:
            try:
                self._ray.connect()
            except BaseException:
                self._close_resources()
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
            for lane in self._lanes.values():
                for _ in range(lane.workers + lane.spares):
                    self._spawn(lane)
            while not self._finished():
                self._wait_for_events()
                self._drain_inbox()
                self._fire_timers()
                self._dispatch()
                self._keep_lanes_full()
        except BaseException as exc:  # a bug here must not leave workers behind
            log.critical("governor manager thread failed", exc_info=True)
            self.start_error = self.start_error or exc
            self._fail_everything(exc)
        finally:
            self.warm.set()
            self._close()

    def _finished(self) -> bool:
        if not self._closing:
            return False
        return not self._running and self._pending_spawns == 0 and not any(
            task.state is TaskState.QUEUED for lane in self._lanes.values() for task in lane.queue) and (
            self._ray is None or self._ray.quiet)

    def _wait_for_events(self) -> None:
        due = [when for when in (self._timers.next_due(), self._next_sample_at) if when is not None]
        timeout = max(0.0, min(due) - self._clock()) if due else None
        for key, _ in self._selector.select(timeout):
            kind, slot = key.data
            if kind == "wakeup":
                self._drain_wakeups()
            elif kind == "accept":
                self._accept_worker()
            elif kind == "hello":
                self._read_hello(key.fileobj)
            elif kind == "ray":
                self._ray.on_readable(slot)
            else:
                self._read_control(slot)

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

    def _queue(self, lane: Lane) -> Deque[Task]:
        if lane is Lane.POOL and self._ray is not None:
            return self._ray.queue
        return self._lanes[lane].queue

    def _on_submit(self, tasks: Sequence[Task]) -> None:
        debug = log.isEnabledFor(logging.DEBUG)
        for task in tasks:
            self._queue(task.lane).append(task)
            if debug:
                log.debug("task %s (%s) queued", task.id, task.step,
                          extra={"task_id": task.id, "step": task.step, "lane": task.lane.value})

    def _on_cancel(self, task: Task) -> None:
        """A cancel was recorded on ``task``: stop it if it runs, settle its workflow if queued."""
        if task.state is TaskState.CANCELLED:
            self._settle_workflow(task, None)  # cancelled in its queue: the canceller did the rest
            return
        if self._ray is not None and self._ray.runs(task):
            self._ray.cancel(task)
            return
        slot = self._running.get(task.id)
        if slot is None or slot.state is not SlotState.BUSY:
            return  # it already ended, or its worker is being killed anyway
        request = task.cancel_request
        grace = task.limits.effective_cancel_grace_s
        try:
            slot.control.send(("cancel", task.id, request.reason, request.detail))
        except OSError:
            pass  # the worker just died: its EOF settles the task
        if grace == 0:
            self._kill(slot, "cancel", TaskState.CANCELLED, task.cancelled_error(killed=True), 0.0, None)
        else:
            self._timers.after(grace, "grace", task)

    def _on_shutdown(self, cancel_pending: bool, cancel_running: bool) -> None:
        self._closing = True
        request = CancelRequest("shutdown", "the supervisor is shutting down")
        if cancel_pending:
            for queue in self._queues():
                for task in list(queue):
                    self._cancel_task(task, request)
        if cancel_running:
            for task in self._running_tasks():
                self._cancel_task(task, request)

    def _queues(self) -> List[Deque[Task]]:
        return [lane.queue for lane in self._lanes.values()] + ([self._ray.queue] if self._ray else [])

    def _running_tasks(self) -> List[Task]:
        return [slot.task for slot in self._running.values()] + (self._ray.running_tasks() if self._ray else [])

    def _on_ray(self, method: str, *args: Any) -> None:
        """A message for the Ray lane, from its acceptor thread or a Ray callback."""
        getattr(self._ray, f"on_{method}")(*args)

    def _on_describe(self, reply: concurrent.futures.Future) -> None:
        """Answer ``Supervisor.describe_workers()``: one dict per live worker."""
        now = self._clock()
        described = []
        for lane in self._lanes.values():
            for slot in lane.slots.values():
                task = slot.task
                described.append({
                    "pid": slot.pid, "lane": lane.lane.value, "state": slot.state.value,
                    "task_id": task.id if task else None, "step": task.step if task else None,
                    "running_s": (now - task.dispatched_at) if task else None, "tasks_run": slot.tasks_run,
                    "rss_bytes": slot.sampler.rss_bytes() if slot.sampler else None})
        if self._ray is not None:
            described.extend(self._ray.describe(now))
        reply.set_result(described)

    def _on_loky_done(self, slot: Slot, task: Task, future: concurrent.futures.Future, ended: bool) -> None:
        """A slot's loky future is done; ``ended`` says the loky thread already ended the task."""
        if slot.task is not task:
            return  # the slot already settled this task (its worker died first)
        error = future.exception()
        if ended:
            self._release(slot)
            self.task_ended(task, future.result().value)
            if slot.state is SlotState.BUSY:  # not if the worker died after sending the outcome
                self._after_task(slot, future)
            return
        if isinstance(error, BrokenProcessPool):
            if slot.state is SlotState.DEAD:  # we saw the death first and waited for this
                self._crashed(slot, task, *_exit_from_loky_error(error))
            else:  # loky saw the death before our socket did (a forked child kept it open)
                self._on_worker_gone(slot, loky_error=error)
            return
        if slot.state is SlotState.KILLING:
            return  # claimed for a kill before its outcome came back: the kill decides
        self._release(slot)
        # The step ran, but loky could not send its outcome back (unpicklable result).
        self.finish(task, TaskState.FAILED, self._transport_error(task, error))
        self._after_task(slot, future)

    def _on_started(self, slot: Slot, start: concurrent.futures.Future) -> None:
        """The spawn thread finished starting ``slot``'s worker (or failed to)."""
        self._pending_spawns -= 1
        lane = self._lanes[slot.lane]
        error = start.exception()
        if error is not None:
            self._start_failed(slot, error)
            return
        slot.executor, slot.pid = start.result()
        if slot.state is SlotState.DEAD:  # its worker died between its warm-up and now
            self._stop_executor(slot)
            return
        if self._closing:
            self._retire(slot)
            return
        if slot.state is SlotState.STARTING and slot.ready:
            self._slot_ready(slot)
        lane.start_failures = 0

    # ----------------------------------------------------------------- worker sockets

    def _accept_worker(self) -> None:
        try:
            connection, _ = self._listener.accept()
        except BlockingIOError:
            return
        connection.setblocking(True)
        control = Connection(connection.detach())
        self._selector.register(control, selectors.EVENT_READ, ("hello", None))

    def _read_hello(self, control: Connection) -> None:
        self._selector.unregister(control)
        try:
            kind, slot_id, pid = control.recv()
        except (EOFError, OSError):
            control.close()
            return  # a worker that died during its own start: the spawn fails too
        slot = self._slots.get(slot_id)
        if kind != "hello" or slot is None or slot.control is not None:
            log.error("unexpected control connection from pid %s (slot %s)", pid, slot_id)
            control.close()
            return
        slot.control, slot.pid = control, pid
        slot.sampler = TreeSampler(pid, self._clock)
        self._selector.register(control, selectors.EVENT_READ, ("control", slot))
        if slot.state is SlotState.STARTING and slot.ready:
            self._slot_ready(slot)

    def _read_control(self, slot: Slot) -> None:
        try:
            message = slot.control.recv()
        except (EOFError, OSError):
            self._on_worker_gone(slot)
            return
        log.error("unexpected message from worker %s: %r", slot.pid, message)

    # ----------------------------------------------------------------- dispatch

    def _dispatch(self) -> None:
        for lane in self._lanes.values():
            while lane.queue and lane.idle and lane.counts[SlotState.BUSY] < lane.workers:
                task = lane.queue.popleft()
                try:
                    task.transition(TaskState.RUNNING)
                except InvalidTransition:
                    continue  # cancelled or skipped while it waited: lazy removal
                self._on_left_queue(task)
                if self.record_dispatch(task):
                    self._start_task(lane.idle[-1], task)
        if self._ray is not None:
            self._ray.dispatch()

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

    def _start_task(self, slot: Slot, task: Task) -> None:
        limits = task.limits
        now = self._clock()
        self._lanes[slot.lane].move(slot, SlotState.BUSY)
        slot.task = task
        task.dispatched_at, task.pid = now, slot.pid
        self._running[task.id] = slot
        hard_cap = limits.effective_memory_mb if limits.memory_hard_cap else None
        future = slot.executor.submit(worker.run_task, task.id, task.step, task.args, task.kwargs, hard_cap)
        slot.loky_future = future
        future.add_done_callback(functools.partial(self._post_loky_done, slot, task))
        if limits.effective_timeout_s is not None:
            self._timers.after(limits.effective_timeout_s, "timeout", task)
        if limits.effective_memory_mb is not None:
            self._memory_watched[task.id] = task
            if self._next_sample_at is None:
                self._next_sample_at = now + MEMORY_SAMPLE_INTERVAL_S
        if log.isEnabledFor(logging.DEBUG):
            log.debug("task %s (%s) started on worker %s", task.id, task.step, slot.pid,
                      extra={"task_id": task.id, "step": task.step, "lane": task.lane.value, "pid": slot.pid})

    def _post_loky_done(self, slot: Slot, task: Task, future: concurrent.futures.Future) -> None:
        """Done-callback, on the slot's loky thread: end the task if its outcome came back.

        Ending it here hands the caller its result without a hop through the manager; the
        task's lock settles the race with a kill (see ``Task.claim_for_kill``). Everything
        else (slot, metrics, workflow) is the manager's, so only the news goes on.
        """
        ended = future.exception() is None and self.end_from_outcome(task, future.result())
        self.post("loky_done", slot, task, future, ended)

    # ----------------------------------------------------------------- ending tasks

    def end_from_outcome(self, task: Task, outcome: worker.Outcome) -> bool:
        task.started_at, task.ended_at = outcome.started_at, outcome.ended_at
        if outcome.peak_rss_bytes is not None:
            task.peak_rss_bytes = max(task.peak_rss_bytes or 0, outcome.peak_rss_bytes)
        if outcome.kind == "ok":
            state, error = TaskState.DONE, None
        elif outcome.kind == "cancelled":
            state, error = TaskState.CANCELLED, task.cancelled_error()
        elif outcome.kind == "over_memory":
            state, error = TaskState.OVER_MEMORY, MemoryLimitExceeded(
                task.step, task.id, task.limits.effective_memory_mb, _mib(task.peak_rss_bytes), outcome.pid,
                killed=False)
        else:
            state, error = TaskState.FAILED, StepFailed(
                task.step, task.id, outcome.exc_type, outcome.exc_message, outcome.traceback_text,
                outcome.exception)
        if not task.end(state, error):
            return False
        self._metrics.task_finished(task)  # before resolving: a caller that got its result sees it counted
        task.resolve(outcome.value)
        return True

    @staticmethod
    def _transport_error(task: Task, error: BaseException) -> StepFailed:
        remote = getattr(error.__cause__, "tb", None) or "".join(traceback.format_exception(error))
        return StepFailed(task.step, task.id, type(error).__qualname__,
                          f"its result could not be sent back from the worker: {error}", remote)

    def finish(self, task: Task, state: TaskState, error: Optional[BaseException], by_kill: bool = False) -> None:
        """End a running task from the manager (a kill, a crash, a transport failure)."""
        if not task.end(state, error, by_kill):
            log.error("task %s (%s) had already ended when it was to end %s", task.id, task.step, state.value)
            return
        if task.ended_at is None:
            task.ended_at = self._clock()
        self._metrics.task_finished(task)
        task.resolve()
        self.task_ended(task, None)

    def task_ended(self, task: Task, result: Any) -> None:
        """The manager's share of a task's end: tables, log, workflow."""
        self._running.pop(task.id, None)
        self._memory_watched.pop(task.id, None)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("task %s (%s) %s", task.id, task.step, task.state.value,
                      extra={"task_id": task.id, "step": task.step, "lane": task.lane.value, "pid": task.pid,
                             "reason": task.state.value})
        self._settle_workflow(task, result)

    def _settle_workflow(self, task: Task, result: Any) -> None:
        if task.workflow is None:
            return
        for later in task.workflow.step_finished(task, result):
            try:
                later.transition(TaskState.SKIPPED)
            except InvalidTransition:
                continue  # cancelled meanwhile: it is settled already
            self._on_left_queue(later)
            self._metrics.task_finished(later)
            later.resolve()

    def _release(self, slot: Slot) -> None:
        slot.task = slot.loky_future = None
        slot.tasks_run += 1

    def _after_task(self, slot: Slot, future: concurrent.futures.Future) -> None:
        """Put a slot back to work, or recycle its worker if it leaked or ran its quota."""
        config = self._config
        outcome = future.result() if future.exception() is None else None
        rss = outcome.rss_bytes if outcome is not None else None
        if config.max_tasks_per_worker is not None and slot.tasks_run >= config.max_tasks_per_worker:
            self._recycle(slot, "max_tasks")
        elif config.recycle_rss_mb is not None and rss is not None and rss > config.recycle_rss_mb * 2 ** 20:
            self._recycle(slot, "leak")
        else:
            self._lanes[slot.lane].move(slot, SlotState.IDLE)

    # ----------------------------------------------------------------- limits and kills

    def _fire_timers(self) -> None:
        if self._next_sample_at is not None and self._clock() >= self._next_sample_at:
            self._sample_memory()
        for kind, target in self._timers.pop_due():
            if kind.startswith("ray_"):
                self._ray.on_timer(kind, target)
                continue
            if kind == "respawn":
                target.respawn_pending = False
                if not self._closing:
                    self._fill(target)
                continue
            task = target
            slot = self._running.get(task.id)
            if slot is None or slot.task is not task:
                continue  # the task ended before its timer: a stale entry
            if kind == "crash_report" and slot.state is SlotState.DEAD:
                self._crashed(slot, task, None, None)
            elif kind == "confirm" and slot.state is SlotState.KILLING:
                log.warning("worker %s showed no sign of death %ss after SIGKILL; writing it off",
                            slot.pid, KILL_CONFIRM_S)
                self._on_worker_gone(slot)
            elif kind == "timeout" and slot.state is SlotState.BUSY:
                elapsed = self._clock() - task.dispatched_at
                limit = task.limits.effective_timeout_s
                self._kill(slot, "timeout", TaskState.TIMED_OUT,
                           StepTimeout(task.step, task.id, limit, elapsed, slot.pid), limit, elapsed)
            elif kind == "grace" and slot.state is SlotState.BUSY:
                self._kill(slot, "cancel", TaskState.CANCELLED, task.cancelled_error(killed=True),
                           task.limits.effective_cancel_grace_s, None)
        if len(self._timers) > 64 and len(self._timers) > 4 * len(self._running_tasks()):
            self._timers.prune(lambda kind, target: kind == "respawn" or target.state is TaskState.RUNNING)

    def _sample_memory(self) -> None:
        for task in list(self._memory_watched.values()):
            slot = self._running.get(task.id)
            if slot is None or slot.state is not SlotState.BUSY:
                continue
            rss = slot.sampler.rss_bytes()
            task.peak_rss_bytes = max(task.peak_rss_bytes or 0, rss)
            limit_mb = task.limits.effective_memory_mb
            if rss <= limit_mb * 2 ** 20:
                continue
            # Confirm before acting: the task may have just finished (its result is on the
            # way), or the figure was a transient one.
            if slot.loky_future.done() or slot.sampler.rss_bytes() <= limit_mb * 2 ** 20:
                continue
            peak_mb = _mib(task.peak_rss_bytes)
            self._kill(slot, "memory", TaskState.OVER_MEMORY,
                       MemoryLimitExceeded(task.step, task.id, limit_mb, peak_mb, slot.pid), limit_mb, peak_mb)
        self._next_sample_at = (self._clock() + MEMORY_SAMPLE_INTERVAL_S) if self._memory_watched else None

    def _kill(self, slot: Slot, reason: str, state: TaskState, error: BaseException,
              limit: Optional[float], observed: Optional[float]) -> None:
        """Kill the worker running a task and its whole process tree; the task ends on its EOF.

        Args:
            reason: timeout, memory or cancel (the metrics label and the log's reason).
            state, error: how the task will end once the worker is seen dead.
            limit, observed: the limit enforced and the value seen, for the log record.
        """
        task = slot.task
        if not task.claim_for_kill():
            return  # its outcome came back first and ended it: nothing to kill
        slot.kill = KillOrder(reason, state, error)
        self._lanes[slot.lane].move(slot, SlotState.KILLING)
        kill_tree(slot.pid, slot.sampler)
        self._metrics.worker_killed(slot.lane, reason)
        self._timers.after(KILL_CONFIRM_S, "confirm", task)
        _log_death(task, slot, reason, limit, observed, f"killed worker {slot.pid}: {error}")

    def _on_worker_gone(self, slot: Slot, loky_error: Optional[BaseException] = None) -> None:
        """A worker's socket closed (or loky reported it dead): it died, was killed, or retired."""
        if slot.state is SlotState.DEAD:
            return
        previous = slot.state
        self._drop(slot)  # the lane counts one live slot fewer: a replacement starts
        if previous is SlotState.RETIRING:
            return
        task = slot.task
        if task is None:
            if slot.kill is None:
                log.warning("idle worker %s of the %s lane died", slot.pid, slot.lane.value)
            self._stop_executor(slot)
        elif slot.kill is not None:
            slot.task = None
            # EOF comes when the worker's files close, a moment before it is a zombie: wait
            # for that moment, so "the future is resolved" implies "the worker is dead".
            exit_status(slot.pid)
            self.finish(task, slot.kill.state, slot.kill.error, by_kill=True)
            self._stop_executor(slot)
        elif task.state.terminal:
            # Its outcome came back (and ended it) before the worker died: the pending
            # loky_done message settles the task; only the executor is left to stop.
            self._stop_executor(slot)
        else:
            exitcode, signal_number = exit_status(slot.pid)
            if exitcode is None and signal_number is None and loky_error is None:
                # loky reaped the worker before we could read its status; loky's own
                # error, which names the exit code, follows within ~250 ms.
                self._timers.after(KILL_CONFIRM_S, "crash_report", task)
                return
            if exitcode is None and signal_number is None:
                exitcode, signal_number = _exit_from_loky_error(loky_error)
            self._crashed(slot, task, exitcode, signal_number)

    def _crashed(self, slot: Slot, task: Task, exitcode: Optional[int], signal_number: Optional[int]) -> None:
        slot.task = None
        crash = WorkerCrashed(task.step, task.id, slot.pid, exitcode, signal_number)
        self._metrics.worker_killed(slot.lane, "crash")
        _log_death(task, slot, "crash", None, exitcode if signal_number is None else -signal_number, str(crash))
        self.finish(task, TaskState.CRASHED, crash)
        self._stop_executor(slot)

    # ----------------------------------------------------------------- slots

    def _spawn(self, lane: LaneState) -> None:
        slot = Slot(next(self._slot_ids), lane.lane)
        lane.add(slot)
        self._slots[slot.id] = slot
        self._pending_spawns += 1
        start = self._spawner.submit(_start_worker, slot.id, self._control_address,
                                     self._config.steps, self._config.step_modules)
        start.add_done_callback(lambda done: self.post("started", slot, done))

    def _slot_ready(self, slot: Slot) -> None:
        self._lanes[slot.lane].move(slot, SlotState.IDLE)
        self._metrics.worker_spawned(slot.lane)
        if not self.warm.is_set() and all(
                len(lane.idle) == lane.workers + lane.spares for lane in self._lanes.values()):
            self.warm.set()

    def _start_failed(self, slot: Slot, error: BaseException) -> None:
        lane = self._lanes[slot.lane]
        self._drop(slot)
        lane.start_failures += 1
        log.error("could not start a worker for the %s lane (attempt %d): %s",
                  slot.lane.value, lane.start_failures, error)
        if not self.warm.is_set():
            self.start_error = WorkerStartFailed(f"a {slot.lane.value} worker did not start: {error}")
            self.start_error.__cause__ = error
            self.warm.set()
            self._closing = True
            return
        if lane.start_failures >= MAX_START_FAILURES and lane.count(SlotState.IDLE, SlotState.BUSY) == 0:
            failure = WorkerStartFailed(f"no {slot.lane.value} worker could be started "
                                        f"({lane.start_failures} attempts): {error}")
            for task in list(lane.queue):
                task.error = failure
                try:
                    task.transition(TaskState.FAILED)
                except InvalidTransition:
                    continue
                self._on_left_queue(task)
                self._metrics.task_finished(task)
                task.resolve()
                self._settle_workflow(task, None)
            lane.queue.clear()
        lane.respawn_pending = True
        backoff = RESPAWN_BACKOFF_S[min(lane.start_failures, len(RESPAWN_BACKOFF_S)) - 1]
        self._timers.after(backoff, "respawn", lane)

    def _keep_lanes_full(self) -> None:
        if self._closing:
            return
        for lane in self._lanes.values():
            if lane.respawn_pending or lane.live >= lane.workers + lane.spares:
                continue
            if lane.spares_ready > 0:
                lane.respawn_pending = True
                self._timers.after(REPLACE_DELAY_S, "respawn", lane)
            else:
                self._fill(lane)

    def _fill(self, lane: LaneState) -> None:
        for _ in range(lane.workers + lane.spares - lane.live):
            self._spawn(lane)

    def _recycle(self, slot: Slot, reason: str) -> None:
        self._metrics.worker_recycled(slot.lane, reason)
        log.info("recycling worker %s (%s) after %d tasks", slot.pid, reason, slot.tasks_run)
        self._retire(slot)

    def _retire(self, slot: Slot) -> None:
        """Shut a healthy worker down gracefully, in the background."""
        self._lanes[slot.lane].move(slot, SlotState.RETIRING)
        self._stop_executor(slot)

    def _drop(self, slot: Slot) -> None:
        """The slot's worker is gone: it leaves its lane and its socket is closed."""
        self._lanes[slot.lane].move(slot, SlotState.DEAD)
        if slot.control is not None:
            self._selector.unregister(slot.control)
            slot.control.close()
            slot.control = None
        self._slots.pop(slot.id, None)

    def _stop_executor(self, slot: Slot) -> None:
        if slot.executor is not None:
            self._spawner.submit(slot.executor.shutdown, wait=True, kill_workers=slot.state is SlotState.DEAD)

    # ----------------------------------------------------------------- the end

    def _fail_everything(self, error: BaseException) -> None:
        for queue in self._queues():
            for task in queue:
                if task.request_cancel(CancelRequest("shutdown", f"manager failed: {error}"))[1]:
                    task.resolve()
        for slot in list(self._slots.values()):
            if slot.sampler is not None:
                kill_tree(slot.pid, slot.sampler)

    def _close(self) -> None:
        for slot in list(self._slots.values()):
            if slot.state is not SlotState.DEAD:
                self._retire(slot)
        self._spawner.shutdown(wait=True)
        for slot in list(self._slots.values()):
            self._drop(slot)
        self._close_resources()

    def _close_resources(self) -> None:
        if self._ray is not None:
            self._ray.close()
        self._selector.close()
        self._listener.close()
        shutil.rmtree(self._socket_dir, ignore_errors=True)
        with self._wakeup_lock:
            os.close(self._wakeup_reader)
            os.close(self._wakeup_writer)
            self._wakeup_writer = None


def _start_worker(slot_id: int, control_address: str, steps: Dict[str, Any], modules: Sequence[str]):
    """Start one single-worker loky executor and warm its worker (runs on a spawn thread)."""
    executor = loky.ProcessPoolExecutor(
        max_workers=1, initializer=worker.initialize,
        initargs=(slot_id, control_address, steps, list(modules)), env=worker.WORKER_ENV)
    try:
        pid = executor.submit(worker.warm_up).result(timeout=WORKER_START_TIMEOUT_S)
    except BaseException:
        executor.shutdown(wait=True, kill_workers=True)
        raise
    return executor, pid


def _log_death(task: Task, slot: Slot, reason: str, limit: Optional[float], observed: Optional[float],
               message: str) -> None:
    """One WARNING per worker death, with the fields an operator filters on."""
    log.warning(message, extra={"task_id": task.id, "step": task.step, "lane": slot.lane.value,
                                "pid": slot.pid, "reason": reason, "limit": limit, "observed": observed})


def _exit_from_loky_error(error: BaseException) -> tuple:
    """``(exitcode, signal)`` from loky's "The exit codes of the workers are {EXIT(3)}"."""
    match = re.search(r"exit codes of the workers are \{\w+\((-?\d+)\)", str(error))
    if match is None:
        return None, None
    code = int(match.group(1))
    return (code, None) if code >= 0 else (None, -code)


def _mib(size_bytes: Optional[int]) -> Optional[float]:
    return None if size_bytes is None else size_bytes / 2 ** 20
