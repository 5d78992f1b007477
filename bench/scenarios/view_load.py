"""Scenario ``view-load``: simulated users switching views on the reference backend, over real HTTP.

The seed's scenario as users live it: each user thinks (exponential, mean 1 s), then
switches view; one switch in five is a burst of three clicks 100 ms apart, each click
aborting the request before it (the client closes its connection, as a browser's
``AbortController`` does). The same app (``governor.bench.backend`` on uvicorn, in a
subprocess) and the same load, behind four engines, in one run:

* ``before``: the seed's registry, every step of every request one after another in one lane;
* ``naive pool``: ``asyncio.gather`` over a ``ProcessPoolExecutor`` of as many workers
  (plain Starlette: a request whose client left still runs to its end);
* ``governor``: an in-process Supervisor, request-scoped through ``governor.asgi``;
* ``governor daemon``: uvicorn with 2 worker processes sharing one ``governor serve``.

For each: p50/p95/p99 of the views users waited for (the last click of a burst, never a
superseded one), views per second, the worker-seconds spent on views nobody received, the
server's CPU time and private memory. Each server is warmed up before its users come (views
until every pool worker has run a part), and those views are left out of every figure. The
``seed`` profile runs at every user count of the size (the curve of p95 against users);
``seed-753`` at the bar's 10 users. On the Governor engines, five requests of one session 30
ms apart measure the supersede itself.

It runs only when named (``python -m governor.bench --scenario view-load``): it needs the
``web`` extra, and takes about ten minutes at the full size (a fresh server per run).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import attrs
import psutil

from governor.bench.core import ScenarioContext, ScenarioResult, scenario
from governor.bench.scenarios.daemon import _start_daemon
from governor.bench.stats import Summary, ratio, to_ms
from governor.bench.view_steps import WAIT_PROFILES
from governor.bench.view_times import (Breakdown, LatencySplit, ViewTimes, Waited, breakdown, journal_views,
                                       latency_split, work_after_supersede_s)

#: A user's mean think time between two view switches (exponential), and the share of
#: switches that are a burst of rapid clicks, their count and gap.
THINK_MEAN_S, BURST_SHARE, BURST_CLICKS, BURST_GAP_S = 1.0, 0.2, 3, 0.100

#: The chats a user switches between.
CHATS = 20

#: How long a user waits for a view before giving up (the view counts at this latency).
PATIENCE_S = 5.0

#: uvicorn processes in front of the daemon (the pool workers are the size's: the seed asked for "10+").
DAEMON_FRONT_WORKERS = 2

#: The issue's bars.
P95_BAR_MS, P95_RATIO_BAR, WASTE_RATIO_BAR = 200.0, 0.8, 0.2
SUPERSEDE_LAG_BAR_MS, LAST_OF_FIVE_BAR_MS, FIVE_GAP_S = 50.0, 200.0, 0.030

#: How long a server may take to answer its first request, and how long its busy time may
#: take to settle once the users stopped (steps nobody stopped go on running).
START_TIMEOUT_S, SETTLE_TIMEOUT_S = 90.0, 10.0

#: How long a stopping server may finish the requests it holds.
GRACEFUL_SHUTDOWN_S = 5

#: The sessions of the views that warm a server up before its users come (left out of its
#: figures), and how many rounds of them it gets at most to run a part on every worker.
WARM_UP_SESSION, WARM_UP_ROUNDS = "warm-up", 10


@attrs.frozen
class Engine:
    """One engine behind the reference app: its label, environment and whether it needs a daemon."""

    name: str
    view_engine: str
    daemon: bool = False


ENGINES = (Engine("before", "before"), Engine("naive pool", "naive-pool"), Engine("governor", "governor"),
           Engine("governor daemon", "governor", daemon=True))


@attrs.define
class Load:
    """What the users of one run saw."""

    latencies_s: List[float] = attrs.field(factory=list)
    waited: List[Waited] = attrs.field(factory=list)  # the views answered 200, for the server's log
    delivered_busy_s: float = 0.0
    aborted: int = 0
    gave_up: int = 0
    errors: int = 0


@attrs.frozen
class RunFigures:
    """One engine under one load."""

    latencies_s: Tuple[float, ...]
    views_per_s: float
    wasted_worker_s: float
    after_supersede_worker_s: float
    slowest: Optional[Breakdown]
    split: Optional[LatencySplit]
    warmed_workers: int
    cpu_s: float
    uss_mib: float
    aborted: int
    gave_up: int
    errors: int

    @property
    def latency(self) -> Optional[Summary]:
        """The views users waited for (``None`` if none came)."""
        return Summary.of_seconds(self.latencies_s) if self.latencies_s else None


class Server:
    """The reference backend on uvicorn in a subprocess (and its daemon, for the daemon engine)."""

    def __init__(self, engine: Engine, profile_dir: Path, workers: int):
        self.engine = engine
        self.workers = workers
        self.dir = profile_dir
        self.daemon: Optional[subprocess.Popen] = None
        self.process: Optional[subprocess.Popen] = None
        self.url = ""

    def __enter__(self) -> "Server":
        env = {**os.environ, "GOVERNOR_VIEW_ENGINE": self.engine.view_engine, "GOVERNOR_VIEW_WORKERS": str(self.workers)}
        env.pop("GOVERNOR_SOCKET", None)
        front = 1
        if self.engine.daemon:
            self.daemon, socket_path = _start_daemon(self.dir, self.workers, steps="governor.bench.backend")
            env["GOVERNOR_SOCKET"], front = str(socket_path), DAEMON_FRONT_WORKERS
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "governor.bench.backend:app", "--host", "127.0.0.1", "--port", str(port),
             "--workers", str(front), "--log-level", "warning",
             # The engines that cannot stop a step leave every abandoned request running:
             # past this, uvicorn cancels them rather than drain the backlog.
             "--timeout-graceful-shutdown", str(int(GRACEFUL_SHUTDOWN_S))],
            env=env, stdout=subprocess.DEVNULL, stderr=open(self.dir / "uvicorn.log", "ab"))
        _wait_ready(self.url, self.process, self.dir / "uvicorn.log")
        return self

    def __exit__(self, *exc_info) -> None:
        for process in (self.process, self.daemon):
            if process is not None:
                _stop(process)

    def processes(self) -> List[psutil.Process]:
        """The server's processes (uvicorn and its workers or pool; the daemon and its workers)."""
        found = []
        for process in (self.process, self.daemon):
            if process is not None:
                with contextlib.suppress(psutil.NoSuchProcess):
                    parent = psutil.Process(process.pid)
                    found.extend([parent, *parent.children(recursive=True)])
        return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_ready(url: str, process: subprocess.Popen, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the backend exited with {process.returncode}:\n{log.read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/stats", timeout=5).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"the backend did not answer within {START_TIMEOUT_S:g}s")


def _stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(process.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        process.kill()
        process.wait()


def _cpu_s(processes: Sequence[psutil.Process]) -> Dict[int, float]:
    times = {}
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            cpu = process.cpu_times()
            times[process.pid] = cpu.user + cpu.system
    return times


def _uss_mib(processes: Sequence[psutil.Process]) -> float:
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += process.memory_full_info().uss
    return total / 2 ** 20


async def _worker_seconds(client, url: str) -> float:
    return (await client.get(f"{url}/stats")).json()["worker_seconds"]


async def _settled_worker_seconds(client, url: str) -> float:
    """The server's busy time once it stops growing (steps of abandoned views may still run)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    last = await _worker_seconds(client, url)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = await _worker_seconds(client, url)
        if now == last:
            break
        last = now
    return last


async def _user(client, profile: str, session: str, deadline: float, rng: random.Random, load: Load) -> None:
    """One user: think, switch (sometimes in a burst, aborting each superseded click), wait for the view."""
    import httpx

    loop = asyncio.get_running_loop()
    switches = 0
    while True:
        await asyncio.sleep(rng.expovariate(1 / THINK_MEAN_S))
        if loop.time() >= deadline:
            return
        clicks = BURST_CLICKS if rng.random() < BURST_SHARE else 1
        request: Optional[asyncio.Task] = None
        for click in range(clicks):
            if request is not None:
                _collect(request, load)
            switches += 1  # orders the user's clicks, as the reference page does
            params = {"session": session, "profile": profile, "seq": switches}
            sent = time.monotonic()  # the server's clock too (its log of the views)
            request = asyncio.create_task(client.get(f"/view/{rng.randint(1, CHATS)}", params=params))
            if click < clicks - 1:
                await asyncio.sleep(BURST_GAP_S)
        try:
            response = await asyncio.wait_for(request, PATIENCE_S)
        except asyncio.TimeoutError:
            load.gave_up += 1
            load.latencies_s.append(PATIENCE_S)
            continue
        except httpx.HTTPError:
            load.errors += 1
            continue
        received = time.monotonic()
        load.latencies_s.append(received - sent)
        if response.status_code == 200:
            load.waited.append((session, str(switches), sent, received))
        _account(response, load)


def _collect(request: asyncio.Task, load: Load) -> None:
    """A click the user left: abort it if it is still in flight, else count what it delivered."""
    if not request.done():
        request.cancel()  # httpx closes the connection: the server sees the client leave
        load.aborted += 1
    elif request.exception() is None:
        _account(request.result(), load)


def _account(response, load: Load) -> None:
    if response.status_code == 200:
        load.delivered_busy_s += sum(part["ms"] for part in response.json()["parts"]) / 1000
    elif response.status_code != 409:
        load.errors += 1


async def _warm_up(url: str, profile: str, workers: int) -> int:
    """Run views at once, round after round, until every worker of the server's pool has run
    a part (or a round finds none new, or :data:`WARM_UP_ROUNDS`); the workers that did.

    What a pool costs on first use a long-running server pays once: the naive pool forks
    its workers on its first submission, stalling the server's loop (views of the first
    half second took 550-850 ms on a quiet machine), and a worker's first step imports its
    module. In a 15 s run those views were the slowest 5 %: the p95 measured the start.
    """
    import httpx

    at_once = -(-workers // len(WAIT_PROFILES[profile])) + 1  # more parts than workers
    seen: set = set()
    async with httpx.AsyncClient(base_url=url, timeout=START_TIMEOUT_S) as client:
        for round_number in range(WARM_UP_ROUNDS):
            responses = await asyncio.gather(*(
                client.get(f"/view/{number + 1}", params={"session": f"{WARM_UP_SESSION}-{round_number}-{number}",
                                                          "profile": profile}) for number in range(at_once)))
            before = len(seen)
            for response in responses:
                response.raise_for_status()
                seen.update(part["pid"] for part in response.json()["parts"])
            if len(seen) >= workers or len(seen) == before:
                break
    return len(seen)


def _users_views(views: List[ViewTimes]) -> List[ViewTimes]:
    """The views of the users, not of the warm-up."""
    return [view for view in views if not view.session.startswith(WARM_UP_SESSION)]


async def _offer_load(url: str, profile: str, users: int, seconds: float,
                      seed: int) -> Tuple[Load, float, float, List[ViewTimes]]:
    """Run ``users`` users for ``seconds``; return what they saw, the elapsed time, the wasted
    worker-seconds and the views as the server logged them (none through a daemon)."""
    import httpx

    load = Load()
    # One client for every user, made before the clock starts: an httpx client builds an SSL
    # context when made, which under load took longer than a run for 50 users. Each request
    # in flight has a connection of its own; cancelling it closes that connection.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=2 * users)
    async with httpx.AsyncClient(base_url=url, timeout=PATIENCE_S + 5, limits=limits) as client:
        busy_before = await _worker_seconds(client, url)
        started = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + seconds
        await asyncio.gather(*(_user(client, profile, f"user-{number}", deadline,
                                     random.Random(seed * 1000 + number), load) for number in range(users)))
        elapsed = time.perf_counter() - started
        busy = await _settled_worker_seconds(client, url) - busy_before
        views = [ViewTimes.from_record(record) for record in (await client.get(f"{url}/views")).json()["views"]]
    return load, elapsed, max(0.0, busy - load.delivered_busy_s), views


def _run(server: Server, profile: str, users: int, seconds: float, seed: int) -> RunFigures:
    warmed = asyncio.run(_warm_up(server.url, profile, server.workers))
    processes = server.processes()  # after the warm-up: the naive pool's workers exist only from then
    cpu_before = _cpu_s(processes)
    load, elapsed, wasted, views = asyncio.run(_offer_load(server.url, profile, users, seconds, seed))
    processes = server.processes()
    cpu_after = _cpu_s(processes)
    cpu = sum(after - cpu_before.get(pid, 0.0) for pid, after in cpu_after.items())
    if server.engine.daemon:
        views = journal_views(server.dir / "journal.sqlite3")
    views = _users_views(views)
    return RunFigures(tuple(load.latencies_s), len(load.latencies_s) / elapsed, wasted, work_after_supersede_s(views),
                      breakdown(views, server.workers), latency_split(views, load.waited), warmed, cpu,
                      _uss_mib(processes), load.aborted, load.gave_up, load.errors)


async def _five_requests(url: str) -> Tuple[float, Optional[float], List[int]]:
    """Five views of one session 30 ms apart.

    Returns:
        how long after the next request the latest of the first four ended (ms; 409, or
        done before the next came: negative), the fifth's latency (ms; ``None`` unless it
        was answered 200), and the five statuses.
    """
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        async def click(number: int) -> Tuple[float, float, int]:
            await asyncio.sleep(number * FIVE_GAP_S)  # the pace of the clicks
            sent = time.perf_counter()
            response = await client.get(f"/view/{number}", params={"session": "five", "profile": "seed",
                                                                                "seq": number})
            return sent, time.perf_counter(), response.status_code

        clicks = await asyncio.gather(*(click(number) for number in range(5)))
    lag = max(ended - clicks[number + 1][0] for number, (_, ended, _) in enumerate(clicks[:4]))
    sent, ended, status = clicks[4]
    return lag * 1000, (ended - sent) * 1000 if status == 200 else None, [status for _, _, status in clicks]


def _figures(result: ScenarioResult, key: str, label: str, figures: RunFigures) -> None:
    if figures.latency is not None:
        result.put(f"{key}.latency", figures.latency, f"{label}: views waited for")
    result.put(f"{key}.views_per_s", round(figures.views_per_s, 2), f"{label}: views per second", "/s")
    result.put(f"{key}.wasted_worker_s", round(figures.wasted_worker_s, 3),
               f"{label}: worker-seconds on views nobody received", "s")
    result.put(f"{key}.after_supersede_worker_s", round(figures.after_supersede_worker_s, 3),
               f"{label}: of which after the view was superseded (what cancelling controls)", "s")
    if figures.slowest is not None:
        slowest = figures.slowest
        result.put(f"{key}.slowest_views", attrs.asdict(slowest))  # the figures, for the JSON
        result.row(f"{label}: server-side p95 of {slowest.views} views; the slowest 5 % (medians)",
                   f"p95 {slowest.server_p95_ms:.0f} ms; slowest {slowest.server_ms:.0f} ms, last part started after "
                   f"{slowest.last_start_ms:.0f} ms, longest queue wait {slowest.longest_wait_ms:.0f} ms, longest "
                   f"part {slowest.unqueued_ms:.0f} ms; a worker was free {slowest.free_worker_share:.0%} of their "
                   "parts' queue waits")
    if figures.split is not None:
        split = figures.split
        result.put(f"{key}.latency_split", attrs.asdict(split))
        result.row(f"{label}: the slowest 5 % of the views users waited for (medians)",
                   f"{split.user_ms:.0f} ms: HTTP in {split.http_in_ms:.1f} ms, engine {split.server_ms:.0f} ms, "
                   f"results to the handler {split.answer_ms:.1f} ms, HTTP out {split.http_out_ms:.1f} ms")
    result.put(f"{key}.warmed_workers", figures.warmed_workers, f"{label}: workers that ran a part before the users came")
    result.put(f"{key}.cpu_s", round(figures.cpu_s, 2), f"{label}: server CPU time", "s")
    result.put(f"{key}.uss_mib", round(figures.uss_mib, 1), f"{label}: server private memory (USS)", "MiB")
    result.put(f"{key}.aborted", figures.aborted)
    result.put(f"{key}.gave_up", figures.gave_up)
    result.put(f"{key}.errors", figures.errors)


@scenario("view-load", named_only=True)
def view_load(ctx: ScenarioContext) -> ScenarioResult:
    """Users switching views over HTTP: before / naive pool / Governor in process / through the daemon."""
    size, result = ctx.size, ScenarioResult()
    bar_users, seconds = size.view_load_bar_users, size.view_load_seconds
    runs = [("seed-753", bar_users), *(("seed", users) for users in size.view_load_users)]
    p95: Dict[Tuple[str, str, int], Optional[float]] = {}
    wasted: Dict[str, float] = {}
    after_supersede: Dict[str, float] = {}
    curve = result.curve("View load: p95 of the views users waited for (seed profile)", "users", "p95 (ms)")
    for engine in ENGINES:
        key = engine.name.replace(" ", "_")
        for number, (profile, users) in enumerate(runs):
            directory = ctx.scratch / f"{key}-{profile}-{users}"
            directory.mkdir()
            ctx.progress(f"{engine.name}: {users} users, {profile} profile, {seconds:g} s")
            with Server(engine, directory, size.view_load_workers) as server:
                figures = _run(server, profile, users, seconds, seed=number)
                if engine.name.startswith("governor") and profile == "seed-753":
                    lag_ms, last_ms, statuses = asyncio.run(_five_requests(server.url))
                    result.put(f"{key}.five_requests.statuses", statuses,
                               f"{engine.name}: five requests 30 ms apart, answered")
                    result.put(f"{key}.five_requests.superseded_lag_ms", round(lag_ms, 1),
                               f"{engine.name}: five requests 30 ms apart, latest superseded answer after the next request", "ms")
                    result.put(f"{key}.five_requests.last_ms", None if last_ms is None else round(last_ms, 1),
                               f"{engine.name}: five requests 30 ms apart, the fifth's latency", "ms")
                    if statuses[4] != 200:
                        result.note(f"{engine.name}: the fifth of five requests was answered {statuses[4]}: an "
                                    "earlier request of the session reached the governor after it and superseded it "
                                    "(the daemon engine's two uvicorn processes need not keep the order of sending).")
                    result.target(f"{engine.name}: superseded requests end <= {SUPERSEDE_LAG_BAR_MS:g} ms after the next",
                                  lag_ms, SUPERSEDE_LAG_BAR_MS, "ms")
                    result.target(f"{engine.name}: the fifth of five answers <= {LAST_OF_FIVE_BAR_MS:g} ms",
                                  last_ms, LAST_OF_FIVE_BAR_MS, "ms")
            _figures(result, f"{key}.{profile}.users_{users}", f"{engine.name}, {profile}, {users} users", figures)
            p95[engine.name, profile, users] = figures.latency.p95 if figures.latency else None
            if profile == "seed-753":
                wasted[engine.name] = figures.wasted_worker_s
                after_supersede[engine.name] = figures.after_supersede_worker_s
                result.distribution(f"View load: seed-753, {users} users", engine.name, to_ms(figures.latencies_s))
            elif figures.latency is not None:
                curve.series.setdefault(engine.name, []).append([users, round(figures.latency.p95, 2)])

    for name in ("governor", "governor daemon"):
        result.target(f"seed-753, {bar_users} users: {name} p95 < {P95_BAR_MS:g} ms",
                      p95[name, "seed-753", bar_users], P95_BAR_MS, "ms")
        naive_p95 = p95["naive pool", "seed-753", bar_users]
        ours = p95[name, "seed-753", bar_users]
        result.target(f"seed-753, {bar_users} users: {name} p95 / the naive pool's <= {P95_RATIO_BAR:g}x",
                      ratio(ours, naive_p95) if ours is not None and naive_p95 else None, P95_RATIO_BAR, "x")
        result.target(f"seed-753, {bar_users} users: {name} worker-seconds on superseded views / the naive pool's "
                      f"<= {WASTE_RATIO_BAR:g}x", ratio(wasted[name], wasted["naive pool"]), WASTE_RATIO_BAR, "x")
        result.put(f"{name.replace(' ', '_')}.after_supersede_ratio",
                   ratio(after_supersede[name], after_supersede["naive pool"]),
                   f"seed-753, {bar_users} users: {name} worker-seconds after the supersede / the naive pool's", "x")
        if size.view_load_users:
            most = max(size.view_load_users)
            result.target(f"seed, {most} users: {name} p95 < {P95_BAR_MS:g} ms", p95[name, "seed", most],
                          P95_BAR_MS, "ms")
    for engine in ENGINES if size.view_load_users else ():
        crossing = next((users for users in size.view_load_users
                         if (p95[engine.name, "seed", users] or float("inf")) > P95_BAR_MS), None)
        result.put(f"crossing.{engine.name.replace(' ', '_')}", crossing,
                   f"{engine.name}: fewest users (seed) whose p95 passes {P95_BAR_MS:g} ms "
                   f"({'none' if crossing is None else crossing} of {', '.join(map(str, size.view_load_users))})")
    result.note(f"Users think {THINK_MEAN_S:g} s on average (exponential); one switch in "
                f"{round(1 / BURST_SHARE)} is {BURST_CLICKS} clicks {BURST_GAP_S * 1000:g} ms apart, each aborting "
                f"the last. Each run lasts {seconds:g} s on a fresh server (uvicorn in a subprocess; the daemon "
                f"engine: {DAEMON_FRONT_WORKERS} uvicorn workers and one governor serve), warmed up first (views "
                "until every worker has run a part, left out of every figure); every engine has "
                f"{size.view_load_workers} workers. A user gives up after {PATIENCE_S:g} s (counted at that latency). Wasted worker-seconds: "
                "the server's busy time (Governor's metrics; the pools' step times) minus the parts of the views "
                "users received. CPU and memory: the server's processes (and the daemon's), not the load "
                "generator, which shares the machine. Of the wasted worker-seconds, those after the supersede: "
                "what a view's parts ran after the session's next view reached the server (the server's own "
                "log of each part's start and end; through the daemon, its journal); what they ran before "
                "that, any engine that starts a view's parts at once spends. Slowest views: the top 5 % of "
                "the views that ended before the session's next one came, by the server's time from their "
                "arrival to their last part's end; a worker was free: the share of their parts' queue waits "
                "during which fewer parts than workers ran (time lost handing out work, not to a full pool). "
                "Part times: Governor in process, the workers' own; through the daemon, its journal's (a "
                "part's start as it was handed to a worker, its end the worker's own); the "
                "pools', the server's sight of the result less the part's own time (so they include the "
                "result's way back).")
    return result
