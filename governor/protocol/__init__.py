"""The daemon's wire protocol: length-prefixed JSON messages over a Unix socket.

Data flow::

    client                                         daemon (governor serve)
    ------                                         -----------------------
    Submit(id=1, step=...).to_wire() -> dict
    send_message(sock, dict)  ──── frame ────>     read_message(reader) -> dict
                                                   parse_request(dict) -> Submit | Batch | ...
                                                   ... journal, supervisor ...
                                                   ok_reply(id, ...) / error_reply(id, error)
    recv_message(sock) -> dict  <─── frame ─────   write_message(writer, reply)
    unwrap_reply(reply): the reply, or raises the rebuilt error

Framing
    Every message, in both directions, is one frame: a 4-byte unsigned big-endian length N,
    then N bytes of UTF-8 JSON holding exactly one JSON object. N is at most 1 MiB
    (``MAX_MESSAGE_BYTES``) unless both sides agree on another cap. The JSON is strict:
    ``NaN`` and ``Infinity`` are refused both ways. Nothing is ever pickled.

    A reader that meets a frame it cannot use says why with a protocol error code:

    * ``too_large``: the declared length is over the cap. The body is not read, so the
      stream cannot be resynchronised: the server replies with this error, then closes.
    * ``bad_json``: the body is not UTF-8, not JSON, nested too deeply to parse, or not an
      object. The whole frame was consumed, so the stream is still in sync and the
      connection may stay open.
    * ``truncated``: the peer closed the connection in the middle of a frame. (Closing
      between frames is the normal end of a conversation.)

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
                 [null], a supersede key; ``limits``: null [null] or an object with
                 ``timeout_s`` and/or ``max_memory_mb``, each a finite number > 0 or null,
                 within what ``Limits`` accepts; ``cwd``: the caller's working
                 directory, an absolute path of at most 4,096 characters, or null [null]
    ``batch``    ``calls``: 1-10,000 objects ``{"step": string, "params": object}``
                 (``params`` defaults to ``{}``); ``wait``: bool [false]; ``key``: as for
                 ``submit``, for the whole batch (a view switch supersedes the last view);
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
    ===========  =====================================================================

    A task id is an integer from 1 to 2**63 - 1. A ``params`` object nests at most 32
    levels deep (the object itself is level 1); its size is bounded by the frame cap.

    Paths: a step declares which of its parameters name files or directories
    (``StepSpec.paths``). The daemon makes a relative path there absolute against the
    request's ``cwd`` before it journals the task, so a step never sees the daemon's own
    working directory; without a ``cwd``, such a relative path is refused
    (``InvalidParameters``). The clients send their working directory.

Replies
    Success: ``{"v": 1, "id": ID, "ok": true, ...op-specific fields}``.
    Failure: ``{"v": 1, "id": ID, "ok": false, "error": {"type": T, "message": M,
    "fields": {...}}}``, where ``T`` names the error's class, ``M`` is its message and
    ``fields`` holds its attributes. ``ID`` is null when the request was too broken to
    have a usable id (a ``bad_json`` frame, say).

    These error types are rebuilt on the client with the same attributes and message:
    ``StepFailed`` (without the original exception object), ``StepTimeout``,
    ``MemoryLimitExceeded``, ``StepCancelled``, ``WorkerCrashed``, ``StepSkipped``,
    ``WorkflowFailed`` (its step error nested as ``fields.error``), ``UnknownStep``,
    ``UnknownTask``, ``TooManyClients``, ``TaskNotResumable``, ``QueueFull``, ``InvalidParameters``, ``SupervisorClosed``, ``WorkerStartFailed``,
    ``RegistrationError``, ``GovernorError``, ``ResultNotSerialisable`` and
    ``ProtocolError`` (``fields``: ``code``, ``reason``, ``field``). Any other type
    arrives as ``RemoteError``, carrying the type's name and the message.

Results must be JSON values: :func:`to_json_value` checks one (no NaN, string keys only,
tuples arrive as arrays) so the daemon can report a step whose result cannot be sent.
"""

from __future__ import annotations

import enum
import json
import math
import reprlib
import socket
import struct
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Dict, List, Mapping, Optional, Tuple, Union

import attrs

from governor.errors import (GovernorError, InvalidParameters, MemoryLimitExceeded, QueueFull, RegistrationError,
                             StepCancelled, StepFailed, StepSkipped, StepTimeout, SupervisorClosed, TaskNotResumable,
                             TooManyClients, UnknownStep, UnknownTask, WorkerCrashed, WorkerStartFailed,
                             WorkflowFailed)
from governor.limits import Limits

if TYPE_CHECKING:  # asyncio is imported where it is used: the blocking client does without it
    import asyncio

#: The version every request and reply carries as ``"v"``.
PROTOCOL_VERSION = 1

#: The largest frame body either side sends or accepts by default, in bytes. Large enough
#: for a batch of 10,000 small calls (about 100 bytes each) or a sizeable result; small
#: enough that a buggy or hostile client makes the daemon buffer at most this much per
#: connection before it can refuse the message.
MAX_MESSAGE_BYTES = 1 << 20

#: The length prefix of a frame. Its 4 bytes cap any configured ``max_bytes`` at 4 GiB - 1.
_HEADER = struct.Struct(">I")
_LARGEST_FRAME = 2 ** (8 * _HEADER.size) - 1

#: Request ids: long enough for a UUID plus a prefix, short enough to log every one.
MAX_REQUEST_ID_CHARS = 64

#: Request ids that are integers fit in 64 bits, so every client language can hold one.
_REQUEST_ID_BOUND = 2 ** 63

#: Step names and supersede keys: generous for dotted names; bounded so that a status
#: listing of many tasks stays small.
MAX_STEP_NAME_CHARS = 200
MAX_KEY_CHARS = 200

#: How many tasks a ``status`` listing holds by default, and at most: the last screenful by
#: default; the cap keeps one reply well under the frame cap (summaries are small).
DEFAULT_STATUS_LIMIT = 50
MAX_STATUS_LIMIT = 10_000
MAX_STATE_CHARS = 32

#: A caller's working directory: Linux's PATH_MAX.
MAX_PATH_CHARS = 4096

#: Calls in one batch: 10,000 small calls fill about the frame cap; a bigger batch would
#: not fit anyway, and the daemon journals a batch in one transaction.
MAX_BATCH_CALLS = 10_000

#: Steps in one workflow: a workflow runs serially in the critical lane, so a longer one
#: would hold that lane for too long; split it instead.
MAX_WORKFLOW_CALLS = 1_000

#: Task ids in one cancel: as many as one batch submits.
MAX_CANCEL_IDS = 10_000

#: Task ids are SQLite row ids: positive, signed 64-bit.
MAX_TASK_ID = 2 ** 63 - 1

#: How deep a step's params may nest. Real parameters nest a few levels; the cap keeps
#: every walk over them cheap and far from the interpreter's recursion limit.
MAX_PARAMS_DEPTH = 32

#: How deep a result may nest. Deeper than params (results carry trees), yet well under
#: the ~1,000 levels at which a JSON decoder in Python raises RecursionError.
MAX_RESULT_DEPTH = 200

RequestId = Union[int, str]


class ErrorCode(str, enum.Enum):
    """Why a message was refused (``ProtocolError.code``).

    From a reader, ``too_large`` and ``truncated`` mean the stream is unusable: close the
    connection (after replying, for ``too_large``). Every other code leaves it in sync.
    """

    TOO_LARGE = "too_large"
    TRUNCATED = "truncated"
    BAD_JSON = "bad_json"
    BAD_VERSION = "bad_version"
    BAD_REQUEST = "bad_request"
    BAD_REPLY = "bad_reply"

    def __str__(self) -> str:
        return self.value


class ProtocolError(GovernorError, ValueError):
    """A message broke the wire protocol: its frame, its JSON, or its request's fields.

    Attributes:
        code: the :class:`ErrorCode`.
        reason: what is wrong, without the field.
        field: the path of the field at fault in the request, e.g. ``"calls[3].step"``,
            or ``None`` when the fault is not one field's.
    """

    def __init__(self, code: Union[ErrorCode, str], reason: str, field: Optional[str] = None):
        code = ErrorCode(code)
        super().__init__(code.value, reason, field)
        self.code = code
        self.reason = reason
        self.field = field

    def inside(self, parent: str) -> "ProtocolError":
        """This error with its field path put under ``parent`` (a field name or ``[index]``)."""
        if self.field is None:
            field = parent
        elif self.field.startswith("["):
            field = parent + self.field
        else:
            field = f"{parent}.{self.field}"
        return ProtocolError(self.code, self.reason, field)

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}" if self.field else self.reason


class ResultNotSerialisable(GovernorError, TypeError):
    """A value (a step's result) cannot be sent as JSON: the message says where and why."""


class RemoteError(GovernorError):
    """An error from the other side whose type this side does not rebuild.

    Attributes:
        type_name: the name of the error's class on the other side.
        message: its message there.
    """

    def __init__(self, type_name: str, message: str):
        super().__init__(type_name, message)
        self.type_name = type_name
        self.message = message

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}"


# --------------------------------------------------------------------------- JSON values

def _dumps(value: Any) -> str:
    """Strict, compact JSON. ``ensure_ascii`` (the default) keeps any Python string
    sendable, lone surrogates included, at 6 bytes per non-ASCII UTF-16 code unit."""
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


#: How many keys of a path an error message shows (the first and last halves).
_PATH_PARTS_SHOWN = 8


def _at(path: Any) -> str:
    """Where a linked path ``(parent, key)`` points, e.g. ``"at ['rows'][2]"``."""
    parts: List[str] = []
    while path is not None:
        path, key = path
        parts.append(f"[{key!r}]")
    parts.reverse()
    if len(parts) > _PATH_PARTS_SHOWN:
        parts[_PATH_PARTS_SHOWN // 2:-_PATH_PARTS_SHOWN // 2] = ["..."]
    return "at " + ("".join(parts) or "the top")


def _json_problem(value: Any, max_depth: int, max_bytes: int) -> Optional[str]:
    """Say why ``value`` cannot cross the wire as it is, or ``None`` when the walk finds nothing.

    The walk is iterative and bounded: ``max_depth`` also stops a value that contains
    itself, and a lower bound of the encoded size, charged as it goes, stops it after at most
    ``max_bytes`` values even when one big list is referenced many times. Being a lower
    bound, it never refuses a value that fits; the exact size is left to the encoder.
    """
    budget = max_bytes
    stack: List[Tuple[Any, int, Any]] = [(value, 1, None)]  # (value, depth, linked path)
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, str):
            budget -= len(item) + 2
        elif item is None or isinstance(item, int):  # bool is an int
            budget -= 1
        elif isinstance(item, float):
            if not math.isfinite(item):
                return f"{_at(path)}: {item!r} is not a finite number"
            budget -= 1
        elif isinstance(item, (dict, list, tuple)):
            if depth > max_depth:
                return f"{_at(path)}: nested deeper than {max_depth} levels (or it contains itself)"
            budget -= 1 + max(len(item), 1)  # brackets and commas
            if isinstance(item, dict):
                for key, child in item.items():
                    if not isinstance(key, str):
                        return f"{_at(path)}: key {reprlib.repr(key)} ({type(key).__name__}) is not a string"
                    budget -= len(key) + 3  # quotes and colon
                    stack.append((child, depth + 1, (path, key)))
            else:
                stack.extend((child, depth + 1, (path, index)) for index, child in enumerate(item))
        else:
            return f"{_at(path)}: {type(item).__name__} {reprlib.repr(item)} is not a JSON value"
        if budget < 0:
            return f"larger than {max_bytes} bytes encoded"
    return None


def to_json_value(value: Any, max_bytes: int = MAX_MESSAGE_BYTES) -> Any:
    """Check that ``value`` can be sent as JSON and return it unchanged.

    Accepted: ``None``, bools, ints, finite floats, strings, lists and tuples (they arrive
    as arrays), and dicts whose keys are all strings, nested at most
    :data:`MAX_RESULT_DEPTH` levels and at most ``max_bytes`` once encoded.

    Args:
        value: the value, typically a step's result.
        max_bytes: the largest encoded size accepted. A reply adds its envelope, so a value
            close to the frame cap may still make the reply too large to send.

    Returns:
        ``value`` itself.

    Raises:
        ResultNotSerialisable: saying where in ``value`` the problem is and what it is.
    """
    _valid_max_bytes(max_bytes)
    problem = _json_problem(value, MAX_RESULT_DEPTH, max_bytes)
    if problem is None:
        try:
            size = len(_dumps(value))  # ASCII: characters are bytes
        except (TypeError, ValueError) as error:  # e.g. an int over Python's 4,300-digit limit
            problem = str(error)
        else:
            if size > max_bytes:
                problem = f"{size} bytes encoded, over the {max_bytes}-byte limit"
    if problem is not None:
        raise ResultNotSerialisable(f"value cannot be sent as JSON: {problem}")
    return value


# --------------------------------------------------------------------------- framing

def _valid_max_bytes(max_bytes: int) -> int:
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or not 1 <= max_bytes <= _LARGEST_FRAME:
        raise ValueError(f"max_bytes must be an integer from 1 to {_LARGEST_FRAME}, got {max_bytes!r}")
    return max_bytes


def encode(message: Mapping[str, Any], max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    """Frame one message: its length, then its JSON.

    Args:
        message: a dict of JSON values.
        max_bytes: the largest body allowed.

    Returns:
        The frame's bytes.

    Raises:
        ProtocolError: ``bad_json`` when ``message`` is not a dict of JSON values (NaN
            included), ``too_large`` when its body would exceed ``max_bytes`` (nothing was
            sent: the connection is still usable).
    """
    _valid_max_bytes(max_bytes)
    if not isinstance(message, dict):
        raise ProtocolError(ErrorCode.BAD_JSON, f"a message must be a dict, not {type(message).__name__}")
    try:
        body = _dumps(message).encode("ascii")
    except (TypeError, ValueError, RecursionError) as error:
        raise ProtocolError(ErrorCode.BAD_JSON, f"the message cannot be encoded as JSON: {error}") from error
    if len(body) > max_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE,
                            f"the message is {len(body)} bytes encoded, over the {max_bytes}-byte limit")
    return _HEADER.pack(len(body)) + body


def _declared_length(header: bytes, max_bytes: int) -> int:
    (length,) = _HEADER.unpack(header)
    if length > max_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE,
                            f"a frame declares {length} bytes, over the {max_bytes}-byte limit; the stream "
                            "cannot be resynchronised after it, so the connection must be closed")
    return length


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed in strict JSON")


def _decode_body(body: bytes) -> Dict[str, Any]:
    """The message in one frame's body; ``ProtocolError(bad_json)`` if it holds none."""
    try:
        message = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as error:  # before ValueError: it is one
        raise ProtocolError(ErrorCode.BAD_JSON, f"the message is not valid UTF-8: {error}") from None
    except (ValueError, RecursionError) as error:  # JSONDecodeError is a ValueError
        raise ProtocolError(ErrorCode.BAD_JSON, f"the message is not valid JSON: {error}") from None
    if not isinstance(message, dict):
        raise ProtocolError(ErrorCode.BAD_JSON, f"a message must be a JSON object, not {_json_type(message)}")
    return message


def _complete(data: bytes, expected: int, at_boundary: bool) -> bytes:
    """``data`` if it is all ``expected`` bytes; else say how the peer's close cut it short."""
    if len(data) == expected:
        return data
    if at_boundary and not data:
        raise EOFError("the peer closed the connection")
    raise ProtocolError(ErrorCode.TRUNCATED,
                        f"the peer closed the connection mid-frame ({len(data)} of {expected} bytes)")


class FrameDecoder:
    """Split a byte stream into messages as its bytes arrive, in any chunks.

    After a ``too_large`` error the stream cannot be resynchronised: :attr:`broken` is set
    and :meth:`feed` raises from then on. Reply, then close the connection.

    Args:
        max_bytes: the largest frame body accepted.
    """

    def __init__(self, max_bytes: int = MAX_MESSAGE_BYTES):
        self.max_bytes = _valid_max_bytes(max_bytes)
        self._buffer = bytearray()
        self._broken = False

    @property
    def broken(self) -> bool:
        """Whether an oversized frame ended the stream's use."""
        return self._broken

    @property
    def buffered(self) -> int:
        """Bytes held of a frame not yet complete."""
        return len(self._buffer)

    def feed(self, data: bytes) -> List[Union[Dict[str, Any], ProtocolError]]:
        """Take the next bytes of the stream.

        Returns:
            In stream order, one item per frame completed by these bytes: the message, or
            the ``ProtocolError`` saying why that frame was refused.

        Raises:
            ProtocolError: ``too_large``, when called after the stream broke.
        """
        if self._broken:
            raise ProtocolError(ErrorCode.TOO_LARGE, "the stream broke at an oversized frame; close the connection")
        self._buffer += data
        items: List[Union[Dict[str, Any], ProtocolError]] = []
        while len(self._buffer) >= _HEADER.size:
            try:
                length = _declared_length(bytes(self._buffer[:_HEADER.size]), self.max_bytes)
            except ProtocolError as error:
                self._broken = True
                self._buffer.clear()
                items.append(error)
                break
            end = _HEADER.size + length
            if len(self._buffer) < end:
                break
            body = bytes(self._buffer[_HEADER.size:end])
            del self._buffer[:end]
            try:
                items.append(_decode_body(body))
            except ProtocolError as error:
                items.append(error)
        return items

    def eof(self) -> None:
        """Tell the decoder the peer closed the connection.

        Raises:
            ProtocolError: ``truncated``, when the peer closed in the middle of a frame.
        """
        if self._buffer and not self._broken:
            raise ProtocolError(ErrorCode.TRUNCATED,
                                f"the peer closed the connection mid-frame ({len(self._buffer)} bytes buffered)")


def send_message(sock: socket.socket, message: Mapping[str, Any], max_bytes: int = MAX_MESSAGE_BYTES) -> None:
    """Send one message on a blocking socket (see :func:`encode` for the errors)."""
    sock.sendall(encode(message, max_bytes))


def _recv_up_to(sock: socket.socket, size: int) -> bytes:
    """``size`` bytes from ``sock``, or fewer if the peer closed first."""
    buffer = bytearray(size)
    received = 0
    with memoryview(buffer) as view:
        while received < size:
            count = sock.recv_into(view[received:])
            if count == 0:
                break
            received += count
    del buffer[received:]
    return bytes(buffer)


def recv_message(sock: socket.socket, max_bytes: int = MAX_MESSAGE_BYTES) -> Dict[str, Any]:
    """Receive one message from a blocking socket (its timeout, if any, applies per read).

    Raises:
        EOFError: the peer closed the connection between two frames.
        ProtocolError: ``truncated`` (closed mid-frame), ``too_large`` (the stream is
            unusable: close it) or ``bad_json`` (the frame was consumed).
    """
    _valid_max_bytes(max_bytes)
    header = _complete(_recv_up_to(sock, _HEADER.size), _HEADER.size, at_boundary=True)
    length = _declared_length(header, max_bytes)
    return _decode_body(_complete(_recv_up_to(sock, length), length, at_boundary=False))


async def _read_up_to(reader: asyncio.StreamReader, size: int) -> bytes:
    import asyncio

    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError as error:
        return error.partial


async def read_message(reader: asyncio.StreamReader, max_bytes: int = MAX_MESSAGE_BYTES) -> Dict[str, Any]:
    """Read one message from an asyncio stream; errors as for :func:`recv_message`."""
    _valid_max_bytes(max_bytes)
    header = _complete(await _read_up_to(reader, _HEADER.size), _HEADER.size, at_boundary=True)
    length = _declared_length(header, max_bytes)
    return _decode_body(_complete(await _read_up_to(reader, length), length, at_boundary=False))


async def write_message(writer: asyncio.StreamWriter, message: Mapping[str, Any],
                        max_bytes: int = MAX_MESSAGE_BYTES) -> None:
    """Write one message to an asyncio stream and wait until it is flushed (errors as :func:`encode`)."""
    writer.write(encode(message, max_bytes))
    await writer.drain()


# --------------------------------------------------------------------------- field decoders
#
# Each field of a request is declared with a converter that validates the wire value and
# normalises it (an array becomes a tuple, a limits object a ``Limits``), raising a
# ProtocolError without a field; ``_name_errors`` wraps every converter so that its error
# names the field. A request built in Python is therefore checked exactly like one parsed.

Decoder = Callable[[Any], Any]


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _expected(what: str, value: Any) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, f"must be {what}, not {_json_type(value)} {reprlib.repr(value)}")


def _text(max_chars: int, min_chars: int = 0) -> Decoder:
    def decode(value: Any) -> str:
        if not isinstance(value, str) or not min_chars <= len(value) <= max_chars:
            raise _expected(f"a string of {min_chars} to {max_chars} characters", value)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate, from a \ud800-style escape
            raise _expected("valid Unicode text", value) from None
        return value
    return decode


def _optional(decode: Decoder) -> Decoder:
    def decode_optional(value: Any) -> Any:
        return None if value is None else decode(value)
    return decode_optional


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _expected("true or false", value)
    return value


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(minimum: float, inclusive: bool) -> Decoder:
    def decode(value: Any) -> Union[int, float]:
        number = _integer(value) or (isinstance(value, float) and math.isfinite(value))
        if not number or not (value >= minimum if inclusive else value > minimum):
            raise _expected(f"a finite number {'>=' if inclusive else '>'} {minimum}", value)
        return value
    return decode


def _one_of(*choices: str) -> Decoder:
    def decode(value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise _expected("one of " + ", ".join(map(repr, choices)), value)
        return value
    return decode


def _directory(value: Any) -> str:
    text = _text(MAX_PATH_CHARS, min_chars=1)(value)
    if not text.startswith("/") or "\0" in text:
        raise _expected("an absolute path", value)
    return text


def _request_id(value: Any) -> RequestId:
    if isinstance(value, str):
        return _text(MAX_REQUEST_ID_CHARS)(value)
    if not _integer(value) or not -_REQUEST_ID_BOUND <= value < _REQUEST_ID_BOUND:
        raise _expected(f"a 64-bit integer or a string of at most {MAX_REQUEST_ID_CHARS} characters", value)
    return value


def _task_id(value: Any) -> int:
    if not _integer(value) or not 0 < value <= MAX_TASK_ID:
        raise _expected(f"a task id (an integer from 1 to {MAX_TASK_ID})", value)
    return value


def _count(maximum: int) -> Decoder:
    def decode(value: Any) -> int:
        if not _integer(value) or not 1 <= value <= maximum:
            raise _expected(f"an integer from 1 to {maximum}", value)
        return value
    return decode


def _params(value: Any) -> Dict[str, Any]:
    if not isinstance(value, dict):
        raise _expected("an object", value)
    problem = _json_problem(value, MAX_PARAMS_DEPTH, MAX_MESSAGE_BYTES)
    if problem is not None:
        raise ProtocolError(ErrorCode.BAD_REQUEST, problem)
    return value


def _tuple_of(decode_item: Decoder, max_items: int, what: str) -> Decoder:
    def decode(value: Any) -> Tuple[Any, ...]:
        if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= max_items:
            raise _expected(f"an array of 1 to {max_items} {what}", value)
        items = []
        for index, item in enumerate(value):
            try:
                items.append(decode_item(item))
            except ProtocolError as error:
                raise error.inside(f"[{index}]") from None
        return tuple(items)
    return decode


#: The limits a client may set for one submission; the others stay the daemon's policy.
WIRE_LIMITS = ("timeout_s", "max_memory_mb")
_limit = _optional(_number(0, inclusive=False))


def _limits(value: Any) -> Optional[Limits]:
    if value is None:
        return None
    if isinstance(value, Limits):
        value = {name: setting for name, setting in attrs.asdict(value).items() if setting is not None}
    if not isinstance(value, dict):
        raise _expected("null or an object with " + " and/or ".join(WIRE_LIMITS), value)
    decoded = {}
    for name, setting in value.items():
        if name not in WIRE_LIMITS:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"unknown limit; expected {' or '.join(WIRE_LIMITS)}",
                                field=str(name))
        try:
            decoded[name] = _limit(setting)
        except ProtocolError as error:
            raise error.inside(name) from None
    try:
        return Limits(**decoded)
    except (TypeError, ValueError, OverflowError) as refused:  # within the wire's types, out of Limits' bounds
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"not valid limits: {refused}") from None


def _wire_value(value: Any) -> Any:
    """A request field's value as JSON: the inverse of its decoder."""
    if isinstance(value, Limits):
        return {name: getattr(value, name) for name in WIRE_LIMITS}
    if isinstance(value, StepCall):
        return {"step": value.step, "params": value.params}
    if isinstance(value, tuple):
        return [_wire_value(item) for item in value]
    return value


def _name_errors(cls: type, fields: List[attrs.Attribute]) -> List[attrs.Attribute]:
    """attrs field transformer: a field's decoder errors name the field (inherited fields
    were wrapped in their own class already)."""
    return [field.evolve(converter=_naming(field.name, field.converter))
            if field.converter is not None and not field.inherited else field
            for field in fields]


def _naming(name: str, decode: Decoder) -> Decoder:
    def decode_named(value: Any) -> Any:
        try:
            return decode(value)
        except ProtocolError as error:
            raise error.inside(name) from None
    return decode_named


_wire_type = attrs.frozen(field_transformer=_name_errors)


def _from_object(cls: type, value: Any, envelope: frozenset = frozenset()) -> Any:
    """Build ``cls`` from a JSON object holding exactly its fields (plus ``envelope`` keys)."""
    if not isinstance(value, dict):
        raise _expected("an object", value)
    names = [field.name for field in attrs.fields(cls)]
    for key in value:
        if key not in names and key not in envelope:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"unknown field; expected {', '.join(names)}",
                                field=str(key))
    for field in attrs.fields(cls):
        if field.default is attrs.NOTHING and field.name not in value:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "missing (required)", field=field.name)
    return cls(**{key: item for key, item in value.items() if key not in envelope})


# --------------------------------------------------------------------------- requests

@_wire_type
class StepCall:
    """One call in a ``batch`` or ``workflow``: a step's name and its keyword arguments."""

    step: str = attrs.field(converter=_text(MAX_STEP_NAME_CHARS, min_chars=1))
    params: Dict[str, Any] = attrs.field(factory=dict, converter=_params)


def _step_call(value: Any) -> StepCall:
    return value if isinstance(value, StepCall) else _from_object(StepCall, value)


@_wire_type
class Request:
    """Base of the requests, one subclass per op. ``id`` is echoed in the reply."""

    OP: ClassVar[str]

    id: RequestId = attrs.field(converter=_request_id)

    def to_wire(self) -> Dict[str, Any]:
        """This request as the JSON object to send."""
        fields = {field.name: _wire_value(getattr(self, field.name))
                  for field in attrs.fields(type(self)) if field.name != "id"}
        return {"v": PROTOCOL_VERSION, "id": self.id, "op": self.OP, **fields}


@_wire_type
class Ping(Request):
    """``ping``: is the daemon there?"""

    OP = "ping"


@_wire_type
class Submit(Request):
    """``submit``: run one step; with ``wait``, reply when it ends, else at once with its id."""

    OP = "submit"
    step: str = attrs.field(converter=_text(MAX_STEP_NAME_CHARS, min_chars=1))
    params: Dict[str, Any] = attrs.field(factory=dict, converter=_params)
    wait: bool = attrs.field(default=False, converter=_boolean)
    key: Optional[str] = attrs.field(default=None, converter=_optional(_text(MAX_KEY_CHARS)))
    limits: Optional[Limits] = attrs.field(default=None, converter=_limits)
    cwd: Optional[str] = attrs.field(default=None, converter=_optional(_directory))


@_wire_type
class Batch(Request):
    """``batch``: run many steps, each in the lane its step declares."""

    OP = "batch"
    calls: Tuple[StepCall, ...] = attrs.field(converter=_tuple_of(_step_call, MAX_BATCH_CALLS, "calls"))
    wait: bool = attrs.field(default=False, converter=_boolean)
    key: Optional[str] = attrs.field(default=None, converter=_optional(_text(MAX_KEY_CHARS)))
    cwd: Optional[str] = attrs.field(default=None, converter=_optional(_directory))


@_wire_type
class Workflow(Request):
    """``workflow``: run steps in order in the critical lane, stopping at the first failure."""

    OP = "workflow"
    calls: Tuple[StepCall, ...] = attrs.field(converter=_tuple_of(_step_call, MAX_WORKFLOW_CALLS, "calls"))
    wait: bool = attrs.field(default=False, converter=_boolean)
    cwd: Optional[str] = attrs.field(default=None, converter=_optional(_directory))


@_wire_type
class Cancel(Request):
    """``cancel``: cancel tasks, queued or running."""

    OP = "cancel"
    task_ids: Tuple[int, ...] = attrs.field(converter=_tuple_of(_task_id, MAX_CANCEL_IDS, "task ids"))


@_wire_type
class Status(Request):
    """``status``: one task's record, or the recent tasks' when ``task_id`` is ``None``.

    A listing holds the last ``limit`` tasks, newest first, of those in one of ``states``
    (any state when ``None``) and of ``step`` (any step when ``None``).
    """

    OP = "status"
    task_id: Optional[int] = attrs.field(default=None, converter=_optional(_task_id))
    states: Optional[Tuple[str, ...]] = attrs.field(
        default=None, converter=_optional(_tuple_of(_text(MAX_STATE_CHARS, min_chars=1), MAX_STATE_CHARS, "states")))
    step: Optional[str] = attrs.field(default=None, converter=_optional(_text(MAX_STEP_NAME_CHARS, min_chars=1)))
    limit: int = attrs.field(default=DEFAULT_STATUS_LIMIT, converter=_count(MAX_STATUS_LIMIT))


@_wire_type
class Wait(Request):
    """``wait``: reply when a task ends, or after ``timeout`` seconds (``None``: no timeout)."""

    OP = "wait"
    task_id: int = attrs.field(converter=_task_id)
    timeout: Optional[float] = attrs.field(default=None, converter=_optional(_number(0, inclusive=True)))


@_wire_type
class Steps(Request):
    """``steps``: the registered steps."""

    OP = "steps"


@_wire_type
class Workers(Request):
    """``workers``: the workers and what they run."""

    OP = "workers"


@_wire_type
class Metrics(Request):
    """``metrics``: the supervisor's metrics, as a JSON snapshot or Prometheus text."""

    OP = "metrics"
    format: str = attrs.field(default="json", converter=_one_of("json", "prometheus"))


@_wire_type
class Live(Request):
    """``live``: lanes, workers, recent tasks, kills and latencies in one snapshot (issue 15)."""

    OP = "live"


#: Every request type by its op.
REQUEST_TYPES: Dict[str, type] = {cls.OP: cls for cls in (Ping, Submit, Batch, Workflow, Cancel, Status, Wait,
                                                          Steps, Workers, Metrics, Live)}

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
        raise _expected("an object", message)
    version = message.get("v")
    if not _integer(version) or version != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.BAD_VERSION, f"unsupported protocol version {reprlib.repr(version)}; "
                                                   f"this side speaks {PROTOCOL_VERSION}", field="v")
    op = message.get("op")
    request_type = REQUEST_TYPES.get(op) if isinstance(op, str) else None
    if request_type is None:
        raise _expected("one of " + ", ".join(map(repr, REQUEST_TYPES)), op).inside("op")
    return _from_object(request_type, message, _ENVELOPE)


def request_id_of(message: Any) -> Optional[RequestId]:
    """The id to answer a request with: its ``id`` if that is valid, else ``None`` (null)."""
    try:
        return _request_id(message.get("id")) if isinstance(message, dict) else None
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


# --------------------------------------------------------------------------- error codec

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
        other type (or when those attributes are not JSON values).
    """
    codec = _CODECS.get(type(error))
    fields: Dict[str, Any] = {}
    if codec is not None:
        try:
            fields = to_json_value(codec.fields(error))
        except (AttributeError, ResultNotSerialisable):
            pass  # sent without fields: the client gets a RemoteError with the same message
    return {"type": type(error).__name__, "message": str(error), "fields": fields}


def error_from_wire(wire: Any) -> BaseException:
    """Rebuild an error sent by :func:`error_to_wire`.

    The type is looked up in a fixed table of Governor's errors, never imported by name.

    Returns:
        The error, of its original type when the table has it and its fields fit; else a
        :class:`RemoteError` with the type's name and the message; a ``ProtocolError``
        (``bad_reply``) when ``wire`` is not an error object at all.
    """
    if not (isinstance(wire, dict) and isinstance(wire.get("type"), str) and isinstance(wire.get("message"), str)
            and isinstance(wire.get("fields", {}), dict)):
        return ProtocolError(ErrorCode.BAD_REPLY, f"not an error object: {reprlib.repr(wire)}")
    type_name, message = wire["type"], wire["message"]
    codec = _CODECS_BY_NAME.get(type_name)
    if codec is not None:
        try:
            error = codec.build(message, wire.get("fields", {}))
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
    _ErrorCodec(WorkerStartFailed),
    _ErrorCodec(RegistrationError),
    _ErrorCodec(ResultNotSerialisable),
    _ErrorCodec(GovernorError),
)}
_CODECS_BY_NAME: Dict[str, _ErrorCodec] = {cls.__name__: codec for cls, codec in _CODECS.items()}
