"""Field decoders: each field of a request checks and normalises its wire value.

Each field is declared with a converter that validates the wire value and normalises it
(an array becomes a tuple, a limits object a ``Limits``), raising a ProtocolError without
a field; :data:`wire_type` wraps every converter so that its error names the field. A
request built in Python is therefore checked exactly like one parsed.
"""

from __future__ import annotations

import math
import reprlib
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import attrs

from governor.limits import Limits
from governor.protocol.errors import ErrorCode, ProtocolError
from governor.protocol.values import MAX_MESSAGE_BYTES, json_problem, json_type

Decoder = Callable[[Any], Any]

RequestId = Union[int, str]

#: Request ids: long enough for a UUID plus a prefix, short enough to log every one.
MAX_REQUEST_ID_CHARS = 64

#: Request ids that are integers fit in 64 bits, so every client language can hold one.
_REQUEST_ID_BOUND = 2 ** 63

#: A caller's working directory: Linux's PATH_MAX.
MAX_PATH_CHARS = 4096

#: Supersede orders: what a browser's ``Date.now()`` or a counter gives, exact in JavaScript.
MAX_ORDER = 2 ** 53

#: Task ids are SQLite row ids: positive, signed 64-bit.
MAX_TASK_ID = 2 ** 63 - 1

#: How deep a step's params may nest. Real parameters nest a few levels; the cap keeps
#: every walk over them cheap and far from the interpreter's recursion limit.
MAX_PARAMS_DEPTH = 32


def expected(what: str, value: Any) -> ProtocolError:
    """The ``bad_request`` error for a ``value`` that is not ``what`` it must be."""
    return ProtocolError(ErrorCode.BAD_REQUEST, f"must be {what}, not {json_type(value)} {reprlib.repr(value)}")


def text(max_chars: int, min_chars: int = 0) -> Decoder:
    """A decoder of strings of ``min_chars`` to ``max_chars`` characters of valid Unicode."""
    def decode(value: Any) -> str:
        if not isinstance(value, str) or not min_chars <= len(value) <= max_chars:
            raise expected(f"a string of {min_chars} to {max_chars} characters", value)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate, from a \ud800-style escape
            raise expected("valid Unicode text", value) from None
        return value
    return decode


def optional(decode: Decoder) -> Decoder:
    """``decode``, letting ``None`` (null) through."""
    def decode_optional(value: Any) -> Any:
        return None if value is None else decode(value)
    return decode_optional


def boolean(value: Any) -> bool:
    """``true`` or ``false``."""
    if not isinstance(value, bool):
        raise expected("true or false", value)
    return value


def is_integer(value: Any) -> bool:
    """Whether ``value`` is an integer, and not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def number(minimum: float, inclusive: bool) -> Decoder:
    """A decoder of finite numbers above (or from, if ``inclusive``) ``minimum``."""
    def decode(value: Any) -> Union[int, float]:
        finite = is_integer(value) or (isinstance(value, float) and math.isfinite(value))
        if not finite or not (value >= minimum if inclusive else value > minimum):
            raise expected(f"a finite number {'>=' if inclusive else '>'} {minimum}", value)
        return value
    return decode


def one_of(*choices: str) -> Decoder:
    """A decoder of the strings ``choices``."""
    def decode(value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise expected("one of " + ", ".join(map(repr, choices)), value)
        return value
    return decode


def directory(value: Any) -> str:
    """An absolute path (a caller's working directory)."""
    path = text(MAX_PATH_CHARS, min_chars=1)(value)
    if not path.startswith("/") or "\0" in path:
        raise expected("an absolute path", value)
    return path


def request_id(value: Any) -> RequestId:
    """A request's id: a 64-bit integer or a short string."""
    if isinstance(value, str):
        return text(MAX_REQUEST_ID_CHARS)(value)
    if not is_integer(value) or not -_REQUEST_ID_BOUND <= value < _REQUEST_ID_BOUND:
        raise expected(f"a 64-bit integer or a string of at most {MAX_REQUEST_ID_CHARS} characters", value)
    return value


def task_id(value: Any) -> int:
    """A task id, as the journal numbers them."""
    if not is_integer(value) or not 0 < value <= MAX_TASK_ID:
        raise expected(f"a task id (an integer from 1 to {MAX_TASK_ID})", value)
    return value


def integer(minimum: int, maximum: int) -> Decoder:
    """A decoder of integers from ``minimum`` to ``maximum``."""
    def decode(value: Any) -> int:
        if not is_integer(value) or not minimum <= value <= maximum:
            raise expected(f"an integer from {minimum} to {maximum}", value)
        return value
    return decode


def count(maximum: int) -> Decoder:
    """A decoder of integers from 1 to ``maximum``."""
    def decode(value: Any) -> int:
        if not is_integer(value) or not 1 <= value <= maximum:
            raise expected(f"an integer from 1 to {maximum}", value)
        return value
    return decode


def order(value: Any) -> int:
    """A supersede order: an integer a JavaScript number holds exactly (0 to 2**53)."""
    if not is_integer(value) or not 0 <= value <= MAX_ORDER:
        raise expected(f"an integer from 0 to {MAX_ORDER}", value)
    return value


def params(value: Any) -> Dict[str, Any]:
    """A step's keyword parameters: an object of JSON values, nested at most :data:`MAX_PARAMS_DEPTH` levels."""
    if not isinstance(value, dict):
        raise expected("an object", value)
    problem = json_problem(value, MAX_PARAMS_DEPTH, MAX_MESSAGE_BYTES)
    if problem is not None:
        raise ProtocolError(ErrorCode.BAD_REQUEST, problem)
    return value


def tuple_of(decode_item: Decoder, max_items: int, what: str) -> Decoder:
    """A decoder of arrays of 1 to ``max_items`` items (``what``, in errors), each decoded by
    ``decode_item``, into a tuple."""
    def decode(value: Any) -> Tuple[Any, ...]:
        if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= max_items:
            raise expected(f"an array of 1 to {max_items} {what}", value)
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
_limit = optional(number(0, inclusive=False))


def limits(value: Any) -> Optional[Limits]:
    """A submission's :class:`Limits` (only :data:`WIRE_LIMITS`), from an object or a ``Limits``."""
    if value is None:
        return None
    if isinstance(value, Limits):
        value = {name: setting for name, setting in attrs.asdict(value).items() if setting is not None}
    if not isinstance(value, dict):
        raise expected("null or an object with " + " and/or ".join(WIRE_LIMITS), value)
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


#: The decorator of a wire message: a frozen attrs class whose decoders' errors name their field.
wire_type = attrs.frozen(field_transformer=_name_errors)


def from_object(cls: type, value: Any, envelope: frozenset = frozenset()) -> Any:
    """Build ``cls`` from a JSON object holding exactly its fields (plus ``envelope`` keys)."""
    if not isinstance(value, dict):
        raise expected("an object", value)
    names = [field.name for field in attrs.fields(cls)]
    for key in value:
        if key not in names and key not in envelope:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"unknown field; expected {', '.join(names)}",
                                field=str(key))
    for field in attrs.fields(cls):
        if field.default is attrs.NOTHING and field.name not in value:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "missing (required)", field=field.name)
    return cls(**{key: item for key, item in value.items() if key not in envelope})
