"""Orphans are findable and killed: the subreaper, the descendant kill and the step-tree kill
(issue 16, items 2 and 3), on real forked processes.

Each test forks the roles it needs from the test process: a "worker" that runs a step-like
function, and where a worker's death matters, a "starter" (the process that starts workers)
above it. The step's processes are real: a child in the worker's process group, a child in
a new session, and a double-forked daemon (``sh -c 'sleep 1000 &'``: the shell exits, the
sleep is orphaned). After the kill, psutil must find none of them alive.
"""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import alive, wait_until
from forking import ROLE_PATIENCE_S, run_forked
from governor.workers import proctree


def start_step_processes(double_fork: bool = True):
    """What a misbehaving step leaves running: pids of a child in the caller's process group,
    a child in a new session and (with ``double_fork``) two double-forked orphans, one still
    in the group, one in a new session (a daemon)."""
    in_group = subprocess.Popen(["sleep", "1000"])
    new_session = subprocess.Popen(["sleep", "1000"], start_new_session=True)
    pids = {"in_group": in_group.pid, "new_session": new_session.pid}
    if double_fork:
        # An orphan still in the group, and a daemon proper: orphaned and in a new session.
        for name, command in (("double_forked", "sleep 1000"), ("daemon", "setsid sleep 1000")):
            shell = subprocess.Popen(["sh", "-c", f"{command} & echo $!"], stdout=subprocess.PIPE)
            pids[name] = int(shell.stdout.readline())
            shell.wait()  # the shell is gone: its child is an orphan now
            shell.stdout.close()
    with open(_pid_log, "a") as log:
        log.write("".join(f"{pid}\n" for pid in pids.values()))
    return pids


def parent_of(pid):
    return proctree._read_stat(pid).ppid


#: Where start_step_processes logs every pid it starts, in whichever forked role it runs.
_pid_log = None


@pytest.fixture(autouse=True)
def cleanup(tmp_path):
    """Whatever a step-like function started and is still alive after the test is killed,
    so a failing test leaves no sleep behind (orphans adopted by init are no child of ours,
    out of the leak check's sight). Yields a list for the pids a test adds itself."""
    global _pid_log
    _pid_log = tmp_path / "pids"
    _pid_log.touch()
    seen = []
    yield seen
    for pid in seen + [int(line) for line in _pid_log.read_text().split()]:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_become_subreaper_sets_the_flag_in_the_caller_only():
    def worker():
        before = proctree.is_subreaper()
        proctree.become_subreaper()
        return before, proctree.is_subreaper()

    assert run_forked(worker) == [False, True]
    assert not proctree.is_subreaper(), "the test process itself is untouched"


def test_a_worker_that_is_a_subreaper_kills_what_a_finished_step_left_running(cleanup):
    def worker():
        proctree.become_subreaper()
        pids = start_step_processes()  # the step returned; these are still running
        adopted = parent_of(pids["double_forked"]) == parent_of(pids["daemon"]) == os.getpid()
        alive_before = {name: alive(pid) for name, pid in pids.items()}
        killed = proctree.kill_descendants()
        return pids, adopted, alive_before, killed

    pids, adopted, alive_before, killed = run_forked(worker)
    cleanup.extend(pids.values())
    assert adopted, "the orphaned daemon landed on the subreaper worker"
    assert all(alive_before.values()), alive_before
    assert set(pids.values()) <= set(killed)
    assert not [name for name, pid in pids.items() if alive(pid)]


def test_without_the_subreaper_a_double_forked_daemon_escapes(cleanup):
    # The limit the subreaper lifts, shown: init adopts the orphan, out of every scan.
    def worker():
        pids = start_step_processes()
        return pids, proctree.kill_descendants()

    pids, killed = run_forked(worker)
    cleanup.extend(pids.values())
    assert pids["daemon"] not in killed and pids["double_forked"] not in killed
    assert alive(pids["daemon"]) and alive(pids["double_forked"])
    assert not alive(pids["in_group"]) and not alive(pids["new_session"])


def test_kill_descendants_keeps_the_subtrees_it_is_told_to_keep(cleanup):
    def worker():
        proctree.become_subreaper()
        kept = subprocess.Popen(["sh", "-c", "sleep 1000 & wait"])
        assert wait_until(lambda: proctree._has_children() and len(_children_of(kept.pid)) == 1, 10)
        kept_child = _children_of(kept.pid)[0]
        pids = start_step_processes()
        killed = proctree.kill_descendants(keep=[kept.pid])
        survivors = {"kept": alive(kept.pid), "kept_child": alive(kept_child)}
        proctree.kill_descendants()  # then the rest, so nothing outlives the worker
        return pids, [kept.pid, kept_child], killed, survivors

    pids, kept, killed, survivors = run_forked(worker)
    cleanup.extend([*pids.values(), *kept])
    assert survivors == {"kept": True, "kept_child": True}
    assert not set(kept) & set(killed)
    assert set(pids.values()) <= set(killed)
    assert not any(alive(pid) for pid in [*pids.values(), *kept])


def _children_of(pid):
    return [other for other, stat in proctree._process_table().items() if stat.ppid == pid]


def test_kill_descendants_returns_at_once_without_children():
    def worker():
        return proctree.kill_descendants()

    assert run_forked(worker) == []


def test_kill_step_tree_ends_a_live_worker_with_every_process_its_step_started(cleanup):
    def starter():
        proctree.become_subreaper()
        reader, writer = os.pipe()
        worker = os.fork()
        if worker == 0:
            try:
                os.setsid()  # as a Governor worker does
                proctree.become_subreaper()
                os.write(writer, json.dumps(start_step_processes()).encode() + b"\n")
                time.sleep(ROLE_PATIENCE_S)  # the step hangs
            finally:
                os._exit(0)
        os.close(writer)
        with os.fdopen(reader) as pipe:
            pids = json.loads(pipe.readline())
        killed = proctree.kill_step_tree(worker)
        _, status = os.waitpid(worker, 0)  # left unreaped for us: how it ended is ours to read
        leftovers = proctree.kill_descendants()
        return worker, pids, killed, os.WTERMSIG(status) if os.WIFSIGNALED(status) else None, leftovers

    worker, pids, killed, signal_number, leftovers = run_forked(starter)
    cleanup.extend(pids.values())
    assert signal_number == signal.SIGKILL
    assert {worker, *pids.values()} <= set(killed)
    assert leftovers == [], "nothing was left for the starter's sweep"
    assert not [name for name, pid in pids.items() if alive(pid)]


def test_after_a_worker_dies_on_its_own_its_step_tree_and_orphans_are_killed(cleanup):
    # The worker calls os._exit with its step's processes running (issue 16, item 2): the
    # group and session are found by kill_step_tree, the orphans on the starter (a
    # subreaper) by kill_descendants, keeping a live sibling worker.
    def starter():
        proctree.become_subreaper()
        sibling = subprocess.Popen(["sleep", "1000"])  # another worker, busy: must survive
        reader, writer = os.pipe()
        worker = os.fork()
        if worker == 0:
            try:
                os.setsid()
                os.write(writer, json.dumps(start_step_processes()).encode() + b"\n")
            finally:
                os._exit(3)
        os.close(writer)
        with os.fdopen(reader) as pipe:
            pids = json.loads(pipe.readline())
        os.waitid(os.P_PID, worker, os.WEXITED | os.WNOWAIT)  # dead, not reaped: its pid stays reserved
        orphans_here = sorted(name for name, pid in pids.items() if parent_of(pid) == os.getpid())
        killed = proctree.kill_step_tree(worker)
        _, status = os.waitpid(worker, 0)  # before the sweep, which would reap it with the rest
        killed += proctree.kill_descendants(keep=[sibling.pid])
        sibling_alive = alive(sibling.pid)
        sibling.kill()
        sibling.wait()
        return pids, orphans_here, killed, os.WEXITSTATUS(status), sibling_alive

    pids, orphans_here, killed, exitcode, sibling_alive = run_forked(starter)
    cleanup.extend(pids.values())
    assert exitcode == 3, "the worker's exit status was still there to read"
    assert orphans_here == ["daemon", "double_forked", "in_group", "new_session"], "every orphan landed here"
    assert sibling_alive
    assert set(pids.values()) <= set(killed)
    assert not [name for name, pid in pids.items() if alive(pid)]


def test_kill_step_tree_refuses_the_callers_own_tree():
    with pytest.raises(ValueError):
        proctree.kill_step_tree(os.getpid())


def test_without_a_subreaper_kill_step_tree_still_reaches_a_dead_workers_group_and_session(cleanup):
    # No subreaper anywhere: the dead worker's children go to init. Its process group and
    # session still name them, so they die; what left both (a new session, a daemon) is
    # beyond reach: the limit the README states.
    def starter():
        reader, writer = os.pipe()
        worker = os.fork()
        if worker == 0:
            try:
                os.setsid()
                pids = start_step_processes()
                # A child that leaves the group but stays in the session (job control does this).
                regrouped = subprocess.Popen(["sleep", "1000"], process_group=0)
                pids["new_group"] = regrouped.pid
                with open(_pid_log, "a") as log:
                    log.write(f"{regrouped.pid}\n")
                os.write(writer, json.dumps(pids).encode() + b"\n")
            finally:
                os._exit(3)
        os.close(writer)
        with os.fdopen(reader) as pipe:
            pids = json.loads(pipe.readline())
        os.waitid(os.P_PID, worker, os.WEXITED | os.WNOWAIT)
        killed = proctree.kill_step_tree(worker)
        os.waitpid(worker, 0)
        return pids, killed

    pids, killed = run_forked(starter)
    cleanup.extend(pids.values())
    assert {pids["in_group"], pids["new_group"], pids["double_forked"]} <= set(killed)
    assert not any(alive(pids[name]) for name in ("in_group", "new_group", "double_forked"))
    assert alive(pids["new_session"]) and alive(pids["daemon"])


def test_tree_sampler_finds_the_descendants_a_full_scan_finds(cleanup):
    # The sampler (and so kill_tree) follows /proc/PID/task/*/children rather than scanning
    # every process: it must find the same tree, a grandchild in a new session included.
    def worker():
        pids = start_step_processes(double_fork=False)
        parent = subprocess.Popen(
            [sys.executable, "-c", "import subprocess; child = subprocess.Popen(['sleep', '1000'], "
             "start_new_session=True); print(child.pid, flush=True); child.wait()"], stdout=subprocess.PIPE)
        grandchild = int(parent.stdout.readline())
        with open(_pid_log, "a") as log:
            log.write(f"{grandchild}\n{parent.pid}\n")
        found = {process.pid for process in proctree.TreeSampler(os.getpid()).descendants(rescan=True)}
        full_scan = {process.pid for process in psutil.Process().children(recursive=True)}
        return [proctree._PROC_CHILDREN, {pids["in_group"], pids["new_session"], parent.pid, grandchild} <= found,
                sorted(found), sorted(full_scan)]

    children_files, all_found, found, full_scan = run_forked(worker)
    assert children_files, "this machine's kernel has /proc/PID/task/TID/children"
    assert all_found
    assert found == full_scan
