"""The live picture (issue 15) from a real daemon: the ``live`` op, and the status page's HTTP side
(token, no cookie, read-only, 4xx). The browser and the terminal views have their own modules."""

import http.client
import json
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import pytest

from conftest import wait_until
from governor import Call, Limits, MemoryLimitExceeded, StepCancelled, StepTimeout

pytest.importorskip("aiohttp", reason="the status page needs the live extra (pip install -e '.[live]')")
from governor.service.web import STATIC  # noqa: E402 (it needs aiohttp)

from governor.cli import EXIT_CODES  # noqa: E402
from governor.client import Client  # noqa: E402
from live_harness import LiveDaemon, daemon, running  # noqa: E402,F401 (daemon: a fixture)

#: Each test starts a real daemon (seconds on a shared 2-core machine): a generous guard.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def request(daemon, method, path, headers=None, body=None):
    """One HTTP request to the daemon's page: (status, headers, body text). No redirect is followed."""
    address = urllib.parse.urlsplit(daemon.base)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.headers, response.read().decode()
    finally:
        connection.close()


def pool_lane(snapshot):
    return next(lane for lane in snapshot["lanes"] if lane["lane"] == "pool")


def test_a_running_step_shows_with_its_daemon_id_and_limits_then_its_kill(daemon):
    with Client(daemon.socket) as client:
        # A workflow is one daemon id but two supervisor tasks: from here on the two numberings
        # differ, so the view can only show the daemon's id if it maps it.
        client.workflow([("echo", {"value": 1}), ("echo", {"value": 2})]).result(60)
        held = client.submit_call(Call("busy_loop", limits=Limits(timeout_s=120, max_memory_mb=900)))
        task_id = held.wait_for_id(30)
        # metrics, workers and the journal's rows are three reads, and a pool step's start record
        # is journaled in the next group commit, after its worker took it: wait for one snapshot
        # that has the step in all three.
        snapshot = daemon.wait_live(lambda snap: running("busy_loop")(snap) and pool_lane(snap)["in_flight"] == 1
                                    and any(task["task_id"] == task_id and task["state"] == "running"
                                            for task in snap["tasks"]))
        [worker] = running("busy_loop")(snapshot)
        # One id per task everywhere: the journal's, not the supervisor's internal number.
        assert worker["task_id"] == task_id and worker["lane"] == "pool" and worker["state"] == "busy"
        assert worker["timeout_s"] == 120 and worker["max_memory_mb"] == 900
        assert worker["running_s"] >= 0 and worker["rss_bytes"] > 0
        assert pool_lane(snapshot)["queue_depth"] == 0

        timed = client.submit_call(Call("busy_loop", limits=Limits(timeout_s=0.5)))
        with pytest.raises(StepTimeout) as timeout:
            timed.result(60)
        held.cancel("the test is done with it")
        with pytest.raises(StepCancelled):
            held.result(60)
    snapshot = daemon.live()
    kills = {kill["task_id"]: kill for kill in snapshot["kills"]}
    timeout_kill = kills[timed.task_id]
    assert timeout_kill["reason"] == "timeout" and timeout_kill["limit"] == "0.5 s"
    assert timeout_kill["observed"] == f"{timeout.value.elapsed_s:.4g} s" and timeout_kill["pid"] == timeout.value.pid
    assert kills[task_id]["reason"] == "cancel" and kills[task_id]["observed"] == "explicit: cancelled by a client"
    [busy] = [step for step in snapshot["steps"] if step["step"] == "busy_loop"]
    assert busy["count"] == 2 and busy["p95_s"] >= busy["p50_s"] >= 0.5
    assert sum(point["count"] for point in snapshot["series"]["points"]) == 4  # and the two echo steps


def test_a_memory_kill_shows_its_limit_and_the_peak_seen(daemon):
    with Client(daemon.socket) as client:
        future = client.submit_call(Call("allocate", kwargs={"chunk_mb": 20, "total_mb": 2000},
                                         limits=Limits(max_memory_mb=150)))
        with pytest.raises(MemoryLimitExceeded) as over:
            future.result(60)
    [kill] = [kill for kill in daemon.live()["kills"] if kill["task_id"] == future.task_id]
    assert kill["reason"] == "memory" and kill["limit"] == "150 MiB"
    assert kill["observed"] == f"{over.value.peak_mb:.4g} MiB" and over.value.peak_mb > 150


def test_every_request_for_data_needs_the_token_and_a_cookie_carrying_it_opens_nothing(daemon):
    port = daemon.base.rsplit(":", 1)[1]
    for path in ("/api/live", "/api/events", "/metrics", "/nowhere"):
        status, _, body = request(daemon, "GET", path)
        assert status == 403 and "token" in body, path
        assert request(daemon, "GET", path + "?token=not-" + daemon.token)[0] == 403, path
        assert request(daemon, "GET", path, {"Cookie": f"governor_token_{port}={daemon.token}"})[0] == 403, path
    assert request(daemon, "POST", "/api/cancel", {"Content-Type": "application/json"}, '{"task_ids": [1]}')[0] == 403
    for path, name in (("/", "index.html"), ("/static/app.js", "app.js")):  # the package's files: no data
        status, _, body = request(daemon, "GET", path)
        assert status == 200 and body == (STATIC / name).read_text(), path


def test_the_url_token_is_never_set_as_a_cookie(daemon):
    """Cookies ignore ports: a cookie set here would reach every other server on this host."""
    status, headers, page = request(daemon, "GET", "/?token=" + daemon.token)
    assert status == 200 and "Set-Cookie" not in headers
    assert "/static/app.js" in page and "script-src 'self'" in headers["Content-Security-Policy"]
    assert "http://" not in page.replace("http://www.w3.org", "")  # nothing loaded from elsewhere
    status, headers, body = request(daemon, "GET", "/api/live", {"Authorization": "Bearer " + daemon.token})
    assert status == 200 and json.loads(body)["daemon_pid"] == daemon.process.pid and "Set-Cookie" not in headers
    status, _, metrics = request(daemon, "GET", "/metrics?token=" + daemon.token)
    assert status == 200 and "governor_workers" in metrics


def test_read_only_by_default_and_bad_requests_are_4xx_without_a_traceback(daemon):
    auth = {"Authorization": "Bearer " + daemon.token}
    json_auth = {**auth, "Content-Type": "application/json"}
    status, _, body = request(daemon, "POST", "/api/cancel", json_auth, '{"task_ids": [1]}')
    assert status == 403 and "read-only" in body
    for method, path in (("GET", "/nowhere"), ("GET", "/static/../live.py"), ("DELETE", "/api/live"),
                         ("GET", "/static/nothing.js")):
        status, _, body = request(daemon, method, path, auth)
        assert 400 <= status < 500 and "Traceback" not in body, (method, path, status, body)
    # A body longer than its Content-Length: the rest reaches the page as a malformed second
    # request, refused with a 400. The page closes the connection with that data unread, so
    # the kernel may reset it before the answer is read: whatever answer arrived is checked,
    # and the log must hold no traceback.
    answers = exchange_raw(daemon, b"GET /api/live HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                           + daemon.token.encode() + b"\r\nContent-Length: 5\r\n\r\n" + b"x" * 200_000)
    statuses = [int(line.split()[1]) for line in answers.split(b"\r\n") if line.startswith(b"HTTP/1.")]
    assert all(status < 500 for status in statuses) and b"Traceback" not in answers, answers[:2000]
    assert "Traceback" not in daemon.log.read_text()


def exchange_raw(daemon, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection to the page; every byte answered until it closes."""
    address = urllib.parse.urlsplit(daemon.base)
    received = []
    with socket.create_connection((address.hostname, address.port), timeout=30) as raw:
        try:
            raw.sendall(data)
            while chunk := raw.recv(1 << 16):
                received.append(chunk)
        except (ConnectionResetError, BrokenPipeError):  # the page closed with our data unread
            pass
    return b"".join(received)


def test_cancel_from_the_page_when_allowed(tmp_path):
    daemon = LiveDaemon(tmp_path, allow_cancel=True).start()
    try:
        with Client(daemon.socket) as client:
            future = client.submit("busy_loop")
            task_id = future.wait_for_id(30)
            daemon.wait_live(running("busy_loop"))
            auth = {"Authorization": "Bearer " + daemon.token, "Content-Type": "application/json"}
            for bad in ('{"task_ids": "all"}', '{"task_ids": [0]}', "[1]", "not json", '{"ids": [1]}'):
                status, _, body = request(daemon, "POST", "/api/cancel", auth, bad)
                assert status == 400 and "Traceback" not in body, bad
            status, _, _ = request(daemon, "POST", "/api/cancel", {**auth, "Origin": "http://evil.example"},
                                   json.dumps({"task_ids": [task_id]}))
            assert status == 403 and not future.done()
            status, _, body = request(daemon, "POST", "/api/cancel", auth, json.dumps({"task_ids": [task_id]}))
            assert status == 200 and json.loads(body)["cancelled"] == [task_id]
            with pytest.raises(StepCancelled):
                future.result(60)
    finally:
        assert daemon.stop() == 0, daemon.log.read_text()


def test_a_non_loopback_address_needs_the_explicit_flag(tmp_path):
    refused = subprocess.run([sys.executable, "-m", "governor", "serve", "--socket", str(tmp_path / "s.sock"),
                              "--journal", str(tmp_path / "j.sqlite3"), "--http-addr", "0.0.0.0:0"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--http-allow-remote" in refused.stderr
    assert not (tmp_path / "s.sock").exists()


def test_a_taken_port_is_a_clear_error_and_leaves_nothing_running(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused = subprocess.run([sys.executable, "-m", "governor", "serve", "--socket", str(tmp_path / "s.sock"),
                                  "--journal", str(tmp_path / "j.sqlite3"), "--workers", "1",
                                  "--http-addr", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == EXIT_CODES["cannot_start"] and f"cannot serve the status page on 127.0.0.1:{port}" in refused.stderr
    assert "Traceback" not in refused.stderr and "could not start a worker" not in refused.stderr
    assert not (tmp_path / "s.sock").exists()


def test_governor_page_prints_a_url_with_a_fresh_token_that_opens_the_page(daemon):
    first, second = (daemon.cli("page") for _ in range(2))
    assert first.returncode == 0 and second.returncode == 0, first.stderr
    urls = [first.stdout.strip(), second.stdout.strip()]
    assert all(url.startswith(daemon.base + "/?token=") for url in urls), urls
    assert len({*urls, daemon.url}) == 3, "a fresh token each time"
    for url in urls:  # each opens the page, as the printed one does (a person pastes it)
        opened = urllib.request.urlopen(url.replace("/?", "/api/live?"), timeout=60)
        assert opened.status == 200 and json.loads(opened.read())["daemon_pid"] == daemon.process.pid
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(daemon.base + "/api/live?token=" + urls[0].split("token=")[1][:-2] + "xx",
                               timeout=60)
    assert refused.value.code == 403


def test_governor_page_of_a_daemon_without_the_page_says_how_to_serve_it(tmp_path):
    from daemon_harness import DaemonProcess

    plain = DaemonProcess(tmp_path).start()
    try:
        shown = plain.cli("page")
    finally:
        assert plain.stop() == 0
    assert shown.returncode == EXIT_CODES["failed"] and "--http-addr" in shown.stderr


def test_the_live_picture_shows_each_critical_key_and_what_is_queued_per_key(daemon, tmp_path):
    ledger, gate = str(tmp_path / "ledger.db"), tmp_path / "gate"
    with Client(daemon.socket) as client:
        held = client.submit("ledger_once", ledger=ledger, key="held", name="held", gate=str(gate))
        queued = [client.submit("ledger_once", ledger=ledger, key="a", name=f"a{n}") for n in range(2)]
        snapshot = daemon.wait_live(lambda snap: snap["critical_keys"] == [{"key": "a", "queued": 2}]
                                    and [worker["key"] for worker in snap["workers"] if worker["step"]] == ["held"])
        assert {task["task_id"]: task["lane_key"] for task in snapshot["tasks"]
                if task["step"] == "ledger_once"} == {held.task_id: "held", **{f.task_id: "a" for f in queued}}
        gate.touch()
        assert [future.result(60) for future in [held] + queued] == ["held", "a0", "a1"]
    assert daemon.live()["critical_keys"] == []
