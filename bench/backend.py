"""The reference backend: the seed's view switch as a real web app (Starlette on uvicorn).

Run it with ``uvicorn governor.bench.backend:app`` or ``python -m governor.bench.backend --port P``
(both need the ``web`` extra). Its routes:

* ``GET /view/{chat_id}?session=S&profile=P`` runs the view as one batch and answers JSON
  with each part's result and time and ``took_ms``. A newer view request of the same
  session supersedes it: its answer is HTTP 409 with a JSON reason (or nothing, if its
  client is gone). Profiles (:mod:`governor.bench.view_steps`): ``seed`` (117, 19, 9 ms),
  ``seed-753`` (twelve parts, 753 ms one after another) and ``real`` (``git status``,
  ``git branch`` on ``GOVERNOR_DEMO_REPO`` and the history of a chat store the app fills
  with 10,000 messages on first use).
* ``GET /chats/{chat_id}/digest?profile=P`` runs the same reads as a background job would
  (a digest, an index): at :data:`BACKGROUND_PRIORITY`, below the views'
  :data:`VIEW_PRIORITY`, so that a view's reads queued behind them start first; never
  superseded.
* ``POST /chats/{chat_id}/messages?profile=P`` with ``{"text": ...}`` saves a message in
  the critical lane.
* ``GET /`` a page that switches views like a front end: every click aborts the last fetch
  (``AbortController``) and shows the view it got.
* ``GET /stats`` the worker-seconds the steps have taken so far (the bench reads it).
* ``GET /views`` when each view request of a session arrived, when each of its parts was
  queued, started and ended, and when the engine answered (:class:`ViewLog`; the bench
  reads it; empty through a daemon, whose journal holds the parts' times).

The environment chooses the engine behind it:

* ``GOVERNOR_SOCKET`` set: a Governor daemon at that socket, through ``AsyncClient``
  (start it with ``governor serve --steps governor.bench.backend --workers 16``);
* else an in-process ``Supervisor`` with ``GOVERNOR_VIEW_WORKERS`` (16) pool workers,
  started in the app's lifespan;
* ``GOVERNOR_VIEW_ENGINE=before`` or ``naive-pool`` instead: the comparisons of the
  ``view-load`` bench, the seed's registry (every step of every request one after another,
  in one lane) and ``asyncio.gather`` over a ``ProcessPoolExecutor`` of as many workers
  (which cannot stop a step once it runs).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import attrs
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from governor import AsyncClient, Call
from governor.asgi import GovernorMiddleware, RequestGovernor, by_query, request_governor
from governor.bench import view_steps
from governor.steps.builtin import chat
from governor.bench.view_steps import PROFILES, registry  # noqa: F401  (registry: for `governor serve --steps`)

#: The engines the app can put behind its routes (``GOVERNOR_VIEW_ENGINE``).
ENGINES = ("governor", "before", "naive-pool")

#: Pool workers of the in-process engines (the seed asked for "10+ in parallel").
DEFAULT_WORKERS = 16

#: The ``real`` profile's chat store: this many messages, over this many chats.
REAL_MESSAGES, REAL_CHATS = 10_000, 10

#: Requests :attr:`GovernedViews.recent` keeps.
RECENT_REQUESTS = 64

#: View requests :class:`ViewLog` keeps: a bench run of 10 users for 15 s makes about 250.
VIEW_LOG_SIZE = 4096

#: Messages of one chat the ``real`` view shows.
HISTORY_LIMIT = 50

#: The pool-lane priorities (``Call.priority``) of a view's reads, which a person waits for,
#: and of background reads, which nobody watches: a view's reads start before background
#: reads queued up to ten seconds before them (a second of waiting counts as one step).
VIEW_PRIORITY, BACKGROUND_PRIORITY = 10, 0


#: One part's ``(queued, started, ended)`` on ``time.monotonic()``; ``None``: it never started, or runs on.
PartTimes = Tuple[float, Optional[float], Optional[float]]


@attrs.define
class LoggedView:
    """One view request in a :class:`ViewLog`; ``answered`` is set once the engine handed
    the handler its results (never, for a request superseded or left)."""

    session: Optional[str]
    seq: Optional[str]  # the user's click counter, which the load generator matches it by
    arrived: float
    parts: Callable[[], List[PartTimes]]
    answered: Optional[float] = None

    def record(self) -> Dict[str, Any]:
        return {"session": self.session, "seq": self.seq, "arrived": self.arrived, "answered": self.answered,
                "parts": [list(times) for times in self.parts()]}


class ViewLog:
    """The view requests of sessions a server took: when each arrived, when its parts ran and
    when the engine answered.

    The bench reads it (``GET /views``) to tell where a slow view lost its time and how much
    work ran on a view after the session's next request had superseded it. Times are
    ``time.monotonic()`` values, one clock for every process of the machine on Linux.
    """

    def __init__(self) -> None:
        self._views: Deque[LoggedView] = collections.deque(maxlen=VIEW_LOG_SIZE)

    def add(self, request: Request, arrived: float, parts: Callable[[], List[PartTimes]]) -> LoggedView:
        """Log a view request (if it has a session) whose parts' times ``parts()`` reads when asked."""
        view = LoggedView(request.query_params.get("session"), request.query_params.get("seq"), arrived, parts)
        if view.session is not None and request.url.path.startswith("/view/"):
            self._views.append(view)
        return view

    def records(self) -> List[Dict[str, Any]]:
        """``[{"session", "seq", "arrived", "answered", "parts": [[queued, started, ended], ...]}, ...]`` by arrival."""
        return [view.record() for view in list(self._views)]


class Views:
    """What the routes need from an engine: run a view's calls, save a message, count busy time."""

    middleware: List[Middleware] = []

    def __init__(self) -> None:
        self.log = ViewLog()

    async def start(self) -> None:
        """Start the engine (in the app's lifespan)."""

    async def stop(self) -> None:
        """Stop it."""

    async def run(self, request: Request, calls: List[Tuple[str, dict]], priority: int = 0) -> List[Any]:
        """Run the calls at once and return their results in order; ``priority`` ranks the
        pool-lane ones in the queue (engines without priorities ignore it)."""
        raise NotImplementedError

    async def worker_seconds(self) -> float:
        """Seconds the steps have run in workers so far, whoever waited for them."""
        raise NotImplementedError


class GovernedViews(Views):
    """Governor: each request's steps in a scope; a newer view of the session supersedes it."""

    def __init__(self, socket: Optional[str], workers: int):
        super().__init__()
        if socket:
            self.governor: Any = AsyncClient(socket)
        else:
            from governor import Supervisor

            self.governor = Supervisor(registry, workers=workers)
        self.middleware = [Middleware(GovernorMiddleware, governor=self.governor,
                                      supersede=by_query("session", prefix="/view/", order="seq"))]
        #: The latest requests' governors, newest last (tests read how their steps ended).
        self.recent: Deque[RequestGovernor] = collections.deque(maxlen=RECENT_REQUESTS)

    async def run(self, request: Request, calls: List[Tuple[str, dict]], priority: int = 0) -> List[Any]:
        governed = request_governor(request.scope)
        self.recent.append(governed)
        calls = [Call(name, kwargs=kwargs, priority=priority) for name, kwargs in calls]
        if isinstance(self.governor, AsyncClient):  # through a daemon, its journal has the times
            return await governed.run_batch(calls)
        logged = self.log.add(request, time.monotonic(), lambda: [
            (future.task.submitted_at, future.task.started_at, future.task.ended_at) for future in governed.futures])
        results = await governed.run_batch(calls)
        logged.answered = time.monotonic()
        return results

    async def worker_seconds(self) -> float:
        if hasattr(self.governor, "scope"):
            metrics = await asyncio.to_thread(self.governor.metrics)
        else:
            metrics = await self.governor.metrics()
        return _duration_sum(metrics)


class PoolViews(Views):
    """An executor the routes submit every step to, one by one: the naive pool, or the seed's one lane."""

    def __init__(self, make_executor):
        super().__init__()
        self._make_executor = make_executor
        self._executor: Optional[concurrent.futures.Executor] = None
        self._lock = threading.Lock()
        self._busy_s = 0.0

    async def start(self) -> None:
        self._executor = self._make_executor()

    async def stop(self) -> None:
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    async def run(self, request: Request, calls: List[Tuple[str, dict]], priority: int = 0) -> List[Any]:
        queued = time.monotonic()
        futures = [self._executor.submit(view_steps.run_step, name, kwargs) for name, kwargs in calls]
        parts: List[PartTimes] = []  # appended by the executor's threads, read once the parts ended
        logged = self.log.add(request, queued, lambda: list(parts))
        for future in futures:
            future.add_done_callback(self._count)
            future.add_done_callback(lambda done: parts.append(_part_times(queued, done)))
        results = await asyncio.gather(*map(asyncio.wrap_future, futures))
        logged.answered = time.monotonic()
        return results

    def _count(self, future: concurrent.futures.Future) -> None:
        if not future.cancelled() and future.exception() is None:
            with self._lock:  # executor threads call this
                self._busy_s += future.result().get("ms", 0.0) / 1000

    async def worker_seconds(self) -> float:
        with self._lock:
            return self._busy_s


def _part_times(queued: float, future: concurrent.futures.Future) -> PartTimes:
    """A pool part's times: it ended now, after running the ``ms`` its result reports."""
    ended = time.monotonic()
    if future.cancelled() or future.exception() is not None:
        return queued, None, None
    return queued, ended - future.result().get("ms", 0.0) / 1000, ended


def _duration_sum(metrics: Dict[str, Any]) -> float:
    """The summed run time of every step in a metrics snapshot (``timings`` by lane and step)."""
    return sum(figures["duration_seconds"]["sum"]
               for steps in metrics["timings"].values() for figures in steps.values())


def views_from_environment() -> Views:
    """The engine the environment asks for (see the module docstring)."""
    engine = os.environ.get("GOVERNOR_VIEW_ENGINE", "governor")
    workers = int(os.environ.get("GOVERNOR_VIEW_WORKERS", DEFAULT_WORKERS))
    if engine == "governor":
        return GovernedViews(os.environ.get("GOVERNOR_SOCKET"), workers)
    if engine == "naive-pool":
        return PoolViews(lambda: concurrent.futures.ProcessPoolExecutor(workers))
    if engine == "before":
        return PoolViews(lambda: concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="seed-registry"))
    raise ValueError(f"GOVERNOR_VIEW_ENGINE must be one of {', '.join(ENGINES)}, got {engine!r}")


class RealData:
    """The ``real`` profile's repository and chat store (filled on first use)."""

    def __init__(self) -> None:
        self.repo = os.environ.get("GOVERNOR_DEMO_REPO", os.getcwd())
        # The state directory by default: the one place chat steps accept a store without configuration.
        self.store = os.environ.get("GOVERNOR_CHAT_STORE") or str(chat.state_dir() / "backend-chat.sqlite3")
        self._ready = threading.Lock()
        self._chat_ids: List[int] = []

    def chat_ids(self) -> List[int]:
        """The store's chats, creating them and their messages the first time."""
        with self._ready:
            if not self._chat_ids:
                self._chat_ids = _fill_store(self.store)
            return self._chat_ids


def _fill_store(store: str) -> List[int]:
    """Create :data:`REAL_CHATS` chats holding :data:`REAL_MESSAGES` messages, unless the store has them."""
    if Path(store).exists():
        with contextlib.closing(sqlite3.connect(store)) as connection:
            ids = [row[0] for row in connection.execute("SELECT id FROM chats ORDER BY id")]
            if len(ids) >= REAL_CHATS:
                return ids[:REAL_CHATS]
    ids = [chat.create(f"chat {number}", store=store) for number in range(1, REAL_CHATS + 1)]
    rows = [(ids[index % REAL_CHATS], "user" if index % 2 else "assistant", f"message {index}: " + "lorem ipsum " * 8)
            for index in range(REAL_MESSAGES)]
    # One transaction: chat.send_message commits per message, 10,000 times over.
    with contextlib.closing(sqlite3.connect(store)) as connection, connection:
        connection.executemany("INSERT INTO messages(chat_id, author, text, created_at) "
                               "VALUES (?, ?, ?, datetime('now'))", rows)
    return ids


def view_calls(profile: str, chat_id: int, real: RealData) -> List[Tuple[str, dict]]:
    """The calls of one view of ``chat_id`` in ``profile``."""
    if profile in view_steps.WAIT_PROFILES:
        return view_steps.wait_calls(profile)
    chats = real.chat_ids()
    store_chat = chats[chat_id % len(chats)]
    return [("view.builtin", {"step": "chat.history", "kwargs": {"chat_id": store_chat, "limit": HISTORY_LIMIT,
                                                                  "store": real.store}}),
            ("view.builtin", {"step": "git.status", "kwargs": {"repo": real.repo}}),
            ("view.builtin", {"step": "git.current_branch", "kwargs": {"repo": real.repo}})]


def create_app(views: Optional[Views] = None) -> Starlette:
    """The reference backend over ``views`` (default: :func:`views_from_environment`)."""
    views = views_from_environment() if views is None else views
    real = RealData()

    async def view(request: Request) -> JSONResponse:
        profile = request.query_params.get("profile", "seed")
        if profile not in PROFILES:
            return JSONResponse({"error": f"profile must be one of {', '.join(PROFILES)}"}, status_code=400)
        chat_id = request.path_params["chat_id"]
        started = time.monotonic()
        if profile == "real":
            await asyncio.to_thread(real.chat_ids)  # fills the store on first use
        calls = view_calls(profile, chat_id, real)
        parts = await views.run(request, calls, VIEW_PRIORITY if request.url.path.startswith("/view/")
                                else BACKGROUND_PRIORITY)
        return JSONResponse({"chat_id": chat_id, "session": request.query_params.get("session"), "profile": profile,
                             "parts": parts, "took_ms": (time.monotonic() - started) * 1000})

    async def post_message(request: Request) -> JSONResponse:
        text = str((await request.json()).get("text", ""))
        chat_id = request.path_params["chat_id"]
        if request.query_params.get("profile", "seed") == "real":
            chats = await asyncio.to_thread(real.chat_ids)
            call = ("view.save_message", {"chat_id": chats[chat_id % len(chats)], "text": text, "store": real.store})
        else:
            call = ("view.post", {"chat_id": chat_id, "text": text})
        [saved] = await views.run(request, [call])
        return JSONResponse({"saved": saved}, status_code=201)

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse({"worker_seconds": await views.worker_seconds(), "pid": os.getpid()})

    async def view_log(request: Request) -> JSONResponse:
        return JSONResponse({"views": views.log.records()})

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(PAGE)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await views.start()
        try:
            yield
        finally:
            await views.stop()

    return Starlette(routes=[Route("/", page), Route("/view/{chat_id:int}", view),
                             Route("/chats/{chat_id:int}/digest", view),
                             Route("/chats/{chat_id:int}/messages", post_message, methods=["POST"]),
                             Route("/stats", stats), Route("/views", view_log)],
                     middleware=views.middleware, lifespan=lifespan)


#: The front end: five chats; a click aborts the view in flight and fetches the new one.
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Governor: view switching</title>
<style>body{font:15px system-ui;margin:2em}button{margin:0 .3em .3em 0}#view{margin-top:1em;white-space:pre}</style>
</head><body>
<h1>Chats</h1>
<div id="chats"></div>
<div id="view" data-chat="">Pick a chat.</div>
<script>
const params = new URLSearchParams(location.search);
const session = params.get("session") || crypto.randomUUID();
const profile = params.get("profile") || "seed";
const view = document.getElementById("view");
window.clicks = []; window.painted = null; window.aborted = 0;
let inFlight = null, seq = 0;
async function show(chat) {
  window.clicks.push({chat, at: performance.now()});
  seq++;  // orders the clicks for the server, whichever of its processes each reaches first
  if (inFlight) { inFlight.abort(); window.aborted++; }
  const controller = inFlight = new AbortController();
  try {
    const response = await fetch(`/view/${chat}?session=${session}&profile=${profile}&seq=${seq}`, {signal: controller.signal});
    if (response.status === 409) return;          // a newer click superseded it
    const body = await response.json();
    view.dataset.chat = String(chat);
    view.textContent = `chat ${chat} (${body.took_ms.toFixed(0)} ms)\\n` +
      body.parts.map(p => `${p.part}: ${p.ms.toFixed(0)} ms`).join("\\n");
    requestAnimationFrame(() => { window.painted = {chat, at: performance.now()}; });
  } catch (error) {
    if (error.name !== "AbortError") view.textContent = `error: ${error}`;
  } finally {
    if (inFlight === controller) inFlight = null;
  }
}
for (let chat = 1; chat <= 5; chat++) {
  const button = document.createElement("button");
  button.id = `chat-${chat}`; button.textContent = `Chat ${chat}`;
  button.onclick = () => show(chat);
  document.getElementById("chats").append(button);
}
</script></body></html>
"""


def __getattr__(name: str) -> Any:
    # Built on first access (uvicorn's ``module:app``): importing the module for its
    # registry (``governor serve --steps``) must not build an engine.
    if name == "app":
        global app
        app = create_app()
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: Optional[List[str]] = None) -> None:
    """``python -m governor.bench.backend --port P [--host H]``."""
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    options = parser.parse_args(argv)
    uvicorn.run(create_app(), host=options.host, port=options.port, log_level="warning")


if __name__ == "__main__":
    main()
