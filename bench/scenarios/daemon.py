"""Scenario ``daemon``: the same no-op round trip and throughput, through the Unix socket.

A real ``governor serve`` runs in a subprocess on a private socket and journal, serving the
bench's own steps. Measured, in one run:

* round trip, one client: ``client.submit("noop").result()``, one at a time (journal
  insert, dispatch record, end record and two socket hops included), next to the same
  round trip through an in-process Supervisor;
* throughput and per-task latency with 1 and with ``DAEMON_CLIENTS`` clients, each on its
  own connection in its own thread, all submitting at once: saturation, where a task's
  latency is mostly its wait behind the others (and named so);
* the daemon's own latency: one client offering no-ops at a steady rate below saturation
  (:data:`STEADY_SHARE` of the one-client throughput just measured), each latency from the
  task's scheduled send to its result (see :func:`_steady`).
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Tuple

from governor.bench.bench_steps import registry
from governor.bench.core import ScenarioContext, ScenarioResult, scenario
from governor.bench.stats import Summary, Throughput, ratio, to_ms
from governor import Supervisor
from governor.client import Client, DaemonUnavailable

#: Concurrent clients in the many-clients run (the daemon issue's load test uses 50).
DAEMON_CLIENTS = 50

#: The steady load's rate, as a share of the throughput one client reached at saturation:
#: low enough that tasks do not queue behind each other, so what is left is the daemon's
#: own latency; high enough to keep it busy.
STEADY_SHARE = 0.25

#: The steady load runs about this long (fewer tasks than the saturated run when the rate is low).
STEADY_SECONDS = 5.0

#: How long the daemon may take to start and answer a ping.
START_TIMEOUT_S = 60.0


def _start_daemon(directory: Path, workers: int, steps: str = "governor.bench.bench_steps",
                  extra_args: Tuple[str, ...] = ()) -> Tuple[subprocess.Popen, Path]:
    socket_path = directory / "run" / "governor.sock"
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, "-m", "governor", "serve", "--socket", str(socket_path),
         "--journal", str(directory / "journal.sqlite3"), "--steps", steps, "--no-builtin",
         "--workers", str(workers), "--log-level", "warning", *extra_args],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the daemon exited with {process.returncode} while starting")
        try:
            with Client(socket_path) as client:
                client.ping()
            return process, socket_path
        except DaemonUnavailable:
            time.sleep(0.05)
    process.kill()
    process.wait()
    raise RuntimeError(f"the daemon did not answer within {START_TIMEOUT_S:g}s")


def _roundtrips(submit, count: int) -> List[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        submit("noop").result()
        samples.append(time.perf_counter() - start)
    return samples


def _load(socket_path: Path, clients: int, tasks: int) -> Tuple[Throughput, List[float]]:
    """``tasks`` no-ops split over ``clients`` connections at once: throughput and latencies."""
    def one_client(count: int) -> List[float]:
        with Client(socket_path) as client:
            sent = []
            for _ in range(count):
                sent.append((time.perf_counter(), client.submit("noop")))
            latencies = []
            for started, future in sent:
                future.result(timeout=300)
                latencies.append(time.perf_counter() - started)
            return latencies

    shares = [tasks // clients + (1 if n < tasks % clients else 0) for n in range(clients)]
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=clients) as pool:
        latencies = [latency for found in pool.map(one_client, shares) for latency in found]
    return Throughput(tasks, time.perf_counter() - start), latencies


def _steady(socket_path: Path, rate: float, tasks: int) -> List[float]:
    """``tasks`` no-ops from one client at ``rate`` per second: each one's latency, in seconds.

    Open loop on results: a send waits only for the daemon's acknowledgement (the task
    journaled, as ``Client.submit`` returns), never for a result. A latency runs from the
    task's scheduled send to its result, so a daemon that falls behind, in its replies or
    in its acknowledgements, shows as growing latencies rather than as a slower offered load.
    """
    interval, latencies = 1.0 / rate, []
    with Client(socket_path) as client:
        start, futures = time.perf_counter(), []
        for n in range(tasks):
            scheduled = start + n * interval
            time.sleep(max(0.0, scheduled - time.perf_counter()))
            future = client.submit("noop")
            # On the client's reader thread, as the result arrives (list.append is atomic).
            future.add_done_callback(lambda _, scheduled=scheduled: latencies.append(time.perf_counter() - scheduled))
            futures.append(future)
        for future in futures:
            future.result(timeout=300)
    return latencies


@scenario("daemon")
def daemon(ctx: ScenarioContext) -> ScenarioResult:
    """No-op round trip, throughput at saturation and latency at a steady rate, through the daemon's socket."""
    size, result = ctx.size, ScenarioResult()
    workers = size.peer_workers
    count = max(10, size.roundtrips // 2)
    ctx.progress(f"starting governor serve ({workers} workers)")
    process, socket_path = _start_daemon(ctx.scratch, workers)
    try:
        with Client(socket_path) as client:
            _roundtrips(client.submit, 20 * size.warmup)
            ctx.progress(f"round trips through the socket: {count}")
            through_socket = _roundtrips(client.submit, count)
        clients = min(DAEMON_CLIENTS, size.throughput_tasks)
        saturated = {}
        for label, connections in (("1 client", 1), (f"{clients} clients", clients)):
            ctx.progress(f"throughput, {label}: {size.throughput_tasks} no-ops")
            throughput, latencies = _load(socket_path, connections, size.throughput_tasks)
            saturated[connections] = throughput
            key = "one_client" if connections == 1 else "many_clients"
            at_once = f"{label}, all {size.throughput_tasks:,} submitted at once"
            result.put(f"{key}.clients", connections)
            result.put(f"{key}.throughput", throughput, f"throughput, {at_once}")
            result.put(f"{key}.latency", Summary.of_seconds(latencies),
                       f"latency per task at saturation (mostly queueing), {at_once}")
            result.distribution("Latency through the daemon", f"saturated, {label}", to_ms(latencies))
        rate = STEADY_SHARE * saturated[1].per_s
        tasks = max(20, min(size.throughput_tasks, round(rate * STEADY_SECONDS)))
        ctx.progress(f"steady load: {tasks} no-ops at {rate:,.0f}/s from 1 client")
        steady = _steady(socket_path, rate, tasks)
        result.put("steady.rate_per_s", round(rate, 1))
        result.put("steady.tasks", tasks)
        result.put("steady.latency", Summary.of_seconds(steady),
                   f"latency per task at a steady {rate:,.0f}/s ({STEADY_SHARE:.0%} of saturation), 1 client")
        result.distribution("Latency through the daemon", f"steady {rate:,.0f}/s, 1 client", to_ms(steady))
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    ctx.progress("the same round trip in process, for comparison")
    with Supervisor(registry, workers) as supervisor:
        _roundtrips(supervisor.submit, 20 * size.warmup)
        in_process = _roundtrips(supervisor.submit, count)
    socket_summary, local_summary = Summary.of_seconds(through_socket), Summary.of_seconds(in_process)
    result.put("roundtrip.socket", socket_summary, "no-op round trip through the socket")
    result.put("roundtrip.in_process", local_summary, "no-op round trip, in-process Supervisor")
    result.put("roundtrip.ratio_p50", ratio(socket_summary.p50, local_summary.p50), "socket / in-process, p50", "x")
    result.distribution("Latency through the daemon", "round trip, 1 client", to_ms(through_socket))
    result.note("Each submission is journaled (SQLite WAL, synchronous=NORMAL) before its ack, marked "
                "running (a critical step before it reaches a worker) and marked finished at its end; the "
                "daemon commits what one turn of its loop brought in one transaction.")
    return result
