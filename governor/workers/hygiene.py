"""A clean worker for every task: what a worker puts back after each step, and when it cannot.

A step runs in a long-lived worker process, so whatever process-wide state it changes
reaches the next task on that worker (issue 16, item 4: after one step set
``RLIMIT_NOFILE`` to 10, an innocent next task failed with ``EMFILE``). Use::

    baseline = hygiene.capture()          # once, in the worker, after it started
    ...
    problem = hygiene.restore(baseline)   # after every step, on the thread that ran it
    if problem is not None:               # the worker is dirty: recycle it
        ...                               # (worker_recycles{reason="dirty"}; log ``problem``)

What is put back: the current directory, the environment (``os.environ``), the recursion
limit, signal handlers, the signal mask and wakeup fd, interval timers (``alarm``,
``setitimer``), every resource limit, the umask, the scheduling priority (nice) and the
CPU affinity. What makes a worker dirty: a Python thread the step left running, or any of
the above that cannot be put back (the directory is gone; a hard rlimit was lowered, or
the priority raised, without the privilege to undo it).

What it does not give: Python-level state stays as the step left it (monkeypatched
modules, ``sys.path``, caches, module globals, ``sys.stdout``); the environment changed
through ``os.putenv`` or C code, bypassing ``os.environ``, is not seen; threads started by
C code and never known to ``threading`` are not counted; open file descriptors are not
closed. A step's child processes are ``governor.workers.proctree.kill_descendants``'s business.

Cost: about 10-20 us per :func:`restore` on the 2-core VM when nothing changed (the
resource limits in one read of ``/proc/self/limits``, ~3 us, where 16 ``getrlimit`` calls
took ~7.5; 64 handler reads); a change costs its repair.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
import threading
import time
from typing import Dict, FrozenSet, List, Optional, Tuple

# ``signal.getsignal`` wraps each handler in an enum on the way out, which made reading
# every handler cost 130 us here; ``_signal`` is the same C function without the wrapper
# (7 us for all of them).
import _signal

import attrs

#: Every resource limit this platform has, by name (for messages) and number.
RLIMITS: Tuple[Tuple[str, int], ...] = tuple(sorted(
    (name, getattr(resource, name)) for name in dir(resource) if name.startswith("RLIMIT_")))

_RLIMIT_NUMBERS: Tuple[int, ...] = tuple(number for _, number in RLIMITS)

#: Signals whose handlers are compared: every one Python may set (not SIGKILL, SIGSTOP).
_SIGNALS: Tuple[int, ...] = tuple(sorted(
    number for number in signal.valid_signals() if number not in (signal.SIGKILL, signal.SIGSTOP)))

#: More than ``/proc/self/limits`` holds (~1.4 KiB: a line per limit).
_LIMITS_READ_BYTES = 8192

_TIMERS: Tuple[Tuple[str, int], ...] = (("ITIMER_REAL", signal.ITIMER_REAL),
                                        ("ITIMER_VIRTUAL", signal.ITIMER_VIRTUAL),
                                        ("ITIMER_PROF", signal.ITIMER_PROF))

#: How long :func:`restore` lets threads the step started finish before it counts them as
#: left running. A thread whose function has returned leaves ``threading.enumerate()``
#: microseconds later; a thread still working will not be done in 5 ms either, and a
#: dirty worker pays this wait once, before it is recycled.
THREAD_EXIT_PATIENCE_S = 0.005


@attrs.frozen
class Baseline:
    """A worker's process state as captured by :func:`capture`; opaque to callers."""

    cwd: str
    environ: Dict[str, str]
    environ_data: Dict[bytes, bytes]
    recursion_limit: int
    handlers: Tuple[Tuple[int, object], ...]
    signal_mask: FrozenSet[int]
    wakeup_fd: int
    armed_timers: FrozenSet[int]
    rlimits: Tuple[Tuple[str, int, Tuple[int, int]], ...]
    umask: int
    priority: int
    affinity: FrozenSet[int]
    threads: FrozenSet[int]
    # The same figures in the shape a whole-state read gives them (see restore()).
    rlimit_values: Tuple[Tuple[int, int], ...] = ()
    handler_values: Tuple[object, ...] = ()
    # /proc/self/limits, kept open, and its text at capture: every limit in one read.
    limits_fd: Optional[int] = None
    limits_text: bytes = b""


def capture() -> Baseline:
    """Record this process's state, to restore after each step. Call it on the main thread.

    Raises:
        ValueError: off the main thread (signal state can only be read and set there).
    """
    if threading.current_thread() is not threading.main_thread():
        raise ValueError("hygiene.capture() must run on the main thread, where steps run")
    umask = os.umask(0)
    os.umask(umask)
    wakeup_fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup_fd)
    return Baseline(
        cwd=os.getcwd(),
        environ=dict(os.environ),
        environ_data=dict(os.environ._data),  # see _restore_environ
        recursion_limit=sys.getrecursionlimit(),
        handlers=tuple((number, _signal.getsignal(number)) for number in _SIGNALS),
        signal_mask=frozenset(signal.pthread_sigmask(signal.SIG_BLOCK, ())),
        wakeup_fd=wakeup_fd,
        armed_timers=frozenset(which for _, which in _TIMERS if signal.getitimer(which) != (0.0, 0.0)),
        rlimits=tuple((name, number, resource.getrlimit(number)) for name, number in RLIMITS),
        umask=umask,
        priority=os.getpriority(os.PRIO_PROCESS, 0),
        affinity=frozenset(os.sched_getaffinity(0)),
        threads=frozenset(thread.ident for thread in threading.enumerate()),
        rlimit_values=tuple(map(resource.getrlimit, _RLIMIT_NUMBERS)),
        handler_values=tuple(map(_signal.getsignal, _SIGNALS)),
        **_limits_file(),
    )


def _limits_file() -> Dict[str, object]:
    """``limits_fd`` and ``limits_text`` for a :class:`Baseline`: ``/proc/self/limits`` open
    for the rest of the process's life, and its text now (nothing where there is none)."""
    try:
        fd = os.open("/proc/self/limits", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        return {"limits_fd": fd, "limits_text": os.pread(fd, _LIMITS_READ_BYTES, 0)}
    except OSError:
        os.close(fd)
        return {}


def _limits_changed(baseline: Baseline) -> bool:
    """Whether a resource limit differs from ``baseline``'s.

    One read of ``/proc/self/limits``, which shows every soft and hard limit, costs half
    what 16 ``getrlimit`` calls do (each a syscall). If a step closed that file, or put
    another file at its number, the limits are read one by one: a text that differs only
    sends :func:`restore` to compare them one by one, so it can never hide a change.
    """
    if baseline.limits_fd is not None:
        try:
            if os.pread(baseline.limits_fd, _LIMITS_READ_BYTES, 0) == baseline.limits_text:
                return False
        except OSError:
            pass
    return tuple(map(resource.getrlimit, _RLIMIT_NUMBERS)) != baseline.rlimit_values


def restore(baseline: Baseline) -> Optional[str]:
    """Put back what a step changed; say why the worker is dirty, if it is.

    Call it on the main thread after every step (with the step's context cleared).
    Everything that can be put back is, even when something else cannot.

    Args:
        baseline: what :func:`capture` recorded in this process.

    Returns:
        ``None`` for a clean worker, else one line naming every problem (for the log; the
        worker should be recycled).

    Raises:
        ValueError: off the main thread.
    """
    if threading.get_ident() != threading.main_thread().ident:
        raise ValueError("hygiene.restore() must run on the main thread, where steps run")
    problems: List[str] = []
    # Each group is read whole first (the loops in C) and repaired item by item only if it
    # changed: after a step that changed nothing this costs ~12 us instead of ~33.
    # Limits first: with RLIMIT_NOFILE at 10 or RLIMIT_CPU spent, the rest could fail.
    if _limits_changed(baseline):
        _restore_rlimits(baseline, problems)
    _restore_cwd(baseline, problems)
    _restore_environ(baseline, problems)
    if sys.getrecursionlimit() != baseline.recursion_limit:
        sys.setrecursionlimit(baseline.recursion_limit)
    if tuple(map(_signal.getsignal, _SIGNALS)) != baseline.handler_values:
        _restore_handlers(baseline, problems)
    _restore_signal_state(baseline)
    os.umask(baseline.umask)
    _restore_scheduling(baseline, problems)
    if threading.active_count() != len(baseline.threads):  # the same count is the same threads:
        _check_threads(baseline, problems)                 # the worker's own never end
    return "; ".join(problems) if problems else None


def _restore_rlimits(baseline: Baseline, problems: List[str]) -> None:
    for name, number, limits in baseline.rlimits:
        now = resource.getrlimit(number)
        if now == limits:
            continue
        try:
            resource.setrlimit(number, limits)
        except (ValueError, OSError) as error:  # a lowered hard limit, unprivileged
            problems.append(f"{name} is {now} and cannot be put back to {limits}: {error}")


def _restore_cwd(baseline: Baseline, problems: List[str]) -> None:
    try:
        if os.getcwd() == baseline.cwd:
            return
    except OSError:  # the current directory was removed
        pass
    try:
        os.chdir(baseline.cwd)
    except OSError as error:
        problems.append(f"the working directory {baseline.cwd} cannot be entered again: {error}")


def _restore_environ(baseline: Baseline, problems: List[str]) -> None:
    # os.environ's own comparison decodes every entry (135 us); its encoded mapping
    # compares in 3 us. ``_data`` is private but has been os._Environ's store since 3.2.
    data = getattr(os.environ, "_data", None)
    if data is None:
        problems.append("os.environ was replaced by another object")
        return
    if data == baseline.environ_data:
        return
    for name in [name for name in os.environ if name not in baseline.environ]:
        del os.environ[name]
    for name, value in baseline.environ.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


def _restore_handlers(baseline: Baseline, problems: List[str]) -> None:
    for number, handler in baseline.handlers:
        if _signal.getsignal(number) == handler:
            continue
        if handler is None:  # installed outside Python at capture: nothing to put back
            problems.append(f"the handler of {signal.Signals(number).name} changed and cannot be put back")
            continue
        try:
            signal.signal(number, handler)
        except (ValueError, OSError) as error:
            problems.append(f"the handler of {signal.Signals(number).name} cannot be put back: {error}")


def _restore_signal_state(baseline: Baseline) -> None:
    # _signal's own pthread_sigmask: signal's wraps every member of the old mask in an enum.
    _signal.pthread_sigmask(signal.SIG_SETMASK, baseline.signal_mask)
    signal.set_wakeup_fd(baseline.wakeup_fd)
    for _, which in _TIMERS:
        if which not in baseline.armed_timers and signal.getitimer(which) != (0.0, 0.0):
            signal.setitimer(which, 0)  # a leftover alarm would kill the next task


def _restore_scheduling(baseline: Baseline, problems: List[str]) -> None:
    priority = os.getpriority(os.PRIO_PROCESS, 0)
    if priority != baseline.priority:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, baseline.priority)
        except OSError as error:  # raising the priority back needs CAP_SYS_NICE
            problems.append(f"the priority is {priority} and cannot be put back to {baseline.priority}: {error}")
    affinity = os.sched_getaffinity(0)
    if affinity != baseline.affinity:
        try:
            os.sched_setaffinity(0, baseline.affinity)
        except OSError as error:
            problems.append(f"the CPU affinity is {sorted(affinity)} and cannot be put back: {error}")


def _check_threads(baseline: Baseline, problems: List[str]) -> None:
    extra = [thread for thread in threading.enumerate() if thread.ident not in baseline.threads]
    if not extra:
        return
    # Polled, not joined: a thread started outside ``threading`` (a _DummyThread) cannot be.
    deadline = time.monotonic() + THREAD_EXIT_PATIENCE_S
    while any(thread.is_alive() for thread in extra) and time.monotonic() < deadline:
        time.sleep(THREAD_EXIT_PATIENCE_S / 10)
    left = [thread.name for thread in extra if thread.is_alive()]
    if left:
        problems.append(f"{len(left)} thread(s) left running: {', '.join(left)}")
