"""The ``governor`` command as a user meets it: each test runs the real command (a subprocess,
or CliRunner) against a real daemon (``governor serve`` in a subprocess, tests/daemon_harness.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemon_harness import DaemonProcess

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
