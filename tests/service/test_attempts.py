"""Retries under the daemon: each attempt journaled, ``exhausted`` listed by ``governor status``."""

import json

from daemon_harness import DaemonProcess
from governor.client import Client


def test_each_attempt_is_journaled_and_exhausted_tasks_are_listed(tmp_path):
    daemon = DaemonProcess(tmp_path, workers=1).start()
    try:
        with Client(daemon.socket) as client:
            recovers = client.submit("flaky", counter=str(tmp_path / "twice"), failures=2)
            gives_up = client.submit("flaky", counter=str(tmp_path / "always"), failures=99)
            assert recovers.result(timeout=120) == 3
            ended = client.wait(gives_up.wait_for_id(60), timeout=120)
            assert client.status(recovers.task_id)["attempts"] == 3
        assert (ended["state"], ended["attempts"]) == ("exhausted", 4)
        assert ended["error"]["notes"] == ["step 'flaky': all 4 attempts failed"]
        listed = daemon.cli("status", "--state", "exhausted", "--json")
        assert listed.returncode == 0, listed.stderr
        assert [task["task_id"] for task in json.loads(listed.stdout)] == [gives_up.task_id]
        metrics = daemon.cli("metrics", "--json")
        assert json.loads(metrics.stdout)["retries"]["pool"]["flaky"] == 2 + 3
    finally:
        assert daemon.stop() == 0
