"""The errors Governor raises, as one small hierarchy.

Three kinds of failure, three kinds of type:

* A step raised: its own exception, the worker's traceback chained as ``__cause__`` (a
  :class:`RemoteTraceback`, as ``ProcessPoolExecutor`` does); :class:`StepFailed` when it
  does not pickle (or for a supervisor built with ``wrap_step_errors=True``, as the daemon's
  is), carrying the original type name, message and the remote traceback.
* A limit the governor enforced: :class:`StepTimeout`, :class:`MemoryLimitExceeded`,
  :class:`StepCancelled`; each carries the limit, what was observed and the worker's pid.
* Broken infrastructure or misuse: :class:`WorkerCrashed` (a worker died and nobody in
  Governor killed it; :class:`PoisonedTask` when it died taking the task), :class:`WorkerStartFailed`, :class:`QueueFull`,
  :class:`SupervisorClosed`, :class:`SupervisorBroken`, :class:`SupervisorForked`, :class:`UnknownStep`, :class:`RegistrationError`,
  :class:`SandboxUnavailable`; for the daemon, :class:`DaemonError` (it cannot start, one
  subclass per cause), :class:`PeerRefused`, :class:`TooManyClients`, :class:`UnknownTask`.

A pool step stopped by the sandbox is a :class:`ReadOnlyViolation`: a :class:`StepFailed`
(the step did raise) and a ``PermissionError``.

Every error subclasses :class:`GovernorError` and, where one fits, the builtin it means
(``TimeoutError``, ``MemoryError``, ``KeyError``, ``ValueError``,
``concurrent.futures.CancelledError``), so ``except TimeoutError`` keeps working.

Every error pickles: the daemon and user code may send them across processes. Each class
keeps its constructor's arguments in ``self.args`` order (:class:`GovernorError` does it
for the errors that declare ``fields``) or defines ``__reduce__``.
"""

from __future__ import annotations

import concurrent.futures
import difflib
import errno
import signal
from typing import Any, Callable, ClassVar, Dict, Iterable, List, Mapping, Optional, Tuple


class GovernorError(Exception):
    """Base class of every error Governor raises.

    An error that carries figures declares them once, and the base does the rest:

    * ``fields``: the constructor's parameters, in order. Each is kept as an attribute of
      that name and in ``args``, so the error pickles the standard way.
    * ``defaults``: the values of the trailing parameters that may be left out.
    * ``converters``: what some values pass through before they are kept (``tuple``).
    * ``template``: the message, ``str.format``-ed with the attributes; a message that
      depends on them in other ways overrides ``__str__`` instead.

    An error without ``fields`` is an ordinary exception: its message is what it was given.
    """

    fields: ClassVar[Tuple[str, ...]] = ()
    defaults: ClassVar[Mapping[str, Any]] = {}
    converters: ClassVar[Mapping[str, Callable[[Any], Any]]] = {}
    template: ClassVar[str] = ""

    def __init__(self, *args: Any, **kwargs: Any):
        if not self.fields:
            super().__init__(*args, **kwargs)
            return
        values = self._bind(args, kwargs)
        super().__init__(*values)
        for name, value in zip(self.fields, values):
            setattr(self, name, value)

    def _bind(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> List[Any]:
        """The value of every field, from the arguments as a call of ``__init__(*fields)`` binds them."""
        name = type(self).__name__
        if len(args) > len(self.fields):
            raise TypeError(f"{name}() takes {len(self.fields)} arguments, {len(args)} given")
        given = dict(zip(self.fields, args))
        for key, value in kwargs.items():
            if key not in self.fields or key in given:
                raise TypeError(f"{name}() got an unexpected or repeated argument {key!r}")
            given[key] = value
        missing = [field for field in self.fields if field not in given and field not in self.defaults]
        if missing:
            raise TypeError(f"{name}() is missing {', '.join(map(repr, missing))}")
        values = [given[field] if field in given else self.defaults[field] for field in self.fields]
        return [self.converters.get(field, _as_is)(value) for field, value in zip(self.fields, values)]

    def __str__(self) -> str:
        if not self.template:
            return super().__str__()
        return self.template.format_map(vars(self))


def _as_is(value: Any) -> Any:
    return value


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

    fields = ("name", "suggestions", "hint")
    defaults = {"suggestions": (), "hint": ""}
    converters = {"suggestions": tuple}

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

    fields = ("lane", "capacity")
    template = ("the {lane} lane's queue is full ({capacity} steps waiting); "
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

    fields = ("step", "task_id")
    template = "step {step!r} (task {task_id}) failed"

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
        original: the original exception when it could be pickled, else ``None``; its
            notes (``add_note``) are this error's first notes.
    """

    fields = StepError.fields + ("exc_type", "exc_message", "remote_traceback", "original")
    defaults = {"original": None}
    template = "step {step!r} raised {exc_type}: {exc_message}"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.__cause__ = RemoteTraceback(self.remote_traceback)
        # The step's own notes (``add_note``) stay on what the caller catches, as they do
        # when the step's exception reaches it as itself.
        notes = getattr(self.original, "__notes__", None)
        for note in notes if isinstance(notes, list) else ():
            if isinstance(note, str):
                self.add_note(note)


class ReadOnlyViolation(StepFailed, PermissionError):
    """A pool-lane step tried to write outside what the sandbox allows, and was refused.

    The pool lane runs only read-only steps, and Landlock holds its workers to that: the
    write failed inside the step with ``PermissionError`` and nothing was written. Either
    the step changes state and belongs in the critical lane (``critical=True``), or it
    writes a cache of its own that it should declare (``writes=[path]``).

    Attributes:
        path: the path the step was refused writing.
    """

    fields = StepError.fields + ("path", "exc_type", "exc_message", "remote_traceback", "original")
    template = ("step {step!r} is read-only (pool lane) but tried to write {path!r}; the sandbox "
                "refused it ({exc_type}: {exc_message}). Mark the step critical=True if it "
                "changes state, or declare the path with writes=[...]")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.errno, self.strerror, self.filename = errno.EACCES, "read-only step", self.path  # as a PermissionError

    def __reduce__(self):
        # OSError's own reduce would rebuild from (errno, strerror) semantics: keep ours.
        return type(self), self.args


class StepSkipped(StepError):
    """A workflow step that never ran because an earlier step of its workflow failed.

    Attributes:
        failed_step: the name of the step that failed first.
    """

    fields = StepError.fields + ("failed_step",)
    template = "step {step!r} skipped: workflow step {failed_step!r} failed before it"


class WorkflowFailed(GovernorError):
    """A workflow stopped at its first failing step.

    Attributes:
        index: position of the failed step in the workflow.
        error: the failed step's error (also ``__cause__``).
        results: results of the steps that completed before it, in order.
        skipped: names of the steps that were not run.
    """

    fields = ("index", "error", "results", "skipped")
    converters = {"results": list, "skipped": list}

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.__cause__ = self.error

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

    fields = StepError.fields + ("limit_s", "elapsed_s", "pid")
    template = "step {step!r} timed out after {elapsed_s:.3f}s (limit {limit_s:g}s); worker {pid} killed"


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

    fields = StepError.fields + ("limit_mb", "peak_mb", "pid", "killed")
    defaults = {"killed": True}

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

    fields = StepError.fields + ("reason", "detail", "killed")
    defaults = {"detail": None, "killed": False}

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

    fields = StepError.fields + ("pid", "exitcode", "signal")

    def __str__(self) -> str:
        return (f"worker {self.pid} running step {self.step!r} died "
                f"({describe_exit(self.exitcode, self.signal)})")


class MalformedOutcome(StepError, ValueError):
    """The worker running the step sent back something no worker sends (a frame over the
    size cap, or not an outcome), so the worker was killed and the step's result is lost.

    Most likely the step wrote to its worker's own sockets (file descriptors it inherited);
    the supervisor reads what comes from them as data, never as code, and believes none of it.

    Attributes:
        pid: the killed worker's pid.
        problem: what was wrong with what it sent.
    """

    fields = StepError.fields + ("pid", "problem")
    template = "worker {pid} running step {step!r} sent what no worker sends ({problem}); it was killed"


class PoisonedTask(WorkerCrashed):
    """Workers died taking the task, before its step could start, so it was not sent again.

    Most likely an argument whose unpickling ends the process (a ``__reduce__`` that calls
    ``os._exit``, a C extension that crashes on the bytes): every worker the task went to
    would die the same way, and in the critical lane every later task would wait behind it.

    Attributes:
        while_unpickling: the last worker died while it unpickled the task's arguments
            (else before it read the task off its socket).
        workers_lost: how many workers died taking it.
    """

    def __init__(self, step: str, task_id: int, pid: Optional[int], exitcode: Optional[int],
                 signal_number: Optional[int], while_unpickling: bool, workers_lost: int):
        super().__init__(step, task_id, pid, exitcode, signal_number)
        self.args = (step, task_id, pid, exitcode, signal_number, while_unpickling, workers_lost)
        self.while_unpickling = while_unpickling
        self.workers_lost = workers_lost

    def __str__(self) -> str:
        when = ("while it unpickled the task's arguments" if self.while_unpickling
                else f"before it took the task ({self.workers_lost} workers lost to it)")
        return (f"worker {self.pid} died ({describe_exit(self.exitcode, self.signal)}) {when}; step "
                f"{self.step!r} (task {self.task_id}) never started. Likely cause: an argument that "
                "cannot be unpickled safely (its unpickling ends the process); pass plain data instead")


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

    fields = ("limit",)
    template = ("the governor daemon refused the connection: too many clients (this user already has "
                "{limit} open); close idle clients, or retry")


class TaskNotResumable(GovernorError, RuntimeError):
    """A journaled task could not be run again when its daemon restarted.

    Its step was removed, its parameters no longer fit, or its limits are no longer
    valid; the task is failed with this error instead of being run.

    Attributes:
        task_id: the task's journal id.
        step: the step's name (or the workflow's label).
        reason: what stops it, in words.
    """

    fields = ("task_id", "step", "reason")
    template = "task {task_id} ({step}) cannot be resumed: {reason}"


class UnknownTask(GovernorError, KeyError):
    """No task with that id is in the daemon's journal (never submitted, or pruned).

    Attributes:
        task_id: the id asked for.
    """

    fields = ("task_id",)
    template = "no task {task_id} in the journal (never submitted, or pruned)"


class RequestSuperseded(GovernorError, concurrent.futures.CancelledError):
    """A web request's steps were cancelled because a newer request took its supersede key.

    Raised by :meth:`governor.asgi.RequestGovernor.run_batch`; ``GovernorMiddleware``
    answers it with HTTP 409 when the response has not started.

    Attributes:
        key: the supersede key the newer request took.
        detail: the cancellation's detail as the steps saw it.
    """

    fields = ("key", "detail")
    defaults = {"detail": None}

    def __str__(self) -> str:
        return f"superseded by a newer request with key {self.key!r}" + (f" ({self.detail})" if self.detail else "")


class PeerRefused(GovernorError, PermissionError):
    """A connection from a user other than the daemon's was refused."""


class DaemonError(GovernorError, RuntimeError):
    """The daemon cannot start: socket directory unsafe, another daemon running, ...

    Each cause has its own subclass, so a command can give each its own exit code; the
    message is one line for a person.
    """


class SocketDirectoryUnsafe(DaemonError):
    """The socket's directory is not a private directory of ours (or cannot be made one)."""


class DaemonAlreadyRunning(DaemonError):
    """A daemon already answers on the socket, or something other than a socket is there."""


class JournalLocked(DaemonError):
    """Another daemon holds the journal's lock."""


class JournalUnavailable(DaemonError):
    """The journal file cannot be used: it cannot be opened for reading and writing (an
    immutable or unreadable file, a directory we cannot enter) or is not an SQLite database."""


class JournalLost(DaemonError):
    """The daemon's journal file was deleted or replaced while it ran: it takes no new
    work, since nothing it acknowledged would survive a restart. Restart it."""


class MetricsAddressInvalid(DaemonError, ValueError):
    """``--metrics-addr`` is not ``PORT``, ``HOST:PORT`` or ``[IPV6]:PORT``."""


class MetricsAddressUnavailable(DaemonError):
    """The metrics address cannot be served: in use, not ours, or an unknown host."""


class InitializerInvalid(DaemonError, ValueError):
    """``--initializer`` is not ``MODULE:FUNCTION``, or names nothing callable."""
