"""Chat steps over an embedded SQLite store: ``chat.create``, ``chat.send_message``, ``chat.history``.

Where the store lives (:func:`store_path`), first match wins:

1. the step's ``store`` parameter, which must name a file in the state directory or in
   one of the directories listed in ``$GOVERNOR_CHAT_STORE_DIRS`` (``os.pathsep``-separated,
   read from the worker's environment: the daemon's), or ``$GOVERNOR_CHAT_STORE`` itself:
   a daemon's client cannot point a step at any file the daemon's user can write;
2. the ``GOVERNOR_CHAT_STORE`` environment variable (of the worker process: the daemon's);
3. ``$XDG_STATE_HOME/governor/chat.sqlite3`` (the state directory), with ``XDG_STATE_HOME``
   defaulting to ``~/.local/state`` as the XDG base directory spec says.

The writers (``chat.create``, ``chat.send_message``) open the store through
:func:`open_store`, which creates the file, its directory and the schema on first use, and
refuses a SQLite file that is not a chat store (it never adds tables or WAL mode to another
application's database)::

    chats(id INTEGER PRIMARY KEY, title TEXT, created_at TEXT)
    messages(id INTEGER PRIMARY KEY, chat_id INTEGER REFERENCES chats, author TEXT, text TEXT, created_at TEXT)
    INDEX messages_by_chat ON messages(chat_id, id)

``chat.history`` only reads, through :func:`read_store`, with a read-only connection
(``file:PATH?mode=ro``), so it works in a sandboxed pool worker that may not write the
store. Nothing is cached between calls, so there is no connection to share across a fork.
The database is in WAL mode, so ``chat.history`` in the pool lane reads while the critical
lane writes; writers take the write lock up front (``BEGIN IMMEDIATE``) and everyone waits
up to :data:`BUSY_TIMEOUT_S` for a lock instead of failing with "database is locked".

``chat.create`` and ``chat.send_message`` change state and run in the critical lane, one at
a time and in submission order, so message ids increase in the order messages were sent.
Timestamps are UTC ISO 8601 strings (wall clock: they are for people, not for deadlines).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Optional, TypeVar

from governor.limits import Limits
from governor.steps.builtin.errors import ChatNotFound, ChatStoreError, StepInputError
from governor.steps.builtin.params import require_int, require_path, require_text

T = TypeVar("T")

#: The environment variable that names the chat store when a step gets no ``store``.
STORE_ENV_VAR = "GOVERNOR_CHAT_STORE"

#: The environment variable listing, ``os.pathsep``-separated, the directories besides the
#: state directory where a step's ``store`` parameter may name a chat store.
STORE_DIRS_ENV_VAR = "GOVERNOR_CHAT_STORE_DIRS"

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

_TABLES = frozenset({"chats", "messages"})

_MESSAGE_COLUMNS = ("id", "chat_id", "author", "text", "created_at")


def state_dir() -> Path:
    """``$XDG_STATE_HOME/governor`` (default ``~/.local/state/governor``): where the daemon keeps its state."""
    state_home = os.environ.get("XDG_STATE_HOME", "")
    # The XDG spec: a relative value is invalid and must be ignored.
    base = Path(state_home) if os.path.isabs(state_home) else Path.home() / ".local" / "state"
    return base / "governor"


def store_path(store: Optional[Any] = None) -> str:
    """The chat store's path: ``store``, else ``$GOVERNOR_CHAT_STORE``, else the XDG default.

    Args:
        store: an explicit path (``str`` or ``os.PathLike``), or ``None``.

    Raises:
        StepInputError: ``store`` is not a usable path, or lies outside the directories
            chat stores may live in (see the module's docstring).
    """
    if store is not None:
        path = require_path("store", store)
        _require_allowed(path)
        return path
    from_env = os.environ.get(STORE_ENV_VAR)
    if from_env:
        return require_path(f"${STORE_ENV_VAR}", from_env)
    return str(state_dir() / STORE_FILE_NAME)


def allowed_store_dirs() -> list[str]:
    """The directories a ``store`` parameter may name a file in: the state directory, then ``$GOVERNOR_CHAT_STORE_DIRS``."""
    extra = [entry for entry in os.environ.get(STORE_DIRS_ENV_VAR, "").split(os.pathsep) if os.path.isabs(entry)]
    return [str(state_dir()), *extra]


@contextlib.contextmanager
def allowing_stores(paths: Iterable[str]) -> Iterator[None]:
    """Let ``store`` parameters name files in the directories of ``paths`` while the block runs.

    Workers started inside the block inherit it. For a process whose own user named the
    stores, e.g. ``governor run --store PATH``; a daemon's operator sets
    ``$GOVERNOR_CHAT_STORE_DIRS`` instead.
    """
    before = os.environ.get(STORE_DIRS_ENV_VAR)
    dirs = [os.path.dirname(os.path.abspath(path)) for path in paths]
    os.environ[STORE_DIRS_ENV_VAR] = os.pathsep.join([*dirs, *([before] if before else [])])
    try:
        yield
    finally:
        if before is None:
            del os.environ[STORE_DIRS_ENV_VAR]
        else:
            os.environ[STORE_DIRS_ENV_VAR] = before


def _require_allowed(path: str) -> None:
    # realpath on both sides: neither "..", nor a symlink inside an allowed directory, leads out.
    real = os.path.realpath(path)
    from_env = os.environ.get(STORE_ENV_VAR)
    if from_env and real == os.path.realpath(from_env):
        return
    for directory in allowed_store_dirs():
        root = os.path.realpath(directory)
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
            return  # the directory itself is refused next, as a directory
    raise StepInputError(f"store {path!r} is outside the directories a chat store may be in "
                         f"({os.pathsep.join(allowed_store_dirs())}); the daemon's operator can allow more "
                         f"with ${STORE_DIRS_ENV_VAR}")


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
    path = _usable_store_path(store)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        connection.execute("PRAGMA foreign_keys = ON")
        # Before anything that writes, WAL mode included: a foreign database stays as it was.
        new = _check_store(connection, path)
        # WAL persists in the file; on an existing WAL store this is a cheap no-op.
        connection.execute("PRAGMA journal_mode = WAL")
        # NORMAL is durable across a crash of the process; only a power loss may drop the
        # last transactions. FULL would fsync every message.
        connection.execute("PRAGMA synchronous = NORMAL")
        if new:
            _create_schema(connection)
        yield connection, path
    finally:
        connection.close()


def _usable_store_path(store: Optional[Any]) -> str:
    path = store_path(store)
    if os.path.isdir(path):
        raise ChatStoreError(f"the chat store {path!r} is a directory, not a SQLite file")
    return path


def _check_store(connection: sqlite3.Connection, path: str) -> bool:
    """Whether the store is new (no table yet); raise unless it is a chat store we understand.

    Raises:
        ChatStoreError: not a SQLite file, another application's database, or a newer schema.
    """
    try:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        version = connection.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise ChatStoreError(f"the chat store {path!r} cannot be read as SQLite: {exc}") from None
    if not tables and version == 0:
        return True
    if version > SCHEMA_VERSION:
        raise ChatStoreError(f"the chat store {path!r} has schema version {version}; "
                             f"this Governor understands up to {SCHEMA_VERSION}")
    if version != SCHEMA_VERSION or not _TABLES <= tables:
        raise ChatStoreError(f"{path!r} is a SQLite database but not a Governor chat store "
                             f"(tables: {', '.join(sorted(tables)) or 'none'}; user_version {version}); "
                             "it is left as it is")
    return False


def _create_schema(connection: sqlite3.Connection) -> None:
    """Create the tables on a new store (once, even with several processes racing)."""
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
    path = _usable_store_path(store)
    if not os.path.exists(path):
        raise ChatNotFound(chat_id, path)  # read-only: a missing store is not created here

    def read(connection: sqlite3.Connection) -> list:
        _require_chat(connection, chat_id, path)
        return connection.execute(
            f"SELECT {', '.join(_MESSAGE_COLUMNS)} FROM messages WHERE chat_id = ? ORDER BY id DESC LIMIT ?",
            (chat_id, limit)).fetchall()

    rows = read_store(path, read)
    return [dict(zip(_MESSAGE_COLUMNS, row)) for row in reversed(rows)]


def newest_chat(store: Optional[str] = None) -> Optional[int]:
    """The id of the store's newest chat, or ``None`` when it has none (or is not made yet).

    Read-only, as :func:`history`: what a program that opens on the latest chat asks
    first (``governor run --view``).

    Args:
        store: the chat store's path (default: see :func:`store_path`).

    Raises:
        StepInputError: a bad ``store``.
        ChatStoreError: as :func:`read_store`.
    """
    path = _usable_store_path(store)
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return None  # nothing written yet: the steps that write create the store

    def read(connection: sqlite3.Connection) -> Optional[int]:
        return connection.execute("SELECT max(id) FROM chats").fetchone()[0]

    return read_store(path, read)


#: SQLite's answers when a read-only connection may not create the WAL index (``-shm``)
#: of a WAL store that no connection has open: the directory is not writable for us,
#: e.g. in a sandboxed pool worker.
_NO_WAL_INDEX = frozenset({sqlite3.SQLITE_READONLY_DIRECTORY, sqlite3.SQLITE_READONLY_CANTINIT})


def read_store(path: str, read: Callable[[sqlite3.Connection], T]) -> T:
    """Run ``read`` on a read-only connection to the chat store at ``path``, in one read transaction.

    ``file:PATH?mode=ro`` first: it shares the WAL index (``-shm``) with the writers and so
    sees every committed row, checkpointed or not. When no connection has the store open,
    SQLite has deleted ``-wal`` and ``-shm``, and a process that may not create files
    there (a sandboxed pool worker) cannot open it so. Then every row is in the database
    file itself, which is read with ``immutable=1``, and the read is kept only if the
    file and the absent ``-wal`` were unchanged across it (a writer that came and
    checkpointed meanwhile makes it read again); see :func:`_read_checkpointed`.

    Raises:
        ChatStoreError: not a chat store, a newer schema, or a store that kept changing
            for :data:`BUSY_TIMEOUT_S`.
    """
    uri = Path(path).absolute().as_uri()
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    try:
        while True:
            try:
                return _read_with(f"{uri}?mode=ro", path, read)
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode not in _NO_WAL_INDEX:
                    raise
            result = _read_checkpointed(uri, path, read)
            if result is not None:
                return result[0]
            if time.monotonic() > deadline:
                raise ChatStoreError(f"the chat store {path!r} kept changing while it was read "
                                     f"for {BUSY_TIMEOUT_S:g}s")
    except sqlite3.DatabaseError as exc:
        if isinstance(exc, sqlite3.OperationalError):
            raise
        raise ChatStoreError(f"the chat store {path!r} cannot be read as SQLite: {exc}") from None


def _read_with(uri: str, path: str, read: Callable[[sqlite3.Connection], T]) -> T:
    connection = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        # One read transaction, so every statement of ``read`` sees the same snapshot.
        connection.execute("BEGIN")
        try:
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ChatStoreError(f"the chat store {path!r} has schema version {version}; "
                                     f"this Governor understands up to {SCHEMA_VERSION}")
            try:
                return read(connection)
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    raise ChatStoreError(f"{path!r} is not a Governor chat store ({exc})") from None
                raise
        finally:
            if connection.in_transaction:
                connection.execute("COMMIT")
    finally:
        connection.close()


def _file_state(path: str) -> Optional[tuple]:
    """What changes when a checkpoint writes the file, and whether a WAL exists (``None``: it does)."""
    if os.path.exists(path + "-wal"):
        return None
    status = os.stat(path)
    return status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns


def _read_checkpointed(uri: str, path: str, read: Callable[[sqlite3.Connection], T]) -> Optional[tuple]:
    """``(read's result,)`` from the database file alone, or ``None`` if a writer came meanwhile.

    No WAL exists, so the file holds every committed row. ``immutable=1`` reads it without
    the WAL index; a writer may start meanwhile, but it writes its WAL first and touches
    the file only in its closing checkpoint, which changes the file's mtime and ctime,
    so an unchanged file state before and after the read means a consistent snapshot. (A
    whole writer session inside one tick of the file system's clock after the previous
    checkpoint would go unseen: the kernel's coarse clock, 1-4 ms.)
    """
    before = _file_state(path)
    if before is None:
        return None  # a writer has it open: mode=ro will work now
    try:
        result = _read_with(f"{uri}?mode=ro&immutable=1", path, read)
    except sqlite3.DatabaseError:
        if _file_state(path) == before:
            raise  # the file did not change under us: a genuine error
        return None  # a torn read: a checkpoint ran meanwhile
    return (result,) if _file_state(path) == before else None
