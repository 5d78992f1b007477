"""What the supervisor and its local worker processes say to each other: one class per message.

Both sides import this module (the supervisor's ``governor.engine.lanes`` and ``slots``, the
workers' ``worker`` and ``template``), so a message has one definition, a name and named
fields, and the reader tells messages apart by their type, not by a string in slot 0::

    worker's task socket     down  task id, Assignment              one task
                             up    Outcome | Dirty (up_to_wire)     how it ended | could not be made clean
    worker's control socket  down  Cancel | Revoke                  stop a task | give one back
                             up    Revoked (revoked_to_wire)        the task given back will not run
    a worker's first words   up    Hello (one per socket, as JSON)  which slot, which socket, its pid
    template's socket        down  Fork                             start one worker
                             up    Ready | StartFailed              at start (once)
                                   Exited | ForkFailed              a worker's end | a fork that failed

:class:`Assignment` crosses a socket for every task as the plain tuple of its fields
pickled: a plain tuple pickles and unpickles in a fifth of a named tuple's time. The others
going down are rare and travel as themselves (pickled by reference to this module).

What comes *up* is never unpickled by the supervisor's manager thread: a step holds its
worker's sockets (its own process's fds) and can write anything there. An :class:`Outcome`
travels as fixed fields (``struct``) and length-prefixed text, its value as the pickle the
worker made of it, which only the caller who asks for the result unpickles
(``governor.task.Pickled``); the step's exception is rebuilt by :func:`load_exception`, which
makes nothing but exception classes already imported. :class:`Dirty` and :class:`Revoked`
are a tag and a text or a number. A frame that is none of these, or of the wrong shape, is a
:class:`ValueError` from :func:`up_from_wire` (the lanes kill the worker and fail its task).
"""

from __future__ import annotations

import enum
import hmac
import io
import json
import pickle
import struct
import sys
from typing import Any, NamedTuple, Optional, Sequence, Union

from governor.task import Pickled


class OutcomeKind(enum.Enum):
    """How a step ended, as its worker saw it."""

    OK = "ok"
    ERROR = "error"  # the step raised
    CANCELLED = "cancelled"  # the step stopped on its context's cancel
    OVER_MEMORY = "over_memory"  # the hard cap refused an allocation


class Assignment(NamedTuple):
    """One task for a worker, down its task socket (as the plain tuple of its fields).

    Attributes:
        task_id, step, args, kwargs: what to run.
        hard_cap_mb: cap the worker's address space for the task (``Limits.memory_hard_cap``).
        chunk: ``args`` is a list of argument tuples (``Supervisor.map``): the step runs
            once for each, in order, and the value is the list of their results.
        cwd: the directory to run the step in (``Call.cwd``); ``None``: the worker's own.
    """

    task_id: int
    step: str
    args: tuple
    kwargs: dict
    hard_cap_mb: Optional[float] = None
    chunk: bool = False
    cwd: Optional[str] = None


#: What precedes an :class:`Assignment`'s pickled fields in its frame: the task's id, which
#: the worker writes into its seat (negated) before it unpickles anything of the task, so
#: an argument whose unpickling kills the worker is known for what it is
#: (``governor.workers.seats``).
TASK_ID = struct.Struct("q")


class Outcome(NamedTuple):
    """What a worker sends back for one task, up its task socket (see :func:`outcome_to_wire`).

    Attributes:
        kind: how the step ended.
        value: the step's return value for ``OK`` (in the supervisor, read from a local
            worker: a :class:`~governor.task.Pickled` of it).
        exc_type, exc_message, traceback_text: the step's exception otherwise.
        exception: the exception itself when it pickles (and, in the supervisor, when
            :func:`load_exception` rebuilds it), else ``None``.
        started_at, ended_at: ``time.monotonic()`` in the worker around the step.
        pid: the worker's pid.
        task_id: the task's id, as its assignment gave it: the supervisor checks that an
            outcome is for the task it expects next from that worker, so a mix-up of
            outcomes and tasks is a loud :class:`~governor.errors.MalformedOutcome`, never
            one task's result in another's future.
        peak_rss_bytes: the worker's peak RSS during the step (``None`` if unknown).
        rss_bytes: the worker's RSS after the step, for leak recycling.
        denied_path: for ``ERROR``, the path the sandbox refused the step writing, when
            that is why it failed (the task ends as ``ReadOnlyViolation``).
    """

    kind: OutcomeKind
    started_at: float
    ended_at: float
    pid: int
    task_id: int
    value: Any = None
    exc_type: Optional[str] = None
    exc_message: Optional[str] = None
    traceback_text: Optional[str] = None
    exception: Optional[BaseException] = None
    peak_rss_bytes: Optional[int] = None
    rss_bytes: Optional[int] = None
    denied_path: Optional[str] = None


class Dirty(NamedTuple):
    """Up the task socket after an outcome: the worker could not be made clean after that
    step (``problem`` says why) and exits without taking another task; the supervisor
    counts ``worker_recycles{reason="dirty"}``."""

    problem: str


class Skipped(NamedTuple):
    """Up the task socket, where an outcome would be: the worker skipped task ``task_id``,
    its ``number``-th assignment, which the supervisor took back (:class:`Revoke`) before
    the worker reached it.

    The control socket's :class:`Revoked` says so at once, but from another thread and
    on another socket: this one keeps the task socket's own order (outcome, skipped task,
    next outcome), so the supervisor never takes the next task's outcome for the skipped
    task's.
    """

    task_id: int
    number: int


#: An outcome's frame: its tag, its fixed fields, then the byte lengths of its six variable
#: fields (:data:`_TEXTS` and the two pickles), each :data:`_ABSENT` for ``None``.
_OUTCOME = struct.Struct("!cBddiqqq6I")
_OUTCOME_TAG, _DIRTY_TAG, _SKIPPED_TAG = b"O", b"D", b"S"
_ABSENT = 0xFFFFFFFF
_NO_FIGURE = -1  # peak_rss_bytes, rss_bytes: None
_TEXTS = ("exc_type", "exc_message", "traceback_text", "denied_path")
_NO_TEXTS = (_ABSENT,) * 5  # the lengths of an OK outcome's texts and exception
_NO_TEXT_BYTES = struct.pack("!5I", *_NO_TEXTS)
_TEXTS_AT = _OUTCOME.size - 6 * 4  # where the lengths start
_OK = OutcomeKind.OK
_KIND_CODES = {kind: code for code, kind in enumerate(OutcomeKind)}
_KINDS_BY_CODE = tuple(OutcomeKind)


def outcome_to_wire(outcome: Outcome) -> bytes:
    """An outcome's frame, as its worker sends it; its ``value`` and ``exception`` are
    pickled here (an exception that does not pickle travels as its texts alone).

    Raises:
        Exception: whatever pickling the step's value raised (it does not pickle).
    """
    kind, started_at, ended_at, pid, task_id, value, _, _, _, _, peak, rss, _ = outcome
    figures = (_NO_FIGURE if peak is None else peak, _NO_FIGURE if rss is None else rss)
    if kind is _OK:  # the hot path: a value, no texts
        value = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
        head = _OUTCOME.pack(_OUTCOME_TAG, 0, started_at, ended_at, pid, task_id, *figures, *_NO_TEXTS, len(value))
        return head + value
    exception = None
    if outcome.exception is not None:
        try:
            exception = pickle.dumps(outcome.exception, pickle.HIGHEST_PROTOCOL)
        except Exception:
            pass  # the caller gets StepFailed with the exception's type, message and traceback
    fields = [None if text is None else text.encode("utf-8", "surrogateescape")
              for text in (outcome.exc_type, outcome.exc_message, outcome.traceback_text, outcome.denied_path)]
    fields += (exception, None)
    head = _OUTCOME.pack(_OUTCOME_TAG, _KIND_CODES[kind], started_at, ended_at, pid, task_id,
                         *figures, *(_ABSENT if field is None else len(field) for field in fields))
    return b"".join((head, *(field for field in fields if field)))


def dirty_to_wire(dirty: Dirty) -> bytes:
    """A :class:`Dirty` notice's frame."""
    return _DIRTY_TAG + dirty.problem.encode("utf-8", "surrogateescape")


def skipped_to_wire(skipped: Skipped) -> bytes:
    """A :class:`Skipped` notice's frame."""
    return _SKIPPED_TAG + _REVOKED.pack(skipped.task_id, skipped.number)


def up_from_wire(data: bytes) -> Union[Outcome, Dirty, Skipped]:
    """The :class:`Outcome`, :class:`Dirty` or :class:`Skipped` in a frame from a worker's task socket, read
    without unpickling anything but an exception (:func:`load_exception`).

    The outcome's ``value`` is a :class:`~governor.task.Pickled` of what the step returned,
    and its ``exception`` the step's exception rebuilt, or ``None`` if it cannot be.

    Raises:
        ValueError: the frame is not one a worker sends (malformed, or the wrong shape).
    """
    tag = data[:1]
    if tag != _OUTCOME_TAG:
        if tag == _DIRTY_TAG:
            return Dirty(data[1:].decode("utf-8", "replace"))
        if tag == _SKIPPED_TAG and len(data) == 1 + _REVOKED.size:
            return Skipped(*_REVOKED.unpack_from(data, 1))
        raise ValueError(f"a frame of unknown kind {tag!r}")
    try:
        head = _OUTCOME.unpack_from(data)
    except struct.error as exc:
        raise ValueError(f"not an outcome: {exc}") from None
    _, code, started_at, ended_at, pid, task_id, peak, rss, *lengths = head
    peak = None if peak == _NO_FIGURE else peak
    rss = None if rss == _NO_FIGURE else rss
    if code == 0 and data[_TEXTS_AT:_OUTCOME.size - 4] == _NO_TEXT_BYTES and lengths[5] == len(data) - _OUTCOME.size:
        # The hot path (a value, no texts), built as a tuple.
        return tuple.__new__(Outcome, (_OK, started_at, ended_at, pid, task_id, Pickled(data[_OUTCOME.size:]),
                                       None, None, None, None, peak, rss, None))
    if code >= len(_KINDS_BY_CODE):
        raise ValueError(f"an outcome of unknown kind {code}")
    kind = _KINDS_BY_CODE[code]
    fields, at = [], _OUTCOME.size
    for length in lengths:
        if length == _ABSENT:
            fields.append(None)
            continue
        fields.append(data[at:at + length])
        at += length
    if at != len(data):
        raise ValueError(f"an outcome of {len(data)} bytes whose fields add up to {at}")
    texts = [None if field is None else field.decode("utf-8", "replace") for field in fields[:4]]
    exception, value = fields[4:]
    if (kind is OutcomeKind.OK) != (value is not None):
        raise ValueError(f"a {kind.value} outcome {'without' if value is None else 'with'} a value")
    return Outcome(kind, started_at, ended_at, pid, task_id, None if value is None else Pickled(value), *texts[:3],
                   None if exception is None else load_exception(exception), peak, rss, texts[3])


class _ExceptionUnpickler(pickle.Unpickler):
    """Makes exception classes of modules already imported, and nothing else: no import,
    no function call (``find_class`` is where every pickled class or callable comes from)."""

    def find_class(self, module: str, name: str) -> Any:
        found: Any = sys.modules.get(module)
        for part in name.split(".") if found is not None else ():
            found = getattr(found, part, None)
        if isinstance(found, type) and issubclass(found, BaseException):
            return found
        raise pickle.UnpicklingError(f"{module}.{name} is not an exception class this process has imported")


def load_exception(data: bytes) -> Optional[BaseException]:
    """The exception pickled in ``data``, or ``None`` if it cannot be rebuilt safely (its
    pickle names anything but exception classes already imported, or is not one)."""
    try:
        exception = _ExceptionUnpickler(io.BytesIO(data)).load()
    except Exception:
        return None
    return exception if isinstance(exception, BaseException) else None


class Cancel(NamedTuple):
    """Down the control socket: set the cancel flag of task ``task_id``'s context, now or
    when it starts in this worker (a task sent ahead)."""

    task_id: int
    reason: str
    detail: Optional[str]


class Revoke(NamedTuple):
    """Down the control socket: give back task ``task_id``, sent ahead as the worker's
    ``number``-th assignment, unless the worker has taken it already."""

    task_id: int
    number: int


class Revoked(NamedTuple):
    """Up the control socket: the worker will not run task ``task_id``, its ``number``-th
    assignment (see :class:`Revoke`)."""

    task_id: int
    number: int


_REVOKED = struct.Struct("!qq")

#: The size of every frame up a worker's control socket.
REVOKED_BYTES = _REVOKED.size


def revoked_to_wire(revoked: Revoked) -> bytes:
    """A :class:`Revoked`'s frame: the task's id and its assignment's number, nothing else."""
    return _REVOKED.pack(revoked.task_id, revoked.number)


def revoked_from_wire(data: bytes) -> Revoked:
    """The :class:`Revoked` in a frame from a control socket.

    Raises:
        ValueError: it is not :data:`REVOKED_BYTES` long.
    """
    if len(data) != REVOKED_BYTES:
        raise ValueError(f"a control frame of {len(data)} bytes")
    return Revoked(*_REVOKED.unpack(data))


class Channel(enum.Enum):
    """Which of its two sockets a worker's :class:`Hello` opens."""

    TASK = "task"  # assignments down, outcomes up
    CONTROL = "control"  # cancels down; its EOF ends the worker


class Hello(NamedTuple):
    """A worker's first message on each of its sockets.

    Attributes:
        channel: which socket this is.
        slot_id: the supervisor's slot the worker was forked for (see :class:`Fork`).
        pid: the worker's pid.
        sandbox: ``(label, missing, tmpdir)`` of a sandboxed pool worker, else ``None``.
        init_failure: the traceback of the worker's initializer (``Supervisor(initializer=)``)
            when it raised; the worker then exits without opening its second socket.
    """

    channel: Channel
    slot_id: int
    pid: int
    sandbox: Optional[Sequence[Any]] = None
    init_failure: Optional[str] = None


#: The most a :class:`Hello` may take on the wire: anything longer is not a worker's.
HELLO_MAX_BYTES = 64 * 1024

#: The characters of an initializer's traceback a hello carries (its end), well within
#: :data:`HELLO_MAX_BYTES`.
HELLO_TEXT_KEPT = 16 * 1024


def hello_to_wire(hello: Hello, secret: str) -> bytes:
    """A hello as a worker sends it: JSON, with the supervisor's secret (see :func:`hello_from_wire`)."""
    failure = hello.init_failure
    if failure is not None and len(failure) > HELLO_TEXT_KEPT:  # its end says most
        failure = "...\n" + failure[-HELLO_TEXT_KEPT:]
    return json.dumps({"channel": hello.channel.value, "slot_id": hello.slot_id, "pid": hello.pid,
                       "sandbox": hello.sandbox, "init_failure": failure, "secret": secret}).encode()


def hello_from_wire(data: bytes, secret: str) -> Hello:
    """The :class:`Hello` in ``data``, checked field by field.

    JSON, not pickle: anything on this machine that can reach the worker listener (a step
    running in a worker, first of all) can send it, and unpickling runs what the bytes name.

    Raises:
        ValueError: not a worker's hello (malformed, or without this supervisor's secret).
    """
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(raw, dict) or not hmac.compare_digest(str(raw.get("secret")).encode(), secret.encode()):
        raise ValueError("not this supervisor's secret")
    channel, slot_id, pid, sandbox, failure = (raw.get(key) for key in
                                               ("channel", "slot_id", "pid", "sandbox", "init_failure"))
    if type(slot_id) is not int or type(pid) is not int:
        raise ValueError("slot_id and pid must be integers")
    if sandbox is not None and not (
            isinstance(sandbox, list) and len(sandbox) == 3 and isinstance(sandbox[0], str)
            and isinstance(sandbox[1], list) and all(isinstance(item, str) for item in sandbox[1])
            and (sandbox[2] is None or isinstance(sandbox[2], str))):
        raise ValueError("sandbox must be [label, [missing, ...], tmpdir]")
    if failure is not None and not isinstance(failure, str):
        raise ValueError("init_failure must be a string")
    return Hello(Channel(channel), slot_id, pid, None if sandbox is None else tuple(sandbox), failure)


class Fork(NamedTuple):
    """Down the template's socket: fork one worker for ``slot_id`` of ``lane``, which writes
    the task it takes into cell ``seat`` of the seats file (``governor.workers.seats``)."""

    slot_id: int
    lane: str
    seats_path: str
    seat: int


class Ready(NamedTuple):
    """Up the template's socket, once: it imported every step module and forks on request."""


class StartFailed(NamedTuple):
    """Up the template's socket, once: a step module failed to import (its traceback)."""

    traceback_text: str


class Exited(NamedTuple):
    """Up the template's socket: worker ``pid`` was reaped; ``exitcode`` if it exited,
    ``signal_number`` if a signal ended it."""

    pid: int
    exitcode: Optional[int]
    signal_number: Optional[int]


class ForkFailed(NamedTuple):
    """Up the template's socket: the fork for ``slot_id`` failed (``error`` says why)."""

    slot_id: int
    error: str
