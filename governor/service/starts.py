"""What the daemon journals as the supervisor hands a step to a worker (its ``on_dispatch`` hook).

Data flow (manager thread: :meth:`StartJournal.record`)::

    a record's first start   pool:     queued for the loop's next group commit, which writes
                                       every pool start queued since the last in one statement
                             critical: commit the ends of the critical records it was ordered
                                       after (its key's last start, and the last keyless one;
                                       for a keyless step, every key's), then mark_started:
                                       committed before the hand-over
    a workflow's later step  mark_progress (committed): the results of the steps before it
    a retry (attempt > 1)    mark_attempt: committed if critical, else with the next group commit

Why the ends first: a critical record whose end is still waiting for the loop's group commit
when the next step of its key starts would, after a crash, read "running" beside that step,
and both would be taken for "may have run". Committing it first leaves each lane key at most
one "running" row, the step that was really running (``Journal.recover``).

Threads: the manager thread alone reads and writes ``_last_critical``; ``_started`` is added
to there and discarded from on the loop (:meth:`forget`), single set operations, atomic under
the GIL; ``_progress_before`` is filled on the loop before the workflow it belongs to is
submitted, so before the manager can read it. ``_pool_starts`` is appended to by the manager
and emptied by the loop's group commit, with the flag ``_pool_starts_due`` as
``governor.service.ends`` has it: the manager appends *before* it reads the flag, the loop
clears the flag *before* it pops, so a start is either popped by a write already due or
makes a new one due. A pool start is queued before its step reaches a worker, so before its
end can be: the group commit that writes an end has written the start first (its later
writes go before the turn's).
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import logging
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from governor import protocol
from governor.errors import InvalidTransition, StepCancelled, WorkflowFailed
from governor.limits import Lane
from governor.service.group_commit import GroupCommit
from governor.service.journal import Journal, JournalGroup, TaskRecord
from governor.task import Task, TaskState, WorkflowFuture

log = logging.getLogger("governor.service.daemon")

#: How many lane keys ``_last_critical`` holds before the ones whose ends are journaled are
#: dropped: a daemon serving many chats sees keys come and go, and only the few whose last
#: step is still in flight matter (at most one per critical worker runs at once).
MAX_REMEMBERED_KEYS = 256


class StartJournal:
    """The daemon's ``on_dispatch`` hook and the state it keeps (see the module docstring).

    Args:
        journal: where critical starts, progress and attempts are committed.
        commits: the loop's group commit, for what need not be durable before the hand-over.
        in_flight: the daemon's in-flight entry of a record id (``None`` once journaled);
            an entry has ``record_id``, ``future`` and ``end_journaled``.
        draining: whether the daemon is shutting down (a step cancelled by the shutdown is
            left for the next start, its end not journaled).
        keyed: whether the critical lane runs keys in parallel (``critical_workers > 1``);
            with one critical worker every critical step is ordered after every other.
    """

    def __init__(self, journal: Journal, commits: GroupCommit, in_flight: Callable[[int], Any],
                 draining: Callable[[], bool], keyed: bool):
        self._journal, self._commits, self._in_flight, self._draining = journal, commits, in_flight, draining
        self._keyed = keyed
        self._started: set = set()
        self._last_critical: Dict[Any, int] = {}  # lane key (None: keyless) -> the record last started
        self._progress_before: Dict[int, List[Any]] = {}  # a resumed workflow's results from before
        self._pool_starts: Deque[Tuple[int, float]] = collections.deque()  # (record id, time): not yet written
        self._pool_starts_due = False  # a write of _pool_starts is in the group commit's later writes

    def resuming(self, record_id: int, progress: List[Any]) -> None:
        """Loop thread, before a resumed workflow is submitted: the results of its steps that
        had finished before the crash (it runs only the rest)."""
        self._progress_before[record_id] = list(progress)

    def progress_before(self, record_id: int) -> List[Any]:
        """The results a resumed workflow carries from before the crash (``[]``: none)."""
        return self._progress_before.get(record_id, [])

    def forget(self, record_id: int) -> None:
        """Loop thread: the record's end is journaled."""
        self._started.discard(record_id)
        self._progress_before.pop(record_id, None)

    def record(self, task: Task) -> None:
        """on_dispatch hook (manager thread): journal the step's start (module docstring)."""
        if task.ref is None:
            return
        if task.ref not in self._started:
            self._started.add(task.ref)
            if task.lane is not Lane.CRITICAL:
                self._pool_starts.append((task.ref, time.time()))
                if not self._pool_starts_due:
                    self._pool_starts_due = True
                    self._commits.write_later(self._write_pool_starts)
                return
            self._end_ordered_before(task.key if self._keyed else None, task.ref)
            self._journal.mark_started(task.ref)
        elif task.attempt > 1:
            if task.lane is Lane.CRITICAL:
                self._journal.mark_attempt(task.ref)
            else:
                self._commits.write_later(functools.partial(_write_attempt, task.ref, time.time()))
        elif task.workflow is not None:
            done = task.workflow.tasks[:task.workflow.tasks.index(task)]
            self._journal.mark_progress(task.ref, self.progress_before(task.ref) + [
                _json_or_none(earlier.future.result()) for earlier in done])

    def _write_pool_starts(self, group: JournalGroup) -> None:
        """In a group commit (loop thread): every pool start queued so far, in one statement;
        a failure is logged (nobody waits for it)."""
        self._pool_starts_due = False
        starts = [self._pool_starts.popleft() for _ in range(len(self._pool_starts))]
        if not starts:
            return  # popped by the write before this one
        for record_id, state in group.mark_started_many(starts).items():
            log.error("could not journal the start of task %s: it was %s, not queued", record_id, state,
                      extra={"task_id": record_id})

    def _end_ordered_before(self, key: Any, record_id: int) -> None:
        """Commit the ends of the critical records a step of ``key`` starts after, and
        remember it as its key's last start."""
        if key is None:
            before = list(self._last_critical.values())
            self._last_critical.clear()
        else:
            before = [self._last_critical.get(key), self._last_critical.get(None)]
        for previous in before:
            entry = self._in_flight(previous) if previous is not None else None
            if entry is not None and entry.future.done():
                self.journal_end_now(entry)
        self._last_critical[key] = record_id
        if len(self._last_critical) > MAX_REMEMBERED_KEYS:
            self._last_critical = {kept: started for kept, started in self._last_critical.items()
                                   if self._in_flight(started) is not None}

    # A critical task's end may be written by both threads: here before the next critical
    # start, and in the loop's group commit. No lock orders them (the group holds the
    # journal's lock while it writes, so a lock taken inside it and before it elsewhere
    # would deadlock): each skips an end already marked written, and takes the other's
    # having written it between the check and its own write (InvalidTransition: the row has
    # ended) as done.

    def journal_end_now(self, entry: Any) -> None:
        """Manager thread: commit the end of a critical record before the next start it orders."""
        if entry.end_journaled or (self._draining() and cancelled_by_shutdown(entry.future)):
            return
        try:
            self._journal.mark_finished(entry.record_id, *ending(entry.future, entry.record_id,
                                                                 self.progress_before(entry.record_id)))
        except InvalidTransition:
            pass  # the loop's group commit wrote it first
        entry.end_journaled = True

    def write_end(self, group: JournalGroup, entry: Any) -> Optional[TaskRecord]:
        """In a group commit (loop thread): a finished record's end, unless already written;
        the record as it now reads, or ``None`` when this wrote nothing."""
        if entry.end_journaled or (self._draining() and cancelled_by_shutdown(entry.future)):
            return None  # written by the manager; or left queued or running for the next start
        try:
            return group.mark_finished(entry.record_id, *ending(entry.future, entry.record_id,
                                                                self.progress_before(entry.record_id)))
        except InvalidTransition:
            return None  # the manager wrote it first


def cancelled_by_shutdown(future: concurrent.futures.Future) -> bool:
    """Whether ``future``'s task was cancelled by the daemon's own shutdown."""
    if not future.cancelled():
        return False
    try:
        future.result()
    except StepCancelled as cancelled:
        return cancelled.reason == "shutdown"
    return False


def ending(future: concurrent.futures.Future, record_id: int,
           progress_before: List[Any]) -> Tuple[str, float, Any, Optional[Dict[str, Any]]]:
    """(journal state, time, JSON result, wire error naming ``record_id``) of a finished task
    or workflow future: the arguments of ``mark_finished`` after the id. The time is when it
    ended (:func:`ended_wall_time`), not when this is written. A resumed workflow's result
    is ``progress_before`` followed by what its resumed run returned, and its failure names
    the step's index in the whole workflow, with every result before it."""
    ended = ended_wall_time(future)
    try:
        value = future.result()
    except BaseException as error:  # every way a task can end is recorded, none raised here
        state = getattr(getattr(future, "task", None), "state", None)
        if isinstance(future, WorkflowFuture):
            state = TaskState.CANCELLED if future.cancelled() else TaskState.FAILED
        if progress_before and type(error) is WorkflowFailed:  # the resumed run counted from its first step
            error = WorkflowFailed(len(progress_before) + error.index, error.error,
                                   progress_before + error.results, error.skipped)
        return ((state or TaskState.FAILED).value, ended, None,
                protocol.with_task_id(protocol.error_to_wire(error), record_id))
    if progress_before:
        value = progress_before + list(value)
    try:
        return TaskState.DONE.value, ended, protocol.to_json_value(value), None
    except protocol.ResultNotSerialisable as unsendable:
        return TaskState.FAILED.value, ended, None, protocol.with_task_id(protocol.error_to_wire(unsendable), record_id)


def ended_wall_time(future: concurrent.futures.Future) -> float:
    """When a finished task or workflow (its last step to end) ended, on the wall clock.

    Its own end (``Task.ended_at``: the worker's, or the supervisor's for a kill) rather
    than the time its end is written: the write waits for the loop's next group commit,
    under load 16 ms (median) to 220 ms (p95) later, and a journal read for how long a step
    ran, or what ran after a view was superseded, would count that wait as work. A task
    that never reached a worker has no end of its own: now. ``Task.ended_at`` is on the
    daemon's supervisor clock, ``time.monotonic`` (the workers' clock too).
    """
    steps = future.steps if isinstance(future, WorkflowFuture) else [future]
    ends = [step.task.ended_at for step in steps
            if getattr(step, "task", None) is not None and step.task.ended_at is not None]
    wall_now = time.time()
    return wall_now - max(0.0, time.monotonic() - max(ends)) if ends else wall_now


def _json_or_none(value: Any) -> Any:
    """A finished step's result for a workflow's progress; ``None`` when it is not JSON (the
    workflow then fails as it ends: its result cannot be sent)."""
    try:
        return protocol.to_json_value(value)
    except protocol.ResultNotSerialisable:
        return None


def _write_attempt(record_id: int, at: float, group: JournalGroup) -> None:
    """A pool step's retry, in a group commit; a failure is logged (nobody waits for it)."""
    try:
        group.mark_attempt(record_id, at)
    except InvalidTransition as error:
        log.error("could not journal an attempt of task %s: %s", record_id, error, extra={"task_id": record_id})
