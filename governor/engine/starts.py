"""How the local lanes get their workers: the warm template, forks, each new worker's
handshake, failed starts and their back-off (manager thread; a spawn thread only starts a
new template).

::

    _fill / _spawn ── Fork(slot, lane, seat) ──> template ── os.fork() ──> worker
    listener  <── Hello(TASK, ...), Hello(CONTROL, ...) ── worker   -> _on_hello: the slot is IDLE
    template  ──> Exited(pid, ...) | ForkFailed(slot, ...)         -> _on_template_report
    template dies ──> _template_lost ──> _restart_template (on the spawn thread)

:class:`WorkerStarts` is a part of :class:`~governor.engine.lanes.LocalLanes` (its base
class), kept apart because it is a job of its own: it owns the template, the listener,
the seats file and the slot numbering, and shares with the lanes their slot tables
(``_lanes``, ``_slots``, ``_by_pid``), their timers and their host.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import pickle
import secrets
import selectors
import socket
import struct
from multiprocessing.connection import Connection
from typing import Any, Dict, Optional, Sequence

import psutil

from governor.engine.backend import LaneHost
from governor.engine.slots import LaneState, Slot, SlotState
from governor.engine.timers import Timers
from governor.errors import WorkerStartFailed
from governor.limits import Lane
from governor.task import TaskState
from governor.workers.messages import HELLO_MAX_BYTES, Channel, Exited, ForkFailed, hello_from_wire
from governor.workers.proctree import TreeSampler
from governor.workers.sandbox import SandboxPolicy
from governor.workers.seats import Seats
from governor.workers.template import Template

log = logging.getLogger("governor")

#: How long the template (or a new worker) may take to start before the start fails.
WORKER_START_TIMEOUT_S = 60.0

#: Back-off between attempts to replace a worker when starting one fails.
RESPAWN_BACKOFF_S = (0.1, 0.5, 2.0, 10.0)

#: After this many failed starts in a row, a lane with no worker fails its queued tasks.
MAX_START_FAILURES = 3


class WorkerStarts:
    """The part of the local lanes that starts workers (see the module docstring)."""

    # Shared with LocalLanes (not imported here: lanes.py imports this module).
    _host: LaneHost
    _config: Any  # lanes.LocalConfig
    _lanes: Dict[Lane, LaneState]
    _slots: Dict[int, Slot]
    _by_pid: Dict[int, Slot]
    _timers: Timers
    _warm: bool

    def _init_starts(self, directory: str, sandbox: Optional[SandboxPolicy]) -> None:
        """Open the listener workers connect to and the seats file, in ``directory``.

        ``sandbox`` is the pool lane's policy as its workers apply it (``None``: none).
        """
        config = self._config
        self._directory = directory
        self._sandbox = sandbox
        self._sandbox_told = False
        self._slot_ids = iter(range(1, 2 ** 62))
        self._spawner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="governor-spawn")
        self._worker_address = os.path.join(directory, "workers")
        # In every hello: what tells our workers from anything else that can reach the
        # listener (with the peer's pid, checked against the kernel's, see _on_hello).
        self._secret = secrets.token_hex(32)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self._worker_address)
        self._listener.listen(64)
        self._listener.setblocking(False)
        # Seats outlive their workers until the pidfd says dead: room for every live slot
        # of every lane, each with a successor starting, and a margin.
        capacity = 2 * sum(count + config.spares for count in config.workers.values()) + 64
        self._seats = Seats(os.path.join(directory, "seats"), capacity)
        self._generation = 0
        self._template: Optional[Template] = None
        self._watched_templates: set = set()
        self._template_starting = False

    # ----------------------------------------------------------------- the template

    def _new_template(self) -> Template:
        self._generation += 1
        return Template(self._directory, self._generation)

    def _watch_template(self, template: Template) -> None:
        self._host.selector.register(template.connection, selectors.EVENT_READ,
                                     lambda: self._on_template_report(template))
        self._watched_templates.add(template)

    def _unwatch_template(self, template: Template) -> None:
        """Take the template's socket out of the selector, if it is in (not when the
        supervisor's start failed before the manager began)."""
        if template in self._watched_templates:
            self._watched_templates.discard(template)
            self._host.selector.unregister(template.connection)

    def _on_template_report(self, template: Template) -> None:
        if template.connection is None:
            return  # closed by an earlier event of the same select
        try:
            report = template.receive()
        except (EOFError, OSError):
            self._template_lost(template)
            return
        match report:
            case Exited(pid, exitcode, signal_number):
                slot = self._by_pid.get(pid)
                if slot is None:
                    return  # a worker whose end needed no status (retired, killed, idle)
                slot.exit_status = (exitcode, signal_number)
                if slot.awaiting_status:
                    self._crashed(slot, exitcode, signal_number)
            case ForkFailed(slot_id, error):
                slot = self._slots.get(slot_id)
                if slot is not None and slot.state is SlotState.STARTING:
                    self._start_failed(slot, OSError(error))

    def _template_lost(self, template: Template) -> None:
        """The template died (killed from outside): its pending forks will never come."""
        log.error("the worker template (pid %s) died; starting a new one", template.pid)
        self._unwatch_template(template)
        template.close()
        if self._template is template:
            self._template = None
        for slot in [slot for slot in self._slots.values() if slot.template is template]:
            if slot.state is SlotState.STARTING:
                self._start_failed(slot, WorkerStartFailed("the worker template died before the worker started"))
            elif slot.awaiting_status:
                self._crashed(slot, None, None)

    def _restart_template(self) -> None:
        if self._template_starting:
            return
        self._template_starting = True
        template = self._new_template()
        start = self._spawner.submit(template.start, self._config.steps, self._config.step_modules,
                                     WORKER_START_TIMEOUT_S, self._worker_address, self._secret, self._sandbox,
                                     self._config.initializer)
        start.add_done_callback(lambda done: self._host.call_soon(self._on_template_started, template, done))

    def _on_template_started(self, template: Template, start: concurrent.futures.Future) -> None:
        self._template_starting = False
        error = start.exception() if not start.cancelled() else WorkerStartFailed("shut down")
        if error is not None:
            log.error("could not start a new worker template: %s", error)
            for lane in self._lanes.values():
                self._note_start_failure(lane, error)
            return
        if self._host.closing:
            template.close()
            return
        self._template = template
        self._watch_template(template)

    # ----------------------------------------------------------------- slots and workers

    def _spawn(self, lane: LaneState) -> None:
        seat = self._seats.take()
        if seat is None:
            log.error("no free seat for a new %s worker (too many workers dying at once)", lane.lane.value)
            return
        slot = Slot(next(self._slot_ids), lane.lane, seat, self._template, self._host.selector)
        lane.add(slot)
        self._slots[slot.id] = slot
        try:
            self._template.fork(slot.id, lane.lane.value, self._seats.path, seat)
        except OSError:
            self._template_lost(self._template)
            return
        self._timers.after(self._config.start_timeout_s, self._start_overdue, slot)

    def _fill(self, lane: LaneState) -> None:
        for _ in range(lane.workers + lane.spares - lane.live):
            self._spawn(lane)

    def _respawn_due(self, lane: LaneState) -> None:
        lane.respawn_pending = False
        if not self._host.closing and self._template is not None:
            self._fill(lane)

    def _start_overdue(self, slot: Slot) -> None:
        if slot.state is SlotState.STARTING:
            what = "ran its initializer and connected" if self._config.initializer else "connected"
            self._start_failed(slot, WorkerStartFailed(f"no worker {what} within {self._config.start_timeout_s:g}s"))

    def _accept(self) -> None:
        try:
            connection, _ = self._listener.accept()
        except BlockingIOError:
            return
        # Who connected, as the kernel saw it at connect(): nothing the peer says can change it.
        peer_pid, peer_uid, _ = struct.unpack("3i", connection.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        connection.setblocking(False)  # a hello that does not come in one piece never holds this thread
        hello = Connection(connection.detach())
        self._host.selector.register(hello, selectors.EVENT_READ, lambda: self._on_hello(hello, peer_pid, peer_uid))

    def _on_hello(self, connection: Connection, peer_pid: int, peer_uid: int) -> None:
        self._host.selector.unregister(connection)
        try:
            hello = hello_from_wire(connection.recv_bytes(HELLO_MAX_BYTES), self._secret)
        except (EOFError, BlockingIOError):
            connection.close()  # a worker that died during its own start (its pidfd or start
            return              # deadline drops it), or a hello that did not come in one piece
        except (OSError, ValueError) as exc:  # too long, malformed, or not from our worker
            self._refuse(connection, peer_pid, f"not a worker's hello ({exc})")
            return
        slot, pid = self._slots.get(hello.slot_id), hello.pid
        if slot is None or slot.state is not SlotState.STARTING:
            connection.close()  # a worker whose slot was given up (a start too slow, shutdown)
            return
        why = self._not_the_slots_worker(slot, pid, peer_pid, peer_uid)
        if why is not None:
            self._refuse(connection, peer_pid, why)
            return
        if hello.init_failure is not None:  # the worker exits: it takes no task unprepared
            connection.close()
            self._start_failed(slot, WorkerStartFailed(
                f"the initializer raised in worker {pid}:\n{hello.init_failure}"))
            return
        os.set_blocking(connection.fileno(), True)
        if hello.channel is Channel.TASK:
            slot.tasks = connection
            os.set_blocking(connection.fileno(), False)  # the manager never waits on a worker (see _send)
            if hello.sandbox is not None:
                self._on_sandbox(slot, *hello.sandbox)
        else:
            slot.control = connection
        if slot.pid is None:
            # Its pid is known from its first hello: from now on its death is seen at once,
            # even if it dies before its second (killed from outside while it starts).
            slot.pid = pid
            try:
                slot.pidfd = os.pidfd_open(pid)
            except OSError as exc:  # it died right after its hello
                self._start_failed(slot, exc)
                return
            self._by_pid[pid] = slot
            self._host.selector.register(slot.pidfd, selectors.EVENT_READ, lambda: self._on_dead(slot))
        if slot.tasks is None or slot.control is None:
            return
        self._host.selector.register(slot.tasks, selectors.EVENT_READ, lambda: self._on_outcome(slot))
        slot.watched = True
        self._host.selector.register(slot.control, selectors.EVENT_READ, lambda: self._on_control(slot))
        slot.control_watched = True
        try:
            slot.sampler = TreeSampler(pid, self._clock)
        except psutil.Error:
            return  # it died right after its hello: its pidfd drops the slot
        lane = self._lanes[slot.lane]
        lane.start_failures = 0
        lane.move(slot, SlotState.IDLE)
        self._host.metrics.worker_spawned(slot.lane)
        if not self._warm and all(len(lane.idle) == lane.workers + lane.spares for lane in self._lanes.values()):
            self._warm = True

    def _not_the_slots_worker(self, slot: Slot, pid: int, peer_pid: int, peer_uid: int) -> Optional[str]:
        """Why the process at the other end is not ``slot``'s worker, or ``None`` if it is:
        the kernel's pid for it is the one it claims, of our user, and it is the worker the
        template forked for the slot (its parent is the slot's template, and it is the same
        process as at the slot's first hello, or no other slot's worker)."""
        if peer_uid != os.getuid() or peer_pid != pid:
            return f"its kernel credentials (pid {peer_pid}, uid {peer_uid}) are not what it claims (pid {pid})"
        if slot.pid is not None:
            return None if slot.pid == pid else f"slot {slot.id} belongs to worker {slot.pid}"
        if pid in self._by_pid:
            return f"pid {pid} is already worker of another slot"
        try:
            parent = psutil.Process(pid).ppid()
        except psutil.Error:
            parent = None
        if parent != slot.template.pid:
            return f"it is not a child of the worker template {slot.template.pid} (its parent: {parent})"
        return None

    def _refuse(self, connection: Connection, peer_pid: int, why: str) -> None:
        log.warning("refused a connection to the worker listener from pid %s: %s", peer_pid, why)
        connection.close()

    def _on_sandbox(self, slot: Slot, label: str, missing: Sequence[str], tmpdir: Optional[str]) -> None:
        """A pool worker says how it is sandboxed: note it, and tell the log once per
        supervisor (every pool worker applies the same policy on the same kernel)."""
        slot.sandbox, slot.tmpdir = label, tmpdir
        self._host.metrics.sandbox_applied(label)
        if self._sandbox_told:
            return
        self._sandbox_told = True
        if missing:
            log.warning("pool workers run under sandbox %s; not applied: %s", label, ", ".join(missing))
        else:
            log.info("pool workers run under sandbox %s", label)

    def _start_failed(self, slot: Slot, error: BaseException) -> None:
        self._drop(slot)
        lane = self._lanes[slot.lane]
        log.error("could not start a worker for the %s lane (attempt %d): %s",
                  slot.lane.value, lane.start_failures + 1, error)
        if not self._warm:
            failure = WorkerStartFailed(f"a {slot.lane.value} worker did not start: {error}")
            failure.__cause__ = error
            self._host.fail_start(failure)
            return
        self._note_start_failure(lane, error)

    def _note_start_failure(self, lane: LaneState, error: BaseException) -> None:
        lane.start_failures += 1
        if lane.start_failures >= MAX_START_FAILURES and lane.count(SlotState.IDLE, SlotState.BUSY) == 0:
            failure = WorkerStartFailed(f"no {lane.lane.value} worker could be started "
                                        f"({lane.start_failures} attempts): {error}")
            for task in list(lane.retry) + list(lane.queue):
                self._host.conclude(task, TaskState.FAILED, failure)
            lane.queue.clear()
            lane.retry.clear()
        if not lane.respawn_pending:
            lane.respawn_pending = True
            backoff = RESPAWN_BACKOFF_S[min(lane.start_failures, len(RESPAWN_BACKOFF_S)) - 1]
            self._timers.after(backoff, self._respawn_due, lane)
