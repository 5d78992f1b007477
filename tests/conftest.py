"""Fixtures shared by the tests: a running supervisor, and the leak check every test gets.

The leak check runs after every test: within a patience budget, the test process must have
no child process left but the two per-interpreter resource trackers (loky reaps its workers
when a supervisor shuts down) and, once a Ray test has run, the local Ray node's own
processes; and the manager and spawn threads must be gone.

Backends: the ``backend`` fixture is ``"loky"`` unless a test module parametrises it (see
test_governor.py). ``"ray"`` starts one local Ray node for the whole session, bound to
127.0.0.1 with the dashboard off; its tests carry the ``ray`` marker and are skipped when
the ``ray`` extra is not installed.
"""

import contextlib
import faulthandler
import os
import signal
import sys
import threading
import time
import traceback

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

#: Where the processes of a run measured for coverage (.ci/run) write their data, if it is.
COVERAGE_DATA_DIR = os.path.dirname(os.environ["COVERAGE_FILE"]) if os.environ.get("COVERAGE_PROCESS_START") else None

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


#: What the command lines of multiprocessing's per-interpreter helpers hold.
INTERPRETER_HELPERS = ("resource_tracker import main", "multiprocessing.forkserver import main")


def is_interpreter_helper(process: psutil.Process) -> bool:
    """loky's and multiprocessing's resource trackers, and multiprocessing's forkserver (the
    bench's peers start their workers from it): one each per interpreter, started on first
    use and ended when the interpreter exits. They run no step and are not workers;
    stopping them from a library would break other users of multiprocessing in-process."""
    try:
        command = " ".join(process.cmdline())
    except psutil.NoSuchProcess:
        return False
    return any(helper in command for helper in INTERPRETER_HELPERS)


def is_ray_process(process: psutil.Process) -> bool:
    """A process of the session's local Ray node: raylet, GCS, its agents and its (pooled,
    idle or restarted) workers. A process a step started is none of these: it is checked."""
    try:
        name = process.name()
        return (name.startswith("ray::") or name in ("raylet", "gcs_server")
                or f"{os.sep}ray{os.sep}" in " ".join(process.cmdline()))
    except psutil.NoSuchProcess:
        return False


def live_children():
    """Every live descendant of the test process except the interpreter helpers and Ray's own."""
    return [child for child in psutil.Process().children(recursive=True)
            if alive(child.pid) and not is_interpreter_helper(child) and not is_ray_process(child)]


@contextlib.contextmanager
def ctrl_c_not_ignored():
    """Start a child here as a terminal would: with Ctrl-C's default disposition.

    An ignored SIGINT survives exec, and Python then leaves Ctrl-C ignored (as it must:
    that is how ``nohup`` and ``cmd &`` protect a command). A test run started that way (in
    the background of a non-interactive shell) would otherwise give its clients an ignored
    Ctrl-C. A Python handler, unlike SIG_IGN, is reset to the default in the child by exec.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def processes_marked(marker: str, variable: str = "GOVERNOR_TEST_MARK"):
    """Live processes whose environment has ``variable=marker``: every process started after
    the test set it, wherever it was reparented (the leak check sees only descendants)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(variable) == marker and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


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


#: Logical CPUs of the test session's Ray node: enough for every test's pool lane at once
#: (steps mostly sleep or wait); Ray starts a worker per task in flight.
RAY_TEST_CPUS = 16

BACKENDS = ["loky", pytest.param("ray", marks=pytest.mark.ray)]


@pytest.fixture(scope="session")
def ray_node():
    """One local Ray node for the session: loopback only, no dashboard; step modules of
    the tests reach its workers through PYTHONPATH in the job's runtime_env."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    here = os.path.dirname(os.path.abspath(__file__))
    ray.init(num_cpus=RAY_TEST_CPUS, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}})
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def backend():
    """The pool lane's backend; test modules that share their tests with Ray parametrise it."""
    return "loky"


@pytest.fixture
def make_supervisor(request, backend):
    """Start supervisors on the test's backend; each is stopped after the test with
    everything it still runs cancelled, so a failing test cannot hang its teardown."""
    if backend == "ray":
        request.getfixturevalue("ray_node")
    started = []

    def make(**options):
        if COVERAGE_DATA_DIR and backend == "loky":
            # CI measures coverage in every process; a sandboxed pool worker may write its
            # data only where the sandbox lets it (see .ci/run).
            options["sandbox_writes"] = [*options.get("sandbox_writes", ()), COVERAGE_DATA_DIR]
        sup = Supervisor(registry, backend=backend, **options).start()
        started.append(sup)
        return sup

    try:
        yield make
    finally:
        if _failed(request.node):
            for sup in started:
                _describe_for_the_report(sup)
        for sup in started:
            sup.shutdown(wait=True, cancel_futures=True, cancel_running=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # Keep each phase's report on the test item, so fixtures can tell in their teardown
    # whether the test failed (pytest's documented recipe).
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


def _failed(node) -> bool:
    report = getattr(node, "report_call", None)
    return report is not None and report.failed


def _describe_for_the_report(sup: Supervisor) -> None:
    """Print what a supervisor was doing when its test failed (pytest shows it under the
    teardown's captured output): a failure that comes once in many runs, such as a step
    that never starts, must say where it stuck the first time."""
    try:
        workers = sup.describe_workers(timeout=5)
        metrics = sup.metrics()
    except Exception as exc:  # a stuck or broken manager thread: where it is stuck
        print(f"supervisor {id(sup):#x}: could not be described: {exc!r}; the governor threads' stacks:")
        frames = sys._current_frames()
        for thread in governor_threads():
            stack = "".join(traceback.format_stack(frames[thread.ident])) if thread.ident in frames else ""
            print(f"--- {thread.name}\n{stack}")
        return
    print(f"supervisor {id(sup):#x} ({sup.backend}) when the test failed:")
    for worker in workers:
        running = "" if worker["running_s"] is None else f" for {worker['running_s']:.2f}s"
        served = "" if worker["tasks_run"] is None else f", {worker['tasks_run']} tasks run"
        print(f"  {worker['lane']} worker {worker['pid']} on {worker['node'] or 'this host'}: {worker['state']}, "
              f"task {worker['task_id']} ({worker['step']}){running}{served}")
    for key in ("queue_depth", "in_flight", "workers", "worker_kills", "tasks"):
        print(f"  {key}: {metrics.get(key)}")


@pytest.fixture
def supervisor(make_supervisor):
    """A started supervisor with 4 pool workers on the test's backend."""
    return make_supervisor(workers=4)
