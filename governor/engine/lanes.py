"""The local lanes: worker processes on this host, forked from a warm template (a ``LaneBackend``).

Data flow, all on the manager thread (a spawn thread only starts a new template)::

    dispatch ── queued task -> idle slot -> Assignment down the slot's task socket
    selector ── task socket: the Outcome ───────────> _on_outcome -> host.conclude_outcome
             ── pidfd: the worker is dead ──────────> _on_dead (killed, crashed, retired,
                                                                or lost before it took its task)
             ── template: exit statuses, fork errors > _on_template_report
             ── listener: a new worker's two sockets > _on_hello
    timers ──── timeouts, cancel graces, kill and start deadlines, respawns (bound handlers)
    samples ─── RSS of each memory-limited task's tree, every 10 ms

A *slot* is one worker process and what the manager knows about it (``governor.engine.slots``,
with its send path and send-ahead). The hot path is
ours: a task is one pickled :class:`~governor.workers.messages.Assignment` on the worker's own
socket and its outcome one message back, read by the manager's selector, with no queue
thread in between. loky is the process layer where it earns its place: its context
starts the template (a fresh interpreter, safe from a threaded parent) and cloudpickle
carries the step table there (``governor.workers.template``). Workers are forked from that
template, so each costs a few MiB and a replacement is ready in milliseconds.

A worker runs one task at a time, so a kill costs exactly one task. Its death is known
by its pid (a pidfd in the selector), not by its socket, which a process the step forked
may hold open. Each lane keeps ``workers + spares`` live slots and runs at most
``workers`` tasks at a time: the critical lane is one worker (strict order) plus a spare.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import select
import selectors
import shutil
import tempfile
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import attrs

from governor.engine.backend import LaneHost, worker_view
from governor.engine.queues import RankedQueue
from governor.engine.slots import LaneState, Run, SendAhead, Slot, SlotState, dump_assignment
from governor.engine.starts import WORKER_START_TIMEOUT_S, WorkerStarts
from governor.engine.timers import Timers
from governor.errors import (InvalidTransition, MalformedOutcome, MemoryLimitExceeded, PoisonedTask, StepFailed,
                             StepTimeout, WorkerCrashed)
from governor.limits import Lane
from governor.logs import log_death
from governor.task import KillOrder, Task, TaskState
from governor.workers.messages import (Cancel, Dirty, Outcome, OutcomeKind, Skipped, revoked_from_wire,
                                       up_from_wire)
from governor.workers.proctree import MEMORY_SAMPLE_INTERVAL_S, kill_tree, mib
from governor.workers.sandbox import SandboxPolicy

log = logging.getLogger("governor")

#: How long a killed worker may take to be seen dead (its pidfd) before the slot is
#: written off anyway. SIGKILL is not refusable; this only bounds a process stuck in the
#: kernel (uninterruptible sleep) on its way out.
KILL_CONFIRM_S = 2.0

#: How long a crashed worker's exit status may take to come from the template (which
#: reaps it) before its task ends with the status unknown.
EXIT_STATUS_PATIENCE_S = 1.0

#: How long a lane that still has a warm spare waits before starting a replacement for a
#: lost worker: the spare covers capacity, and a fork at once would compete for the core
#: that is confirming the kill that caused it.
REPLACE_DELAY_S = 0.05

#: How many workers a task may lose before its step starts (killed from outside just as it
#: was sent, say) and still be sent to another; one more fails it as PoisonedTask. Each
#: loss is a fork: without a bound, a task that kills every worker taking it looped.
MAX_WORKERS_LOST = 2

#: How long ``close`` waits for retired workers to be gone before it stops waiting.
CLOSE_PATIENCE_S = 10.0

@attrs.frozen
class LocalConfig:
    """What the local lanes need to know; built by the Supervisor."""

    steps: Dict[str, Any]
    step_modules: Sequence[str]
    workers: Dict[Lane, int]
    spares: int
    max_tasks_per_worker: Optional[int]
    recycle_rss_mb: Optional[float]
    sandbox: Optional[SandboxPolicy] = None  # the pool lane's; None: no sandbox
    initializer: Optional[tuple] = None  # (function, args, timeout_s) each worker runs before its first task
    start_timeout_s: float = WORKER_START_TIMEOUT_S  # a new worker's, its initializer included


class LocalLanes(WorkerStarts):
    """The lanes whose workers are local processes (see the module docstring; the workers' starts
    are :class:`~governor.engine.starts.WorkerStarts`)."""

    def __init__(self, host: LaneHost, config: LocalConfig):
        self._host = host
        self._config = config
        self._clock = host.clock
        self.lanes = tuple(config.workers)
        # The critical lane never sends ahead: one step at a time per key, each journaled
        # as it starts, and no second one waiting behind it (see LaneState.sends_ahead).
        # With one worker it runs its queue in order; with more, in key order (_next_by_key).
        # The pool lane's queue is in priority order (governor.engine.queues).
        self._lanes: Dict[Lane, LaneState] = {
            lane: LaneState(lane, count, config.spares, sends_ahead=lane is Lane.POOL,
                            keyed=lane is Lane.CRITICAL and count > 1,
                            queue=RankedQueue() if lane is Lane.POOL else collections.deque())
            for lane, count in config.workers.items()}
        self._slots: Dict[int, Slot] = {}
        self._by_pid: Dict[int, Slot] = {}
        self._running: Dict[int, Run] = {}
        self._memory_watched: Dict[int, Run] = {}
        self._next_sample_at: Optional[float] = None
        self._timers = Timers(host.clock)
        self._send_ahead = SendAhead(host.clock, self._timers, config.max_tasks_per_worker)
        self._cleaner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="governor-cleanup")
        self._warm = False
        self._begun = False
        directory = tempfile.mkdtemp(prefix="governor-")
        # Pool workers' private temp dirs go beneath our directory: each is removed when its
        # worker is gone, and what is left with the directory at close.
        self._init_starts(directory, None if config.sandbox is None else attrs.evolve(
            config.sandbox, tmp_root=_made(os.path.join(directory, "tmp"))))

    # ----------------------------------------------------------------- LaneBackend

    def queue(self, lane: Lane) -> Any:
        return self._lanes[lane].queue

    def connect(self) -> None:
        """Start the warm template (on the caller's thread, so ``start()`` raises its
        ``WorkerStartFailed``, naming a step module that would not import)."""
        self._template = self._new_template()
        self._template.start(self._config.steps, self._config.step_modules, WORKER_START_TIMEOUT_S,
                             self._worker_address, self._secret, self._sandbox, self._config.initializer)

    def begin(self) -> None:
        self._begun = True
        self._host.selector.register(self._listener, selectors.EVENT_READ, self._accept)
        self._watch_template(self._template)
        for lane in self._lanes.values():
            self._fill(lane)

    @property
    def warm(self) -> bool:
        return self._warm

    @property
    def quiet(self) -> bool:
        return not self._running and not any(
            lane.retry or lane.count(SlotState.STARTING) or any(task.state is TaskState.QUEUED for task in lane.queue)
            for lane in self._lanes.values())

    def dispatch(self) -> None:
        """Hand queued tasks to idle workers, then send tasks ahead to busy ones.

        The frames of one pass go down each worker's socket together, after the pass (one
        ``writev`` per worker instead of one per task: each syscall lets go of the GIL).
        """
        sent_to: List[Slot] = []
        try:
            for lane in self._lanes.values():
                self._dispatch_lane(lane, sent_to)
        finally:  # a pass cut short by an error still sends what it handed out
            for slot in sent_to:
                if not slot.room_watched:  # else the selector says when the socket has room
                    slot.flush()

    def _dispatch_lane(self, lane: LaneState, sent_to: List[Slot]) -> None:
        next_task = self._next_by_key if lane.keyed else self._next_task
        while lane.idle and lane.counts[SlotState.BUSY] < lane.workers and (lane.retry or lane.queue):
            task = next_task(lane)
            if task is None:
                break
            slot = lane.idle[-1]
            self._start_task(slot, task, ahead=False)
            sent_to.append(slot)
        if not lane.sends_ahead:
            return
        if lane.retry or lane.queue:
            self._send_ahead_to(lane, sent_to)
        elif self._send_ahead.pending and lane.idle and lane.counts[SlotState.BUSY] < lane.workers:
            self._send_ahead.take_back_stuck(lane.lane)

    def _send_ahead_to(self, lane: LaneState, sent_to: List[Slot]) -> None:
        """Send queued tasks ahead to ``lane``'s busy workers, one per worker in turn (so
        they share the queue evenly), each up to the depth its step allows
        (:meth:`SendAhead.allows`); the slots sent to are added to ``sent_to``."""
        slots = [slot for slot in lane.slots.values() if self._send_ahead.allows(slot)]
        while slots:
            for slot in slots:
                task = self._next_task(lane)
                if task is None:
                    return
                self._start_task(slot, task, ahead=True)
                sent_to.append(slot)
            slots = [slot for slot in slots if self._send_ahead.allows(slot)]

    def _next_task(self, lane: LaneState) -> Optional[Task]:
        """The lane's next task to hand to a worker, its dispatch recorded; ``None`` if none is left."""
        while lane.retry or lane.queue:
            if lane.retry:
                task = lane.retry.popleft()  # its dispatch is recorded already
                if task.cancel_request is None:
                    return task
                # Cancelled since its worker was sent it, and never started: it ends here.
                self._host.conclude(task, TaskState.CANCELLED, task.cancelled_error())
                continue
            head = lane.queue[0] if lane.lane is Lane.CRITICAL else None
            if head is not None and head.backing_off and head.state is TaskState.QUEUED:
                return None  # a retry waits out its backoff first in line (Manager._retry_later)
            task = lane.queue.popleft()
            if self._dispatched(task):
                return task
        return None

    def _dispatched(self, task: Task) -> bool:
        """Move a task just taken off its queue to ``RUNNING`` and record its dispatch;
        ``False`` if it is not to run (cancelled or skipped while it waited: lazy removal;
        or its start could not be recorded, and it failed)."""
        try:
            task.transition(TaskState.RUNNING)
        except InvalidTransition:
            return False
        return self._host.dispatching(task)

    def _next_by_key(self, lane: LaneState) -> Optional[Task]:
        """:meth:`_next_task` for a keyed lane: the first queued task that may start now.

        A task waits while a task of its key runs, or waits before it in the queue (one
        key, one at a time, in submission order); a task without a key starts only when
        nothing of the lane runs and nothing waits before it, and nothing queued after it
        starts before it has run (a barrier). A task dispatched and never taken (``retry``)
        kept its key and goes first, as in :meth:`_next_task`.
        """
        queue = lane.queue
        while True:
            while queue and queue[0].state is not TaskState.QUEUED:
                queue.popleft()  # cancelled or skipped while it waited: lazy removal
            if lane.retry:
                return self._next_task(lane)
            task = self._first_startable(lane)
            if task is None:
                return None
            queue.remove(task)
            if self._dispatched(task):
                return task

    def _first_startable(self, lane: LaneState) -> Optional[Task]:
        """The first task in ``lane``'s queue that its key lets start now (see :meth:`_next_by_key`)."""
        running = {run.task.key for run in self._running.values() if run.task.lane is lane.lane}
        if None in running:
            return None  # a task without a key runs alone
        waiting: set = set()  # keys with a task queued before the one looked at
        for task in lane.queue:
            if task.state is not TaskState.QUEUED:
                continue
            key = task.key
            if task.backing_off:  # a retry waiting out its backoff holds its place (Manager._retry_later)
                if key is None:
                    return None
                waiting.add(key)
                continue
            if key is None:
                return None if running or waiting else task
            if key in running or key in waiting:
                waiting.add(key)
                continue
            return task
        return None

    def maintain(self) -> None:
        if self._host.closing:
            return
        if self._template is None:
            if not any(lane.respawn_pending for lane in self._lanes.values()):  # not while backing off
                self._restart_template()
            return
        for lane in self._lanes.values():
            if lane.respawn_pending or lane.live >= lane.workers + lane.spares:
                continue
            if lane.spares_ready > 0:
                lane.respawn_pending = True
                self._timers.after(REPLACE_DELAY_S, self._respawn_due, lane)
            else:
                self._fill(lane)

    def next_deadline(self) -> Optional[float]:
        due = self._timers.next_due()
        if self._next_sample_at is not None and (due is None or self._next_sample_at < due):
            return self._next_sample_at
        return due

    def on_time(self) -> None:
        if self._next_sample_at is not None and self._clock() >= self._next_sample_at:
            self._sample_memory()
        for handler, target in self._timers.pop_due():
            handler(target)
        self._timers.prune_if_stale(len(self._running), self._timer_applies)

    def _timer_applies(self, handler: Callable[[Any], None], target: Any) -> bool:
        return not isinstance(target, Run) or self._running.get(target.task.id) is target

    def cancel(self, task: Task) -> None:
        run = self._running.get(task.id)
        if run is None:
            lane = self._lanes[task.lane]
            if task in lane.retry:  # never taken by a worker: it ends here, unrun
                lane.retry.remove(task)
                self._host.conclude(task, TaskState.CANCELLED, task.cancelled_error())
            return
        if run.kill is not None:
            return  # its worker is being killed anyway
        request = task.cancel_request
        grace = task.limits.effective_cancel_grace_s
        run.slot.send_control(Cancel(task.id, request.reason, request.detail))  # if it just died, its pidfd settles the task
        if run in run.slot.aheads:
            return  # not started: its worker will skip it, and a grace starts if it does not (_begin)
        if grace == 0:
            self._grace_over(run)
        else:
            self._timers.after(grace, self._grace_over, run)

    def running_tasks(self) -> List[Task]:
        return [run.task for run in self._running.values()] + [
            task for lane in self._lanes.values() for task in lane.retry]

    def _let_go(self, task: Task) -> None:
        """``task``'s run is over here (it ends, or goes to another worker): its limits and
        timers no longer apply. Before the host's ``conclude``, which never calls back."""
        self._running.pop(task.id, None)
        self._memory_watched.pop(task.id, None)

    def describe(self, now: float) -> List[Dict[str, Any]]:
        return [worker_view(slot.pid, lane.lane, slot.state.value, now, slot.run.task if slot.run else None,
                            slot.tasks_run, slot.sampler.rss_bytes() if slot.sampler else None,
                            sandbox=slot.sandbox)
                for lane in self._lanes.values() for slot in lane.slots.values()]

    def gauges(self) -> Dict[str, Dict[str, Any]]:
        return {lane.lane.value: lane.gauges() for lane in self._lanes.values()}

    def abort(self) -> None:
        for slot in list(self._slots.values()):
            if slot.sampler is not None:
                kill_tree(slot.pid, slot.sampler)

    def close(self) -> None:
        for slot in list(self._slots.values()):
            if slot.state not in (SlotState.DEAD, SlotState.RETIRING):
                self._retire(slot)
        self._wait_for_the_dead()
        for slot in list(self._slots.values()):
            self._drop(slot)
        if self._template is not None:
            self._unwatch_template(self._template)
            self._template.close()
        self._spawner.shutdown(wait=True, cancel_futures=True)
        self._cleaner.shutdown(wait=True)
        if self._begun:
            self._host.selector.unregister(self._listener)
        self._listener.close()
        self._seats.close()
        shutil.rmtree(self._directory, ignore_errors=True)

    def _wait_for_the_dead(self) -> None:
        """Let every retired or killed worker die before the supervisor says it stopped."""
        deadline = self._clock() + CLOSE_PATIENCE_S
        while True:
            pidfds = {slot.pidfd: slot for slot in self._slots.values() if slot.pidfd is not None}
            if not pidfds or self._clock() >= deadline:
                return
            ready, _, _ = select.select(list(pidfds), [], [], max(0.0, deadline - self._clock()))
            for pidfd in ready:
                self._drop(pidfds[pidfd])

    # ----------------------------------------------------------------- a task's run

    def _start_task(self, slot: Slot, task: Task, ahead: bool) -> None:
        """Send ``task`` to ``slot``'s worker: to start now (an idle worker), or ``ahead``,
        to start once the task it runs is done."""
        limits = task.limits
        hard_cap = limits.effective_memory_mb if limits.memory_hard_cap else None
        try:
            payload = dump_assignment(task.id, task.step, task.args, task.kwargs, hard_cap, task.chunk, task.cwd)
        except Exception as exc:
            self._host.conclude(task, TaskState.FAILED, StepFailed(
                task.step, task.id, type(exc).__qualname__,
                f"its arguments could not be sent to a worker: {exc}", "".join(traceback.format_exception(exc))))
            return
        slot.sent += 1
        run = Run(task, slot, slot.sent)
        task.pid = slot.pid
        self._running[task.id] = run
        if ahead:
            self._send_ahead.sent(run)
        else:
            self._lanes[slot.lane].move(slot, SlotState.BUSY)
            self._begin(run)
        slot.send(payload)  # written by dispatch, once its pass is over

    def _on_control(self, slot: Slot) -> None:
        """The control socket is readable: a worker gave back a task sent ahead (or it ended).

        One ``read``, which cannot block (the socket is readable), and frames decoded by
        hand: the step running in that worker can write to this socket too.
        """
        if slot.control is None:
            return  # closed by an earlier event of the same select
        try:
            alive = slot.control_frames.feed(slot.control.fileno())
            frame = slot.control_frames.pop()
            while frame is not None:
                self._taken_back(slot, *revoked_from_wire(frame))
                frame = slot.control_frames.pop()
        except OSError:
            alive = False
        except ValueError as exc:
            self._misbehaving(slot, f"its control socket carried {exc}")
            return
        if not alive:
            slot.unwatch_control()  # dying: its pidfd says when it is dead

    def _taken_back(self, slot: Slot, task_id: int, number: int) -> None:
        """The worker will not run task ``task_id``, its ``number``-th assignment: the task
        goes to the front of its lane's queue.

        The worker says so twice, once on each socket (``Revoked``, ``Skipped``): the
        second finds the task gone, or sent again as a new run. The new run may be to the
        same worker and asked back too: only the number tells the two apart, and a late
        answer about the first must not take back the second, which the worker may run.
        """
        run = self._running.get(task_id)
        if run is None or run.slot is not slot or run.number != number or not run.taking_back:
            return
        if run in slot.aheads:
            self._send_ahead.drop(run)
        elif slot.run is run and run.kill is None and slot.state is SlotState.BUSY:
            # The outcome before it came first, so it looked started; the worker is idle.
            slot.run = None
            self._memory_watched.pop(task_id, None)
            self._after_task(slot, None)
        else:
            return
        del self._running[task_id]
        task = run.task
        if task.cancel_request is not None:
            self._host.conclude(task, TaskState.CANCELLED, task.cancelled_error())
            return
        self._host.metrics.task_redispatched(slot.lane)
        self._lanes[slot.lane].retry.appendleft(task)

    def _begin(self, run: Run) -> None:
        """``run``'s task starts now in its worker: its clock and its limits start too."""
        task, slot = run.task, run.slot
        slot.run = run
        limits = task.limits
        now = task.dispatched_at = self._clock()
        if task.first_dispatched_at is None:
            task.first_dispatched_at = now
        if limits.effective_timeout_s is not None:  # from its first dispatch, if it is sent again
            self._timers.after(max(0.0, task.first_dispatched_at + limits.effective_timeout_s - now),
                               self._timeout_due, run)
        if limits.effective_memory_mb is not None:
            self._memory_watched[task.id] = run
            if self._next_sample_at is None:
                self._next_sample_at = now + MEMORY_SAMPLE_INTERVAL_S
        if task.cancel_request is not None:  # cancelled while it was sent ahead
            self._timers.after(task.limits.effective_cancel_grace_s, self._grace_over, run)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("task %s (%s) started on worker %s", task.public_id, task.step, slot.pid,
                      extra={"task_id": task.public_id, "step": task.step, "lane": task.lane.value, "pid": slot.pid})

    def _on_outcome(self, slot: Slot) -> None:
        """The task socket is readable: an outcome, a dirty worker's notice, or the EOF of
        a dying worker.

        One ``read`` per event (``Frames``), not ``Connection.recv_bytes``'s two: each
        syscall lets go of the GIL, and a thread submitting at full speed makes the
        manager wait for it back every time.
        """
        if slot.tasks is None:
            return  # closed by an earlier event of the same select (its pidfd's)
        try:
            alive = slot.frames.feed(slot.tasks.fileno())
        except BlockingIOError:
            alive = True  # nothing to read after all
        except OSError:
            alive = False
        self._take_frames(slot)
        if not alive and slot.tasks is not None:
            # Dying: its pidfd says when it is dead. Meanwhile it takes no task.
            if slot.state is SlotState.IDLE:
                self._lanes[slot.lane].move(slot, SlotState.RETIRING)
            slot.close_tasks()

    def _read_the_rest(self, slot: Slot) -> None:
        """A dead worker's last frames: an outcome it sent just before it died (its task
        ended well), a dirty notice (it was recycled). Read before its death is judged."""
        try:
            while slot.tasks is not None and slot.tasks.poll(0) and slot.frames.feed(slot.tasks.fileno()):
                pass
        except OSError:
            pass  # what could be read was
        self._take_frames(slot)

    def _take_frames(self, slot: Slot) -> None:
        try:
            frame = slot.frames.pop()
            while frame is not None:
                self._take_frame(slot, up_from_wire(frame))
                frame = slot.frames.pop()
        except ValueError as exc:  # over the cap, or not an outcome
            self._misbehaving(slot, f"its task socket carried {exc}")

    def _take_frame(self, slot: Slot, message: Union[Outcome, Dirty, Skipped]) -> None:
        if type(message) is Dirty:
            self._on_dirty(slot, message.problem)
            return
        if type(message) is Skipped:  # its outcome is not the next one: what comes next is the next task's
            self._taken_back(slot, message.task_id, message.number)
            return
        run = slot.run
        if run is None or slot.state is SlotState.KILLING:
            return  # claimed for a kill before its outcome came: the kill decides
        task = run.task
        if message.task_id != task.id:
            # Never one task's result in another's future: whatever mixed them up (a step
            # writing to its worker's socket, or a bug in the send-ahead bookkeeping).
            self._misbehaving(slot, f"an outcome for task {message.task_id} where task {task.id}'s was next")
            return
        slot.run = None
        slot.tasks_run += 1
        self._let_go(task)
        if message.kind is not OutcomeKind.CANCELLED:  # a run cut short says nothing of how long the step takes
            self._send_ahead.observe(task.step, message.ended_at - message.started_at)
        self._after_task(slot, message.rss_bytes)
        self._host.conclude_outcome(task, message)

    def _misbehaving(self, slot: Slot, problem: str) -> None:
        """``slot``'s worker sent what no worker of ours sends (its step wrote to the
        worker's sockets, most likely): it is killed, and the task it ran fails with
        :class:`MalformedOutcome` once it is dead. Nothing more is read from it."""
        log.warning("worker %s sent what no worker sends: %s; killing it", slot.pid, problem)
        slot.close_tasks()
        slot.unwatch_control()
        run = slot.run
        if run is not None and run.kill is None:
            task = run.task
            self._kill(run, "malformed", TaskState.FAILED, MalformedOutcome(task.step, task.id, slot.pid, problem),
                       None, None)
        elif slot.state not in (SlotState.KILLING, SlotState.DEAD):
            self._retire(slot)
            kill_tree(slot.pid, slot.sampler)

    def _on_dirty(self, slot: Slot, problem: str) -> None:
        """The worker could not be made clean after its last step and is exiting: a task
        sent to it since was never taken, and its death hands that task on (``_on_dead``)."""
        log.warning("worker %s could not be made clean after a step: %s", slot.pid, problem)
        if slot.state in (SlotState.IDLE, SlotState.BUSY):
            self._recycle(slot, "dirty")

    def _after_task(self, slot: Slot, rss: Optional[int]) -> None:
        """Start the task sent ahead, or put the slot back to work, or recycle its worker
        if it leaked or ran its quota (once the task sent ahead is done)."""
        config = self._config
        reason = slot.recycle_after
        if config.max_tasks_per_worker is not None and slot.tasks_run >= config.max_tasks_per_worker:
            reason = "max_tasks"
        elif config.recycle_rss_mb is not None and rss is not None and rss > config.recycle_rss_mb * 2 ** 20:
            reason = "leak"
        if slot.aheads:
            slot.recycle_after = reason
            run = self._send_ahead.started(slot)
            self._begin(run)  # the worker took it as it sent this outcome
        elif reason is not None:
            self._recycle(slot, reason)
        else:
            self._lanes[slot.lane].move(slot, SlotState.IDLE)

    def _timeout_due(self, run: Run) -> None:
        if self._running.get(run.task.id) is not run or run.kill is not None:
            return
        task = run.task
        elapsed = self._clock() - task.first_dispatched_at
        limit = task.limits.effective_timeout_s
        self._kill(run, "timeout", TaskState.TIMED_OUT, StepTimeout(task.step, task.id, limit, elapsed, run.slot.pid),
                   limit, elapsed)

    def _grace_over(self, run: Run) -> None:
        if self._running.get(run.task.id) is not run or run.kill is not None:
            return
        task = run.task
        self._kill(run, "cancel", TaskState.CANCELLED, task.cancelled_error(killed=True),
                   task.limits.effective_cancel_grace_s, None)

    def _sample_memory(self) -> None:
        for run in list(self._memory_watched.values()):
            slot, task = run.slot, run.task
            if run.kill is not None or slot.run is not run:
                continue
            rss = slot.sampler.rss_bytes()
            task.peak_rss_bytes = max(task.peak_rss_bytes or 0, rss)
            limit_mb = task.limits.effective_memory_mb
            if rss <= limit_mb * 2 ** 20:
                continue
            # Confirm before acting: the task may have just finished (its outcome is
            # waiting on the socket), or the figure was a transient one.
            if slot.tasks.poll(0) or slot.sampler.rss_bytes() <= limit_mb * 2 ** 20:
                continue
            peak_mb = mib(task.peak_rss_bytes)
            self._kill(run, "memory", TaskState.OVER_MEMORY,
                       MemoryLimitExceeded(task.step, task.id, limit_mb, peak_mb, slot.pid), limit_mb, peak_mb)
        self._next_sample_at = (self._clock() + MEMORY_SAMPLE_INTERVAL_S) if self._memory_watched else None

    def _kill(self, run: Run, reason: str, state: TaskState, error: BaseException,
              limit: Optional[float], observed: Optional[float]) -> None:
        """Kill the worker running a task and its whole process tree; the task ends when
        the worker's pidfd says it is dead.

        Args:
            reason: timeout, memory or cancel (the metrics label and the log's reason).
            state, error: how the task will end.
            limit, observed: the limit enforced and the value seen, for the log record.
        """
        task, slot = run.task, run.slot
        if slot.state is SlotState.DEAD:
            return  # its worker died by itself: its crash ends the task (exit status pending)
        if slot.aheads and slot.tasks is not None and slot.tasks.poll(0):
            return  # its outcome is here: the task ended, and the one sent ahead may have started
        if not task.claim_for_kill():
            return  # it ended first (a cancelled task's outcome came back)
        run.kill = KillOrder(reason, state, error)
        self._lanes[slot.lane].move(slot, SlotState.KILLING)
        kill_tree(slot.pid, slot.sampler)
        self._host.metrics.worker_killed(slot.lane, reason)
        self._timers.after(KILL_CONFIRM_S, self._kill_overdue, run)
        log_death(f"killed worker {slot.pid}: {error}", task, slot.lane, slot.pid, reason, limit, observed)

    def _kill_overdue(self, run: Run) -> None:
        if self._running.get(run.task.id) is not run:
            return
        log.warning("worker %s showed no sign of death %ss after SIGKILL; writing it off", run.slot.pid, KILL_CONFIRM_S)
        self._on_dead(run.slot)

    def _on_dead(self, slot: Slot) -> None:
        """The worker's pidfd is readable: it is dead (or written off after a kill)."""
        if slot.state is SlotState.DEAD:
            return
        self._read_the_rest(slot)
        previous, run = slot.state, slot.run
        taken = self._seats.task_taken(slot.seat)
        self._drop(slot, keep_pid=run is not None and run.kill is None)
        while slot.aheads:
            self._lost_ahead(slot, slot.aheads[0], taken)
        if run is None:
            if previous in (SlotState.IDLE, SlotState.STARTING) and not self._host.closing:
                log.warning("idle worker %s of the %s lane died", slot.pid, slot.lane.value)
            return
        task = run.task
        if run.kill is not None:
            self._let_go(task)
            self._host.conclude(task, run.kill.state, run.kill.error, by_kill=True)
        elif taken != task.id and self._sent_again(slot, task):
            self._let_go(task)
        else:  # its step had started (a crash), or the task cost too many workers (poisoned)
            run.taken_at_death = taken
            if slot.exit_status is not None or slot.template.connection is None:
                self._crashed(slot, *(slot.exit_status or (None, None)))
            else:
                slot.awaiting_status = True  # the template reaps it and reports how it ended
                self._timers.after(EXIT_STATUS_PATIENCE_S, self._status_overdue, slot)

    def _lost_ahead(self, slot: Slot, run: Run, taken: int) -> None:
        """The worker that had ``run`` sent ahead is dead; most often it never took it."""
        task = run.task
        self._send_ahead.drop(run)
        self._running.pop(task.id, None)
        if taken != task.id:
            # Behind the task the worker ran, this one is to blame only if the worker died
            # reading its arguments: a death for the task before it costs it nothing.
            if not self._sent_again(slot, task, to_blame=taken == -task.id):
                self._conclude_crash(slot, task, PoisonedTask(task.step, task.id, slot.pid, None, None,
                                                              taken == -task.id, task.workers_lost))
            return
        # It had started it, and was killed for the task before it, whose outcome the kill
        # overtook: the one race a kill can lose (see _kill).
        crash = WorkerCrashed(task.step, task.id, slot.pid, None, None)
        log_death(f"{crash} (killed for the task before it)", task, slot.lane, slot.pid, "crash", None, None)
        self._host.conclude(task, TaskState.CRASHED, crash)

    def _sent_again(self, slot: Slot, task: Task, to_blame: bool = True) -> bool:
        """``slot``'s worker died taking ``task``, before its step started (before it read
        the task, or while it unpickled the arguments: a kill from outside may land there
        too): the task goes to the next free worker of its lane, ahead of the queue, unless
        it has cost :data:`MAX_WORKERS_LOST` workers already (counting the deaths it may be
        ``to_blame`` for). Whether it was sent again (if not, it fails as
        :class:`PoisonedTask` and the lane goes on)."""
        task.workers_lost += to_blame
        if task.workers_lost > MAX_WORKERS_LOST:
            return False
        self._host.metrics.task_redispatched(slot.lane)
        log.info("worker %s died before it started task %s (%s); dispatching it again",
                 slot.pid, task.id, task.step)
        self._lanes[slot.lane].retry.appendleft(task)
        return True

    def _status_overdue(self, slot: Slot) -> None:
        if slot.awaiting_status:
            self._crashed(slot, None, None)

    def _crashed(self, slot: Slot, exitcode: Optional[int], signal_number: Optional[int]) -> None:
        slot.awaiting_status = False
        self._by_pid.pop(slot.pid, None)
        run, slot.run = slot.run, None
        if run is None:
            return
        task = run.task
        self._let_go(task)
        if run.taken_at_death not in (None, task.id):  # it died taking the task, too often
            crash = PoisonedTask(task.step, task.id, slot.pid, exitcode, signal_number,
                                 run.taken_at_death == -task.id, task.workers_lost)
        else:
            crash = WorkerCrashed(task.step, task.id, slot.pid, exitcode, signal_number)
        self._conclude_crash(slot, task, crash)

    def _conclude_crash(self, slot: Slot, task: Task, crash: WorkerCrashed) -> None:
        self._host.metrics.worker_killed(slot.lane, "crash")
        log_death(str(crash), task, slot.lane, slot.pid, "crash", None,
                  crash.exitcode if crash.signal is None else -crash.signal)
        self._host.conclude(task, TaskState.CRASHED, crash)

    def _recycle(self, slot: Slot, reason: str) -> None:
        self._host.metrics.worker_recycled(slot.lane, reason)
        log.info("recycling worker %s (%s) after %d tasks", slot.pid, reason, slot.tasks_run)
        self._retire(slot)

    def _retire(self, slot: Slot) -> None:
        """Let a worker go: closing its sockets ends it (and its group); its pidfd then
        says it is gone. A slot still starting is dropped at once."""
        if slot.pidfd is None:
            self._drop(slot)
            return
        self._lanes[slot.lane].move(slot, SlotState.RETIRING)
        slot.close_sockets()

    def _drop(self, slot: Slot, keep_pid: bool = False) -> None:
        """The slot's worker is gone (or never came): it leaves its lane, every file of it
        is closed and its seat is free. ``keep_pid``: its exit status is still wanted."""
        if slot.state is SlotState.DEAD:
            return
        self._lanes[slot.lane].move(slot, SlotState.DEAD)
        slot.close_sockets()
        if slot.pidfd is not None:
            self._host.selector.unregister(slot.pidfd)
            os.close(slot.pidfd)
            slot.pidfd = None
        if not keep_pid and slot.pid is not None:
            self._by_pid.pop(slot.pid, None)
        self._slots.pop(slot.id, None)
        self._seats.give_back(slot.seat)
        if slot.tmpdir is not None:
            self._remove_later(slot.tmpdir)

    def _remove_later(self, tmpdir: str) -> None:
        """Remove a gone worker's temp dir on the cleanup thread, not here: its steps may
        have left thousands of files in it (50,000 take 0.4 s to remove, measured), and
        the manager thread must not stall every lane meanwhile. It is renamed first (one
        syscall), so its name is free at once for a new worker that gets the same pid."""
        removing = tmpdir + ".removing"
        try:
            os.rename(tmpdir, removing)
        except OSError:
            removing = tmpdir  # gone already, or a stale ".removing" is in the way: remove in place
        try:
            self._cleaner.submit(shutil.rmtree, removing, ignore_errors=True)
        except RuntimeError:
            # The cleanup thread cannot start: the interpreter is exiting (Python 3.12.0-3.12.1
            # refuse a new thread there, gh-113964) or its thread pools are shut. Removing it
            # here stalls only a shutdown, and a failure here would leave the template running.
            shutil.rmtree(removing, ignore_errors=True)


def _made(path: str) -> str:
    os.mkdir(path, 0o700)
    return path
