"""The daemon's HTTP ports cannot be held open (issue 27, item 7).

About 1,000 half-open unauthenticated requests to ``--metrics-addr`` (one thread per
connection, no header timeout) or ``--http-addr`` (the token checked only after the
headers) were never timed out: at a 1,024-fd limit the daemon's own clients timed out.
Now each port holds at most ``MAX_HTTP_CONNECTIONS``, closes the next at once, and closes
a connection that has not sent a request's head within ``HEADER_TIMEOUT_S``.
"""

import re
import socket
import time
import urllib.request

import psutil
import pytest

from conftest import wait_until
from daemon_harness import DaemonProcess
from governor.client import Client
from governor.service.metrics_http import HEADER_TIMEOUT_S, MAX_HTTP_CONNECTIONS

HALF_OPEN = 1000


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def daemon(tmp_path):
    metrics_port = _free_port()
    running = DaemonProcess(tmp_path, extra_args=("--http-addr", "127.0.0.1:0",
                                                  "--metrics-addr", f"127.0.0.1:{metrics_port}")).start()
    running.metrics_port = metrics_port
    running.page_port = int(re.findall(r"status page on http://127\.0\.0\.1:(\d+)/", running.log.read_text())[-1])
    yield running
    assert running.stop() == 0, running.log.read_text()


def _closed_by_the_daemon(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


@pytest.mark.parametrize("endpoint", ["metrics", "page"])
def test_a_thousand_half_open_requests_hold_neither_the_port_nor_the_daemon(daemon, endpoint):
    port = daemon.metrics_port if endpoint == "metrics" else daemon.page_port
    path = "/metrics" if endpoint == "metrics" else "/api/live"
    process = psutil.Process(daemon.process.pid)
    fds_before, threads_before = process.num_fds(), process.num_threads()
    held = []
    try:
        for _ in range(HALF_OPEN):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode())  # never the blank line
            sock.setblocking(False)
            held.append(sock)
        started = time.monotonic()
        with Client(daemon.socket, timeout=30) as client:
            client.ping()
            client.status()
        served_in = time.monotonic() - started
        assert served_in < 1.0, f"the daemon's own client waited {served_in:.2f}s"
        assert process.num_threads() <= threads_before + 1
        assert process.num_fds() <= fds_before + MAX_HTTP_CONNECTIONS + 8, "the daemon holds the connections"
        # Those past the cap were closed at once, the rest once their head is overdue.
        assert wait_until(lambda: all(_closed_by_the_daemon(sock) for sock in held), timeout=HEADER_TIMEOUT_S + 60)
    finally:
        for sock in held:
            sock.close()
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=30) as response:
        assert b"governor_" in response.read()
