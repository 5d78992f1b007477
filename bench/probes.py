"""Instruments the scenarios measure with: when a future resolved, when a process died,
when a file appeared, which processes are Governor's workers, when a lane is full again,
how deep a lane's queue is, what CPU workers used.

Clocks: latencies measured only in this process use ``time.perf_counter``. Wherever a
figure is compared with a timestamp the governor or a worker took (``Task.dispatched_at``,
a worker's ``time.monotonic()``), ``time.monotonic`` is used instead: on Linux it reads the
system-wide ``CLOCK_MONOTONIC``, the same clock in every process.
"""

from __future__ import annotations

import concurrent.futures
import os
import select
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import psutil
from governor import Supervisor

#: How often a file or a counter is polled while waiting for it. 1 ms bounds the added
#: error of an ordering wait while costing the (2-core) machine little.
POLL_S = 0.001

#: How long any wait of the harness may take before it counts as a hang and raises.
PATIENCE_S = 60.0


class ResolutionStamp:
    """Records the moment a future resolves, from a done-callback (no waiter wake-up in it).

    Args:
        future: the future to watch.
        clock: the clock to read (``time.perf_counter`` or ``time.monotonic``).

    Attributes:
        at: the clock's reading when the future resolved (``None`` until then).
    """

    def __init__(self, future: concurrent.futures.Future, clock: Callable[[], float] = time.perf_counter):
        self.at: Optional[float] = None
        self._clock = clock
        self._done = threading.Event()
        future.add_done_callback(self._stamp)

    def _stamp(self, _future: concurrent.futures.Future) -> None:
        self.at = self._clock()
        self._done.set()

    def wait(self, timeout: float = PATIENCE_S) -> float:
        """Block until the future resolved; return :attr:`at`.

        Raises:
            TimeoutError: if it did not resolve within ``timeout``.
        """
        if not self._done.wait(timeout):
            raise TimeoutError(f"a future did not resolve within {timeout}s")
        return self.at


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie is dead: it only waits to be reaped)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class DeathWatch:
    """Tells when a process died, without reaping it (its parent, loky, reaps it).

    Opened while the process is alive, so a recycled pid cannot fool it. On Linux >= 5.3
    it waits on a pidfd, which becomes readable the moment the process exits; elsewhere it
    polls psutil every :data:`POLL_S`.

    Args:
        pid: the process to watch.
    """

    def __init__(self, pid: int):
        self.pid = pid
        self._fd: Optional[int] = None
        try:
            self._fd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self._fd = None

    def wait(self, clock: Callable[[], float] = time.perf_counter, timeout: float = PATIENCE_S) -> float:
        """Block until the process is dead; return ``clock()`` read right then.

        Raises:
            TimeoutError: if it still lives after ``timeout``.
        """
        if self._fd is not None:
            ready, _, _ = select.select([self._fd], [], [], timeout)
            if not ready:
                raise TimeoutError(f"process {self.pid} still alive after {timeout}s")
            return clock()
        deadline = time.monotonic() + timeout
        while alive(self.pid):
            if time.monotonic() > deadline:
                raise TimeoutError(f"process {self.pid} still alive after {timeout}s")
            time.sleep(POLL_S)
        return clock()

    def close(self) -> None:
        """Release the pidfd."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "DeathWatch":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def main_thread_usage(pids: Iterable[int]) -> Tuple[float, int]:
    """CPU seconds used and times they went to sleep (voluntary context switches) so far,
    summed over the main threads of ``pids`` (gone ones count nothing).

    The main thread's own figures (``/proc/PID/schedstat``, in ns, and ``/proc/PID/status``),
    not psutil's ``cpu_times`` (whole process, in 10 ms ticks): a worker runs its tasks on its
    main thread, and a no-op costs microseconds.
    """
    seconds, sleeps = 0.0, 0
    for pid in pids:
        used, slept = _thread_usage(f"/proc/{pid}")
        seconds, sleeps = seconds + used, sleeps + slept
    return seconds, sleeps


def threads_usage(pid: int) -> Dict[str, Tuple[float, int]]:
    """CPU seconds used and times they went to sleep so far, by the main thread of ``pid``
    (``"main"``) and by its other threads together (``"others"``), as
    :func:`main_thread_usage` reads them: the daemon's event loop runs on its main thread,
    its supervisor's manager on another."""
    usage = {"main": _thread_usage(f"/proc/{pid}"), "others": (0.0, 0)}
    try:
        tids = [int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid]
    except OSError:
        return usage  # gone
    for tid in tids:
        used, slept = _thread_usage(f"/proc/{pid}/task/{tid}")
        usage["others"] = (usage["others"][0] + used, usage["others"][1] + slept)
    return usage


def _thread_usage(proc: str) -> Tuple[float, int]:
    """(CPU seconds, voluntary context switches) of the thread at ``proc`` (``/proc/PID`` is
    a process's main thread); nothing for one gone meanwhile."""
    try:
        with open(f"{proc}/schedstat") as schedstat:
            seconds = int(schedstat.read().split()[0]) / 1e9
        with open(f"{proc}/status") as status:
            return seconds, next(int(line.split()[1]) for line in status if line.startswith("voluntary_ctxt_switches"))
    except (OSError, StopIteration):
        return 0.0, 0


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = PATIENCE_S) -> None:
    """Poll ``predicate`` every :data:`POLL_S` until it holds.

    Raises:
        TimeoutError: naming ``what`` when it does not hold within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(POLL_S)


def read_pid(marker: Path, timeout: float = PATIENCE_S) -> int:
    """Wait for a step's marker file (see ``bench_steps._announce``) and return its pid."""
    wait_for(marker.exists, f"marker {marker}", timeout)
    return int(marker.read_text())


def live_workers(supervisor: Supervisor, lane: str = "pool") -> int:
    """How many warm, live workers ``supervisor``'s ``lane`` has (busy or idle)."""
    counts = supervisor.metrics()["workers"][lane]
    return counts["busy"] + counts["idle"]


def queue_depth(supervisor: Supervisor, lane: str = "pool") -> int:
    """Tasks waiting in ``lane``'s queue, from ``Supervisor.metrics()``."""
    return supervisor.metrics()["queue_depth"].get(lane, 0)


def wait_restaffed(supervisor: Supervisor, expected: int, lane: str = "pool", timeout: float = PATIENCE_S) -> None:
    """Wait until ``lane`` is back to ``expected`` warm workers (after a kill, a spare is
    consumed and a replacement spawns in the background, taking ~0.2 s).

    Raises:
        TimeoutError: if the lane does not recover within ``timeout``.
    """
    wait_for(lambda: live_workers(supervisor, lane) >= expected, f"the {lane} lane to restaff", timeout)


def governor_processes() -> List[psutil.Process]:
    """This process's Governor processes: each worker template (a child started through
    loky's context, named ``governor-template``) and every worker forked from it."""
    found = []
    for child in psutil.Process().children():
        try:
            if "governor-template" in " ".join(child.cmdline()):
                found += [child, *child.children()]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


#: What the command lines of multiprocessing's per-interpreter helpers hold: they live until
#: the interpreter exits, whatever the run does.
INTERPRETER_HELPERS = ("resource_tracker", "multiprocessing.forkserver import main")


def leftover_children(preexisting: Iterable[psutil.Process] = ()) -> List[psutil.Process]:
    """Live descendants of this process other than the per-interpreter helpers (the resource
    trackers, and the forkserver the peers start their workers from).

    Args:
        preexisting: processes that ran before the caller started its work; they and their
            descendants (as of now: a Ray node's workers come and go) are not counted.
    """
    excluded = set()
    for process in preexisting:
        try:
            # is_running() also compares the start time: a recycled pid is someone else's.
            if process.is_running():
                excluded.update(descendant.pid for descendant in process.children(recursive=True))
                excluded.add(process.pid)
        except psutil.NoSuchProcess:
            continue
    left = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.pid in excluded or not alive(child.pid):
                continue
            if any(helper in " ".join(child.cmdline()) for helper in INTERPRETER_HELPERS):
                continue
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        left.append(child)
    return left

