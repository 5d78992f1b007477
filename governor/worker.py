"""Code that runs inside a worker process (one loky worker per slot).

Data flow inside one worker::

    loky call queue ──> run_task(task_id, step, args, kwargs, hard_cap_mb) ──> Outcome ──> loky result queue
    control socket  <── ("hello", slot_id, pid)          (once, from initialize)
    control socket  ──> ("cancel", task_id, reason, detail) ──> control thread ──> StepContext flag

The control socket is a Unix-socket connection *to* the supervisor, made by
:func:`initialize`. It does three jobs: it tells the supervisor the worker's pid, it
carries cooperative cancels, and it is a lifeline both ways. When the worker dies, the
supervisor reads EOF at once (no polling, no waiting for loky to notice); when the
supervisor dies, the worker's control thread reads EOF and kills its own process group, so
no step outlives the supervisor.

The worker calls ``os.setsid()`` first: it leads its own process group, which every
process a step starts inherits, so the supervisor can kill the whole tree with one
``killpg`` even after the worker itself is gone.
"""

from __future__ import annotations

import gc
import importlib
import os
import resource
import signal
import threading
import time
import pickle
import traceback
from multiprocessing.connection import Client, Connection
from typing import Any, Dict, Optional, Sequence

import attrs

from governor import context as _context
from governor.errors import StepCancelled

#: Environment for loky workers. loky recycles a worker whose memory grew by 300 MB, which
#: would swap the process under a slot without the supervisor's knowledge; the supervisor
#: recycles workers itself (``recycle_rss_mb``), so loky's check is switched off here.
WORKER_ENV = {"LOKY_MAX_MEMORY_LEAK_SIZE": str(2 ** 62)}

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

#: A task whose peak RSS ends this far above the worker's RSS at its end leaves a stale
#: high-water mark; only then is it reset (a write to /proc/self/clear_refs, ~8 us), so a
#: task that does not allocate pays ~2 us for its memory figures instead of ~25 us.
PEAK_RESET_SLACK_BYTES = 1 << 20

_steps: Dict[str, Any] = {}
_control: Optional[Connection] = None
_statm_fd: Optional[int] = None
_lock = threading.Lock()
# Cancels that arrived before their task started (the cancel and the dispatch crossed).
_early_cancels: Dict[int, tuple] = {}


@attrs.frozen
class Outcome:
    """What a worker sends back for one task.

    Attributes:
        kind: ``"ok"``, ``"error"``, ``"cancelled"`` (the step stopped on its context's
            cancel) or ``"over_memory"`` (the hard cap refused an allocation).
        value: the step's return value for ``"ok"``.
        exc_type, exc_message, traceback_text: the step's exception for ``"error"``.
        exception: the exception itself when it pickles, else ``None``.
        started_at, ended_at: ``time.monotonic()`` in the worker around the step.
        pid: the worker's pid.
        peak_rss_bytes: the worker's peak RSS during the step (``None`` if unknown).
        rss_bytes: the worker's RSS after the step, for leak recycling.
    """

    kind: str
    started_at: float
    ended_at: float
    pid: int
    value: Any = None
    exc_type: Optional[str] = None
    exc_message: Optional[str] = None
    traceback_text: Optional[str] = None
    exception: Optional[BaseException] = None
    peak_rss_bytes: Optional[int] = None
    rss_bytes: Optional[int] = None


def initialize(slot_id: int, control_address: str, steps: Dict[str, Any], modules: Sequence[str]) -> None:
    """loky initializer: lead a process group, connect to the supervisor, import step modules."""
    global _control
    os.setsid()
    _steps.update(steps)
    _control = Client(control_address, family="AF_UNIX")
    _control.send(("hello", slot_id, os.getpid()))
    threading.Thread(target=_control_loop, args=(_control,), name="governor-control", daemon=True).start()
    for module in modules:
        importlib.import_module(module)


def warm_up() -> int:
    """First call on a new worker: pays loky's first-call GC and returns the pid."""
    gc.collect()
    _rss_figures()  # start the first task's peak from here, not from the imports
    return os.getpid()


def _control_loop(connection: Connection) -> None:
    while True:
        try:
            kind, task_id, reason, detail = connection.recv()
        except (EOFError, OSError):
            # The supervisor is gone: take every process of this worker's group with us.
            os.killpg(0, signal.SIGKILL)
            return
        if kind == "cancel":
            deliver_cancel(task_id, reason, detail)


def deliver_cancel(task_id: int, reason: str, detail: Optional[str]) -> None:
    """Set the cancel flag of task ``task_id``'s context, now or when it starts here."""
    with _lock:
        current = _context.current_context()
        if current.task_id == task_id:
            current.request_cancel(reason, detail)
        else:
            _early_cancels.clear()  # only the next task can be the one meant
            _early_cancels[task_id] = (reason, detail)


def run_task(task_id: int, step: str, args: tuple, kwargs: dict, hard_cap_mb: Optional[float]) -> Outcome:
    """Run one registered step and describe how it ended; never raises for the step's own errors."""
    return run_step(_steps[step], task_id, step, args, kwargs, hard_cap_mb)


def run_step(spec: Any, task_id: int, step: str, args: tuple, kwargs: dict,
             hard_cap_mb: Optional[float]) -> Outcome:
    """Run ``spec`` (a step's spec) as task ``task_id``: context, hard cap, memory figures."""
    ctx = _context.StepContext(task_id, step)
    with _lock:
        early = _early_cancels.pop(task_id, None)
        if early is not None:
            ctx.request_cancel(*early)
        _context._set_current(ctx)
    restore_cap = _apply_hard_cap(hard_cap_mb) if hard_cap_mb else None
    started = time.monotonic()
    try:
        value = spec.invoke(args, kwargs)
        kind, error = "ok", None
    except BaseException as exc:  # the step's failure is data; SystemExit included
        value = None
        if ctx.cancelled and isinstance(exc, StepCancelled):
            kind = "cancelled"
        elif restore_cap is not None and isinstance(exc, MemoryError):
            kind = "over_memory"
        else:
            kind = "error"
        error = exc
    ended = time.monotonic()
    if restore_cap is not None:
        restore_cap()
    with _lock:
        _context._set_current(None)
    peak, rss = _rss_figures()
    if error is None:
        return Outcome("ok", started, ended, os.getpid(), value=value, peak_rss_bytes=peak, rss_bytes=rss)
    return Outcome(kind, started, ended, os.getpid(),
                   exc_type=_qualified_name(type(error)), exc_message=str(error),
                   traceback_text="".join(traceback.format_exception(error)),
                   exception=_picklable_or_none(error), peak_rss_bytes=peak, rss_bytes=rss)


def _qualified_name(cls: type) -> str:
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _picklable_or_none(error: BaseException) -> Optional[BaseException]:
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return None
    return error.with_traceback(None)


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
    # Writing 5 to clear_refs resets the high-water RSS to the current RSS (Linux >= 4.0).
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
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
