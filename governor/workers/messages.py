"""What the supervisor and its local worker processes say to each other: one class per message.

Both sides import this module (the supervisor's ``governor.engine.lanes`` and ``slots``, the
workers' ``worker`` and ``template``), so a message has one definition, a name and named
fields, and the reader tells messages apart by their type, not by a string in slot 0::

    worker's task socket     down  task id, Assignment              one task
                             up    Outcome (as outcome_to_wire's    how it ended
                                   tuple) | Dirty                   could not be made clean; exits
    worker's control socket  down  Cancel | Revoke                  stop a task | give one back
                             up    Revoked                          the task given back will not run
    a worker's first words   up    Hello (one per socket, as JSON)  which slot, which socket, its pid
    template's socket        down  Fork                             start one worker
                             up    Ready | StartFailed              at start (once)
                                   Exited | ForkFailed              a worker's end | a fork that failed

:class:`Assignment` and :class:`Outcome` cross a socket for every task, as the plain tuple
of their fields: a plain tuple pickles and unpickles in a fifth of a named tuple's time.
The others are rare and travel as themselves (pickled by reference to this module).
"""

from __future__ import annotations

import enum
import hmac
import json
import struct
from typing import Any, NamedTuple, Optional, Sequence


class OutcomeKind(enum.Enum):
    """How a step ended, as its worker saw it."""

    OK = "ok"
    ERROR = "error"  # the step raised
    CANCELLED = "cancelled"  # the step stopped on its context's cancel
    OVER_MEMORY = "over_memory"  # the hard cap refused an allocation


_KINDS = {kind.value: kind for kind in OutcomeKind}


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
        value: the step's return value for ``OK``.
        exc_type, exc_message, traceback_text: the step's exception otherwise.
        exception: the exception itself when it pickles, else ``None``.
        started_at, ended_at: ``time.monotonic()`` in the worker around the step.
        pid: the worker's pid.
        peak_rss_bytes: the worker's peak RSS during the step (``None`` if unknown).
        rss_bytes: the worker's RSS after the step, for leak recycling.
        denied_path: for ``ERROR``, the path the sandbox refused the step writing, when
            that is why it failed (the task ends as ``ReadOnlyViolation``).
    """

    kind: OutcomeKind
    started_at: float
    ended_at: float
    pid: int
    value: Any = None
    exc_type: Optional[str] = None
    exc_message: Optional[str] = None
    traceback_text: Optional[str] = None
    exception: Optional[BaseException] = None
    peak_rss_bytes: Optional[int] = None
    rss_bytes: Optional[int] = None
    denied_path: Optional[str] = None


def outcome_to_wire(outcome: Outcome) -> tuple:
    """The plain tuple an outcome travels as: its fields, the kind as its value."""
    return (outcome.kind.value, *outcome[1:])


def outcome_from_wire(raw: tuple) -> Outcome:
    """The :class:`Outcome` of :func:`outcome_to_wire`'s tuple (built as a tuple: the named
    tuple's own constructor is a Python call that checks its twelve arguments)."""
    return tuple.__new__(Outcome, (_KINDS[raw[0]], *raw[1:]))


class Dirty(NamedTuple):
    """Up the task socket after an outcome: the worker could not be made clean after that
    step (``problem`` says why) and exits without taking another task; the supervisor
    counts ``worker_recycles{reason="dirty"}``."""

    problem: str


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
    """Up the control socket: the worker will not run task ``task_id`` (see :class:`Revoke`)."""

    task_id: int


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
