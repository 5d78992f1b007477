"""The daemon's durable journal: every submitted task, its state and its outcome, in SQLite.

Data flow::

    client ─ submit ─> daemon ─ Journal.submit() ─ commit ─> reply with the task ids
                                   (a row per task, "queued"; its id is the task id clients see)
    supervisor manager thread ─ mark_started() ─ commit ─> hands the step to a worker
                              ─ mark_finished() ─ commit (state, result or error)
    status / wait ─> get(), recent(), by_state() ─> TaskRecord.to_wire()

    daemon start ─ recover():  "running" pool rows     -> "queued" again (re-run: at least once)
                               "running" critical rows -> "interrupted" (never re-run: at most once),
                                 or "queued" again if its steps are idempotent (``rerun``)
                 ─> Recovery.resume (every queued row, in id order): the daemon resubmits them
    now and then ─ prune(): finished rows older than ``retention_s`` are deleted

Ordering: ids come from ``AUTOINCREMENT``, so they follow submission order and are never
reused, even after the newest rows are pruned (a client may still hold an old id).

Durability: every method is one transaction, committed before it returns. How far a
commit goes is the journal's :class:`JournalSync` (``governor serve --journal-sync``):
``normal`` (SQLite's ``synchronous=NORMAL`` in WAL mode) hands each commit to the OS, so it
survives the process dying at any moment (``kill -9``, a crash), while a power loss or an OS
crash may lose the last commits; ``full`` also fsyncs the WAL at each commit, so a commit
survives a power cut too, for one fsync per commit. That is what makes
:meth:`Journal.mark_started` a guard:
a critical step is handed to a worker only once its "running" row is committed, so after a
crash a "running" row means "may have run" and is never run again, unless running it again
is safe (idempotent). The daemon commits a critical task's end before the next start of its
lane key, so each key has at most one "running" row, the one that may really have been
running (:meth:`Journal.recover` also settles journals where that does not hold). A
workflow's ``progress`` (its finished steps' results) is committed as each later step
starts, so a workflow of idempotent steps resumes at the step that was running.

Concurrency: one connection, shared by the daemon's event-loop thread and the supervisor's
manager thread, serialised by a lock. Other processes may read the file, but two daemons
must never serve one journal (both would recover and resume the same rows): the daemon
makes sure of that itself, with an flock on the journal file (``preflight.JournalLock``).

Times are wall-clock ``time.time()`` values: they outlive the process and the machine's
uptime, and people read them. Nothing here is a deadline, so the monotonic clock's
guarantees are not needed and its values would be meaningless after a reboot.
"""

from __future__ import annotations

import contextlib
import enum
import json
import math
import os
import sqlite3
import threading
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import attrs

from governor.errors import GovernorError, InvalidTransition
from governor.limits import Lane, Limits
from governor.protocol.values import dumps
from governor.task import TaskState

#: The schema this module reads and writes, kept in ``PRAGMA user_version``.
SCHEMA_VERSION = 5

#: How long finished rows are kept by default: a week answers "what happened to my task
#: on Friday" after a weekend, while the file stays small (a row is a few hundred bytes
#: plus its params and result).
DEFAULT_RETENTION_S = 7 * 24 * 3600.0

#: How long a statement waits for a lock another connection holds before it fails with
#: "database is locked". Within this process the Python lock serialises everything, so
#: only another process (a reader, a backup, the sqlite3 shell) can hold one, briefly:
#: long enough to ride that out, short enough that a stuck lock surfaces as an error
#: instead of a hung daemon.
BUSY_TIMEOUT_MS = 5_000

#: The state of a critical task that was running when the daemon died: it may or may not
#: have run, and it is never run again. (Not a :class:`~governor.task.TaskState`: a live
#: task never has it.)
INTERRUPTED = "interrupted"

#: Every state a row may be in.
STATES = tuple(state.value for state in TaskState) + (INTERRUPTED,)

#: The states of a row whose task's life is over.
TERMINAL_STATES = frozenset(state.value for state in TaskState if state.terminal) | {INTERRUPTED}

#: What a row holds: one step, or a whole workflow (its steps run in order in the
#: critical lane, so it is recovered as one critical task).
KINDS = ("step", "workflow")

#: The key of a row's ``params`` object, by kind.
_PAYLOAD_KEY = {"step": "params", "workflow": "calls"}

_QUEUED, _RUNNING = TaskState.QUEUED.value, TaskState.RUNNING.value


class JournalSync(str, enum.Enum):
    """How far a journal's commit has gone when the write returns."""

    #: In the OS's hands: survives the daemon dying (``kill -9``), not a power cut.
    NORMAL = "normal"
    #: On the disk (the WAL fsynced at each commit): survives a power cut too.
    FULL = "full"


class JournalError(GovernorError, RuntimeError):
    """The journal cannot be opened or used: the message names the file and the cause."""


def _sql_list(values: Iterable[str]) -> str:
    """A SQL list literal of our own constants (never of input: no escaping is done)."""
    return "(" + ", ".join(f"'{value}'" for value in sorted(values)) + ")"


def _create_table(name: str) -> str:
    """The ``CREATE TABLE`` statement of the tasks table, under ``name``."""
    return f"""CREATE TABLE {name} (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL CHECK (kind IN {_sql_list(KINDS)}),
        step TEXT NOT NULL,
        params TEXT NOT NULL,
        lane TEXT NOT NULL CHECK (lane IN {_sql_list(lane.value for lane in Lane)}),
        key TEXT,
        limits TEXT,
        state TEXT NOT NULL CHECK (state IN {_sql_list(STATES)}),
        submitted_at REAL NOT NULL,
        started_at REAL,
        ended_at REAL,
        result TEXT,
        error TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        interrupted INTEGER NOT NULL DEFAULT 0 CHECK (interrupted IN (0, 1)),
        cwd TEXT,
        lane_key TEXT,
        progress TEXT,
        priority INTEGER NOT NULL DEFAULT 0
    )"""


_SCHEMA = (_create_table("tasks"), "CREATE INDEX tasks_state ON tasks (state)")


def _rebuild(connection: sqlite3.Connection) -> None:
    """Bring a journal of an older schema to this one: a new table, the rows copied over.

    SQLite cannot alter a column's CHECK, and the list of states grows with Governor
    (version 1 and 2 lacked ``exhausted``, so writing that state into such a journal
    failed; version 4 adds the lane key and a workflow's progress, version 5 the priority),
    so the table is built anew, as SQLite's documentation says to change a table's
    definition: create, copy, drop, rename, inside the caller's transaction. A column an
    older schema lacked is left at its default (an old task's ``cwd`` is unknown: it
    resumes in the daemon's own directory, as it would have run; its priority is 0). The
    ``AUTOINCREMENT`` counter is carried over, so that no id is ever given twice.
    """
    sequence = connection.execute("SELECT seq FROM sqlite_sequence WHERE name = 'tasks'").fetchone()
    connection.execute(_create_table("tasks_rebuilt"))
    old_columns = {row["name"] for row in connection.execute("PRAGMA table_info(tasks)")}
    columns = ", ".join(row["name"] for row in connection.execute("PRAGMA table_info(tasks_rebuilt)")
                        if row["name"] in old_columns)
    connection.execute(f"INSERT INTO tasks_rebuilt ({columns}) SELECT {columns} FROM tasks")
    connection.execute("DROP TABLE tasks")
    connection.execute("ALTER TABLE tasks_rebuilt RENAME TO tasks")
    for statement in _SCHEMA[1:]:
        connection.execute(statement)
    if sequence is not None:
        connection.execute("UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'tasks'", (sequence[0],))
        connection.execute("INSERT INTO sqlite_sequence (name, seq) SELECT 'tasks', ? WHERE NOT EXISTS "
                           "(SELECT 1 FROM sqlite_sequence WHERE name = 'tasks')", (sequence[0],))


def _loads(text: Optional[str]) -> Any:
    return None if text is None else json.loads(text)


def _limits_dict(limits: Limits) -> Dict[str, Any]:
    """The limits that are set, as a JSON object (unset fields inherit: not stored)."""
    return {name: value for name, value in attrs.asdict(limits).items() if value is not None}


def _state_name(state: Union[str, TaskState]) -> str:
    name = state.value if isinstance(state, TaskState) else state
    if name not in STATES:
        raise ValueError(f"unknown task state {state!r}; expected one of {', '.join(STATES)}")
    return name


def lane_key_text(key: Any) -> str:
    """A lane key as the journal keeps and shows it: a string as it is, anything else as JSON
    (or, not JSON, its ``repr``)."""
    if isinstance(key, str):
        return key
    try:
        return dumps(key)
    except (TypeError, ValueError):
        return repr(key)


def _non_empty(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if not value:
        raise ValueError(f"{type(instance).__name__}.{attribute.name} must not be empty")


@attrs.frozen
class NewTask:
    """A task to journal. Build one with :meth:`step_call` or :meth:`workflow`.

    Args:
        kind: ``"step"`` or ``"workflow"``.
        step: the step's name, or a label for a workflow.
        params: for a step ``{"params": {...}}``, for a workflow ``{"calls": [...]}``; JSON.
        lane: where it runs.
        key: the submission's supersede key, if any.
        limits: the submission's own limits, if any.
        cwd: the absolute directory it was submitted from, where its steps run, if known.
        lane_key: its critical lane key (``StepSpec.key``) as text, if any.
        priority: its rank in the pool lane's queue (``Call.priority``), kept so that it
            resumes at it after a restart.
    """

    kind: str = attrs.field(validator=attrs.validators.in_(KINDS))
    step: str = attrs.field(validator=[attrs.validators.instance_of(str), _non_empty])
    params: Dict[str, Any] = attrs.field(validator=attrs.validators.instance_of(dict))
    lane: Lane = attrs.field(converter=Lane)
    key: Optional[str] = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(str)))
    limits: Optional[Limits] = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(Limits)))
    cwd: Optional[str] = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(str)))
    lane_key: Optional[str] = attrs.field(default=None, converter=attrs.converters.optional(lane_key_text))
    priority: int = attrs.field(default=0, validator=attrs.validators.instance_of(int))

    def __attrs_post_init__(self) -> None:
        if list(self.params) != [_PAYLOAD_KEY[self.kind]]:
            raise ValueError(f"a {self.kind} task's params must be {{{_PAYLOAD_KEY[self.kind]!r}: ...}}, "
                             f"got keys {sorted(self.params)}")

    @classmethod
    def step_call(cls, step: str, params: Mapping[str, Any], lane: Union[Lane, str], key: Optional[str] = None,
                  limits: Optional[Limits] = None, cwd: Optional[str] = None, lane_key: Any = None,
                  priority: int = 0) -> "NewTask":
        """One step with its keyword arguments, in the lane its registration declares."""
        return cls("step", step, {"params": dict(params)}, lane, key, limits, cwd, lane_key, priority)

    @classmethod
    def workflow(cls, calls: Sequence[Mapping[str, Any]], label: str = "workflow",
                 cwd: Optional[str] = None, lane_key: Any = None) -> "NewTask":
        """A workflow: ``calls`` are ``{"step": name, "params": {...}}`` objects, run in order.

        It is journaled in the critical lane, where its steps run: after a crash mid-way it
        is interrupted, never re-run from the start (unless its steps are all idempotent:
        then it resumes at the step that was running).
        """
        return cls("workflow", label, {"calls": [dict(call) for call in calls]}, Lane.CRITICAL, cwd=cwd,
                   lane_key=lane_key)


@attrs.frozen
class TaskRecord:
    """One row of the journal, its JSON columns decoded.

    Attributes:
        id: the durable task id (also the submission order).
        kind: ``"step"`` or ``"workflow"``.
        step: the step's name, or the workflow's label.
        params: ``{"params": {...}}`` for a step, ``{"calls": [...]}`` for a workflow.
        lane: the lane it runs in.
        key: its supersede key, if any.
        limits: its own limits as stored (a JSON object), if any. Not a ``Limits``: a
            bound added since the task was journaled may refuse them, and reading the
            journal must not fail for that (:meth:`own_limits` builds them).
        state: one of :data:`STATES`.
        submitted_at, started_at, ended_at: wall-clock times; ``started_at`` is the
            latest attempt's.
        result: the step's result (``None`` until done, and for a step returning ``None``).
        error: the error as the wire carries it (``protocol.error_to_wire``), if it failed.
        attempts: how many times it was handed to a worker.
        interrupted: whether it was running when a daemon died.
        cwd: the directory it was submitted from, where its steps run (``None``: unknown).
        lane_key: its critical lane key as text (``None``: none, or a pool step).
        progress: a workflow's results of the steps finished before the one that started
            last (``None``: a step, or a workflow whose first step has not started).
        priority: its rank in the pool lane's queue (``Call.priority``; 0 for a workflow).
    """

    id: int
    kind: str = attrs.field(validator=attrs.validators.in_(KINDS))
    step: str
    params: Dict[str, Any]
    lane: Lane = attrs.field(converter=Lane)
    key: Optional[str]
    limits: Optional[Dict[str, Any]]
    state: str = attrs.field(validator=attrs.validators.in_(STATES))
    submitted_at: float
    started_at: Optional[float]
    ended_at: Optional[float]
    result: Any
    error: Optional[Dict[str, Any]]
    attempts: int
    interrupted: bool = attrs.field(converter=bool)
    cwd: Optional[str] = None
    lane_key: Optional[str] = None
    progress: Optional[List[Any]] = None
    priority: int = 0

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "TaskRecord":
        """Decode one ``tasks`` row."""
        return cls(id=row["id"], kind=row["kind"], step=row["step"], params=json.loads(row["params"]),
                   lane=row["lane"], key=row["key"], limits=_loads(row["limits"]),
                   state=row["state"], submitted_at=row["submitted_at"], started_at=row["started_at"],
                   ended_at=row["ended_at"], result=_loads(row["result"]), error=_loads(row["error"]),
                   attempts=row["attempts"], interrupted=row["interrupted"], cwd=row["cwd"],
                   lane_key=row["lane_key"], progress=_loads(row["progress"]), priority=row["priority"])

    def own_limits(self) -> Optional[Limits]:
        """The task's own limits as a ``Limits``, or ``None`` when it has none.

        Raises:
            ValueError, TypeError: the stored limits are no longer valid ``Limits``.
        """
        try:
            return None if self.limits is None else Limits(**self.limits)
        except OverflowError as error:  # a number too large for a float: as absurd as any
            raise ValueError(f"limits {self.limits}: {error}") from None

    @property
    def terminal(self) -> bool:
        """Whether the task's life is over."""
        return self.state in TERMINAL_STATES

    def to_wire(self, summary: bool = False) -> Dict[str, Any]:
        """The record as a JSON object for a status reply.

        Args:
            summary: leave out the params (or calls) and the result, which may be large:
                for listings of many tasks.
        """
        wire = {"task_id": self.id, "kind": self.kind, "step": self.step, "lane": self.lane.value,
                "key": self.key, "limits": self.limits,
                "state": self.state, "submitted_at": self.submitted_at, "started_at": self.started_at,
                "ended_at": self.ended_at, "error": self.error, "attempts": self.attempts,
                "interrupted": self.interrupted, "lane_key": self.lane_key, "priority": self.priority,
                "steps_done": None if self.progress is None else len(self.progress)}
        if not summary:
            wire.update(self.params, result=self.result)
        return wire


@attrs.frozen
class Recovery:
    """What :meth:`Journal.recover` found.

    Attributes:
        resume: every queued row in id order (submission order), including the pool rows
            that were running and the critical ones in ``rerun``, re-queued: the daemon
            resubmits them all.
        interrupted: the critical rows that were running, now ``"interrupted"``: report
            them, never run them.
        rerun: the critical rows that were running and run again (idempotent), as they
            were found (a workflow's ``progress`` says where it resumes).
    """

    resume: List[TaskRecord]
    interrupted: List[TaskRecord]
    rerun: List[TaskRecord] = attrs.field(factory=list)


class Journal:
    """The durable record of the daemon's tasks, in one SQLite file in WAL mode.

    Every method runs one transaction and returns once it is committed. Safe to share
    between threads.

    Args:
        path: the database file. Its directory is created (mode 0700) if missing.
        retention_s: how long :meth:`prune` keeps finished rows, in seconds.
        sync: how far each commit goes before it returns (see :class:`JournalSync`).

    Raises:
        JournalError: the file cannot be opened or created, is not a Governor journal, or
            was written by a newer Governor.
    """

    def __init__(self, path: Union[str, "os.PathLike[str]"], retention_s: float = DEFAULT_RETENTION_S,
                 sync: Union[str, JournalSync] = JournalSync.NORMAL):
        if isinstance(retention_s, bool) or not isinstance(retention_s, (int, float)) \
                or math.isnan(retention_s) or retention_s <= 0:
            raise ValueError(f"retention_s must be a number of seconds > 0, got {retention_s!r}")
        self.path = os.fspath(path)
        self.retention_s = retention_s
        self.sync = JournalSync(sync)
        self._lock = threading.Lock()
        self._connection: Optional[sqlite3.Connection] = self._open()

    def _open(self) -> sqlite3.Connection:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o700, exist_ok=True)
            connection = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as error:
            raise JournalError(f"cannot open the journal {self.path!r}: {error}") from error
        try:
            self._configure(connection)
        except BaseException as error:
            connection.close()
            if isinstance(error, sqlite3.Error):
                raise JournalError(f"cannot use the journal {self.path!r}: {error}") from error
            raise
        return connection

    def _configure(self, connection: sqlite3.Connection) -> None:
        connection.row_factory = sqlite3.Row
        connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise JournalError(f"the journal {self.path!r} cannot use write-ahead logging (journal_mode "
                               f"stays {mode!r}); is it on a network filesystem?")
        # NORMAL: a commit is in the WAL file (the OS has it) when it returns, so it
        # survives the process dying (kill -9), the case the journal exists for; only a
        # power loss may lose the last commits. FULL fsyncs the WAL at every commit: a
        # power cut loses nothing acknowledged, for an fsync per commit.
        connection.execute(f"PRAGMA synchronous = {self.sync.name}")
        self._migrate(connection)

    def _migrate(self, connection: sqlite3.Connection) -> None:
        """Create the schema in a new file, bring an older journal up to date; refuse a file
        this version cannot read."""
        with self._begin(connection):
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if version == SCHEMA_VERSION:
                return
            if version > SCHEMA_VERSION:
                raise JournalError(f"the journal {self.path!r} has schema version {version}, written by a newer "
                                   f"Governor; this one reads version {SCHEMA_VERSION}")
            if version >= 1:
                _rebuild(connection)
            elif connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                raise JournalError(f"{self.path!r} is an SQLite database but not a Governor journal")
            else:
                for statement in _SCHEMA:
                    connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @staticmethod
    @contextlib.contextmanager
    def _begin(connection: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed on success, rolled back on any error."""
        # IMMEDIATE takes the write lock up front, so a transaction never fails half-way
        # because another connection started writing first.
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._begin(self._live()) as connection:
            yield connection

    def _live(self) -> sqlite3.Connection:
        if self._connection is None:
            raise JournalError(f"the journal {self.path!r} is closed")
        return self._connection

    def _select(self, sql: str, parameters: Sequence[Any] = ()) -> List[TaskRecord]:
        with self._lock:
            rows = self._live().execute(sql, parameters).fetchall()
        return [TaskRecord.from_row(row) for row in rows]

    @contextlib.contextmanager
    def group(self) -> Iterator["JournalGroup"]:
        """Many writes in one transaction (the daemon's group commit): the writes made on the
        :class:`JournalGroup` this yields are committed together when the block ends, with
        one sync, or none is (the block raised)."""
        with self._transaction() as connection:
            yield JournalGroup(connection)

    def submit(self, entries: Iterable[NewTask], at: Optional[float] = None) -> List[int]:
        """Journal new tasks, all in one transaction (see :meth:`JournalGroup.submit`)."""
        with self.group() as group:
            return group.submit(entries, at)

    def mark_started(self, task_id: int, at: Optional[float] = None) -> None:
        """Record, in a transaction of its own, that a task is being handed to a worker (see
        :meth:`JournalGroup.mark_started`)."""
        with self.group() as group:
            group.mark_started(task_id, at)

    def mark_attempt(self, task_id: int, at: Optional[float] = None) -> None:
        """Record another attempt of a running task, in a transaction of its own (see
        :meth:`JournalGroup.mark_attempt`)."""
        with self.group() as group:
            group.mark_attempt(task_id, at)

    def mark_progress(self, task_id: int, results: Sequence[Any]) -> None:
        """Record a running workflow's progress, in a transaction of its own (see
        :meth:`JournalGroup.mark_progress`)."""
        with self.group() as group:
            group.mark_progress(task_id, results)

    def mark_finished(self, task_id: int, state: Union[str, TaskState], at: Optional[float] = None,
                      result: Any = None, error: Optional[Mapping[str, Any]] = None) -> "TaskRecord":
        """Record a task's end in a transaction of its own (see :meth:`JournalGroup.mark_finished`)."""
        with self.group() as group:
            return group.mark_finished(task_id, state, at, result, error)

    def get(self, task_id: int) -> Optional[TaskRecord]:
        """The task's record, or ``None`` if there is no such task (or it was pruned)."""
        records = self._select("SELECT * FROM tasks WHERE id = ?", (task_id,))
        return records[0] if records else None

    def recent(self, limit: int = 50, states: Sequence[Union[str, TaskState]] = (),
               step: Optional[str] = None) -> List[TaskRecord]:
        """The last ``limit`` tasks submitted, newest first: of those in one of ``states``
        (any state when empty) and of ``step`` (any when ``None``)."""
        where, parameters = [], []
        if states:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            parameters += [_state_name(state) for state in states]
        if step is not None:
            where.append("step = ?")
            parameters.append(step)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        return self._select(f"SELECT * FROM tasks{clause} ORDER BY id DESC LIMIT ?", (*parameters, limit))

    def by_state(self, *states: Union[str, TaskState]) -> List[TaskRecord]:
        """Every task in one of ``states``, in id order."""
        names = [_state_name(state) for state in states]
        return self._select(f"SELECT * FROM tasks WHERE state IN ({', '.join('?' * len(names))}) ORDER BY id",
                            names) if names else []

    def recover(self, now: Optional[float] = None,
                rerun: Callable[[TaskRecord], bool] = lambda record: False) -> Recovery:
        """Settle the rows a dead daemon left running, and list the work to resume.

        Call it once, at start-up, before submitting anything. Running pool rows go back
        to ``"queued"`` (pool steps are read-only: re-running one is safe). A running
        critical row that may really have been running goes back to ``"queued"`` if
        ``rerun`` says running it again is safe, and becomes ``"interrupted"``, ended
        ``now`` and never re-run, otherwise. All are flagged ``interrupted``.

        Which critical rows may have been running, per lane key: steps of one key run one
        at a time in id order, and a step without a key runs alone, so a running row
        followed by a later running row of its key (or either without a key) had ended
        before that one started, its end lost: it ran, and is interrupted, never re-run.

        Args:
            now: the time to end interrupted rows at (default: now).
            rerun: whether a critical row found running may run again (its steps are all
                idempotent); called inside the transaction, so it must not use the journal.
        """
        now = time.time() if now is None else now
        with self._transaction() as connection:
            running = [TaskRecord.from_row(row) for row in connection.execute(
                "SELECT * FROM tasks WHERE state = ? AND lane = ? ORDER BY id", (_RUNNING, Lane.CRITICAL.value))]
            again = [record for index, record in enumerate(running)
                     if not any(_ordered_after(later, record) for later in running[index + 1:]) and rerun(record)]
            interrupted = [record for record in running if record not in again]
            connection.executemany("UPDATE tasks SET state = ?, interrupted = 1, ended_at = ? WHERE id = ?",
                                   [(INTERRUPTED, now, record.id) for record in interrupted])
            connection.executemany("UPDATE tasks SET state = ?, interrupted = 1 WHERE id = ?",
                                   [(_QUEUED, record.id) for record in again])
            connection.execute("UPDATE tasks SET state = ?, interrupted = 1 WHERE state = ? AND lane = ?",
                               (_QUEUED, _RUNNING, Lane.POOL.value))
            resume = [TaskRecord.from_row(row) for row in connection.execute(
                "SELECT * FROM tasks WHERE state = ? ORDER BY id", (_QUEUED,))]
        return Recovery(resume=resume, rerun=again, interrupted=[
            attrs.evolve(record, state=INTERRUPTED, interrupted=True, ended_at=now) for record in interrupted])

    def prune(self, now: Optional[float] = None) -> int:
        """Delete the finished rows that ended more than ``retention_s`` before ``now``.

        Returns:
            How many rows were deleted.
        """
        cutoff = (time.time() if now is None else now) - self.retention_s
        with self._transaction() as connection:
            return connection.execute(
                f"DELETE FROM tasks WHERE state IN {_sql_list(TERMINAL_STATES)} AND ended_at < ?", (cutoff,)).rowcount

    def close(self) -> None:
        """Close the database; later calls raise ``JournalError``. Idempotent."""
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _ordered_after(later: TaskRecord, earlier: TaskRecord) -> bool:
    """Whether the critical ``later`` could start only once ``earlier`` had ended: same lane
    key, or either has none (it runs alone)."""
    return later.lane_key == earlier.lane_key or later.lane_key is None or earlier.lane_key is None


class JournalGroup:
    """The writes of one :meth:`Journal.group` transaction. A write that raises changes
    nothing, and the group's other writes still commit.

    Args:
        connection: the journal's connection, inside the group's transaction.
    """

    def __init__(self, connection: sqlite3.Connection):
        self._connection = connection

    def submit(self, entries: Iterable[NewTask], at: Optional[float] = None) -> List[int]:
        """Journal new tasks as ``"queued"``.

        Args:
            entries: the tasks, in submission order.
            at: their submission time (default: now).

        Returns:
            Their ids, in the order of ``entries``.

        Raises:
            TypeError, ValueError: an entry is not a ``NewTask``, or holds values that are
                not JSON; nothing is journaled.
        """
        at = time.time() if at is None else at
        rows = []
        for entry in entries:
            if not isinstance(entry, NewTask):
                raise TypeError(f"Journal.submit takes NewTask values, not {type(entry).__name__}")
            rows.append((entry.kind, entry.step, dumps(entry.params), entry.lane.value, entry.key,
                         None if entry.limits is None else dumps(_limits_dict(entry.limits)), _QUEUED, at,
                         entry.cwd, entry.lane_key, entry.priority))
        return [self._connection.execute(
            "INSERT INTO tasks (kind, step, params, lane, key, limits, state, submitted_at, cwd, lane_key, priority) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row).lastrowid for row in rows]

    def mark_started(self, task_id: int, at: Optional[float] = None) -> None:
        """Record that a queued task is being handed to a worker: ``"running"``, one more attempt.

        For a critical task, commit it before the hand-over: once committed, a crash leaves
        the row "running", which :meth:`Journal.recover` reads as "may have run".

        Raises:
            InvalidTransition: the task does not exist or is not queued.
        """
        changed = self._connection.execute(
            "UPDATE tasks SET state = ?, started_at = ?, attempts = attempts + 1 WHERE id = ? AND state = ?",
            (_RUNNING, time.time() if at is None else at, task_id, _QUEUED)).rowcount
        if not changed:
            raise self._refused(task_id, _RUNNING)

    def mark_started_many(self, starts: Sequence[Tuple[int, float]]) -> Dict[int, str]:
        """:meth:`mark_started` for many tasks in one statement: ``starts`` holds
        ``(task id, time)`` pairs.

        Returns:
            The tasks that were not queued, each with its state then (``"no such task"``
            when there is none); the others are running.
        """
        changed = self._connection.executemany(
            "UPDATE tasks SET state = ?, started_at = ?, attempts = attempts + 1 WHERE id = ? AND state = ?",
            [(_RUNNING, at, task_id, _QUEUED) for task_id, at in starts]).rowcount
        if changed == len(starts):
            return {}
        states = {task_id: self._state_of(task_id) for task_id, _ in starts}  # rare: one by one is fine
        return {task_id: state for task_id, state in states.items() if state != _RUNNING}

    def mark_attempt(self, task_id: int, at: Optional[float] = None) -> None:
        """Record that a running task's step is handed to a worker again (a retry after a
        failed attempt, ``StepSpec.retries``): one more attempt, started ``at``.

        Raises:
            InvalidTransition: the task does not exist or is not running.
        """
        changed = self._connection.execute(
            "UPDATE tasks SET started_at = ?, attempts = attempts + 1 WHERE id = ? AND state = ?",
            (time.time() if at is None else at, task_id, _RUNNING)).rowcount
        if not changed:
            raise self._refused(task_id, _RUNNING)

    def mark_progress(self, task_id: int, results: Sequence[Any]) -> None:
        """Record a running workflow's progress as its next step starts: the results of
        the steps before it (JSON). A crash then resumes an idempotent workflow there.

        Raises:
            InvalidTransition: the task does not exist or is not running.
            TypeError, ValueError: a result is not JSON; nothing is recorded.
        """
        changed = self._connection.execute("UPDATE tasks SET progress = ? WHERE id = ? AND state = ?",
                                           (dumps(list(results)), task_id, _RUNNING)).rowcount
        if not changed:
            raise self._refused(task_id, _RUNNING)

    def mark_finished(self, task_id: int, state: Union[str, TaskState], at: Optional[float] = None,
                      result: Any = None, error: Optional[Mapping[str, Any]] = None) -> TaskRecord:
        """Record a task's end, and return its record as it now reads (the daemon answers
        with it without reading the row again).

        Args:
            task_id: the task, queued or running.
            state: a terminal state (see :data:`TERMINAL_STATES`).
            at: when it ended (default: now).
            result: its result; must be JSON (check it with ``protocol.to_json_value``).
            error: its error as ``protocol.error_to_wire`` gives it.

        Raises:
            ValueError: ``state`` is not terminal.
            TypeError, ValueError: ``result`` or ``error`` is not JSON; nothing is recorded.
            InvalidTransition: the task does not exist or has already ended.
        """
        state = _state_name(state)
        if state not in TERMINAL_STATES:
            raise ValueError(f"{state!r} is not a final state; expected one of {', '.join(sorted(TERMINAL_STATES))}")
        values = (state, time.time() if at is None else at, None if result is None else dumps(result),
                  None if error is None else dumps(error))
        rows = self._connection.execute(
            "UPDATE tasks SET state = ?, ended_at = ?, result = ?, error = ? WHERE id = ? AND state IN (?, ?) "
            "RETURNING *", values + (task_id, _QUEUED, _RUNNING)).fetchall()
        if not rows:
            raise self._refused(task_id, state)
        return TaskRecord.from_row(rows[0])

    def _state_of(self, task_id: int) -> str:
        row = self._connection.execute("SELECT state FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return "no such task" if row is None else row["state"]

    def _refused(self, task_id: int, state: str) -> InvalidTransition:
        return InvalidTransition(f"journal task {task_id}: {self._state_of(task_id)} -> {state}")
