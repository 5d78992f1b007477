"""The protocol's own errors: a refused message (:class:`ProtocolError` with its
:class:`ErrorCode`), a value that cannot be sent (:class:`ResultNotSerialisable`), and an
error from the other side of a type this side does not rebuild (:class:`RemoteError`)."""

from __future__ import annotations

import enum
from typing import Optional, Union

from governor.errors import GovernorError


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
