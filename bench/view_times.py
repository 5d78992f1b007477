"""Where the views of a ``view-load`` run spent their time, as the server saw them.

A view is one request of a session: when it reached the engine, and when each of its
parts was queued, started and ended. The reference backend logs these (``GET /views``,
``governor.bench.backend.ViewLog``, on ``time.monotonic()``); through a daemon its journal
holds the same (wall-clock times, one clock within the journal). From them:

* :func:`work_after_supersede_s`: the worker-seconds spent on views after they were
  superseded, i.e. after the session's next view reached the server. This is the part of
  the wasted work that cancelling controls: whatever a view's parts ran before the next
  click arrived was spent by any engine that starts them at once.
* :func:`breakdown`: for the slowest views, how long they waited for their last part to
  start and how long that part then ran; and for how much of their parts' queue waits a
  worker was free (parts running < workers): time lost to dispatch, not to a full pool.
* :func:`latency_split`: for the slowest views as the users saw them, what the HTTP path,
  the engine and the hand-back of its results to the handler each took.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import itertools
import sqlite3
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import attrs

from governor.bench.stats import median, percentile

#: One part's ``(queued, started, ended)``; ``started``/``ended`` ``None``: it never started, or runs on.
PartTimes = Tuple[float, Optional[float], Optional[float]]

#: The step of the wait profiles' parts (``governor.bench.view_steps.wait``).
WAIT_STEP = "view.wait"


@attrs.frozen
class ViewTimes:
    """One view request: its session, when it reached the engine, its parts' times; in
    process also its ``seq`` (the user's click counter) and when the engine handed the
    handler its results (``answered``; ``None`` until then, or when it was superseded)."""

    session: str
    arrived: float
    parts: Tuple[PartTimes, ...]
    seq: Optional[str] = None
    answered: Optional[float] = None

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "ViewTimes":
        """From one entry of the backend's ``GET /views``."""
        return cls(record["session"], record["arrived"], tuple(tuple(part) for part in record["parts"]),
                   record.get("seq"), record.get("answered"))

    @property
    def ended(self) -> Optional[float]:
        """When its last part ended (``None``: one never started, or runs on)."""
        ends = [ended for _, _, ended in self.parts]
        return None if not ends or None in ends else max(ends)


def journal_views(path: Path) -> List[ViewTimes]:
    """The views a daemon ran, from its journal: a batch of :data:`WAIT_STEP` tasks of one
    supersede key (``"/view/ <session>"``), submitted together, is one view.

    The journal's times are wall-clock: a pool part's start is when it was handed to a
    worker, its end the part's own (the worker's, or the kill's), as in process.
    """
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as connection:
        rows = connection.execute("SELECT key, submitted_at, started_at, ended_at FROM tasks "
                                  "WHERE step = ? AND key IS NOT NULL ORDER BY id", (WAIT_STEP,)).fetchall()
    batches: Dict[Tuple[str, float], List[PartTimes]] = collections.defaultdict(list)
    for key, submitted, started, ended in rows:
        batches[key, submitted].append((submitted, started, ended))
    return [ViewTimes(key.split(" ", 1)[-1], submitted, tuple(parts)) for (key, submitted), parts in batches.items()]


def _by_session(views: Iterable[ViewTimes]) -> List[List[ViewTimes]]:
    sessions: Dict[str, List[ViewTimes]] = collections.defaultdict(list)
    for view in views:
        sessions[view.session].append(view)
    return [sorted(own, key=lambda view: view.arrived) for own in sessions.values()]


def work_after_supersede_s(views: Iterable[ViewTimes]) -> float:
    """The worker-seconds the views' parts ran after the session's next view arrived."""
    total = 0.0
    for own in _by_session(views):
        for view, newer in zip(own, own[1:]):
            total += sum(max(0.0, ended - max(started, newer.arrived))
                         for _, started, ended in view.parts if started is not None and ended is not None)
    return total


@attrs.frozen
class Breakdown:
    """Where the slowest views (the top 5 % by server time) lost their time, medians in ms.

    Attributes:
        views: how many views were complete (every part ended before the next view came).
        server_p95_ms: the p95 of the complete views' time from arrival to the last part's
            end: the users' p95 less what the HTTP path (and the load generator) added.
        slow: how many were among the slowest 5 % (at or above that p95).
        server_ms: their time from arrival to the last part's end.
        last_start_ms: their time from arrival to the last part's start (queueing, dispatch).
        longest_wait_ms: the longest queue wait of one of their parts.
        unqueued_ms: the server time of a view of the same parts started at once (its longest part's run).
        free_worker_share: of their parts' queue waits (summed), the share during which
            fewer parts than workers ran: waiting for the engine to hand a free worker a
            part, not for a worker to come free.
    """

    views: int
    server_p95_ms: float
    slow: int
    server_ms: float
    last_start_ms: float
    longest_wait_ms: float
    unqueued_ms: float
    free_worker_share: float


class _Running:
    """How many parts ran at each moment (every view's parts that started and ended)."""

    def __init__(self, views: Iterable[ViewTimes]):
        changes = sorted((moment, step) for view in views for _, started, ended in view.parts
                         if started is not None and ended is not None for moment, step in ((started, 1), (ended, -1)))
        self._moments = [moment for moment, _ in changes]
        self._counts = list(itertools.accumulate(step for _, step in changes))

    def seconds_below(self, start: float, end: float, workers: int) -> float:
        """The time between ``start`` and ``end`` when fewer than ``workers`` parts ran."""
        index = bisect.bisect_right(self._moments, start)
        running = self._counts[index - 1] if index else 0
        below, moment = 0.0, start
        for index in range(index, bisect.bisect_left(self._moments, end)):
            below += (self._moments[index] - moment) if running < workers else 0.0
            moment, running = self._moments[index], self._counts[index]
        return below + ((end - moment) if running < workers else 0.0)


def breakdown(views: Sequence[ViewTimes], workers: int) -> Optional[Breakdown]:
    """How the slowest complete views (not superseded before they ended) spent their time,
    on an engine of ``workers`` workers."""
    complete = []
    for own in _by_session(views):
        for view, newer in zip(own, [*own[1:], None]):
            ended = view.ended
            if ended is not None and (newer is None or ended <= newer.arrived):
                complete.append(view)
    if not complete:
        return None
    threshold = percentile([view.ended - view.arrived for view in complete], 95)
    slow = [view for view in complete if view.ended - view.arrived >= threshold]
    return Breakdown(
        len(complete), threshold * 1000, len(slow),
        server_ms=median((view.ended - view.arrived) * 1000 for view in slow),
        last_start_ms=median((max(started for _, started, _ in view.parts) - view.arrived) * 1000 for view in slow),
        longest_wait_ms=median(max(started - queued for queued, started, _ in view.parts) * 1000 for view in slow),
        unqueued_ms=median(max(ended - started for _, started, ended in view.parts) * 1000 for view in slow),
        free_worker_share=_free_worker_share(slow, _Running(views), workers))


def _free_worker_share(views: Sequence[ViewTimes], running: _Running, workers: int) -> float:
    waits = [(queued, started) for view in views for queued, started, _ in view.parts if started > queued]
    waited = sum(started - queued for queued, started in waits)
    return sum(running.seconds_below(queued, started, workers) for queued, started in waits) / waited if waited else 0.0



#: A view a user waited for, as the load generator saw it: ``(session, seq, sent, received)``,
#: the times on ``time.monotonic()``.
Waited = Tuple[str, str, float, float]


@attrs.frozen
class LatencySplit:
    """Where the slowest 5 % of the views users waited for spent their time, medians in ms.

    Attributes:
        views: the views users waited for that the server logged (in process only).
        user_ms: from the click to the view at the user.
        http_in_ms: from the click to the view reaching the engine: the load generator,
            the connection, uvicorn, the middleware, the handler.
        server_ms: from there to its last part's end (queueing and running).
        answer_ms: from there to the handler holding the results: the futures' way back
            to the event loop.
        http_out_ms: from there to the user: the JSON, the response, the load generator.
    """

    views: int
    user_ms: float
    http_in_ms: float
    server_ms: float
    answer_ms: float
    http_out_ms: float


def latency_split(views: Iterable[ViewTimes], waited: Iterable[Waited]) -> Optional[LatencySplit]:
    """Split the users' slowest 5 % of ``waited`` along the server's log of the same views
    (matched by session and ``seq``); ``None`` if the log has none of them (a daemon's journal)."""
    logged = {(view.session, view.seq): view for view in views if view.seq is not None and view.answered is not None}
    matched = [(sent, received, logged[session, seq]) for session, seq, sent, received in waited
               if (session, seq) in logged and logged[session, seq].ended is not None]
    if not matched:
        return None
    threshold = percentile([received - sent for sent, received, _ in matched], 95)
    slow = [(sent, received, view) for sent, received, view in matched if received - sent >= threshold]

    def ms(span: Callable[[float, float, ViewTimes], float]) -> float:
        return median(span(*entry) * 1000 for entry in slow)

    return LatencySplit(len(matched), ms(lambda sent, received, view: received - sent),
                        ms(lambda sent, received, view: view.arrived - sent),
                        ms(lambda sent, received, view: view.ended - view.arrived),
                        ms(lambda sent, received, view: view.answered - view.ended),
                        ms(lambda sent, received, view: received - view.answered))
