"""Fixtures shared by the tests: a running supervisor, and the leak check every test gets.

The leak check runs after every test: within a patience budget, the test process must have
no child process left but the two per-interpreter resource trackers (loky reaps its workers
when a supervisor shuts down), and the manager and spawn threads must be gone.
"""

import faulthandler
import os
import sys
import threading
import time

import psutil
import pytest

from governor import Supervisor
from step_library import registry

#: How long after a test its processes and threads may take to disappear.
LEAK_PATIENCE_S = 15.0

#: A deadlock detector, not a timing: past this, a test (fixtures' teardown included) dumps
#: every thread's traceback and ends the run. pytest-timeout (120 s, setup.cfg) reports
#: first in the usual case, but it stands down once a test has failed, so a fixture that
#: then hangs in its teardown would hang the run without this.
DEADLOCK_S = 300.0

faulthandler.enable(file=sys.stderr)


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is dead: it only waits to be reaped)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(predicate, timeout: float = LEAK_PATIENCE_S, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def is_resource_tracker(process: psutil.Process) -> bool:
    """loky's and multiprocessing's resource trackers: one each per interpreter, started on
    first use and ended when the interpreter exits. They run no step and are not workers;
    stopping them from a library would break other users of multiprocessing in-process."""
    try:
        return "resource_tracker import main" in " ".join(process.cmdline())
    except psutil.NoSuchProcess:
        return False


def live_children():
    """Every live descendant of the test process except the two resource trackers."""
    return [child for child in psutil.Process().children(recursive=True)
            if alive(child.pid) and not is_resource_tracker(child)]


def governor_threads():
    return [thread for thread in threading.enumerate() if thread.name.startswith("governor-")]


@pytest.fixture(autouse=True)
def no_leaked_processes(request):
    # Autouse, so set up first and torn down last: the detector covers every other fixture.
    watchdog = threading.Timer(DEADLOCK_S, _deadlocked, args=(request.config,))
    watchdog.daemon = True
    watchdog.start()
    try:
        yield
        assert wait_until(lambda: not live_children()), f"leaked processes: {live_children()}"
        assert wait_until(lambda: not governor_threads()), f"leaked threads: {governor_threads()}"
    finally:
        watchdog.cancel()


def _deadlocked(config) -> None:
    # Our own timer, not faulthandler.dump_traceback_later: pytest cancels that one (its
    # single global timer) when a test fails, which is exactly when a teardown may hang.
    # Capture is suspended first, or os._exit would take the traceback with it.
    config.pluginmanager.getplugin("capturemanager").suspend_global_capture(in_=True)
    print(f"\n+++ deadlock detector: a test ran past {DEADLOCK_S:.0f}s; every thread's stack +++",
          file=sys.stderr, flush=True)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    os._exit(70)


@pytest.fixture
def isolated_git_env(tmp_path, monkeypatch):
    """No global or system git config, no repository above tmp_path, no real XDG state."""
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))


@pytest.fixture
def supervisor():
    """A started supervisor; stopped after the test with everything it still runs cancelled,
    so a test that fails while an endless step runs cannot hang its teardown."""
    sup = Supervisor(registry, workers=4).start()
    try:
        yield sup
    finally:
        sup.shutdown(wait=True, cancel_pending=True, cancel_running=True)
