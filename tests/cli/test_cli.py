"""The ``governor`` command as a user meets it: each test runs the real command (a subprocess,
or CliRunner) against a real daemon (``governor serve`` in a subprocess, tests/daemon_harness.py)."""

import contextlib
import json
import os
import pty
import signal
import socket
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path
from typing import List, Tuple

import pytest

from conftest import ctrl_c_not_ignored, wait_until
from daemon_harness import DaemonProcess, daemon  # noqa: F401 (daemon: a fixture)
from governor.cli import EXIT_CODES

#: Modules a client command must not import: the engine and what only the engine needs.
ENGINE_MODULES = ("loky", "psutil", "prometheus_client", "governor.engine.supervisor", "governor.service.daemon",
                  "governor.engine.manager", "governor.cli.run")


def governor(*args: str, env: dict = None, cwd: Path = None, python_flags: tuple = ()) -> subprocess.CompletedProcess:
    """``python -m governor ARGS`` (no ``--socket`` added), as a user's shell would run it."""
    environment = {key: value for key, value in os.environ.items() if key != "GOVERNOR_SOCKET"}
    return subprocess.run([sys.executable, *python_flags, "-m", "governor", *args], env={**environment, **(env or {})},
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def imported_modules(importtime_stderr: str) -> set:
    """The module names ``python -X importtime`` reported (its lines: ``import time: self | cumulative | name``)."""
    return {line.rsplit("|", 1)[1].strip() for line in importtime_stderr.splitlines()
            if line.startswith("import time:") and line.count("|") == 2} - {"imported package"}


def test_client_commands_import_neither_the_engine_nor_loky_nor_psutil(daemon):
    task_id = governor("--socket", str(daemon.socket), "submit", "echo", "-p", "value=1").stdout.strip()
    for command in (["status"], ["status", task_id], ["steps"], ["workers"], ["metrics"], ["cancel", task_id],
                    ["submit", "echo", "-p", "value=2"], ["status", "--help"]):
        shown = governor("--socket", str(daemon.socket), *command, python_flags=("-X", "importtime"))
        assert shown.returncode == 0, (command, shown.stderr[-2000:])
        modules = imported_modules(shown.stderr)
        assert "governor.client" in modules or command[-1] == "--help", command  # the check sees imports
        heavy = sorted(module for module in modules if module.split(".")[0] in ENGINE_MODULES
                       or module in ENGINE_MODULES)
        assert not heavy, f"`governor {' '.join(command)}` imported {heavy}"


def test_socket_works_on_the_group_on_each_command_and_from_the_environment(daemon, tmp_path):
    sock, wrong = str(daemon.socket), str(tmp_path / "nobody-here.sock")
    for args, env in ((["status", "--socket", sock], None),
                      (["--socket", sock, "status"], None),
                      (["status"], {"GOVERNOR_SOCKET": sock}),
                      (["--socket", wrong, "status", "--socket", sock], None),  # the command's own wins
                      (["--socket", sock, "status"], {"GOVERNOR_SOCKET": wrong}),  # a flag beats the env
                      (["steps", "--socket", sock], None), (["workers", "--socket", sock], None),
                      (["metrics", "--socket", sock], None),
                      (["submit", "echo", "-p", "value=1", "--socket", sock], None)):
        shown = governor(*args, env=env)
        assert shown.returncode == 0, (args, env, shown.stderr)
    missing = governor("status", "--socket", wrong)
    assert missing.returncode == 3 and wrong in missing.stderr


def test_records_are_text_by_default_json_on_request_with_local_iso_times(daemon):
    sock = str(daemon.socket)
    failed = governor("--socket", sock, "submit", "boom", "-p", "message=kaput", "--wait")
    assert failed.returncode == 1, failed.stderr
    task_id = int(failed.stderr.split("waiting for task ")[1].split()[0])
    text = failed.stdout.splitlines()
    assert text[0] == f"task {task_id}: boom (pool lane): failed"
    assert any(line.split() == ["error", "ValueError:", "kaput"] for line in text)
    # The traceback is readable lines, not an escaped JSON string.
    assert any(line.strip() == "Traceback (most recent call last):" for line in text)
    assert any(line.strip() == "raise ValueError(message)" for line in text)
    assert "\\n" not in failed.stdout

    as_json = json.loads(governor("--socket", sock, "status", str(task_id), "--json").stdout)
    submitted = datetime.fromisoformat(as_json["submitted_at"])
    assert submitted.utcoffset() == datetime.now().astimezone().utcoffset()  # local time, with its offset
    assert as_json["error"]["fields"]["exc_message"] == "kaput" and as_json["state"] == "failed"
    assert governor("--socket", sock, "status", str(task_id)).stdout == failed.stdout

    cancelled = governor("--socket", sock, "cancel", str(task_id))
    assert cancelled.returncode == 0 and cancelled.stdout == f"already finished: {task_id}\n"  # no wire envelope
    assert json.loads(governor("--socket", sock, "cancel", str(task_id), "--json").stdout) == {
        "cancelled": [], "finished": [task_id], "unknown": []}
    steps = json.loads(governor("--socket", sock, "steps", "--json").stdout)
    assert {"echo", "boom"} <= {step["name"] for step in steps}
    assert {worker["lane"] for worker in json.loads(governor("--socket", sock, "workers", "--json").stdout)} \
        == {"pool", "critical"}
    listing = governor("--socket", sock, "status").stdout.splitlines()
    assert listing[0].split() == ["id", "step", "lane", "key", "state", "submitted", "ran_s", "attempts", "error"]
    assert listing[1].split()[:4] == [str(task_id), "boom", "pool", "failed"] and "ValueError: kaput" in listing[1]


def test_one_exit_status_table_for_every_command(daemon):
    sock = str(daemon.socket)
    for command in (["status", "99999"], ["cancel", "99999"], ["wait", "99999"]):
        unknown = governor("--socket", sock, *command)
        assert unknown.returncode == EXIT_CODES["unknown_task"], (command, unknown.stderr)
        assert "99999" in unknown.stdout + unknown.stderr
    slow = governor("--socket", sock, "submit", "timed_sleep", "-p", "ms=60000").stdout.strip()
    still = governor("--socket", sock, "wait", slow, "--wait-timeout", "0.1")
    assert still.returncode == EXIT_CODES["still_running"] and "(still running)" in still.stdout
    governor("--socket", sock, "cancel", slow)
    assert governor("--socket", sock, "wait", slow).returncode == EXIT_CODES["cancelled"]
    refused = governor("--socket", sock, "submit", "echoo", "--wait")
    assert refused.returncode == EXIT_CODES["bad_request"] and "did you mean 'echo'" in refused.stderr
    shown = governor("--help").stdout
    for name, code in EXIT_CODES.items():
        assert any(line.split()[:2] == [str(code), name] for line in shown.splitlines()), name


def test_status_filters_by_state_step_and_count_in_the_daemon(daemon):
    from governor.client import Client

    sock = str(daemon.socket)
    with Client(daemon.socket) as client:
        first_failure = client.submit("boom").wait_for_id()
        # More than a screenful after it: filtering the last 50 in the client would miss it.
        echoes = client.submit_batch([("echo", {"value": n}) for n in range(60)])
        echoes.result(timeout=60)
        client.wait(first_failure)
    failures = json.loads(governor("--socket", sock, "status", "--state", "failed", "--json").stdout)
    assert [task["task_id"] for task in failures] == [first_failure]
    newest = json.loads(governor("--socket", sock, "status", "--step", "echo", "-n", "3", "--json").stdout)
    assert [task["task_id"] for task in newest] == sorted(echoes.task_ids, reverse=True)[:3]
    none = governor("--socket", sock, "status", "--step", "boom", "--state", "done", "--json")
    assert json.loads(none.stdout) == []
    assert len(json.loads(governor("--socket", sock, "status", "--json").stdout)) == 50
    assert governor("--socket", sock, "status", "1", "--state", "done").returncode == EXIT_CODES["usage"]


def test_timeout_is_the_tasks_own_limit_and_wait_timeout_only_stops_waiting(daemon):
    sock = str(daemon.socket)
    killed = governor("--socket", sock, "submit", "busy_loop", "--timeout", "0.3", "--wait")
    assert killed.returncode == EXIT_CODES["timed_out"], killed.stderr
    assert "use --wait-timeout" in killed.stderr, "the old meaning of --timeout is pointed out"
    over = governor("--socket", sock, "submit", "allocate", "-p", "chunk_mb=20", "-p", "total_mb=600",
                    "--max-memory", "150", "--wait", "--json")
    assert over.returncode == EXIT_CODES["over_memory"], over.stdout + over.stderr
    assert json.loads(over.stdout)["limits"]["max_memory_mb"] == 150
    waited = governor("--socket", sock, "submit", "timed_sleep", "-p", "ms=60000", "--wait", "--wait-timeout", "0.2",
                      "--json")
    assert waited.returncode == EXIT_CODES["still_running"] and "warning" not in waited.stderr
    running = json.loads(waited.stdout)["task_id"]
    old_wait = governor("--socket", sock, "wait", str(running), "--timeout", "0.1")
    assert old_wait.returncode == EXIT_CODES["still_running"]
    assert "--timeout is deprecated: use --wait-timeout" in old_wait.stderr
    assert json.loads(governor("--socket", sock, "status", str(running), "--json").stdout)["state"] == "running"
    governor("--socket", sock, "cancel", str(running))
    old_limit = governor("--socket", sock, "submit", "busy_loop", "--limit-timeout", "0.3", "--wait")
    assert old_limit.returncode == EXIT_CODES["timed_out"]
    assert "--limit-timeout is deprecated: use --timeout" in old_limit.stderr
    refused = governor("--socket", sock, "submit", "echo", "-p", "value=1", "--wait-timeout", "1")
    assert refused.returncode == EXIT_CODES["usage"] and "--wait-timeout needs --wait" in refused.stderr


def test_top_without_a_daemon_exits_3_at_once_like_every_command(tmp_path):
    nobody = str(tmp_path / "nobody-here.sock")
    for command in (["top"], ["status"]):
        shown = governor("--socket", nobody, *command)
        assert shown.returncode == EXIT_CODES["daemon_unavailable"], (command, shown.stdout[-500:], shown.stderr)
        assert "no daemon" in shown.stderr.lower() or nobody in shown.stderr, shown.stderr


def test_metrics_are_tables_for_people_and_json_or_prometheus_for_programs(daemon):
    sock = str(daemon.socket)
    assert governor("--socket", sock, "submit", "echo", "-p", "value=1", "--wait").returncode == 0
    assert governor("--socket", sock, "submit", "boom", "--wait").returncode == EXIT_CODES["failed"]
    shown = governor("--socket", sock, "metrics")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert "{" not in shown.stdout, "a table, not JSON"
    header = next(line for line in lines if line.lstrip().startswith("step "))
    assert "queue wait" in header and "run time" in header, "the two parts of a latency, each labelled"
    assert "of which warm spares" in next(line for line in lines if line.lstrip().startswith("lane "))
    echo_row = next(line for line in lines if line.split()[:2] == ["echo", "pool"])
    assert " ms / " in echo_row, echo_row  # p50 / p95 with their unit, not raw seconds
    assert "failed 1" in next(line for line in lines if line.split()[:1] == ["boom"])
    document = json.loads(governor("--socket", sock, "metrics", "--json").stdout)
    assert document["timings"]["pool"]["echo"]["duration_seconds"]["count"] == 1
    assert "governor_tasks_total" in governor("--socket", sock, "metrics", "--prometheus").stdout
    both = governor("--socket", sock, "metrics", "--json", "--prometheus")
    assert both.returncode == EXIT_CODES["usage"] and "pick one" in both.stderr


def test_a_batch_with_bad_lines_submits_nothing_and_names_each_line(daemon, tmp_path):
    lines = [json.dumps({"step": "echo", "params": {"value": n}}) for n in range(200)]
    lines[149] = json.dumps({"step": "noopp"})
    lines[9] = json.dumps({"step": "echo", "params": {"value": 1, "valeu": 2}})
    lines[19] = "{not json"
    batch = tmp_path / "calls.jsonl"
    batch.write_text("\n".join(lines) + "\n")
    refused = governor("--socket", str(daemon.socket), "submit", "--batch", str(batch))
    assert refused.returncode == EXIT_CODES["bad_request"], refused.stderr
    assert "nothing was submitted" in refused.stderr
    assert "line 150: unknown step 'noopp'; did you mean 'noop'?" in refused.stderr
    assert "line 10: bad parameters for step 'echo'" in refused.stderr and "valeu" in refused.stderr
    assert "line 20: not JSON" in refused.stderr
    assert json.loads(governor("--socket", str(daemon.socket), "status", "--json").stdout) == []


def test_a_batch_line_carries_its_own_limits(daemon, tmp_path):
    sock = str(daemon.socket)
    batch = tmp_path / "calls.jsonl"
    batch.write_text("\n".join(json.dumps(line) for line in (
        {"step": "busy_loop", "limits": {"timeout_s": 0.3}},
        {"step": "echo", "params": {"value": 1}, "limits": {"max_memory_mb": 500}})))
    ran = governor("--socket", sock, "submit", "--batch", str(batch), "--json")
    assert ran.returncode == EXIT_CODES["timed_out"], ran.stderr
    looped, echoed = json.loads(ran.stdout)
    assert (looped["state"], looped["limits"]["timeout_s"]) == ("timed_out", 0.3)
    assert (echoed["state"], echoed["limits"]["max_memory_mb"]) == ("done", 500)
    batch.write_text(json.dumps({"step": "echo", "params": {"value": 1}, "limits": {"timeout_s": -1}}) + "\n"
                     + json.dumps({"step": "echo", "params": {"value": 2}, "limits": {"time": 1}}))
    refused = governor("--socket", sock, "submit", "--batch", str(batch))
    assert refused.returncode == EXIT_CODES["bad_request"]
    assert 'line 1: "limits": timeout_s: must be a finite number > 0' in refused.stderr
    assert 'line 2: "limits": time: unknown limit' in refused.stderr


def test_a_batch_prints_every_task_id_and_its_progress_counts(daemon, tmp_path):
    batch = tmp_path / "calls.jsonl"
    batch.write_text("\n".join([json.dumps({"step": "echo", "params": {"value": n}}) for n in range(30)]
                               + ["", json.dumps({"step": "boom"})]))
    # stderr on a terminal, as a user sees it: the progress bar is drawn only there.
    master, terminal = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "governor", "--socket", str(daemon.socket), "submit",
                                "--batch", str(batch), "--json"], stdout=subprocess.PIPE, stderr=terminal)
    os.close(terminal)
    seen = bytearray()
    reader = threading.Thread(target=_read_all, args=(master, seen))
    reader.start()
    out, _ = process.communicate(timeout=120)
    reader.join(timeout=60)
    os.close(master)
    assert process.returncode == EXIT_CODES["failed"], seen.decode(errors="replace")
    records = json.loads(out)
    assert [record["line"] for record in records] == [*range(1, 31), 32]
    assert [record["state"] for record in records] == ["done"] * 30 + ["failed"]
    listed = json.loads(governor("--socket", str(daemon.socket), "status", "--json").stdout)
    assert sorted(record["task_id"] for record in records) == sorted(task["task_id"] for task in listed)
    drawn = seen.decode(errors="replace")
    assert "100%" in drawn and "31/31" in drawn and "30 done, 1 failed" in drawn


def _read_all(fd: int, into: bytearray) -> None:
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the terminal's other end is closed
            return
        if not chunk:
            return
        into += chunk


def _interrupted(daemon, tmp_path, name: str, *command: str) -> Tuple[subprocess.CompletedProcess, List[int]]:
    """Run a waiting COMMAND whose tasks hold until released, press Ctrl-C once they all run;
    return what it printed and the ids it named."""
    # PYTHONFAULTHANDLER: if the client ever ignores the Ctrl-C, a SIGABRT makes it print
    # every thread's stack for the failure report.
    with ctrl_c_not_ignored():
        process = subprocess.Popen([sys.executable, "-m", "governor", "--socket", str(daemon.socket), *command],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    announced = process.stderr.readline()  # printed inside the block that handles Ctrl-C
    assert announced.startswith("waiting for task"), announced + process.stderr.read()
    first, _, last = announced.split()[3].partition("-")
    task_ids = list(range(int(first), int(last or first) + 1))
    assert wait_until(lambda: len(list(tmp_path.glob(f"{name}-*"))) == len(task_ids), timeout=60)
    process.send_signal(signal.SIGINT)
    try:
        out, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        out, err = process.communicate(timeout=30)
        pytest.fail(f"{command} did not end 60 s after Ctrl-C; its threads when aborted:\n{err}")
    return subprocess.CompletedProcess(process.args, process.returncode, out, announced + err), task_ids


def test_ctrl_c_while_waiting_says_the_tasks_go_on_or_cancels_them_and_exits_130(tmp_path):
    daemon = DaemonProcess(tmp_path, workers=4).start()  # the four held tasks run at once
    try:
        _ctrl_c(daemon, tmp_path)
    finally:
        assert daemon.stop() == 0, daemon.log.read_text()


def _ctrl_c(daemon, tmp_path):
    sock, go = str(daemon.socket), str(tmp_path / "go")
    left, [left_id] = _interrupted(daemon, tmp_path, "left", "submit", "hold_until", "-p", f"marker={tmp_path}/left-1",
                                   "-p", f"go={go}", "--wait")
    assert left.returncode == EXIT_CODES["aborted"] == 130, left.stderr
    assert f"task {left_id} goes on" in left.stderr and "Aborted" not in left.stderr
    assert json.loads(governor("--socket", sock, "status", str(left_id), "--json").stdout)["state"] == "running"

    batch = tmp_path / "calls.jsonl"
    batch.write_text("\n".join(json.dumps({"step": "hold_until", "params": {"marker": f"{tmp_path}/batch-{n}",
                                                                             "go": go}}) for n in range(2)))
    batched, batch_ids = _interrupted(daemon, tmp_path, "batch", "submit", "--batch", str(batch))
    assert batched.returncode == 130 and f"tasks {batch_ids[0]}-{batch_ids[1]} go on" in batched.stderr

    held = governor("--socket", sock, "submit", "hold_until", "-p", f"marker={tmp_path}/held-1", "-p",
                    f"go={tmp_path / 'never'}").stdout.strip()
    cancelled, [held_id] = _interrupted(daemon, tmp_path, "held", "wait", held, "--cancel-on-interrupt")
    assert cancelled.returncode == 130 and f"cancelled {held}" in cancelled.stderr
    assert governor("--socket", sock, "wait", str(held_id)).returncode == EXIT_CODES["cancelled"]

    Path(go).touch()  # the tasks left running were not cancelled: they finish
    finished = governor("--socket", sock, "wait", str(left_id), *map(str, batch_ids))
    assert finished.returncode == 0, finished.stdout


# ----------------------------------------------------------------------------- serve

STEPS_MODULE = '''
from governor.steps import StepRegistry

registry = StepRegistry()


@registry.step(critical=False)
def hello(name: str):
    return f"hello {name}"
'''


@contextlib.contextmanager
def served(root: Path, cwd: Path, *args: str):
    """``governor serve ARGS`` from ``cwd``, as the installed script runs (-P: no directory
    is put first on the module path, unlike ``python -m``); yields its socket."""
    root.mkdir(parents=True)
    socket_path = root / "run" / "governor.sock"
    log = root / "daemon.log"
    process = subprocess.Popen([sys.executable, "-P", "-m", "governor", "serve", "--socket", str(socket_path),
                                "--journal", str(root / "journal.sqlite3"), "--workers", "2", *args],
                               cwd=cwd, stdout=subprocess.DEVNULL, stderr=open(log, "ab"))
    try:
        assert wait_until(lambda: process.poll() is not None or socket_path.exists(), timeout=60)
        assert process.poll() is None, log.read_text()
        yield socket_path
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()


def test_serve_finds_steps_modules_in_the_current_directory_or_the_app_dir(tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    (app / "mysteps.py").write_text(STEPS_MODULE)
    for name, cwd, extra in (("cwd", app, ()), ("app-dir", tmp_path, ("--app-dir", str(app)))):
        with served(tmp_path / name, cwd, "--steps", "mysteps", "--no-builtin", *extra) as socket_path:
            # The step runs in a pool worker: the workers find the module too.
            said = governor("--socket", str(socket_path), "submit", "hello", "-p", "name=you", "--wait", "--json")
            assert said.returncode == 0 and json.loads(said.stdout)["result"] == "hello you", (name, said.stderr)


#: A steps module as the README's quick start writes one: ``@governor.step``, no registry.
DECORATED_STEPS_MODULE = '''
import os

import governor


@governor.step(critical=True)
def save(path: str, text: str = "saved") -> str:
    """Write ``text`` to ``path``: a relative path the step does not declare in paths=."""
    with open(path, "w") as file:
        file.write(text)
    return os.path.abspath(path)


@governor.step(critical=False)
def hello(name: str):
    return f"hello {name}"
'''


def test_serve_takes_the_steps_a_module_registered_with_governor_step(tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    (app / "mysteps.py").write_text(DECORATED_STEPS_MODULE)
    with served(tmp_path / "daemon", app, "--steps", "mysteps", "--no-builtin") as socket_path:
        listed = governor("--socket", str(socket_path), "steps", "--json")
        assert sorted(step["name"] for step in json.loads(listed.stdout)) == ["hello", "save"], listed.stderr
        said = governor("--socket", str(socket_path), "submit", "hello", "-p", "name=you", "--wait", "--json")
        assert said.returncode == 0 and json.loads(said.stdout)["result"] == "hello you", said.stderr


def test_serve_names_both_ways_when_a_module_has_neither_registry_nor_steps(tmp_path):
    (tmp_path / "nosteps.py").write_text("import governor\n\ndef save(path):\n    pass\n")
    places = ("--socket", str(tmp_path / "run" / "g.sock"), "--journal", str(tmp_path / "journal.sqlite3"))
    refused = governor("serve", "--steps", "nosteps", "--no-builtin", *places, cwd=tmp_path, python_flags=("-P",))
    assert refused.returncode == EXIT_CODES["cannot_start"], refused.stderr
    assert "nosteps" in refused.stderr and "registry = StepRegistry()" in refused.stderr
    assert "@governor.step" in refused.stderr
    assert not (tmp_path / "run").exists()


def test_a_step_runs_in_the_directory_it_was_submitted_from(tmp_path):
    app, caller = tmp_path / "app", tmp_path / "caller"
    app.mkdir()
    caller.mkdir()
    (app / "mysteps.py").write_text(DECORATED_STEPS_MODULE)
    with served(tmp_path / "daemon", app, "--steps", "mysteps", "--no-builtin") as socket_path:
        saved = governor("--socket", str(socket_path), "submit", "save", "-p", "path=out.txt", "--wait", "--json",
                         cwd=caller)
        assert saved.returncode == 0, saved.stderr
        assert json.loads(saved.stdout)["result"] == str(caller / "out.txt")
        assert (caller / "out.txt").read_text() == "saved" and not (app / "out.txt").exists()
        # Each call runs where it came from, on the same worker.
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        again = governor("--socket", str(socket_path), "submit", "save", "-p", "path=out.txt", "--wait", cwd=elsewhere)
        assert again.returncode == 0 and (elsewhere / "out.txt").exists(), again.stderr


def test_serve_shows_a_steps_modules_own_import_error(tmp_path):
    (tmp_path / "broken.py").write_text("import os\nimport not_installed_anywhere\n")
    places = ("--socket", str(tmp_path / "run" / "g.sock"), "--journal", str(tmp_path / "journal.sqlite3"))
    broken = governor("serve", "--steps", "broken", *places, cwd=tmp_path, python_flags=("-P",))
    assert broken.returncode == EXIT_CODES["cannot_start"], broken.stderr
    assert f'File "{tmp_path / "broken.py"}", line 2, in <module>' in broken.stderr
    assert "No module named 'not_installed_anywhere'" in broken.stderr and "importlib" not in broken.stderr
    missing = governor("serve", "--steps", "nosuch", *places, cwd=tmp_path, python_flags=("-P",))
    assert missing.returncode == EXIT_CODES["cannot_start"]
    assert missing.stderr.startswith(f"Error: no module named 'nosuch' in {tmp_path}") and "--app-dir" in missing.stderr
    assert not (tmp_path / "run").exists()


def _one_line(stderr: str) -> bool:
    return stderr.startswith("Error: ") and stderr.strip().count("\n") == 0


def test_serve_start_up_failures_are_one_line_a_distinct_status_and_leave_no_socket(tmp_path):
    def serve(socket_path: Path, journal: Path, *args: str) -> subprocess.CompletedProcess:
        return governor("serve", "--no-builtin", "--workers", "2", "--socket", str(socket_path),
                        "--journal", str(journal), *args)

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    unsafe = serve(shared / "g.sock", tmp_path / "a.sqlite3")
    assert unsafe.returncode == EXIT_CODES["cannot_start"] and _one_line(unsafe.stderr), unsafe.stderr
    assert "open to other users" in unsafe.stderr and not (shared / "g.sock").exists()

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = serve(tmp_path / "m" / "g.sock", tmp_path / "b.sqlite3", "--metrics-addr", f"127.0.0.1:{port}")
    assert busy.returncode == EXIT_CODES["cannot_start"] and _one_line(busy.stderr), busy.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in busy.stderr and not (tmp_path / "m" / "g.sock").exists()
    nonsense = serve(tmp_path / "m" / "g.sock", tmp_path / "b.sqlite3", "--metrics-addr", "localhost")
    assert nonsense.returncode == EXIT_CODES["usage"] and "--metrics-addr" in nonsense.stderr
    (tmp_path / "note.txt").write_text("a note, not a journal\n")
    unusable = serve(tmp_path / "u" / "g.sock", tmp_path / "note.txt")
    assert unusable.returncode == EXIT_CODES["journal_unusable"] and _one_line(unusable.stderr), unusable.stderr
    assert "not an SQLite database" in unusable.stderr and not (tmp_path / "u" / "g.sock").exists()

    stale_socket = tmp_path / "run" / "governor.sock"  # where DaemonProcess listens
    stale_socket.parent.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX) as gone:
        gone.bind(str(stale_socket))  # bound, never listening, left behind: a dead daemon's socket
    daemon = DaemonProcess(tmp_path).start()  # the stale socket is replaced
    try:
        taken_socket = serve(daemon.socket, tmp_path / "c.sqlite3")
        assert taken_socket.returncode == EXIT_CODES["already_running"] and _one_line(taken_socket.stderr)
        assert "already listening" in taken_socket.stderr
        taken_journal = serve(tmp_path / "d" / "g.sock", daemon.journal)
        assert taken_journal.returncode == EXIT_CODES["already_running"] and _one_line(taken_journal.stderr)
        assert "using the journal" in taken_journal.stderr and not (tmp_path / "d" / "g.sock").exists()
        assert governor("--socket", str(daemon.socket), "status").returncode == 0  # the first daemon is unharmed
    finally:
        assert daemon.stop() == 0, daemon.log.read_text()
