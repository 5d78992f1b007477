"""Requests and replies: one frozen class per request, checked field by field.

Versioning
    The protocol version is ``PROTOCOL_VERSION`` (1). Every request and every reply carries
    it as ``"v"``; a request with any other ``"v"`` is refused with ``bad_version``.

Requests
    ``{"v": 1, "id": ID, "op": OP, ...fields}``. ``ID`` is an integer (64-bit) or a string
    of at most 64 characters, chosen by the client and echoed in the reply. A field not
    listed for the op, or of the wrong type, is refused with ``bad_request`` naming the
    field (e.g. ``calls[3].step``). ``true``/``false`` are never accepted as numbers.

    ===========  =====================================================================
    op           fields (defaults in brackets)
    ===========  =====================================================================
    ``ping``     none
    ``submit``   ``step``: string, 1-200 chars; ``params``: object [``{}``];
                 ``wait``: bool [false]; ``key``: string of at most 200 chars or null
                 [null], a supersede key; ``order``: an integer from 0 to 2**53 or null
                 [null], which of two submissions with one key is the newer (one below
                 the key's latest comes late: it is cancelled at once, reason
                 ``superseded``); ``limits``: null [null] or an object with
                 ``timeout_s`` and/or ``max_memory_mb``, each a finite number > 0 or null,
                 within what ``Limits`` accepts; ``cwd``: the caller's working
                 directory, an absolute path of at most 4,096 characters, or null [null];
                 ``priority``: an integer from -1,000 to 1,000 [0], its rank in the pool
                 lane's queue (``Call.priority``; a critical step ignores it);
                 ``ack``: bool [true]: with ``wait``, false asks for no acknowledgement
                 (see Acknowledgements)
    ``batch``    ``calls``: 1-10,000 objects ``{"step": string, "params": object,
                 "limits": as for submit, "priority": as for submit}`` (``params``
                 defaults to ``{}``, ``limits`` to null: the step's own, ``priority`` to
                 0); ``wait``: bool [false]; ``key``, ``order``: as for ``submit``, for
                 the whole batch (a view switch supersedes the last view);
                 ``cwd``: as for ``submit``
    ``workflow`` ``calls``: as for ``batch``, 1-1,000 of them; ``wait``: bool [false];
                 ``cwd``: as for ``submit``
    ``cancel``   ``task_ids``: 1-10,000 task ids
    ``status``   ``task_id``: a task id, or null for the recent tasks [null]; for those,
                 ``states`` (an array of states, or null for any) [null], ``step`` (a
                 name, or null for any) [null], ``limit`` (1 to 10000) [50]
    ``wait``     ``task_id``: a task id; ``timeout``: seconds, a finite number >= 0, or
                 null for no timeout [null]
    ``steps``    none
    ``workers``  none
    ``metrics``  ``format``: ``"json"`` or ``"prometheus"`` [``"json"``]
    ``live``     none; the live picture ``governor top`` draws (``governor.service.live``)
    ``page``     none; the status page's URL with a fresh token (``governor page``), for
                 the daemon's own user, when it serves the page (``--http-addr``)
    ===========  =====================================================================

    A task id is an integer from 1 to 2**63 - 1. A ``params`` object nests at most 32
    levels deep (the object itself is level 1); its size is bounded by the frame cap.

    Paths: a step declares which of its parameters name files or directories
    (``StepSpec.paths``). The daemon makes a relative path there absolute against the
    request's ``cwd`` before it journals the task, so a step never sees the daemon's own
    working directory; without a ``cwd``, such a relative path is refused
    (``InvalidParameters``). The step then runs in ``cwd`` (its worker changes into it),
    so a relative path it opens means the caller's directory too; without a ``cwd``, it
    runs in the daemon's. The clients send their working directory.

    Parameters: before it journals anything, the daemon binds ``params`` to the step's
    signature (an unknown name is refused with its closest match) and checks each value
    against the parameter's annotation (``delay: float`` refuses ``"abc"``), refusing the
    whole request with ``InvalidParameters`` (``governor.steps.parameters`` says which
    annotations are checked). The ``steps`` reply describes each step's parameters.

Acknowledgements
    ``submit``, ``batch`` and ``workflow`` are acknowledged once their tasks are journaled
    (as durable as the daemon's ``--journal-sync`` makes them) and handed to the
    supervisor: the reply carries ``task_id`` (``task_ids`` for a batch) and ``final``.
    Without ``wait`` that reply is the only one (``final: true``). With ``wait`` it is
    ``final: false``, and a second reply, ``final: true``, carries the task record(s)
    once every task has ended and its end is journaled (or early: ``superseded``). A
    waiting ``submit`` with ``ack: false`` gets that final reply only: one request frame,
    one reply frame (its record carries the ``task_id``). The client then cannot learn
    the id, nor cancel the task, before it ends, and if the connection is lost meanwhile it
    cannot tell whether the task was journaled (it was if the daemon had read the request
    and found it valid: the task then runs, or resumes after a restart). A refusal is an
    error reply in either case, sent before anything is journaled.

Replies
    Success: ``{"v": 1, "id": ID, "ok": true, ...op-specific fields}``.
    Failure: ``{"v": 1, "id": ID, "ok": false, "error": {"type": T, "message": M,
    "fields": {...}}}``, where ``T`` names the error's class, ``M`` is its message and
    ``fields`` holds its attributes; ``"notes": [text, ...]`` is added when the error has
    ``add_note`` notes (old clients ignore it). ``ID`` is null when the request was too broken to
    have a usable id (a ``bad_json`` frame, say).

    The error object is :func:`~governor.protocol.codec.error_to_wire`'s; that module says
    which error types the client rebuilds.
"""

from __future__ import annotations

import reprlib
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple

import attrs

from governor.limits import Limits
from governor.protocol import decoders as decode
from governor.protocol.codec import error_from_wire, error_to_wire
from governor.protocol.decoders import WIRE_LIMITS, RequestId, expected, from_object, is_integer, wire_type
from governor.protocol.errors import ErrorCode, ProtocolError

#: The version every request and reply carries as ``"v"``.
PROTOCOL_VERSION = 1

#: Step names and supersede keys: generous for dotted names; bounded so that a status
#: listing of many tasks stays small.
MAX_STEP_NAME_CHARS = 200
MAX_KEY_CHARS = 200

#: How many tasks a ``status`` listing holds by default, and at most: the last screenful by
#: default; the cap keeps one reply well under the frame cap (summaries are small).
DEFAULT_STATUS_LIMIT = 50
MAX_STATUS_LIMIT = 10_000
MAX_STATE_CHARS = 32

#: Calls in one batch: 10,000 small calls fill about the frame cap; a bigger batch would
#: not fit anyway, and the daemon journals a batch in one transaction.
MAX_BATCH_CALLS = 10_000

#: Steps in one workflow: a workflow runs serially in the critical lane, so a longer one
#: would hold that lane for too long; split it instead.
MAX_WORKFLOW_CALLS = 1_000

#: A task's priority in the pool lane's queue, either way: waiting a second counts as one
#: step of priority (``governor.engine.queues``), so 1,000 is a jump of about 17 minutes,
#: more than any interactive request needs.
MAX_PRIORITY = 1_000

#: Task ids in one cancel: as many as one batch submits.
MAX_CANCEL_IDS = 10_000


@wire_type
class StepCall:
    """One call in a ``batch`` or ``workflow``: a step's name, its keyword arguments, its own
    limits and its priority."""

    step: str = attrs.field(converter=decode.text(MAX_STEP_NAME_CHARS, min_chars=1))
    params: Dict[str, Any] = attrs.field(factory=dict, converter=decode.params)
    limits: Optional[Limits] = attrs.field(default=None, converter=decode.limits)
    priority: int = attrs.field(default=0, converter=decode.integer(-MAX_PRIORITY, MAX_PRIORITY))


def _step_call(value: Any) -> StepCall:
    return value if isinstance(value, StepCall) else from_object(StepCall, value)


def _wire_value(value: Any) -> Any:
    """A request field's value as JSON: the inverse of its decoder."""
    if isinstance(value, Limits):
        return {name: getattr(value, name) for name in WIRE_LIMITS}
    if isinstance(value, StepCall):  # limits and priority only when set: what a daemon without them accepts
        return {"step": value.step, "params": value.params,
                **({} if value.limits is None else {"limits": _wire_value(value.limits)}),
                **({"priority": value.priority} if value.priority else {})}
    if isinstance(value, tuple):
        return [_wire_value(item) for item in value]
    return value


@wire_type
class Request:
    """Base of the requests, one subclass per op. ``id`` is echoed in the reply."""

    OP: ClassVar[str]

    id: RequestId = attrs.field(converter=decode.request_id)

    def to_wire(self) -> Dict[str, Any]:
        """This request as the JSON object to send."""
        fields = {field.name: _wire_value(getattr(self, field.name))
                  for field in attrs.fields(type(self)) if field.name != "id"}
        return {"v": PROTOCOL_VERSION, "id": self.id, "op": self.OP, **fields}


@wire_type
class Ping(Request):
    """``ping``: is the daemon there?"""

    OP = "ping"


@wire_type
class Submit(Request):
    """``submit``: run one step; with ``wait``, reply when it ends, else at once with its id
    (``ack``: see the module docstring's Acknowledgements)."""

    OP = "submit"
    step: str = attrs.field(converter=decode.text(MAX_STEP_NAME_CHARS, min_chars=1))
    params: Dict[str, Any] = attrs.field(factory=dict, converter=decode.params)
    wait: bool = attrs.field(default=False, converter=decode.boolean)
    key: Optional[str] = attrs.field(default=None, converter=decode.optional(decode.text(MAX_KEY_CHARS)))
    order: Optional[int] = attrs.field(default=None, converter=decode.optional(decode.order))
    limits: Optional[Limits] = attrs.field(default=None, converter=decode.limits)
    cwd: Optional[str] = attrs.field(default=None, converter=decode.optional(decode.directory))
    priority: int = attrs.field(default=0, converter=decode.integer(-MAX_PRIORITY, MAX_PRIORITY))
    ack: bool = attrs.field(default=True, converter=decode.boolean)

    def to_wire(self) -> Dict[str, Any]:
        wire = super().to_wire()
        if self.ack:
            del wire["ack"]  # the default: what a daemon that predates the field accepts
        return wire


@wire_type
class Batch(Request):
    """``batch``: run many steps, each in the lane its step declares."""

    OP = "batch"
    calls: Tuple[StepCall, ...] = attrs.field(converter=decode.tuple_of(_step_call, MAX_BATCH_CALLS, "calls"))
    wait: bool = attrs.field(default=False, converter=decode.boolean)
    key: Optional[str] = attrs.field(default=None, converter=decode.optional(decode.text(MAX_KEY_CHARS)))
    order: Optional[int] = attrs.field(default=None, converter=decode.optional(decode.order))
    cwd: Optional[str] = attrs.field(default=None, converter=decode.optional(decode.directory))


@wire_type
class WorkflowRequest(Request):
    """``workflow``: run steps in order in the critical lane, stopping at the first failure."""

    OP = "workflow"
    calls: Tuple[StepCall, ...] = attrs.field(converter=decode.tuple_of(_step_call, MAX_WORKFLOW_CALLS, "calls"))
    wait: bool = attrs.field(default=False, converter=decode.boolean)
    cwd: Optional[str] = attrs.field(default=None, converter=decode.optional(decode.directory))


@wire_type
class Cancel(Request):
    """``cancel``: cancel tasks, queued or running."""

    OP = "cancel"
    task_ids: Tuple[int, ...] = attrs.field(converter=decode.tuple_of(decode.task_id, MAX_CANCEL_IDS, "task ids"))


@wire_type
class Status(Request):
    """``status``: one task's record, or the recent tasks' when ``task_id`` is ``None``.

    A listing holds the last ``limit`` tasks, newest first, of those in one of ``states``
    (any state when ``None``) and of ``step`` (any step when ``None``).
    """

    OP = "status"
    task_id: Optional[int] = attrs.field(default=None, converter=decode.optional(decode.task_id))
    states: Optional[Tuple[str, ...]] = attrs.field(default=None, converter=decode.optional(
        decode.tuple_of(decode.text(MAX_STATE_CHARS, min_chars=1), MAX_STATE_CHARS, "states")))
    step: Optional[str] = attrs.field(default=None,
                                      converter=decode.optional(decode.text(MAX_STEP_NAME_CHARS, min_chars=1)))
    limit: int = attrs.field(default=DEFAULT_STATUS_LIMIT, converter=decode.count(MAX_STATUS_LIMIT))


@wire_type
class Wait(Request):
    """``wait``: reply when a task ends, or after ``timeout`` seconds (``None``: no timeout)."""

    OP = "wait"
    task_id: int = attrs.field(converter=decode.task_id)
    timeout: Optional[float] = attrs.field(default=None, converter=decode.optional(decode.number(0, inclusive=True)))


@wire_type
class Steps(Request):
    """``steps``: the registered steps."""

    OP = "steps"


@wire_type
class Workers(Request):
    """``workers``: the workers and what they run."""

    OP = "workers"


@wire_type
class Metrics(Request):
    """``metrics``: the supervisor's metrics, as a JSON snapshot or Prometheus text."""

    OP = "metrics"
    format: str = attrs.field(default="json", converter=decode.one_of("json", "prometheus"))


@wire_type
class Live(Request):
    """``live``: lanes, workers, recent tasks, kills and latencies in one snapshot."""

    OP = "live"


@wire_type
class Page(Request):
    """``page``: the status page's URL, with a fresh token."""

    OP = "page"


#: Every request type by its op.
REQUEST_TYPES: Dict[str, type] = {cls.OP: cls for cls in (Ping, Submit, Batch, WorkflowRequest, Cancel, Status, Wait,
                                                          Steps, Workers, Metrics, Live, Page)}

_ENVELOPE = frozenset({"v", "op"})


def parse_request(message: Mapping[str, Any]) -> Request:
    """Validate a decoded request and build its value.

    Args:
        message: one message from the wire.

    Returns:
        The request, an instance of the op's :class:`Request` subclass.

    Raises:
        ProtocolError: ``bad_version`` or ``bad_request``, naming the field at fault.
    """
    if not isinstance(message, dict):
        raise expected("an object", message)
    version = message.get("v")
    if not is_integer(version) or version != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.BAD_VERSION, f"unsupported protocol version {reprlib.repr(version)}; "
                                                   f"this side speaks {PROTOCOL_VERSION}", field="v")
    op = message.get("op")
    request_type = REQUEST_TYPES.get(op) if isinstance(op, str) else None
    if request_type is None:
        raise expected("one of " + ", ".join(map(repr, REQUEST_TYPES)), op).inside("op")
    return from_object(request_type, message, _ENVELOPE)


def request_id_of(message: Any) -> Optional[RequestId]:
    """The id to answer a request with: its ``id`` if that is valid, else ``None`` (null)."""
    try:
        return decode.request_id(message.get("id")) if isinstance(message, dict) else None
    except ProtocolError:
        return None


# --------------------------------------------------------------------------- replies

_REPLY_ENVELOPE = frozenset({"v", "id", "ok", "error"})


def ok_reply(request_id: Optional[RequestId], **fields: Any) -> Dict[str, Any]:
    """A success reply: ``{"v": 1, "id": request_id, "ok": true, **fields}``."""
    clashing = _REPLY_ENVELOPE.intersection(fields)
    if clashing:
        raise ValueError(f"reply fields {sorted(clashing)} would overwrite the reply's envelope")
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, **fields}


def error_reply(request_id: Optional[RequestId], error: BaseException) -> Dict[str, Any]:
    """A failure reply carrying ``error`` (see :func:`error_to_wire`)."""
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "error": error_to_wire(error)}


def unwrap_reply(reply: Mapping[str, Any]) -> Dict[str, Any]:
    """A client's view of a reply: return it when ok, else raise the error it carries.

    Raises:
        ProtocolError: ``bad_reply`` when ``reply`` is not a reply of this protocol version.
        BaseException: the reply's error, rebuilt by :func:`error_from_wire`.
    """
    if not isinstance(reply, dict) or reply.get("v") != PROTOCOL_VERSION or not isinstance(reply.get("ok"), bool):
        raise ProtocolError(ErrorCode.BAD_REPLY, f"not a protocol {PROTOCOL_VERSION} reply: {reprlib.repr(reply)}")
    if not reply["ok"]:
        raise error_from_wire(reply.get("error"))
    return reply
