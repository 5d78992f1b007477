"""A worker's process tree: measure its memory, kill all of it, learn how a worker ended.

Cost model (psutil 7 on a 2-core Linux box, see FIELD-NOTES): ``memory_info()`` on a kept
``psutil.Process`` costs ~35 us; ``children(recursive=True)`` scans every process on the
system (1-4 ms). So a :class:`TreeSampler` keeps its ``Process`` objects, reads the worker's
RSS at every sample, and rescans for descendants only every
:data:`DESCENDANT_SCAN_INTERVAL_S`: a child the step starts is counted from the next scan
on. (``/proc/PID/task/*/children`` would be cheaper but needs CONFIG_PROC_CHILDREN, which
not every kernel has.)

Killing relies on the worker leading its own process group (``os.setsid()`` in
:func:`governor.workers.worker.serve`): one ``killpg`` reaches every process the step started,
even after the worker is dead. Processes that left the group (a daemonising grandchild
calls ``setsid`` too) are found by a descendant scan taken *before* the kill, while the
parent links still exist.

Orphans (issue 16): a process that a step detaches (a double fork, ``setsid``) is
reparented away from the worker, to init, unless an ancestor is a *child subreaper*
(:func:`become_subreaper`): then it lands there, a descendant again, to be found, killed
and reaped. :func:`kill_descendants` ends everything below the calling process but the
subtrees it is told to keep (a worker after each step; the process that starts workers
after one died), and :func:`kill_step_tree` ends a worker's whole tree: its process group,
its session and every descendant of those, in new sessions too. Both take one pass over
``/proc`` per round, freeze what they find (SIGSTOP) until a round finds nothing new, then
SIGKILL deepest first and reap what is theirs to reap. They act through pidfds (Linux >=
5.3) opened after checking the process's start time, so a recycled pid is never hit.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import time
from typing import Callable, Collection, Dict, Iterable, List, NamedTuple, Optional

import psutil

from governor.workers import libc

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


#: How long :func:`kill_descendants` and :func:`kill_step_tree` wait for the processes
#: they SIGKILLed to exit before they give up on reaping them. A SIGKILLed process exits in
#: microseconds unless it is in an uninterruptible sleep (D state: NFS, a hung disk);
#: waiting longer would stall the caller behind such a process for no gain.
KILL_PATIENCE_S = 5.0

# prctl(2) options (linux/prctl.h).
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37


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
            if _PROC_CHILDREN:
                self._descendants = self._known(_descendant_pids(self.pid))
            else:
                try:
                    found = self._worker.children(recursive=True)
                except psutil.NoSuchProcess:
                    found = []
                # Keep the Process objects we already hold: creating one costs 50-100 us.
                self._descendants = {p.pid: self._descendants.get(p.pid, p) for p in found}
        return list(self._descendants.values())

    def _known(self, pids: Iterable[int]) -> Dict[int, psutil.Process]:
        """A ``Process`` for each pid: the one already held, else a new one."""
        known = {}
        for pid in pids:
            process = self._descendants.get(pid)
            if process is None:
                try:
                    process = psutil.Process(pid)
                except psutil.NoSuchProcess:
                    continue
            known[pid] = process
        return known

    def rss_bytes(self) -> int:
        """RSS of the worker plus its known descendants, in bytes (0 if the worker is gone)."""
        total = 0
        for process in [self._worker, *self.descendants()]:
            try:
                total += process.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return total


def _child_pids(pid: int) -> List[int]:
    """The children of ``pid`` from ``/proc/PID/task/*/children`` (those of every thread):
    a few reads, where psutil reads the stat of every process on the system. Empty if
    ``pid`` is gone."""
    found: List[int] = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as children:
                found += map(int, children.read().split())
        except OSError:
            continue  # the thread (or the process) ended meanwhile
    return found


def _descendant_pids(pid: int) -> List[int]:
    """Every descendant of ``pid``, parents before children."""
    found: List[int] = []
    frontier = [pid]
    while frontier:
        children = [child for parent in frontier for child in _child_pids(parent)]
        found += children
        frontier = children
    return found


#: Whether this kernel has ``/proc/PID/task/TID/children`` (CONFIG_PROC_CHILDREN): then a
#: descendant scan follows the worker's own links in well under a millisecond, instead of
#: psutil's scan of every process (4-5 ms on an idle 2-core machine, 5-18 ms loaded, and a
#: kill waits for it: see :func:`kill_tree`).
_PROC_CHILDREN = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


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


def become_subreaper() -> None:
    """Make this process a child subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``, Linux >= 3.4).

    A descendant whose parent dies is reparented to its nearest living subreaper ancestor
    instead of to init: whatever a step detaches (double fork, ``setsid``) stays below this
    process, where :func:`kill_descendants` finds it. A subreaper must reap what lands on
    it: :func:`kill_descendants` does. Inherited by no child.

    Raises:
        OSError: if the kernel refuses (not Linux, or too old).
    """
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0, name="PR_SET_CHILD_SUBREAPER")


def is_subreaper() -> bool:
    """Whether this process is a child subreaper (see :func:`become_subreaper`)."""
    flag = ctypes.c_int(0)
    libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0, name="PR_GET_CHILD_SUBREAPER")
    return bool(flag.value)


class _Stat(NamedTuple):
    """The fields of ``/proc/PID/stat`` a tree kill needs."""

    ppid: int
    pgid: int
    sid: int
    start: int  # clock ticks after boot: with the pid, the identity of a process


def _read_stat(pid: int) -> Optional[_Stat]:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            text = stat.read()
    except OSError:  # gone (or not ours to read)
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    fields = text[text.rindex(b")") + 2:].split()
    return _Stat(int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19]))


def _process_table() -> Dict[int, _Stat]:
    """Every process on the system: one read of ``/proc/PID/stat`` each (1-4 ms in all)."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = _read_stat(int(name))
            if stat is not None:
                table[int(name)] = stat
    return table


def _children_map(table: Dict[int, _Stat]) -> Dict[int, List[int]]:
    children: Dict[int, List[int]] = {}
    for pid, stat in table.items():
        children.setdefault(stat.ppid, []).append(pid)
    return children


def _subtrees(roots: Iterable[int], children: Dict[int, List[int]], skip: Collection[int] = ()) -> Dict[int, int]:
    """Every process in the trees below ``roots`` (roots included), mapped to its depth,
    leaving out the subtrees of ``skip``."""
    depth: Dict[int, int] = {}
    stack = [(root, 0) for root in roots if root not in skip]
    while stack:
        pid, level = stack.pop()
        if pid in depth:
            continue
        depth[pid] = level
        stack.extend((child, level + 1) for child in children.get(pid, ()) if child not in skip)
    return depth


def _has_children() -> bool:
    """Whether this process has any child, live or zombie: one syscall (~6 us), no scan."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def kill_descendants(keep: Collection[int] = ()) -> List[int]:
    """SIGKILL every descendant of this process except the subtrees rooted at ``keep``; reap them.

    For a worker after each step (``keep=()``: whatever the step left running dies with
    its task) and for the process that starts workers after one of them died
    (``keep`` = the live workers: a dead worker's orphans were reparented to it, if it is
    a subreaper). Processes a step detached are only below this process if it, or a
    descendant of it, is a subreaper (:func:`become_subreaper`); otherwise init adopted
    them and nobody finds them. A process with no child at all returns at once, without
    scanning ``/proc``.

    Killed processes that are (or, once their parents died, became) this process's
    children are reaped, so a subreaper leaves no zombie behind: a dead worker's zombie
    too, so read its exit status first. Do not call it in a process whose other children
    must keep their exit status for someone else (an application's own
    ``subprocess.Popen``): list them in ``keep``.

    Args:
        keep: pids whose whole subtrees are left alone.

    Returns:
        The pids killed, deepest first.
    """
    if not _has_children():
        return []
    me, keep = os.getpid(), frozenset(keep)

    def select_below_me(table: Dict[int, _Stat]) -> Dict[int, int]:
        return {pid: depth for pid, depth in _subtrees([me], _children_map(table), keep).items() if pid != me}

    return _freeze_kill_reap(select_below_me, spare=())


def kill_step_tree(pid: int) -> List[int]:
    """SIGKILL a worker ``pid`` and its whole tree: its process group, its session, and
    every descendant of any of them (new sessions included).

    A worker leads its own session and group (``os.setsid()``), so the group and session
    reach what the step started even after the worker is dead, and the parent links reach
    what left them while its parents live. What a dead worker's children detached was
    reparented: to a subreaper above, where :func:`kill_descendants` finds it, else to
    init, beyond reach.

    Call it before the worker is reaped: while the worker (or any member of its group or
    session) exists, its pid cannot be reused, so no stranger's group is hit. The worker
    itself is left unreaped, so its parent still reads how it ended; the other killed
    processes that are this process's children are reaped.

    Args:
        pid: the worker, which must not be this process.

    Returns:
        The pids killed, deepest first.

    Raises:
        ValueError: for this process's own pid.
    """
    me = os.getpid()
    if pid == me:
        raise ValueError("kill_step_tree() cannot kill the calling process's own tree")

    def select_step_tree(table: Dict[int, _Stat]) -> Dict[int, int]:
        members = [other for other, stat in table.items() if pid in (other, stat.pgid, stat.sid)]
        return _subtrees(members, _children_map(table), skip=(me,))

    return _freeze_kill_reap(select_step_tree, spare=(pid,))


def _freeze_kill_reap(select_targets: Callable[[Dict[int, _Stat]], Dict[int, int]], spare: Collection[int]) -> List[int]:
    """Freeze the targets round by round until a round finds none new, then kill them all,
    deepest first, wait for them to exit, and reap those that are our children (except
    ``spare``)."""
    frozen: Dict[int, int] = {}  # pid -> pidfd
    depth: Dict[int, int] = {}
    try:
        while True:
            table = _process_table()
            targets = select_targets(table)
            new = [target for target in targets if target not in frozen]
            if not new:
                break
            for target in new:
                pidfd = _open_same(target, table[target].start)
                if pidfd is None:
                    continue  # gone since the scan
                _send(pidfd, signal.SIGSTOP)  # a stopped process cannot fork: the rounds end
                frozen[target] = pidfd
                depth[target] = targets[target]
        order = sorted(frozen, key=lambda target: -depth[target])
        for target in order:
            _send(frozen[target], signal.SIGKILL)
        _wait_exited(list(frozen.values()))
        for target in order:
            if target not in spare:
                _reap(frozen[target])
        return order
    finally:
        for pidfd in frozen.values():
            os.close(pidfd)


def _open_same(pid: int, start: int) -> Optional[int]:
    """A pidfd for the process ``pid`` that started at ``start``; ``None`` if it is gone."""
    try:
        pidfd = os.pidfd_open(pid)
    except (ProcessLookupError, PermissionError):
        return None
    stat = _read_stat(pid)
    if stat is None or stat.start != start:  # the pid was reused between the scan and the open
        os.close(pidfd)
        return None
    return pidfd


def _send(pidfd: int, signal_number: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, signal_number)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_exited(pidfds: List[int]) -> None:
    """Wait (up to :data:`KILL_PATIENCE_S`) until every pidfd is readable: its process exited,
    and its children were reparented (the kernel does that before it signals the pidfd)."""
    poller = select.poll()
    for pidfd in pidfds:
        poller.register(pidfd, select.POLLIN)
    left, deadline = len(pidfds), time.monotonic() + KILL_PATIENCE_S
    while left:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        for pidfd, _ in poller.poll(remaining * 1000):
            poller.unregister(pidfd)
            left -= 1


def _reap(pidfd: int) -> None:
    try:
        os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
    except ChildProcessError:
        pass  # not our child: its own parent reaps it
