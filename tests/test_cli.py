"""The ``governor`` command as a user meets it: each test runs the real command (a subprocess,
or CliRunner) against a real daemon (``governor serve`` in a subprocess, tests/daemon_harness.py)."""

import json
import os
import pty
import signal
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path
from typing import List, Tuple

import pytest

from conftest import wait_until
from daemon_harness import DaemonProcess
from governor.cli import EXIT_CODES

#: Modules a client command must not import: the engine and what only the engine needs.
ENGINE_MODULES = ("loky", "psutil", "prometheus_client", "governor.supervisor", "governor.daemon",
                  "governor.manager", "governor.cli_run")


@pytest.fixture
def daemon(tmp_path):
    running = DaemonProcess(tmp_path).start()
    yield running
    if running.process.poll() is None:
        assert running.stop() == 0, running.log.read_text()


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
    socket, wrong = str(daemon.socket), str(tmp_path / "nobody-here.sock")
    for args, env in ((["status", "--socket", socket], None),
                      (["--socket", socket, "status"], None),
                      (["status"], {"GOVERNOR_SOCKET": socket}),
                      (["--socket", wrong, "status", "--socket", socket], None),  # the command's own wins
                      (["--socket", socket, "status"], {"GOVERNOR_SOCKET": wrong}),  # a flag beats the env
                      (["steps", "--socket", socket], None), (["workers", "--socket", socket], None),
                      (["metrics", "--socket", socket], None),
                      (["submit", "echo", "-p", "value=1", "--socket", socket], None)):
        shown = governor(*args, env=env)
        assert shown.returncode == 0, (args, env, shown.stderr)
    missing = governor("status", "--socket", wrong)
    assert missing.returncode == 3 and wrong in missing.stderr


def test_records_are_text_by_default_json_on_request_with_local_iso_times(daemon):
    socket = str(daemon.socket)
    failed = governor("--socket", socket, "submit", "boom", "-p", "message=kaput", "--wait")
    assert failed.returncode == 1, failed.stderr
    task_id = int(failed.stderr.split("waiting for task ")[1].split()[0])
    text = failed.stdout.splitlines()
    assert text[0] == f"task {task_id}: boom (pool lane): failed"
    assert any(line.split() == ["error", "ValueError:", "kaput"] for line in text)
    # The traceback is readable lines, not an escaped JSON string.
    assert any(line.strip() == "Traceback (most recent call last):" for line in text)
    assert any(line.strip() == "raise ValueError(message)" for line in text)
    assert "\\n" not in failed.stdout

    as_json = json.loads(governor("--socket", socket, "status", str(task_id), "--json").stdout)
    submitted = datetime.fromisoformat(as_json["submitted_at"])
    assert submitted.utcoffset() == datetime.now().astimezone().utcoffset()  # local time, with its offset
    assert as_json["error"]["fields"]["exc_message"] == "kaput" and as_json["state"] == "failed"
    assert governor("--socket", socket, "status", str(task_id)).stdout == failed.stdout

    cancelled = governor("--socket", socket, "cancel", str(task_id))
    assert cancelled.returncode == 0 and cancelled.stdout == f"already finished: {task_id}\n"  # no wire envelope
    assert json.loads(governor("--socket", socket, "cancel", str(task_id), "--json").stdout) == {
        "cancelled": [], "finished": [task_id], "unknown": []}
    steps = json.loads(governor("--socket", socket, "steps", "--json").stdout)
    assert {"echo", "boom"} <= {step["name"] for step in steps}
    assert {worker["lane"] for worker in json.loads(governor("--socket", socket, "workers", "--json").stdout)} \
        == {"pool", "critical"}
    listing = governor("--socket", socket, "status").stdout.splitlines()
    assert listing[0].split() == ["id", "step", "lane", "state", "submitted", "ran_s", "attempts", "error"]
    assert listing[1].split()[:4] == [str(task_id), "boom", "pool", "failed"] and "ValueError: kaput" in listing[1]


def test_one_exit_status_table_for_every_command(daemon):
    socket = str(daemon.socket)
    for command in (["status", "99999"], ["cancel", "99999"], ["wait", "99999"]):
        unknown = governor("--socket", socket, *command)
        assert unknown.returncode == EXIT_CODES["unknown_task"], (command, unknown.stderr)
        assert "99999" in unknown.stdout + unknown.stderr
    slow = governor("--socket", socket, "submit", "timed_sleep", "-p", "ms=60000").stdout.strip()
    still = governor("--socket", socket, "wait", slow, "--timeout", "0.1")
    assert still.returncode == EXIT_CODES["still_running"] and "(still running)" in still.stdout
    governor("--socket", socket, "cancel", slow)
    assert governor("--socket", socket, "wait", slow).returncode == EXIT_CODES["cancelled"]
    refused = governor("--socket", socket, "submit", "echoo", "--wait")
    assert refused.returncode == EXIT_CODES["bad_request"] and "did you mean 'echo'" in refused.stderr
    shown = governor("--help").stdout
    for name, code in EXIT_CODES.items():
        assert any(line.split()[:2] == [str(code), name] for line in shown.splitlines()), name


def test_status_filters_by_state_step_and_count_in_the_daemon(daemon):
    from governor.client import Client

    socket = str(daemon.socket)
    with Client(daemon.socket) as client:
        first_failure = client.submit("boom").wait_for_id()
        # More than a screenful after it: filtering the last 50 in the client would miss it.
        echoes = client.submit_batch([("echo", {"value": n}) for n in range(60)])
        echoes.result(timeout=60)
        client.wait(first_failure)
    failures = json.loads(governor("--socket", socket, "status", "--state", "failed", "--json").stdout)
    assert [task["task_id"] for task in failures] == [first_failure]
    newest = json.loads(governor("--socket", socket, "status", "--step", "echo", "-n", "3", "--json").stdout)
    assert [task["task_id"] for task in newest] == sorted(echoes.task_ids, reverse=True)[:3]
    none = governor("--socket", socket, "status", "--step", "boom", "--state", "done", "--json")
    assert json.loads(none.stdout) == []
    assert len(json.loads(governor("--socket", socket, "status", "--json").stdout)) == 50
    assert governor("--socket", socket, "status", "1", "--state", "done").returncode == EXIT_CODES["usage"]


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
    process = subprocess.Popen([sys.executable, "-m", "governor", "--socket", str(daemon.socket), *command],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    announced = process.stderr.readline()  # printed inside the block that handles Ctrl-C
    assert announced.startswith("waiting for task"), announced + process.stderr.read()
    first, _, last = announced.split()[3].partition("-")
    task_ids = list(range(int(first), int(last or first) + 1))
    assert wait_until(lambda: len(list(tmp_path.glob(f"{name}-*"))) == len(task_ids), timeout=60)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, out, announced + err), task_ids


def test_ctrl_c_while_waiting_says_the_tasks_go_on_or_cancels_them_and_exits_130(tmp_path):
    daemon = DaemonProcess(tmp_path, workers=4).start()  # the four held tasks run at once
    try:
        _ctrl_c(daemon, tmp_path)
    finally:
        assert daemon.stop() == 0, daemon.log.read_text()


def _ctrl_c(daemon, tmp_path):
    socket, go = str(daemon.socket), str(tmp_path / "go")
    left, [left_id] = _interrupted(daemon, tmp_path, "left", "submit", "hold_until", "-p", f"marker={tmp_path}/left-1",
                                   "-p", f"go={go}", "--wait")
    assert left.returncode == EXIT_CODES["aborted"] == 130, left.stderr
    assert f"task {left_id} goes on" in left.stderr and "Aborted" not in left.stderr
    assert json.loads(governor("--socket", socket, "status", str(left_id), "--json").stdout)["state"] == "running"

    batch = tmp_path / "calls.jsonl"
    batch.write_text("\n".join(json.dumps({"step": "hold_until", "params": {"marker": f"{tmp_path}/batch-{n}",
                                                                             "go": go}}) for n in range(2)))
    batched, batch_ids = _interrupted(daemon, tmp_path, "batch", "submit", "--batch", str(batch))
    assert batched.returncode == 130 and f"tasks {batch_ids[0]}-{batch_ids[1]} go on" in batched.stderr

    held = governor("--socket", socket, "submit", "hold_until", "-p", f"marker={tmp_path}/held-1", "-p",
                    f"go={tmp_path / 'never'}").stdout.strip()
    cancelled, [held_id] = _interrupted(daemon, tmp_path, "held", "wait", held, "--cancel-on-interrupt")
    assert cancelled.returncode == 130 and f"cancelled {held}" in cancelled.stderr
    assert governor("--socket", socket, "wait", str(held_id)).returncode == EXIT_CODES["cancelled"]

    Path(go).touch()  # the tasks left running were not cancelled: they finish
    finished = governor("--socket", socket, "wait", str(left_id), *map(str, batch_ids))
    assert finished.returncode == 0, finished.stdout
