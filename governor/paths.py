"""Where the daemon's files live by default: its socket and its journal.

A light module (standard library only): the client and the client commands import it to
find the socket without importing the daemon, the supervisor, loky or psutil.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def default_runtime_dir() -> Path:
    """Where the socket goes: ``$XDG_RUNTIME_DIR/governor``, else a per-user temp directory."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "governor"
    return Path(tempfile.gettempdir()) / f"governor-{os.getuid()}"


def default_socket_path() -> Path:
    """The socket a daemon listens on and a client connects to by default."""
    return default_runtime_dir() / "governor.sock"


def default_journal_path() -> Path:
    """``$XDG_STATE_HOME/governor/journal.sqlite3`` (default ``~/.local/state``)."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "governor" / "journal.sqlite3"
