"""Scenario ``daemon``: the same no-op round trip and throughput, through the Unix socket.

A real ``governor serve`` runs in a subprocess on a private socket and journal, serving the
bench's own steps, once per ``--journal-sync`` mode. Measured, in one run:

* round trip, one client: ``client.run("noop")``, one at a time (journal insert,
  dispatch record, end record, one request and one reply included), next to
  ``supervisor.submit("noop").result()`` in process; and ``client.submit("noop").result()``,
  which also waits for the acknowledgement;
* throughput of :data:`DAEMON_TASKS` no-ops from 1, 10 and 50 clients (:data:`CLIENTS`),
  each on its own connection in its own thread, all submitting at once, in both sync
  modes, next to as many threads submitting to an in-process Supervisor: one ``submit``
  per task, and one ``run_batch`` per client (a batch travels as one frame);
* the daemon's own latency: one client offering no-ops at a steady rate below saturation
  (:data:`STEADY_SHARE` of the one-client throughput just measured), each latency from the
  task's scheduled send to its result (see :func:`_steady`);
* the daemon's CPU per task during the round trips and each throughput run: its event
  loop's thread (the process's main thread) apart from its other threads (the supervisor's
  manager, mostly), and how often they went to sleep (see :func:`_daemon_cpu`).

The targets are the daemon issue's bars, judged against the in-process figures of the
same run: round trip p50 within :data:`ROUNDTRIP_MARGIN_MS` of in-process; from 50
clients, at least :data:`NORMAL_PER_S` and half the in-process throughput, and
:data:`FULL_PER_S` with ``--journal-sync full``.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from governor.bench.bench_steps import registry
from governor.bench.core import ScenarioContext, ScenarioResult, scenario
from governor.bench.probes import threads_usage
from governor.bench.stats import Summary, Throughput, ratio, to_ms
from governor import Supervisor
from governor.client import Client, DaemonUnavailable

#: Concurrent clients in the throughput runs (the daemon issue's load test uses 50).
CLIENTS = (1, 10, 50)

#: No-ops per throughput run, by run size (the daemon issue's load test sends 10,000).
DAEMON_TASKS = {"full": 10_000, "quick": 2_000, "tiny": 20}

#: The issue's bars: round trip p50 within this of in-process; from 50 clients, these rates
#: (``--journal-sync normal`` and ``full``) and this share of the in-process throughput.
ROUNDTRIP_MARGIN_MS = 0.3
NORMAL_PER_S = 5_000
FULL_PER_S = 2_000
IN_PROCESS_SHARE = 0.5

#: How long one client waits for the results of its share of a throughput run.
RESULT_TIMEOUT_S = 300

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


def _runs(run, count: int) -> List[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        run("noop")
        samples.append(time.perf_counter() - start)
    return samples


def _one_client_submits(client: Any, count: int) -> List[float]:
    """``count`` no-ops, each submitted alone, then every result: each one's latency."""
    sent = [(time.perf_counter(), client.submit("noop")) for _ in range(count)]
    latencies = []
    for started, future in sent:
        future.result(timeout=RESULT_TIMEOUT_S)
        latencies.append(time.perf_counter() - started)
    return latencies


def _one_client_batch(client: Any, count: int) -> List[float]:
    """``count`` no-ops as one batch: its latency, for each task."""
    started = time.perf_counter()
    client.run_batch([("noop", {})] * count, timeout=RESULT_TIMEOUT_S)
    return [time.perf_counter() - started] * count


def _load(connect: Callable[[], Any], run: Callable[[Any, int], List[float]], clients: int,
          tasks: int) -> Tuple[Throughput, List[float]]:
    """``tasks`` no-ops split over ``clients`` threads at once, each with the client
    ``connect()`` gives it (a connection of its own, or the shared Supervisor), running
    its share with ``run``: throughput and latencies."""
    def one_client(count: int) -> List[float]:
        client = connect()
        try:
            return run(client, count)
        finally:
            if isinstance(client, Client):
                client.close()

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


def _daemon_cpu(pid: int, run: Callable[[], Any], tasks: int) -> Tuple[Any, Dict[str, float]]:
    """``run()``'s value, and what the daemon ``pid`` spent per task meanwhile: microseconds
    of CPU on its event loop's thread (``loop_us``) and on its other threads
    (``other_threads_us``), and how many times its threads went to sleep (``sleeps``)."""
    before = threads_usage(pid)
    value = run()
    after = threads_usage(pid)
    spent = {part: (after[part][0] - before[part][0], after[part][1] - before[part][1]) for part in after}
    return value, {"loop_us": round(spent["main"][0] / tasks * 1e6, 1),
                   "other_threads_us": round(spent["others"][0] / tasks * 1e6, 1),
                   "sleeps": round((spent["main"][1] + spent["others"][1]) / tasks, 2)}


def _cpu_text(cpu: Dict[str, float]) -> str:
    return (f"loop {cpu['loop_us']:.0f} us, other threads {cpu['other_threads_us']:.0f} us, "
            f"{cpu['sleeps']:.1f} sleeps")


def _stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


#: The ways a client sends its share of a throughput run: (key, label, run).
_FORMS = (("submit", "one submit per task", _one_client_submits),
          ("batch", "one batch per client", _one_client_batch))


def _throughputs(result: ScenarioResult, ctx: ScenarioContext, where: str, connect: Callable[[], Any],
                 tasks: int, daemon_pid: Optional[int] = None) -> Dict[Tuple[str, int], Throughput]:
    """Every client count and form of :data:`CLIENTS` and :data:`_FORMS` against one target
    (with ``daemon_pid``, a daemon: its CPU per task in each run too)."""
    figures = {}
    for form, form_label, run in _FORMS:
        for clients in CLIENTS:
            clients = min(clients, tasks)
            ctx.progress(f"throughput, {where}, {clients} clients, {form_label}: {tasks} no-ops")
            load = functools.partial(_load, connect, run, clients, tasks)
            key = f"{where.replace(' ', '_')}.{form}.clients_{clients}"
            label = f"{where}, {clients} client{'s' if clients > 1 else ''}, {form_label}"
            if daemon_pid is None:
                throughput, latencies = load()
            else:
                (throughput, latencies), cpu = _daemon_cpu(daemon_pid, load, tasks)
                result.put(f"daemon_cpu_per_task.{key}", cpu)
                if clients == max(CLIENTS):  # the report's row; every run's is in the JSON
                    result.row(f"the daemon's CPU per task, {label}", _cpu_text(cpu))
            figures[(form, clients)] = throughput
            result.put(f"throughput.{key}", throughput, f"throughput, {label}")
            if form == "submit":
                result.distribution("Latency at saturation (mostly queueing)", label, to_ms(latencies))
    return figures


@scenario("daemon")
def daemon(ctx: ScenarioContext) -> ScenarioResult:
    """No-op round trip and throughput from 1, 10 and 50 clients in both sync modes, through the daemon's socket."""
    size, result = ctx.size, ScenarioResult()
    workers, tasks = size.peer_workers, DAEMON_TASKS[ctx.size_name]
    count = max(10, size.roundtrips // 2)
    through = {}
    for sync in ("normal", "full"):
        ctx.progress(f"starting governor serve ({workers} workers, --journal-sync {sync})")
        directory = ctx.scratch / sync
        directory.mkdir()
        process, socket_path = _start_daemon(directory, workers, extra_args=("--journal-sync", sync))
        try:
            if sync == "normal":
                with Client(socket_path) as client:
                    _runs(client.run, 20 * size.warmup)
                    ctx.progress(f"round trips through the socket: {count} of run, {count} of submit")
                    through_socket, cpu = _daemon_cpu(process.pid, lambda: _runs(client.run, count), count)
                    result.put("daemon_cpu_per_task.roundtrip", cpu)
                    result.row("the daemon's CPU per round trip (Client.run)", _cpu_text(cpu))
                    acknowledged = _roundtrips(client.submit, count)
            through[sync] = _throughputs(result, ctx, f"daemon {sync}", lambda: Client(socket_path), tasks,
                                         process.pid)
            if sync == "normal":
                rate = STEADY_SHARE * through[sync][("submit", 1)].per_s
                steady_tasks = max(20, min(tasks, round(rate * STEADY_SECONDS)))
                ctx.progress(f"steady load: {steady_tasks} no-ops at {rate:,.0f}/s from 1 client")
                steady = _steady(socket_path, rate, steady_tasks)
                result.put("steady.rate_per_s", round(rate, 1))
                result.put("steady.tasks", steady_tasks)
                result.put("steady.latency", Summary.of_seconds(steady),
                           f"latency per task at a steady {rate:,.0f}/s ({STEADY_SHARE:.0%} of saturation), 1 client")
                result.distribution("Latency through the daemon", f"steady {rate:,.0f}/s, 1 client", to_ms(steady))
        finally:
            _stop(process)
    ctx.progress("the same round trip and throughput in process, for comparison")
    with Supervisor(registry, workers) as supervisor:
        _roundtrips(supervisor.submit, 20 * size.warmup)
        in_process = _roundtrips(supervisor.submit, count)
        local = _throughputs(result, ctx, "in process", lambda: supervisor, tasks)
    socket_summary, local_summary = Summary.of_seconds(through_socket), Summary.of_seconds(in_process)
    result.put("roundtrip.socket", socket_summary, "no-op round trip through the socket (Client.run)")
    result.put("roundtrip.socket_acknowledged", Summary.of_seconds(acknowledged),
               "no-op round trip through the socket, submit().result() (an ack, then the result)")
    result.put("roundtrip.in_process", local_summary, "no-op round trip, in-process Supervisor")
    result.put("roundtrip.ratio_p50", ratio(socket_summary.p50, local_summary.p50), "socket / in-process, p50", "x")
    result.distribution("Latency through the daemon", "round trip, 1 client", to_ms(through_socket))
    _targets(result, socket_summary, local_summary, through, local, min(max(CLIENTS), tasks))
    result.note("Each submission is journaled (SQLite WAL) before its ack, marked running (a critical step "
                "before it reaches a worker) and marked finished at its end; the daemon commits what one turn "
                "of its loop brought in one transaction, synced as --journal-sync says (full: an fsync per "
                "commit).")
    return result


def _targets(result: ScenarioResult, socket_summary: Summary, local_summary: Summary,
             through: Dict[str, Dict[Tuple[str, int], Throughput]], local: Dict[Tuple[str, int], Throughput],
             clients: int) -> None:
    """The issue's bars, each against this run's in-process figure where it has one."""
    result.target(f"round trip p50, through the socket - in process <= {ROUNDTRIP_MARGIN_MS:g} ms",
                  socket_summary.p50 - local_summary.p50, ROUNDTRIP_MARGIN_MS, "ms")
    for form, form_label, _ in _FORMS:
        normal, full = through["normal"][(form, clients)].per_s, through["full"][(form, clients)].per_s
        where = f"{clients} clients, {form_label}"
        result.target(f"{where}, normal: {NORMAL_PER_S:,}/s / ours <= 1x", ratio(NORMAL_PER_S, normal), 1.0, "x")
        result.target(f"{where}, normal: in process / ours <= {1 / IN_PROCESS_SHARE:g}x",
                      ratio(local[(form, clients)].per_s, normal), 1 / IN_PROCESS_SHARE, "x")
        result.target(f"{where}, full: {FULL_PER_S:,}/s / ours <= 1x", ratio(FULL_PER_S, full), 1.0, "x")
