"""Which of a pool step's errors the sandbox caused (issues 17, 27).

A write the sandbox refused ends its task as ``ReadOnlyViolation`` and is counted; any
other error is the step's own. The kernel's answer is only an errno (Landlock: ``EACCES``,
or ``EXDEV`` for a link or rename across its rules; seccomp: ``EPERM``), so a refusal is
told by its path: one outside every writable path that the file's permissions would
let this process write (``access(2)``, which Landlock does not police). Where the error
does not name its path, the path is found where it is::

    OSError with a filename (open, mkdir, link, ...) ── filename, filename2
    OSError without one: os.mkfifo, os.mknod     ── wrapped in a sandboxed worker to name it
                         socket.bind             ── the audit event's address
    sqlite3 "attempt to write a readonly database" ── the audit event of its sqlite3.connect
    subprocess.CalledProcessError (git: exit 128) ── paths on its stderr/stdout lines that
                                                    say "Permission denied" or the like

An ``OSError`` that Python code raised itself (``raise PermissionError(13, "...",
"/etc/hostname")``) is that code's error, whatever it names: only one raised by the
operating system call counts. The paths the audit hook saw are forgotten at each task's
start (:func:`forget`), so a refusal is never blamed on an earlier task's path.
"""

from __future__ import annotations

import collections
import dis
import errno
import functools
import os
import re
import subprocess
import sys
from typing import Any, Iterable, Iterator, Optional

#: The errnos of a refusal: Landlock's EACCES (EXDEV across its rules), seccomp's EPERM,
#: and EROFS, which some programs report for a directory they may not write.
REFUSALS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.EXDEV})

#: Paths of path-less calls kept for a task (the newest first checked); a step that makes
#: more than this many binds or connects before it fails is matched against the last ones.
NAMED_PATHS_KEPT = 16

#: The audit events whose path a refusal does not carry, and that path's index in the event.
_AUDITED = {"socket.bind": 1, "sqlite3.connect": 0}

#: The metadata calls the seccomp filter refuses wherever they aim (their audit events).
_METADATA_EVENTS = frozenset({"os.chmod", "os.chown", "os.utime", "os.setxattr", "os.removexattr"})

#: What a refused metadata call's error gets as a note: why, and what to do instead.
METADATA_NOTE = ("the pool lane's sandbox refuses chmod, chown, utime and xattr calls on every path, its own "
                 "temp dir included: copy with shutil.copyfile (copytree(..., copy_function=shutil.copyfile)), "
                 "extract a tar with filter=lambda m, p: m.replace(mode=None, mtime=None), or run the step in "
                 "the critical lane")

#: What a program prints next to a path it was refused (git, sqlite3, coreutils).
_REFUSAL_TEXT = re.compile(r"permission denied|read-only file system|operation not permitted|"
                           r"invalid cross-device link|readonly database", re.IGNORECASE)
#: A path on such a line: quoted, or a bare absolute one.
_PATH_IN_TEXT = re.compile(r"""'(/[^']+)'|"(/[^"]+)"|(?<![\w.])(/[^\s'":]+)""")

_RAISE = dis.opmap["RAISE_VARARGS"]

_named_paths: collections.deque = collections.deque(maxlen=NAMED_PATHS_KEPT)
_last_metadata_call: list = [None]  # the path of the step's last metadata call


def watch() -> None:
    """In a sandboxed worker, for life: note the paths of calls whose refusal will not name
    them (an audit hook, and ``os.mkfifo``/``os.mknod`` wrapped to name their path)."""
    sys.addaudithook(_witness)
    for name in ("mkfifo", "mknod"):
        setattr(os, name, _naming_its_path(getattr(os, name)))


def forget() -> None:
    """Forget the paths seen so far (a task starts)."""
    _named_paths.clear()
    _last_metadata_call[0] = None


def _witness(event: str, args: tuple) -> None:
    index = _AUDITED.get(event)
    if index is not None and isinstance(args[index], (str, bytes, os.PathLike)):
        _named_paths.appendleft(args[index])
    elif event in _METADATA_EVENTS:
        _last_metadata_call[0] = args[0]


def note_metadata_refusal(error: BaseException) -> None:
    """Add :data:`METADATA_NOTE` to ``error`` if it is the seccomp filter's refusal of the
    step's last metadata call: ``EPERM`` naming that call's path, or no path (``os.utime``
    with ``ns=`` names none)."""
    last = _last_metadata_call[0]
    if (last is not None and isinstance(error, PermissionError) and error.errno == errno.EPERM
            and error.filename in (None, last) and METADATA_NOTE not in getattr(error, "__notes__", ())):
        error.add_note(METADATA_NOTE)


def _naming_its_path(call):
    # CPython's os.mkfifo and os.mknod raise without the path (posix_error()).
    @functools.wraps(call)
    def named(path, *args, **kwargs):
        try:
            return call(path, *args, **kwargs)
        except OSError as error:
            if error.filename is None:
                error.filename = path
            raise
    return named


def denied_write(error: BaseException, writable: Iterable[str]) -> Optional[str]:
    """The path the sandbox refused the step, if that is why ``error`` happened.

    Looks through ``error`` and its causes (see the module docstring). ``writable`` are
    the paths the sandbox lets the worker write beneath.

    Returns:
        The absolute path, or ``None`` when the error is the step's own.
    """
    writable = tuple(writable)
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        for name in _candidates(error):
            path = _denied_path(name, writable)
            if path is not None:
                return path
        error = error.__cause__ or error.__context__
    return None


def _candidates(error: BaseException) -> Iterator[Any]:
    if isinstance(error, OSError):
        if error.errno not in REFUSALS or _raised_by_python(error):
            return
        if error.filename is None:
            yield from _named_paths
        elif error.errno == errno.EXDEV and not _same_file_system(error.filename, error.filename2):
            return  # a true cross-device link or rename
        yield error.filename
        yield error.filename2
    elif str(getattr(error, "sqlite_errorname", "")).startswith("SQLITE_READONLY"):  # sqlite3, unimported
        yield from (_sqlite_file(name) for name in _named_paths)
    elif isinstance(error, subprocess.CalledProcessError):
        for text in (error.stderr, error.output):
            yield from _paths_in(text)


def _raised_by_python(error: BaseException) -> bool:
    # The innermost traceback entry is where the exception was first raised: a `raise`
    # statement there means Python code made it, not a system call it made.
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code.co_code
    return 0 <= tb.tb_lasti < len(code) and code[tb.tb_lasti] == _RAISE


def _same_file_system(first: Any, second: Any) -> bool:
    try:
        devices = {os.stat(os.path.dirname(os.path.abspath(os.fsdecode(name)))).st_dev for name in (first, second)}
    except (OSError, TypeError):
        return False
    return len(devices) == 1


def _sqlite_file(name: Any) -> Any:
    text = os.fsdecode(name) if isinstance(name, (str, bytes, os.PathLike)) else ""
    if text.startswith("file:"):  # a URI: file:/path?mode=ro
        text = text[len("file:"):].split("?", 1)[0]
    return text or None


def _paths_in(text: Any) -> Iterator[str]:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    if not isinstance(text, str):
        return
    for line in text.splitlines():
        if _REFUSAL_TEXT.search(line):
            for match in _PATH_IN_TEXT.finditer(line):
                yield next(group for group in match.groups() if group)


def _beneath(path: str, roots: Iterable[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def _denied_path(name: Any, writable: tuple) -> Optional[str]:
    if not isinstance(name, (str, bytes, os.PathLike)) or not os.fspath(name):
        return None
    path = os.path.abspath(os.fsdecode(name))
    if _beneath(path, writable):
        return None
    target = path if os.path.lexists(path) else os.path.dirname(path)
    return path if os.access(target, os.W_OK) else None
