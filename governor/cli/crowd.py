"""``governor run --view``'s crowd: the seed's 753 ms view for users switching fast, before and after.

The seed backend ran every step of every user's view through one registry, one after
another, so a view waited for its own twelve parts (753 ms) and for everybody else's; a
user who clicked again only queued more. Here the same view (twelve cancellable waits, from
``governor.bench.view_steps``) is switched by simulated users, each in a thread of its own:
a think time (exponential, mean :data:`THINK_MEAN_S`), then a switch; one switch in five is
a burst of three clicks 100 ms apart. Two engines take the same load:

* *before*: one lane (a single thread running each view's parts one after another, as the
  seed's registry did); a superseded view still runs, to its end;
* *Governor*: an in-process Supervisor with a pool worker per part; each switch takes the
  user's supersede key (``sup.scope(key=...)``), so the user's previous view is cancelled.

A user waits for the last view of each switch (never a superseded one), at most
:data:`PATIENCE_S`: a view not back by then counts at that latency, as a user who gave up.
"""

from __future__ import annotations

import concurrent.futures
import random
import statistics
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import attrs

from governor.task import Call

#: The crowd of ``governor run --view``: how many users, for how long.
DEFAULT_USERS, DEFAULT_SECONDS = 10, 3.0

#: A user's mean think time (exponential); the share of switches that are a burst, its
#: clicks and their gap.
THINK_MEAN_S, BURST_SHARE, BURST_CLICKS, BURST_GAP_S = 1.0, 0.2, 3, 0.100

#: How long a user waits for a view before giving up (the view counts at this latency): on
#: the seed's lane, ten users' views queue without end, and the point is made in 2 s.
PATIENCE_S = 2.0

#: The view: the seed's twelve parts.
PROFILE = "seed-753"


@attrs.frozen
class CrowdRun:
    """What the users of one engine waited for.

    Attributes:
        engine: ``"before"`` or ``"governor"``.
        latencies_ms: one per view a user waited for, in the order they came back.
        gave_up: views not back within :data:`PATIENCE_S`.
    """

    engine: str
    latencies_ms: Tuple[float, ...]
    gave_up: int

    @property
    def p50_ms(self) -> Optional[float]:
        return statistics.median(self.latencies_ms) if self.latencies_ms else None

    @property
    def p95_ms(self) -> Optional[float]:
        if len(self.latencies_ms) < 2:
            return self.p50_ms
        return statistics.quantiles(self.latencies_ms, n=20, method="inclusive")[-1]

    def to_json(self) -> Dict[str, Any]:
        return {"engine": self.engine, "views": len(self.latencies_ms), "gave_up": self.gave_up,
                "p50_ms": _rounded(self.p50_ms), "p95_ms": _rounded(self.p95_ms)}


@attrs.frozen
class CrowdReport:
    """The crowd's run on both engines."""

    users: int
    seconds: float
    view_ms: float
    before: CrowdRun
    governor: CrowdRun

    def to_json(self) -> Dict[str, Any]:
        return {"users": self.users, "seconds": self.seconds, "profile": PROFILE, "view_ms": self.view_ms,
                "before": self.before.to_json(), "governor": self.governor.to_json()}

    def lines(self) -> List[str]:
        """The report for people: one line per engine."""
        head = (f"The seed's {self.view_ms:.0f} ms view, {self.users} users switching for {self.seconds:g} s "
                f"(one switch in {round(1 / BURST_SHARE)} a burst of {BURST_CLICKS} clicks "
                f"{BURST_GAP_S * 1000:.0f} ms apart):")
        rows = [(self.before, "before (one lane, one part after another)"),
                (self.governor, "Governor (parts in parallel, superseded views cancelled)")]
        return [head] + [f"  {label:<58} p50 {_ms(run.p50_ms)}  p95 {_ms(run.p95_ms)}  "
                         f"{len(run.latencies_ms)} views" + (f", {run.gave_up} given up after {PATIENCE_S:g} s"
                                                              if run.gave_up else "")
                         for run, label in rows]


def run_crowd(users: int = DEFAULT_USERS, seconds: float = DEFAULT_SECONDS, seed: int = 0) -> CrowdReport:
    """Run the crowd on the seed's one lane, then on a Governor supervisor; same users, same clicks."""
    from governor.bench import view_steps
    from governor.engine.supervisor import Supervisor

    calls = [Call.of(call) for call in view_steps.wait_calls(PROFILE)]
    lane = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="seed-registry")
    try:
        before = _crowd("before", lambda user: _one_lane(lane, view_steps.registry, calls), users, seconds, seed)
    finally:
        lane.shutdown(wait=True, cancel_futures=True)  # the views nobody waits for any more
    with Supervisor(view_steps.registry, workers=len(calls)) as sup:
        governor = _crowd("governor", lambda user: _governed(sup, f"user {user}", calls), users, seconds, seed)
    return CrowdReport(users, seconds, sum(ms for _, ms in view_steps.WAIT_PROFILES[PROFILE]), before, governor)


#: One switch of user ``n``: the futures the view is back once all of are done.
Switch = Callable[[int], List[concurrent.futures.Future]]


def _one_lane(lane: concurrent.futures.Executor, registry: Any,
              calls: Sequence[Call]) -> List[concurrent.futures.Future]:
    """The seed's registry: the view's parts one after another, behind every earlier view."""
    def view() -> None:
        for call in calls:
            registry.get(call.step).invoke(call.args, call.kwargs)

    return [lane.submit(view)]


def _governed(sup: Any, key: str, calls: Sequence[Call]) -> List[concurrent.futures.Future]:
    """Governor: the parts at once, in the user's scope (which cancels the user's last view)."""
    scope = sup.scope(key=key)
    return [scope.submit_call(call) for call in calls]


def _crowd(engine: str, switch: Switch, users: int, seconds: float, seed: int) -> CrowdRun:
    latencies: List[float] = []
    gave_up = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def user(number: int) -> None:
        rng = random.Random(seed * 1000 + number)  # the same clicks on both engines
        while True:
            time.sleep(rng.expovariate(1 / THINK_MEAN_S))  # the user's think time
            if time.monotonic() >= deadline:
                return
            clicks = BURST_CLICKS if rng.random() < BURST_SHARE else 1
            for click in range(clicks):
                sent = time.monotonic()
                view = switch(number)
                if click < clicks - 1:
                    time.sleep(BURST_GAP_S)  # the pace of a rapid click
            late = concurrent.futures.wait(view, PATIENCE_S).not_done
            with lock:
                latencies.append((time.monotonic() - sent) * 1000)
                gave_up[0] += bool(late)

    threads = [threading.Thread(target=user, args=(number,), name=f"crowd-user-{number}") for number in range(users)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return CrowdRun(engine, tuple(latencies), gave_up[0])


def _rounded(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 1)


def _ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:,.0f} ms"
