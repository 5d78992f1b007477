"""A clean worker for every task (issue 16, item 4): each test forks a worker-like process,
captures its baseline, runs a step-like function that spoils one kind of process state,
restores, and checks the state is back (or that the worker is reported dirty).
"""

import os
import resource
import signal
import sys
import threading

import pytest

from forking import run_forked
from governor.workers import hygiene

#: An unprivileged uid for the tests whose point is a missing privilege (the suite may run
#: as root, who can undo anything): "nobody".
NOBODY = 65534


def in_worker(step, check, unprivileged=False):
    """Fork a worker: capture, run ``step()``, restore; return (restore's answer, ``check()``)."""
    def worker():
        if unprivileged and os.geteuid() == 0:
            os.chdir("/")
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        baseline = hygiene.capture()
        step()
        problem = hygiene.restore(baseline)
        return problem, check()

    return run_forked(worker)


def test_an_untouched_worker_is_clean_and_keeps_its_state():
    before = run_forked(lambda: (os.getcwd(), dict(os.environ), sys.getrecursionlimit()))
    problem, after = in_worker(lambda: None, lambda: (os.getcwd(), dict(os.environ), sys.getrecursionlimit()))
    assert problem is None
    assert after == before


def test_the_working_directory_is_restored(tmp_path):
    here = os.getcwd()
    problem, cwd = in_worker(lambda: os.chdir(tmp_path), os.getcwd)
    assert (problem, cwd) == (None, here)


def test_a_working_directory_that_is_gone_makes_the_worker_dirty(tmp_path):
    doomed = tmp_path / "doomed"
    doomed.mkdir()

    def worker():
        os.chdir(doomed)
        baseline = hygiene.capture()
        os.chdir(tmp_path)
        doomed.rmdir()
        return hygiene.restore(baseline)

    problem = run_forked(worker)
    assert problem is not None and "working directory" in problem and str(doomed) in problem


def test_the_environment_is_restored(monkeypatch):
    monkeypatch.setenv("GOVERNOR_HYGIENE_KEPT", "original")
    monkeypatch.setenv("GOVERNOR_HYGIENE_REMOVED", "original")

    def spoil():
        os.environ["GOVERNOR_HYGIENE_KEPT"] = "changed"
        del os.environ["GOVERNOR_HYGIENE_REMOVED"]
        os.environ["GOVERNOR_HYGIENE_ADDED"] = "new"

    problem, seen = in_worker(spoil, lambda: {name: os.environ.get(name) for name in (
        "GOVERNOR_HYGIENE_KEPT", "GOVERNOR_HYGIENE_REMOVED", "GOVERNOR_HYGIENE_ADDED")})
    assert problem is None
    assert seen == {"GOVERNOR_HYGIENE_KEPT": "original", "GOVERNOR_HYGIENE_REMOVED": "original",
                    "GOVERNOR_HYGIENE_ADDED": None}


def test_the_environment_of_child_processes_is_restored_too():
    # os.environ is also what the C library passes on: a child started after the restore
    # must not inherit the step's variable.
    def check():
        import subprocess
        return subprocess.run(["sh", "-c", 'echo "${GOVERNOR_HYGIENE_LEAK-unset}"'], capture_output=True,
                              text=True).stdout.strip()

    problem, seen = in_worker(lambda: os.environ.update(GOVERNOR_HYGIENE_LEAK="leaked"), check)
    assert (problem, seen) == (None, "unset")


def test_the_recursion_limit_is_restored():
    limit = sys.getrecursionlimit()
    problem, seen = in_worker(lambda: sys.setrecursionlimit(50), sys.getrecursionlimit)
    assert (problem, seen) == (None, limit)


def test_signal_handlers_the_mask_and_alarms_are_restored():
    # The worker inherits this process's handlers (a Ray node started earlier in the session
    # installs one for SIGTERM): restored means back to those, not to SIG_DFL.
    term_before, usr1_before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)

    def spoil():
        signal.signal(signal.SIGTERM, lambda *_: None)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
        signal.setitimer(signal.ITIMER_REAL, 1000)  # would SIGALRM the next task
        signal.alarm(1000)

    def check():
        return (signal.getsignal(signal.SIGTERM) is term_before, signal.getsignal(signal.SIGUSR1) is usr1_before,
                signal.SIGUSR2 in signal.pthread_sigmask(signal.SIG_BLOCK, ()),
                signal.getitimer(signal.ITIMER_REAL))

    problem, seen = in_worker(spoil, check)
    assert problem is None
    assert seen == [True, True, False, [0.0, 0.0]]


def test_a_lowered_file_limit_does_not_reach_the_next_task(tmp_path):
    # Issue 16: after a step set RLIMIT_NOFILE to 10, an innocent next task failed with EMFILE.
    def spoil():
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (10, hard))

    def next_task():
        files = [open(tmp_path / f"f{index}", "w") for index in range(50)]
        for file in files:
            file.close()
        return len(files)

    problem, opened = in_worker(spoil, next_task)
    assert (problem, opened) == (None, 50)


def _limits_file_fd():
    """The fd at which this process holds /proc/PID/limits open (its baseline's)."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").endswith("/limits"):
                return int(name)
        except OSError:
            pass  # the listing's own fd, gone already
    raise AssertionError("the baseline keeps no /proc/self/limits open")


@pytest.mark.parametrize("done_to_the_file", ["closed", "replaced by another file"])
def test_a_lowered_limit_is_restored_whatever_the_step_did_to_the_file_limits_are_read_from(tmp_path,
                                                                                          done_to_the_file):
    # restore() reads every limit at once from /proc/self/limits, kept open since capture():
    # a step that closes that fd, or opens another file at its number, must not hide a change.
    (tmp_path / "other").write_text("not the limits")

    def spoil():
        fd = _limits_file_fd()
        if done_to_the_file == "closed":
            os.close(fd)
        else:
            other = os.open(tmp_path / "other", os.O_RDONLY)
            os.dup2(other, fd)
            os.close(other)
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (10, hard))

    before = run_forked(lambda: resource.getrlimit(resource.RLIMIT_NOFILE))
    problem, after = in_worker(spoil, lambda: resource.getrlimit(resource.RLIMIT_NOFILE))
    assert (problem, after) == (None, before)


def test_every_resource_limit_is_restored():
    before = run_forked(lambda: {name: resource.getrlimit(number) for name, number in hygiene.RLIMITS})

    def spoil():
        changed, pinned = 0, 0
        for _, number in hygiene.RLIMITS:
            soft, hard = resource.getrlimit(number)
            if soft == resource.RLIM_INFINITY:
                new = 2 ** 40  # finite, and far above anything this process uses
            elif soft > 0:
                new = soft - 1
            elif hard != 0:
                new = 1
            else:
                pinned += 1  # 0 and 0 (RLIMIT_NICE, RLIMIT_RTPRIO here): only a lower hard limit is left
                continue
            resource.setrlimit(number, (new, hard))
            changed += 1
        assert changed == len(hygiene.RLIMITS) - pinned and changed > 10

    problem, after = in_worker(spoil, lambda: {name: resource.getrlimit(number) for name, number in hygiene.RLIMITS})
    assert problem is None
    assert after == before


def test_a_hard_limit_lowered_without_the_privilege_to_raise_it_makes_the_worker_dirty():
    def spoil():
        resource.setrlimit(resource.RLIMIT_NOFILE, (10, 10))

    problem, limits = in_worker(spoil, lambda: resource.getrlimit(resource.RLIMIT_NOFILE), unprivileged=True)
    assert problem is not None and "RLIMIT_NOFILE" in problem
    assert limits == [10, 10], "what could not be put back is reported, not hidden"


def test_the_umask_priority_and_cpu_affinity_are_restored():
    cpus = sorted(os.sched_getaffinity(0))

    def spoil():
        os.umask(0o777)
        os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) + 5)
        os.sched_setaffinity(0, cpus[:1])

    def check():
        umask = os.umask(0)
        return umask, os.getpriority(os.PRIO_PROCESS, 0), sorted(os.sched_getaffinity(0))

    before = run_forked(check)
    problem, after = in_worker(spoil, check)
    assert problem is None
    assert after == before


def test_a_priority_lowered_without_the_privilege_to_raise_it_makes_the_worker_dirty():
    problem, _ = in_worker(lambda: os.setpriority(os.PRIO_PROCESS, 0, 19), lambda: None, unprivileged=True)
    assert problem is not None and "priority" in problem


def test_a_thread_left_running_makes_the_worker_dirty():
    release = threading.Event()

    def spoil():
        threading.Thread(target=release.wait, name="left-behind", daemon=True).start()

    def check():
        release.set()
        return None

    problem, _ = in_worker(spoil, check)
    assert problem is not None and "left-behind" in problem and "1 thread(s)" in problem


def test_threads_a_step_joined_leave_the_worker_clean():
    def spoil():
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(4) as pool:
            assert sum(pool.map(abs, range(-10, 0))) == 55
        finished = threading.Thread(target=lambda: None)
        finished.start()  # not joined, but its function returned

    problem, _ = in_worker(spoil, lambda: None)
    assert problem is None


def test_everything_that_can_be_put_back_is_even_when_the_worker_is_dirty(tmp_path):
    release = threading.Event()

    def spoil():
        threading.Thread(target=release.wait, daemon=True).start()
        os.chdir(tmp_path)
        os.environ["GOVERNOR_HYGIENE_ADDED"] = "x"

    def check():
        release.set()
        return os.getcwd(), "GOVERNOR_HYGIENE_ADDED" in os.environ

    here = os.getcwd()
    problem, (cwd, added) = in_worker(spoil, check)
    assert problem is not None and "thread" in problem
    assert (cwd, added) == (here, False)


def test_a_replaced_os_environ_makes_the_worker_dirty():
    def spoil():
        os.environ = dict(os.environ)  # module state a step replaced: out of reach

    problem, _ = in_worker(spoil, lambda: None)
    assert problem is not None and "os.environ" in problem


def test_capture_and_restore_refuse_to_run_off_the_main_thread():
    baseline = hygiene.capture()
    refused = []

    def off_main():
        for call in (hygiene.capture, lambda: hygiene.restore(baseline)):
            try:
                call()
            except ValueError:
                refused.append(True)

    thread = threading.Thread(target=off_main)
    thread.start()
    thread.join()
    assert refused == [True, True]
