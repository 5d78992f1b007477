"""The errors Governor raises, as one small hierarchy.

Three kinds of failure, three kinds of type:

* A step raised: its own exception, the worker's traceback chained as ``__cause__`` (a
  :class:`RemoteTraceback`, as ``ProcessPoolExecutor`` does); :class:`StepFailed` when it
  does not pickle (or for a supervisor built with ``wrap_step_errors=True``, as the daemon's
  is), carrying the original type name, message and the remote traceback.
* A limit the governor enforced: :class:`StepTimeout`, :class:`MemoryLimitExceeded`,
  :class:`StepCancelled`; each carries the limit, what was observed and the worker's pid.
* Broken infrastructure or misuse: :class:`WorkerCrashed` (a worker died and nobody in
  Governor killed it), :class:`WorkerStartFailed`, :class:`QueueFull`,
  :class:`SupervisorClosed`, :class:`SupervisorBroken`, :class:`SupervisorForked`, :class:`UnknownStep`, :class:`RegistrationError`,
  :class:`SandboxUnavailable`.

A pool step stopped by the sandbox is a :class:`ReadOnlyViolation`: a :class:`StepFailed`
(the step did raise) and a ``PermissionError``.

Every error subclasses :class:`GovernorError` and, where one fits, the builtin it means
(``TimeoutError``, ``MemoryError``, ``KeyError``, ``ValueError``,
``concurrent.futures.CancelledError``), so ``except TimeoutError`` keeps working.

Every error pickles: the daemon and user code may send them across processes. Each class
keeps its constructor's arguments in ``self.args`` order or defines ``__reduce__``.
"""

from __future__ import annotations

import concurrent.futures
import difflib
import errno
import signal
from typing import Any, Iterable, Optional, Sequence


class GovernorError(Exception):
    """Base class of every error Governor raises."""


class RegistrationError(GovernorError, ValueError):
    """A step declaration is invalid: empty or duplicate name, not callable, bad limits."""


class InvalidParameters(GovernorError, TypeError):
    """The arguments given for a step do not fit its signature (checked at submit)."""


class InvalidTransition(GovernorError, RuntimeError):
    """A task was asked to move between two states that its life does not allow.

    Seeing this outside Governor's own code means a bug in Governor: report it.
    """


class SupervisorClosed(GovernorError, RuntimeError):
    """The supervisor was shut down (or never started) and takes no more work."""


class SupervisorForked(GovernorError, RuntimeError):
    """The supervisor was used in a process forked from the one that started it: its
    manager thread and workers belong to the parent. Start a new supervisor in the child
    (or create it after the fork)."""


class UnknownStep(GovernorError, KeyError):
    """No step of that name is registered.

    Attributes:
        name: the name asked for (for a function or class: its qualified name).
        suggestions: registered names that are close to it, best first.
        hint: what to do about it, when there is more to say than the suggestions.
    """

    def __init__(self, name: str, suggestions: Sequence[str] = (), hint: str = ""):
        super().__init__(name, tuple(suggestions), hint)
        self.name = name
        self.suggestions = tuple(suggestions)
        self.hint = hint

    @classmethod
    def for_name(cls, name: str, known: Iterable[str]) -> "UnknownStep":
        """Build the error for ``name``, suggesting the closest of ``known``."""
        return cls(name, difflib.get_close_matches(name, list(known), n=3, cutoff=0.5))

    def __str__(self) -> str:  # KeyError would show the repr of args
        if self.hint:
            return f"unknown step {self.name!r}: {self.hint}"
        hint = f"; did you mean {', '.join(map(repr, self.suggestions))}?" if self.suggestions else ""
        return f"unknown step {self.name!r}{hint}"


class QueueFull(GovernorError):
    """A lane's queue is at capacity: the submission was refused, nothing was queued.

    Attributes:
        lane: the lane's name.
        capacity: how many queued steps the lane holds at most.
    """

    def __init__(self, lane: str, capacity: int):
        super().__init__(lane, capacity)
        self.lane = lane
        self.capacity = capacity

    def __str__(self) -> str:
        return (f"the {self.lane} lane's queue is full ({self.capacity} steps waiting); "
                "retry later or raise Supervisor(queue_size=...)")


class WorkerStartFailed(GovernorError, RuntimeError):
    """A worker process could not be started or warmed up.

    Likely causes: a step module that fails to import in a fresh interpreter, a step
    table that cannot be pickled, or the system refusing new processes (ulimit -u, memory).
    """


class SupervisorBroken(GovernorError, RuntimeError):
    """The supervisor's manager thread failed: every task it held was failed with this
    error, its workers were killed, and it takes no more work. A bug in Governor: the
    log has the manager's traceback; please report it.
    """


class BackendUnavailable(GovernorError, RuntimeError):
    """The backend asked for cannot be used here: its optional extra is not installed."""


class HttpAddressError(GovernorError, ValueError):
    """A status page address (``--http-addr``) that is malformed, or not loopback without
    ``--http-allow-remote``."""


class SandboxUnavailable(GovernorError, RuntimeError):
    """``sandbox="require"`` was asked for where the kernel offers no Landlock."""


class StepError(GovernorError):
    """Base of the errors that end one task (a step's failure or an enforced limit).

    ``args`` holds the constructor's arguments in order, so every subclass pickles the
    standard way; ``__str__`` builds the message from the attributes.

    Attributes:
        step: the step's name.
        task_id: the task's id within its supervisor.
    """

    def __init__(self, step: str, task_id: int, *details: Any):
        super().__init__(step, task_id, *details)
        self.step = step
        self.task_id = task_id

    def __str__(self) -> str:
        return f"step {self.step!r} (task {self.task_id}) failed"

    def __repr__(self) -> str:
        # Not the args: for the TimeoutError subclass, OSError keeps only two of them.
        return f"{type(self).__name__}({str(self)!r})"


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker, chained as ``__cause__``."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text}"""'


class StepFailed(StepError):
    """The step raised an exception that cannot reach the caller as itself: it does not
    pickle, the step's result could not be sent back, or the supervisor wraps every step
    error (``Supervisor(wrap_step_errors=True)``, the daemon). A step's exception that
    pickles is raised as itself, with a :class:`RemoteTraceback` as ``__cause__``.

    Attributes:
        exc_type: the qualified name of the original exception type, e.g. ``"ValueError"``.
        exc_message: ``str()`` of the original exception.
        remote_traceback: the traceback text from the worker.
        original: the original exception when it could be pickled, else ``None``.
    """

    def __init__(self, step: str, task_id: int, exc_type: str, exc_message: str,
                 remote_traceback: str, original: Optional[BaseException] = None):
        super().__init__(step, task_id, exc_type, exc_message, remote_traceback, original)
        self.exc_type = exc_type
        self.exc_message = exc_message
        self.remote_traceback = remote_traceback
        self.original = original
        self.__cause__ = RemoteTraceback(remote_traceback)

    def __str__(self) -> str:
        return f"step {self.step!r} raised {self.exc_type}: {self.exc_message}"


class ReadOnlyViolation(StepFailed, PermissionError):
    """A pool-lane step tried to write outside what the sandbox allows, and was refused.

    The pool lane runs only read-only steps, and Landlock holds its workers to that: the
    write failed inside the step with ``PermissionError`` and nothing was written. Either
    the step changes state and belongs in the critical lane (``critical=True``), or it
    writes a cache of its own that it should declare (``writes=[path]``).

    Attributes:
        path: the path the step was refused writing.
    """

    def __init__(self, step: str, task_id: int, path: str, exc_type: str, exc_message: str,
                 remote_traceback: str, original: Optional[BaseException] = None):
        StepError.__init__(self, step, task_id, path, exc_type, exc_message, remote_traceback, original)
        self.path = path
        self.errno, self.strerror, self.filename = errno.EACCES, "read-only step", path  # as a PermissionError
        self.exc_type = exc_type
        self.exc_message = exc_message
        self.remote_traceback = remote_traceback
        self.original = original
        self.__cause__ = RemoteTraceback(remote_traceback)

    def __reduce__(self):
        # OSError's own reduce would rebuild from (errno, strerror) semantics: keep ours.
        return type(self), self.args

    def __str__(self) -> str:
        return (f"step {self.step!r} is read-only (pool lane) but tried to write {self.path!r}; the sandbox "
                f"refused it ({self.exc_type}: {self.exc_message}). Mark the step critical=True if it "
                f"changes state, or declare the path with writes=[...]")


class StepSkipped(StepError):
    """A workflow step that never ran because an earlier step of its workflow failed.

    Attributes:
        failed_step: the name of the step that failed first.
    """

    def __init__(self, step: str, task_id: int, failed_step: str):
        super().__init__(step, task_id, failed_step)
        self.failed_step = failed_step

    def __str__(self) -> str:
        return f"step {self.step!r} skipped: workflow step {self.failed_step!r} failed before it"


class WorkflowFailed(GovernorError):
    """A workflow stopped at its first failing step.

    Attributes:
        index: position of the failed step in the workflow.
        error: the failed step's error (also ``__cause__``).
        results: results of the steps that completed before it, in order.
        skipped: names of the steps that were not run.
    """

    def __init__(self, index: int, error: BaseException, results: Sequence[Any], skipped: Sequence[str]):
        super().__init__(index, error, list(results), list(skipped))
        self.index = index
        self.error = error
        self.results = list(results)
        self.skipped = list(skipped)
        self.__cause__ = error

    def __str__(self) -> str:
        return (f"workflow failed at step {self.index}: {self.error}; "
                f"{len(self.results)} completed, {len(self.skipped)} skipped")


class StepTimeout(StepError, TimeoutError):
    """The step ran past its ``timeout_s``; its worker and that worker's process tree were killed.

    Attributes:
        limit_s: the timeout in seconds.
        elapsed_s: how long the step had run when it was killed.
        pid: the worker's pid.
    """

    def __init__(self, step: str, task_id: int, limit_s: float, elapsed_s: float, pid: Optional[int]):
        super().__init__(step, task_id, limit_s, elapsed_s, pid)
        self.limit_s = limit_s
        self.elapsed_s = elapsed_s
        self.pid = pid

    def __str__(self) -> str:
        return (f"step {self.step!r} timed out after {self.elapsed_s:.3f}s "
                f"(limit {self.limit_s:g}s); worker {self.pid} killed")


class MemoryLimitExceeded(StepError, MemoryError):
    """The step's process tree used more than ``max_memory_mb``.

    Attributes:
        limit_mb: the limit in MiB.
        peak_mb: the largest RSS of the task's process tree observed, in MiB (``None`` when
            the worker's hard cap stopped an allocation before any sample saw it).
        pid: the worker's pid.
        killed: ``True`` when the supervisor killed the worker, ``False`` when the hard
            cap made an allocation fail and the worker survived.
    """

    def __init__(self, step: str, task_id: int, limit_mb: float, peak_mb: Optional[float],
                 pid: Optional[int], killed: bool = True):
        super().__init__(step, task_id, limit_mb, peak_mb, pid, killed)
        self.limit_mb = limit_mb
        self.peak_mb = peak_mb
        self.pid = pid
        self.killed = killed

    def __str__(self) -> str:
        peak = "unknown" if self.peak_mb is None else f"{self.peak_mb:.1f} MiB"
        how = "killed" if self.killed else "kept (hard cap refused the allocation)"
        return (f"step {self.step!r} exceeded its memory limit of {self.limit_mb:g} MiB "
                f"(peak {peak}); worker {self.pid} {how}")


class StepCancelled(StepError, concurrent.futures.CancelledError):
    """The step was cancelled before it finished.

    Attributes:
        reason: why: ``"explicit"`` (``Future.cancel()``), ``"scope"``, ``"superseded"``
            or ``"shutdown"``.
        detail: free text given with the cancellation, if any.
        killed: whether its worker had to be killed (it ignored the cooperative signal
            for longer than ``cancel_grace_s``) rather than stopping by itself.
    """

    def __init__(self, step: str, task_id: int, reason: str, detail: Optional[str] = None,
                 killed: bool = False):
        super().__init__(step, task_id, reason, detail, killed)
        self.reason = reason
        self.detail = detail
        self.killed = killed

    def __str__(self) -> str:
        text = f"step {self.step!r} cancelled ({self.reason}{': ' + self.detail if self.detail else ''})"
        return text + ("; its worker was killed" if self.killed else "")


class WorkerCrashed(StepError):
    """The worker running the step died and Governor did not kill it.

    A segfault, ``os._exit``, the kernel's OOM killer or a signal from outside. Only this
    task fails: the lane replaces the worker and every other task goes on.

    Attributes:
        pid: the dead worker's pid.
        exitcode: its exit status when it exited, else ``None``.
        signal: the number of the signal that killed it, else ``None``.
    """

    def __init__(self, step: str, task_id: int, pid: Optional[int], exitcode: Optional[int],
                 signal_number: Optional[int]):
        super().__init__(step, task_id, pid, exitcode, signal_number)
        self.pid = pid
        self.exitcode = exitcode
        self.signal = signal_number

    def __str__(self) -> str:
        return (f"worker {self.pid} running step {self.step!r} died "
                f"({describe_exit(self.exitcode, self.signal)})")


def describe_exit(exitcode: Optional[int], signal_number: Optional[int]) -> str:
    """Say how a process ended, e.g. ``"exit code 3"`` or ``"signal SIGSEGV"``."""
    if signal_number is not None:
        try:
            return f"signal {signal.Signals(signal_number).name}"
        except ValueError:
            return f"signal {signal_number}"
    if exitcode is not None:
        return f"exit code {exitcode}"
    return "exit status unknown"


class TooManyClients(GovernorError, ConnectionRefusedError):
    """The daemon refused a connection: this user has as many open as it allows.

    Attributes:
        limit: the connections one user may hold open at once.
    """

    def __init__(self, limit: int):
        super().__init__(limit)
        self.limit = limit

    def __str__(self) -> str:
        return (f"the governor daemon refused the connection: too many clients (this user already has "
                f"{self.limit} open); close idle clients, or retry")


class TaskNotResumable(GovernorError, RuntimeError):
    """A journaled task could not be run again when its daemon restarted.

    Its step was removed, its parameters no longer fit, or its limits are no longer
    valid; the task is failed with this error instead of being run.

    Attributes:
        task_id: the task's journal id.
        step: the step's name (or the workflow's label).
        reason: what stops it, in words.
    """

    def __init__(self, task_id: int, step: str, reason: str):
        super().__init__(task_id, step, reason)
        self.task_id = task_id
        self.step = step
        self.reason = reason

    def __str__(self) -> str:
        return f"task {self.task_id} ({self.step}) cannot be resumed: {self.reason}"


class UnknownTask(GovernorError, KeyError):
    """No task with that id is in the daemon's journal (never submitted, or pruned).

    Attributes:
        task_id: the id asked for.
    """

    def __init__(self, task_id: int):
        super().__init__(task_id)
        self.task_id = task_id

    def __str__(self) -> str:
        return f"no task {self.task_id} in the journal (never submitted, or pruned)"


class RequestSuperseded(GovernorError, concurrent.futures.CancelledError):
    """A web request's steps were cancelled because a newer request took its supersede key.

    Raised by :meth:`governor.asgi.RequestGovernor.run_batch`; ``GovernorMiddleware``
    answers it with HTTP 409 when the response has not started.

    Attributes:
        key: the supersede key the newer request took.
        detail: the cancellation's detail as the steps saw it.
    """

    def __init__(self, key: Optional[str], detail: Optional[str] = None):
        super().__init__(key, detail)
        self.key = key
        self.detail = detail

    def __str__(self) -> str:
        return f"superseded by a newer request with key {self.key!r}" + (f" ({self.detail})" if self.detail else "")
