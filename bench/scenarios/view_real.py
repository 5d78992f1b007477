"""Scenario ``view-real``: the view switch with the real built-in steps, on a real repository.

The ``view-switch`` scenario uses sleeps of the issue's durations; this one runs what a user
runs: ``chat.history`` (limit 50) on a chat store of :data:`STORE_MESSAGES` messages,
``git.status`` and ``git.current_branch`` on this project's own checkout (the repository
the ``bench`` package lives in; set ``BENCH_VIEW_REPO`` to measure another one). Outside a
git checkout a small repository is made in the scratch directory, and a note says so.

Measured, in rounds so a noisy spell on the machine hits every variant alike:

* sequential: the three steps' functions called one after another in this process
  (``StepSpec.invoke``, the old registry's way), each also timed alone;
* parallel: ``Supervisor.run_batch`` of the three;
* each step alone through the supervisor (``run_batch`` of one), whose slowest p50 is the
  floor a parallel view cannot beat: the ratio "parallel p50 / slowest single p50" is
  reported against :data:`RATIO_TARGET`;
* every peer of the ``overhead`` scenario (mp.Pool, stdlib, pebble, mpire, loky) running the same
  three step functions at once, with as many workers, in the same rotating rounds: whether
  any pool gets nearer the sequential figure on this machine;
* rapid switching: a new view every :data:`SWITCH_INTERVAL_S`, open loop (submissions on
  schedule, whatever the results do), each in ``supervisor.scope(key="view")``, so a new
  view cancels the previous view's unfinished steps. A view's latency runs from its first
  submit to the last of its three results; views that a newer one superseded before they
  finished are counted, not timed.

Every latency is ``time.perf_counter`` in this process, from the call to its return (or to
the done-callback of the view's last future).

The repository's index is refreshed first (``git.refresh_index``): a fresh clone's index
holds "racily clean" entries that every read-only ``git status`` would re-read (18-40 ms
instead of 2-3 ms) until something writes the index.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import os
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from governor import Call, Supervisor

import governor.bench as bench
from governor.bench.core import ScenarioContext, ScenarioResult, scenario
from governor.bench.peers import PEERS, GovernorPeer, Peer
from governor.bench.probes import PATIENCE_S, ResolutionStamp
from governor.bench.scenarios.overhead import rotated, start_peers
from governor.bench.scenarios.view_switch import OURS
from governor.bench.stats import Summary, ratio, to_ms
from governor.steps.builtin import chat, default_registry, git

#: Messages in the chat the view shows: a long-lived chat, so ``chat.history``'s
#: ``ORDER BY id DESC LIMIT 50`` reads the tail of a real table, not a toy one.
STORE_MESSAGES = 10_000

#: Messages the view asks for, as a chat window does when it opens.
HISTORY_LIMIT = 50

#: The figure from issue 7: a parallel view costs its slowest step, plus 10 % (reported).
RATIO_TARGET = 1.1

#: Issue 12's bar: the batch p50 at most this share of the sequential p50.
BATCH_TO_SEQUENTIAL_TARGET = 0.8

#: Pool workers: one per view step, plus one so that a superseded step still finishing
#: (git polls for a cancel every 50 ms) does not hold up the next view's steps.
WORKERS = 4

#: Each measured variant runs ``size.view_reps`` times this many: the real steps take a few
#: ms, not the sleeps' 117, so more samples cost little and steady the p95.
REPS_FACTOR = 5

#: Rapid switching: a new view this often, for this long at each size.
SWITCH_INTERVAL_S = 0.030
SWITCH_SECONDS = {"full": 2.0, "quick": 1.0, "tiny": 0.3}

#: Overrides the repository the git steps read (default: this project's checkout).
REPO_ENV_VAR = "BENCH_VIEW_REPO"

#: The view's steps, in the order the table lists them.
VIEW_STEPS = ("chat.history", "git.status", "git.current_branch")


def _is_git_checkout(path: Path) -> bool:
    try:
        completed = subprocess.run(["git", "-C", str(path), "rev-parse", "--is-inside-work-tree"],
                                   capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return completed.returncode == 0 and completed.stdout.strip() == "true"


def _repository(ctx: ScenarioContext) -> Tuple[Path, str]:
    """The repository the git steps read, and where it came from (for the note)."""
    override = os.environ.get(REPO_ENV_VAR)
    if override:
        return Path(override).resolve(), f"${REPO_ENV_VAR}"
    checkout = Path(bench.__file__).resolve().parent.parent
    if _is_git_checkout(checkout):
        return checkout, "this project's checkout"
    return _scratch_repository(ctx.scratch / "repo"), "a scratch repository (the bench is not in a git checkout)"


def _scratch_repository(path: Path) -> Path:
    """A repository with a few commits and a dirty file, for a bench run outside a checkout."""
    path.mkdir()

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(path), "-c", "user.name=bench", "-c", "user.email=bench@example.com",
                        *args], check=True, capture_output=True)

    git("init", "-q")
    for index in range(5):
        (path / f"file{index}.txt").write_text(f"content {index}\n" * 50)
        git("add", "-A")
        git("commit", "-q", "-m", f"commit {index}")
    (path / "file0.txt").write_text("changed\n")
    return path


def build_store(path: Path, messages: int = STORE_MESSAGES) -> int:
    """Create a chat store at ``path`` holding one chat of ``messages`` messages; return its id.

    The chat and the schema come from the real ``chat.create``; the messages go in with one
    ``executemany`` in one transaction (a few tenths of a second for ten thousand), with
    texts of varied length and increasing timestamps, as a long conversation would have.
    """
    chat_id = chat.create("benchmark chat", store=str(path))
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    rows = [(chat_id, "user" if index % 2 == 0 else "assistant",
             f"message {index}: " + "lorem ipsum dolor sit amet " * (1 + index % 12),
             (start + datetime.timedelta(seconds=30 * index)).isoformat(timespec="microseconds"))
            for index in range(messages)]
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany("INSERT INTO messages (chat_id, author, text, created_at) VALUES (?, ?, ?, ?)", rows)
        connection.execute("COMMIT")
    finally:
        connection.close()
    return chat_id


def _timed(action: Callable[[], Any]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def _check_batch(results: Sequence[Any]) -> None:
    errors = [result for result in results if isinstance(result, BaseException)]
    if errors:
        raise RuntimeError(f"a view step failed: {errors[0]!r}")


def _peer_view(peer: Peer, calls: Sequence[Call]) -> Callable[[], None]:
    """The view through ``peer``: the three built-in steps submitted at once, then awaited."""
    def run() -> None:
        futures = [peer.submit("builtin", call.step, dict(call.kwargs)) for call in calls]
        concurrent.futures.wait(futures)
        _check_batch([future.exception() or future.result() for future in futures])
    return run


def _rapid_switching(supervisor: Supervisor, calls: Sequence[Call], seconds: float) -> Dict[str, Any]:
    """Switch views every :data:`SWITCH_INTERVAL_S` for ``seconds``, each in a keyed scope.

    Returns:
        ``views``, ``completed`` (latencies in s of views whose three steps all finished),
        ``superseded`` (views a newer one cancelled before they finished),
        ``cancelled_steps``, and ``last`` (the final view's latency in s: nothing superseded it).
    """
    count = max(2, round(seconds / SWITCH_INTERVAL_S))
    views: List[Tuple[float, list, list]] = []
    start = time.perf_counter()
    for index in range(count):
        delay = start + index * SWITCH_INTERVAL_S - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        submitted = time.perf_counter()
        scope = supervisor.scope(key="view")  # cancels the previous view's unfinished steps
        futures = [scope.submit_call(call) for call in calls]
        views.append((submitted, futures, [ResolutionStamp(future) for future in futures]))
    completed, superseded, cancelled_steps = [], 0, 0
    for submitted, futures, stamps in views:
        for stamp in stamps:
            stamp.wait(PATIENCE_S)
        cancelled = sum(future.cancelled() for future in futures)
        failed = [future.exception() for future in futures if not future.cancelled() and future.exception()]
        if failed:
            raise RuntimeError(f"a view step failed while switching: {failed[0]!r}")
        cancelled_steps += cancelled
        if cancelled:
            superseded += 1
        else:
            completed.append(max(stamp.at for stamp in stamps) - submitted)
    last_submitted, last_futures, last_stamps = views[-1]
    if any(future.cancelled() for future in last_futures):
        raise RuntimeError("the last view was cancelled, but nothing superseded it")
    return {"views": count, "completed": completed, "superseded": superseded, "cancelled_steps": cancelled_steps,
            "last": max(stamp.at for stamp in last_stamps) - last_submitted}


@scenario("view-real")
def view_real(ctx: ScenarioContext) -> ScenarioResult:
    """The view switch with the real steps (10,000-message chat, this checkout): sequential, parallel, rapid."""
    # The chat store is in the run's scratch directory, not the state directory: allow it.
    with chat.allowing_stores([ctx.scratch / "chat.sqlite3"]):
        return _view_real(ctx)


def _view_real(ctx: ScenarioContext) -> ScenarioResult:
    size, result = ctx.size, ScenarioResult()
    reps = size.view_reps * REPS_FACTOR
    repo, repo_origin = _repository(ctx)
    ctx.progress(f"building a chat store of {STORE_MESSAGES:,} messages")
    store = ctx.scratch / "chat.sqlite3"
    build_start = time.perf_counter()
    chat_id = build_store(store)
    build_s = time.perf_counter() - build_start
    calls = [Call("chat.history", kwargs={"chat_id": chat_id, "limit": HISTORY_LIMIT, "store": str(store)}),
             Call("git.status", kwargs={"repo": str(repo)}),
             Call("git.current_branch", kwargs={"repo": str(repo)})]
    registry = default_registry()
    specs = [registry.get(call.step) for call in calls]
    refreshed = git.refresh_index(str(repo))
    result.put("repo", str(repo), "repository")
    result.put("repo_index_refreshed", refreshed["refreshed"], "repository index refreshed first")
    result.put("store_messages", STORE_MESSAGES, "chat store messages")
    result.put("store_build_ms", build_s * 1000, "chat store built in", "ms")

    direct: Dict[str, List[float]] = {step: [] for step in VIEW_STEPS}
    alone: Dict[str, List[float]] = {step: [] for step in VIEW_STEPS}
    sequential_s: List[float] = []
    parallel_s: List[float] = []

    def sequential_view() -> None:
        total = 0.0
        for call, spec in zip(calls, specs):
            elapsed = _timed(lambda: spec.invoke((), dict(call.kwargs)))
            direct[call.step].append(elapsed)
            total += elapsed
        sequential_s.append(total)

    with contextlib.ExitStack() as stack:
        peers = start_peers(stack, [peer for peer in PEERS if peer is not GovernorPeer], WORKERS, ctx, result)
        ctx.progress(f"starting a Supervisor with {WORKERS} workers")
        supervisor = stack.enter_context(Supervisor(registry, workers=WORKERS))

        def parallel_view() -> None:
            start = time.perf_counter()
            outcomes = supervisor.run_batch(calls, return_exceptions=True)
            parallel_s.append(time.perf_counter() - start)
            _check_batch(outcomes)

        views: Dict[str, Callable[[], None]] = {"sequential": sequential_view, OURS: parallel_view}
        peer_views = {peer.name: _peer_view(peer, calls) for peer in peers}
        peer_s: Dict[str, List[float]] = {name: [] for name in peer_views}
        views.update((name, lambda name=name: peer_s[name].append(_timed(peer_views[name])))
                     for name in peer_views)
        ctx.progress(f"warm-up, then {reps} rounds of: sequential, parallel (ours and {len(peers)} peers, "
                     "rotating), each step alone")
        for _ in range(size.warmup):
            for call, spec in zip(calls, specs):
                spec.invoke((), dict(call.kwargs))
            _check_batch(supervisor.run_batch(calls, return_exceptions=True))
            for call in calls:
                supervisor.run_batch([call])
            for view in peer_views.values():
                view()
        for round_index in range(reps):
            for name in rotated(list(views), round_index):
                views[name]()
            for call in calls:
                alone[call.step].append(_timed(lambda: supervisor.run_batch([call])))

        seconds = SWITCH_SECONDS[ctx.size_name]
        ctx.progress(f"rapid switching: a view every {SWITCH_INTERVAL_S * 1000:g} ms for {seconds:g} s")
        rapid = _rapid_switching(supervisor, calls, seconds)

    sequential, parallel = Summary.of_seconds(sequential_s), Summary.of_seconds(parallel_s)
    single = {step: Summary.of_seconds(samples) for step, samples in alone.items()}
    slowest_step = max(single, key=lambda step: single[step].p50)
    to_slowest = parallel.p50 / single[slowest_step].p50
    for step in VIEW_STEPS:
        result.put(f"steps.{step}.direct", Summary.of_seconds(direct[step]), f"{step}, direct call")
        result.put(f"steps.{step}.supervisor", single[step], f"{step}, alone through the Supervisor")
    result.put("sequential", sequential, "view, sequential direct calls")
    result.put("parallel", parallel, "view, Supervisor.run_batch")
    result.put("improvement_pct", 100 * (sequential.p50 - parallel.p50) / sequential.p50,
               "improvement (p50)", "%")
    result.put("slowest_single_step", slowest_step, "slowest single step (p50)")
    result.put("ratio_parallel_to_slowest", to_slowest, "parallel p50 / slowest single p50", "x")
    result.target(f"parallel view p50 / slowest single step p50 <= {RATIO_TARGET:g}x", to_slowest, RATIO_TARGET, "x")
    result.target(f"parallel view p50 / sequential p50 <= {BATCH_TO_SEQUENTIAL_TARGET:g}x",
                  parallel.p50 / sequential.p50, BATCH_TO_SEQUENTIAL_TARGET, "x")
    peer_views = {name: Summary.of_seconds(samples) for name, samples in peer_s.items()}
    for name, summary in peer_views.items():
        result.put(f"peers.{name}.parallel", summary, f"{name}: the three steps at once")
        result.put(f"peers.{name}.parallel_to_sequential", summary.p50 / sequential.p50,
                   f"{name}: parallel p50 / sequential p50", "x")
    if peer_views:
        best = min(peer_views, key=lambda name: peer_views[name].p50)
        result.put("best_peer", best, "the peer with the fastest parallel view")
        result.target(f"parallel view p50, ours / the best peer's ({best}) <= 1x",
                      ratio(parallel.p50, peer_views[best].p50), 1.0, "x")

    result.put("rapid.interval_ms", SWITCH_INTERVAL_S * 1000)
    result.put("rapid.views", rapid["views"], "rapid switching: views")
    result.put("rapid.superseded", rapid["superseded"], "views superseded before they finished")
    result.put("rapid.cancelled_steps", rapid["cancelled_steps"], "steps cancelled by a newer view")
    completed: Optional[Summary] = Summary.of_seconds(rapid["completed"]) if rapid["completed"] else None
    result.put("rapid.latency", completed, "latest-view latency while switching")
    result.put("rapid.last_view_ms", rapid["last"] * 1000, "the final view's latency", "ms")
    if completed is not None:
        result.put("rapid.latency_p95_over_quiet_p50", completed.p95 / parallel.p50,
                   "switching p95 / quiet parallel p50", "x")

    panel = "Real view switch: sequential vs parallel"
    result.distribution(panel, "sequential (direct calls)", to_ms(sequential_s))
    result.distribution(panel, "run_batch", to_ms(parallel_s))
    result.distribution(panel, f"{slowest_step} alone", to_ms(alone[slowest_step]))
    for name, samples in peer_s.items():
        result.distribution(panel, name, to_ms(samples))
    if rapid["completed"]:
        result.distribution(panel, f"switching every {SWITCH_INTERVAL_S * 1000:g} ms", to_ms(rapid["completed"]))
    result.note(f"Repository: {repo} ({repo_origin}); chat store: one chat of {STORE_MESSAGES:,} messages, "
                f"history limit {HISTORY_LIMIT}. Supervisor of {WORKERS} pool workers; {size.warmup} warm-up "
                f"round(s), then {reps} rounds each running the sequential view, the parallel view and each "
                "step alone, so machine noise hits them alike.")
    result.note("Sequential = StepSpec.invoke of each step in the benchmark process (the old registry's way); "
                "parallel and single = Supervisor.run_batch, from the call to its return. Each peer runs the same "
                f"step functions (through bench step 'builtin') with {WORKERS} workers; the sequential view, ours "
                "and the peers' take turns in rotating rounds.")
    result.note(f"The repository's index was refreshed first (git.refresh_index: refreshed={refreshed['refreshed']}), "
                "so git.status does not re-read a fresh clone's racily clean files on every call.")
    result.note(f"Rapid switching: a new view every {SWITCH_INTERVAL_S * 1000:g} ms on schedule, each in "
                "supervisor.scope(key='view'); latency from the view's submit to its last result. Views that a "
                "newer one cancelled are counted as superseded, not timed.")
    return result
