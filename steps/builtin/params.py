"""Validation of the parameters the built-in steps receive.

Steps are called with whatever a CLI, a daemon request or a ``task.execute`` list passed,
often straight from JSON, so every built-in step checks its parameters first and fails with
one clear message naming the parameter: :class:`~steps.builtin.errors.StepInputTypeError`
for a wrong type, :class:`~steps.builtin.errors.StepInputError` for a bad value.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from governor.steps.builtin.errors import StepInputError, StepInputTypeError


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def require_int(name: str, value: Any, *, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """``value`` if it is an ``int`` (not a ``bool``) within ``[minimum, maximum]``.

    Raises:
        StepInputTypeError: for any other type; ``True`` is not an id.
        StepInputError: when it is out of range.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise StepInputTypeError(f"{name} must be an int, got {_describe(value)}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        low = "" if minimum is None else f"{minimum} <= "
        high = "" if maximum is None else f" <= {maximum}"
        raise StepInputError(f"{name} must be {low}{name}{high}, got {value}")
    return value


def require_text(name: str, value: Any, *, max_bytes: int, allow_blank: bool = False) -> str:
    """``value`` if it is a ``str`` SQLite and JSON can carry, at most ``max_bytes`` in UTF-8.

    Args:
        name: the parameter's name, for the message.
        value: what was passed.
        max_bytes: the largest UTF-8 size accepted.
        allow_blank: accept an empty or whitespace-only string.

    Raises:
        StepInputTypeError: when it is not a ``str``.
        StepInputError: when it is blank (unless allowed), too long, contains NUL (SQLite's
            text functions stop at it) or cannot be encoded as UTF-8 (a lone surrogate).
    """
    if not isinstance(value, str):
        raise StepInputTypeError(f"{name} must be a str, got {_describe(value)}")
    if not allow_blank and not value.strip():
        raise StepInputError(f"{name} must not be empty or blank")
    if "\x00" in value:
        raise StepInputError(f"{name} must not contain NUL characters")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise StepInputError(f"{name} is not valid Unicode text: {exc.reason}") from None
    if size > max_bytes:
        raise StepInputError(f"{name} is {size} bytes in UTF-8; the limit is {max_bytes}")
    return value


def require_path(name: str, value: Any) -> str:
    """``value`` as a ``str`` path, if it is a non-empty ``str`` or ``os.PathLike``.

    Nothing is checked on disk.

    Raises:
        StepInputTypeError: for another type (including ``bytes`` paths).
        StepInputError: for an empty path or one containing NUL.
    """
    path = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(path, str):
        raise StepInputTypeError(f"{name} must be a path (str or os.PathLike), got {_describe(value)}")
    if not path:
        raise StepInputError(f"{name} must not be an empty path")
    if "\x00" in path:
        raise StepInputError(f"{name} must not contain NUL characters")
    return path


def require_directory(name: str, value: Any) -> str:
    """``value`` as a ``str`` path, if it names an existing directory.

    Relative paths are resolved against the current directory of the process running the
    step (for a worker: the supervisor's, not the client's).

    Raises:
        StepInputTypeError: as :func:`require_path`.
        StepInputError: when the path does not exist or is not a directory.
    """
    path = require_path(name, value)
    if not os.path.exists(path):
        raise StepInputError(f"{name} {path!r} does not exist")
    if not os.path.isdir(path):
        raise StepInputError(f"{name} {path!r} is not a directory")
    return path
