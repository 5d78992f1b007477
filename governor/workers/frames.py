"""Length-prefixed frames on a stream socket, read with one ``read`` at a time.

The format is ``multiprocessing.connection``'s (a ``!i`` length, or -1 and a ``!Q``
length, then the payload), so a ``Connection.send_bytes`` on one end is a frame here. Both
ends of a worker's task socket read with :class:`Frames` and write with :func:`send_frame`:
``Connection.recv_bytes`` takes two reads per message, and each syscall lets go of the GIL
(and, on a VM, costs a few microseconds of its own); ``send_bytes`` is a dozen Python
calls around its one write.

Every frame has a size cap (:data:`MAX_FRAME_BYTES` unless told): a header that announces
more is refused as soon as it is read, before any of its bytes are kept, so a process that
writes a 2**40-byte header and streams junk after it grows its reader by one read.
"""

from __future__ import annotations

import os
import struct
from typing import Optional

#: The largest frame a task socket carries either way (a task's arguments, a step's
#: result): 1 GiB. Larger values belong in a file the step reads or writes; and a
#: supervisor holds a whole frame in memory before it can tell what it is.
MAX_FRAME_BYTES = 1 << 30


class Frames:
    """A socket's bytes read so far, cut into whole frames of at most ``max_bytes`` each."""

    #: Bytes asked of one read: a task or an outcome of a few hundred bytes comes whole; a
    #: larger one takes several reads.
    READ_SIZE = 65536

    def __init__(self, max_bytes: int = MAX_FRAME_BYTES) -> None:
        self._buffer = bytearray()
        self.max_bytes = max_bytes

    def feed(self, fd: int) -> bool:
        """Read what the socket has (blocking, if the socket does); ``False`` at its end."""
        data = os.read(fd, self.READ_SIZE)
        self._buffer += data
        return bool(data)

    def pop(self) -> Optional[bytes]:
        """The next whole frame's payload, or ``None`` if none is whole yet.

        Raises:
            ValueError: the next frame is larger than ``max_bytes`` (or its size is
                negative): what follows cannot be read as frames.
        """
        buffer = self._buffer
        if len(buffer) < 4:
            return None
        (size,) = struct.unpack_from("!i", buffer)
        start = 4
        if size == -1:
            if len(buffer) < 12:
                return None
            (size,) = struct.unpack_from("!Q", buffer, 4)
            start = 12
        if not 0 <= size <= self.max_bytes:
            del buffer[:]  # kept no longer: the stream is not frames from here on
            raise ValueError(f"a frame of {size} bytes, over the cap of {self.max_bytes}")
        end = start + size
        if len(buffer) < end:
            return None
        frame = bytes(buffer[start:end])
        del buffer[:end]
        return frame

    def next(self, fd: int) -> bytes:
        """The next whole frame, reading (and blocking) as long as it takes.

        Raises:
            EOFError: the socket ended before a whole frame came.
            ValueError: the frame is over the cap (see :meth:`pop`).
        """
        while True:
            frame = self.pop()
            if frame is not None:
                return frame
            if not self.feed(fd):
                raise EOFError("the socket ended")


def header(size: int) -> bytes:
    """The bytes that go before a payload of ``size`` bytes to make it a frame."""
    return struct.pack("!i", size) if size <= 0x7FFFFFFF else struct.pack("!iQ", -1, size)


def send_frame(fd: int, payload: bytes) -> None:
    """Write ``payload`` as one frame to the blocking socket ``fd`` (one ``write`` for all
    but a payload the socket's buffer cannot hold at once)."""
    data = memoryview(header(len(payload)) + payload)
    while data:
        data = data[os.write(fd, data):]
