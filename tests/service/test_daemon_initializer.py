"""``governor serve --initializer MODULE:FUNCTION --initargs JSON --initializer-timeout S``,
through a real daemon: ``Supervisor(initializer=...)`` for the daemon's workers.

The initializer of ``step_library`` writes what it did to a file named after its worker's
pid, so the test reads from the outside which worker ran it and how often; the tasks say
what they saw.
"""

import json
import os
import subprocess
import sys

from click.testing import CliRunner

from daemon_harness import TESTS, DaemonProcess
from governor.cli import EXIT_CODES, main
from governor.client import Client


def _serve(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """``governor serve`` with the test steps, expected to exit by itself (a failed start)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "governor", "serve", "--socket", str(tmp_path / "run" / "g.sock"),
                           "--journal", str(tmp_path / "journal.sqlite3"), "--steps", "step_library", "--no-builtin",
                           "--workers", "1", *args], env=env, capture_output=True, text=True, timeout=120)


def test_every_daemon_worker_runs_the_initializer_once_before_its_first_task(tmp_path):
    records = tmp_path / "records"
    records.mkdir()
    daemon = DaemonProcess(tmp_path, workers=2, extra_args=(
        "--initializer", "step_library:record_initialized", "--initargs", json.dumps([str(records), "connected"]),
        "--sandbox-write", str(records))).start()  # pool workers may write their record under the sandbox
    try:
        with Client(daemon.socket) as client:
            futures = [client.submit("initialized") for _ in range(20)]
            seen = [tuple(future.result(timeout=60)) for future in futures]
            seen += [tuple(result) for result in client.workflow([("initialized", {})]).result(timeout=60)]
    finally:
        assert daemon.stop() == 0, daemon.log.read_text()
    ran = {int(name): (records / name).read_text().splitlines() for name in os.listdir(records)}
    assert all(value == "connected" for _, value in seen), "every task, pool and critical, saw its worker set up"
    assert all(ran.get(pid) == ["connected"] for pid, _ in seen), "each worker ran it once, before its tasks"


def test_a_daemon_whose_initializer_raises_does_not_start_and_says_why(tmp_path):
    flag, attempts = tmp_path / "flag", tmp_path / "attempts"
    flag.touch()
    failed = _serve(tmp_path, "--initializer", "step_library:fail_to_initialize_once",
                    "--initargs", json.dumps([str(flag), str(attempts)]), "--sandbox-write", str(tmp_path))
    assert failed.returncode == EXIT_CODES["cannot_start"], failed.stderr
    assert "initializer raised" in failed.stderr and "ConnectionRefusedError: the database is gone" in failed.stderr


def test_a_daemon_whose_initializer_overruns_its_timeout_does_not_start(tmp_path):
    failed = _serve(tmp_path, "--initializer", "step_library:sleep_initializing", "--initargs", "[600]",
                    "--initializer-timeout", "1")
    assert failed.returncode == EXIT_CODES["cannot_start"], failed.stderr
    assert "ran its initializer and connected within 1s" in failed.stderr


def test_an_initializer_that_names_no_function_is_a_start_failure(tmp_path):
    missing = _serve(tmp_path, "--initializer", "step_library:no_such_function")
    assert missing.returncode == EXIT_CODES["cannot_start"], missing.stderr
    assert "module 'step_library' has no function 'no_such_function'" in missing.stderr
    shapeless = _serve(tmp_path, "--initializer", "step_library")
    assert shapeless.returncode == EXIT_CODES["cannot_start"] and "MODULE:FUNCTION" in shapeless.stderr
    assert not (tmp_path / "run" / "g.sock").exists()


def test_initializer_options_are_checked_before_anything_starts(tmp_path):
    def serve(*args: str):
        return CliRunner().invoke(main, ["serve", "--socket", str(tmp_path / "s.sock"), *args])

    not_an_array = serve("--initializer", "step_library:sleep_initializing", "--initargs", '{"seconds": 1}')
    assert not_an_array.exit_code == 2 and "a JSON array" in not_an_array.output
    not_json = serve("--initializer", "step_library:sleep_initializing", "--initargs", "[1,")
    assert not_json.exit_code == 2 and "not JSON" in not_json.output
    alone = serve("--initargs", "[1]")
    assert alone.exit_code == 2 and "needs --initializer" in alone.output
    on_ray = serve("--backend", "ray", "--initializer", "step_library:sleep_initializing")
    assert on_ray.exit_code == 2 and "--backend loky" in on_ray.output
    assert serve("--initializer", "step_library:sleep_initializing", "--initializer-timeout", "0").exit_code == 2
