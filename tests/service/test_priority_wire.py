"""``governor submit --priority N``: the priority travels in the protocol to the daemon's pool lane."""

from conftest import wait_until
from daemon_harness import DaemonProcess
from governor.client import Client


def test_a_priority_given_to_the_cli_jumps_the_daemons_pool_queue(tmp_path):
    """One pool worker held busy, six priority-0 tasks queued, then one of priority 10 from
    the CLI: it leaves the queue first (the order of the starts the daemon journaled)."""
    started, go = tmp_path / "started", tmp_path / "go"
    daemon = DaemonProcess(tmp_path, workers=1).start()
    try:
        with Client(daemon.socket) as client:
            client.submit("hold_until", marker=str(started), go=str(go))
            assert wait_until(started.exists, timeout=60)
            low = [client.submit("echo", value=n).wait_for_id(60) for n in range(6)]
            submitted = daemon.cli("submit", "echo", "-p", "value=99", "--priority", "10")
            assert submitted.returncode == 0, submitted.stderr
            high = int(submitted.stdout)
            go.touch()
            records = {task_id: client.wait(task_id, timeout=120) for task_id in low + [high]}
    finally:
        assert daemon.stop() == 0
    assert all(record["state"] == "done" for record in records.values())
    assert records[high]["started_at"] < min(records[task_id]["started_at"] for task_id in low)
    refused = daemon.cli("submit", "echo", "-p", "value=1", "--priority", "1001")
    assert refused.returncode == 2 and "1001" in refused.stderr
