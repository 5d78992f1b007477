"""The daemon's start-up checks, each failing with a one-line :class:`DaemonError`.

:func:`preflight` makes them all without starting anything, in the order
:meth:`Daemon.start <governor.service.daemon.Daemon.start>` makes them again while it takes
what they checked: the socket's directory (ours, private), the socket (no live daemon on
it), the journal (openable, SQLite, and no other daemon on it), the metrics address
(parsed and bound).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
from pathlib import Path
from typing import Optional, Tuple

from governor.errors import (DaemonAlreadyRunning, JournalLocked, JournalUnavailable, MetricsAddressUnavailable,
                             SocketDirectoryUnsafe)
from governor.service.config import DaemonConfig, show_addr


def check_socket_directory(socket_path: Path) -> None:
    """Check that the socket's directory is ours and private, or that it can be created.

    Nothing is created here (:meth:`Daemon.start` creates the directory, 0700).

    Raises:
        SocketDirectoryUnsafe: it is open to other users, another user's, not a directory,
            or missing under a parent we cannot write to.
    """
    directory = Path(socket_path).parent
    try:
        info = directory.stat()
    except FileNotFoundError:
        ancestor = next((parent for parent in directory.parents if parent.exists()), None)
        if ancestor is None or not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
            raise SocketDirectoryUnsafe(f"cannot create the socket directory {directory}: "
                                        f"{ancestor} is not a directory we can write to") from None
        return
    except NotADirectoryError:
        raise SocketDirectoryUnsafe(f"{directory} is not a directory (a file is in its path)") from None
    if not stat.S_ISDIR(info.st_mode):
        raise SocketDirectoryUnsafe(f"{directory} is not a directory")
    if info.st_uid != os.getuid():
        raise SocketDirectoryUnsafe(f"{directory} belongs to uid {info.st_uid}, not to us ({os.getuid()})")
    if info.st_mode & 0o077:
        raise SocketDirectoryUnsafe(f"{directory} is open to other users (mode {stat.S_IMODE(info.st_mode):o}); "
                                    "make it 0700 or choose another --socket")


def check_socket_free(socket_path: Path) -> bool:
    """Check that no daemon answers on ``socket_path``.

    Returns:
        Whether a stale socket (its daemon gone) is there, to be replaced.

    Raises:
        DaemonAlreadyRunning: a daemon answers there, or the path is not a socket.
    """
    path = Path(socket_path)
    try:
        info = path.lstat()
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(info.st_mode):
        raise DaemonAlreadyRunning(f"{path} exists and is not a socket; remove it or choose another --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return True  # stale: its daemon is gone
    finally:
        probe.close()
    raise DaemonAlreadyRunning(f"a governor daemon is already listening on {path}")


#: The first bytes of an SQLite database file; an empty file is a journal not yet written.
_SQLITE_HEADER = b"SQLite format 3\x00"


class JournalLock:
    """The journal file, held open and ``flock``-ed: this daemon is its only user.

    The lock is on the file itself (its inode), not on its name: a second daemon given the
    same journal through a symlink, a hard link or another spelling of the path opens the
    same inode and is refused. (SQLite's own locks are POSIX record locks, which ``flock``
    neither takes nor disturbs.) :meth:`lost` tells, cheaply, whether the file this
    daemon writes is still the one at the journal's path.

    Raises:
        JournalUnavailable: the journal cannot be opened for reading and writing (an
            immutable or unreadable file, a directory we cannot enter), or is not SQLite.
        JournalLocked: another daemon holds it.
    """

    def __init__(self, journal_path: Path):
        path = self.path = Path(journal_path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Created 0600 before SQLite does: it holds every task's parameters and
            # results, and SQLite gives its -wal and -shm files the database file's mode.
            self._fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as error:
            raise JournalUnavailable(f"cannot open the journal {path} for reading and writing: "
                                     f"{error.strerror or error}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise JournalLocked(f"another governor daemon is using the journal {path} "
                                "(the same file, whatever its name)") from None
        header = os.pread(self._fd, len(_SQLITE_HEADER), 0)
        if header and header != _SQLITE_HEADER:
            os.close(self._fd)
            raise JournalUnavailable(f"the journal {path} is not an SQLite database")
        info = os.fstat(self._fd)
        self._identity = (info.st_dev, info.st_ino)

    def lost(self) -> Optional[str]:
        """Why the file this daemon holds is no longer its journal, or ``None`` if it is.

        One ``stat`` of the path (a few microseconds): cheap enough to ask before every
        write that acknowledges work.
        """
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return f"the journal {self.path} was deleted while the daemon used it"
        except OSError as error:
            return f"the journal {self.path} can no longer be reached ({error.strerror or error})"
        if (info.st_dev, info.st_ino) != self._identity:
            return f"the journal {self.path} was replaced by another file while the daemon used it"
        return None

    def release(self) -> None:
        """Release the lock (closing the file releases the flock)."""
        os.close(self._fd)


def check_metrics_addr(addr: Tuple[str, int]) -> None:
    """Check that the metrics address resolves and can be bound now.

    Raises:
        MetricsAddressUnavailable: an unknown host, an address not on this machine, or a
            port in use or not ours to bind.
    """
    server = bind_metrics_socket(addr)
    server.close()


def bind_metrics_socket(addr: Tuple[str, int]) -> socket.socket:
    host, port = addr
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        raise MetricsAddressUnavailable(f"cannot serve metrics on {show_addr(addr)}: {error.strerror}") from None
    server = socket.socket(family, kind, proto)
    try:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP server will
        server.bind(sockaddr)
    except OSError as error:
        server.close()
        raise MetricsAddressUnavailable(f"cannot serve metrics on {show_addr(addr)}: "
                                        f"{error.strerror or errno.errorcode.get(error.errno, error)}") from None
    return server


def preflight(config: DaemonConfig) -> None:
    """Every start-up check that needs no worker, in the order :meth:`Daemon.start` makes them.

    For a command that wants to fail fast; :meth:`Daemon.start` makes the same checks
    again (holding what it checked), so calling this is optional. Leaves nothing behind
    but the journal's directory and an empty journal file.

    Raises:
        SocketDirectoryUnsafe, DaemonAlreadyRunning, JournalUnavailable, JournalLocked,
        MetricsAddressUnavailable: the first check that fails.
    """
    check_socket_directory(config.socket_path)
    check_socket_free(config.socket_path)
    JournalLock(config.journal_path).release()
    if config.metrics_addr is not None:
        check_metrics_addr(config.metrics_addr)



def ensure_private_directory(directory: Path) -> None:
    """Create ``directory`` 0700, or check that an existing one is ours and private."""
    try:
        directory.mkdir(parents=True, mode=0o700)
    except FileExistsError:
        pass
    except OSError as error:
        raise SocketDirectoryUnsafe(f"cannot create the socket directory {directory}: {error.strerror}") from None
    check_socket_directory(directory / "governor.sock")
