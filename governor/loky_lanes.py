"""The local lanes: single-worker loky executors on this host (a ``LaneBackend``).

Data flow (every arrow into the manager is a ``call_soon`` on its inbox)::

    spawn threads ── a slot's worker is warm ─────────> _on_started
    loky threads ─── a slot's future is done ─────────> _on_loky_done   (the task already
                                                                          ended there if it could)
    selector ─────── control socket: a worker's hello ─> _read_hello
                     worker socket: EOF ──────────────> _on_worker_gone (killed or crashed)
    timers ───────── timeouts, cancel grace, respawns, memory samples ─> on_time
    dispatch ─────── queued task -> idle slot -> loky executor.submit(run_task)

A *slot* is one loky ``ProcessPoolExecutor`` with a single worker. One dead worker breaks
a whole loky executor and fails every future on it (loky ``terminate_broken``); with one
worker per executor a death breaks exactly one slot, whose one task is the only one that
can fail. The broken executor is shut down in the background and an idle spare takes
the slot's place at once, so killing a worker costs neither innocent tasks nor capacity.

Each lane keeps ``workers + spares`` live slots and runs at most ``workers`` tasks at a
time: the critical lane is one worker (strict order) plus a warm spare.

Workers connect back over a Unix socket (see ``governor.worker``): the hello carries the
pid, cancels travel down it, and its EOF reports a death at once, without polling and
without waiting for loky's own 50-250 ms exit-code loop.
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
import traceback
from multiprocessing.connection import Connection
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

import attrs
import loky
from loky.process_executor import BrokenProcessPool

from governor import worker
from governor.backend import worker_view
from governor.errors import InvalidTransition, MemoryLimitExceeded, StepFailed, StepTimeout, WorkerCrashed, WorkerStartFailed
from governor.limits import Lane
from governor.logs import log_death
from governor.proctree import MEMORY_SAMPLE_INTERVAL_S, TreeSampler, exit_status, kill_tree, mib
from governor.task import KillOrder, Task, TaskState
from governor.timers import Timers

log = logging.getLogger("governor")

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
class LokyConfig:
    """What the local lanes need to know; built by the Supervisor."""

    steps: Dict[str, Any]
    step_modules: Sequence[str]
    workers: Dict[Lane, int]
    spares: int
    max_tasks_per_worker: Optional[int]
    recycle_rss_mb: Optional[float]


class LokyLanes:
    """The lanes whose workers are local loky processes (see the module docstring)."""

    def __init__(self, host: Any, config: LokyConfig):
        self._host = host
        self._config = config
        self._clock = host.clock
        self.lanes = tuple(config.workers)
        self._lanes: Dict[Lane, LaneState] = {
            lane: LaneState(lane, count, config.spares) for lane, count in config.workers.items()}
        self._slots: Dict[int, Slot] = {}
        self._slot_ids = iter(range(1, 2 ** 62))
        self._running: Dict[int, Slot] = {}
        self._memory_watched: Dict[int, Task] = {}
        self._next_sample_at: Optional[float] = None
        self._timers = Timers(host.clock)
        self._spawner = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="governor-spawn")
        self._pending_spawns = 0
        self._warm = False
        self._socket_dir = tempfile.mkdtemp(prefix="governor-")
        self._control_address = os.path.join(self._socket_dir, "control")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self._control_address)
        self._listener.listen(64)
        self._listener.setblocking(False)
        host.selector.register(self._listener, selectors.EVENT_READ, (self, ("accept", None)))

    # ----------------------------------------------------------------- LaneBackend

    def queue(self, lane: Lane) -> Deque[Task]:
        return self._lanes[lane].queue

    def connect(self) -> None:
        """Nothing to reach: the workers are started by :meth:`begin`."""

    def begin(self) -> None:
        for lane in self._lanes.values():
            for _ in range(lane.workers + lane.spares):
                self._spawn(lane)

    @property
    def warm(self) -> bool:
        return self._warm

    @property
    def quiet(self) -> bool:
        return not self._running and self._pending_spawns == 0 and not any(
            task.state is TaskState.QUEUED for lane in self._lanes.values() for task in lane.queue)

    def dispatch(self) -> None:
        for lane in self._lanes.values():
            while lane.queue and lane.idle and lane.counts[SlotState.BUSY] < lane.workers:
                task = lane.queue.popleft()
                try:
                    task.transition(TaskState.RUNNING)
                except InvalidTransition:
                    continue  # cancelled or skipped while it waited: lazy removal
                self._host.left_queue(task)
                if self._host.record_dispatch(task):
                    self._start_task(lane.idle[-1], task)

    def maintain(self) -> None:
        self._keep_lanes_full()

    def next_deadline(self) -> Optional[float]:
        due = [when for when in (self._timers.next_due(), self._next_sample_at) if when is not None]
        return min(due) if due else None

    def on_time(self) -> None:
        if self._next_sample_at is not None and self._clock() >= self._next_sample_at:
            self._sample_memory()
        for kind, target in self._timers.pop_due():
            if kind == "respawn":
                target.respawn_pending = False
                if not self._host.closing:
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
        self._timers.prune_if_stale(len(self._running),
                                    lambda kind, target: kind == "respawn" or target.state is TaskState.RUNNING)

    def on_readable(self, payload: Any) -> None:
        kind, slot = payload
        if kind == "accept":
            self._accept_worker()
        elif kind == "hello":
            self._read_hello(slot)
        else:
            self._read_control(slot)

    def cancel(self, task: Task) -> None:
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

    def running_tasks(self) -> List[Task]:
        return [slot.task for slot in self._running.values()]

    def forget(self, task: Task) -> None:
        self._running.pop(task.id, None)
        self._memory_watched.pop(task.id, None)

    def describe(self, now: float) -> List[Dict[str, Any]]:
        return [worker_view(slot.pid, lane.lane, slot.state.value, now, slot.task, slot.tasks_run,
                            slot.sampler.rss_bytes() if slot.sampler else None)
                for lane in self._lanes.values() for slot in lane.slots.values()]

    def gauges(self) -> Dict[str, Dict[str, Any]]:
        return {lane.lane.value: lane.gauges() for lane in self._lanes.values()}

    def abort(self) -> None:
        for slot in list(self._slots.values()):
            if slot.sampler is not None:
                kill_tree(slot.pid, slot.sampler)

    def close(self) -> None:
        for slot in list(self._slots.values()):
            if slot.state is not SlotState.DEAD:
                self._retire(slot)
        self._spawner.shutdown(wait=True)
        for slot in list(self._slots.values()):
            self._drop(slot)
        self._host.selector.unregister(self._listener)
        self._listener.close()
        shutil.rmtree(self._socket_dir, ignore_errors=True)

    # ----------------------------------------------------------------- slots and workers

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
        if self._host.closing:
            self._retire(slot)
            return
        if slot.state is SlotState.STARTING and slot.ready:
            self._slot_ready(slot)
        lane.start_failures = 0

    def _accept_worker(self) -> None:
        try:
            connection, _ = self._listener.accept()
        except BlockingIOError:
            return
        connection.setblocking(True)
        control = Connection(connection.detach())
        self._host.selector.register(control, selectors.EVENT_READ, (self, ("hello", control)))

    def _read_hello(self, control: Connection) -> None:
        self._host.selector.unregister(control)
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
        self._host.selector.register(control, selectors.EVENT_READ, (self, ("control", slot)))
        if slot.state is SlotState.STARTING and slot.ready:
            self._slot_ready(slot)

    def _read_control(self, slot: Slot) -> None:
        try:
            message = slot.control.recv()
        except (EOFError, OSError):
            self._on_worker_gone(slot)
            return
        log.error("unexpected message from worker %s: %r", slot.pid, message)

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
            log.debug("task %s (%s) started on worker %s", task.public_id, task.step, slot.pid,
                      extra={"task_id": task.public_id, "step": task.step, "lane": task.lane.value,
                             "pid": slot.pid})

    def _post_loky_done(self, slot: Slot, task: Task, future: concurrent.futures.Future) -> None:
        """Done-callback, on the slot's loky thread: end the task if its outcome came back.

        Ending it here hands the caller its result without a hop through the manager; the
        task's lock settles the race with a kill (see ``Task.claim_for_kill``). Everything
        else (slot, metrics, workflow) is the manager's, so only the news goes on.
        """
        ended = future.exception() is None and self._host.end_from_outcome(task, future.result())
        self._host.call_soon(self._on_loky_done, slot, task, future, ended)

    def _on_loky_done(self, slot: Slot, task: Task, future: concurrent.futures.Future, ended: bool) -> None:
        """A slot's loky future is done; ``ended`` says the loky thread already ended the task."""
        if slot.task is not task:
            return  # the slot already settled this task (its worker died first)
        error = future.exception()
        if ended:
            self._release(slot)
            self._host.task_ended(task, future.result().value)
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
        self._host.finish(task, TaskState.FAILED, self._transport_error(task, error))
        self._after_task(slot, future)

    @staticmethod
    def _transport_error(task: Task, error: BaseException) -> StepFailed:
        remote = getattr(error.__cause__, "tb", None) or "".join(traceback.format_exception(error))
        return StepFailed(task.step, task.id, type(error).__qualname__,
                          f"its result could not be sent back from the worker: {error}", remote)

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
            peak_mb = mib(task.peak_rss_bytes)
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
        self._host.metrics.worker_killed(slot.lane, reason)
        self._timers.after(KILL_CONFIRM_S, "confirm", task)
        log_death(f"killed worker {slot.pid}: {error}", task, slot.lane, slot.pid, reason, limit, observed)

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
            self._host.finish(task, slot.kill.state, slot.kill.error, by_kill=True)
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
        self._host.metrics.worker_killed(slot.lane, "crash")
        log_death(str(crash), task, slot.lane, slot.pid, "crash", None,
                  exitcode if signal_number is None else -signal_number)
        self._host.finish(task, TaskState.CRASHED, crash)
        self._stop_executor(slot)

    def _spawn(self, lane: LaneState) -> None:
        slot = Slot(next(self._slot_ids), lane.lane)
        lane.add(slot)
        self._slots[slot.id] = slot
        self._pending_spawns += 1
        start = self._spawner.submit(_start_worker, slot.id, self._control_address,
                                     self._config.steps, self._config.step_modules)
        start.add_done_callback(lambda done: self._host.call_soon(self._on_started, slot, done))

    def _slot_ready(self, slot: Slot) -> None:
        self._lanes[slot.lane].move(slot, SlotState.IDLE)
        self._host.metrics.worker_spawned(slot.lane)
        if not self._warm and all(
                len(lane.idle) == lane.workers + lane.spares for lane in self._lanes.values()):
            self._warm = True

    def _start_failed(self, slot: Slot, error: BaseException) -> None:
        lane = self._lanes[slot.lane]
        self._drop(slot)
        lane.start_failures += 1
        log.error("could not start a worker for the %s lane (attempt %d): %s",
                  slot.lane.value, lane.start_failures, error)
        if not self._warm:
            failure = WorkerStartFailed(f"a {slot.lane.value} worker did not start: {error}")
            failure.__cause__ = error
            self._host.fail_start(failure)
            return
        if lane.start_failures >= MAX_START_FAILURES and lane.count(SlotState.IDLE, SlotState.BUSY) == 0:
            failure = WorkerStartFailed(f"no {slot.lane.value} worker could be started "
                                        f"({lane.start_failures} attempts): {error}")
            for task in list(lane.queue):
                self._host.fail_queued(task, failure)
            lane.queue.clear()
        lane.respawn_pending = True
        backoff = RESPAWN_BACKOFF_S[min(lane.start_failures, len(RESPAWN_BACKOFF_S)) - 1]
        self._timers.after(backoff, "respawn", lane)

    def _keep_lanes_full(self) -> None:
        if self._host.closing:
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
        self._host.metrics.worker_recycled(slot.lane, reason)
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
            self._host.selector.unregister(slot.control)
            slot.control.close()
            slot.control = None
        self._slots.pop(slot.id, None)

    def _stop_executor(self, slot: Slot) -> None:
        if slot.executor is not None:
            self._spawner.submit(slot.executor.shutdown, wait=True, kill_workers=slot.state is SlotState.DEAD)


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


def _exit_from_loky_error(error: BaseException) -> tuple:
    """``(exitcode, signal)`` from loky's "The exit codes of the workers are {EXIT(3)}"."""
    match = re.search(r"exit codes of the workers are \{\w+\((-?\d+)\)", str(error))
    if match is None:
        return None, None
    code = int(match.group(1))
    return (code, None) if code >= 0 else (None, -code)
