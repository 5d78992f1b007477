"""JSON values: what may cross the wire, and how big a message may be.

Results must be JSON values: :func:`to_json_value` checks one (no NaN, string keys only,
tuples arrive as arrays) so the daemon can report a step whose result cannot be sent.
"""

from __future__ import annotations

import json
import math
import reprlib
from typing import Any, List, Optional, Tuple

from governor.protocol.errors import ResultNotSerialisable

#: The largest frame body either side sends or accepts by default, in bytes. Large enough
#: for a batch of 10,000 small calls (about 100 bytes each) or a sizeable result; small
#: enough that a buggy or hostile client makes the daemon buffer at most this much per
#: connection before it can refuse the message.
MAX_MESSAGE_BYTES = 1 << 20

#: The largest reply the daemon sends and its clients accept: a batch's final reply carries
#: a record per task (10,000 no-ops make about 3 MiB). Replies come from the daemon to a
#: client of its own user, so the request cap's guard against hostile peers is not needed.
MAX_REPLY_BYTES = 64 << 20

#: The largest ``max_bytes`` any side may configure: a frame's 4-byte length prefix
#: (``framing``) can say no more.
LARGEST_MESSAGE_BYTES = 2 ** 32 - 1

#: How deep a result may nest. Deeper than params (results carry trees), yet well under
#: the ~1,000 levels at which a JSON decoder in Python raises RecursionError.
MAX_RESULT_DEPTH = 200


def checked_max_bytes(max_bytes: int) -> int:
    """``max_bytes`` if it is a size a frame can declare; else ``ValueError``."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or not 1 <= max_bytes <= LARGEST_MESSAGE_BYTES:
        raise ValueError(f"max_bytes must be an integer from 1 to {LARGEST_MESSAGE_BYTES}, got {max_bytes!r}")
    return max_bytes


#: One encoder for every message: ``json.dumps`` with any option builds a new one per call.
_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"))


def dumps(value: Any) -> str:
    """Strict, compact JSON. ``ensure_ascii`` (the default) keeps any Python string
    sendable, lone surrogates included, at 6 bytes per non-ASCII UTF-16 code unit."""
    return _ENCODER.encode(value)


def json_type(value: Any) -> str:
    """The JSON name of ``value``'s type (``"null"``, ``"array"``, ...), for error messages."""
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


def json_problem(value: Any, max_depth: int, max_bytes: int) -> Optional[str]:
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
    checked_max_bytes(max_bytes)
    problem = json_problem(value, MAX_RESULT_DEPTH, max_bytes)
    if problem is None:
        try:
            size = len(dumps(value))  # ASCII: characters are bytes
        except (TypeError, ValueError) as error:  # e.g. an int over Python's 4,300-digit limit
            problem = str(error)
        else:
            if size > max_bytes:
                problem = f"{size} bytes encoded, over the {max_bytes}-byte limit"
    if problem is not None:
        raise ResultNotSerialisable(f"value cannot be sent as JSON: {problem}")
    return value
