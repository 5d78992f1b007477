"""The warm template: one process that has imported everything a worker needs and forks workers.

::

    supervisor (spawn thread)                          template process (loky's context)
      Template.start() ── loky Process ─────────────>  main(address)
                       <── connection ────────────────  connects back
                       ── (steps, modules, sandbox,  ──>  installs the steps, imports every
                           initializer)
                       <── Ready() | StartFailed(tb)      step module, gc.freeze()
    manager thread
      Template.fork(slot_id, lane, seat) ── Fork(...) ──>  os.fork() ──> worker.serve(...)
                       <── Exited(pid, code, signal)      reaps every worker it forked
                       <── ForkFailed(slot_id, error)

(The messages are ``governor.workers.messages``.)

Why a template: a worker forked from it shares the interpreter, the worker runtime and
every step module with its siblings copy-on-write, so it costs a few MiB of private
memory instead of a fresh interpreter's 13-15 MiB, and a replacement is ready in
milliseconds. ``gc.freeze()`` before any fork keeps the collector from touching (and so
copying) the inherited objects. The template itself is started through loky's context
(a fresh interpreter, safe to start from a threaded supervisor) and gets its step table
through cloudpickle, so steps defined in ``__main__`` or in closures work.

No worker holds the user's terminal: the template points its own stdin at /dev/null and
a terminal stdout or stderr at a pipe it copies to the terminal, before any fork
(``governor.workers.terminal``).

The template runs no step and starts no thread: a fork from a single-threaded process
copies no lock held by another thread. It reaps its workers (they are its children),
kills what a dead worker left behind, and reports each one's exit status, which only a
parent can read; the supervisor confirms deaths with a pidfd of its own and takes the
status from here.

What a dead worker leaves behind: the template is a child subreaper
(``proctree.become_subreaper``), so every process of a dead worker's tree that lost its
parent (its children, a double fork, a new session) is reparented here rather than to
init. On each death the template kills the worker's group and session
(``proctree.kill_step_tree``, while the unreaped zombie pins their ids), reaps the worker,
then kills every descendant of its own that is not below a live worker
(``proctree.kill_descendants``): however a worker died (a segfault, ``os._exit``, an
outside SIGKILL), nothing of its task outlives it.
"""

from __future__ import annotations

import gc
import importlib
import os
import pickle
import select
import signal
import socket
import sys
import traceback
from multiprocessing.connection import Client, Connection, wait
from typing import Any, Dict, Optional, Sequence, Set, Union

import cloudpickle
from loky.backend.context import get_context

from governor.workers import proctree
from governor.workers import worker
from governor.workers.terminal import TerminalForward
from governor.errors import WorkerStartFailed
from governor.workers.messages import Exited, Fork, ForkFailed, Ready, StartFailed
from governor.workers.sandbox import SandboxPolicy

#: How often :meth:`Template.start` looks whether the template process died before it
#: connected back (a broken interpreter, a killed process).
START_POLL_S = 0.1


class Template:
    """The supervisor's side of one template process (see the module docstring).

    :meth:`start` runs on a thread that may block (the caller of ``start()`` or a spawn
    thread); every other method runs on the manager thread.
    """

    def __init__(self, directory: str, generation: int):
        self._address = os.path.join(directory, f"template-{generation}")
        self._process: Optional[Any] = None
        self.connection: Optional[Connection] = None
        self.pid: Optional[int] = None

    def start(self, steps: Dict[str, Any], modules: Sequence[str], timeout: float, worker_address: str,
              secret: str, sandbox: Optional[SandboxPolicy] = None, initializer: Optional[tuple] = None) -> None:
        """Start the template process and wait until it is warm.

        ``secret`` is the supervisor's, which each worker puts in its hellos. ``sandbox`` is
        the pool lane's policy, which each pool worker applies after its fork (``None``: no
        sandbox); the template itself is never restricted. ``initializer`` is ``(function,
        args)``, which each worker runs after its fork; the template itself never runs it.

        Raises:
            WorkerStartFailed: it did not start, or a step module failed to import in it
                (the module's traceback is in the message).
        """
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self._address)
            listener.listen(1)
            self._process = get_context("loky").Process(
                target=main, args=(self._address, worker_address), name="governor-template", daemon=False)
            self._process.start()
            self.pid = self._process.pid
            self.connection = self._accept(listener, timeout)
        finally:
            listener.close()
            os.unlink(self._address)
        try:
            self.connection.send_bytes(cloudpickle.dumps((steps, list(modules), sandbox, initializer, secret)))
            if not self.connection.poll(timeout):
                raise WorkerStartFailed(f"the worker template did not warm up within {timeout}s")
            reply = pickle.loads(self.connection.recv_bytes())
        except (EOFError, OSError) as exc:
            self.close()
            raise WorkerStartFailed(f"the worker template died while it warmed up: {exc}") from exc
        except BaseException:
            self.close()
            raise
        if type(reply) is not Ready:
            self.close()
            raise WorkerStartFailed(f"a step module could not be imported in the worker template:\n"
                                    f"{reply.traceback_text}")

    def _accept(self, listener: socket.socket, timeout: float) -> Connection:
        for _ in range(max(1, int(timeout / START_POLL_S))):
            ready, _, _ = select.select([listener], [], [], START_POLL_S)
            if ready:
                connection, _ = listener.accept()
                return Connection(connection.detach())
            if not self._process.is_alive():
                code = self._process.exitcode
                self.close()
                raise WorkerStartFailed(f"the worker template exited at start (exit code {code})")
        self.close()
        raise WorkerStartFailed(f"the worker template did not start within {timeout}s")

    def fork(self, slot_id: int, lane: str, seats_path: str, seat: int) -> None:
        """Ask for one worker; it connects back to the supervisor's worker socket.

        Raises:
            OSError: the template is gone.
        """
        self.connection.send_bytes(pickle.dumps(Fork(slot_id, lane, seats_path, seat)))

    def receive(self) -> Union[Exited, ForkFailed]:
        """One report: a worker's :class:`Exited` or a :class:`ForkFailed`.

        Raises:
            EOFError, OSError: the template is gone.
        """
        return pickle.loads(self.connection.recv_bytes())

    def close(self) -> None:
        """End the template (it exits on its socket's EOF) and reap it. Its workers end
        by themselves when their own sockets close."""
        if self.connection is not None:
            self.connection.close()
            self.connection = None
        if self._process is not None:
            self._process.join(timeout=5)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
            self._process = None


# ----------------------------------------------------------------- in the template process

def main(address: str, worker_address: str) -> None:
    """The template process: warm up, then fork workers on request until the supervisor goes."""
    # A session of its own: a Ctrl-C at the terminal is the supervisor's to handle. In the
    # terminal's process group the template died of the KeyboardInterrupt too, orphaning its
    # workers, and the supervisor's shutdown waited for a template that would never answer.
    os.setsid()
    # No worker may hold the user's terminal (it could push keystrokes into the shell):
    # stdin from /dev/null, a terminal's output through pipes this process copies to it.
    forward = TerminalForward.install()
    connection = Client(address, family="AF_UNIX")
    try:
        steps, modules, sandbox, initializer, secret = pickle.loads(connection.recv_bytes())
        worker.install_steps(steps)
        worker.install_sandbox(sandbox)
        worker.install_initializer(initializer)
        for module in modules:
            importlib.import_module(module)
        worker.seal_preload()
    except BaseException:
        connection.send_bytes(pickle.dumps(StartFailed(traceback.format_exc())))
        return
    proctree.become_subreaper()  # a dead worker's orphans land here (module docstring)
    gc.collect()
    gc.freeze()
    workers: Set[int] = set()
    wake_reader, wake_writer = os.pipe()
    os.set_blocking(wake_reader, False)
    os.set_blocking(wake_writer, False)
    signal.set_wakeup_fd(wake_writer)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so SIGCHLD writes the wake-up fd
    connection.send_bytes(pickle.dumps(Ready()))
    while True:
        ready = wait([connection, wake_reader, *forward.readers])
        for read_end in forward.readers:
            if read_end in ready:
                forward.copy(read_end)
        if wake_reader in ready:
            _drain(wake_reader)
            _reap(connection, workers)
        if connection in ready:
            try:
                request: Fork = pickle.loads(connection.recv_bytes())
            except (EOFError, OSError):
                return  # the supervisor is gone; each worker ends on its own EOF
            pid = _fork(connection, (wake_reader, wake_writer, *forward.descriptors), worker_address, secret, request)
            if pid is not None:
                workers.add(pid)


def _fork(connection: Connection, fds: tuple, worker_address: str, secret: str, request: Fork) -> Optional[int]:
    """Fork one worker; its pid (``None`` if the fork failed, which is reported)."""
    try:
        pid = os.fork()
    except OSError as exc:
        connection.send_bytes(pickle.dumps(ForkFailed(request.slot_id, str(exc))))
        return None
    if pid:
        return pid
    # The new worker: nothing of the template's may stay with it.
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        connection.close()
        for fd in fds:
            os.close(fd)
        worker.serve(request.slot_id, request.lane, worker_address, request.seats_path, request.seat, secret)
    except BaseException:
        traceback.print_exc(file=sys.stderr)
    finally:
        os._exit(1)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _reap(connection: Connection, workers: Set[int]) -> None:
    """Reap every dead worker, kill what it left behind, and report how it ended.

    Its group and session are killed before it is reaped: while the zombie is unreaped
    its pid cannot be reused, so the group and session signalled are certainly its own.
    After it is reaped, whatever else is below the template but not below a live worker
    is an orphan of a dead worker (reparented here, the template being a subreaper) and
    is killed and reaped too.
    """
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None:
            return
        if info.si_pid not in workers:
            os.waitpid(info.si_pid, 0)  # an orphan that exited before a sweep reached it
            continue
        proctree.kill_step_tree(info.si_pid)
        _, status = os.waitpid(info.si_pid, 0)
        workers.discard(info.si_pid)
        proctree.kill_descendants(keep=workers)
        code = os.waitstatus_to_exitcode(status)
        report = Exited(info.si_pid, code, None) if code >= 0 else Exited(info.si_pid, None, -code)
        try:
            connection.send_bytes(pickle.dumps(report))
        except OSError:
            return
