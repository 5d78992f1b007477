"""The error codec: a Governor error as the JSON object a failure reply carries, and back.

A failure reply's ``error`` is ``{"type": T, "message": M, "fields": {...}}``, where ``T``
names the error's class, ``M`` is its message and ``fields`` holds its attributes. An error
with ``add_note`` notes also carries ``"notes": [text, ...]`` (for ``StepFailed``, the step's
own exception's notes, then the supervisor's, such as how many attempts ran); the client
adds them to the error it rebuilds, of whatever type. A reader that does not know the key
ignores it.

These error types are rebuilt on the client with the same attributes and message:
``StepFailed`` (without the original exception object), ``StepTimeout``,
``MemoryLimitExceeded``, ``StepCancelled``, ``WorkerCrashed``, ``StepSkipped``,
``WorkflowFailed`` (its step error nested as ``fields.error``), ``UnknownStep``,
``UnknownTask``, ``TooManyClients``, ``TaskNotResumable``, ``QueueFull``,
``InvalidParameters``, ``SupervisorClosed``, ``WorkerStartFailed``,
``RegistrationError``, ``GovernorError``, ``ResultNotSerialisable`` and
``ProtocolError`` (``fields``: ``code``, ``reason``, ``field``). Any other type
arrives as ``RemoteError``, carrying the type's name and the message.
"""

from __future__ import annotations

import reprlib
from typing import Any, Callable, Dict, List, Mapping, Tuple

import attrs

from governor.errors import (GovernorError, InvalidParameters, JournalLost, MalformedOutcome, MemoryLimitExceeded, QueueFull,
                             RegistrationError, StepCancelled, StepFailed, StepSkipped, StepTimeout, SupervisorClosed, TaskNotResumable,
                             TooManyClients, UnknownStep, UnknownTask, WorkerCrashed, WorkerStartFailed,
                             WorkflowFailed)
from governor.protocol.errors import ErrorCode, ProtocolError, RemoteError, ResultNotSerialisable
from governor.protocol.values import to_json_value


def _results_to_wire(results: List[Any]) -> List[Any]:
    """A workflow's results: each that cannot be sent becomes ``None``."""
    def sendable(result: Any) -> Any:
        try:
            return to_json_value(result)
        except ResultNotSerialisable:
            return None
    return [sendable(result) for result in results]


@attrs.frozen
class _ErrorCodec:
    """How one error type crosses the wire.

    Args:
        cls: the type (matched exactly: a subclass is not rebuilt as its base).
        attributes: the attributes sent as ``fields``, in the order of the constructor's
            parameters, so ``cls(*values)`` rebuilds the error. Empty for a type that
            is rebuilt from its message alone.
        converters: per attribute, (to the wire, from the wire) for values not JSON as is.
    """

    cls: type
    attributes: Tuple[str, ...] = ()
    converters: Mapping[str, Tuple[Callable[[Any], Any], Callable[[Any], Any]]] = attrs.field(factory=dict)

    def fields(self, error: BaseException) -> Dict[str, Any]:
        """The attributes to send (which may still not be JSON values: the caller checks)."""
        return {name: self._converter(name)[0](getattr(error, name)) for name in self.attributes}

    def build(self, message: str, fields: Mapping[str, Any]) -> BaseException:
        """The error again, from the wire's message and fields."""
        if not self.attributes:
            return self.cls(message)
        if set(fields) != set(self.attributes):
            raise ValueError(f"{self.cls.__name__} needs fields {self.attributes}, got {sorted(fields)}")
        return self.cls(*(self._converter(name)[1](fields[name]) for name in self.attributes))

    def _converter(self, name: str) -> Tuple[Callable[[Any], Any], Callable[[Any], Any]]:
        return self.converters.get(name, (_identity, _identity))


def _identity(value: Any) -> Any:
    return value


def error_to_wire(error: BaseException) -> Dict[str, Any]:
    """An error as the JSON object a failure reply carries; never raises.

    Returns:
        ``{"type": class name, "message": str(error), "fields": {...}}``. ``fields`` holds
        the attributes of a type :func:`error_from_wire` rebuilds and is empty for any
        other type (or when those attributes are not JSON values). ``"notes"``, only when
        there are any: the error's ``add_note`` texts (see the module docstring).
    """
    codec = _CODECS.get(type(error))
    fields: Dict[str, Any] = {}
    if codec is not None:
        try:
            fields = to_json_value(codec.fields(error))
        except (AttributeError, ResultNotSerialisable):
            pass  # sent without fields: the client gets a RemoteError with the same message
    wire = {"type": type(error).__name__, "message": str(error), "fields": fields}
    notes = _notes_of(error)  # a StepFailed's begin with its step's exception's own
    if notes:
        wire["notes"] = notes
    return wire


def _notes_of(error: Any) -> List[str]:
    """``error``'s ``add_note`` notes that are text (anything may sit in ``__notes__``)."""
    notes = getattr(error, "__notes__", None)
    return [note for note in notes if isinstance(note, str)] if isinstance(notes, list) else []


def error_from_wire(wire: Any) -> BaseException:
    """Rebuild an error sent by :func:`error_to_wire`.

    The type is looked up in a fixed table of Governor's errors, never imported by name.

    Returns:
        The error, of its original type when the table has it and its fields fit; else a
        :class:`RemoteError` with the type's name and the message; either with the
        wire's ``notes`` added (``add_note``). A ``ProtocolError`` (``bad_reply``) when
        ``wire`` is not an error object at all.
    """
    if not (isinstance(wire, dict) and isinstance(wire.get("type"), str) and isinstance(wire.get("message"), str)
            and isinstance(wire.get("fields", {}), dict)):
        return ProtocolError(ErrorCode.BAD_REPLY, f"not an error object: {reprlib.repr(wire)}")
    type_name, message = wire["type"], wire["message"]
    error = _rebuilt(type_name, message, wire.get("fields", {}))
    notes = wire.get("notes")
    for note in notes if isinstance(notes, list) else ():
        if isinstance(note, str):
            error.add_note(note)
    return error


def _rebuilt(type_name: str, message: str, fields: Any) -> BaseException:
    """The error of type ``type_name`` from its message and fields, or a :class:`RemoteError`."""
    codec = _CODECS_BY_NAME.get(type_name)
    if codec is not None:
        try:
            error = codec.build(message, fields)
            str(error)  # its message must be buildable from the fields it got
            return error
        except Exception:  # the wire is untrusted: any misfit falls back to the generic error
            pass
    return RemoteError(type_name, message)


def with_task_id(wire: Mapping[str, Any], task_id: int) -> Dict[str, Any]:
    """A wire error whose ``task_id`` fields (its own, and a nested step error's) say ``task_id``.

    The daemon records a task's errors under the task's journal id, the one id its
    clients know, rather than the supervisor's internal number; the message is rebuilt to
    match. An error without such fields, or one not rebuilt here, is returned as it is.
    """
    fields = dict(wire.get("fields") or {})
    if "task_id" in fields:
        fields["task_id"] = task_id
    if isinstance(fields.get("error"), dict):
        fields["error"] = with_task_id(fields["error"], task_id)
    if fields == wire.get("fields"):
        return dict(wire)
    renumbered = {**wire, "fields": fields}
    error = error_from_wire(renumbered)
    return renumbered if isinstance(error, RemoteError) else {**renumbered, "message": str(error)}


#: The errors rebuilt on the other side: a whitelist, matched by exact type going out and
#: by name coming in. A StepError's attributes are read, not its ``args`` (``StepTimeout``
#: is an OSError, which keeps only two of them); ``StepFailed.original`` is not sent.
_STEP = ("step", "task_id")
_CODECS: Dict[type, _ErrorCodec] = {codec.cls: codec for codec in (
    _ErrorCodec(StepFailed, _STEP + ("exc_type", "exc_message", "remote_traceback")),
    _ErrorCodec(StepTimeout, _STEP + ("limit_s", "elapsed_s", "pid")),
    _ErrorCodec(MemoryLimitExceeded, _STEP + ("limit_mb", "peak_mb", "pid", "killed")),
    _ErrorCodec(StepCancelled, _STEP + ("reason", "detail", "killed")),
    _ErrorCodec(WorkerCrashed, _STEP + ("pid", "exitcode", "signal")),
    _ErrorCodec(MalformedOutcome, _STEP + ("pid", "problem")),
    _ErrorCodec(StepSkipped, _STEP + ("failed_step",)),
    _ErrorCodec(WorkflowFailed, ("index", "error", "results", "skipped"),
                {"error": (error_to_wire, error_from_wire),
                 "results": (_results_to_wire, _identity)}),
    _ErrorCodec(UnknownStep, ("name", "suggestions")),
    _ErrorCodec(UnknownTask, ("task_id",)),
    _ErrorCodec(TooManyClients, ("limit",)),
    _ErrorCodec(TaskNotResumable, ("task_id", "step", "reason")),
    _ErrorCodec(QueueFull, ("lane", "capacity")),
    _ErrorCodec(ProtocolError, ("code", "reason", "field"), {"code": (str, _identity)}),
    _ErrorCodec(RemoteError, ("type_name", "message")),
    _ErrorCodec(InvalidParameters),
    _ErrorCodec(SupervisorClosed),
    _ErrorCodec(JournalLost),
    _ErrorCodec(WorkerStartFailed),
    _ErrorCodec(RegistrationError),
    _ErrorCodec(ResultNotSerialisable),
    _ErrorCodec(GovernorError),
)}
_CODECS_BY_NAME: Dict[str, _ErrorCodec] = {cls.__name__: codec for cls, codec in _CODECS.items()}
