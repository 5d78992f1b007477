"""A task's life: its states, the one function that moves it between them, and its future.

::

    QUEUED ──> RUNNING ──> DONE | FAILED | TIMED_OUT | OVER_MEMORY | CANCELLED | CRASHED | EXHAUSTED
       │  <──────┘ (a failed attempt of a step that retries: Task.requeue)
       └────> CANCELLED | SKIPPED | FAILED (no worker could be started)

Transitions happen under the task's lock through :meth:`Task.transition`, which raises
:class:`~governor.errors.InvalidTransition` on a move the diagram does not allow; terminal
states stay terminal. Two threads move a task, each in one place:

* the cancelling thread cancels a task that is still queued, so that ``future.cancel()``
  followed by ``future.cancelled()`` is ``True`` at once, as with any ``Future``;
* the manager thread does the rest (dispatch, and every other end, through
  ``Manager.conclude``).

Races are settled by the lock, not by checking first: when the manager dispatches while a
user cancels, whoever transitions first wins and the other catches ``InvalidTransition``;
before it kills a worker, the manager *claims* the task (:meth:`Task.claim_for_kill`), and
an outcome arriving after the claim no longer ends it.

The future is resolved after the lock is released: done-callbacks never run under it.
"""

from __future__ import annotations

import concurrent.futures
import enum
import os
import pickle
import threading
import traceback
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import attrs

from governor.callbacks import CallbackFuture, CallbackRunner
from governor.errors import InvalidTransition, StepCancelled, StepFailed, StepSkipped, WorkflowFailed
from governor.limits import Lane, Limits


class TaskState(enum.Enum):
    """Where a task is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    OVER_MEMORY = "over_memory"
    CANCELLED = "cancelled"
    CRASHED = "crashed"
    SKIPPED = "skipped"
    EXHAUSTED = "exhausted"  # every attempt of a step that retries failed (StepSpec.retries)

    # Members are singletons, so identity hashes them as well as Enum's own __hash__ (a
    # Python call hashing the name), at C speed: states are looked up several times per task.
    __hash__ = object.__hash__

    @property
    def terminal(self) -> bool:
        """Whether the task's life is over (its future is resolved or about to be)."""
        return self not in _LIVE


_LIVE = frozenset({TaskState.QUEUED, TaskState.RUNNING})

_ALLOWED: Dict[TaskState, frozenset] = {
    TaskState.QUEUED: frozenset({TaskState.RUNNING, TaskState.CANCELLED, TaskState.SKIPPED,
                                 TaskState.FAILED}),
    TaskState.RUNNING: frozenset({TaskState.DONE, TaskState.FAILED, TaskState.TIMED_OUT,
                                  TaskState.OVER_MEMORY, TaskState.CANCELLED, TaskState.CRASHED,
                                  TaskState.EXHAUSTED, TaskState.QUEUED}),
}


def check_step_designator(step: Any) -> None:
    """Raise ``TypeError`` unless ``step`` can name a step: a name, a function or a class."""
    if not (isinstance(step, str) or callable(step)):
        raise TypeError(f"a step is given by its registered name or by its registered function or "
                        f"class, not {type(step).__name__} {step!r}")


def _check_step(call: "Call", attribute: attrs.Attribute, step: Any) -> None:
    check_step_designator(step)


def _check_directory(call: "Call", attribute: attrs.Attribute, cwd: Any) -> None:
    # Absolute: a worker resolving a relative one against its own directory would give it
    # the meaning the caller's directory is there to avoid.
    if not isinstance(cwd, str) or not os.path.isabs(cwd):
        raise ValueError(f"Call.cwd must be an absolute directory, not {cwd!r}")


@attrs.frozen
class Call:
    """One step invocation: the step's name, its arguments, and optional limits for this call.

    Args:
        step: the registered step name, or the function or class registered as the step
            (the supervisor looks its name up).
        args: positional arguments.
        kwargs: keyword arguments.
        limits: limits for this submission only; fields left ``None`` inherit the step's.
        tag: an opaque value carried on the task (``Task.tag``), for code that sees tasks
            rather than futures, such as an ``on_dispatch`` hook.
        ref: the id the task is known by outside its supervisor (the daemon puts its
            journal id here); logs and ``describe_workers`` show it as ``task_id``
            (``Task.public_id``). ``None``: the supervisor's own id.
        cwd: the absolute directory the step runs in (the worker changes into it for the
            step and back after it), so that a relative path the step opens means what
            the caller meant; the daemon puts its client's directory here. ``None``: the
            worker's own directory, the supervisor's when it started. Not on the Ray lane,
            whose workers run on other hosts.
        priority: in the pool lane, queued tasks of a higher priority start first,
            first come first served within one; waiting ``governor.engine.queues.AGING_S``
            (1 s) counts as one step of priority, so none waits for ever. The critical lane
            keeps its order and ignores it.
    """

    step: str = attrs.field(validator=_check_step)
    args: Tuple[Any, ...] = attrs.field(default=(), converter=tuple)
    kwargs: Dict[str, Any] = attrs.field(factory=dict, converter=dict)
    limits: Optional[Limits] = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(Limits)))
    tag: Any = None
    ref: Optional[int] = None
    cwd: Optional[str] = attrs.field(default=None, validator=attrs.validators.optional(_check_directory))
    priority: int = attrs.field(default=0, validator=attrs.validators.instance_of(int))

    @classmethod
    def of(cls, item: Any) -> "Call":
        """Accept a ``Call``, a step, ``(step, kwargs)`` or ``(step, args, kwargs)``; a step is a
        name or a registered function or class."""
        if isinstance(item, Call):
            return item
        if isinstance(item, str) or callable(item):
            return cls(item)
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], dict):
            return cls(item[0], kwargs=item[1])
        if isinstance(item, tuple) and len(item) == 3:
            return cls(item[0], item[1], item[2])
        raise TypeError(f"expected a Call, a step name, (name, kwargs) or (name, args, kwargs), got {item!r}")


@attrs.frozen
class CancelRequest:
    """Why a task was asked to stop: ``reason`` is a short source, ``detail`` free text."""

    reason: str
    detail: Optional[str] = None


@attrs.frozen
class KillOrder:
    """Why the governor is killing a task's worker, and how the task will end once it is dead.

    ``reason`` is timeout, memory or cancel: the metrics label and the log's reason.
    """

    reason: str
    state: "TaskState"
    error: BaseException


@attrs.define(eq=False)
class Task:
    """One submitted step: an identity record whose state only moves forward.

    Timestamps are ``time.monotonic()`` values (comparable across processes on Linux).
    """

    id: int
    step: str
    lane: Lane
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    limits: Limits
    submitted_at: float
    future: "TaskFuture" = attrs.field(default=None)
    workflow: Optional["WorkflowRun"] = None
    tag: Any = None
    chunk: bool = False  # args is a list of argument tuples, one call each (Supervisor.map)
    state: TaskState = TaskState.QUEUED
    dispatched_at: Optional[float] = None
    first_dispatched_at: Optional[float] = None  # its timeout runs from here, however often it is sent
    workers_lost: int = 0  # worker deaths it may have caused before its step started (LocalLanes._sent_again)
    started_at: Optional[float] = None
    ended_at: Optional[float] = None
    pid: Optional[int] = None
    peak_rss_bytes: Optional[int] = None
    cancel_request: Optional[CancelRequest] = None
    error: Optional[BaseException] = None
    kill_claimed: bool = False
    ref: Optional[int] = None
    cwd: Optional[str] = None  # Call.cwd: where the worker runs the step (None: its own directory)
    key: Any = None  # the critical lane's key (StepSpec.key): same key, one at a time; None: alone
    priority: int = 0  # Call.priority: rank in the pool lane's queue (governor.engine.queues)
    attempt: int = 1  # which run of the step this is (StepSpec.retries)
    # A critical task waiting out a retry's backoff at the head of its lane's queue: it holds
    # its key's place (its lane's, without a key) until the backoff is over.
    backing_off: bool = False
    _lock: threading.Lock = attrs.field(factory=threading.Lock, repr=False)

    @property
    def public_id(self) -> int:
        """The id logs and worker listings show: ``ref`` (a daemon's journal id) when set, else ``id``."""
        return self.id if self.ref is None else self.ref

    def transition(self, new: TaskState) -> None:
        """Move to ``new``; raise ``InvalidTransition`` if the task's life forbids it."""
        with self._lock:
            self._transition_locked(new)

    def _transition_locked(self, new: TaskState) -> None:
        if new not in _ALLOWED.get(self.state, ()):
            raise InvalidTransition(f"task {self.id} ({self.step}): {self.state.value} -> {new.value}")
        self.state = new

    def end(self, state: TaskState, error: Optional[BaseException] = None,
            by_kill: bool = False) -> Optional[TaskState]:
        """End a queued or running task in ``state``.

        A running task with a cancel request ends ``CANCELLED`` whatever came back:
        ``cancel()`` returned ``True`` to someone, and that promises no result. Once the
        manager has claimed the task for a kill, only the kill (``by_kill``) may end it.

        Returns:
            the state the task left, or ``None`` if this call did not end it (it had
            ended, or it is claimed for a kill).
        """
        with self._lock:
            left = self.state
            if left.terminal or (self.kill_claimed and not by_kill):
                return None
            if self.cancel_request is not None and state is not TaskState.CANCELLED:
                state, error = TaskState.CANCELLED, self.cancelled_error()
            self._transition_locked(state)
            self.error = error
            return left

    def requeue(self) -> bool:
        """Send a running task whose attempt failed back to ``QUEUED``, for its next attempt;
        ``False`` (nothing changed) if it was cancelled or claimed for a kill meanwhile."""
        with self._lock:
            if self.state is not TaskState.RUNNING or self.kill_claimed or self.cancel_request is not None:
                return False
            self._transition_locked(TaskState.QUEUED)
            self.attempt += 1
            self.dispatched_at = self.started_at = self.ended_at = self.pid = None
            return True

    def claim_for_kill(self) -> bool:
        """Reserve a running task's end for a kill; ``False`` if it has already ended."""
        with self._lock:
            if self.state is not TaskState.RUNNING:
                return False
            self.kill_claimed = True
            return True

    def request_cancel(self, request: CancelRequest) -> Tuple[bool, bool]:
        """Record a cancel request; a queued task is cancelled on the spot.

        The first request's reason is kept: later ones do not overwrite why.

        Returns:
            ``(accepted, cancelled_now)``: whether the task was still unfinished, and
            whether it was queued and so is now ``CANCELLED`` (the caller resolves it).
        """
        with self._lock:
            if self.state.terminal:
                return self.state is TaskState.CANCELLED, False
            if self.cancel_request is None:
                self.cancel_request = request
            if self.state is TaskState.QUEUED:
                self._transition_locked(TaskState.CANCELLED)
                self.error = self.cancelled_error()
                return True, True
            return True, False

    def cancelled_error(self, killed: bool = False) -> StepCancelled:
        """The ``StepCancelled`` that says why this task was cancelled."""
        request = self.cancel_request or CancelRequest("explicit")
        return StepCancelled(self.step, self.id, request.reason, request.detail, killed)

    def resolve(self, result: Any = None) -> None:
        """Resolve the future from the (terminal) state; call without holding the lock.

        The future's done-callbacks run here, on this thread (the manager, or the thread
        that cancelled a queued task); :func:`in_done_callback` tells code they call that it runs there.
        """
        _resolving.depth = getattr(_resolving, "depth", 0) + 1
        try:
            if self.state is TaskState.DONE:
                self.future.set_result(result)
            elif self.state is TaskState.CANCELLED:
                # Base-class cancel: ours would route back to the supervisor.
                concurrent.futures.Future.cancel(self.future)
                self.future.set_running_or_notify_cancel()
            else:
                self.future.set_exception(self.error)
        finally:
            _resolving.depth -= 1


_resolving = threading.local()


def in_done_callback() -> bool:
    """Whether this thread is running a task future's done-callbacks right now.

    Such a thread must not wait for the supervisor to finish: the manager may be waiting
    for the very task whose callbacks it runs.
    """
    return getattr(_resolving, "depth", 0) > 0


class Pickled:
    """A step's return value as its worker pickled it, unpickled by the first caller that
    asks for it (``TaskFuture.result``), never by the manager thread.

    A step can write anything down its worker's sockets, and unpickling runs what the bytes
    name: so the supervisor's manager thread reads only the outcome's envelope, and the
    value is rebuilt by the caller that submitted the step and asked for what it returned.
    Every caller gets the same object (or the same error).
    """

    __slots__ = ("data", "_loaded")

    def __init__(self, data: bytes):
        self.data = data
        self._loaded: Optional[Tuple[Any, Optional[BaseException]]] = None

    def load(self, task: "Task") -> Any:
        """The value; ``task`` names the step in the error.

        Raises:
            StepFailed: the value could not be unpickled here.
        """
        loaded = self._loaded
        if loaded is None:
            with _LOADING:  # one lock for all: two callers of one value at once are rare
                loaded = self._loaded
                if loaded is None:
                    try:
                        loaded = pickle.loads(self.data), None
                    except Exception as exc:  # e.g. a class this process cannot import
                        loaded = None, StepFailed(
                            task.step, task.id, type(exc).__qualname__,
                            f"its result could not be read back from the worker: {exc}",
                            "".join(traceback.format_exception(exc)))
                    self._loaded, self.data = loaded, b""
        value, error = loaded
        if error is not None:
            raise error
        return value


_LOADING = threading.Lock()


def loaded(value: Any, task: "Task") -> Any:
    """``value``, unpickled first if it is :class:`Pickled`."""
    return value.load(task) if type(value) is Pickled else value


class ExplainedCancelFuture(concurrent.futures.Future):
    """A future whose ``result()``/``exception()`` raise ``StepCancelled`` (saying why)
    instead of a bare ``CancelledError``."""

    def _cancel_error(self) -> StepCancelled:
        raise NotImplementedError

    def result(self, timeout: Optional[float] = None) -> Any:
        return self._explaining_cancel(super().result, timeout)

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        return self._explaining_cancel(super().exception, timeout)

    def _explaining_cancel(self, method: Callable[[Optional[float]], Any], timeout: Optional[float]) -> Any:
        try:
            return method(timeout)
        except concurrent.futures.CancelledError as cancelled:
            if isinstance(cancelled, StepCancelled):
                raise
            raise self._cancel_error() from None


class TaskFuture(ExplainedCancelFuture, CallbackFuture):
    """The future of one task; works with ``concurrent.futures.wait`` and ``as_completed``.

    Differences from a plain ``Future``:

    * ``cancel()`` also stops a *running* step: the step gets a cooperative cancel, then
      its worker is killed after ``cancel_grace_s``. It returns ``True`` whenever the
      task had not finished, and the future then always ends cancelled, even if the step
      finished within the grace period (its result is discarded).
    * ``cancelled()`` is ``True`` for every cancelled task, and ``result()`` /
      ``exception()`` raise :class:`~governor.errors.StepCancelled` (a
      ``concurrent.futures.CancelledError``) saying why.
    * ``running()`` is ``True`` while the step runs in a worker.
    * done-callbacks never run on the supervisor's manager thread (see ``governor.callbacks``).
    """

    def __init__(self, task: Task, canceller: Callable[[Task, CancelRequest], bool], runner: CallbackRunner):
        super().__init__(runner)
        self.task = task
        self._canceller = canceller

    @property
    def task_id(self) -> int:
        """The task's id within its supervisor."""
        return self.task.id

    @property
    def step(self) -> str:
        """The step's name."""
        return self.task.step

    @property
    def state(self) -> TaskState:
        """The task's current state."""
        return self.task.state

    def cancel(self, detail: Optional[str] = None) -> bool:
        """Cancel the task: drop it if queued, stop it if running.

        Args:
            detail: free text saying why; it reaches ``StepCancelled``'s message.

        Returns:
            ``True`` if the task had not finished (it will end cancelled), else whether it
            was already cancelled.
        """
        return self._canceller(self.task, CancelRequest("explicit", detail))

    def result(self, timeout: Optional[float] = None) -> Any:
        return loaded(super().result(timeout), self.task)

    def running(self) -> bool:
        return self.task.state is TaskState.RUNNING

    def _cancel_error(self) -> StepCancelled:
        return self.task.error


class WorkflowRun:
    """One run of a workflow (``Supervisor.workflow``): its steps' tasks, which run in order
    in the critical lane, stopping at the first failure, and the results so far.

    Owned by the supervisor's manager thread, which calls :meth:`step_finished` as each
    of its tasks ends.
    """

    def __init__(self, tasks: Sequence[Task], future: "WorkflowFuture"):
        self.tasks = list(tasks)
        self.future = future
        self._results: list = []

    def step_finished(self, task: Task, result: Any) -> Sequence[Task]:
        """Record one step's end.

        Returns:
            the tasks to skip now (every later step, when this one did not succeed).
        """
        if task.state is TaskState.DONE:
            self._results.append(result)
            if len(self._results) == len(self.tasks):
                self.future.set_result(list(self._results))
            return ()
        if task.state is TaskState.SKIPPED:
            return ()
        index = self.tasks.index(task)
        rest = [later for later in self.tasks[index + 1:] if later.state is TaskState.QUEUED]
        for later in rest:
            later.error = StepSkipped(later.step, later.id, task.step)
        if task.state is TaskState.CANCELLED:
            concurrent.futures.Future.cancel(self.future)
            self.future.set_running_or_notify_cancel()
        else:
            self.future.set_exception(WorkflowFailed(index, task.error, self._results,
                                                     [later.step for later in self.tasks[index + 1:]]))
        return rest


class WorkflowFuture(ExplainedCancelFuture, CallbackFuture):
    """The future of a workflow: the list of its steps' results, or ``WorkflowFailed``.

    ``steps`` holds each step's own :class:`TaskFuture`. ``cancel()`` cancels every step
    that has not finished; the workflow then ends cancelled and ``result()`` raises the
    first step's ``StepCancelled``.
    """

    def __init__(self, steps: Sequence[TaskFuture], runner: CallbackRunner):
        super().__init__(runner)
        self.steps = list(steps)

    def result(self, timeout: Optional[float] = None) -> Any:
        try:
            values = super().result(timeout)
        except WorkflowFailed as failed:
            self._load_results(failed)
            raise
        return [loaded(value, step.task) for value, step in zip(values, self.steps)]

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        error = super().exception(timeout)
        if isinstance(error, WorkflowFailed):
            self._load_results(error)
        return error

    def _load_results(self, failed: WorkflowFailed) -> None:
        """Unpickle the values of the steps that ended before the failure (see :class:`Pickled`)."""
        results = [loaded(value, step.task) for value, step in zip(failed.results, self.steps)]
        failed.results = results
        failed.args = (*failed.args[:2], results, *failed.args[3:])

    def cancel(self, detail: Optional[str] = None) -> bool:
        accepted = [step.cancel(detail) for step in self.steps if not step.done()]
        return any(accepted) or self.cancelled()

    def _cancel_error(self) -> StepCancelled:
        return next(step.task.error for step in self.steps if step.task.state is TaskState.CANCELLED)
