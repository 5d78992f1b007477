"""The supervisor daemon behind ``governor serve``: a Unix socket in front of a Supervisor and a journal.

Data flow::

    client ──frames──> asyncio loop (main thread): every whole frame read -> a handler task
                       (``governor.service.connections``: pipelined, bounded per connection)
                         submit: check the call -> group commit (durable) -> supervisor
                                 -> ack {"task_id"} (and, with wait, a final reply later;
                                    a waiting submit with ack: false gets the final reply only)
    manager thread ──on_dispatch(task)──> critical: journal.mark_started (durable, before the worker)
                                      └─> pool: write_later -> the loop's next group commit
    task future done ──EndInbox (one loop wake-up for every end since the last turn)──>
                       loop: group commit of the ends -> waiters' replies

The group commit (``governor.service.group_commit``) writes what one turn of the loop
brought (submissions, pool starts, ends) in one transaction, and only then acknowledges the
submissions and answers the waiters.

Only the loop thread touches connections and waiters, and only it adds to or removes from
the in-flight table. The manager thread's one call into the daemon is the dispatch hook,
``governor.service.starts.StartJournal``: for a critical step it commits the start (under
the journal's lock) and first the ends of the critical tasks of its key before it, reading
their in-flight entries (that module says how the two threads write an end once).

Start-up checks everything it can before any worker starts (:meth:`Daemon.start`, or
:func:`preflight` alone): the socket's directory, a live or stale socket, the journal's
lock, the metrics address (parsed and bound). Each failure is a :class:`DaemonError`
subclass with a one-line message, and leaves nothing behind.

Paths: a step declares which parameters name files (``StepSpec.paths``); the daemon makes
a relative path there absolute against the request's ``cwd`` (the client's working
directory) before journaling, and the task runs in ``cwd`` (journaled with it, so a task
resumed after a restart does too): a step never sees the daemon's own directory.

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

Durability: every submission is in the journal before it is acknowledged (as durable as
``--journal-sync`` says: ``governor.service.journal.JournalSync``). After a crash
(kill -9) and a restart, queued tasks resume in their original order, running read-only
tasks are re-run, running critical tasks whose steps are all declared idempotent are run
again (a workflow from the step that was running), and other running critical tasks are
reported ``interrupted``, never re-run.
On SIGTERM/SIGINT the daemon stops accepting, lets running steps finish for up to
``drain_timeout_s``, leaves queued ones in the journal for the next start, and exits 0.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
import signal
import socket
import struct
from typing import Any, Awaitable, Callable, Dict, List, Optional, Sequence, Tuple

import attrs

from governor import protocol
from governor.engine.routes import workflow_key
from governor.engine.supervisor import Supervisor
from governor.errors import (DaemonAlreadyRunning, DaemonError, GovernorError, JournalLost, PeerRefused, TaskNotResumable, TooManyClients, UnknownTask)
from governor.service.config import DaemonConfig, show_addr
from governor.service.connections import READ_CHUNK_BYTES, Connection, InFlight, Waiter
from governor.service.ends import EndInbox
from governor.service.group_commit import GroupCommit
from governor.service.journal import Journal, NewTask, TaskRecord
from governor.service.live import LiveModel
from governor.service.metrics_http import MetricsEndpoint
from governor.service.starts import StartJournal, cancelled_by_shutdown
from governor.service.preflight import (JournalLock, bind_metrics_socket, check_socket_directory, check_socket_free,
                                        ensure_private_directory)
from governor.task import Call, TaskState

log = logging.getLogger("governor.service.daemon")


#: How often finished journal rows older than the retention are pruned.
PRUNE_INTERVAL_S = 600.0

_PEER_CREDENTIALS = struct.Struct("3i")  # pid, uid, gid


@attrs.frozen
class DaemonStatistics:
    """A snapshot of the daemon's own state (the ``daemon`` part of the ``metrics`` reply).

    Attributes:
        connections: client connections open now.
        requests_in_flight: requests read and being handled now, over every connection
            (each connection has at most ``connections.MAX_REQUESTS_IN_FLIGHT``).
        waiters: registrations of clients waiting for running tasks to end.
        live_tasks: journaled tasks the supervisor has not finished.
        journal_commits: transactions the loop's group commit has committed (each holds
            every submission, pool start and end of one turn of the loop).
    """

    connections: int
    requests_in_flight: int
    waiters: int
    live_tasks: int
    journal_commits: int


def _held_key(key: Optional[str], target: Any) -> Optional[str]:
    """The supersede key a submission to ``target`` holds while it waits: none if it has no
    key, or came late and was superseded on arrival."""
    return key if key is not None and not target.cancelled else None


class Daemon:
    """A supervisor behind a Unix socket, with a durable journal. Run it with :meth:`serve`."""

    def __init__(self, registry: Any, config: DaemonConfig):
        self._registry = registry
        self.config = config
        self._journal: Optional[Journal] = None
        self._commits: Optional[GroupCommit] = None  # the loop's writes to the journal, a transaction a turn
        self._ends: Optional[EndInbox] = None  # task ends, from the manager thread to the loop in bulk
        self._supervisor: Optional[Supervisor] = None
        self._in_flight: Dict[int, InFlight] = {}
        self._starts: Optional[StartJournal] = None  # the on_dispatch hook: what a start journals
        self.key_holders: Dict[str, Waiter] = {}  # supersede key -> the submission waiting under it
        self._connections: set = set()
        self._server: Optional[asyncio.AbstractServer] = None
        self._metrics_server: Optional[MetricsEndpoint] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stopping: Optional[asyncio.Event] = None
        self._draining = False
        self._lock: Optional[JournalLock] = None
        self._journal_lost = False  # said so in the log once
        self._listening = False  # the socket file is ours to remove
        self._live_model = LiveModel()  # issue 15: what `governor top` and the status page show
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
        self._journal = Journal(config.journal_path, retention_s=config.retention_s, sync=config.journal_sync)
        self._commits = GroupCommit(self._journal, self._loop)
        self._ends = EndInbox(self._loop, self._task_done)
        self._starts = StartJournal(self._journal, self._commits, self._in_flight.get, lambda: self._draining,
                                    keyed=config.critical_workers > 1)
        self._supervisor = Supervisor(self._registry, config.workers, critical_workers=config.critical_workers,
                                      on_dispatch=self._starts.record,
                                      backend=config.backend, ray_address=config.ray_address,
                                      sandbox=config.sandbox, sandbox_writes=config.sandbox_writes,
                                      wrap_step_errors=True,  # the wire rebuilds StepFailed, not any type
                                      **config.initializer_options())
        if config.metrics_addr is not None:
            await self._start_metrics_endpoint()
        listener = self._listen()  # the last check: bound before any worker starts
        try:
            await self._loop.run_in_executor(None, self._supervisor.start)
        except BaseException:
            listener.close()
            raise
        recovery = self._journal.recover(rerun=self._idempotent)
        for record in recovery.interrupted:
            log.warning("task %s (%s) was running when the daemon stopped; critical, so not run again",
                        record.id, record.step, extra={"task_id": record.id, "step": record.step,
                                                        "lane": record.lane.value, "reason": "interrupted"})
        for record in recovery.rerun:
            log.warning("task %s (%s) was running when the daemon stopped; idempotent, so run again",
                        record.id, record.step, extra={"task_id": record.id, "step": record.step,
                                                        "lane": record.lane.value, "reason": "rerun"})
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
            running = [asyncio.wrap_future(entry.future) for entry in self._in_flight.values() if not entry.future.done()]
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
            await self._metrics_server.stop()
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

    def _listen(self) -> socket.socket:
        """Bind the socket in a private directory, mode 0600, replacing a stale one."""
        path = self.config.socket_path
        ensure_private_directory(path.parent)
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

    async def _start_metrics_endpoint(self) -> None:
        addr = self.config.metrics_addr
        self._metrics_server = await MetricsEndpoint.start(bind_metrics_socket(addr), self.prometheus_text)
        log.info("metrics on http://%s/metrics", show_addr(addr))

    def _prune(self) -> None:
        if not self._draining:
            pruned = self._journal.prune()
            if pruned:
                log.info("pruned %d finished journal rows", pruned)
            self._loop.call_later(PRUNE_INTERVAL_S, self._prune)

    def statistics(self) -> DaemonStatistics:
        """The daemon's own figures, now (loop thread)."""
        return DaemonStatistics(connections=len(self._connections),
                                requests_in_flight=sum(each.requests_in_flight for each in self._connections),
                                waiters=sum(len(entry.waiters) for entry in self._in_flight.values()),
                                live_tasks=len(self._in_flight),
                                journal_commits=0 if self._commits is None else self._commits.commits)

    # ----------------------------------------------------------------- connections

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        uid, refusal = self._admit(writer.get_extra_info("socket"))
        connection = Connection(writer, uid, self.config.idle_timeout_s)
        if refusal is not None:
            connection.send(protocol.error_reply(None, refusal))
            connection.close()
            return
        self._connections.add(connection)
        connection.settle()
        handle = functools.partial(self._handle, connection)
        try:
            while not connection.closed:
                try:
                    data = await reader.read(READ_CHUNK_BYTES)
                    if not data:
                        connection.decoder.eof()
                        return
                except ConnectionError:
                    return
                except protocol.ProtocolError as cut:  # closed mid-frame
                    connection.send(protocol.error_reply(None, cut))
                    return
                for message in connection.decoder.feed(data):  # every whole frame the read brought
                    if isinstance(message, protocol.ProtocolError):
                        connection.send(protocol.error_reply(None, message))
                        if message.code is not protocol.ErrorCode.BAD_JSON:
                            return  # the stream cannot be resynchronised
                        continue
                    await connection.handle(handle, message)
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

    async def _handle(self, connection: Connection, message: Dict[str, Any]) -> None:
        request_id = protocol.request_id_of(message)
        try:
            request = protocol.parse_request(message)
            reply = await _HANDLERS[type(request)](self, connection, request)
        except Exception as error:  # every failure of a request is a reply, never a crash
            if not isinstance(error, GovernorError):
                log.exception("request %r failed", request_id)
            connection.send(protocol.error_reply(request_id, error))
            return
        if reply is not None:
            connection.send(protocol.ok_reply(request_id, **reply))

    # ----------------------------------------------------------------- operations

    async def _op_ping(self, connection: Connection, request: protocol.Ping) -> Dict[str, Any]:
        return {"pid": os.getpid(), "version": protocol.PROTOCOL_VERSION}

    async def _op_submit(self, connection: Connection, request: protocol.Submit) -> None:
        self._refuse_new_work()
        call, lane, lane_key = self._checked(request.step, request.params, request.cwd, request.limits,
                                             request.priority)
        [record_id] = await self._commits.write(lambda group: group.submit(
            [NewTask.step_call(call.step, call.kwargs, lane, request.key, request.limits, call.cwd, lane_key,
                               call.priority)]))
        target = self._target(request.key, request.order)
        self._launch(record_id, target, lambda target: target.submit_call(attrs.evolve(call, ref=record_id)))
        self._acknowledge(connection, request, [record_id], _held_key(request.key, target), request.ack)

    async def _op_batch(self, connection: Connection, request: protocol.Batch) -> None:
        self._refuse_new_work()
        checked = [self._checked(c.step, c.params, request.cwd, c.limits, c.priority)
                   for c in request.calls]  # all, before any is kept
        record_ids = await self._commits.write(lambda group: group.submit(
            [NewTask.step_call(call.step, call.kwargs, lane, request.key, call.limits, call.cwd, lane_key,
                               call.priority) for call, lane, lane_key in checked]))
        target = self._target(request.key, request.order)  # one scope for the batch: it supersedes as one view
        for record_id, (call, _, _) in zip(record_ids, checked):
            self._launch(record_id, target, lambda target, call=call, rid=record_id:
                         target.submit_call(attrs.evolve(call, ref=rid)))
        self._acknowledge(connection, request, record_ids, _held_key(request.key, target))

    async def _op_workflow(self, connection: Connection, request: protocol.WorkflowRequest) -> None:
        self._refuse_new_work()
        checked = [self._checked(c.step, c.params, request.cwd, c.limits) for c in request.calls]
        calls = [call for call, _, _ in checked]
        [record_id] = await self._commits.write(lambda group: group.submit(
            [NewTask.workflow([{"step": c.step, "params": c.kwargs} for c in calls], cwd=request.cwd,
                              lane_key=workflow_key(key for _, _, key in checked))]))
        self._launch(record_id, self._supervisor, lambda target: target.workflow(
            [attrs.evolve(call, ref=record_id) for call in calls]))
        self._acknowledge(connection, request, [record_id])

    async def _op_cancel(self, connection: Connection, request: protocol.Cancel) -> Dict[str, Any]:
        outcome: Dict[str, List[int]] = {"cancelled": [], "finished": [], "unknown": []}
        for record_id in request.task_ids:
            entry = self._in_flight.get(record_id)
            if entry is not None:
                entry.future.cancel("cancelled by a client")
                outcome["cancelled"].append(record_id)
            elif self._journal.get(record_id) is not None:
                outcome["finished"].append(record_id)
            else:
                outcome["unknown"].append(record_id)
        return outcome

    async def _op_status(self, connection: Connection, request: protocol.Status) -> Dict[str, Any]:
        await self._commits.settle()
        if request.task_id is None:
            return {"tasks": [record.to_wire(summary=True) for record in
                              self._journal.recent(request.limit, request.states or (), request.step)]}
        return {"task": self._record(request.task_id).to_wire()}

    async def _op_wait(self, connection: Connection, request: protocol.Wait) -> None:
        record = self._record(request.task_id)
        entry = self._in_flight.get(record.id)
        Waiter(connection, request.id, [record.id], True, self._record_wire).attach(
            [entry] if entry is not None else [], request.timeout)

    async def _op_steps(self, connection: Connection, request: protocol.Steps) -> Dict[str, Any]:
        return {"steps": self._supervisor.describe_steps()}

    async def _op_workers(self, connection: Connection, request: protocol.Workers) -> Dict[str, Any]:
        return {"workers": await self._loop.run_in_executor(None, self._supervisor.describe_workers)}

    async def _op_metrics(self, connection: Connection, request: protocol.Metrics) -> Dict[str, Any]:
        if request.format == "prometheus":
            return {"text": await self._loop.run_in_executor(None, self._supervisor.prometheus_text)}
        metrics = await self._loop.run_in_executor(None, self._supervisor.metrics)
        return {"metrics": {**metrics, "daemon": attrs.asdict(self.statistics())}}

    async def _op_page(self, connection: Connection, request: protocol.Page) -> Dict[str, Any]:
        # The token opens the page to whoever holds it: mint one only for the daemon's own
        # user (root, admitted with --allow-root, must read the daemon's log instead).
        if connection.uid != os.getuid():
            raise DaemonError("only the daemon's own user may have a token for its status page")
        if self.status_page is None:
            raise DaemonError("this daemon serves no status page: start it with --http-addr [HOST:]PORT")
        return {"url": self.status_page.mint_url()}

    async def _op_live(self, connection: Optional[Connection], request: protocol.Live) -> Dict[str, Any]:
        return {"live": await self.live_snapshot()}

    async def live_snapshot(self) -> Dict[str, Any]:
        """The live picture (``governor.service.live``), for ``governor top`` and the status page."""
        await self._commits.settle()
        return await self._live_model.snapshot(self._supervisor, self._journal)

    async def prometheus_text(self) -> str:
        """The supervisor's figures in the Prometheus text format (the status page's /metrics)."""
        return await self._loop.run_in_executor(None, self._supervisor.prometheus_text)

    async def cancel_tasks(self, task_ids: Sequence[int]) -> Dict[str, List[int]]:
        """Cancel tasks as the ``cancel`` op does (the status page's cancel button)."""
        return await self._op_cancel(None, protocol.Cancel(0, task_ids=tuple(task_ids)))

    # ----------------------------------------------------------------- tasks

    def _refuse_new_work(self) -> None:
        """Refuse a submission while draining, or once the journal's file is no longer the
        one this daemon writes (what it acknowledged would be lost at the next start)."""
        if self._draining:
            raise DaemonError("the daemon is shutting down and takes no new work")
        lost = self._lock.lost()
        if lost is not None:
            if not self._journal_lost:
                log.error("%s: taking no new work; restart the daemon", lost)
                self._journal_lost = True
            raise JournalLost(f"{lost}; this daemon takes no new work: restart it")

    def _checked(self, step: str, params: Dict[str, Any], cwd: Optional[str],
                 limits: Optional[Any] = None, priority: int = 0) -> Tuple[Call, Any, Any]:
        """``(call, lane, lane key)`` for a step call, its relative paths made absolute against
        ``cwd``, to run in ``cwd`` (the client's directory: a relative path the step opens means it).

        Raises:
            UnknownStep, InvalidParameters: as the supervisor would at submit, and also a
                value its parameter's annotation does not take (JSON from a client, checked
                here rather than failing in the worker) or a relative path with no ``cwd``.
        """
        call = Call(step, kwargs=params, limits=limits, priority=priority)
        route = self._supervisor.check_call(call)
        route.parameters.check_values(call.kwargs)
        call = attrs.evolve(call, kwargs=route.spec.resolve_paths(call.kwargs, cwd), cwd=cwd)
        return call, route.lane, route.key_of(call.args, call.kwargs)

    def _record(self, record_id: int) -> TaskRecord:
        record = self._journal.get(record_id)
        if record is None:
            raise UnknownTask(record_id)
        return record

    def _record_wire(self, record_id: int) -> Dict[str, Any]:
        return self._record(record_id).to_wire()

    def _acknowledge(self, connection: Connection, request: Any, record_ids: List[int],
                     key: Optional[str] = None, ack: bool = True) -> None:
        """Send a submission's ids (unless a waiting submit asked for none: ``ack``); with
        ``wait``, owe the final reply once its tasks end (meanwhile holding ``key``: a newer
        submission with it is answered at once)."""
        single = not isinstance(request, protocol.Batch)
        if ack or not request.wait:
            ids = {"task_id": record_ids[0]} if single else {"task_ids": record_ids}
            connection.send(protocol.ok_reply(request.id, final=not request.wait, **ids))
        if request.wait:
            in_flight = [self._in_flight[record_id] for record_id in record_ids if record_id in self._in_flight]
            Waiter(connection, request.id, record_ids, single, self._record_wire, key, self.key_holders).attach(
                in_flight)

    def _target(self, key: Optional[str], order: Optional[int]) -> Any:
        """Where a request's tasks go: a scope superseding the last one with ``key``, or the supervisor.

        The superseded submission's waiting client is answered now (``superseded`` in its
        final reply), not once its running steps have stopped: nobody waits for them. A
        submission that comes late (``order``) is the superseded one: its scope is cancelled.
        """
        if key is None:
            return self._supervisor
        scope = self._supervisor.scope(key=key, order=order)
        holder = self.key_holders.get(key)
        if holder is not None and not scope.cancelled:
            holder.reply(final=True, superseded=f"a newer submission with key {key!r}")
        return scope

    def _launch(self, record_id: int, target: Any, submit: Callable[[Any], concurrent.futures.Future]) -> None:
        """Hand a journaled task to ``target``; if that refuses it, journal the failure."""
        try:
            future = submit(target)
        except GovernorError as refused:  # QueueFull, SupervisorClosed: the row must not stay queued
            self._journal.mark_finished(record_id, TaskState.FAILED.value, error=protocol.error_to_wire(refused))
            raise
        self._in_flight[record_id] = InFlight(record_id, future)
        self._ends.watch(record_id, future)

    def _resume(self, record: TaskRecord) -> None:
        """Run a journaled task again, or fail it with ``TaskNotResumable`` when it can no longer run."""
        try:
            if record.kind == "workflow":
                done = record.progress or []  # a resumed workflow runs only its unfinished steps
                calls = [self._resumable(Call(call["step"], kwargs=call["params"], ref=record.id, cwd=record.cwd))
                         for call in record.params["calls"][len(done):]]
                if done:
                    self._starts.resuming(record.id, done)
                self._launch(record.id, self._supervisor, lambda target: target.workflow(calls))
            else:
                call = self._resumable(Call(record.step, kwargs=record.params["params"], limits=record.own_limits(),
                                            priority=record.priority, ref=record.id, cwd=record.cwd))
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

    def _idempotent(self, record: TaskRecord) -> bool:
        """Whether every step of a journaled task is declared idempotent (``StepSpec.idempotent``):
        if it was running when a daemon died, it runs again."""
        calls = record.params["calls"] if record.kind == "workflow" else [
            {"step": record.step, "params": record.params["params"]}]
        try:
            return all(self._supervisor.check_call(Call(call["step"], kwargs=call["params"])).spec.idempotent
                       for call in calls)
        except (GovernorError, ValueError, TypeError):
            return False  # it cannot run any more: it is interrupted, and fails no resume

    def _task_done(self, record_id: int) -> None:
        """Loop thread: journal a task's end in the next group commit, then answer who waits.

        A commit that fails is made again (``group_commit``), the task staying in flight
        meanwhile: its waiters are answered once its end is durable, never forgotten.
        """
        entry = self._in_flight[record_id]
        self._commits.write(lambda group: self._starts.write_end(group, entry)).add_done_callback(
            lambda written: self._task_journaled(entry, written))

    def _task_journaled(self, entry: InFlight, written: asyncio.Future) -> None:
        """Loop thread: the end is durable (or will never be): answer the task's waiters."""
        _log_failed_write(written)
        if not written.cancelled() and written.exception() is None:
            entry.record = written.result()
        entry.end_journaled = True
        del self._in_flight[entry.record_id]
        self._starts.forget(entry.record_id)
        self._live_model.task_ended(entry.record_id, entry.future)
        if self._draining and cancelled_by_shutdown(entry.future):
            return  # nobody is answered: the task is the next start's
        for waiter in list(entry.waiters):
            waiter.one_done(entry)


#: The handler of each request type. Built at import, so a request type the protocol
#: defines and the daemon does not handle stops the import rather than a client's request.
_HANDLERS: Dict[type, Callable[[Daemon, Optional[Connection], Any], Awaitable[Optional[Dict[str, Any]]]]] = {
    protocol.Ping: Daemon._op_ping,
    protocol.Submit: Daemon._op_submit,
    protocol.Batch: Daemon._op_batch,
    protocol.WorkflowRequest: Daemon._op_workflow,
    protocol.Cancel: Daemon._op_cancel,
    protocol.Status: Daemon._op_status,
    protocol.Wait: Daemon._op_wait,
    protocol.Steps: Daemon._op_steps,
    protocol.Workers: Daemon._op_workers,
    protocol.Metrics: Daemon._op_metrics,
    protocol.Live: Daemon._op_live,
    protocol.Page: Daemon._op_page,
}
_UNHANDLED = set(protocol.REQUEST_TYPES.values()) - set(_HANDLERS)
if _UNHANDLED:
    raise ImportError(f"the daemon has no handler for {sorted(cls.__name__ for cls in _UNHANDLED)}")


def _log_failed_write(written: asyncio.Future) -> None:
    """A done-callback for a group-commit write nobody awaits: log what it raised."""
    if not written.cancelled() and written.exception() is not None:
        log.error("a journal write failed: %s", written.exception(), exc_info=written.exception())
