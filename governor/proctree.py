"""A worker's process tree: measure its memory, kill all of it, learn how a worker ended.

Cost model (psutil 7 on a 2-core Linux box, see FIELD-NOTES): ``memory_info()`` on a kept
``psutil.Process`` costs ~35 us; ``children(recursive=True)`` scans every process on the
system (1-4 ms). So a :class:`TreeSampler` keeps its ``Process`` objects, reads the worker's
RSS at every sample, and rescans for descendants only every
:data:`DESCENDANT_SCAN_INTERVAL_S`: a child the step starts is counted from the next scan
on. (``/proc/PID/task/*/children`` would be cheaper but needs CONFIG_PROC_CHILDREN, which
not every kernel has.)

Killing relies on the worker leading its own process group (``os.setsid()`` in
:func:`governor.worker.serve`): one ``killpg`` reaches every process the step started,
even after the worker is dead. Processes that left the group (a daemonising grandchild
calls ``setsid`` too) are found by a descendant scan taken *before* the kill, while the
parent links still exist.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Dict, List, Optional, Tuple

import psutil

#: How often the RSS of each memory-limited task's process tree is sampled (by the local
#: lanes, and by the watchdog in a Ray worker). At 10 ms a step allocating 500 MB/s
#: overshoots by about 5 MB before it is seen.
MEMORY_SAMPLE_INTERVAL_S = 0.01

#: How often a sampler looks for new descendants of its worker. A scan costs 1-4 ms of the
#: supervisor's time, so scanning at every 10 ms sample would cost a third of a core; a
#: child started since the last scan is missed for at most this long.
DESCENDANT_SCAN_INTERVAL_S = 0.1

#: How long :func:`wait_dead` waits by default for a dying process to become a zombie.
EXIT_STATUS_PATIENCE_S = 0.05


def mib(size_bytes: Optional[int]) -> Optional[float]:
    """Bytes in MiB (``None`` stays ``None``)."""
    return None if size_bytes is None else size_bytes / 2 ** 20


class TreeSampler:
    """Measures the RSS of one worker and its descendants, cheaply enough for 10 ms sampling."""

    def __init__(self, pid: int, clock=time.monotonic):
        self.pid = pid
        self._clock = clock
        self._worker = psutil.Process(pid)
        self._descendants: Dict[int, psutil.Process] = {}
        self._scanned_at = float("-inf")

    def descendants(self, rescan: bool = False) -> List[psutil.Process]:
        """The worker's descendants, rescanned if asked or if the last scan is stale."""
        now = self._clock()
        if rescan or now - self._scanned_at >= DESCENDANT_SCAN_INTERVAL_S:
            self._scanned_at = now
            try:
                found = self._worker.children(recursive=True)
            except psutil.NoSuchProcess:
                found = []
            # Keep the Process objects we already hold: creating one costs 50-100 us.
            self._descendants = {p.pid: self._descendants.get(p.pid, p) for p in found}
        return list(self._descendants.values())

    def rss_bytes(self) -> int:
        """RSS of the worker plus its known descendants, in bytes (0 if the worker is gone)."""
        total = 0
        for process in [self._worker, *self.descendants()]:
            try:
                total += process.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return total


def kill_tree(pid: int, sampler: TreeSampler) -> None:
    """Kill a worker's process group and every descendant of the worker.

    The group is frozen first (SIGSTOP): the step stops at once, and the worker stays
    alive, so the parent links that lead to descendants which left the group (a
    daemonising grandchild) survive the scan that finds them. Then SIGKILL for all.

    No SIGTERM phase: by the time the supervisor kills, the step already had its polite
    signal (the cooperative cancel and its grace), or it broke a hard limit whose point is
    that it ends now. ``psutil.Process.kill`` checks the process's creation time, so a
    recycled pid is never hit.
    """
    _signal_group(pid, signal.SIGSTOP)
    descendants = sampler.descendants(rescan=True)
    _signal_group(pid, signal.SIGKILL)
    for process in descendants:
        try:
            process.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def _signal_group(pgid: int, signal_number: int) -> None:
    try:
        os.killpg(pgid, signal_number)
    except (ProcessLookupError, PermissionError):
        pass


def wait_dead(pid: int, patience_s: float = EXIT_STATUS_PATIENCE_S) -> bool:
    """Wait (up to ``patience_s``) until ``pid``, not a child of ours, is gone or a zombie.

    For a process known to be dying (its sockets just closed): the kernel closes a dying
    process's files a moment before it becomes a zombie. Returns whether it is dead.
    """
    deadline = time.monotonic() + patience_s
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.001)


def kill_own_tree() -> None:
    """Kill every descendant of this process, then this process: for a worker that must
    end itself (a Ray worker, whose parent is not ours to ask).

    Descendants are frozen as they are found and looked for twice, so one that forked
    between the first scan and its SIGSTOP is caught by the second. If this process leads
    its own group, the group is killed too: that reaches a group member whose parent is
    already gone. Never returns.
    """
    me = psutil.Process()
    frozen: Dict[int, psutil.Process] = {}
    for _ in range(2):
        for process in me.children(recursive=True):
            if process.pid in frozen:
                continue
            try:
                process.suspend()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            frozen[process.pid] = process
    for process in frozen.values():
        try:
            process.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    if os.getpgid(0) == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
