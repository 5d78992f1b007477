"""The daemon's metrics endpoint (``governor serve --metrics-addr``), on its event loop.

::

    scraper ── TCP ──> MetricsEndpoint._serve (one coroutine per connection, at most
                       MAX_HTTP_CONNECTIONS): the request's head within HEADER_TIMEOUT_S,
                       then ``GET /metrics`` answered with ``Daemon.prometheus_text()`` and closed

Why not ``prometheus_client.start_http_server``: it serves each connection on a thread of
its own and waits for a request's headers forever, so a thousand connections that never
finish a request hold a thousand threads and file descriptors until the daemon's own
clients are refused. Here a connection costs a coroutine; one that has not sent its head
in time, or one past the cap, is closed; a request body is never read (every answer closes
its connection). The limits apply to the status page's port too (``governor.service.web``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Awaitable, Callable, Optional, Set

log = logging.getLogger("governor.service.metrics_http")

#: How long a connection may take to send a request's head (request line and headers)
#: before it is closed: a scraper on this host or the next sends it in one packet, and a
#: connection that dawdles holds a descriptor meanwhile.
HEADER_TIMEOUT_S = 10.0

#: How long an answer may take to leave (the client reads it) before the connection is closed.
WRITE_TIMEOUT_S = 10.0

#: The most connections each HTTP port holds at once; the next is closed at once. Far more
#: than scrapers and open pages need, far below the daemon's 1,024 file descriptors.
MAX_HTTP_CONNECTIONS = 64

#: The largest request head read; a longer one is refused.
MAX_HEAD_BYTES = 16 << 10

_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsEndpoint:
    """``GET /metrics`` (and ``/``) on a bound socket, answered from ``text()``.

    Build it with :meth:`start`; everything here runs on the daemon's event loop.
    """

    def __init__(self, text: Callable[[], Awaitable[str]]):
        self._text = text
        self._server: Optional[asyncio.AbstractServer] = None
        self._open: Set[asyncio.StreamWriter] = set()

    @classmethod
    async def start(cls, sock: socket.socket, text: Callable[[], Awaitable[str]]) -> "MetricsEndpoint":
        """Serve on ``sock`` (bound, not yet listening)."""
        endpoint = cls(text)
        endpoint._server = await asyncio.start_server(endpoint._serve, sock=sock, limit=MAX_HEAD_BYTES)
        return endpoint

    @property
    def connections(self) -> int:
        """How many connections are open now."""
        return len(self._open)

    async def stop(self) -> None:
        """Stop listening and close every connection."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._open):
            writer.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._open) >= MAX_HTTP_CONNECTIONS:
            writer.transport.abort()
            return
        self._open.add(writer)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEADER_TIMEOUT_S)
            status, body = await self._answer(head)
            writer.transport.set_write_buffer_limits(0)  # drain() returns once all of it is with the kernel
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {_CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode("ascii") + body)
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
            writer.close()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.transport.abort()  # too slow, cut short, too long or gone: closed, unanswered
        finally:
            self._open.discard(writer)

    async def _answer(self, head: bytes) -> tuple:
        """``(status line, body)`` for a request's head."""
        method, _, rest = head.partition(b" ")
        target = rest.partition(b" ")[0].partition(b"?")[0]
        if method != b"GET":
            return "405 Method Not Allowed", b"only GET\n"
        if target not in (b"/", b"/metrics"):
            return "404 Not Found", b"try /metrics\n"
        return "200 OK", (await self._text()).encode("utf-8")
