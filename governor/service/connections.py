"""The daemon's client connections: requests read as they come, replies owed, and idleness.

Data flow, on the daemon's loop thread only::

    socket bytes ──> Connection.feed: FrameDecoder ──> each whole frame: a request handler task
                     (at most MAX_REQUESTS_IN_FLIGHT at once; the reader waits for room)
    handler ──> Connection.send(reply)          replies go out in the order they are ready,
                                                 each carrying its request's id
    task ends ──> Waiter.one_done ──> send(final reply)
    send ──> the connection's outbox ──> one write per connection per turn of the loop

A client may send many requests without waiting for replies (pipelining): the daemon reads
every frame the socket holds in one go and starts a handler for each, so the submissions
of one client share the loop's next group commit instead of taking one commit each. The
handlers of one connection start in arrival order and reach the journal in that order, so
a client's critical steps keep the order it sent them in.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Dict, List, Optional, Set

import attrs

from governor import protocol
from governor.engine import gilio

log = logging.getLogger("governor.service.daemon")

#: How much a connection may have waiting to be sent before the daemon gives up on it: a
#: client that stops reading must not make the daemon buffer without bound.
MAX_CLIENT_BACKLOG_BYTES = 8 << 20

#: Requests of one connection being handled at once (read, not yet answered or waiting for
#: their tasks). Past it the daemon stops reading that connection until one is done: enough
#: to keep a client's pipe full through a group commit on a loaded machine, few enough that
#: one client cannot make the daemon hold an unbounded number of parsed requests.
MAX_REQUESTS_IN_FLIGHT = 256

#: Bytes read from a socket at a time: many small frames in one read.
READ_CHUNK_BYTES = 256 << 10


class Connection:
    """One client connection: its requests in flight, its replies, what it waits for, its idle timer.

    Args:
        writer: the connection's stream.
        uid: the peer's uid (SO_PEERCRED).
        idle_timeout_s: silence after which a connection with nothing in flight is closed.
    """

    def __init__(self, writer: asyncio.StreamWriter, uid: Optional[int], idle_timeout_s: float):
        self.writer = writer
        self.uid = uid
        self.closed = False
        self.waiters: Set["Waiter"] = set()
        self.decoder = protocol.FrameDecoder()
        self._handling: Set[asyncio.Task] = set()
        self._room: Optional[asyncio.Future] = None  # set while the reader waits for a handler to end
        self._idle_timeout_s = idle_timeout_s
        self._idle_timer: Optional[asyncio.TimerHandle] = None
        self._outbox: List[bytes] = []  # frames sent this turn, written together at its end

    @property
    def requests_in_flight(self) -> int:
        """Requests being handled now."""
        return len(self._handling)

    async def handle(self, handler: Callable[[Dict[str, Any]], Any], message: Dict[str, Any]) -> None:
        """Start ``handler(message)`` as a task of its own; first wait for room if
        :data:`MAX_REQUESTS_IN_FLIGHT` are being handled."""
        while len(self._handling) >= MAX_REQUESTS_IN_FLIGHT and not self.closed:
            self._room = asyncio.get_running_loop().create_future()
            await self._room
        self.busy()
        task = asyncio.get_running_loop().create_task(handler(message))
        self._handling.add(task)
        task.add_done_callback(self._handled)

    def _handled(self, task: asyncio.Task) -> None:
        self._handling.discard(task)
        if self._room is not None and not self._room.done():
            self._room.set_result(None)
        self.settle()

    def send(self, message: Dict[str, Any]) -> None:
        """Queue one message for the client (nothing, once closed); it is written with the
        others of this turn of the loop."""
        if self.closed:
            return
        try:
            frame = protocol.encode(message, protocol.MAX_REPLY_BYTES)
        except protocol.ProtocolError as too_big:
            frame = protocol.encode(protocol.error_reply(message.get("id"), too_big))
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._write_outbox)
        self._outbox.append(frame)

    def _write_outbox(self) -> None:
        """Write what this turn sent, in one syscall.

        Under load a turn ends many tasks of one client: their replies cost one write, not
        one each. The write keeps the GIL (``gilio``): a plain ``socket.send`` lets go of it,
        and the manager thread, woken by this turn's submissions, takes it for the rest of
        its own work before the loop gets it back.
        """
        data, self._outbox = b"".join(self._outbox), []
        if self.closed or not data:
            return
        transport = self.writer.transport
        # What the client has not read yet decides, not this turn's size: one reply (a
        # large batch's) may be bigger than the backlog a reading client is allowed.
        backlog = transport.get_write_buffer_size()
        if backlog > MAX_CLIENT_BACKLOG_BYTES:
            log.warning("closing a client that stopped reading its replies")
            self.close()
            return
        if backlog == 0 and not transport.is_closing():  # nothing queued before: writing now keeps the order
            try:
                data = data[gilio.write_now(transport.get_extra_info("socket").fileno(), data):]
            except OSError:
                pass  # full (BlockingIOError), or broken: the transport writes it, or reports the loss
        if data:
            self.writer.write(data)

    def busy(self) -> None:
        """A request arrived: the connection is not idle."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def settle(self) -> None:
        """Start the idle clock if nothing is in flight any more."""
        if self.closed or self.waiters or self._handling:
            return
        self.busy()
        self._idle_timer = asyncio.get_running_loop().call_later(self._idle_timeout_s, self._idle)

    def _idle(self) -> None:
        log.debug("closing a client connection idle for %ss", self._idle_timeout_s)
        self.close()

    def close(self) -> None:
        """Close (after writing what this turn sent), and forget every wait made on this connection."""
        if self.closed:
            return
        self._write_outbox()  # a refusal or a protocol error sent just before the close still goes
        self.closed = True
        self.busy()
        for waiter in list(self.waiters):
            waiter.detach()
        if self._room is not None and not self._room.done():
            self._room.set_result(None)
        self.writer.close()


@attrs.define(eq=False)
class InFlight:
    """A journaled task the supervisor has not finished (queued or running), and who waits for its end."""

    record_id: int
    future: Any  # the supervisor's concurrent.futures.Future (a task's or a workflow's)
    waiters: List["Waiter"] = attrs.field(factory=list)
    end_journaled: bool = False  # set once the end is committed (by the manager or the loop's group commit)
    record: Any = None  # the journal's record once the loop's group commit wrote the end (a TaskRecord)


class Waiter:
    """A reply owed on one connection once tasks end: a ``wait``, or a waiting submit, batch or workflow.

    Args:
        connection: where the reply goes.
        request_id: the request it answers.
        record_ids: the journal records the reply carries.
        single: the reply carries ``task`` (one record), else ``tasks``.
        record_of: a record's wire form, read when the reply is sent.
        key: the submission's supersede key: while it waits, it holds the key in ``holders``
            (supersede key -> the waiter holding it), where a newer submission finds it.
    """

    def __init__(self, connection: Connection, request_id: Any, record_ids: List[int], single: bool,
                 record_of: Callable[[int], Dict[str, Any]], key: Optional[str] = None,
                 holders: Optional[Dict[str, "Waiter"]] = None):
        self.connection, self.request_id, self.record_ids, self.single = connection, request_id, record_ids, single
        self._record_of = record_of
        self.key = key
        self._holders = holders if holders is not None else {}
        self._ended: Dict[int, Dict[str, Any]] = {}  # records the group commit returned: not read again
        self._in_flight: List[InFlight] = []
        self._timer: Optional[asyncio.TimerHandle] = None

    def attach(self, in_flight: List[InFlight], timeout: Optional[float] = None) -> None:
        """Wait for ``in_flight`` (reply at once when there are none), for at most ``timeout`` seconds."""
        if not in_flight:
            self.reply(final=True)
            return
        self._in_flight = list(in_flight)
        for entry in in_flight:
            entry.waiters.append(self)
        self.connection.waiters.add(self)
        self.connection.busy()
        if self.key is not None:
            self._holders[self.key] = self
        if timeout is not None:
            self._timer = asyncio.get_running_loop().call_later(timeout, self.reply, False)

    def one_done(self, entry: InFlight) -> None:
        """``entry``'s end is durable: reply once the last awaited task has ended."""
        self._in_flight.remove(entry)
        if entry.record is not None:
            self._ended[entry.record_id] = entry.record.to_wire()
        if not self._in_flight:
            self.reply(final=True)

    def reply(self, final: bool, **extra: Any) -> None:
        """Send the records now (``final``: every awaited task has ended, or nobody waits for
        them any more), with ``extra`` fields, and stop waiting."""
        self.detach()
        records = [self._ended.get(record_id) or self._record_of(record_id) for record_id in self.record_ids]
        fields = {"task": records[0]} if self.single else {"tasks": records}
        self.connection.send(protocol.ok_reply(self.request_id, final=final, **fields, **extra))

    def detach(self) -> None:
        """Stop waiting (answered, timed out, or the connection closed)."""
        for entry in self._in_flight:
            entry.waiters.remove(self)
        self._in_flight = []
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.connection.waiters.discard(self)
        self.connection.settle()
        if self.key is not None and self._holders.get(self.key) is self:
            del self._holders[self.key]
