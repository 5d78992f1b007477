"""The daemon's live status page (``governor serve --http-addr``), served by aiohttp on its event loop.

Routes (every one behind the token, see below)::

    GET  /                 the page (governor/web_static/index.html, app.js, style.css; no CDN)
    GET  /static/NAME      its assets
    GET  /api/live         the snapshot the page draws (governor.service.live), as JSON
    GET  /api/events       the same, pushed as server-sent events every REFRESH_S
    GET  /metrics          the supervisor's figures in the Prometheus text format
    POST /api/cancel       {"task_ids": [..]}: only with --http-allow-cancel, else 403

Data flow: one publisher task builds a snapshot every REFRESH_S while at least one page
listens (``Daemon.live_snapshot``: the supervisor's metrics and workers, the journal's recent
tasks, the live model's ring) and wakes every event stream with the same JSON, so ten open
pages cost the daemon what one does.

Security: a loopback port has no peer-credential check and the page shows what steps run,
so every request for data must carry the per-daemon token: ``?token=`` or ``Authorization:
Bearer``. Anything else is 403. The page itself and its assets hold no data and are served
to anyone; its script takes the token from the address it was opened with (the URL printed
at start, or one with a fresh token from ``governor page``, for the daemon's own user),
keeps it in the tab's ``sessionStorage`` and drops it from the address bar. Never a cookie:
cookies ignore ports, so the browser would send it to every other server on the host. The
page is read-only unless the daemon was started with ``--http-allow-cancel``; a cancel must
be a same-origin JSON POST with the token in its header. Errors are 4xx, or a plain 500
that names no internals; a traceback goes to the daemon's log only.

Limits: each connection must send a request's head within ``HEADER_TIMEOUT_S`` (and its
body, a cancel's, in as long again), and the port holds at most ``MAX_HTTP_CONNECTIONS``
(``governor.service.metrics_http``); past that a connection is closed as it opens.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import logging
import secrets
from pathlib import Path
from typing import Any, Deque, Optional

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from governor.errors import DaemonError, GovernorError
from governor.service.live import HttpConfig
from governor.service.metrics_http import HEADER_TIMEOUT_S, MAX_HTTP_CONNECTIONS

log = logging.getLogger("governor.service.web")

#: How often the page is refreshed: several times a second looks live; each refresh costs
#: the manager one describe round trip and the journal one small query.
REFRESH_S = 0.5

#: Tokens ``governor page`` minted that still open the page (the oldest goes first): one per
#: time someone asked, kept few so a forgotten one does not stay valid for long.
MAX_MINTED_TOKENS = 16

#: The largest request body accepted (a cancel of many ids fits easily).
MAX_BODY_BYTES = 64 << 10

STATIC = Path(__file__).parent / "web_static"

#: Sent with every response: no inline script or style, no third-party anything, no token
#: leaking through a Referer, nothing cached.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class _MalformedRequestsInOneLine(logging.Filter):
    """aiohttp logs each malformed request (bad framing, a line too long) at ERROR with a
    traceback of its parser. The client got its 400; the daemon's log gets one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            record.msg, record.args = "malformed HTTP request refused (400): %s", (error.message,)
            record.exc_info, record.exc_text, record.levelno, record.levelname = None, None, logging.INFO, "INFO"
        return True


_ONE_LINE = _MalformedRequestsInOneLine()


class StatusPage:
    """The HTTP side of one daemon: its aiohttp runner, token and snapshot publisher.

    Build it with :meth:`start`; everything here runs on the daemon's event loop.
    """

    def __init__(self, daemon: Any, config: HttpConfig):
        self._daemon, self.config = daemon, config
        self.token = config.token or secrets.token_urlsafe(32)
        self._minted: Deque[str] = collections.deque(maxlen=MAX_MINTED_TOKENS)  # by mint_url, newest last
        self._base = ""  # http://host:port
        self._runner: Optional[web.AppRunner] = None
        self.url = ""  # the address actually bound, with the token: what to open
        self._latest: Optional[str] = None
        self._tick = asyncio.Event()
        self._listeners = 0
        self._publisher: Optional[asyncio.Task] = None
        self._closing = False

    @classmethod
    async def start(cls, daemon: Any, config: HttpConfig) -> "StatusPage":
        """Bind ``config``'s address and serve; log the URL (with its token) to open."""
        page = cls(daemon, config)
        app = web.Application(middlewares=[page._guard], client_max_size=MAX_BODY_BYTES)
        app.router.add_get("/", page._index)
        app.router.add_static("/static/", STATIC, show_index=False, follow_symlinks=False)
        app.router.add_get("/api/live", page._live)
        app.router.add_get("/api/events", page._events)
        app.router.add_get("/metrics", page._metrics)
        app.router.add_post("/api/cancel", page._cancel)
        logging.getLogger("aiohttp.server").addFilter(_ONE_LINE)
        # keepalive_timeout also closes a connection that has not sent a request's head in
        # that time (aiohttp arms it as the connection opens, and again after each request).
        page._runner = _CappedRunner(app, access_log=None, handle_signals=False, keepalive_timeout=HEADER_TIMEOUT_S)
        await page._runner.setup()
        site = web.TCPSite(page._runner, config.host, config.port)
        try:
            await site.start()
        except OSError as error:  # in use, not an address of this host: say so, no traceback
            await page._runner.cleanup()
            raise DaemonError(f"cannot serve the status page on {config.host}:{config.port}: "
                              f"{error.strerror or error}") from None
        host, port = page._runner.addresses[0][:2]
        shown = f"[{host}]" if ":" in host else host
        page._base = f"http://{shown}:{port}"
        page.url = f"{page._base}/?token={page.token}"
        log.info("status page on %s%s", page.url, "" if config.allow_cancel else " (read-only)")
        return page

    async def stop(self) -> None:
        """Close the event streams and the listener."""
        self._closing = True
        self._tick.set()  # every event stream wakes and ends
        if self._publisher is not None:
            self._publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._publisher
        if self._runner is not None:
            await self._runner.cleanup()
        logging.getLogger("aiohttp.server").removeFilter(_ONE_LINE)

    # ----------------------------------------------------------------- the guard

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        # The page and its assets hold no data (they are this package's files): they are
        # served to anyone, and the page's script carries the token from there.
        if not (request.path == "/" or request.path.startswith("/static/")):
            offered = request.query.get("token")
            if offered is None:
                bearer = request.headers.get("Authorization", "")
                offered = bearer[len("Bearer "):] if bearer.startswith("Bearer ") else ""
            if not self._is_token(offered):
                return _refusal(403, "this page needs the token printed when the daemon started (?token=...)")
        try:
            response = await handler(request)
        except web.HTTPException as http_error:  # 404, 405, 413 ...: aiohttp's own 4xx
            response = _refusal(http_error.status, http_error.reason)
        except Exception:  # a fault of ours: logged in full here, a bare 500 out there
            log.exception("status page request %s %s failed", request.method, request.path)
            response = _refusal(500, "internal error (see the daemon's log)")
        if not response.prepared:
            response.headers.update(SECURITY_HEADERS)
        return response

    def _is_token(self, offered: str) -> bool:
        # Every token compared, the same work whichever matches: no timing says which.
        matches = [hmac.compare_digest(offered.encode(), token.encode()) for token in (self.token, *self._minted)]
        return any(matches)

    def mint_url(self) -> str:
        """The page's URL with a fresh token (``governor page``): it opens the page, as the printed one does.

        The last :data:`MAX_MINTED_TOKENS` stay valid until the daemon stops.
        """
        token = secrets.token_urlsafe(32)
        self._minted.append(token)
        return f"{self._base}/?token={token}"

    # ----------------------------------------------------------------- routes

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Content-Type": "text/html; charset=utf-8"})

    async def _live(self, request: web.Request) -> web.Response:
        return web.json_response(await self._snapshot())

    async def _snapshot(self) -> dict:
        return {**await self._daemon.live_snapshot(), "can_cancel": self.config.allow_cancel}

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=await self._daemon.prometheus_text(), content_type="text/plain", charset="utf-8",
                            headers={"X-Prometheus-Format": "0.0.4"})

    async def _events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={**SECURITY_HEADERS, "Content-Type": "text/event-stream"})
        await response.prepare(request)
        self._listeners += 1
        if self._publisher is None or self._publisher.done():
            self._publisher = asyncio.get_running_loop().create_task(self._publish())
        try:
            if self._latest is not None:
                await response.write(_event(self._latest))
            while not self._closing:
                tick = self._tick
                await tick.wait()
                if self._closing:
                    break
                await response.write(_event(self._latest))
        except ConnectionError:
            pass  # the page was closed
        finally:
            self._listeners -= 1
        return response

    async def _publish(self) -> None:
        """Build one snapshot per REFRESH_S while anyone listens, and wake every stream with it."""
        while self._listeners > 0 and not self._closing:
            try:
                self._latest = json.dumps(await self._snapshot(), allow_nan=False)
            except Exception:  # the daemon may be stopping; the page says "reconnecting" meanwhile
                log.exception("could not build the live snapshot")
            else:
                tick, self._tick = self._tick, asyncio.Event()
                tick.set()
            await asyncio.sleep(REFRESH_S)

    async def _cancel(self, request: web.Request) -> web.Response:
        if not self.config.allow_cancel:
            return _refusal(403, "read-only: start the daemon with --http-allow-cancel to cancel from the page")
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            return _refusal(403, "cross-origin cancel refused")
        if request.content_type != "application/json":
            return _refusal(415, "send JSON: {\"task_ids\": [1, 2]}")
        try:
            body = await asyncio.wait_for(request.json(), HEADER_TIMEOUT_S)
            task_ids = body["task_ids"]
            return web.json_response(await self._daemon.cancel_tasks(task_ids))
        except (ValueError, TypeError, KeyError, GovernorError) as bad:  # bad JSON or ids: ProtocolError
            return _refusal(400, f"expected {{\"task_ids\": [1, 2]}}: {bad}")
        except asyncio.TimeoutError:
            return _refusal(408, "the request's body did not come in time")


class _CappedRunner(web.AppRunner):
    """An ``AppRunner`` whose server holds at most :data:`MAX_HTTP_CONNECTIONS` connections:
    the next one is closed as it opens, before aiohttp reads a byte of it."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _CappedServer  # the application's own server, with the cap (no state added)
        return server


class _CappedServer(web.Server):
    """aiohttp's ``web.Server``, refusing connections past the cap.

    Decided as each connection is made, not as its protocol is built: asyncio builds the
    protocols of a whole batch of accepted connections before it makes any of them.
    """

    def connection_made(self, handler: Any, transport: asyncio.Transport) -> None:
        if len(self._connections) >= MAX_HTTP_CONNECTIONS:
            transport.abort()  # the handler hears connection_lost, and was never counted
            return
        super().connection_made(handler, transport)


def _event(data: Optional[str]) -> bytes:
    return f"data: {data}\n\n".encode() if data is not None else b": waiting for the first snapshot\n\n"


def _refusal(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=SECURITY_HEADERS)
