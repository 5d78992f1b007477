"""Framing: one message per frame, in both directions, over a stream socket.

Every message is one frame: a 4-byte unsigned big-endian length N, then N bytes of UTF-8
JSON holding exactly one JSON object. N is at most 1 MiB (``MAX_MESSAGE_BYTES``) for a
request, and 64 MiB (``MAX_REPLY_BYTES``) for a reply (a batch's final reply carries a
record per task), unless both sides agree on other caps. The JSON is strict: ``NaN`` and ``Infinity`` are refused
both ways. Nothing is ever pickled.

A reader that meets a frame it cannot use says why with a protocol error code:

* ``too_large``: the declared length is over the cap. The body is not read, so the
  stream cannot be resynchronised: the server replies with this error, then closes.
* ``bad_json``: the body is not UTF-8, not JSON, nested too deeply to parse, or not an
  object. The whole frame was consumed, so the stream is still in sync and the
  connection may stay open.
* ``truncated``: the peer closed the connection in the middle of a frame. (Closing
  between frames is the normal end of a conversation.)

Blocking sockets use :func:`send_message`/:func:`recv_message`, asyncio streams
:func:`write_message`/:func:`read_message`, and a reader fed bytes in arbitrary chunks
a :class:`FrameDecoder`.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Union

from governor.protocol.errors import ErrorCode, ProtocolError
from governor.protocol.values import MAX_MESSAGE_BYTES, checked_max_bytes, dumps, json_type

if TYPE_CHECKING:  # asyncio is imported where it is used: the blocking client does without it
    import asyncio

#: The length prefix of a frame: its 4 bytes are why no side may set ``max_bytes`` over
#: ``values.LARGEST_MESSAGE_BYTES``.
_HEADER = struct.Struct(">I")


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
    checked_max_bytes(max_bytes)
    if not isinstance(message, dict):
        raise ProtocolError(ErrorCode.BAD_JSON, f"a message must be a dict, not {type(message).__name__}")
    try:
        body = dumps(message).encode("ascii")
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


#: One decoder for every frame: ``json.loads`` with any option builds a new one per call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _decode_body(body: bytes) -> Dict[str, Any]:
    """The message in one frame's body; ``ProtocolError(bad_json)`` if it holds none."""
    try:
        message = _DECODER.decode(body.decode("utf-8"))
    except UnicodeDecodeError as error:  # before ValueError: it is one
        raise ProtocolError(ErrorCode.BAD_JSON, f"the message is not valid UTF-8: {error}") from None
    except (ValueError, RecursionError) as error:  # JSONDecodeError is a ValueError
        raise ProtocolError(ErrorCode.BAD_JSON, f"the message is not valid JSON: {error}") from None
    if not isinstance(message, dict):
        raise ProtocolError(ErrorCode.BAD_JSON, f"a message must be a JSON object, not {json_type(message)}")
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
        self.max_bytes = checked_max_bytes(max_bytes)
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
    checked_max_bytes(max_bytes)
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
    checked_max_bytes(max_bytes)
    header = _complete(await _read_up_to(reader, _HEADER.size), _HEADER.size, at_boundary=True)
    length = _declared_length(header, max_bytes)
    return _decode_body(_complete(await _read_up_to(reader, length), length, at_boundary=False))


async def write_message(writer: asyncio.StreamWriter, message: Mapping[str, Any],
                        max_bytes: int = MAX_MESSAGE_BYTES) -> None:
    """Write one message to an asyncio stream and wait until it is flushed (errors as :func:`encode`)."""
    writer.write(encode(message, max_bytes))
    await writer.drain()
