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

Start-up checks everything it can before any worker starts (:meth:`Daemon.start`, or
:func:`preflight` alone): the socket's directory, a live or stale socket, the journal's
lock, the metrics address (parsed and bound). Each failure is a :class:`DaemonError`
subclass with a one-line message, and leaves nothing behind.

Paths: a step declares which parameters name files (``StepSpec.paths``); the daemon makes
a relative path there absolute against the request's ``cwd`` (the client's working
directory) before journaling, so a step never sees the daemon's own directory.

Ids: a task's journal id is its one id: replies, status, and the ``task_id`` of its errors
(``protocol.with_task_id``) all say it. The supervisor's own task numbers stay inside.

Connections: a connection with nothing in flight (no reply owed, no task waited for) is
closed after ``idle_timeout_s`` of silence (clients reconnect on their next request); one
user may hold ``max_connections_per_uid`` at once, and the next is refused with
``TooManyClients``; whatever a connection waits for is forgotten when it closes.

Safety:
    * the socket lives in a directory only its user can enter (0700, checked when it
      exists) and is itself 0600; every connection's peer credentials (SO_PEERCRED) are
      checked, and another uid is refused (root too, unless ``allow_root``);
    * no TCP listener for submissions; the optional metrics endpoint binds to loopback
      unless told otherwise;
    * clients name registered steps and send JSON parameters checked against the step's
      signature; nothing is imported, evaluated or unpickled from the wire;
    * one daemon per journal (an flock on ``journal + ".lock"``);
    * limits a client sends are checked as ``Limits`` checks them (a typed
      ``ProtocolError`` for an absurd value), and a journaled task that can no longer
      run (its step gone, its parameters or limits now invalid) fails with
      ``TaskNotResumable`` at the next start instead of stopping it.

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
import errno
import fcntl
import importlib
import ipaddress
import logging
import os
import signal
import socket
import stat
import struct
import threading
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import attrs

from governor import protocol
from governor.errors import GovernorError, StepCancelled, TaskNotResumable, TooManyClients, UnknownTask
from governor.service.journal import Journal, NewTask, TaskRecord
from governor.limits import Lane
from governor.service.live import HttpConfig, LiveModel
from governor.paths import default_journal_path, default_socket_path
from governor.engine.supervisor import Supervisor
from governor.task import Call, Task, TaskState, WorkflowFuture

log = logging.getLogger("governor.service.daemon")

#: The entry-point group through which installed packages ship steps to the daemon. Each
#: entry point names a ``StepRegistry`` (its steps are included) or a callable taking the
#: daemon's registry (it registers steps on it).
ENTRY_POINT_GROUP = "governor.steps"

#: How much a connection may have waiting to be sent before the daemon gives up on it: a
#: client that stops reading must not make the daemon buffer without bound.
MAX_CLIENT_BACKLOG_BYTES = 8 << 20

#: How many connections one user may hold open at once; the next is refused with
#: ``TooManyClients``. The peer check already limits clients to the daemon's own user (and
#: root, if allowed), so this bounds what one runaway program can hold; the idle timeout
#: frees what it leaked.
DEFAULT_MAX_CONNECTIONS_PER_UID = 256

#: How long a connection with nothing in flight may stay silent before it is closed. Long
#: enough for a program that keeps a client between bursts of work (it reconnects on its
#: next request anyway); short enough that leaked connections free their slots in minutes.
DEFAULT_IDLE_TIMEOUT_S = 300.0

#: How long running steps may take to finish after SIGTERM before they are cancelled
#: (they stay "running" in the journal, so the next start treats them as interrupted).
DEFAULT_DRAIN_TIMEOUT_S = 30.0

#: How often finished journal rows older than the retention are pruned.
PRUNE_INTERVAL_S = 600.0

#: Where ``--metrics-addr PORT`` listens: loopback, since the figures name steps and hosts.
DEFAULT_METRICS_HOST = "127.0.0.1"

_PEER_CREDENTIALS = struct.Struct("3i")  # pid, uid, gid


class PeerRefused(GovernorError, PermissionError):
    """A connection from a user other than the daemon's was refused."""


class DaemonError(GovernorError, RuntimeError):
    """The daemon cannot start: socket directory unsafe, another daemon running, ...

    Each cause has its own subclass, so a command can give each its own exit code; the
    message is one line for a person.
    """


class SocketDirectoryUnsafe(DaemonError):
    """The socket's directory is not a private directory of ours (or cannot be made one)."""


class DaemonAlreadyRunning(DaemonError):
    """A daemon already answers on the socket, or something other than a socket is there."""


class JournalLocked(DaemonError):
    """Another daemon holds the journal's lock."""


class MetricsAddressInvalid(DaemonError, ValueError):
    """``--metrics-addr`` is not ``PORT``, ``HOST:PORT`` or ``[IPV6]:PORT``."""


class MetricsAddressUnavailable(DaemonError):
    """The metrics address cannot be served: in use, not ours, or an unknown host."""


def parse_metrics_addr(text: str) -> Tuple[str, int]:
    """``(host, port)`` of a metrics address.

    Forms: ``PORT`` (on 127.0.0.1), ``HOST:PORT``, ``IPV4:PORT`` and ``[IPV6]:PORT``
    (e.g. ``[::1]:9468``). The port is 1-65535.

    Raises:
        MetricsAddressInvalid: any other text, saying which form was expected.
    """
    expected = "expected PORT, HOST:PORT or [IPV6]:PORT (e.g. 127.0.0.1:9464 or [::1]:9464)"
    text = text.strip()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise MetricsAddressInvalid(f"metrics address {text!r}: {expected}")
        port = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise MetricsAddressInvalid(f"metrics address {text!r}: {host!r} is not an IPv6 address") from None
    elif ":" in text:
        host, _, port = text.rpartition(":")
        if ":" in host:
            raise MetricsAddressInvalid(f"metrics address {text!r}: put an IPv6 address in brackets, "
                                        f"e.g. [{host}]:{port}")
    else:
        host, port = DEFAULT_METRICS_HOST, text
    if not host:
        raise MetricsAddressInvalid(f"metrics address {text!r}: name the host ({DEFAULT_METRICS_HOST}:{port}, "
                                    f"or 0.0.0.0:{port} for every interface)")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise MetricsAddressInvalid(f"metrics address {text!r}: the port must be a number from 1 to 65535; {expected}")
    return host, int(port)


def _metrics_addr(value: Union[None, str, Tuple[str, int]]) -> Optional[Tuple[str, int]]:
    if value is None or isinstance(value, tuple):
        return value
    return parse_metrics_addr(value)


def _show_addr(addr: Tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
    """How a daemon runs. Every field has a default that needs nothing installed.

    ``metrics_addr`` takes ``(host, port)`` or any text :func:`parse_metrics_addr` reads.
    """

    socket_path: Path = attrs.field(factory=default_socket_path, converter=Path)
    journal_path: Path = attrs.field(factory=default_journal_path, converter=Path)
    workers: Optional[int] = None
    allow_root: bool = False
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    metrics_addr: Optional[Tuple[str, int]] = attrs.field(default=None, converter=_metrics_addr)
    retention_s: float = 7 * 24 * 3600.0
    backend: str = "loky"
    ray_address: Optional[str] = None
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    max_connections_per_uid: int = DEFAULT_MAX_CONNECTIONS_PER_UID
    http: Optional[HttpConfig] = None  # the live status page (issue 15); off when None
    sandbox: str = "auto"
    sandbox_writes: Tuple[str, ...] = attrs.field(default=(), converter=tuple)


# --------------------------------------------------------------------------- start-up checks

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


class JournalLock:
    """The flock on ``journal + ".lock"`` that makes a daemon the journal's only user."""

    def __init__(self, journal_path: Path):
        path = Path(journal_path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Create the journal 0600 before SQLite does: it holds every task's parameters
            # and results, and SQLite gives its -wal and -shm files the database file's mode.
            os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
            self._file = open(f"{path}.lock", "a")
        except OSError as error:
            raise JournalLocked(f"cannot open the journal {path}: {error.strerror or error}") from None
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise JournalLocked(f"another governor daemon is using the journal {path}") from None

    def release(self) -> None:
        """Release the lock (closing the file releases the flock)."""
        self._file.close()


def check_metrics_addr(addr: Tuple[str, int]) -> None:
    """Check that the metrics address resolves and can be bound now.

    Raises:
        MetricsAddressUnavailable: an unknown host, an address not on this machine, or a
            port in use or not ours to bind.
    """
    server = _bind_metrics_socket(addr)
    server.close()


def _bind_metrics_socket(addr: Tuple[str, int]) -> socket.socket:
    host, port = addr
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        raise MetricsAddressUnavailable(f"cannot serve metrics on {_show_addr(addr)}: {error.strerror}") from None
    server = socket.socket(family, kind, proto)
    try:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP server will
        server.bind(sockaddr)
    except OSError as error:
        server.close()
        raise MetricsAddressUnavailable(f"cannot serve metrics on {_show_addr(addr)}: "
                                        f"{error.strerror or errno.errorcode.get(error.errno, error)}") from None
    return server


def preflight(config: DaemonConfig) -> None:
    """Every start-up check that needs no worker, in the order :meth:`Daemon.start` makes them.

    For a command that wants to fail fast; :meth:`Daemon.start` makes the same checks
    again (holding what it checked), so calling this is optional. Leaves nothing behind
    but the journal's directory, lock file and empty database.

    Raises:
        SocketDirectoryUnsafe, DaemonAlreadyRunning, JournalLocked,
        MetricsAddressUnavailable: the first check that fails.
    """
    check_socket_directory(config.socket_path)
    check_socket_free(config.socket_path)
    JournalLock(config.journal_path).release()
    if config.metrics_addr is not None:
        check_metrics_addr(config.metrics_addr)


# --------------------------------------------------------------------------- the daemon

@attrs.frozen
class DaemonStatistics:
    """A snapshot of the daemon's own state (the ``daemon`` part of the ``metrics`` reply).

    Attributes:
        connections: client connections open now.
        waiters: registrations of clients waiting for running tasks to end.
        live_tasks: journaled tasks the supervisor has not finished.
    """

    connections: int
    waiters: int
    live_tasks: int


@attrs.define(eq=False)
class _Live:
    """A journaled task the supervisor is running, and who waits for its end."""

    record_id: int
    future: concurrent.futures.Future
    waiters: List["_Waiter"] = attrs.field(factory=list)
    end_journaled: bool = False  # claimed under Daemon._ends_lock: the end is written once


class _Connection:
    """One client connection: its replies, what it waits for, and its idle timer (loop thread only)."""

    def __init__(self, writer: asyncio.StreamWriter, uid: Optional[int], idle_timeout_s: float):
        self.writer = writer
        self.uid = uid
        self.closed = False
        self.waiters: set = set()
        self._idle_timeout_s = idle_timeout_s
        self._idle_timer: Optional[asyncio.TimerHandle] = None

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

    def busy(self) -> None:
        """A request arrived: the connection is not idle."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def settle(self) -> None:
        """Start the idle clock if nothing is in flight any more."""
        if self.closed or self.waiters:
            return
        self.busy()
        self._idle_timer = asyncio.get_running_loop().call_later(self._idle_timeout_s, self._idle)

    def _idle(self) -> None:
        log.debug("closing a client connection idle for %ss", self._idle_timeout_s)
        self.close()

    def close(self) -> None:
        """Close, and forget every wait made on this connection."""
        if self.closed:
            return
        self.closed = True
        self.busy()
        for waiter in list(self.waiters):
            waiter.detach()
        self.writer.close()


class _Waiter:
    """A reply owed on one connection once tasks end: a ``wait``, or a waiting submit, batch or workflow.

    Args:
        single: the reply carries ``task`` (one record), else ``tasks``.
    """

    def __init__(self, connection: _Connection, request_id: Any, record_ids: List[int], single: bool):
        self.connection, self.request_id, self.record_ids, self.single = connection, request_id, record_ids, single
        self._lives: List[_Live] = []
        self._timer: Optional[asyncio.TimerHandle] = None

    def attach(self, daemon: "Daemon", lives: List[_Live], timeout: Optional[float] = None) -> None:
        """Wait for ``lives`` (reply at once when there are none), for at most ``timeout`` seconds."""
        if not lives:
            self.reply(daemon, final=True)
            return
        self._lives = list(lives)
        for live in lives:
            live.waiters.append(self)
        self.connection.waiters.add(self)
        self.connection.busy()
        if timeout is not None:
            self._timer = asyncio.get_running_loop().call_later(timeout, self.reply, daemon, False)

    def one_done(self, daemon: "Daemon", live: _Live) -> None:
        self._lives.remove(live)
        if not self._lives:
            self.reply(daemon, final=True)

    def reply(self, daemon: "Daemon", final: bool) -> None:
        self.detach()
        records = [daemon._record(record_id).to_wire() for record_id in self.record_ids]
        fields = {"task": records[0]} if self.single else {"tasks": records}
        self.connection.send(protocol.ok_reply(self.request_id, final=final, **fields))

    def detach(self) -> None:
        """Stop waiting (answered, timed out, or the connection closed)."""
        for live in self._lives:
            live.waiters.remove(self)
        self._lives = []
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.connection.waiters.discard(self)
        self.connection.settle()


class Daemon:
    """A supervisor behind a Unix socket, with a durable journal. Run it with :meth:`serve`."""

    def __init__(self, registry: Any, config: DaemonConfig):
        self._registry = registry
        self.config = config
        self._journal: Optional[Journal] = None
        self._supervisor: Optional[Supervisor] = None
        self._live: Dict[int, _Live] = {}
        self._started_records: set = set()
        self._last_critical: Optional[int] = None  # the record of the critical step last started
        self._ends_lock = threading.Lock()  # _journal_end runs on the manager and the loop thread
        self._connections: set = set()
        self._server: Optional[asyncio.AbstractServer] = None
        self._metrics_server: Any = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stopping: Optional[asyncio.Event] = None
        self._draining = False
        self._lock: Optional[JournalLock] = None
        self._listening = False  # the socket file is ours to remove
        self.live = LiveModel()  # issue 15: what `governor top` and the status page show
        self.status_page = None  # a governor.service.web.StatusPage while --http-addr serves one

    # ----------------------------------------------------------------- life

    def serve(self) -> None:
        """Run in the foreground until SIGTERM or SIGINT; return after a clean shutdown.

        Raises:
            DaemonError: a start-up check failed (see :func:`preflight`); nothing was
                started and nothing is left behind.
        """
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
        """Check and take the socket, journal and metrics address; then start workers, resume, listen.

        Raises:
            DaemonError: a check failed; whatever this call had taken is released.
        """
        self._loop = self._loop or asyncio.get_running_loop()
        try:
            await self._start()
        except BaseException:
            await self._release()
            raise

    async def _start(self) -> None:
        config = self.config
        check_socket_directory(config.socket_path)
        check_socket_free(config.socket_path)
        self._lock = JournalLock(config.journal_path)
        self._journal = Journal(config.journal_path, retention_s=config.retention_s)
        self._supervisor = Supervisor(self._registry, config.workers, on_dispatch=self._record_start,
                                      backend=config.backend, ray_address=config.ray_address,
                                      sandbox=config.sandbox, sandbox_writes=config.sandbox_writes,
                                      wrap_step_errors=True)  # the wire rebuilds StepFailed, not any type
        if config.metrics_addr is not None:
            self._start_metrics_endpoint()
        listener = self._listen()  # the last check: bound before any worker starts
        try:
            await self._loop.run_in_executor(None, self._supervisor.start)
        except BaseException:
            listener.close()
            raise
        recovery = self._journal.recover()
        for record in recovery.interrupted:
            log.warning("task %s (%s) was running when the daemon stopped; critical, so not run again",
                        record.id, record.step, extra={"task_id": record.id, "step": record.step,
                                                        "lane": record.lane.value, "reason": "interrupted"})
        for record in recovery.resume:
            self._resume(record)
        if recovery.resume:
            log.info("resumed %d journaled tasks", len(recovery.resume))
        self._server = await asyncio.start_unix_server(self._serve_connection, sock=listener)
        if config.http is not None:  # imported here: aiohttp is the live extra's
            from governor.service.web import StatusPage
            self.status_page = await StatusPage.start(self, config.http)  # a failure: start() releases all
        self._loop.call_later(PRUNE_INTERVAL_S, self._prune)
        log.info("governor daemon listening on %s", config.socket_path)

    async def stop(self) -> None:
        """Stop accepting, drain running steps (bounded), keep queued ones journaled, clean up."""
        self._draining = True
        if self._server is not None:
            self._server.close()
        status_page, self.status_page = self.status_page, None
        if status_page is not None:
            await status_page.stop()
        supervisor = self._supervisor
        if supervisor is not None:
            supervisor.shutdown(wait=False, cancel_futures=True)
            running = [asyncio.wrap_future(live.future) for live in self._live.values() if not live.future.done()]
            if running:
                await asyncio.wait(running, timeout=self.config.drain_timeout_s)
        for connection in list(self._connections):
            connection.close()
        if self._server is not None:
            await self._server.wait_closed()
        await self._release()
        log.info("governor daemon stopped")

    async def _release(self) -> None:
        """Give back everything :meth:`start` took, whichever part of it ran."""
        status_page, self.status_page = self.status_page, None
        if status_page is not None:
            await status_page.stop()
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            await self._loop.run_in_executor(None, lambda: supervisor.shutdown(wait=True, cancel_running=True))
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        if self._listening:
            with contextlib.suppress(FileNotFoundError):
                self.config.socket_path.unlink()
            self._listening = False
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    _listening = False

    def _listen(self) -> socket.socket:
        """Bind the socket in a private directory, mode 0600, replacing a stale one."""
        path = self.config.socket_path
        _ensure_private_directory(path.parent)
        if check_socket_free(path):
            path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        previous = os.umask(0o177)  # the socket is born 0600, with no window of 0755
        try:
            listener.bind(str(path))
        except OSError as error:
            listener.close()
            raise DaemonAlreadyRunning(f"cannot listen on {path}: {error.strerror or error}") from None
        finally:
            os.umask(previous)
        self._listening = True
        os.chmod(path, 0o600)
        listener.listen(128)
        listener.setblocking(False)
        return listener

    def _start_metrics_endpoint(self) -> None:
        from prometheus_client import start_http_server

        addr = self.config.metrics_addr
        _bind_metrics_socket(addr).close()  # a typed, one-line error for what the server would raise
        try:
            self._metrics_server, _ = start_http_server(addr[1], addr=addr[0],
                                                        registry=self._supervisor.prometheus_registry)
        except OSError as error:  # lost a race for the port since the check
            raise MetricsAddressUnavailable(f"cannot serve metrics on {_show_addr(addr)}: "
                                            f"{error.strerror or error}") from None
        log.info("metrics on http://%s/metrics", _show_addr(addr))

    def _prune(self) -> None:
        if not self._draining:
            pruned = self._journal.prune()
            if pruned:
                log.info("pruned %d finished journal rows", pruned)
            self._loop.call_later(PRUNE_INTERVAL_S, self._prune)

    def statistics(self) -> DaemonStatistics:
        """The daemon's own figures, now (loop thread)."""
        return DaemonStatistics(connections=len(self._connections),
                                waiters=sum(len(live.waiters) for live in self._live.values()),
                                live_tasks=len(self._live))

    # ----------------------------------------------------------------- connections

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        uid, refusal = self._admit(writer.get_extra_info("socket"))
        connection = _Connection(writer, uid, self.config.idle_timeout_s)
        if refusal is not None:
            connection.send(protocol.error_reply(None, refusal))
            connection.close()
            return
        self._connections.add(connection)
        connection.settle()
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
                connection.busy()
                await self._handle(connection, message)
                connection.settle()
        finally:
            self._connections.discard(connection)
            connection.close()

    def _admit(self, sock: socket.socket) -> Tuple[Optional[int], Optional[BaseException]]:
        """The peer's uid, and why it is refused (``None``: admitted)."""
        pid, uid, _ = _PEER_CREDENTIALS.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEER_CREDENTIALS.size))
        if not (uid == os.getuid() or (uid == 0 and self.config.allow_root)):
            log.warning("refused a connection from uid %s (pid %s)", uid, pid)
            return uid, PeerRefused(f"this daemon serves uid {os.getuid()} only; uid {uid} was refused")
        limit = self.config.max_connections_per_uid
        if sum(1 for connection in self._connections if connection.uid == uid) >= limit:
            log.warning("refused a connection from pid %s: uid %s has %s open", pid, uid, limit)
            return uid, TooManyClients(limit)
        return uid, None

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

    async def _op_submit(self, connection: _Connection, request: protocol.Submit) -> None:
        self._refuse_while_draining()
        call, lane = self._checked(request.step, request.params, request.cwd, request.limits)
        [record_id] = self._journal.submit([NewTask.step_call(call.step, call.kwargs, lane,
                                                              request.key, request.limits)])
        self._launch(record_id, self._target(request.key), lambda target: target.submit_call(
            attrs.evolve(call, ref=record_id)))
        self._acknowledge(connection, request, [record_id])

    async def _op_batch(self, connection: _Connection, request: protocol.Batch) -> None:
        self._refuse_while_draining()
        checked = [self._checked(c.step, c.params, request.cwd) for c in request.calls]  # all, before any is kept
        record_ids = self._journal.submit([NewTask.step_call(call.step, call.kwargs, lane, request.key)
                                           for call, lane in checked])
        target = self._target(request.key)  # one scope for the batch: it supersedes as one view
        for record_id, (call, _) in zip(record_ids, checked):
            self._launch(record_id, target, lambda target, call=call, rid=record_id:
                         target.submit_call(attrs.evolve(call, ref=rid)))
        self._acknowledge(connection, request, record_ids)

    async def _op_workflow(self, connection: _Connection, request: protocol.WorkflowRequest) -> None:
        self._refuse_while_draining()
        calls = [self._checked(c.step, c.params, request.cwd)[0] for c in request.calls]
        [record_id] = self._journal.submit([NewTask.workflow([{"step": c.step, "params": c.kwargs} for c in calls])])
        self._launch(record_id, self._supervisor, lambda target: target.workflow(
            [attrs.evolve(call, ref=record_id) for call in calls]))
        self._acknowledge(connection, request, [record_id])

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
            return {"tasks": [record.to_wire(summary=True) for record in
                              self._journal.recent(request.limit, request.states or (), request.step)]}
        return {"task": self._record(request.task_id).to_wire()}

    async def _op_wait(self, connection: _Connection, request: protocol.Wait) -> None:
        record = self._record(request.task_id)
        live = self._live.get(record.id)
        _Waiter(connection, request.id, [record.id], single=True).attach(
            self, [live] if live is not None else [], request.timeout)

    async def _op_steps(self, connection: _Connection, request: protocol.Steps) -> Dict[str, Any]:
        return {"steps": self._supervisor.describe_steps()}

    async def _op_workers(self, connection: _Connection, request: protocol.Workers) -> Dict[str, Any]:
        return {"workers": await self._loop.run_in_executor(None, self._supervisor.describe_workers)}

    async def _op_metrics(self, connection: _Connection, request: protocol.Metrics) -> Dict[str, Any]:
        if request.format == "prometheus":
            return {"text": await self._loop.run_in_executor(None, self._supervisor.prometheus_text)}
        metrics = await self._loop.run_in_executor(None, self._supervisor.metrics)
        return {"metrics": {**metrics, "daemon": attrs.asdict(self.statistics())}}

    async def _op_live(self, connection: Optional[_Connection], request: protocol.Live) -> Dict[str, Any]:
        return {"live": await self.live_snapshot()}

    async def live_snapshot(self) -> Dict[str, Any]:
        """The live picture (``governor.service.live``), for ``governor top`` and the status page."""
        return await self.live.snapshot(self._supervisor, self._journal)

    async def prometheus_text(self) -> str:
        """The supervisor's figures in the Prometheus text format (the status page's /metrics)."""
        return await self._loop.run_in_executor(None, self._supervisor.prometheus_text)

    async def cancel_tasks(self, task_ids: Sequence[int]) -> Dict[str, List[int]]:
        """Cancel tasks as the ``cancel`` op does (the status page's cancel button)."""
        return await self._op_cancel(None, protocol.Cancel(0, task_ids=tuple(task_ids)))

    # ----------------------------------------------------------------- tasks

    def _refuse_while_draining(self) -> None:
        if self._draining:
            raise DaemonError("the daemon is shutting down and takes no new work")

    def _checked(self, step: str, params: Dict[str, Any], cwd: Optional[str],
                 limits: Optional[Any] = None) -> Tuple[Call, Any]:
        """``(call, lane)`` for a step call, its relative paths made absolute against ``cwd``.

        Raises:
            UnknownStep, InvalidParameters: as the supervisor would at submit (and a
                relative path with no ``cwd``).
        """
        call = Call(step, kwargs=params, limits=limits)
        route = self._supervisor.check_call(call)
        return attrs.evolve(call, kwargs=route.spec.resolve_paths(call.kwargs, cwd)), route.lane

    def _record(self, record_id: int) -> TaskRecord:
        record = self._journal.get(record_id)
        if record is None:
            raise UnknownTask(record_id)
        return record

    def _acknowledge(self, connection: _Connection, request: Any, record_ids: List[int]) -> None:
        """Send a submission's ids; with ``wait``, owe the final reply once its tasks end."""
        ids = {"task_ids": record_ids} if request.OP == "batch" else {"task_id": record_ids[0]}
        connection.send(protocol.ok_reply(request.id, final=not request.wait, **ids))
        if request.wait:
            lives = [self._live[record_id] for record_id in record_ids if record_id in self._live]
            _Waiter(connection, request.id, record_ids, single=request.OP != "batch").attach(self, lives)

    def _target(self, key: Optional[str]) -> Any:
        """Where a request's tasks go: a scope superseding the last one with ``key``, or the supervisor."""
        return self._supervisor.scope(key=key) if key is not None else self._supervisor

    def _launch(self, record_id: int, target: Any, submit: Callable[[Any], concurrent.futures.Future]) -> None:
        """Hand a journaled task to ``target``; if that refuses it, journal the failure."""
        try:
            future = submit(target)
        except GovernorError as refused:  # QueueFull, SupervisorClosed: the row must not stay queued
            self._journal.mark_finished(record_id, TaskState.FAILED.value, error=protocol.error_to_wire(refused))
            raise
        self._live[record_id] = _Live(record_id, future)
        future.add_done_callback(lambda done: self._loop.call_soon_threadsafe(self._task_done, record_id))

    def _resume(self, record: TaskRecord) -> None:
        """Run a journaled task again, or fail it with ``TaskNotResumable`` when it can no longer run."""
        try:
            if record.kind == "workflow":
                calls = [self._resumable(Call(call["step"], kwargs=call["params"], ref=record.id))
                         for call in record.params["calls"]]
                self._launch(record.id, self._supervisor, lambda target: target.workflow(calls))
            else:
                call = self._resumable(Call(record.step, kwargs=record.params["params"],
                                            limits=record.own_limits(), ref=record.id))
                self._launch(record.id, self._supervisor, lambda target: target.submit_call(call))
        except (GovernorError, ValueError, TypeError) as cause:
            if self._journal.get(record.id).terminal:
                return  # _launch journaled the refusal (QueueFull) already
            error = TaskNotResumable(record.id, record.step, str(cause))
            log.error("%s", error, extra={"task_id": record.id, "step": record.step, "lane": record.lane.value,
                                          "reason": "not_resumable"})
            self._journal.mark_finished(record.id, TaskState.FAILED.value, error=protocol.error_to_wire(error))

    def _resumable(self, call: Call) -> Call:
        self._supervisor.check_call(call)
        return call

    def _record_start(self, task: Task) -> None:
        """on_dispatch hook (manager thread): journal "running" before the step reaches a worker.

        A critical step's start first journals the end of the critical record before it
        (the manager has resolved its future by now), so the journal never holds two
        critical rows "running": after a crash, only the step that was really running
        reads as interrupted.
        """
        if task.ref is None or task.ref in self._started_records:
            return  # a workflow's later steps: its row is running already
        if task.lane is Lane.CRITICAL:
            previous, self._last_critical = self._last_critical, task.ref
            live = self._live.get(previous) if previous is not None else None
            if live is not None and live.future.done():
                self._journal_end(live)
        self._started_records.add(task.ref)
        self._journal.mark_started(task.ref)

    def _journal_end(self, live: _Live) -> None:
        """Journal a finished record's end, once (the manager or the loop thread, whichever is first)."""
        # The write happens under the lock: the loop thread answers the record's waiters
        # from the journal right after this returns, so it must not pass a write in flight.
        with self._ends_lock:
            if live.end_journaled:
                return
            live.end_journaled = True
            record_id, future = live.record_id, live.future
            if self._draining and _cancelled_by_shutdown(future):
                return  # left queued or running in the journal: the next start takes it up
            state, result, error = _ending(future)
            self._journal.mark_finished(record_id, state, result=result,
                                        error=None if error is None else protocol.with_task_id(error, record_id))

    def _task_done(self, record_id: int) -> None:
        """Loop thread: journal a task's end and answer who waits for it."""
        live = self._live.pop(record_id)
        self._started_records.discard(record_id)
        future = live.future
        self.live.task_ended(record_id, future)
        if self._draining and _cancelled_by_shutdown(future):
            return  # left queued or running in the journal: the next start takes it up
        self._journal_end(live)
        for waiter in list(live.waiters):
            waiter.one_done(self, live)


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
    except OSError as error:
        raise SocketDirectoryUnsafe(f"cannot create the socket directory {directory}: {error.strerror}") from None
    check_socket_directory(directory / "governor.sock")
