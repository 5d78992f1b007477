"""A write that keeps the GIL, for the one syscall a submitting thread makes.

``os.write`` lets go of the GIL for the syscall. When a user's thread writes the byte
that wakes the manager, that hands the GIL straight to the manager it just woke, and the
submitter must win it back before it can go on to wait for its result: the GIL crosses
between the two threads twice more per task, each crossing a futex wake-up and a
scheduling delay. Writing the byte through ``ctypes.PyDLL`` (whose calls keep the GIL)
lets the submitter run on until it blocks on its future, and only then does the manager
take the GIL, once. The write is to a non-blocking pipe: it never waits with the GIL held.
"""

from __future__ import annotations

import ctypes
import errno
import os

_libc = ctypes.PyDLL(None, use_errno=True)
_write = _libc.write
_write.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t)
_write.restype = ctypes.c_ssize_t


def write_now(fd: int, data: bytes) -> int:
    """``os.write`` to a non-blocking ``fd`` without letting go of the GIL.

    Raises:
        BlockingIOError: the pipe is full.
        OSError: any other failure.
    """
    written = _write(fd, data, len(data))
    if written >= 0:
        return written
    error = ctypes.get_errno()
    if error in (errno.EAGAIN, errno.EWOULDBLOCK):
        raise BlockingIOError(error, os.strerror(error))
    raise OSError(error, os.strerror(error))
