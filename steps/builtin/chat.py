"""Chat steps over an embedded SQLite store: ``chat.create``, ``chat.send_message``, ``chat.history``.

Where the store lives (:func:`store_path`), first match wins:

1. the step's ``store`` parameter;
2. the ``GOVERNOR_CHAT_STORE`` environment variable (of the worker process: the daemon's);
3. ``$XDG_STATE_HOME/governor/chat.sqlite3``, with ``XDG_STATE_HOME`` defaulting to
   ``~/.local/state`` as the XDG base directory spec says.

Every call opens its own short-lived connection through :func:`open_store`, which creates
the file, its directory and the schema on first use::

    chats(id INTEGER PRIMARY KEY, title TEXT, created_at TEXT)
    messages(id INTEGER PRIMARY KEY, chat_id INTEGER REFERENCES chats, author TEXT, text TEXT, created_at TEXT)
    INDEX messages_by_chat ON messages(chat_id, id)

Nothing is cached between calls, so there is no connection to share across a fork. The
database is in WAL mode, so ``chat.history`` in the pool lane reads while the critical lane
writes; writers take the write lock up front (``BEGIN IMMEDIATE``) and everyone waits up to
:data:`BUSY_TIMEOUT_S` for a lock instead of failing with "database is locked".

``chat.create`` and ``chat.send_message`` change state and run in the critical lane, one at
a time and in submission order, so message ids increase in the order messages were sent.
Timestamps are UTC ISO 8601 strings (wall clock: they are for people, not for deadlines).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from governor.limits import Limits
from governor.steps.builtin.errors import ChatNotFound, ChatStoreError
from governor.steps.builtin.params import require_int, require_path, require_text

#: The environment variable that names the chat store when a step gets no ``store``.
STORE_ENV_VAR = "GOVERNOR_CHAT_STORE"

#: The store's file name under ``$XDG_STATE_HOME/governor/``.
STORE_FILE_NAME = "chat.sqlite3"

#: How long a connection waits for another one's lock before SQLite gives up. WAL lets
#: readers and one writer proceed together, so only writers wait, and only for one short
#: transaction each; a long wait just rides out a checkpoint or a slow disk, while a
#: genuinely stuck writer is still reported well within :data:`STEP_LIMITS`.
BUSY_TIMEOUT_S = 10.0

#: The supervisor's outer bound for one chat step: three busy timeouts of head room.
STEP_LIMITS = Limits(timeout_s=3 * BUSY_TIMEOUT_S)

#: Largest message text, in UTF-8 bytes. Big enough for a pasted log or diff, small enough
#: that a 1000-message history still travels back to the client quickly.
MAX_TEXT_BYTES = 64 * 1024

#: Largest chat title and author name, in UTF-8 bytes: one line for a list or a header.
MAX_TITLE_BYTES = 1024
MAX_AUTHOR_BYTES = 256

#: ``chat.history``'s largest ``limit`` (at most ``MAX_TEXT_BYTES`` each: 64 MiB worst case).
MAX_HISTORY_LIMIT = 1000

#: The schema version kept in ``PRAGMA user_version``. A store with a newer one was made by
#: a newer Governor, and is refused rather than misread.
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chats (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    chat_id INTEGER NOT NULL REFERENCES chats(id),
    author TEXT NOT NULL,
    text TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_chat ON messages(chat_id, id);
"""

_MESSAGE_COLUMNS = ("id", "chat_id", "author", "text", "created_at")


def store_path(store: Optional[Any] = None) -> str:
    """The chat store's path: ``store``, else ``$GOVERNOR_CHAT_STORE``, else the XDG default.

    Args:
        store: an explicit path (``str`` or ``os.PathLike``), or ``None``.

    Raises:
        StepInputError: ``store`` is not a usable path.
    """
    if store is not None:
        return require_path("store", store)
    from_env = os.environ.get(STORE_ENV_VAR)
    if from_env:
        return require_path(f"${STORE_ENV_VAR}", from_env)
    state_home = os.environ.get("XDG_STATE_HOME", "")
    # The XDG spec: a relative value is invalid and must be ignored.
    base = Path(state_home) if os.path.isabs(state_home) else Path.home() / ".local" / "state"
    return str(base / "governor" / STORE_FILE_NAME)


@contextlib.contextmanager
def open_store(store: Optional[Any] = None) -> Iterator[tuple[sqlite3.Connection, str]]:
    """Open the chat store for one call, creating it on first use; close it afterwards.

    The connection is in autocommit mode: a caller that writes wraps its statements in
    ``BEGIN IMMEDIATE`` ... ``COMMIT`` (see :func:`_write`).

    Yields:
        ``(connection, path)``.

    Raises:
        StepInputError: ``store`` is not a usable path.
        ChatStoreError: the path is a directory, or the store's schema is newer than ours.
    """
    path = store_path(store)
    if os.path.isdir(path):
        raise ChatStoreError(f"the chat store {path!r} is a directory, not a SQLite file")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        connection.execute("PRAGMA foreign_keys = ON")
        # WAL persists in the file; on an existing WAL store this is a cheap no-op.
        connection.execute("PRAGMA journal_mode = WAL")
        # NORMAL is durable across a crash of the process; only a power loss may drop the
        # last transactions. FULL would fsync every message.
        connection.execute("PRAGMA synchronous = NORMAL")
        _ensure_schema(connection, path)
        yield connection, path
    finally:
        connection.close()


def _ensure_schema(connection: sqlite3.Connection, path: str) -> None:
    """Create the tables on a new store (once, even with several processes racing)."""
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise ChatStoreError(f"the chat store {path!r} has schema version {version}; "
                             f"this Governor understands up to {SCHEMA_VERSION}")
    with _write(connection):
        # Idempotent, and under the write lock: a racing process that got there first
        # made these same tables.
        for statement in filter(str.strip, _SCHEMA.split(";")):
            connection.execute(statement)
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


@contextlib.contextmanager
def _write(connection: sqlite3.Connection) -> Iterator[None]:
    """One write transaction: take the write lock up front, commit, or roll back on error.

    ``BEGIN IMMEDIATE`` rather than a deferred ``BEGIN``: a deferred transaction that reads
    and then writes cannot wait for the lock (SQLite fails it with SQLITE_BUSY at once),
    while an immediate one waits in the busy handler like everyone else.
    """
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if connection.in_transaction:  # SQLite may already have rolled back (e.g. on SQLITE_FULL)
            connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


def _require_chat(connection: sqlite3.Connection, chat_id: int, path: str) -> None:
    if connection.execute("SELECT 1 FROM chats WHERE id = ?", (chat_id,)).fetchone() is None:
        raise ChatNotFound(chat_id, path)


def create(title: str, store: Optional[str] = None) -> int:
    """Create a chat and return its id.

    Args:
        title: a non-blank title, at most :data:`MAX_TITLE_BYTES` in UTF-8.
        store: the chat store's path (default: see :func:`store_path`).

    Returns:
        The new chat's id (ids increase; the first chat of a store is ``1``).

    Raises:
        StepInputError: a bad ``title`` or ``store``.
        ChatStoreError: as :func:`open_store`.
    """
    title = require_text("title", title, max_bytes=MAX_TITLE_BYTES)
    with open_store(store) as (connection, _):
        with _write(connection):
            cursor = connection.execute("INSERT INTO chats (title, created_at) VALUES (?, ?)", (title, _now()))
        return cursor.lastrowid


def send_message(chat_id: int, text: str, author: str = "user", store: Optional[str] = None) -> int:
    """Append a message to a chat and return the message's id.

    Args:
        chat_id: an existing chat's id.
        text: the message, non-blank, at most :data:`MAX_TEXT_BYTES` in UTF-8.
        author: who wrote it (e.g. ``"user"``, ``"assistant"``), at most
            :data:`MAX_AUTHOR_BYTES`.
        store: the chat store's path (default: see :func:`store_path`).

    Returns:
        The new message's id; ids increase in the order messages are stored.

    Raises:
        StepInputError: a bad parameter.
        ChatNotFound: no chat has id ``chat_id``.
        ChatStoreError: as :func:`open_store`.
    """
    chat_id = require_int("chat_id", chat_id, minimum=1)
    text = require_text("text", text, max_bytes=MAX_TEXT_BYTES)
    author = require_text("author", author, max_bytes=MAX_AUTHOR_BYTES)
    with open_store(store) as (connection, path):
        with _write(connection):
            _require_chat(connection, chat_id, path)
            cursor = connection.execute(
                "INSERT INTO messages (chat_id, author, text, created_at) VALUES (?, ?, ?, ?)",
                (chat_id, author, text, _now()))
        return cursor.lastrowid


def history(chat_id: int, limit: int = 50, store: Optional[str] = None) -> list[dict]:
    """The newest ``limit`` messages of a chat, returned OLDEST FIRST (reading order).

    Args:
        chat_id: an existing chat's id.
        limit: how many messages at most, ``1 <= limit <= MAX_HISTORY_LIMIT``.
        store: the chat store's path (default: see :func:`store_path`).

    Returns:
        ``[{"id", "chat_id", "author", "text", "created_at"}, ...]`` in increasing ``id``
        order: the last element is the newest message. Empty for a chat without messages.

    Raises:
        StepInputError: a bad parameter.
        ChatNotFound: no chat has id ``chat_id``.
        ChatStoreError: as :func:`open_store`.
    """
    chat_id = require_int("chat_id", chat_id, minimum=1)
    limit = require_int("limit", limit, minimum=1, maximum=MAX_HISTORY_LIMIT)
    with open_store(store) as (connection, path):
        # One read transaction, so the chat check and the messages see the same snapshot.
        connection.execute("BEGIN")
        try:
            _require_chat(connection, chat_id, path)
            rows = connection.execute(
                f"SELECT {', '.join(_MESSAGE_COLUMNS)} FROM messages WHERE chat_id = ? ORDER BY id DESC LIMIT ?",
                (chat_id, limit)).fetchall()
        finally:
            if connection.in_transaction:
                connection.execute("COMMIT")
    return [dict(zip(_MESSAGE_COLUMNS, row)) for row in reversed(rows)]
