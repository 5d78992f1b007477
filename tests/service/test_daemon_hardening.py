"""The daemon and its clients under the conditions of issues 13 and 16: paths relative to the
caller, start-up checks before any worker, one id per task, connections that cannot wedge the
daemon, a daemon that dies under its clients, absurd limits and journaled tasks that can no
longer run. Every daemon is real: a subprocess, or a Daemon on its own loop in this process."""

import asyncio
import json
import os
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import psutil
import pytest

from conftest import wait_until
from daemon_harness import DaemonProcess, InProcessDaemon, kill_all
from governor import Call, protocol
from governor.client import Client, DaemonUnavailable
from governor.errors import (DaemonAlreadyRunning, JournalLocked, JournalLost, JournalUnavailable, MetricsAddressInvalid,
                             MetricsAddressUnavailable, SocketDirectoryUnsafe, StepFailed, StepTimeout, TaskNotResumable, TooManyClients)
from governor.service.config import DaemonConfig, load_registry, parse_metrics_addr
from governor.service.daemon import Daemon
from governor.service.journal import Journal, NewTask
from governor.limits import Lane

REPO = Path(__file__).resolve().parents[2]  # a git work tree: the daemons' working directory


def frame(message: dict) -> bytes:
    body = json.dumps(message).encode()
    return struct.pack(">I", len(body)) + body


def read_frame(sock: socket.socket) -> dict:
    header = sock.recv(4, socket.MSG_WAITALL)
    (length,) = struct.unpack(">I", header)
    return json.loads(sock.recv(length, socket.MSG_WAITALL))


def _children():
    return psutil.Process().children(recursive=True)


# --------------------------------------------------------------------------- the client is light

def test_the_client_path_imports_neither_loky_psutil_nor_the_supervisor(tmp_path):
    probe = (
        "import sys\n"
        "from governor import Client, AsyncClient, DaemonUnavailable\n"
        "try:\n"
        f"    Client({str(tmp_path / 'absent.sock')!r})\n"
        "except DaemonUnavailable:\n"
        "    pass\n"
        "heavy = ('loky', 'psutil', 'governor.engine.supervisor', 'governor.service.daemon', 'prometheus_client')\n"
        "print(sorted(name for name in heavy if name in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# --------------------------------------------------------------------------- paths

def test_a_relative_path_means_the_callers_directory_not_the_daemons(tmp_path):
    elsewhere = tmp_path / "not-a-repo"
    elsewhere.mkdir()
    daemon = DaemonProcess(tmp_path, builtin=True).start()  # its cwd: this repository
    try:
        waited = daemon.cli("submit", "git.current_branch", "-p", "repo=.", "--wait", "--json", cwd=elsewhere)
        assert waited.returncode != 0, waited.stdout
        assert "not a git repository" in waited.stdout
        record = json.loads(waited.stdout)
        assert record["params"] == {"repo": str(elsewhere)}
        with Client(daemon.socket) as client:
            os.chdir(elsewhere)
            try:
                with pytest.raises(StepFailed, match="not a git repository"):
                    client.submit("git.current_branch").result(timeout=60)  # the default "." too
                nested = client.submit("task.execute", steps=[{"step": "git.status", "params": {"repo": "."}}])
                with pytest.raises(StepFailed):
                    nested.result(timeout=60)
                assert nested.record["params"]["steps"][0]["params"]["repo"] == str(elsewhere)
            finally:
                os.chdir(REPO)
            assert client.submit("git.current_branch", repo=str(REPO)).result(timeout=60)
    finally:
        assert daemon.stop() == 0


def test_a_relative_path_without_a_cwd_is_refused(tmp_path):
    daemon = DaemonProcess(tmp_path, builtin=True).start()
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(60)
            sock.connect(str(daemon.socket))
            sock.sendall(frame({"v": 1, "id": 1, "op": "submit", "step": "git.status", "params": {"repo": "."}}))
            reply = read_frame(sock)
        assert reply["error"]["type"] == "InvalidParameters" and "relative path" in reply["error"]["message"]
    finally:
        assert daemon.stop() == 0


# --------------------------------------------------------------------------- start-up checks

@pytest.mark.parametrize("text, expected", [
    ("9468", ("127.0.0.1", 9468)), ("0.0.0.0:9", ("0.0.0.0", 9)), ("localhost:9468", ("localhost", 9468)),
    ("[::1]:9468", ("::1", 9468)), (" [::]:80 ", ("::", 80)),
])
def test_metrics_addresses_parse(text, expected):
    assert parse_metrics_addr(text) == expected


@pytest.mark.parametrize("text", ["::1:9468", "[::1]9468", "[nope]:1", ":9468", "host:", "host:0", "host:70000",
                                  "[::1]:x", ""])
def test_bad_metrics_addresses_are_one_clear_error(text):
    with pytest.raises(MetricsAddressInvalid) as refused:
        parse_metrics_addr(text)
    assert "\n" not in str(refused.value)


def _start(tmp_path, **config):
    """Start a daemon in this process; return the error it raised (it must raise)."""
    settings = {"socket_path": tmp_path / "run" / "g.sock", "journal_path": tmp_path / "state" / "j.sqlite3",
                "workers": 1, **config}
    daemon = Daemon(load_registry(["step_library"], entry_points=False, builtin=False), DaemonConfig(**settings))
    before = {child.pid for child in _children()}
    with pytest.raises(Exception) as raised:
        asyncio.run(daemon.start())
    assert {child.pid for child in _children()} <= before, "a worker was started before the check failed"
    return raised.value, settings


def test_an_open_socket_directory_fails_before_any_worker(tmp_path):
    (tmp_path / "run").mkdir(mode=0o755)
    os.chmod(tmp_path / "run", 0o755)
    error, settings = _start(tmp_path)
    assert isinstance(error, SocketDirectoryUnsafe) and "open to other users" in str(error)
    assert not settings["socket_path"].exists()


def test_a_metrics_port_in_use_fails_before_any_worker_and_leaves_no_socket(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        error, settings = _start(tmp_path, metrics_addr=f"127.0.0.1:{taken.getsockname()[1]}")
    assert isinstance(error, MetricsAddressUnavailable) and "in use" in str(error)
    assert not settings["socket_path"].exists()
    # Nothing held: the same journal and socket start a daemon at once.
    with InProcessDaemon(tmp_path, socket_path=settings["socket_path"], journal_path=settings["journal_path"]):
        pass


def test_a_live_socket_and_a_locked_journal_are_refused(tmp_path):
    with InProcessDaemon(tmp_path) as running:
        error, _ = _start(tmp_path / "other", socket_path=running.socket)
        assert isinstance(error, DaemonAlreadyRunning)
        error, _ = _start(tmp_path / "other", journal_path=running.journal)
        assert isinstance(error, JournalLocked)
    assert not running.socket.exists()


@pytest.mark.parametrize("link", ["symlink", "hard link"])
def test_a_second_daemon_on_the_same_journal_under_another_name_is_refused(tmp_path, link):
    with InProcessDaemon(tmp_path) as running:
        other_name = tmp_path / "elsewhere" / "alias.sqlite3"
        other_name.parent.mkdir()
        (os.symlink if link == "symlink" else os.link)(running.journal, other_name)
        error, _ = _start(tmp_path / "other", journal_path=other_name)
        assert isinstance(error, JournalLocked) and "the same file" in str(error)


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_daemon_whose_journal_goes_takes_no_new_work_and_says_why(tmp_path, how, caplog):
    with InProcessDaemon(tmp_path) as running, Client(running.socket) as client:
        assert client.submit("echo", value=1).result(timeout=60) is not None
        if how == "deleted":
            running.journal.unlink()
        else:
            stranger = running.journal.with_name("stranger.sqlite3")
            sqlite3.connect(stranger).close()
            os.replace(stranger, running.journal)
        with pytest.raises(JournalLost, match=how):
            client.submit("echo", value=2).result(timeout=60)
        with pytest.raises(JournalLost):
            client.submit_batch([Call("echo", kwargs={"value": 3})]).result(timeout=60)
    assert sum(how in record.getMessage() for record in caplog.records if record.levelname == "ERROR") == 1


@pytest.mark.parametrize("journal", ["a directory", "not SQLite", "in a file's place"])
def test_a_journal_that_cannot_be_used_is_its_own_error_before_any_worker(tmp_path, journal):
    path = tmp_path / "state" / "j.sqlite3"
    path.parent.mkdir()
    if journal == "a directory":
        path.mkdir()
    elif journal == "not SQLite":
        path.write_text("a note, not a journal\n")
    else:
        path.parent.rmdir()
        path.parent.write_text("")  # the journal's directory is a file
    error, _ = _start(tmp_path, journal_path=path)
    assert isinstance(error, JournalUnavailable) and str(path) in str(error)


def test_metrics_are_served_on_ipv6(tmp_path):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    with socket.socket(socket.AF_INET6) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback here")
        port = probe.getsockname()[1]
    with InProcessDaemon(tmp_path, metrics_addr=f"[::1]:{port}"):
        with urllib.request.urlopen(f"http://[::1]:{port}/metrics", timeout=30) as response:
            assert b"governor_" in response.read()


# --------------------------------------------------------------------------- connections

def test_too_many_clients_is_reported_as_such_and_idle_connections_are_closed(tmp_path):
    with InProcessDaemon(tmp_path, max_connections_per_uid=3, idle_timeout_s=1.0) as running:
        held = [socket.socket(socket.AF_UNIX) for _ in range(3)]
        for sock in held:
            sock.settimeout(60)
            sock.connect(str(running.socket))
        assert wait_until(lambda: running.statistics().connections == 3, timeout=30)
        refused = Client(running.socket)
        with pytest.raises(TooManyClients, match="too many clients"):
            refused.ping()
        refused.close()
        for sock in held:  # idle, they are closed by the daemon: its slots come back
            assert sock.recv(1) == b""
            sock.close()
        with Client(running.socket) as client:
            future = client.submit("timed_sleep", ms=3000)  # longer than the idle timeout
            assert future.result(timeout=60)[0] == "", "a connection waiting for a task is not idle"
            assert wait_until(lambda: running.statistics().connections == 0, timeout=30)
            assert client.ping()["version"] == 1, "the client reconnects after an idle close"


def test_waits_are_forgotten_when_their_connection_closes(tmp_path):
    with InProcessDaemon(tmp_path) as running:
        with Client(running.socket) as client:
            long = client.submit("timed_sleep", ms=120_000)
            for _ in range(5):
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.connect(str(running.socket))
                    sock.sendall(b"".join(frame({"v": 1, "id": n, "op": "wait", "task_id": long.task_id})
                                          for n in range(100)))
                    assert wait_until(lambda: running.statistics().waiters >= 100, timeout=30)
            assert wait_until(lambda: running.statistics().waiters == 1, timeout=30), running.statistics()
            long.cancel()


def test_an_end_the_journal_cannot_take_yet_is_written_later_and_then_answered(tmp_path, caplog):
    # Another process holds the journal's write lock past the busy timeout as a task ends:
    # the write fails, and once was the end of the task's waiters too (nobody answered).
    marker, go = tmp_path / "started", tmp_path / "go"
    with InProcessDaemon(tmp_path) as running, Client(running.socket) as client:
        future = client.submit("hold_until", marker=str(marker), go=str(go))
        assert wait_until(marker.exists, timeout=60)  # its start is journaled: the lock blocks only its end
        other = sqlite3.connect(running.journal, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            go.touch()
            assert wait_until(lambda: "database is locked" in caplog.text, timeout=60)
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert future.result(timeout=30) == int(marker.read_text())
        assert client.status(future.task_id)["state"] == "done"


def test_the_submissions_of_one_turn_of_the_loop_share_one_commit(tmp_path):
    go = tmp_path / "go"
    with InProcessDaemon(tmp_path) as running:
        sockets = [socket.socket(socket.AF_UNIX) for _ in range(30)]
        try:
            for sock in sockets:
                sock.connect(str(running.socket))
            before = running.statistics().journal_commits
            # Hold the daemon's loop while every connection sends its submission, so that
            # all of them are there to be read in the loop's next turn.
            paused, resume = threading.Event(), threading.Event()
            running.loop.call_soon_threadsafe(lambda: (paused.set(), resume.wait(30)))
            assert paused.wait(30)
            for n, sock in enumerate(sockets):
                sock.sendall(frame({"v": 1, "id": n, "op": "submit", "step": "hold_until",
                                    "params": {"marker": str(tmp_path / f"started-{n}"), "go": str(go)}}))
            resume.set()
            replies = [read_frame(sock) for sock in sockets]
            assert all(reply["ok"] for reply in replies), replies
            # The 30 submissions, and the starts of the two that reached the two workers.
            assert running.statistics().journal_commits - before <= 4
        finally:
            go.touch()
            for sock in sockets:
                sock.close()


# --------------------------------------------------------------------------- the daemon dies

def test_in_flight_futures_raise_daemon_unavailable_when_the_daemon_dies(tmp_path):
    daemon = DaemonProcess(tmp_path).start()
    with Client(daemon.socket) as client:
        future = client.submit("timed_sleep", ms=120_000)
        descendants = psutil.Process(daemon.process.pid).children(recursive=True)
        daemon.stop(signal.SIGKILL)
        with pytest.raises(DaemonUnavailable):
            future.result(timeout=60)
    kill_all(descendants)


# --------------------------------------------------------------------------- limits, resume, ids

@pytest.mark.parametrize("limits", [{"timeout_s": 10 ** 400}, {"max_memory_mb": 10 ** 400}])
def test_absurd_limits_are_a_typed_refusal(tmp_path, limits):
    with InProcessDaemon(tmp_path) as running:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(60)
            sock.connect(str(running.socket))
            sock.sendall(frame({"v": 1, "id": 1, "op": "submit", "step": "echo", "params": {"value": 1},
                                "limits": limits}))
            reply = read_frame(sock)
        error = protocol.error_from_wire(reply["error"])
        assert isinstance(error, protocol.ProtocolError) and error.field.startswith("limits"), reply
        with Client(running.socket) as client:
            assert client.submit("echo", value=2).result(timeout=60) == 2


def test_a_journaled_task_that_can_no_longer_run_fails_typed_at_resume(tmp_path):
    journal_path = tmp_path / "state" / "journal.sqlite3"
    with Journal(journal_path) as journal:
        gone, good = journal.submit([NewTask.step_call("step.removed", {}, Lane.POOL),
                                     NewTask.step_call("echo", {"value": "fine"}, Lane.POOL)])
    with Journal(journal_path) as journal:  # limits a newer bound refuses, written as an old daemon did
        with journal._transaction() as connection:
            connection.execute("UPDATE tasks SET limits = ? WHERE id = ?", ('{"timeout_s": -1}', good))
        [reshaped] = journal.submit([NewTask.step_call("echo", {"no_such_param": 1}, Lane.POOL)])
        [fine] = journal.submit([NewTask.step_call("echo", {"value": "ok"}, Lane.POOL)])
    with InProcessDaemon(tmp_path) as running, Client(running.socket) as client:
        for task_id in (gone, good, reshaped):
            record = client.wait(task_id, timeout=60)
            error = protocol.error_from_wire(record["error"])
            assert record["state"] == "failed" and isinstance(error, TaskNotResumable), record
            assert error.task_id == task_id
        assert client.wait(fine, timeout=60)["result"] == "ok"
        assert client.submit("echo", value="after").result(timeout=60) == "after"


def test_errors_name_the_journal_id(tmp_path):
    with InProcessDaemon(tmp_path) as running, Client(running.socket) as client:
        client.workflow([("echo", {"value": n}) for n in range(3)]).result(timeout=60)  # 3 supervisor ids, 1 row
        from governor import Call, Limits
        future = client.submit_call(Call("busy_loop", limits=Limits(timeout_s=0.2)))
        with pytest.raises(StepTimeout) as timed_out:
            future.result(timeout=60)
        assert timed_out.value.task_id == future.task_id == 2
        assert client.status(future.task_id)["error"]["fields"]["task_id"] == 2


def test_logs_name_the_journal_id(tmp_path):
    import io
    import logging

    from governor.logs import configure_logging

    stream = io.StringIO()
    logger = logging.getLogger("governor")
    level = logger.level
    handler = configure_logging("json", logging.DEBUG, stream)
    try:
        with InProcessDaemon(tmp_path) as running, Client(running.socket) as client:
            client.workflow([("echo", {"value": n}) for n in range(3)]).result(timeout=60)
            from governor import Call, Limits
            future = client.submit_call(Call("busy_loop", limits=Limits(timeout_s=0.2)))
            with pytest.raises(StepTimeout):
                future.result(timeout=60)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    about_the_loop = [record for record in records if record.get("step") == "busy_loop"]
    assert any(record["level"] == "WARNING" for record in about_the_loop), records
    assert {record["task_id"] for record in about_the_loop} == {future.task_id} == {2}
    assert {record["task_id"] for record in records if record.get("step") == "echo"} == {1}
