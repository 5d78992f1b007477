"""Code that runs inside a worker process, forked from the lanes' warm template.

Life of one worker (see ``governor.workers.template`` for where it comes from; the
messages are ``governor.workers.messages``)::

    template ── os.fork() ──> serve(slot_id, lane, address)
        os.setsid()                                  lead a process group
        task socket    ──> Hello(TASK, slot_id, pid)    connect to the supervisor, twice
        control socket ──> Hello(CONTROL, slot_id, pid)
        (before both: initializer(*initargs), once; Supervisor(initializer=...))
        [per-worker setup hook]                      see serve()
        loop: task socket ──> task id, Assignment ──> run_step ──> kill what the step left running
              ──> Outcome ──> task socket ──> put the worker's state back (hygiene)
    control socket ──> Cancel(task_id, reason, detail) ──> control thread ──> StepContext flag
                   ──> Revoke(task_id, number)         ──> control thread ──> Revoked(task_id, number)

The *task socket* carries one task down and its outcome up, one task at a time; the
supervisor's manager thread reads it with its selector, so no thread of ours stands
between a task and its worker. A task comes as a plain tuple pickled, its outcome goes
as fields the supervisor reads without unpickling (see ``messages.outcome_to_wire``). The worker puts its process state back *after* it sent the
outcome, while the caller already has its result: a worker that cannot be made clean
sends ``Dirty(problem)`` instead of taking another task, and exits; a task sent to it
meanwhile was never taken, so the supervisor hands it to another worker.

A pool worker may be sent its next task while it runs one (see
``governor.engine.slots.SendAhead``). The supervisor can take such a task back (it waits
behind a step that turned out long, and another worker is free): it names the task by
its number among the assignments sent to this worker, and the control thread either
marks that assignment to be skipped and answers ``Revoked(task_id, number)``, or, if the
main thread already took it, says nothing and the task runs here. The two threads decide
under one lock, so a task is never both revoked and run. Both answers (``Revoked`` on the
control socket, ``Skipped`` on the task socket) carry the assignment's number: a task
taken back can be sent to the same worker again, and an answer about its first sending
must never settle its second. The *control socket* is read by
a thread of the worker while a step runs: it carries cooperative cancels, and it is the
worker's lifeline: on its EOF (the supervisor is gone, or retired this worker) the worker
kills its own process group, so no step outlives the supervisor.

The worker leads its own process group (``os.setsid()``), which every process a step
starts inherits, so the supervisor can kill the whole tree with one ``killpg`` even after
the worker itself is gone. A step that forks and returns in the child never makes that
child a second worker: the child closes the worker's sockets at fork
(``os.register_at_fork``) and exits when its step returns.
"""

from __future__ import annotations

import os
import pickle
import resource
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Client, Connection
from typing import Any, Callable, Dict, List, Optional, Tuple

from governor import context as _context
from governor.workers import denials
from governor.workers import hygiene
from governor.workers import proctree
from governor.workers import sandbox as _sandbox
from governor.errors import StepCancelled
from governor.workers.frames import Frames, send_frame
from governor.workers.messages import (TASK_ID, Assignment, Cancel, Channel, Dirty, Hello, Outcome, OutcomeKind, Revoke,
                                       Revoked, Skipped, dirty_to_wire, hello_to_wire, outcome_to_wire, revoked_to_wire,
                                       skipped_to_wire)
from governor.workers.seats import Seat

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

#: A task whose peak RSS ends this far above the worker's RSS at its end leaves a stale
#: high-water mark; only then is it reset (a write to /proc/self/clear_refs, ~8 us), so a
#: task that does not allocate pays ~2 us for its memory figures instead of ~25 us.
PEAK_RESET_SLACK_BYTES = 1 << 20

#: Cancels kept for tasks not started here yet: more than a worker is ever sent ahead
#: (``governor.engine.slots.MAX_AHEAD``).
EARLY_CANCELS_KEPT = 16

#: Tests only: a directory (``GOVERNOR_TEST_HOLD_REVOKED``, read once as the template
#: imports this module) where the control thread, having taken a task back, announces it
#: (file ``revoked``) and then waits for the file ``answer`` before it sends ``Revoked``. A
#: test so orders that answer after the worker's next outcome, the race that ``Skipped``
#: on the task socket settles. Unset, it costs one comparison per task taken back.
HOLD_REVOKED_DIR = os.environ.get("GOVERNOR_TEST_HOLD_REVOKED")

#: How long a held answer waits for the test before it goes anyway (a failed test's
#: worker must not hang its shutdown).
HOLD_REVOKED_PATIENCE_S = 60.0

_steps: Dict[str, Any] = {}
_statm_fd: Optional[int] = None
_lock = threading.Lock()
# Cancels that arrived before their task started (the cancel and the dispatch crossed).
_early_cancels: Dict[int, tuple] = {}
# How many assignments the main thread has taken off the task socket, and the numbers of
# those the supervisor took back before they were taken (both under _lock).
_assignments_taken = 0
_revoked: set = set()
# Set in a process a step forked from this worker (os.register_at_fork): it is no worker.
_forked_by_step = False
# The modules the template had imported when it forked this worker.
_preloaded: frozenset = frozenset()
# The pool lane's sandbox policy (None: sandbox="off"), and what apply() did in this worker.
_sandbox_policy: Optional[_sandbox.SandboxPolicy] = None
_sandbox_report: _sandbox.SandboxReport = _sandbox.SandboxReport(0)
# /proc/self/clear_refs, opened before the sandbox (which refuses opening it for writing).
_clear_refs_fd: Optional[int] = None
# Supervisor(initializer=, initargs=, initializer_timeout_s=): (function, args, timeout_s) every
# worker runs once before its first task.
_initializer: Optional[Tuple[Callable[..., Any], tuple, float]] = None


def install_steps(steps: Dict[str, Any]) -> None:
    """Give this process the step table (the template, before it forks any worker)."""
    _steps.update(steps)


def install_sandbox(policy: Optional[_sandbox.SandboxPolicy]) -> None:
    """Give this process the pool lane's sandbox policy (the template; ``None``: no sandbox)."""
    global _sandbox_policy
    _sandbox_policy = policy
    if policy is not None:
        _sandbox.prepare(policy)


def install_initializer(initializer: Optional[Tuple[Callable[..., Any], tuple, float]]) -> None:
    """Give this process the ``(initializer, initargs, timeout_s)`` each worker runs (the
    template; ``None``: none)."""
    global _initializer
    _initializer = initializer


def _initialize() -> Optional[str]:
    """Run the initializer, if any; the traceback's text if it raised (the worker then says
    so in its hello and exits, rather than take tasks it was not set up for)."""
    if _initializer is None:
        return None
    function, args, timeout_s = _initializer
    # The kernel ends a worker whose initializer overruns (SIGALRM's default action), even
    # one stuck in C code: before it connects, the supervisor knows no pid of it to kill,
    # and a worker it gave up on would otherwise sleep on, an orphan of the template.
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        function(*args)
    except BaseException:  # SystemExit too: the worker reports it rather than vanish
        return traceback.format_exc()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return None


def seal_preload() -> None:
    """Record what the template has imported: every worker shares these modules."""
    global _preloaded
    _preloaded = frozenset(sys.modules)


def imported_since_fork() -> List[str]:
    """Modules this worker imported that its template had not: each is private memory
    in every worker that imports it (import them at the top of the step's module)."""
    return sorted(set(sys.modules) - _preloaded)


def serve(slot_id: int, lane: str, address: str, seats_path: str, seat_index: int, secret: str) -> None:
    """A worker's life, in a process just forked from the template; never returns.
    ``secret`` is the supervisor's, for its hellos."""
    global _statm_fd
    os.setsid()
    # A subreaper keeps what a step detaches (a double fork, a new session) below this
    # worker while it lives, where the kill after each step (and a timeout's tree kill)
    # finds it. Once the worker is dead, the template, a subreaper too, takes it over.
    proctree.become_subreaper()
    if _statm_fd is not None:  # the template's own /proc/self/statm, opened at its warm-up
        os.close(_statm_fd)
        _statm_fd = None
    # Per-worker setup hook: here, after the fork and before the first step, knowing the
    # worker's ``lane``; before the control thread starts, so the sandbox holds every
    # thread of the worker (Landlock restricts the calling thread and what it starts).
    seat = Seat(seats_path, seat_index)  # opened for writing: before the sandbox
    sandbox = _setup_sandbox(lane)
    # The initializer runs under the sandbox (a pool worker's set-up is read-only too) and
    # before the hellos, so no task reaches a worker that is not set up, and the deadline
    # the supervisor keeps for each new worker's start bounds it.
    failure = _initialize()
    tasks = _connect(address, Channel.TASK, slot_id, sandbox, secret, failure)
    if failure is not None:  # the supervisor reads the failure from the hello just sent,
        try:                 # and checks who sent it: alive until it closes the socket
            tasks.recv_bytes()
        except (EOFError, OSError):
            pass
        os._exit(1)
    control = _connect(address, Channel.CONTROL, slot_id, sandbox, secret)
    os.register_at_fork(after_in_child=lambda: _forked_by_a_step(tasks, control))
    threading.Thread(target=_control_loop, args=(control,), name="governor-control", daemon=True).start()
    _rss_figures()  # start the first task's peak from here
    baseline = hygiene.capture()  # last: after the control thread and any setup above
    frames, fd = Frames(), tasks.fileno()
    while True:
        try:
            frame = frames.next(fd)
        except (EOFError, OSError, ValueError):  # ValueError: over the cap, which the supervisor keeps
            os._exit(0)  # the supervisor retired this worker, or is gone
        number, taken = _take_assignment()
        if not taken:  # taken back by the supervisor: it runs elsewhere
            send_frame(fd, skipped_to_wire(Skipped(TASK_ID.unpack_from(frame)[0], number)))
            continue
        # Taking it: should unpickling its arguments end this process (a __reduce__ that
        # calls os._exit), the seat tells the supervisor, which fails the task rather than
        # sending it to worker after worker.
        task_id = TASK_ID.unpack_from(frame)[0]
        seat.write(-task_id)
        try:
            assignment = Assignment(*pickle.loads(memoryview(frame)[TASK_ID.size:]))
        except Exception as exc:  # an argument this process cannot rebuild: the task's error, not
            outcome = _unreadable(task_id, exc)  # the worker's death (each replacement would die of it too)
        else:
            seat.write(task_id)
            outcome = run_step(_steps[assignment.step], assignment.task_id, assignment.step, assignment.args,
                               assignment.kwargs, assignment.hard_cap_mb, assignment.chunk, assignment.cwd)
            if _forked_by_step:
                os._exit(0)  # a child the step forked returned from it: it is no worker
        # What the step left running dies before its caller has the result (~6 us when
        # it left nothing); the rest of the clean-up waits until the outcome is sent.
        proctree.kill_descendants()
        send_frame(fd, _dump_outcome(outcome))
        problem = hygiene.restore(baseline)
        if problem is not None:
            send_frame(fd, dirty_to_wire(Dirty(problem)))
            os._exit(0)


def _setup_sandbox(lane: str) -> Optional[tuple]:
    """Hold a pool worker to read-only (issue 17); ``(label, missing, tmpdir)`` for its hello.

    Only the pool lane, and only with a policy (``sandbox="off"`` sends none); never the
    template, whose critical workers must write. What must be opened for writing later
    (``clear_refs``) is opened first: the sandbox refuses it afterwards.
    """
    global _sandbox_report, _clear_refs_fd
    try:
        _clear_refs_fd = os.open("/proc/self/clear_refs", os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        _clear_refs_fd = None  # no peak reset: the peak figures stay the lifetime high-water mark
    if lane != "pool" or _sandbox_policy is None:
        return None
    _sandbox_report = _sandbox.apply(_sandbox_policy)
    return _sandbox_report.label, _sandbox_report.missing, _sandbox_report.tmpdir


def _connect(address: str, channel: Channel, slot_id: int, sandbox: Optional[tuple], secret: str,
             init_failure: Optional[str] = None) -> Connection:
    connection = Client(address, family="AF_UNIX")
    connection.send_bytes(hello_to_wire(Hello(channel, slot_id, os.getpid(), sandbox, init_failure), secret))
    return connection


def _unreadable(task_id: int, error: Exception) -> Outcome:
    """The outcome of an assignment this worker could not unpickle (its step never ran)."""
    now = time.monotonic()
    return Outcome(OutcomeKind.ERROR, now, now, os.getpid(), task_id, exc_type=_qualified_name(type(error)),
                   exc_message=f"its arguments could not be rebuilt in the worker: {error}",
                   traceback_text="".join(traceback.format_exception(error)))


def _forked_by_a_step(*connections: Connection) -> None:
    # In a process a step forked: the worker's sockets are not its to hold (they would
    # keep the worker's EOF from the supervisor after the worker dies).
    global _forked_by_step
    _forked_by_step = True
    for connection in connections:
        connection.close()


def _dump_outcome(outcome: Outcome) -> bytes:
    try:
        return outcome_to_wire(outcome)
    except Exception as exc:  # the step's value does not pickle
        return outcome_to_wire(outcome._replace(
            kind=OutcomeKind.ERROR, value=None, exception=None, exc_type=_qualified_name(type(exc)),
            exc_message=f"its result could not be sent back from the worker: {exc}",
            traceback_text="".join(traceback.format_exception(exc))))


def _control_loop(connection: Connection) -> None:
    while True:
        try:
            message = pickle.loads(connection.recv_bytes())
        except (EOFError, OSError):
            # The supervisor is gone: take every process of this worker's group with us.
            os.killpg(0, signal.SIGKILL)
            return
        match message:
            case Cancel(task_id, reason, detail):
                deliver_cancel(task_id, reason, detail)
            case Revoke(task_id, number) if _revoke(number):
                if HOLD_REVOKED_DIR is not None:
                    _hold_revoked(HOLD_REVOKED_DIR)
                connection.send_bytes(revoked_to_wire(Revoked(task_id, number)))


def _hold_revoked(directory: str) -> None:
    """Tests only (:data:`HOLD_REVOKED_DIR`): say a task was taken back, then wait for the
    test's ``answer`` file, or :data:`HOLD_REVOKED_PATIENCE_S`."""
    with open(os.path.join(directory, "revoked"), "w"):
        pass
    deadline = time.monotonic() + HOLD_REVOKED_PATIENCE_S
    while not os.path.exists(os.path.join(directory, "answer")) and time.monotonic() < deadline:
        time.sleep(0.002)


def _take_assignment() -> Tuple[int, bool]:
    """Count the assignment just read: its number, and ``False`` if the supervisor took it
    back first."""
    global _assignments_taken
    with _lock:
        _assignments_taken += 1
        if _assignments_taken in _revoked:
            _revoked.discard(_assignments_taken)
            return _assignments_taken, False
        return _assignments_taken, True


def _revoke(number: int) -> bool:
    """Skip the ``number``-th assignment, unless it is already taken; whether it will be."""
    with _lock:
        if _assignments_taken >= number:
            return False
        _revoked.add(number)
        return True


def deliver_cancel(task_id: int, reason: str, detail: Optional[str]) -> None:
    """Set the cancel flag of task ``task_id``'s context, now or when it starts here."""
    with _lock:
        current = _context.current_context()
        if current.task_id == task_id:
            current.request_cancel(reason, detail)
        else:
            # For a task sent ahead, not started yet (or one just ended: a stale entry,
            # dropped once newer ones push it out).
            _early_cancels[task_id] = (reason, detail)
            while len(_early_cancels) > EARLY_CANCELS_KEPT:
                del _early_cancels[next(iter(_early_cancels))]


def run_step(spec: Any, task_id: int, step: str, args: tuple, kwargs: dict,
             hard_cap_mb: Optional[float], chunk: bool = False, cwd: Optional[str] = None) -> Outcome:
    """Run ``spec`` (a step's spec) as task ``task_id``: context, hard cap, memory figures.

    Never raises for the step's own errors: they are the outcome. With ``chunk``, ``args``
    holds one argument tuple per call and the value is the list of results. With ``cwd``,
    the step runs in that directory (one it cannot enter is its error); the caller puts
    the worker's own back afterwards (``hygiene.restore``).
    """
    ctx = _context.StepContext(task_id, step)
    with _lock:
        early = _early_cancels.pop(task_id, None)
        if early is None:
            _context._set_current(ctx)
    if early is not None:  # cancelled before it started (a task sent ahead): it does not start
        now = time.monotonic()
        return Outcome(OutcomeKind.CANCELLED, now, now, os.getpid(), task_id)
    restore_cap = _apply_hard_cap(hard_cap_mb) if hard_cap_mb else None
    denials.forget()  # a refusal of this task is never blamed on an earlier task's path
    started = time.monotonic()
    try:
        if cwd is not None:
            os.chdir(cwd)
        value = [spec.invoke(item, kwargs) for item in args] if chunk else spec.invoke(args, kwargs)
        kind, error = OutcomeKind.OK, None
    except BaseException as exc:  # the step's failure is data; SystemExit included
        value = None
        if ctx.cancelled and isinstance(exc, StepCancelled):
            kind = OutcomeKind.CANCELLED
        elif restore_cap is not None and isinstance(exc, MemoryError):
            kind = OutcomeKind.OVER_MEMORY
        else:
            kind = OutcomeKind.ERROR
        error = exc
    ended = time.monotonic()
    if restore_cap is not None:
        restore_cap()
    with _lock:
        _context._set_current(None)
    peak, rss = _rss_figures()
    if error is None:
        return Outcome(kind, started, ended, os.getpid(), task_id, value=value, peak_rss_bytes=peak, rss_bytes=rss)
    denied = _sandbox.denied_write(error, _sandbox_report) if kind is OutcomeKind.ERROR else None
    return Outcome(kind, started, ended, os.getpid(), task_id,
                   exc_type=_qualified_name(type(error)), exc_message=str(error),
                   traceback_text="".join(traceback.format_exception(error)),
                   exception=error.with_traceback(None), peak_rss_bytes=peak, rss_bytes=rss, denied_path=denied)


def _qualified_name(cls: type) -> str:
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _rss_figures() -> tuple:
    """(peak RSS during the task just run, current RSS) in bytes.

    The peak is the kernel's high-water mark (``ru_maxrss``), which :func:`_forget_peak`
    brings down to the current RSS whenever a task leaves it stale, so it always measures
    the last task alone.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        rss = int(os.pread(_statm(), 64, 0).split()[1]) * _PAGE_SIZE
    except OSError:
        return peak, None
    if peak > rss + PEAK_RESET_SLACK_BYTES:
        _forget_peak()
    return peak, rss


def _statm() -> int:
    global _statm_fd
    if _statm_fd is None:
        _statm_fd = os.open("/proc/self/statm", os.O_RDONLY)
    return _statm_fd


def _forget_peak() -> None:
    # Writing 5 to clear_refs resets the high-water RSS to the current RSS (Linux >= 4.0),
    # through the fd opened before the sandbox (a sandboxed worker may not open it).
    if _clear_refs_fd is None:
        return
    try:
        os.write(_clear_refs_fd, b"5")
    except OSError:
        pass


def _apply_hard_cap(limit_mb: float):
    """Cap the worker's address space for one task so its RSS cannot pass ``limit_mb``.

    The task may grow its address space by the headroom its RSS has left: every new
    allocation it touches becomes RSS, so the cap fails an allocation before the RSS
    reaches the limit, and before the supervisor's sampler would have to kill.
    """
    with open("/proc/self/statm", "rb") as statm:
        size_pages, resident_pages = (int(field) for field in statm.read().split()[:2])
    headroom = max(0, int(limit_mb * 2 ** 20) - resident_pages * _PAGE_SIZE)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = size_pages * _PAGE_SIZE + headroom
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
