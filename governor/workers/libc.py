"""The C library through ctypes, loaded once at import and shared by every module that needs it.

Loaded in the process that later forks the workers (the template imports it), so a worker
pays nothing to find it: in a fresh fork each first touch of a page is a copy-on-write
fault (~7 us on the 2-core VM the bench runs on), and loading a library or resolving a
symbol there took a worker's start ~50 faults per call site.

Not ``find_library("c")``, which runs ldconfig in a subprocess (~30 ms), nor the
interpreter's global namespace (``CDLL(None)``), whose symbol lookups took ~8 ms each on
one machine: glibc by its soname, which the interpreter has already loaded.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from typing import Any, Optional

#: glibc's soname.
LIBC_SONAME = "libc.so.6"

PR_SET_NO_NEW_PRIVS = 38


def _load() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(LIBC_SONAME, use_errno=True)
    except OSError:  # another C library (musl): search the interpreter's symbols
        libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.prctl  # resolved now, in the template, rather than in every worker
    return libc


#: The C library, or ``None`` off Linux.
libc: Optional[ctypes.CDLL] = _load()


def prctl(option: int, *args: Any, name: str) -> None:
    """``prctl(option, *args)``: an ``int`` argument goes as an ``unsigned long``, as the
    kernel reads every argument after the option; a ``ctypes.byref`` one as it is.
    ``name`` (``"PR_SET_NO_NEW_PRIVS"``) is for the error message.

    Raises:
        OSError: the kernel refused, with its errno; ``ENOSYS`` off Linux.
    """
    if libc is None:
        raise OSError(errno.ENOSYS, f"prctl({name}) needs Linux")
    arguments = [ctypes.c_ulong(arg) if isinstance(arg, int) else arg for arg in args]
    if libc.prctl(ctypes.c_int(option), *arguments) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl({name}): {os.strerror(code)}")


def no_new_privs() -> None:
    """``prctl(PR_SET_NO_NEW_PRIVS)``: no program this process starts may gain privileges
    (a setuid binary) that its Landlock rules or seccomp filter could not follow. Both
    demand it of an unprivileged caller.

    Raises:
        OSError: the kernel refused; ``ENOSYS`` off Linux.
    """
    prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0, name="PR_SET_NO_NEW_PRIVS")
