"""Many requests in flight on one connection: the daemon reads every frame as it comes, handles
them at once (bounded per connection), answers each by its id, and keeps a client's order."""

import socket
import sqlite3

from conftest import wait_until
from daemon_harness import InProcessDaemon
from governor.service import connections

from test_daemon_hardening import frame, read_frame


def _submits(count: int, step: str = "noop", first_id: int = 0, **params) -> bytes:
    return b"".join(frame({"v": 1, "id": first_id + n, "op": "submit", "step": step,
                           "params": {key: (value(n) if callable(value) else value) for key, value in params.items()}})
                    for n in range(count))


def test_requests_pipelined_on_one_connection_share_the_loops_commits(tmp_path):
    # Read one at a time, each submission of a connection waited for its own group commit
    # before the next was read: 200 submissions were 200 commits.
    with InProcessDaemon(tmp_path) as running, socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(60)
        sock.connect(str(running.socket))
        before = running.statistics().journal_commits
        sock.sendall(_submits(200))
        replies = [read_frame(sock) for _ in range(200)]
        assert sorted(reply["id"] for reply in replies) == list(range(200))
        assert all(reply["ok"] for reply in replies), replies
        assert len({reply["task_id"] for reply in replies}) == 200
        # Submissions, pool starts and ends all ride along; one commit per request would be 200+.
        assert running.statistics().journal_commits - before < 100


def test_a_clients_pipelined_critical_steps_run_in_the_order_it_sent_them(tmp_path):
    ledger = tmp_path / "ledger.txt"
    with InProcessDaemon(tmp_path) as running, socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(60)
        sock.connect(str(running.socket))
        sock.sendall(_submits(100, "ledger.append", path=str(ledger), seq=lambda n: n, ms=0))
        replies = [read_frame(sock) for _ in range(100)]
        assert all(reply["ok"] for reply in replies), replies
        by_request = {reply["id"]: reply["task_id"] for reply in replies}
        assert [by_request[n] for n in range(100)] == sorted(by_request.values()), "journaled out of order"
        assert wait_until(lambda: ledger.exists() and len(ledger.read_text().splitlines()) == 100, timeout=60)
    assert [int(line.split()[0]) for line in ledger.read_text().splitlines()] == list(range(100))


def test_one_connection_has_at_most_its_bound_of_requests_in_flight(tmp_path, monkeypatch):
    monkeypatch.setattr(connections, "MAX_REQUESTS_IN_FLIGHT", 4)
    with InProcessDaemon(tmp_path) as running, socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(120)
        sock.connect(str(running.socket))
        # Another process holds the journal's write lock: no group commit can end, so every
        # submission read stays in flight until it is released.
        other = sqlite3.connect(running.journal, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            sock.sendall(_submits(20))
            assert wait_until(lambda: running.statistics().requests_in_flight >= 4, timeout=60)
            for _ in range(3):  # turns of the loop in which an unbounded reader would take more
                running.statistics()
            assert running.statistics().requests_in_flight == 4
        finally:
            other.execute("ROLLBACK")
            other.close()
        replies = [read_frame(sock) for _ in range(20)]
        assert sorted(reply["id"] for reply in replies) == list(range(20))
        assert all(reply["ok"] for reply in replies), replies
        assert wait_until(lambda: running.statistics().requests_in_flight == 0, timeout=30)
