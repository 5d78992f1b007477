"""The Landlock sandbox of the pool lane (governor.workers.sandbox), on the real kernel.

Every restricting test forks a child that applies the policy (tests/sandboxed.py): writes
outside the allowed paths must fail with PermissionError and leave nothing behind, the
declared paths, the private temp dir and /dev/null must stay writable, reads stay free,
and where the ABI has them, TCP and signals beyond the worker's own tree are refused.
A test is skipped, saying why, only where the kernel lacks what it checks.
"""

import errno
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import tempfile
import threading

import pytest
from click.testing import CliRunner

from governor import ReadOnlyViolation, SandboxUnavailable, StepFailed, Supervisor
from governor.workers import sandbox, seccomp
from governor.cli import main
from governor.workers.sandbox import FsAccess, SandboxPolicy, SandboxReport
from governor.steps import StepRegistry
from conftest import wait_until
from sandboxed import ABI, needs_abi, needs_landlock, run_sandboxed, signal_process, use_temp_dir, write_file


def write(path, text="x"):
    with open(path, "w") as handle:
        handle.write(text)


# -- the layer's tables, no kernel needed ------------------------------------------------

def test_handled_rights_grow_with_the_abi_and_never_include_reading():
    never = FsAccess.READ_FILE | FsAccess.READ_DIR | FsAccess.EXECUTE
    for abi in range(1, sandbox.KNOWN_ABI + 1):
        assert not sandbox.handled_write_rights(abi) & never
    assert FsAccess.WRITE_FILE in sandbox.handled_write_rights(1)
    assert FsAccess.REFER not in sandbox.handled_write_rights(1)
    assert FsAccess.REFER in sandbox.handled_write_rights(2)
    assert FsAccess.TRUNCATE not in sandbox.handled_write_rights(2)
    assert FsAccess.TRUNCATE in sandbox.handled_write_rights(3)
    assert FsAccess.IOCTL_DEV not in sandbox.handled_write_rights(4)
    assert FsAccess.IOCTL_DEV in sandbox.handled_write_rights(5)
    # The ruleset struct passed grows with the ABI: a kernel refuses fields it does not know.
    assert [sandbox._attr_size(abi) for abi in (1, 3, 4, 5, 6, 7)] == [8, 8, 16, 16, 24, 24]


def test_a_policy_is_the_union_of_the_pool_steps_declarations(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    registry = StepRegistry()
    registry.register(len, name="reads", critical=False)
    registry.register(len, name="caches", critical=False, writes=["~/.cache/app"])
    registry.register(len, name="fetches", critical=False, network=True)
    specs = registry.snapshot().values()
    policy = sandbox.policy_for(specs, [tmp_path / "shared"])
    assert policy.writable == (str(tmp_path / "shared"), str(tmp_path / "home" / ".cache" / "app"))
    assert policy.network is True and policy.scope_signals is True
    assert sandbox.policy_for([registry.get("reads")]).network is False
    with pytest.raises(TypeError, match="single str"):
        SandboxPolicy("/tmp")


def test_the_supervisor_takes_the_pool_steps_policy_and_checks_its_sandbox_options(tmp_path):
    registry = StepRegistry()
    registry.register(len, name="pool.cache", critical=False, writes=[str(tmp_path / "cache")])
    registry.register(len, name="critical.write", critical=True, writes=[str(tmp_path / "not-pool")])
    sup = Supervisor(registry, workers=1, sandbox_writes=[tmp_path / "extra"])
    assert sup.sandbox == "auto"
    assert sup.sandbox_policy.writable == (str(tmp_path / "extra"), str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="sandbox must be one of"):
        Supervisor(registry, sandbox="on")
    with pytest.raises(ValueError, match="Ray lane runs no sandbox"):
        Supervisor(registry, sandbox="require", backend="ray")


def test_require_fails_start_clearly_where_the_kernel_has_no_landlock(monkeypatch):
    registry = StepRegistry()
    registry.register(len, name="reads", critical=False)
    # An architecture without Landlock numbers: the same path as a kernel without it.
    monkeypatch.setattr(sandbox, "SYSCALLS", {})
    sup = Supervisor(registry, workers=1, sandbox="require")
    with pytest.raises(SandboxUnavailable, match="offers no Landlock.*sandbox='auto'"):
        sup.start()
    assert sup.describe_workers() == []  # refused before any worker was started


def test_require_fails_start_where_the_kernel_cannot_hold_workers_to_seccomp(monkeypatch):
    registry = StepRegistry()
    registry.register(len, name="reads", critical=False)
    monkeypatch.setattr(seccomp, "ARCHES", {})  # a machine without a system call table
    sup = Supervisor(registry, workers=1, sandbox="require")
    if ABI < 1:
        pytest.skip("this kernel offers no Landlock: require stops at that first")
    with pytest.raises(SandboxUnavailable, match="seccomp.*sandbox='auto'"):
        sup.start()
    assert sup.describe_workers() == []


def test_auto_without_seccomp_keeps_landlock_and_says_what_is_missing(tmp_path, monkeypatch):
    def no_table():
        monkeypatch.setattr(seccomp, "ARCHES", {})
        monkeypatch.setattr(sandbox, "_seccomp_filters", {})

    outcome = run_sandboxed(lambda report: None, SandboxPolicy(tmp_root=tmp_path), before=no_table)
    assert not outcome.report.seccomp and "seccomp" not in outcome.report.label
    assert any(text.startswith("seccomp (") for text in outcome.report.missing)


def test_serve_checks_its_sandbox_option():
    result = CliRunner().invoke(main, ["serve", "--sandbox", "require", "--backend", "ray"])
    assert result.exit_code == 2 and "Ray lane runs no sandbox" in result.output
    result = CliRunner().invoke(main, ["serve", "--sandbox", "maybe"])
    assert result.exit_code == 2 and "'maybe' is not one of" in result.output


def test_a_read_only_violation_is_a_step_failure_and_a_permission_error():
    error = ReadOnlyViolation("cache.fill", 7, "/etc/app.conf", "PermissionError", "[Errno 13] Permission denied",
                              "Traceback ...", PermissionError(errno.EACCES, "Permission denied"))
    assert isinstance(error, StepFailed) and isinstance(error, PermissionError)
    assert (error.errno, error.filename) == (errno.EACCES, "/etc/app.conf")
    assert "critical=True" in str(error) and "writes=[...]" in str(error)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.step, copy.task_id, copy.path, copy.exc_type) == ("cache.fill", 7, "/etc/app.conf", "PermissionError")


def test_denied_write_is_only_about_permission_errors_outside_the_writable_paths(tmp_path):
    report = SandboxReport(abi=7, tmpdir=str(tmp_path / "t"), writable=(str(tmp_path / "t"), os.devnull))
    outside = str(tmp_path / "x")
    assert sandbox.denied_write(PermissionError(errno.EACCES, "denied", outside), report) == outside
    assert sandbox.denied_write(PermissionError(errno.EACCES, "denied", str(tmp_path / "t" / "y")), report) is None
    assert sandbox.denied_write(PermissionError(errno.EACCES, "no file named"), report) is None
    assert sandbox.denied_write(FileNotFoundError(errno.ENOENT, "missing", outside), report) is None
    assert sandbox.denied_write(PermissionError(errno.EACCES, "denied", outside), SandboxReport(abi=0)) is None
    try:  # found through the chain, as when a library wraps the OSError (never raised here:
        # one raised by Python code is that code's own error, see test_sandbox_attacks.py)
        raise RuntimeError("could not save") from PermissionError(errno.EACCES, "denied", outside)
    except RuntimeError as wrapped:
        assert sandbox.denied_write(wrapped, report) == outside


# -- the real kernel ---------------------------------------------------------------------

def test_without_landlock_no_write_is_restricted_and_the_report_says_so(tmp_path, monkeypatch):
    outcome = run_sandboxed(lambda report: write(tmp_path / "free") or os.environ["TMPDIR"],
                            SandboxPolicy(tmp_root=tmp_path), before=lambda: monkeypatch.setattr(sandbox, "SYSCALLS", {}))
    assert outcome.report.label in ("none", "seccomp") and not outcome.report.applied
    assert "landlock" in str(outcome.report)
    assert (tmp_path / "free").exists() and outcome.unwrap() == outcome.report.tmpdir


@needs_landlock
def test_a_write_outside_the_allowed_paths_fails_and_leaves_no_file(tmp_path):
    target = tmp_path / "outside.txt"
    outcome = run_sandboxed(lambda report: write(target), SandboxPolicy(tmp_root=tmp_path / "tmp"),
                            before=lambda: os.mkdir(tmp_path / "tmp"))
    assert outcome.report.label == POOL_LABEL
    assert isinstance(outcome.error, PermissionError) and outcome.error.errno == errno.EACCES
    assert outcome.denied == str(target)
    assert not target.exists()


@needs_landlock
def test_every_kind_of_change_outside_is_refused_and_the_files_stay_as_they_were(tmp_path):
    (tmp_path / "tmp").mkdir()
    keep = tmp_path / "keep.txt"
    keep.write_text("original")
    (tmp_path / "dir").mkdir()

    def try_everything(report):
        attempts = {
            "mkdir": lambda: os.mkdir(tmp_path / "new-dir"),
            "remove": lambda: os.remove(keep),
            "rmdir": lambda: os.rmdir(tmp_path / "dir"),
            "append": lambda: open(keep, "a").close(),
            "symlink": lambda: os.symlink(keep, tmp_path / "link"),
            "fifo": lambda: os.mkfifo(tmp_path / "fifo"),
            "rename-in": lambda: os.rename(keep, os.path.join(report.tmpdir, "stolen")),
        }
        if ABI >= 3:
            attempts["truncate"] = lambda: os.truncate(keep, 0)
        refused = {}
        for name, attempt in attempts.items():
            try:
                attempt()
            except OSError as error:
                refused[name] = error.errno
        return refused

    refused = run_sandboxed(try_everything, SandboxPolicy(tmp_root=tmp_path / "tmp")).unwrap()
    assert set(refused) == {"mkdir", "remove", "rmdir", "append", "symlink", "fifo", "rename-in"} | (
        {"truncate"} if ABI >= 3 else set())
    assert set(refused.values()) <= {errno.EACCES, errno.EXDEV}
    assert keep.read_text() == "original" and (tmp_path / "dir").is_dir()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dir", "keep.txt", "tmp"]


@needs_landlock
def test_declared_paths_the_private_temp_dir_and_dev_null_stay_writable_and_reads_stay_free(tmp_path):
    (tmp_path / "tmp").mkdir()
    declared_dir = tmp_path / "cache" / "app"  # does not exist yet: made before the rules apply
    declared_file = tmp_path / "app.log"
    declared_file.write_text("")
    readable = tmp_path / "config.txt"
    readable.write_text("settings")

    def use_what_is_allowed(report):
        write(declared_dir / "entry", "cached")
        with open(declared_file, "a") as log:
            log.write("line\n")
        write(os.devnull)
        with tempfile.NamedTemporaryFile("w", delete=False) as scratch:
            scratch.write("scratch")
        return scratch.name, readable.read_text()

    outcome = run_sandboxed(use_what_is_allowed,
                            SandboxPolicy([declared_dir, declared_file], tmp_root=tmp_path / "tmp"))
    scratch, text = outcome.unwrap()
    assert (declared_dir / "entry").read_text() == "cached" and declared_file.read_text() == "line\n"
    assert os.path.dirname(scratch) == outcome.report.tmpdir and text == "settings"
    assert os.path.dirname(outcome.report.tmpdir) == str(tmp_path / "tmp")
    assert outcome.report.writable == (outcome.report.tmpdir, os.devnull, str(declared_dir), str(declared_file))


def test_the_private_temp_dir_is_named_by_pid_and_never_an_existing_path(tmp_path):
    mine = sandbox._private_tmpdir(str(tmp_path))
    assert mine == str(tmp_path / f"governor-worker-{os.getpid()}")
    assert os.stat(mine).st_mode & 0o777 == 0o700
    # The name is taken (a worker before this one had the pid; a planted symlink): not reused.
    os.rmdir(mine)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, mine)
    fresh = sandbox._private_tmpdir(str(tmp_path))
    assert fresh != mine and os.path.dirname(fresh) == str(tmp_path) and not os.path.islink(fresh)
    assert os.path.basename(fresh).startswith(f"governor-worker-{os.getpid()}-")
    assert os.stat(fresh).st_mode & 0o777 == 0o700 and list(elsewhere.iterdir()) == []


@needs_landlock
def test_the_processes_a_step_starts_inherit_the_rules(tmp_path):
    (tmp_path / "tmp").mkdir()
    target = tmp_path / "from-child"
    result = run_sandboxed(
        lambda report: subprocess.run(["sh", "-c", f"echo x > '{target}'"], capture_output=True, text=True),
        SandboxPolicy(tmp_root=tmp_path / "tmp")).unwrap()
    assert result.returncode != 0 and "Permission denied" in result.stderr
    assert not target.exists()


@needs_abi(sandbox.SCOPE_ABI, "signal scoping")
def test_signals_reach_the_workers_own_tree_but_not_its_parent(tmp_path):
    (tmp_path / "tmp").mkdir()
    parent = os.getpid()

    def signal_around(report):
        child = subprocess.Popen(["sleep", "60"])  # started under the rules: inside the domain
        child.send_signal(signal.SIGTERM)
        child.wait()
        try:
            os.kill(parent, 0)
        except PermissionError as error:
            return child.returncode, error.errno
        return child.returncode, None

    outcome = run_sandboxed(signal_around, SandboxPolicy(tmp_root=tmp_path / "tmp"))
    assert outcome.unwrap() == (-signal.SIGTERM, errno.EPERM)
    # Opted out: the parent is reachable again.
    assert run_sandboxed(lambda report: os.kill(parent, 0),
                         SandboxPolicy(scope_signals=False, tmp_root=tmp_path / "tmp")).unwrap() is None


@needs_abi(sandbox.NETWORK_ABI, "TCP rules")
def test_tcp_is_refused_unless_a_step_declared_network_use(tmp_path):
    (tmp_path / "tmp").mkdir()
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def connect(report):
            with socket.create_connection(("127.0.0.1", port), timeout=30):
                return "connected"

        def bind(report):
            with socket.create_server(("127.0.0.1", 0)):
                return "bound"

        denied = run_sandboxed(connect, SandboxPolicy(tmp_root=tmp_path / "tmp"))
        assert isinstance(denied.error, PermissionError)
        assert isinstance(run_sandboxed(bind, SandboxPolicy(tmp_root=tmp_path / "tmp")).error, PermissionError)
        allowed = run_sandboxed(connect, SandboxPolicy(network=True, tmp_root=tmp_path / "tmp"))
        assert allowed.unwrap() == "connected"
        assert not allowed.report.missing


# -- pool workers through a real Supervisor ---------------------------------------------

#: The label a sandboxed pool worker reports on this kernel.
POOL_LABEL = SandboxReport(min(ABI, sandbox.KNOWN_ABI), seccomp=seccomp.unavailable() is None).label


def sandbox_registry(**pool_options):
    registry = StepRegistry()
    registry.register(write_file, name="pool.write", critical=False, **pool_options)
    registry.register(write_file, name="critical.write", critical=True)
    registry.register(signal_process, name="pool.signal", critical=False)
    registry.register(use_temp_dir, name="pool.tmp", critical=False)
    return registry


@needs_landlock
def test_a_pool_step_that_writes_fails_as_read_only_violation_and_the_same_step_critical_writes(tmp_path, caplog):
    target = tmp_path / "state.txt"
    with caplog.at_level(logging.INFO, logger="governor"), \
            Supervisor(sandbox_registry(), workers=1, sandbox="require") as sup:
        with pytest.raises(ReadOnlyViolation) as raised:
            sup.submit("pool.write", str(target)).result(timeout=60)
        assert raised.value.path == str(target) and raised.value.exc_type == "PermissionError"
        assert not target.exists(), "the sandbox let the write through"
        assert sup.submit("critical.write", str(target), "critical").result(timeout=60) == str(target)
        assert target.read_text() == "critical"
        workers = sup.describe_workers()
        assert {(w["lane"], w["sandbox"]) for w in workers} == {("critical", "none"), ("pool", POOL_LABEL)}
        metrics = sup.metrics()
        assert metrics["sandbox"] == {"pool": POOL_LABEL}
        assert metrics["sandbox_denials"] == {"pool.write": 1}
        text = sup.prometheus_text()
        assert 'governor_sandbox_denials_total{step="pool.write"} 1.0' in text
        assert f'governor_sandbox_info{{lane="pool",sandbox="{POOL_LABEL}"}} 1.0' in text
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "read-only" in r.getMessage()]
    assert len(warnings) == 1 and str(target) in warnings[0]
    assert "critical=True" in warnings[0] and "writes=[...]" in warnings[0]
    told = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pool workers run under sandbox")]
    assert len(told) == 1, "said once per supervisor, not once per worker (pool worker + spare)"


@needs_landlock
def test_declared_paths_and_the_workers_own_temp_dir_are_writable_and_the_temp_dir_goes_with_it(tmp_path):
    cache, shared = tmp_path / "cache", tmp_path / "shared"
    shared.mkdir()
    registry = sandbox_registry(writes=[str(cache)])
    with Supervisor(registry, workers=1, sandbox="require", sandbox_writes=[shared]) as sup:
        assert sup.submit("pool.write", str(cache / "entry")).result(timeout=60) == str(cache / "entry")
        assert sup.submit("pool.write", str(shared / "entry")).result(timeout=60) == str(shared / "entry")
        temp_dir = sup.submit("pool.tmp").result(timeout=60)
        assert os.path.basename(temp_dir).startswith("governor-worker-")
        with pytest.raises(ReadOnlyViolation):
            sup.submit("pool.write", str(tmp_path / "undeclared")).result(timeout=60)
    assert (cache / "entry").read_text() == "x" and (shared / "entry").read_text() == "x"
    assert not os.path.exists(temp_dir), "the supervisor removes its workers' temp dirs"


@needs_landlock
def test_a_gone_workers_temp_dir_is_removed_off_the_manager_thread(monkeypatch):
    # A step may leave thousands of files in its worker's temp dir (tempfile without
    # clean-up, task after task): removing them took the manager thread, and every lane
    # with it, 0.4 s per 50,000 files.
    removed_on = []
    rmtree = shutil.rmtree

    def record(path, *args, **kwargs):
        if os.path.basename(path).startswith("governor-worker-"):
            removed_on.append(threading.current_thread().name)
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", record)
    with Supervisor(sandbox_registry(), workers=1, sandbox="require", max_tasks_per_worker=1) as sup:
        temp_dirs = [sup.submit("pool.tmp").result(timeout=60) for _ in range(3)]  # a fresh worker each
        assert len(set(temp_dirs)) == 3
        assert wait_until(lambda: not any(os.path.exists(path) for path in temp_dirs[:2]), timeout=30), \
            "a recycled worker's temp dir goes while the supervisor runs"
    assert not os.path.exists(temp_dirs[2])
    assert removed_on and all(name.startswith("governor-cleanup") for name in removed_on), removed_on


@needs_abi(sandbox.SCOPE_ABI, "signal scoping")
@pytest.mark.parametrize("mode", ["auto", "off"])
def test_a_sandboxed_pool_step_cannot_signal_the_supervisor(mode):
    with Supervisor(sandbox_registry(), workers=1, sandbox=mode) as sup:
        future = sup.submit("pool.signal", os.getpid(), 0)  # 0: the right to signal, nothing sent
        if mode == "off":
            assert future.result(timeout=60) is None
            return
        with pytest.raises(PermissionError) as raised:
            future.result(timeout=60)
        assert type(raised.value) is PermissionError, "the step's own error, not a ReadOnlyViolation"


def test_sandbox_off_applies_nothing(tmp_path):
    target = tmp_path / "written"
    with Supervisor(sandbox_registry(), workers=1, sandbox="off") as sup:
        assert sup.submit("pool.write", str(target)).result(timeout=60) == str(target)
        assert {w["sandbox"] for w in sup.describe_workers()} == {"none"}
        assert sup.metrics()["sandbox"] == {"pool": "none"}


@needs_landlock
def test_a_retired_workers_temp_dir_is_removed_while_the_supervisor_runs():
    with Supervisor(sandbox_registry(), workers=1, spares=0, max_tasks_per_worker=1, sandbox="require") as sup:
        first = sup.submit("pool.tmp").result(timeout=60)
        second = sup.submit("pool.tmp").result(timeout=60)  # a new worker: the first retired
        assert first != second  # (the second retires after its task too: its dir may be gone already)
        assert wait_until(lambda: not os.path.exists(first)), "a gone worker's temp dir stays"
