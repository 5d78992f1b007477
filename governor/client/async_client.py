"""``governor.AsyncClient``: the daemon's client on asyncio.

The same requests and replies as :class:`governor.Client` (built by the same
``conversation.Requests``, routed by the same ``conversation.Conversation``), read by an asyncio
task instead of a thread::

    async with AsyncClient() as client:
        branch = await client.submit("git.current_branch", repo=".")
        results = await client.run_batch([("git.status", {"repo": "."}), ("git.log", {"repo": "."})])

Cancel-safe: cancelling the asyncio task awaiting :meth:`AsyncClient.submit`,
:meth:`~AsyncClient.run_batch` or :meth:`~AsyncClient.workflow` cancels the governed
task(s) in the daemon too (at once if acknowledged, else as soon as the acknowledgement
arrives). Cancelling :meth:`~AsyncClient.wait` only stops waiting: the task was not
started by that call. Light, like the blocking client: no loky, psutil or supervisor.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

from governor import protocol
from governor.client.conversation import Conversation, DaemonUnavailable, Exchange, Pending, Requests, first_error
from governor.paths import default_socket_path
from governor.task import Call


class AsyncClient:
    """Submit steps to a running daemon from asyncio. ``async with`` it, or ``await close()``.

    The connection opens on first use (or on ``async with``) and reopens on the next
    request after it was lost.

    Args:
        socket_path: the daemon's socket (default: ``governor.paths.default_socket_path()``).
        timeout: seconds to wait for a reply to a non-waiting request (and for a
            submission's acknowledgement).
    """

    def __init__(self, socket_path: Optional[Union[str, Path]] = None, timeout: float = 30.0):
        self.socket_path = Path(socket_path) if socket_path is not None else default_socket_path()
        self.timeout = timeout
        self._requests = Requests()
        self._conversation: Optional[Conversation] = None
        self._writer: Optional[asyncio.StreamWriter] = None
        self._reader_task: Optional[asyncio.Task] = None
        self._connecting = asyncio.Lock()

    # ----------------------------------------------------------------- the API

    async def ping(self) -> Dict[str, Any]:
        """The daemon's pid and protocol version."""
        return await self._ask(self._requests.ping())

    async def submit(self, step: str, /, **params: Any) -> Any:
        """Run ``step(**params)`` in the daemon and return its result (or raise its error).

        Raises at once what the daemon refused (``UnknownStep``, ``InvalidParameters``,
        ``QueueFull``). Cancelling the awaiting task cancels the governed task.
        """
        return await self.submit_call(Call(step, kwargs=params))

    async def submit_call(self, call: Call, key: Optional[str] = None, order: Optional[int] = None) -> Any:
        """Like :meth:`submit` for a ``Call`` (its limits travel), with an optional supersede
        ``key`` and ``order`` (as ``Client.submit_call``)."""
        return await self._run(self._requests.submit(call, key, order))

    async def run_batch(self, calls: Iterable[Any], *, return_exceptions: bool = False,
                        key: Optional[str] = None, order: Optional[int] = None) -> List[Any]:
        """Run many steps at once and return their results in order; as ``Client.run_batch``,
        with an optional supersede ``key`` and ``order`` (as ``Client.submit_call``).

        Cancelling the awaiting task cancels every unfinished step of the batch.
        """
        outcomes = await self._run(self._requests.batch(calls, key, order))
        error = None if return_exceptions else first_error(outcomes)
        if error is not None:
            raise error
        return outcomes

    async def workflow(self, calls: Iterable[Any]) -> List[Any]:
        """Run steps in order in the critical lane and return their results."""
        return await self._run(self._requests.workflow(calls))

    async def cancel(self, *task_ids: int) -> Dict[str, List[int]]:
        """Cancel tasks by id: ``{"cancelled": [...], "finished": [...], "unknown": [...]}``."""
        return await self._ask(self._requests.cancel(task_ids))

    async def status(self, task_id: Optional[int] = None, *, states: Iterable[str] = (), step: Optional[str] = None,
                     limit: int = protocol.DEFAULT_STATUS_LIMIT) -> Any:
        """One task's journal record, or the recent tasks' records (newest first)."""
        return await self._ask(self._requests.status(task_id, states, step, limit))

    async def wait(self, task_id: int, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Wait for a task to end (or ``timeout``); return its record (``final`` says which)."""
        return await self._ask(self._requests.wait(task_id, timeout), timeout=None)

    async def steps(self) -> List[Dict[str, Any]]:
        """The daemon's steps: name, lane, reason, limits, description, signature."""
        return await self._ask(self._requests.steps())

    async def workers(self) -> List[Dict[str, Any]]:
        """The daemon's workers."""
        return await self._ask(self._requests.workers())

    async def page(self) -> str:
        """The status page's URL with a fresh token (the daemon serves it with ``--http-addr``)."""
        return await self._ask(self._requests.page())

    async def metrics(self, format: str = "json") -> Any:
        """The daemon's metrics snapshot, or its Prometheus text with ``format="prometheus"``."""
        return await self._ask(self._requests.metrics(format))

    async def close(self) -> None:
        """Close the connection; requests in flight fail with ``DaemonUnavailable``."""
        if self._writer is not None:
            self._writer.close()
            await asyncio.gather(self._writer.wait_closed(), return_exceptions=True)
        if self._reader_task is not None:
            await self._reader_task
        self._writer = self._reader_task = None

    async def __aenter__(self) -> "AsyncClient":
        await self._connected()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    # ----------------------------------------------------------------- plumbing

    async def _connected(self) -> Conversation:
        async with self._connecting:
            if self._conversation is None or self._conversation.lost is not None:
                if self._reader_task is not None:
                    await self._reader_task
                try:
                    reader, self._writer = await asyncio.open_unix_connection(str(self.socket_path))
                except (FileNotFoundError, ConnectionRefusedError) as error:
                    raise DaemonUnavailable(self.socket_path, error.strerror or type(error).__name__) from None
                self._conversation = Conversation(self.socket_path)
                self._reader_task = asyncio.create_task(self._read_replies(reader, self._conversation))
            return self._conversation

    async def _read_replies(self, reader: asyncio.StreamReader, conversation: Conversation) -> None:
        try:
            while True:
                conversation.dispatch(await protocol.read_message(reader, protocol.MAX_REPLY_BYTES))
        except (EOFError, OSError, protocol.ProtocolError) as lost:
            conversation.lose(str(lost))

    async def _send(self, request: protocol.Request, pending: Pending) -> None:
        conversation = await self._connected()
        self._send_now(conversation, request, pending)
        try:
            await self._writer.drain()
        except OSError as error:
            await self._reader_task  # it reads why the daemon closed, if it said
            raise conversation.lost or DaemonUnavailable(self.socket_path, str(error)) from None

    def _send_now(self, conversation: Conversation, request: protocol.Request, pending: Pending) -> None:
        """Register and write one frame without awaiting (safe inside ``except CancelledError``)."""
        frame = protocol.encode(request.to_wire())
        conversation.expect(request.id, pending)
        self._writer.write(frame)

    async def _ask(self, exchange: Exchange, timeout: Optional[float] = -1) -> Any:
        """Send one request and return its reply's value."""
        reply = asyncio.get_running_loop().create_future()
        await self._send(exchange.request, Pending(lambda message: _settle(reply, message),
                                                    lambda error: _fail(reply, error)))
        try:
            message = await asyncio.wait_for(reply, self.timeout if timeout == -1 else timeout)
        finally:
            self._conversation.forget(exchange.request.id)
        return exchange.value(protocol.unwrap_reply(message))

    async def _run(self, exchange: Exchange) -> Any:
        """Send a waiting submit/batch/workflow, wait for its ack, then its final reply.

        Cancelled while waiting, it cancels the task(s): now if acknowledged, else from the
        acknowledgement's handler.
        """
        loop = asyncio.get_running_loop()
        acknowledged, final = loop.create_future(), loop.create_future()
        conversation = await self._connected()

        def on_reply(message: Dict[str, Any]) -> bool:
            if not message.get("ok", False) or message.get("final"):
                if not acknowledged.done():
                    _settle(acknowledged, message)
                _settle(final, message)
                return True
            task_ids = message.get("task_ids") or [message.get("task_id")]
            if acknowledged.cancelled():  # the caller gave up before the ack: cancel what it started
                self._cancel_soon(conversation, task_ids)
            elif not acknowledged.done():
                acknowledged.set_result(task_ids)
            return False

        def on_lost(error: BaseException) -> None:
            _fail(acknowledged, error)
            _fail(final, error)

        await self._send(exchange.request, Pending(on_reply, on_lost))
        try:
            first = await asyncio.wait_for(acknowledged, self.timeout)
            if not isinstance(first, list):
                protocol.unwrap_reply(first)  # refused: raises the daemon's error
            message = await final
        except asyncio.CancelledError:
            if acknowledged.done() and not acknowledged.cancelled() and isinstance(acknowledged.result(), list):
                self._cancel_soon(conversation, acknowledged.result())
            raise
        return exchange.value(protocol.unwrap_reply(message))

    def _cancel_soon(self, conversation: Conversation, task_ids: List[int]) -> None:
        """Ask the daemon to cancel ``task_ids``, without awaiting its answer."""
        if conversation.lost is None and self._writer is not None:
            self._send_now(conversation, self._requests.cancel(task_ids).request, _IGNORED)


_IGNORED = Pending(lambda message: True, lambda error: None)


def _settle(future: asyncio.Future, message: Dict[str, Any]) -> bool:
    if not future.done():
        future.set_result(message)
    return True


def _fail(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
