"""Attacks from inside a sandboxed pool worker that Landlock alone let through (issue 27).

Each attack runs in a forked child held by the real sandbox (tests/sandboxed.py) and must
fail with EPERM, leaving what it aimed at as it was. An attack whose call this machine
refuses even unsandboxed (no xattrs on the file system, not root for a raw socket, no
MPTCP) is skipped, saying why: a test that cannot fail proves nothing. Each attack is
harmless when it succeeds (it sets what is already there, or is undone at once), so a
run without the filter breaks only the test.
"""

import ctypes
import errno
import fcntl
import os
import resource
import shutil
import socket
import sqlite3
import struct
import subprocess
import tarfile
import termios

import pytest

from governor import ReadOnlyViolation, Supervisor
from governor.steps import StepRegistry
from governor.workers import denials, libc, sandbox, seccomp
from governor.workers.sandbox import SandboxPolicy
from sandboxed import run_sandboxed

needs_seccomp = pytest.mark.skipif(seccomp.unavailable() is not None, reason=str(seccomp.unavailable()))
pytestmark = needs_seccomp

IPPROTO_MPTCP = 262
IPC_PRIVATE, IPC_CREAT, IPC_RMID = 0, 0o1000, 0


def _shmget() -> int:
    """Create a SysV shared memory segment (removed at once); its id."""
    shm_id = libc.libc.shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0o600)
    if shm_id < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    libc.libc.shmctl(shm_id, IPC_RMID, None)
    return shm_id


def _sethostname() -> None:
    """Set the host name to what it is already."""
    name = socket.gethostname().encode()
    if libc.libc.sethostname(name, len(name)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _flock(path) -> None:
    with open(path, "rb") as handle:  # read-only, which Landlock allows
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _lease(path) -> None:
    with open(path, "rb") as handle:  # a read lease holds every writer of the file off for 45 s
        fcntl.fcntl(handle, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        fcntl.fcntl(handle, fcntl.F_SETLEASE, fcntl.F_UNLCK)


def _set_parent_limit() -> None:
    parent = os.getppid()  # the test process: its CPU limit, set to what it is
    resource.prlimit(parent, resource.RLIMIT_CPU, resource.prlimit(parent, resource.RLIMIT_CPU))


def _owner(path):
    stat = os.stat(path)
    return stat.st_uid, stat.st_gid


#: (name, attack(target)) for a file outside every writable path.
ATTACKS = [
    ("chmod", lambda target: os.chmod(target, os.stat(target).st_mode & 0o7777)),
    ("chown", lambda target: os.chown(target, *_owner(target))),
    ("utime", lambda target: os.utime(target, ns=(os.stat(target).st_atime_ns, os.stat(target).st_mtime_ns))),
    ("setxattr", lambda target: os.setxattr(target, "user.governor", b"attack")),
    ("removexattr", lambda target: os.removexattr(target, "user.governor")),
    ("flock", _flock),
    ("fcntl lease", _lease),
    ("SysV shm", lambda target: _shmget()),
    ("sethostname", lambda target: _sethostname()),
    ("raw socket", lambda target: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()),
    ("packet socket", lambda target: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0).close()),
    ("MPTCP socket", lambda target: socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP).close()),
    ("prlimit on the parent", lambda target: _set_parent_limit()),
    ("setpriority on the parent",
     lambda target: os.setpriority(os.PRIO_PROCESS, os.getppid(), os.getpriority(os.PRIO_PROCESS, os.getppid()))),
    ("setpriority on the user", lambda target: os.setpriority(os.PRIO_USER, os.getuid(), 0)),
    ("sched_setaffinity on the parent",
     lambda target: os.sched_setaffinity(os.getppid(), os.sched_getaffinity(os.getppid()))),
]


@pytest.fixture
def target(tmp_path):
    path = tmp_path / "outside.txt"
    path.write_text("theirs")
    try:
        os.setxattr(path, "user.governor", b"theirs")
    except OSError:
        pass
    return path


def _stat_of(path):
    stat = os.stat(path)
    return stat.st_mode, stat.st_uid, stat.st_gid, stat.st_mtime_ns, path.read_text()


@pytest.mark.parametrize("name,attack", ATTACKS, ids=[name for name, _ in ATTACKS])
def test_an_attack_landlock_does_not_see_is_refused_by_seccomp(name, attack, target, tmp_path):
    try:  # the control: unsandboxed, in a child too, so the test process keeps its state
        run_sandboxed(lambda report: attack(target), SandboxPolicy(tmp_root=tmp_path),
                      before=_no_sandbox).unwrap()
    except AssertionError as unsandboxed:
        pytest.skip(f"{name} fails here even unsandboxed: {str(unsandboxed).splitlines()[-1]}")
    before = _stat_of(target)
    outcome = run_sandboxed(lambda report: attack(target), SandboxPolicy(tmp_root=tmp_path))
    assert "seccomp" in outcome.report.label
    assert isinstance(outcome.error, PermissionError) and outcome.error.errno == errno.EPERM, \
        f"{name} got through the sandbox: {outcome}"
    assert _stat_of(target) == before


def _no_sandbox():
    # run_sandboxed's control run: apply() becomes a no-op report.
    from governor.workers import sandbox
    sandbox.apply = lambda policy: sandbox.SandboxReport(0)


def test_tiocsti_into_a_terminal_is_refused(tmp_path):
    fds = {}

    def open_terminal():  # before the sandbox, as a worker inherits its terminal
        fds["master"], fds["slave"] = os.openpty()

    def push_keys(report):
        fcntl.ioctl(fds["slave"], termios.TIOCSTI, b"x")

    control = run_sandboxed(push_keys, SandboxPolicy(tmp_root=tmp_path), before=lambda: (open_terminal(), _no_sandbox()))
    if control.error is not None:
        pytest.skip(f"TIOCSTI fails here even unsandboxed: {control.error}")
    outcome = run_sandboxed(push_keys, SandboxPolicy(tmp_root=tmp_path), before=open_terminal)
    assert isinstance(outcome.error, PermissionError) and outcome.error.errno == errno.EPERM


def test_what_a_read_only_step_needs_still_works(tmp_path):
    database = tmp_path / "data.sqlite3"
    with sqlite3.connect(database) as connection:
        connection.execute("create table t (x)")
        connection.execute("insert into t values (42)")
    connection.close()

    def ordinary(report):
        resource.setrlimit(resource.RLIMIT_NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE))
        resource.prlimit(0, resource.RLIMIT_NOFILE)
        os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0))
        os.sched_setaffinity(0, os.sched_getaffinity(0))
        os.sched_setaffinity(os.getpid(), os.sched_getaffinity(0))
        for family, kind in ((socket.AF_INET, socket.SOCK_STREAM), (socket.AF_UNIX, socket.SOCK_DGRAM),
                             (socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)):
            socket.socket(family, kind).close()
        socket.socketpair()[0].close()
        socket.getaddrinfo("localhost", 80)
        read_end, write_end = os.pipe()
        fcntl.fcntl(read_end, fcntl.F_SETFL, fcntl.fcntl(read_end, fcntl.F_GETFL) | os.O_NONBLOCK)
        fcntl.ioctl(read_end, termios.FIONREAD, struct.pack("i", 0))
        with open(os.path.join(report.tmpdir, "scratch"), "w") as scratch:
            scratch.write("mine")
        reader = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
        rows = reader.execute("select x from t").fetchall()
        reader.close()
        return rows, subprocess.run(["true"]).returncode

    outcome = run_sandboxed(ordinary, SandboxPolicy(tmp_root=tmp_path))
    assert outcome.unwrap() == ([(42,)], 0)


def test_copying_a_file_in_a_pool_step_works_the_documented_way(tmp_path):
    """The filter refuses chmod and utime even in a step's own temp dir (seccomp sees no
    paths), so copy2 and a plain extraction fail there; the README's ways round it work."""
    source = tmp_path / "source.txt"
    source.write_text("data")
    with tarfile.open(tmp_path / "archive.tar", "w") as archive:
        archive.add(source, arcname="inside.txt")

    def copy(report):
        target = os.path.join(report.tmpdir, "copy.txt")
        with pytest.raises(PermissionError) as refused:
            shutil.copy2(source, target)
        sandbox.denied_write(refused.value, report)
        assert refused.value.__notes__ == [denials.METADATA_NOTE]  # says why, and what works instead
        shutil.copyfile(source, target)
        with tarfile.open(tmp_path / "archive.tar") as archive:
            archive.extractall(report.tmpdir, filter=lambda member, path: member.replace(mode=None, mtime=None))
        with open(target) as copied, open(os.path.join(report.tmpdir, "inside.txt")) as extracted:
            return copied.read(), extracted.read()

    assert run_sandboxed(copy, SandboxPolicy(tmp_root=tmp_path)).unwrap() == ("data", "data")


def _udp_send(port: int) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        return sock.sendto(b"x", ("127.0.0.1", port))


def test_udp_is_refused_unless_the_step_declared_network(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        refused = run_sandboxed(lambda report: _udp_send(port), SandboxPolicy(tmp_root=tmp_path))
        assert isinstance(refused.error, PermissionError) and refused.error.errno == errno.EPERM
        allowed = run_sandboxed(lambda report: _udp_send(port), SandboxPolicy(tmp_root=tmp_path, network=True))
        assert allowed.unwrap() == 1
        server.settimeout(30)
        assert server.recv(1) == b"x"  # from the step that declared the network


def test_the_filter_holds_threads_started_before_it(tmp_path):
    import threading
    started, result = threading.Event(), {}

    def thread_body():
        started.wait()
        try:
            os.chmod(target_path, 0o644)
        except OSError as error:
            result["errno"] = error.errno

    target_path = tmp_path / "outside"
    target_path.write_text("x")
    holder = {}

    def start_thread():
        holder["thread"] = threading.Thread(target=thread_body)
        holder["thread"].start()

    def chmod_from_the_thread(report):
        started.set()
        holder["thread"].join()
        return result.get("errno")

    outcome = run_sandboxed(chmod_from_the_thread, SandboxPolicy(tmp_root=tmp_path), before=start_thread)
    assert outcome.unwrap() == errno.EPERM


# -- through a real Supervisor ----------------------------------------------------------

def set_cpu_limit(pid: int, seconds: int) -> None:
    """Set ``pid``'s RLIMIT_CPU soft limit (the attack that killed the supervisor)."""
    resource.prlimit(pid, resource.RLIMIT_CPU, (seconds, resource.prlimit(pid, resource.RLIMIT_CPU)[1]))


def mptcp_connect(port: int) -> bytes:
    """Connect over MPTCP (protocol 262), past Landlock's TCP rule, and read a reply."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP) as connection:
        connection.connect(("127.0.0.1", port))
        return connection.recv(16)


def test_a_pool_step_can_neither_limit_the_supervisor_nor_connect_over_mptcp():
    registry = StepRegistry()
    registry.register(set_cpu_limit, name="pool.prlimit", critical=False)
    registry.register(mptcp_connect, name="pool.mptcp", critical=False)
    limit = resource.getrlimit(resource.RLIMIT_CPU)
    with socket.create_server(("127.0.0.1", 0)) as server, \
            Supervisor(registry, workers=1, sandbox="require") as sup:
        with pytest.raises(PermissionError) as refused:  # the step's own exception
            sup.submit("pool.prlimit", os.getpid(), 10 ** 6).result(timeout=60)
        assert refused.value.errno == errno.EPERM
        assert resource.getrlimit(resource.RLIMIT_CPU) == limit
        with pytest.raises(PermissionError) as refused:
            sup.submit("pool.mptcp", server.getsockname()[1]).result(timeout=60)
        assert refused.value.errno == errno.EPERM
        assert all(w["sandbox"].endswith("+seccomp") for w in sup.describe_workers() if w["lane"] == "pool")


# -- refusals reported as what they are --------------------------------------------------

def _sqlite_insert(database):
    connection = sqlite3.connect(database)
    connection.execute("insert into t values (1)")
    connection.commit()


def _git_commit(repo):
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "m"],
                   check=True, capture_output=True)


def _bind(path):
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))


@pytest.fixture
def outside(tmp_path):
    """A directory outside every writable path, with an SQLite database and a git repository."""
    area = tmp_path / "outside"
    area.mkdir()
    with sqlite3.connect(area / "data.sqlite3") as connection:
        connection.execute("create table t (x)")
    connection.close()
    repo = area / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "a.txt").write_text("a")
    subprocess.run(["git", "-C", str(repo), "add", "a.txt"], check=True)
    (tmp_path / "tmp").mkdir()
    return area


#: (name, refused call(area, report), the path it must be reported as denied, from area)
REFUSED = [
    ("sqlite", lambda area, report: _sqlite_insert(area / "data.sqlite3"), "data.sqlite3"),
    ("git", lambda area, report: _git_commit(area / "repo"), "repo/.git/index.lock"),
    ("mkfifo", lambda area, report: os.mkfifo(area / "fifo"), "fifo"),
    ("mkfifo by name", lambda area, report: os.mkfifo(str(area) + "/fifo"), "fifo"),
    ("unix bind", lambda area, report: _bind(area / "socket"), "socket"),
    ("link out of it", lambda area, report: os.link(area / "data.sqlite3", os.path.join(report.tmpdir, "l")),
     "data.sqlite3"),
    ("chmod", lambda area, report: os.chmod(area / "data.sqlite3", 0o600), "data.sqlite3"),
]


@pytest.mark.parametrize("name,refused,denied", REFUSED, ids=[name for name, _, _ in REFUSED])
def test_a_refusal_reaching_the_step_by_any_route_is_reported_as_a_denial(name, refused, denied, outside, tmp_path):
    outcome = run_sandboxed(lambda report: refused(outside, report), SandboxPolicy(tmp_root=tmp_path / "tmp"))
    assert outcome.error is not None, f"{name} was not refused"
    assert outcome.denied == str(outside / denied), outcome.traceback


def test_a_steps_own_permission_error_is_not_a_denial_whatever_it_names(tmp_path):
    def claims_a_denial(report):
        raise PermissionError(errno.EACCES, "Permission denied", "/etc/hostname")

    outcome = run_sandboxed(claims_a_denial, SandboxPolicy(tmp_root=tmp_path))
    assert isinstance(outcome.error, PermissionError) and outcome.denied is None


def sqlite_insert(database: str) -> None:
    """Insert a row into ``database`` (refused in a sandboxed pool worker)."""
    _sqlite_insert(database)


def test_an_sqlite_refusal_ends_the_task_as_read_only_violation_and_is_counted(outside):
    registry = StepRegistry()
    registry.register(sqlite_insert, name="pool.sqlite", critical=False)
    with Supervisor(registry, workers=1, sandbox="require") as sup:
        with pytest.raises(ReadOnlyViolation) as refused:
            sup.submit("pool.sqlite", str(outside / "data.sqlite3")).result(timeout=60)
        assert refused.value.path == str(outside / "data.sqlite3")
        assert sup.metrics()["sandbox_denials"] == {"pool.sqlite": 1}
