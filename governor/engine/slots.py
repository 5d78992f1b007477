"""One local worker's seat in the supervisor: its slot, its send path, and send-ahead.

A *slot* is one worker process and what the manager knows about it: its state, its two
sockets (``governor.workers.messages`` says what crosses them), the task it runs
(a :class:`Run`) and those sent to it ahead; a lane's slots by state are its
:class:`LaneState`. Everything here runs on the manager thread;
the lanes (``governor.engine.lanes``) decide which slot runs what, and when a worker is dead.

The send path never makes the manager wait: a frame goes down a worker's task socket as
far as the socket has room, and the rest when the selector says there is room
(:meth:`Slot.send`). *Send-ahead* (:class:`SendAhead`) gives a busy pool worker its next
task while it runs one, so it starts the moment it sends its outcome, and takes such a
task back when it waits behind a step that turned out long.
"""

from __future__ import annotations

import collections
import enum
import math
import os
import pickle
from multiprocessing.connection import Connection
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import attrs
import cloudpickle

from governor.engine.backend import ReadSelector
from governor.engine.timers import Timers
from governor.limits import Lane
from governor.task import KillOrder, Task
from governor.workers.frames import MAX_FRAME_BYTES, Frames, header as frame_header
from governor.workers.messages import REVOKED_BYTES, TASK_ID, Revoke
from governor.workers.proctree import TreeSampler, kill_tree
from governor.workers.template import Template

#: A pool worker gets its next task while it runs one (see :meth:`SendAhead.allows`) only
#: if the step it runs typically takes less than this: below it, the worker's sleep and
#: wake-up between two tasks are a large part of each; above it, they are noise, and a
#: task sent ahead would wait behind a long one while another worker might be free.
SEND_AHEAD_BELOW_S = 0.005

#: Weight of the newest run in a step's typical duration (an exponential moving average).
TYPICAL_WEIGHT = 0.2

#: The most tasks a pool worker may hold sent ahead, beyond the one it runs. How many it
#: may hold is what :data:`SEND_AHEAD_BELOW_S` of its step's typical runs covers, up to
#: this: a task sent ahead then waits behind a few milliseconds of work at most. With two,
#: a worker running no-ops still slept before one task in two or three on a loaded
#: machine (its manager thread, waiting for a core, fell behind); with 8 it rarely does.
MAX_AHEAD = 8

#: A task sent ahead that has not started this long after it was sent waits behind a step
#: that turned out long: it is taken back as soon as its lane has a free worker.
AHEAD_PATIENCE_S = 2 * SEND_AHEAD_BELOW_S


class SlotState(enum.Enum):
    """A slot's life: STARTING -> IDLE <-> BUSY -> (KILLING ->) DEAD, or -> RETIRING -> DEAD."""

    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    KILLING = "killing"
    RETIRING = "retiring"
    DEAD = "dead"

    # Members are singletons, so identity hashes them as well as Enum's own __hash__
    # (a Python call hashing the name), at C speed: the lanes' state counts are read and
    # written several times per task on the manager thread.
    __hash__ = object.__hash__


@attrs.define(eq=False)
class Slot:
    """One worker process and what the manager knows about it."""

    id: int
    lane: Lane
    seat: int
    template: Template
    selector: ReadSelector  # the manager's: the slot's sockets are watched there
    state: SlotState = SlotState.STARTING
    pid: Optional[int] = None
    tasks: Optional[Connection] = None  # assignments down, outcomes up
    control: Optional[Connection] = None  # cancels down; its EOF ends the worker
    pidfd: Optional[int] = None
    watched: bool = False  # its task socket is in the selector
    frames: Frames = attrs.field(factory=lambda: Frames())
    control_frames: Frames = attrs.field(factory=lambda: Frames(REVOKED_BYTES))  # what comes up its control socket
    unsent: Deque[memoryview] = attrs.field(factory=collections.deque)  # frames' bytes its socket had no room for
    room_watched: bool = False  # the selector tells when its task socket has room (``unsent`` waits)
    run: Optional["Run"] = None
    aheads: Deque["Run"] = attrs.field(factory=collections.deque)  # sent while ``run`` runs, in order
    ahead_s: float = 0.0  # what the runs in ``aheads`` are expected to take (SendAhead.allows)
    sent: int = 0  # assignments sent to the worker (a task taken back is named by its number)
    control_watched: bool = False  # its control socket is in the selector
    recycle_after: Optional[str] = None  # recycle once the tasks sent ahead are done (the reason)
    sampler: Optional[TreeSampler] = None
    tasks_run: int = 0
    exit_status: Optional[Tuple[Optional[int], Optional[int]]] = None
    awaiting_status: bool = False
    sandbox: str = "none"  # the worker's SandboxReport.label
    tmpdir: Optional[str] = None  # its private temp dir (sandboxed workers), removed when it is gone

    def send(self, payload: bytes) -> None:
        """Queue one frame for the task socket; :meth:`flush` writes it.

        The manager never waits on a worker's socket: what the socket has no room for
        waits in ``unsent`` and goes when the selector says there is room. A worker that
        stops reading (stopped, stuck in the kernel) with a large argument on its way then
        holds up no other task of either lane, and its own task's timeout and cancel still
        work: they kill it.
        """
        self.unsent.append(memoryview(frame_header(len(payload))))
        self.unsent.append(memoryview(payload))

    def flush(self) -> None:
        """Write what ``unsent`` holds, as far as the task socket has room (one ``writev``);
        nothing if the selector is to say when there is room."""
        if self.tasks is None or not self.unsent:
            return  # closed by an earlier event of the same select, or written already
        unsent = self.unsent
        try:
            written = os.writev(self.tasks.fileno(), unsent)
        except BlockingIOError:
            written = 0
        except OSError:
            # The worker is dead or unusable: it never took the task, which its pidfd's
            # news hands to another worker (LocalLanes._on_dead).
            self.stop_sending()
            kill_tree(self.pid, self.sampler)
            return
        while written:
            first = unsent[0]
            if written < len(first):
                unsent[0] = first[written:]
                break
            written -= len(first)
            unsent.popleft()
        if unsent and not self.room_watched:
            self.selector.watch_writable(self.tasks, self.flush)
            self.room_watched = True
        elif not unsent and self.room_watched:
            self.selector.unwatch_writable(self.tasks)
            self.room_watched = False

    def stop_sending(self) -> None:
        self.unsent.clear()
        if self.room_watched:
            self.selector.unwatch_writable(self.tasks)
            self.room_watched = False

    def send_control(self, message: Any) -> None:
        """Send a message (``Cancel``, ``Revoke``) down the control socket; a worker that is
        dying or gone gets nothing (its pidfd settles its tasks)."""
        try:
            self.control.send_bytes(pickle.dumps(message))
        except (OSError, AttributeError):  # AttributeError: the socket is closed already
            pass

    def close_sockets(self) -> None:
        self.close_tasks()
        self.unwatch_control()
        if self.control is not None:
            self.control.close()
            self.control = None

    def close_tasks(self) -> None:
        if self.tasks is not None:
            self.stop_sending()
        if self.watched:
            self.selector.unregister(self.tasks)
            self.watched = False
        if self.tasks is not None:
            self.tasks.close()
            self.tasks = None

    def unwatch_control(self) -> None:
        if self.control_watched:
            self.selector.unregister(self.control)
            self.control_watched = False


@attrs.define(eq=False)
class Run:
    """One dispatch of a task to a slot; timers name the run, so a timer set for an
    earlier dispatch of the same task (one its worker never took) cannot fire on this one."""

    task: Task
    slot: Slot
    number: int = 0  # among the assignments sent to the slot's worker
    kill: Optional[KillOrder] = None
    sent_at: float = 0.0  # when it was sent ahead (see SendAhead.take_back_stuck)
    expected_s: float = 0.0  # how long it was expected to take when it was sent ahead (SendAhead.allows)
    taking_back: bool = False  # sent ahead, and asked back
    taken_at_death: Optional[int] = None  # what its dead worker's seat said (governor.workers.seats)


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
    queue: Any = attrs.field(factory=collections.deque)  # a deque, or the pool lane's RankedQueue
    retry: Deque[Task] = attrs.field(factory=collections.deque)  # dispatched, never taken: first in line
    slots: Dict[int, Slot] = attrs.field(factory=dict)
    idle: List[Slot] = attrs.field(factory=list)
    counts: collections.Counter = attrs.field(factory=collections.Counter)
    start_failures: int = 0
    respawn_pending: bool = False
    pids: Tuple[int, ...] = ()
    sends_ahead: bool = False  # its workers may get a task while they run one (the pool lane)
    keyed: bool = False  # tasks start in key order, several at once (a critical lane of several workers)

    def add(self, slot: Slot) -> None:
        self.slots[slot.id] = slot
        self.counts[slot.state] += 1

    def move(self, slot: Slot, state: SlotState) -> None:
        """Put ``slot`` in ``state``; DEAD and RETIRING slots leave the lane."""
        counts, idle = self.counts, self.idle
        # First the two moves of every task, in a few steps: the idle worker on top of the
        # stack goes to work, and a busy one comes back.
        if state is SlotState.BUSY and slot.state is SlotState.IDLE and idle and idle[-1] is slot:
            idle.pop()
            counts[SlotState.IDLE] -= 1
            counts[SlotState.BUSY] += 1
            slot.state = state
            return
        if state is SlotState.IDLE and slot.state is SlotState.BUSY:
            counts[SlotState.BUSY] -= 1
            counts[SlotState.IDLE] += 1
            slot.state = state
            idle.append(slot)
            return
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
        """Slots that are or will be able to run a task (every slot in the lane but those
        being killed)."""
        return len(self.slots) - self.counts[SlotState.KILLING]

    @property
    def spares_ready(self) -> int:
        """Idle warm workers beyond those the lane may still put to work."""
        return max(0, len(self.idle) - (self.workers - self.counts[SlotState.BUSY]))

    def gauges(self) -> Dict[str, Any]:
        """The lane's gauges for metrics (safe to call from any thread)."""
        return {"busy": self.counts[SlotState.BUSY], "idle": len(self.idle),
                "starting": self.counts[SlotState.STARTING], "spares_ready": self.spares_ready,
                "worker_pids": self.pids}


class SendAhead:
    """Which busy pool worker gets its next task before it is free, and what was sent
    ahead and has not started yet (manager thread).

    A task sent ahead is in its slot's ``aheads`` and in :attr:`pending` until its worker
    starts it (:meth:`started`) or it leaves that worker unstarted (:meth:`drop`).
    """

    def __init__(self, clock: Callable[[], float], timers: Timers, max_tasks_per_worker: Optional[int]):
        self._clock = clock
        self._timers = timers
        self._quota = max_tasks_per_worker
        self._typical_s: Dict[str, float] = {}  # step -> how long it takes (see SEND_AHEAD_BELOW_S)
        self.pending: Dict[int, Run] = {}  # every task sent ahead and not started, by task id
        self._check_due = False  # a timer will look at them again (take_back_stuck)

    def allows(self, slot: Slot) -> bool:
        """Whether a busy worker may get its next task now, to start it the moment it
        sends its outcome: no sleep and no wake-up between two short tasks.

        Only behind steps known to be short: as many tasks as :data:`SEND_AHEAD_BELOW_S`
        of typical runs covers (a step never seen yet counts as that long), at most
        :data:`MAX_AHEAD`; behind tasks the supervisor will not kill on a limit (no
        timeout, no memory limit), so a kill for a limit never finds the next task started
        in its worker; and never beyond a recycle, so a task sent ahead is not lost with
        its worker. A cancel's kill checks first that the outcome it would race is not on
        its way.
        """
        run = slot.run
        if (slot.state is not SlotState.BUSY or len(slot.aheads) >= MAX_AHEAD or slot.tasks is None or run is None
                or run.kill is not None or slot.room_watched):
            return False
        quota = self._quota
        if slot.recycle_after is not None or (quota is not None and slot.tasks_run + len(slot.aheads) + 2 > quota):
            return False
        # The next task would wait behind the one running and those sent ahead.
        return self._expected_s(run.task) + slot.ahead_s < SEND_AHEAD_BELOW_S

    def _expected_s(self, task: Task) -> float:
        """How long a next task should expect to wait behind ``task``: its step's typical
        run, or all the send-ahead allows for a task the supervisor may kill for a limit."""
        limits = task.limits
        if limits.effective_timeout_s is not None or limits.effective_memory_mb is not None:
            return SEND_AHEAD_BELOW_S
        return self._typical_s.get(task.step, SEND_AHEAD_BELOW_S)

    def observe(self, step: str, took: float) -> None:
        """A run of ``step`` took ``took`` seconds in its worker."""
        typical = self._typical_s.get(step, took)
        self._typical_s[step] = typical + TYPICAL_WEIGHT * (took - typical)

    def sent(self, run: Run) -> None:
        """``run`` was sent to its busy slot's worker, to start after what it runs."""
        slot = run.slot
        slot.aheads.append(run)
        run.expected_s = self._expected_s(run.task)
        slot.ahead_s += run.expected_s
        self.pending[run.task.id] = run
        run.sent_at = self._clock()

    def started(self, slot: Slot) -> Run:
        """The worker of ``slot`` took its first task sent ahead (as it sent the outcome before)."""
        run = slot.aheads.popleft()
        self._left(slot, run)
        return run

    def drop(self, run: Run) -> None:
        """``run`` leaves its worker unstarted (taken back, or its worker is dead)."""
        slot = run.slot
        if run in slot.aheads:
            slot.aheads.remove(run)
        self._left(slot, run)

    def _left(self, slot: Slot, run: Run) -> None:
        del self.pending[run.task.id]
        # Back to exactly 0 when none is left, so rounding never piles up over a long life.
        slot.ahead_s = slot.ahead_s - run.expected_s if slot.aheads else 0.0

    def take_back_stuck(self, lane: Lane) -> None:
        """Ask back the tasks sent ahead that have waited :data:`AHEAD_PATIENCE_S` behind a
        step that turned out long: ``lane`` has a free worker and nothing queued.

        Nothing is looked at while a lane is busy, so a task sent ahead costs nothing here
        on the way to its start (no timer per task): one timer at a time wakes the manager
        when the first of them may come due.
        """
        now, due = self._clock(), None
        for run in self.pending.values():
            slot = run.slot
            if run.taking_back or slot.lane is not lane:
                continue
            if now < run.sent_at + AHEAD_PATIENCE_S:
                due = min(due or math.inf, run.sent_at + AHEAD_PATIENCE_S)
                continue
            run.taking_back = True
            slot.send_control(Revoke(run.task.id, run.number))  # a dying worker's death hands the task on
        if due is not None and not self._check_due:
            self._check_due = True
            self._timers.after(due - now, self._check_again, None)

    def _check_again(self, _: None) -> None:
        self._check_due = False  # the lanes' dispatch, later in this turn, looks again


def dump_assignment(task_id: int, step: str, args: tuple, kwargs: dict, hard_cap_mb: Optional[float],
                    chunk: bool, cwd: Optional[str]) -> bytes:
    """An :class:`~governor.workers.messages.Assignment`'s frame: the task id
    (:data:`~governor.workers.messages.TASK_ID`), then its fields pickled as the plain tuple
    the worker reads; cloudpickle only for what pickle cannot carry (a lambda among the
    arguments), since it is several times slower.

    pickle carries an object of a class defined in the submitting program's ``__main__``
    by reference, and a worker's ``__main__`` is not that program: cloudpickle carries such
    a class by value. A payload that names ``__main__`` anywhere (at worst a string among
    the arguments) goes through cloudpickle.

    Raises:
        ValueError: the frame would be over the cap its worker reads (``MAX_FRAME_BYTES``).
    """
    fields = (task_id, step, args, kwargs, hard_cap_mb, chunk, cwd)
    try:
        payload = pickle.dumps(fields, pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError):
        payload = cloudpickle.dumps(fields, pickle.HIGHEST_PROTOCOL)
    else:
        if b"__main__" in payload:
            payload = cloudpickle.dumps(fields, pickle.HIGHEST_PROTOCOL)
    if TASK_ID.size + len(payload) > MAX_FRAME_BYTES:
        raise ValueError(f"{TASK_ID.size + len(payload)} bytes, over the cap of {MAX_FRAME_BYTES} per task; "
                         "pass a large input as a file the step reads")
    return TASK_ID.pack(task_id) + payload
