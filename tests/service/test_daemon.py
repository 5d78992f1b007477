"""The daemon as a real process: CLI round trips, the client, durability across kill -9,
bad input, the socket's safety, and load. Every daemon is started with the real binary."""

import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import alive, wait_until
from daemon_harness import DaemonProcess, daemon  # noqa: F401 (a fixture)
from governor import Call, Limits, StepCancelled, StepFailed, StepTimeout, UnknownStep
from governor.cli import EXIT_CODES, main
from governor.client import Client, DaemonUnavailable
from governor import protocol

NOBODY = 65534


@pytest.fixture
def client(daemon):
    with Client(daemon.socket) as connected:
        yield connected


def test_cli_round_trips_through_the_real_binary(daemon, tmp_path):
    submitted = daemon.cli("submit", "echo", "-p", "value=41")
    assert submitted.returncode == 0, submitted.stderr
    task_id = int(submitted.stdout)
    status = json.loads(daemon.cli("status", str(task_id), "--json").stdout)
    assert status["task_id"] == task_id and status["step"] == "echo"
    waited = daemon.cli("submit", "echo", "--params", '{"value": [1, "two"]}', "--wait", "--json")
    assert waited.returncode == 0 and json.loads(waited.stdout)["result"] == [1, "two"]
    assert daemon.cli("submit", "boom", "--wait").returncode == EXIT_CODES["failed"]
    assert daemon.cli("submit", "busy_loop", "--timeout", "0.2", "--wait").returncode == EXIT_CODES["timed_out"]
    unknown = daemon.cli("submit", "git.stats", "--wait")
    assert unknown.returncode == EXIT_CODES["bad_request"] and "unknown step" in unknown.stderr
    still = daemon.cli("submit", "timed_sleep", "-p", "ms=120000", "--wait", "--wait-timeout", "0.2", "--json")
    assert still.returncode == EXIT_CODES["still_running"]
    running_id = json.loads(still.stdout)["task_id"]
    assert json.loads(daemon.cli("cancel", str(running_id), "--json").stdout)["cancelled"] == [running_id]
    listing = daemon.cli("status").stdout
    assert "echo" in listing and "timed_out" in listing
    steps = daemon.cli("steps").stdout
    assert "ledger.append" in steps and "critical" in steps
    assert "pool" in daemon.cli("workers").stdout
    assert "governor_tasks_total" in daemon.cli("metrics", "--prometheus").stdout
    assert "worker_kills" in json.loads(daemon.cli("metrics", "--json").stdout)
    batch = tmp_path / "calls.jsonl"
    batch.write_text("\n".join(json.dumps({"step": "echo", "params": {"value": n}}) for n in range(20)))
    batched = daemon.cli("submit", "--batch", str(batch), "--json")
    assert batched.returncode == 0 and len(json.loads(batched.stdout)) == 20


def test_cli_through_clirunner(daemon):
    runner = CliRunner()
    result = runner.invoke(main, ["--socket", str(daemon.socket), "submit", "echo", "-p", "value=\"x\"", "--wait",
                                  "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["result"] == "x"
    assert runner.invoke(main, ["--socket", str(daemon.socket), "steps"]).exit_code == 0
    for command in (["submit", "--help"], ["serve", "--help"], ["status", "--help"], ["cancel", "--help"],
                    ["workers", "--help"], ["metrics", "--help"], ["steps", "--help"], ["--help"]):
        shown = runner.invoke(main, command)
        assert shown.exit_code == 0 and "Example" in shown.output, command


def test_no_daemon_is_a_clear_error(tmp_path):
    with pytest.raises(DaemonUnavailable, match="governor serve"):
        Client(tmp_path / "nowhere.sock")
    result = CliRunner().invoke(main, ["--socket", str(tmp_path / "nowhere.sock"), "status"])
    assert result.exit_code == EXIT_CODES["daemon_unavailable"] and "no governor daemon" in result.output


def test_client_mirrors_the_supervisor(client, tmp_path):
    assert client.submit("echo", value=3).result(timeout=30) == 3
    assert client.run_batch([("echo", {"value": 1}), ("boom", {})], return_exceptions=True)[0] == 1
    with pytest.raises(StepFailed, match="boom"):
        client.run_batch([("echo", {"value": 1}), ("boom", {})])
    assert client.workflow([("echo", {"value": "a"}), ("echo", {"value": "b"})]).result(timeout=30) == ["a", "b"]
    with pytest.raises(StepTimeout):
        client.submit_call(Call("busy_loop", limits=Limits(timeout_s=0.2))).result(timeout=30)
    with pytest.raises(UnknownStep):
        client.submit("git.stats")
    doomed = client.submit("busy_loop")
    doomed.wait_for_id(30)
    assert doomed.cancel()
    with pytest.raises(StepCancelled):
        doomed.result(timeout=30)
    assert doomed.cancelled()
    assert client.status(doomed.task_id)["state"] == "cancelled"


def test_a_keyed_batch_supersedes_the_previous_view(client, tmp_path):
    go = str(tmp_path / "go")
    old_view = client.submit_batch([("hold_until", {"marker": str(tmp_path / f"old-{n}"), "go": go}) for n in range(2)],
                                   key="view")
    assert wait_until(lambda: all((tmp_path / f"old-{n}").exists() for n in range(2)), timeout=60)
    new_view = client.submit_batch([("echo", {"value": "fresh"})], key="view")
    assert new_view.result(timeout=60) == ["fresh"]
    outcomes = old_view.result(timeout=60)
    assert all(isinstance(outcome, StepCancelled) and outcome.reason == "superseded" for outcome in outcomes)
    assert [outcome.task_id for outcome in outcomes] == old_view.task_ids  # answered early: the ids still said
    assert all(client.status(task_id)["result"] is None for task_id in old_view.task_ids)


def test_the_journal_never_holds_two_critical_steps_running(tmp_path):
    # The manager hands the next critical step to its worker before the daemon's loop has
    # journaled the last one's end; unless the start journals that end first, a kill -9
    # in between would report two critical steps as interrupted where one was running.
    server = DaemonProcess(tmp_path, workers=1).start()
    try:
        with Client(server.socket) as client:
            futures = [client.submit("journal.running_critical", journal=str(server.journal)) for _ in range(150)]
            counts = [future.result(timeout=120) for future in futures]
    finally:
        assert server.stop() == 0
    assert set(counts) == {1}, f"critical rows running at a step's start: {counts}"


def test_kill_9_loses_nothing_and_runs_no_critical_step_twice(tmp_path):
    ledger = tmp_path / "ledger.txt"
    first = DaemonProcess(tmp_path, workers=2).start()
    with Client(first.socket) as client:
        pool = [client.submit("timed_sleep", ms=2000, tag=f"pool-{n}") for n in range(3)]
        critical = [client.submit("ledger.append", path=str(ledger), seq=seq, ms=2) for seq in range(500)]
        ids = [future.wait_for_id(30) for future in pool + critical]
        assert wait_until(lambda: ledger.exists() and len(ledger.read_text().splitlines()) >= 20, timeout=60)
        first.stop(signal.SIGKILL)
    assert wait_until(lambda: not any(alive(child.pid) for child in _descendants_of(first.process.pid)), timeout=15)

    second = DaemonProcess(tmp_path, workers=2).start()
    try:
        with Client(second.socket) as client:
            records = [client.wait(task_id, timeout=120) for task_id in ids]
    finally:
        assert second.stop() == 0
    assert all(record["final"] for record in records), "every accepted task reached an end"
    states = {record["task_id"]: record["state"] for record in records}
    assert set(states.values()) <= {"done", "interrupted"}
    runs = [int(line.split()[0]) for line in ledger.read_text().splitlines()]
    assert len(runs) == len(set(runs)), "a critical step ran twice"
    assert runs == sorted(runs), "the critical lane's order was not kept"
    critical_records = records[3:]
    assert {r["task_id"] for r in critical_records if r["state"] == "done"} <= set(ids[3:])
    done_seqs = [seq for seq, record in enumerate(critical_records) if record["state"] == "done"]
    assert set(done_seqs) <= set(runs)
    interrupted = [r for r in records if r["state"] == "interrupted"]
    assert all(r["lane"] == "critical" for r in interrupted), "read-only steps are re-run, never interrupted"
    assert len(interrupted) <= 1, "only the one critical step running at the kill can be interrupted"


def test_a_workflow_queued_at_kill_9_resumes_and_the_running_critical_step_is_interrupted(tmp_path):
    first = DaemonProcess(tmp_path, workers=1).start()
    with Client(first.socket) as client:
        marker = tmp_path / "blocking"
        blocker = client.submit_batch([("critical_busy_loop", {"marker": str(marker)})])
        assert wait_until(marker.exists, timeout=60)
        caller = tmp_path / "caller"
        caller.mkdir()
        with contextlib.chdir(caller):  # the client's directory, not the daemons'
            flow = client.workflow([("echo", {"value": "a"}), ("critical_record", {"ms": 1, "tag": "b"}),
                                    ("inherited_state", {})])
        ids = blocker.task_ids + [flow.task_id]
    first.stop(signal.SIGKILL)
    assert wait_until(lambda: not any(alive(child.pid) for child in _descendants_of(first.process.pid)), timeout=15)
    second = DaemonProcess(tmp_path, workers=1).start()
    try:
        with Client(second.socket) as client:
            interrupted, resumed = [client.wait(task_id, timeout=120) for task_id in ids]
    finally:
        assert second.stop() == 0
    assert interrupted["state"] == "interrupted" and interrupted["interrupted"]
    assert resumed["state"] == "done" and resumed["result"][0] == "a"
    assert resumed["result"][2]["cwd"] == str(caller)  # resumed where it was asked from


def _descendants_of(pid):
    import psutil
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def raw_exchange(path: Path, payload: bytes, read: bool = True) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        sock.sendall(payload)
        if not read:
            return b""
        try:
            header = sock.recv(4, socket.MSG_WAITALL)
            if len(header) < 4:
                return b""
            (length,) = struct.unpack(">I", header)
            return sock.recv(length, socket.MSG_WAITALL)
        except (ConnectionResetError, socket.timeout):
            return b""


def error_type(reply: bytes) -> str:
    return json.loads(reply)["error"]["type"] if reply else ""


def test_a_steps_notes_reach_the_client_and_the_journal(daemon, client):
    with pytest.raises(StepFailed) as raised:
        client.submit("noted_boom", message="bad row", notes=["row 7", "of orders.csv"]).result(timeout=60)
    assert raised.value.__notes__ == ["row 7", "of orders.csv"]
    assert "row 7" in raised.value.remote_traceback
    record = client.wait(raised.value.task_id, timeout=60)  # read back from the journal
    assert record["error"]["notes"] == ["row 7", "of orders.csv"]


def test_bad_input_gets_error_replies_and_the_daemon_serves_on(daemon, client):
    frame = lambda body: struct.pack(">I", len(body)) + body  # noqa: E731
    assert error_type(raw_exchange(daemon.socket, frame(b"{not json"))) == "ProtocolError"
    assert error_type(raw_exchange(daemon.socket, struct.pack(">I", 10 << 20) + b"x" * 1024)) == "ProtocolError"
    raw_exchange(daemon.socket, struct.pack(">I", 100) + b'{"v": 1', read=False)  # truncated, then gone
    raw_exchange(daemon.socket, os.urandom(4096), read=False)
    wrong = json.dumps({"v": 1, "id": 1, "op": "submit", "step": 5}).encode()
    assert error_type(raw_exchange(daemon.socket, frame(wrong))) == "ProtocolError"
    extra = json.dumps({"v": 1, "id": 2, "op": "submit", "step": "echo", "params": {"nope": 1}}).encode()
    assert error_type(raw_exchange(daemon.socket, frame(extra))) == "InvalidParameters"
    unknown = json.dumps({"v": 1, "id": 3, "op": "submit", "step": "no.such.step"}).encode()
    assert error_type(raw_exchange(daemon.socket, frame(unknown))) == "UnknownStep"
    assert client.submit("echo", value="alive").result(timeout=30) == "alive"


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=4), max_leaves=12)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=st.dictionaries(st.sampled_from(["v", "id", "op", "step", "params", "calls", "task_ids", "wait",
                                                "key", "limits", "timeout", "format", "task_id"]),
                               json_values, max_size=6))
def test_random_requests_never_hurt_the_daemon(daemon, request):
    # One daemon for every example (a function-scoped fixture is built once per test).
    body = json.dumps(request).encode()
    reply = raw_exchange(daemon.socket, struct.pack(">I", len(body)) + body)
    if reply:
        decoded = json.loads(reply)
        assert decoded["v"] == 1 and "ok" in decoded
    with Client(daemon.socket) as client:
        assert client.ping()["version"] == 1


def test_socket_is_private_and_other_users_are_refused(daemon):
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o600
    assert stat.S_IMODE(daemon.socket.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(daemon.journal.stat().st_mode) == 0o600
    if os.getuid() != 0:
        pytest.skip("needs root to act as another user")
    # Open the file permissions wide: the peer-credential check must still refuse.
    os.chmod(daemon.socket.parent, 0o755)
    os.chmod(daemon.socket, 0o777)
    try:
        reply = _exchange_as(NOBODY, daemon.socket, protocol.encode(protocol.Ping(1).to_wire()))
    finally:
        os.chmod(daemon.socket, 0o600)
        os.chmod(daemon.socket.parent, 0o700)
    assert b"PeerRefused" in reply and b"uid 65534 was refused" in reply


def _exchange_as(uid: int, path: Path, payload: bytes) -> bytes:
    """Fork a child that becomes ``uid`` and talks to the socket; return what it read."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the child uses only the already-imported socket module, then _exits
        try:
            os.close(read_end)
            # Enter the socket's directory first: the test's private ancestors stay closed
            # to the other user, and a relative path needs no search permission on them.
            os.chdir(path.parent)
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                sock.connect(path.name)
                try:
                    sock.sendall(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # a refused peer is answered and dropped at once; the answer is queued
                os.write(write_end, sock.recv(65536))
        except BaseException as error:
            os.write(write_end, repr(error).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        received = pipe.read()
    os.waitpid(child, 0)
    return received


def test_many_clients_at_once_each_get_their_own_results(daemon):
    # Correctness under concurrency only: the rate is the bench's (its daemon scenario).
    def one_client(number):
        with Client(daemon.socket) as client:
            futures = [client.submit("echo", value=[number, n]) for n in range(20)]
            return [future.result(timeout=60) for future in futures]

    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(one_client, range(20)))
    assert results == [[[number, n] for n in range(20)] for number in range(20)]


def test_a_test_daemon_ends_with_the_test_process_even_without_its_teardown(tmp_path):
    # As pytest-timeout ends a run: os._exit, no fixture teardown. The daemon and what it
    # started must not outlive the process that started them.
    script = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        import psutil
        sys.path.insert(0, {str(Path(__file__).parents[1])!r})
        from daemon_harness import DaemonProcess
        daemon = DaemonProcess(Path({str(tmp_path)!r})).start()
        tree = psutil.Process(daemon.process.pid).children(recursive=True)
        print(daemon.process.pid, *(process.pid for process in tree), flush=True)
        os._exit(1)
    """)
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    pids = [int(pid) for pid in ran.stdout.split()]
    assert pids, ran.stderr
    if not wait_until(lambda: not any(alive(pid) for pid in pids), timeout=30):
        survivors = [pid for pid in pids if alive(pid)]
        for pid in survivors:  # still ours: leave nothing behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        pytest.fail(f"outlived the test process: {survivors}")


def test_sigterm_keeps_queued_work_for_the_next_start(tmp_path):
    ledger = tmp_path / "ledger.txt"
    first = DaemonProcess(tmp_path, workers=1).start()
    with Client(first.socket) as client:
        futures = [client.submit("ledger.append", path=str(ledger), seq=seq, ms=20) for seq in range(100)]
        ids = [future.wait_for_id(30) for future in futures]
        assert wait_until(lambda: ledger.exists() and len(ledger.read_text().splitlines()) >= 3, timeout=60)
    assert first.stop(signal.SIGTERM) == 0
    ran_before = len(ledger.read_text().splitlines())
    assert ran_before < 100, "queued steps were kept, not run, during the shutdown"
    second = DaemonProcess(tmp_path, workers=1).start()
    try:
        with Client(second.socket) as client:
            states = [client.wait(task_id, timeout=120)["state"] for task_id in ids]
    finally:
        assert second.stop() == 0
    assert states == ["done"] * 100
    runs = [int(line.split()[0]) for line in ledger.read_text().splitlines()]
    assert runs == list(range(100))


@pytest.mark.ray
def test_serve_with_the_ray_backend_runs_pool_steps_on_its_own_node_and_leaves_nothing(tmp_path):
    # No Ray in the daemon's process: it starts a private node on 127.0.0.1, and its
    # shutdown takes that node's processes with it.
    pytest.importorskip("ray", reason="the ray extra is not installed")
    daemon = DaemonProcess(tmp_path, workers=2, extra_args=("--backend", "ray")).start()
    try:
        with Client(daemon.socket) as client:
            assert client.submit("echo", value="on ray").result(timeout=60) == "on ray"
            with pytest.raises(StepTimeout):
                client.submit_call(Call("busy_loop", limits=Limits(timeout_s=0.3))).result(timeout=60)
            assert client.submit("critical_record", ms=1, tag="local").result(timeout=60)[0] == "local"
            assert client.metrics()["worker_kills"]["pool"] == {"timeout": 1}
        tree = psutil.Process(daemon.process.pid).children(recursive=True)
        assert any(process.name() == "raylet" for process in tree), "the daemon runs its own Ray node"
    finally:
        assert daemon.stop() == 0, daemon.log.read_text()
    assert wait_until(lambda: not [p for p in tree if alive(p.pid)], timeout=30), "Ray's processes outlived the daemon"


def test_serve_refuses_a_ray_address_without_the_ray_backend(tmp_path):
    result = CliRunner().invoke(main, ["serve", "--socket", str(tmp_path / "s.sock"), "--ray-address", "auto"])
    assert result.exit_code == 2 and "--backend ray" in result.output
