"""``governor serve --critical-workers N``: critical steps of different keys run at once."""

from daemon_harness import DaemonProcess
from governor.client import Client


def test_the_daemon_runs_keys_in_parallel_with_critical_workers(tmp_path):
    daemon = DaemonProcess(tmp_path, workers=1, extra_args=("--critical-workers", "2")).start()
    try:
        with Client(daemon.socket) as client:
            first = client.submit("keyed_record", chat="a", ms=1500, tag="a")
            second = client.submit("keyed_record", chat="b", ms=1500, tag="b")
            (_, a_start, a_end, _), (_, b_start, b_end, _) = first.result(timeout=120), second.result(timeout=120)
        assert a_start < b_end and b_start < a_end, "two keys ran one after the other"
    finally:
        assert daemon.stop() == 0
