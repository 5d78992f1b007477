"""The supervisor daemon behind ``governor serve``: a Unix socket in front of a Supervisor and a journal.

Data flow::

    client ──frame──> asyncio loop (main thread): read_message -> parse_request -> handler
                         submit: check the call -> journal.submit (durable) -> supervisor
                                 -> ack {"task_id"} (and, with wait, a final reply later)
    manager thread ──on_dispatch(task)──> journal.mark_started (durable, before the worker)
    task future done ──call_soon_threadsafe──> loop: journal.mark_finished -> waiters' replies

Only the loop thread touches connections, waiters and the live-task table; the manager
thread's one call into the daemon is the dispatch hook, which writes the journal (guarded
by its lock) and reads nothing else.

Safety:
    * the socket lives in a directory only its user can enter (0700, checked when it
      exists) and is itself 0600; every connection's peer credentials (SO_PEERCRED) are
      checked, and another uid is refused (root too, unless ``allow_root``);
    * no TCP listener for submissions; the optional metrics endpoint binds to loopback
      unless told otherwise;
    * clients name registered steps and send JSON parameters checked against the step's
      signature; nothing is imported, evaluated or unpickled from the wire;
    * one daemon per journal (an flock on ``journal + ".lock"``).

Durability: every submission is in the journal before it is acknowledged. After a crash
(kill -9) and a restart, queued tasks resume in their original order, running read-only
tasks are re-run, and running critical tasks are reported ``interrupted``, never re-run.
On SIGTERM/SIGINT the daemon stops accepting, lets running steps finish for up to
``drain_timeout_s``, leaves queued ones in the journal for the next start, and exits 0.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import importlib
import logging
import os
import signal
import socket
import stat
import struct
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import attrs

from governor import protocol
from governor.errors import GovernorError, StepCancelled
from governor.journal import Journal, NewTask, TaskRecord
from governor.supervisor import Supervisor
from governor.task import Call, Task, TaskState, WorkflowFuture

log = logging.getLogger("governor.daemon")

#: The entry-point group through which installed packages ship steps to the daemon. Each
#: entry point names a ``StepRegistry`` (its steps are included) or a callable taking the
#: daemon's registry (it registers steps on it).
ENTRY_POINT_GROUP = "governor.steps"

#: How much a connection may have waiting to be sent before the daemon gives up on it: a
#: client that stops reading must not make the daemon buffer without bound.
MAX_CLIENT_BACKLOG_BYTES = 8 << 20

#: How many clients may be connected at once; more are refused with an error.
MAX_CONNECTIONS = 256

#: How long running steps may take to finish after SIGTERM before they are cancelled
#: (they stay "running" in the journal, so the next start treats them as interrupted).
DEFAULT_DRAIN_TIMEOUT_S = 30.0

#: How often finished journal rows older than the retention are pruned.
PRUNE_INTERVAL_S = 600.0

_PEER_CREDENTIALS = struct.Struct("3i")  # pid, uid, gid


class PeerRefused(GovernorError, PermissionError):
    """A connection from a user other than the daemon's was refused."""


class DaemonError(GovernorError, RuntimeError):
    """The daemon cannot start: socket directory unsafe, another daemon running, ..."""


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


def load_registry(modules: Sequence[str] = (), entry_points: bool = True, builtin: bool = True):
    """The daemon's steps: the built-in ones, those of ``modules``, and those of installed packages.

    Args:
        builtin: start from ``steps.builtin.default_registry()`` (else from an empty one).
        modules: ``MODULE`` or ``MODULE:ATTRIBUTE`` names; the attribute (default
            ``registry``) is a ``StepRegistry`` to include or a callable to call with the
            daemon's registry.
        entry_points: also load the :data:`ENTRY_POINT_GROUP` entry points.
    """
    from governor.steps import StepRegistry
    from governor.steps.builtin import default_registry

    registry = default_registry() if builtin else StepRegistry()
    sources = [_load_attribute(name) for name in modules]
    if entry_points:
        sources += [entry.load() for entry in metadata.entry_points(group=ENTRY_POINT_GROUP)]
    for source in sources:
        if callable(getattr(source, "snapshot", None)):
            registry.include(source)
        elif callable(source):
            source(registry)
        else:
            raise DaemonError(f"a step source must be a StepRegistry or a callable, not {type(source).__name__}")
    return registry


def _load_attribute(name: str) -> Any:
    module_name, _, attribute = name.partition(":")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attribute or "registry")
    except AttributeError:
        raise DaemonError(f"module {module_name!r} has no {attribute or 'registry'!r}") from None


@attrs.frozen
class DaemonConfig:
    """How a daemon runs. Every field has a default that needs nothing installed."""

    socket_path: Path = attrs.field(factory=default_socket_path, converter=Path)
    journal_path: Path = attrs.field(factory=default_journal_path, converter=Path)
    workers: Optional[int] = None
    allow_root: bool = False
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    metrics_addr: Optional[Tuple[str, int]] = None
    retention_s: float = 7 * 24 * 3600.0
    backend: str = "loky"
    ray_address: Optional[str] = None
    sandbox: str = "auto"
    sandbox_writes: Tuple[str, ...] = attrs.field(default=(), converter=tuple)


@attrs.define(eq=False)
class _Live:
    """A journaled task the supervisor is running, and who waits for its end."""

    record_id: int
    future: concurrent.futures.Future
    waiters: List[Tuple["_Connection", Any]] = attrs.field(factory=list)


class _Connection:
    """One client connection; its replies go through here so a slow reader is noticed."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer
        self.closed = False

    def send(self, message: Dict[str, Any]) -> None:
        if self.closed:
            return
        try:
            frame = protocol.encode(message)
        except protocol.ProtocolError as too_big:
            frame = protocol.encode(protocol.error_reply(message.get("id"), too_big))
        if self.writer.transport.get_write_buffer_size() + len(frame) > MAX_CLIENT_BACKLOG_BYTES:
            log.warning("closing a client that stopped reading its replies")
            self.close()
            return
        self.writer.write(frame)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.writer.close()


class Daemon:
    """A supervisor behind a Unix socket, with a durable journal. Run it with :meth:`serve`."""

    def __init__(self, registry: Any, config: DaemonConfig):
        self._registry = registry
        self.config = config
        self._journal: Optional[Journal] = None
        self._supervisor: Optional[Supervisor] = None
        self._live: Dict[int, _Live] = {}
        self._started_records: set = set()
        self._connections: set = set()
        self._server: Optional[asyncio.AbstractServer] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stopping: Optional[asyncio.Event] = None
        self._draining = False
        self._lock_file = None

    # ----------------------------------------------------------------- life

    def serve(self) -> None:
        """Run in the foreground until SIGTERM or SIGINT; return after a clean shutdown."""
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(signum, self._stopping.set)
        await self.start()
        try:
            await self._stopping.wait()
        finally:
            await self.stop()

    def request_stop(self) -> None:
        """Ask a running daemon to stop (thread-safe)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)

    async def start(self) -> None:
        """Lock the journal, recover it, start the supervisor, resume work, then listen."""
        self._loop = self._loop or asyncio.get_running_loop()
        self._lock_journal()
        self._journal = Journal(self.config.journal_path, retention_s=self.config.retention_s)
        recovery = self._journal.recover()
        for record in recovery.interrupted:
            log.warning("task %s (%s) was running when the daemon stopped; critical, so not run again",
                        record.id, record.step, extra={"task_id": record.id, "step": record.step,
                                                        "lane": record.lane.value, "reason": "interrupted"})
        self._supervisor = Supervisor(self._registry, self.config.workers, on_dispatch=self._record_start,
                                      backend=self.config.backend, ray_address=self.config.ray_address,
                                      sandbox=self.config.sandbox, sandbox_writes=self.config.sandbox_writes)
        await self._loop.run_in_executor(None, self._supervisor.start)
        for record in recovery.resume:
            self._resubmit(record)
        if recovery.resume:
            log.info("resumed %d journaled tasks", len(recovery.resume))
        self._server = await asyncio.start_unix_server(self._serve_connection, sock=self._listen())
        if self.config.metrics_addr is not None:
            self._start_metrics_endpoint()
        self._loop.call_later(PRUNE_INTERVAL_S, self._prune)
        log.info("governor daemon listening on %s", self.config.socket_path)

    async def stop(self) -> None:
        """Stop accepting, drain running steps (bounded), keep queued ones journaled, clean up."""
        self._draining = True
        if self._server is not None:
            self._server.close()
        supervisor = self._supervisor
        if supervisor is not None:
            supervisor.shutdown(wait=False, cancel_pending=True)
            running = [asyncio.wrap_future(live.future) for live in self._live.values() if not live.future.done()]
            if running:
                await asyncio.wait(running, timeout=self.config.drain_timeout_s)
            await self._loop.run_in_executor(None, lambda: supervisor.shutdown(wait=True, cancel_running=True))
        for connection in list(self._connections):
            connection.close()
        if self._server is not None:
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.config.socket_path.unlink()
        if self._journal is not None:
            self._journal.close()
        if self._lock_file is not None:
            self._lock_file.close()
        log.info("governor daemon stopped")

    def _lock_journal(self) -> None:
        path = self.config.journal_path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Create the journal 0600 before SQLite does: it holds every task's parameters and
        # results, and SQLite gives its -wal and -shm files the database file's mode.
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
        self._lock_file = open(f"{path}.lock", "a")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            self._lock_file = None
            raise DaemonError(f"another governor daemon is using the journal {path}") from None

    def _listen(self) -> socket.socket:
        """Bind the socket in a private directory, mode 0600, replacing a stale one."""
        path = self.config.socket_path
        _ensure_private_directory(path.parent)
        if path.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # stale: its daemon is gone
            else:
                raise DaemonError(f"a daemon is already listening on {path}")
            finally:
                probe.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        previous = os.umask(0o177)  # the socket is born 0600, with no window of 0755
        try:
            listener.bind(str(path))
        finally:
            os.umask(previous)
        os.chmod(path, 0o600)
        listener.listen(128)
        listener.setblocking(False)
        return listener

    def _start_metrics_endpoint(self) -> None:
        from prometheus_client import start_http_server

        host, port = self.config.metrics_addr
        start_http_server(port, addr=host, registry=self._supervisor.prometheus_registry)
        log.info("metrics on http://%s:%s/metrics", host, port)

    def _prune(self) -> None:
        if not self._draining:
            pruned = self._journal.prune()
            if pruned:
                log.info("pruned %d finished journal rows", pruned)
            self._loop.call_later(PRUNE_INTERVAL_S, self._prune)

    # ----------------------------------------------------------------- connections

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = _Connection(writer)
        refusal = self._refusal(writer.get_extra_info("socket"))
        if refusal is not None:
            connection.send(protocol.error_reply(None, refusal))
            connection.close()
            return
        self._connections.add(connection)
        try:
            while not connection.closed:
                try:
                    message = await protocol.read_message(reader)
                except (EOFError, ConnectionError):
                    return
                except protocol.ProtocolError as broken:
                    connection.send(protocol.error_reply(None, broken))
                    if broken.code is not protocol.ErrorCode.BAD_JSON:
                        return  # the stream cannot be resynchronised
                    continue
                await self._handle(connection, message)
        finally:
            self._connections.discard(connection)
            connection.close()

    def _refusal(self, sock: socket.socket) -> Optional[BaseException]:
        if len(self._connections) >= MAX_CONNECTIONS:
            return DaemonError(f"too many clients connected ({MAX_CONNECTIONS})")
        pid, uid, _ = _PEER_CREDENTIALS.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEER_CREDENTIALS.size))
        if uid == os.getuid() or (uid == 0 and self.config.allow_root):
            return None
        log.warning("refused a connection from uid %s (pid %s)", uid, pid)
        return PeerRefused(f"this daemon serves uid {os.getuid()} only; uid {uid} was refused")

    async def _handle(self, connection: _Connection, message: Dict[str, Any]) -> None:
        request_id = protocol.request_id_of(message)
        try:
            request = protocol.parse_request(message)
            handler = getattr(self, f"_op_{request.OP}")
            reply = await handler(connection, request)
        except Exception as error:  # every failure of a request is a reply, never a crash
            if not isinstance(error, GovernorError):
                log.exception("request %r failed", request_id)
            connection.send(protocol.error_reply(request_id, error))
            return
        if reply is not None:
            connection.send(protocol.ok_reply(request_id, **reply))

    # ----------------------------------------------------------------- operations

    async def _op_ping(self, connection: _Connection, request: protocol.Ping) -> Dict[str, Any]:
        return {"pid": os.getpid(), "version": protocol.PROTOCOL_VERSION}

    async def _op_submit(self, connection: _Connection, request: protocol.Submit) -> Optional[Dict[str, Any]]:
        self._refuse_while_draining()
        call = Call(request.step, kwargs=request.params, limits=request.limits)
        lane = self._supervisor.check_call(call).lane
        [record_id] = self._journal.submit([NewTask.step_call(request.step, request.params, lane,
                                                              request.key, request.limits)])
        self._launch(record_id, self._target(request.key), lambda target: target.submit_call(
            attrs.evolve(call, tag=record_id)))
        return self._ack(connection, request, [record_id])

    async def _op_batch(self, connection: _Connection, request: protocol.Batch) -> Optional[Dict[str, Any]]:
        self._refuse_while_draining()
        calls = [Call(step_call.step, kwargs=step_call.params) for step_call in request.calls]
        lanes = [self._supervisor.check_call(call).lane for call in calls]  # all valid before any is kept
        record_ids = self._journal.submit([NewTask.step_call(call.step, call.kwargs, lane, request.key)
                                           for call, lane in zip(calls, lanes)])
        target = self._target(request.key)  # one scope for the batch: it supersedes as one view
        for record_id, call in zip(record_ids, calls):
            self._launch(record_id, target, lambda target, call=call, rid=record_id:
                         target.submit_call(attrs.evolve(call, tag=rid)))
        return self._ack(connection, request, record_ids)

    async def _op_workflow(self, connection: _Connection, request: protocol.Workflow) -> Optional[Dict[str, Any]]:
        self._refuse_while_draining()
        calls = [Call(step_call.step, kwargs=step_call.params) for step_call in request.calls]
        for call in calls:
            self._supervisor.check_call(call)
        [record_id] = self._journal.submit([NewTask.workflow([{"step": c.step, "params": c.kwargs} for c in calls])])
        self._launch(record_id, self._supervisor, lambda target: target.workflow(
            [attrs.evolve(call, tag=record_id) for call in calls]))
        return self._ack(connection, request, [record_id])

    async def _op_cancel(self, connection: _Connection, request: protocol.Cancel) -> Dict[str, Any]:
        outcome: Dict[str, List[int]] = {"cancelled": [], "finished": [], "unknown": []}
        for record_id in request.task_ids:
            live = self._live.get(record_id)
            if live is not None:
                live.future.cancel("cancelled by a client")
                outcome["cancelled"].append(record_id)
            elif self._journal.get(record_id) is not None:
                outcome["finished"].append(record_id)
            else:
                outcome["unknown"].append(record_id)
        return outcome

    async def _op_status(self, connection: _Connection, request: protocol.Status) -> Dict[str, Any]:
        if request.task_id is None:
            return {"tasks": [record.to_wire(summary=True) for record in self._journal.recent()]}
        return {"task": self._record(request.task_id).to_wire()}

    async def _op_wait(self, connection: _Connection, request: protocol.Wait) -> Optional[Dict[str, Any]]:
        record = self._record(request.task_id)
        live = self._live.get(record.id)
        if live is None:
            return {"task": record.to_wire(), "final": True}
        live.waiters.append((connection, request.id))
        if request.timeout is not None:
            self._loop.call_later(request.timeout, self._wait_expired, live, connection, request.id)
        return None

    async def _op_steps(self, connection: _Connection, request: protocol.Steps) -> Dict[str, Any]:
        return {"steps": self._supervisor.describe_steps()}

    async def _op_workers(self, connection: _Connection, request: protocol.Workers) -> Dict[str, Any]:
        return {"workers": await self._loop.run_in_executor(None, self._supervisor.describe_workers)}

    async def _op_metrics(self, connection: _Connection, request: protocol.Metrics) -> Dict[str, Any]:
        if request.format == "prometheus":
            return {"text": await self._loop.run_in_executor(None, self._supervisor.prometheus_text)}
        return {"metrics": await self._loop.run_in_executor(None, self._supervisor.metrics)}

    # ----------------------------------------------------------------- tasks

    def _refuse_while_draining(self) -> None:
        if self._draining:
            raise DaemonError("the daemon is shutting down and takes no new work")

    def _record(self, record_id: int) -> TaskRecord:
        record = self._journal.get(record_id)
        if record is None:
            raise UnknownTask(record_id)
        return record

    def _ack(self, connection: _Connection, request: Any, record_ids: List[int]) -> Dict[str, Any]:
        if request.wait:
            pending = [self._live[record_id] for record_id in record_ids if record_id in self._live]
            batch = _BatchWait(connection, request.id, record_ids, len(pending), single=request.OP != "batch")
            for live in pending:
                live.waiters.append((batch, None))
            if not pending:
                batch.complete(self)
        ids = {"task_ids": record_ids} if request.OP == "batch" else {"task_id": record_ids[0]}
        return {**ids, "final": not request.wait}

    def _target(self, key: Optional[str]) -> Any:
        """Where a request's tasks go: a scope superseding the last one with ``key``, or the supervisor."""
        return self._supervisor.scope(key=key) if key is not None else self._supervisor

    def _launch(self, record_id: int, target: Any, submit) -> None:
        """Hand a journaled task to ``target``; if that refuses it, journal the failure."""
        try:
            future = submit(target)
        except GovernorError as refused:  # QueueFull, SupervisorClosed: the row must not stay queued
            self._journal.mark_finished(record_id, TaskState.FAILED.value, error=protocol.error_to_wire(refused))
            raise
        self._live[record_id] = _Live(record_id, future)
        future.add_done_callback(lambda done: self._loop.call_soon_threadsafe(self._task_done, record_id))

    def _resubmit(self, record: TaskRecord) -> None:
        if record.kind == "workflow":
            calls = [Call(call["step"], kwargs=call["params"], tag=record.id) for call in record.params["calls"]]
            self._launch(record.id, self._supervisor, lambda target: target.workflow(calls))
        else:
            call = Call(record.step, kwargs=record.params["params"], limits=record.limits, tag=record.id)
            self._launch(record.id, self._supervisor, lambda target: target.submit_call(call))

    def _record_start(self, task: Task) -> None:
        """on_dispatch hook (manager thread): journal "running" before the step reaches a worker."""
        if task.tag is None or task.tag in self._started_records:
            return  # a workflow's later steps: its row is running already
        self._started_records.add(task.tag)
        self._journal.mark_started(task.tag)

    def _task_done(self, record_id: int) -> None:
        """Loop thread: journal a task's end and answer who waits for it."""
        live = self._live.pop(record_id)
        self._started_records.discard(record_id)
        future = live.future
        if self._draining and _cancelled_by_shutdown(future):
            return  # left queued or running in the journal: the next start takes it up
        state, result, error = _ending(future)
        self._journal.mark_finished(record_id, state, result=result, error=error)
        for waiter, request_id in live.waiters:
            if isinstance(waiter, _BatchWait):
                waiter.one_done(self)
            else:
                waiter.send(protocol.ok_reply(request_id, task=self._record(record_id).to_wire(), final=True))

    def _wait_expired(self, live: _Live, connection: _Connection, request_id: Any) -> None:
        if (connection, request_id) in live.waiters:
            live.waiters.remove((connection, request_id))
            connection.send(protocol.ok_reply(request_id, task=self._record(live.record_id).to_wire(), final=False))


class _BatchWait:
    """The final reply of a ``wait``-ing submit, batch or workflow, sent once all its tasks ended."""

    def __init__(self, connection: _Connection, request_id: Any, record_ids: List[int], pending: int, single: bool):
        self.connection, self.request_id, self.record_ids = connection, request_id, record_ids
        self.pending, self.single = pending, single

    def one_done(self, daemon: Daemon) -> None:
        self.pending -= 1
        if self.pending == 0:
            self.complete(daemon)

    def complete(self, daemon: Daemon) -> None:
        records = [daemon._record(record_id).to_wire() for record_id in self.record_ids]
        fields = {"task": records[0]} if self.single else {"tasks": records}
        self.connection.send(protocol.ok_reply(self.request_id, final=True, **fields))


class UnknownTask(GovernorError, KeyError):
    """No task with that id is in the journal (never submitted, or pruned)."""

    def __str__(self) -> str:
        return f"no task {self.args[0]} in the journal (never submitted, or pruned)"


def _cancelled_by_shutdown(future: concurrent.futures.Future) -> bool:
    if not future.cancelled():
        return False
    try:
        future.result()
    except StepCancelled as cancelled:
        return cancelled.reason == "shutdown"
    return False


def _ending(future: concurrent.futures.Future) -> Tuple[str, Any, Optional[Dict[str, Any]]]:
    """(journal state, JSON result, wire error) of a finished task or workflow future."""
    try:
        value = future.result()
    except BaseException as error:  # every way a task can end is recorded, none raised here
        state = getattr(getattr(future, "task", None), "state", None)
        if isinstance(future, WorkflowFuture):
            state = TaskState.CANCELLED if future.cancelled() else TaskState.FAILED
        return (state or TaskState.FAILED).value, None, protocol.error_to_wire(error)
    try:
        return TaskState.DONE.value, protocol.to_json_value(value), None
    except protocol.ResultNotSerialisable as unsendable:
        return TaskState.FAILED.value, None, protocol.error_to_wire(unsendable)


def _ensure_private_directory(directory: Path) -> None:
    """Create ``directory`` 0700, or check that an existing one is ours and private."""
    try:
        directory.mkdir(parents=True, mode=0o700)
    except FileExistsError:
        pass
    info = directory.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise DaemonError(f"{directory} is not a directory")
    if info.st_uid != os.getuid():
        raise DaemonError(f"{directory} belongs to uid {info.st_uid}, not to us ({os.getuid()})")
    if info.st_mode & 0o077:
        raise DaemonError(f"{directory} is open to other users (mode {stat.S_IMODE(info.st_mode):o}); "
                          "make it 0700 or choose another --socket")
