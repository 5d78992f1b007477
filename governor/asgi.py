"""Governor behind a web app: request-scoped steps for any ASGI framework (Starlette, FastAPI).

::

    supervisor = Supervisor(registry, workers=16)        # or AsyncClient() for a daemon
    app = Starlette(routes=[Route("/view/{chat}", view)],
                    middleware=[Middleware(GovernorMiddleware, governor=supervisor,
                                           supersede=by_query("session", prefix="/view/"))])

    async def view(request):
        outcomes = await request_governor(request.scope).run_batch(calls)

The data flow of one request::

    client --HTTP--> uvicorn --receive/send--> GovernorMiddleware --> the app's handler
                                                |  watches receive()      | run_batch(calls)
                                                |  for http.disconnect    v
                                                '------------------> RequestGovernor
                                                     cancel()           |  a Supervisor.scope(key)
                                                                        |  or AsyncClient(key=...)
                                                                        v
                                                               worker processes

* The middleware gives every HTTP request a :class:`RequestGovernor` (``scope["governor"]``)
  and runs the app in a task of its own while it reads ``receive()`` beside it. When the
  client goes away (``http.disconnect`` before the response ended), it cancels the
  request's steps (queued ones never start, running ones get the cooperative cancel, then
  the kill) and the handler's task. Starlette's ``BaseHTTPMiddleware`` hides that message
  from what runs behind it, which is why this is a plain ASGI middleware.
* With a supersede key (``supersede(scope)`` returns one, e.g. ``"view:<session>"``), a
  newer request with the same key cancels the older request's unfinished steps; the older
  request's :meth:`RequestGovernor.run_batch` raises :class:`RequestSuperseded`, which the
  middleware answers with HTTP 409 and a JSON reason at once (its running steps go on
  stopping). Which request is newer is their arrival order, unless ``supersede`` returns
  ``(key, order)``: behind several server processes two clicks may reach the governor out
  of order, and the one with the lower order (e.g. the page's click counter, see
  :func:`by_query`) is then the one superseded, even if it came last.
* ``governor`` is an in-process :class:`~governor.Supervisor` (the middleware starts it in
  the app's lifespan, off the event loop, and shuts it down at the end) or an
  :class:`~governor.AsyncClient` of a daemon (closed at the end), which lets several
  server processes (``uvicorn --workers N``) share one governor and its one critical lane.

The middleware reads the request body ahead for the app (so it can see a disconnect while
the app works): it suits requests with small bodies, which a view switch has. This module
imports no engine module: the Supervisor is the caller's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.parse
from typing import Any, Awaitable, Callable, Iterable, List, MutableMapping, Optional, Tuple, Union

from governor import aio
from governor.client.async_client import AsyncClient
from governor.errors import RequestSuperseded, StepCancelled
from governor.protocol.decoders import MAX_ORDER
from governor.task import Call, CancelRequest

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: Where the middleware puts the request's :class:`RequestGovernor` in the ASGI scope.
SCOPE_KEY = "governor"

#: The detail a disconnect's cancel carries (it reaches ``StepCancelled`` and the logs).
DISCONNECT_DETAIL = "the HTTP client disconnected"

#: The status a superseded request is answered with: the request conflicts with a newer one.
SUPERSEDED_STATUS = 409


class RequestGovernor:
    """The steps of one HTTP request: run them, and stop them all when the request ends early.

    Made by :class:`GovernorMiddleware` per request; read it with :func:`request_governor`.

    Attributes:
        key: the request's supersede key, if any.
        order: where it stands among the key's requests (None: by arrival).
        futures: in process, the ``TaskFuture`` of every step submitted so far (their
            ``task`` says how each ended and whether it ever started); through a daemon,
            empty (its journal holds the tasks).
    """

    def __init__(self, governor: Any, key: Optional[str], order: Optional[int] = None):
        self.key = key
        self.order = order
        self._client = governor if isinstance(governor, AsyncClient) else None
        # In process, the scope is taken now, at the request's start: taking a key cancels
        # the previous holder's steps at once, before this request submits any.
        self._scope = None if self._client is not None else governor.scope(key=key, order=order)
        self._cancel_detail: Optional[str] = None
        self.futures: List[Any] = []

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called (the client went away)."""
        return self._cancel_detail is not None

    async def run_batch(self, calls: Iterable[Any], *, return_exceptions: bool = False) -> List[Any]:
        """Run the calls at once (each in its lane) and return their results in order.

        Args:
            calls: ``Call`` objects, names, ``(name, kwargs)`` or ``(name, args, kwargs)``
                (keyword parameters only through a daemon).
            return_exceptions: put each failed step's error in its place instead of
                raising the first.

        Raises:
            RequestSuperseded: a newer request took this one's supersede key (whatever
                ``return_exceptions`` says: the batch's answer is no longer wanted).
            the first failed step's error, unless ``return_exceptions``.
        """
        calls = [Call.of(item) for item in calls]
        if self._client is not None:
            outcomes = await self._client.run_batch(calls, return_exceptions=True, key=self.key, order=self.order)
        else:
            futures = [self._scope.submit_call(call) for call in calls]
            self.futures.extend(futures)
            outcomes = await self._outcomes_until_superseded(futures)
        superseded = next((outcome for outcome in outcomes
                           if isinstance(outcome, StepCancelled) and outcome.reason == "superseded"), None)
        if superseded is not None:
            raise RequestSuperseded(self.key, superseded.detail)
        if not return_exceptions:
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
        return outcomes

    async def _outcomes_until_superseded(self, futures: List[Any]) -> List[Any]:
        """The futures' outcomes, or at once when a newer request supersedes this one.

        A superseded request's answer (409) is owed now: its running steps may take their
        cancel grace to stop, and nobody waits for them. They go on stopping on their own.
        """
        loop = asyncio.get_running_loop()
        superseded: asyncio.Future = loop.create_future()

        def on_cancel(request: CancelRequest) -> None:  # on the cancelling thread: a newer request's
            if request.reason == "superseded":
                with contextlib.suppress(RuntimeError):  # this request's loop is closed: nobody waits
                    loop.call_soon_threadsafe(_settle, superseded, request.detail)

        self._scope.on_cancel(on_cancel)
        gathering = asyncio.ensure_future(asyncio.gather(*map(aio.result, futures), return_exceptions=True))
        try:
            done, _ = await asyncio.wait((gathering, superseded), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not gathering.done():
                gathering.cancel()
                # Nobody reads its end; unread, asyncio logs it when it is collected.
                gathering.add_done_callback(_consume)
        if gathering not in done:
            raise RequestSuperseded(self.key, superseded.result())
        superseded.cancel()
        return gathering.result()

    def cancel(self, detail: str) -> None:
        """Stop every step of the request (in process; through a daemon, cancelling the
        handler's task cancels what it awaits)."""
        self._cancel_detail = detail
        if self._scope is not None:
            self._scope.cancel(detail)


def request_governor(scope: Scope) -> RequestGovernor:
    """The :class:`RequestGovernor` of the request whose ASGI ``scope`` this is.

    Raises:
        LookupError: the app is not wrapped in :class:`GovernorMiddleware`.
    """
    try:
        return scope[SCOPE_KEY]
    except KeyError:
        raise LookupError("no Governor in this request: wrap the app in governor.asgi.GovernorMiddleware") from None


SupersedeRule = Callable[[Scope], Union[None, str, Tuple[str, Optional[int]]]]

#: The digits of the largest order (2**53): a longer query value is no order, and is never
#: handed to ``int()`` (whose work grows with the digits).
_ORDER_DIGITS = len(str(MAX_ORDER))


def _order_of(text: str) -> Optional[int]:
    """``text`` as an order (ASCII digits, 0 to 2**53), else ``None``: arrival order."""
    if not (0 < len(text) <= _ORDER_DIGITS and text.isascii() and text.isdigit()):
        return None
    number = int(text)
    return number if number <= MAX_ORDER else None


def by_query(parameter: str, *, prefix: str = "/", order: Optional[str] = None) -> SupersedeRule:
    """A supersede rule: requests under ``prefix`` with the same ``parameter`` supersede each other.

    ``by_query("session", prefix="/view/")`` keys ``GET /view/7?session=ann`` as
    ``"/view/ ann"``; a request without the parameter has no key. With ``order="seq"``,
    ``GET /view/7?session=ann&seq=12`` is also ordered 12 among Ann's views (a whole number
    from 0 to 2**53, e.g. a click counter or ``Date.now()``; anything else orders by arrival).
    """

    def key(scope: Scope) -> Union[None, str, Tuple[str, Optional[int]]]:
        if not scope["path"].startswith(prefix):
            return None
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
        values = query.get(parameter)
        if not values:
            return None
        if order is None:
            return f"{prefix} {values[-1]}"
        return f"{prefix} {values[-1]}", _order_of(query.get(order, [""])[-1])

    return key


class GovernorMiddleware:
    """ASGI middleware: a :class:`RequestGovernor` per HTTP request, cancelled on disconnect.

    Args:
        app: the ASGI application.
        governor: a :class:`~governor.Supervisor` (started and shut down in the lifespan)
            or an :class:`~governor.AsyncClient` (closed in the lifespan).
        supersede: ``scope -> key``, ``(key, order)`` or ``None``; requests with the same
            key supersede each other, the lower order or else the earlier arrival giving
            way (see :func:`by_query`).
    """

    def __init__(self, app: Callable, *, governor: Any, supersede: Optional[SupersedeRule] = None):
        self.app = app
        self.governor = governor
        self.supersede = supersede

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, self._starting(receive), self._stopping(send))
        elif scope["type"] == "http":
            await self._request(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    # ----------------------------------------------------------------- lifespan

    def _starting(self, receive: Receive) -> Receive:
        async def starting() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup" and not isinstance(self.governor, AsyncClient):
                await asyncio.to_thread(self.governor.start)  # seconds of forking: off the loop
            return message
        return starting

    def _stopping(self, send: Send) -> Send:
        async def stopping(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":  # the app is done with it
                if isinstance(self.governor, AsyncClient):
                    await self.governor.close()
                else:
                    await asyncio.to_thread(self.governor.shutdown, wait=True, cancel_futures=True,
                                            cancel_running=True)
            await send(message)
        return stopping

    # ----------------------------------------------------------------- a request

    async def _request(self, scope: Scope, receive: Receive, send: Send) -> None:
        rule = self.supersede(scope) if self.supersede else None
        key, order = rule if isinstance(rule, tuple) else (rule, None)
        request = RequestGovernor(self.governor, key, order)
        scope[SCOPE_KEY] = request
        response = _ResponseWatch(send)
        inbox: asyncio.Queue = asyncio.Queue()
        handler = asyncio.create_task(self.app(scope, inbox.get, response.send))
        listener = asyncio.create_task(_until_disconnect(receive, inbox))
        try:
            await asyncio.wait((handler, listener), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the server cancelled us: take the handler with us
            handler.cancel()
            listener.cancel()
            raise
        if not handler.done() and not response.complete:  # the client left mid-request
            request.cancel(DISCONNECT_DETAIL)
            handler.cancel()
        try:
            await handler
        except asyncio.CancelledError:
            if not request.cancelled:
                raise
        except RequestSuperseded as superseded:
            if response.started or request.cancelled:
                return
            await _answer_superseded(send, superseded)
        finally:
            listener.cancel()


class _ResponseWatch:
    """Forwards the app's ``send`` and remembers how far the response got."""

    def __init__(self, send: Send):
        self._send = send
        self.started = False
        self.complete = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.complete = True
        await self._send(message)


def _consume(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _settle(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


async def _until_disconnect(receive: Receive, inbox: asyncio.Queue) -> None:
    """Pass the request's messages to the app until the client disconnects, then return."""
    while True:
        message = await receive()
        inbox.put_nowait(message)
        if message["type"] == "http.disconnect":
            return


async def _answer_superseded(send: Send, superseded: RequestSuperseded) -> None:
    body = json.dumps({"error": "superseded", "key": superseded.key, "detail": str(superseded)}).encode()
    await send({"type": "http.response.start", "status": SUPERSEDED_STATUS,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
