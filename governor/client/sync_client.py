"""``governor.Client``: the Supervisor's API, over the daemon's Unix socket.

One connection carries many requests at once: a reader thread hands every reply to the
request that carries its id (``conversation.Conversation``, which the asyncio
:class:`~governor.client.async_client.AsyncClient` shares). A ``submit`` is acknowledged
once the daemon has journaled it (the future learns its ``task_id`` then); the future
resolves when the final reply arrives.
Errors come back as the same Governor error types the Supervisor raises (rebuilt by
``protocol.error_from_wire``).

Every submission carries the caller's working directory, so a relative path given for a
parameter a step declares as a path (``repo=.``) means the caller's directory, not the
daemon's.

When the connection is lost, every unfinished future fails with
:class:`DaemonUnavailable` (or :class:`~governor.errors.TooManyClients` when the daemon
refused the connection). The next request opens a new connection: the daemon closes
connections left idle, and a restarted daemon is found again.

This module is light: it imports neither loky, psutil nor the supervisor.
"""

from __future__ import annotations

import concurrent.futures
import socket
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

from governor import protocol
from governor.client.conversation import (Conversation, DaemonUnavailable, Exchange, Pending, Requests,
                                          first_error)
from governor.errors import StepCancelled
from governor.paths import default_socket_path
from governor.task import Call, ExplainedCancelFuture

#: How long a failed send waits for the reader to read why the daemon closed the
#: connection (a ``TooManyClients`` refusal arrives just before the close).
_LOSS_GRACE_S = 5.0


# --------------------------------------------------------------------------- the blocking client

class RemoteFuture(ExplainedCancelFuture):
    """The future of a task run by the daemon.

    ``task_id`` is the durable id the daemon gave the task (``None`` until acknowledged;
    :meth:`wait_for_id` waits for it). ``record`` is the task's final journal record.
    ``cancel()`` asks the daemon to cancel the task, as ``TaskFuture.cancel`` does locally.
    """

    def __init__(self, client: "Client"):
        super().__init__()
        self._client = client
        self._acknowledged = threading.Event()
        self.task_id: Optional[int] = None
        self.task_ids: List[int] = []
        self.record: Optional[Dict[str, Any]] = None
        self._cancel_error_value: Optional[StepCancelled] = None

    def wait_for_id(self, timeout: Optional[float] = None) -> int:
        """The task's id, once the daemon has journaled it.

        Raises:
            the request's error when the daemon refused it (unknown step, bad parameters,
            queue full): then there is no task.
        """
        if not self._acknowledged.wait(timeout):
            raise TimeoutError("the daemon did not acknowledge the submission in time")
        if self.task_id is None:
            raise self.exception()
        return self.task_id

    def cancel(self, detail: Optional[str] = None) -> bool:
        if self.done():
            return self.cancelled()
        return bool(self._client.cancel(*self.task_ids)["cancelled"])

    def _cancel_error(self) -> StepCancelled:
        return self._cancel_error_value


class Client:
    """Submit steps to a running daemon. Use as a context manager, or call :meth:`close`.

    Args:
        socket_path: the daemon's socket (default: ``governor.paths.default_socket_path()``).
        timeout: seconds to wait for a reply to a non-waiting request.

    Raises:
        DaemonUnavailable: nothing listens on the socket.
    """

    def __init__(self, socket_path: Optional[Union[str, Path]] = None, timeout: float = 30.0):
        self.socket_path = Path(socket_path) if socket_path is not None else default_socket_path()
        self.timeout = timeout
        self._requests = Requests()
        self._send_lock = threading.Lock()
        self._connect_lock = threading.Lock()
        self._closed = False
        self._connect()

    # ----------------------------------------------------------------- the API

    def ping(self) -> Dict[str, Any]:
        """The daemon's pid and protocol version."""
        return self._ask(self._requests.ping())

    def submit(self, step: str, /, **params: Any) -> RemoteFuture:
        """Run ``step(**params)`` in the daemon; the future resolves to its result.

        Returns once the daemon has journaled the task (so it is durable, and
        ``future.task_id`` is set), like ``Supervisor.submit``, raising at once what the
        daemon refused: ``UnknownStep``, ``InvalidParameters``, ``QueueFull``.
        """
        return self.submit_call(Call(step, kwargs=params))

    def run(self, step: str, /, **params: Any) -> Any:
        """Run ``step(**params)`` in the daemon and return its result (or raise its error).

        One request and one reply: unlike ``submit(...).result()`` there is no separate
        acknowledgement, so the task's id is never known here and the call cannot be
        cancelled while it waits; if the connection is lost meanwhile, the task may have
        been journaled, and then runs anyway. Raises what the daemon refused, as
        :meth:`submit` does.
        """
        return self._ask_future(self._requests.submit(Call(step, kwargs=params), None, ack=False)).result()

    def submit_call(self, call: Call, key: Optional[str] = None, order: Optional[int] = None) -> RemoteFuture:
        """Like :meth:`submit` for a ``Call`` (its limits travel; positional args do not).

        Args:
            key: a supersede key: the daemon cancels the unfinished steps of the previous
                submission with the same key.
            order: which of two submissions with the key is the newer, when they may
                reach the daemon out of order (several server processes): one whose
                order is below the key's latest is cancelled at once. Without it,
                arrival order decides.
        """
        return self._run(self._requests.submit(call, key, order))

    def submit_batch(self, calls: Iterable[Any], key: Optional[str] = None,
                     order: Optional[int] = None) -> RemoteFuture:
        """Submit many steps at once without waiting; the future resolves to their outcomes.

        Each outcome is a step's result, or its error (not raised), in the order of
        ``calls``. ``key`` supersedes the previous submission with the same key as a
        whole: a view switch that cancels what is left of the last view (``order`` as
        for :meth:`submit_call`).
        """
        return self._run(self._requests.batch(calls, key, order))

    def run_batch(self, calls: Iterable[Any], *, return_exceptions: bool = False,
                  timeout: Optional[float] = None) -> List[Any]:
        """Submit many steps at once and wait for all; as ``Supervisor.run_batch``."""
        future = self.submit_batch(calls)
        try:
            outcomes = future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel("the batch timed out")
            raise TimeoutError(f"the batch had not finished after {timeout}s") from None
        error = None if return_exceptions else first_error(outcomes)
        if error is not None:
            raise error
        return outcomes

    def workflow(self, calls: Iterable[Any]) -> RemoteFuture:
        """Run steps in order in the critical lane; the future resolves to their results."""
        return self._run(self._requests.workflow(calls))

    def cancel(self, *task_ids: int) -> Dict[str, List[int]]:
        """Cancel tasks by id: ``{"cancelled": [...], "finished": [...], "unknown": [...]}``."""
        return self._ask(self._requests.cancel(task_ids))

    def status(self, task_id: Optional[int] = None, *, states: Iterable[str] = (), step: Optional[str] = None,
               limit: int = protocol.DEFAULT_STATUS_LIMIT) -> Any:
        """One task's journal record, or the recent tasks' records (newest first).

        Args:
            states, step, limit: for the recent tasks: only those in one of ``states`` (any
                when empty) and of ``step`` (any when ``None``), the last ``limit`` of them.
        """
        return self._ask(self._requests.status(task_id, states, step, limit))

    def wait(self, task_id: int, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Wait for a task to end (or ``timeout``); return its record (``final`` says which)."""
        return self.wait_future(task_id, timeout).result()

    def wait_future(self, task_id: int, timeout: Optional[float] = None) -> concurrent.futures.Future:
        """:meth:`wait` without blocking: a future of the record (so many tasks can be awaited at once)."""
        return self._ask_future(self._requests.wait(task_id, timeout))

    def steps(self) -> List[Dict[str, Any]]:
        """The daemon's steps: name, lane, reason, limits, description, signature."""
        return self._ask(self._requests.steps())

    def workers(self) -> List[Dict[str, Any]]:
        """The daemon's workers: pid, lane, state, step, running_s, rss_bytes."""
        return self._ask(self._requests.workers())

    def metrics(self, format: str = "json") -> Any:
        """The daemon's metrics snapshot, or its Prometheus text with ``format="prometheus"``."""
        return self._ask(self._requests.metrics(format))

    def page(self) -> str:
        """The status page's URL with a fresh token (the daemon serves it with ``--http-addr``)."""
        return self._ask(self._requests.page())

    def live(self) -> Dict[str, Any]:
        """The live picture ``governor top`` draws: lanes, workers, recent tasks, kills,
        per-step latencies (see ``governor.service.live``)."""
        return self._ask(self._requests.live())

    def close(self) -> None:
        """Close the connection; unfinished futures fail with ``DaemonUnavailable``."""
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._reader.join(timeout=5)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # ----------------------------------------------------------------- plumbing

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.socket_path))
        except (FileNotFoundError, ConnectionRefusedError) as error:
            sock.close()
            raise DaemonUnavailable(self.socket_path, error.strerror or type(error).__name__) from None
        self._sock = sock
        self._conversation = Conversation(self.socket_path)
        self._reader = threading.Thread(target=self._read_replies, args=(sock, self._conversation),
                                        name="governor-client", daemon=True)
        self._reader.start()

    def _connected(self) -> Conversation:
        """The live conversation, reconnecting once if the last connection was lost."""
        with self._connect_lock:
            if self._conversation.lost is not None and not self._closed:
                self._reader.join()
                self._sock.close()
                self._connect()
            return self._conversation

    def _send(self, request: protocol.Request, pending: Pending) -> None:
        conversation = self._connected()
        conversation.expect(request.id, pending)
        with self._send_lock:
            try:
                protocol.send_message(self._sock, request.to_wire())
            except OSError as error:
                conversation.forget(request.id)
                self._reader.join(_LOSS_GRACE_S)  # it reads why the daemon closed, if it said
                raise conversation.lost or DaemonUnavailable(self.socket_path, str(error)) from None
            except BaseException:
                conversation.forget(request.id)
                raise

    def _ask(self, exchange: Exchange) -> Any:
        """Send one request and wait for its (single) reply, up to ``self.timeout``."""
        return self._ask_future(exchange).result(self.timeout)

    def _ask_future(self, exchange: Exchange) -> concurrent.futures.Future:
        """Send one request; the future resolves to its (single) reply's value."""
        reply: concurrent.futures.Future = concurrent.futures.Future()

        def on_reply(message: Dict[str, Any]) -> bool:
            try:
                reply.set_result(exchange.value(protocol.unwrap_reply(message)))
            except BaseException as error:
                reply.set_exception(error)
            return True

        self._send(exchange.request, Pending(on_reply, reply.set_exception))
        return reply

    def _run(self, exchange: Exchange) -> RemoteFuture:
        """Send a waiting submit/batch/workflow: an ack with ids, then a final reply.

        Returns once acknowledged, raising what the daemon refused.
        """
        future = RemoteFuture(self)

        def fail(error: BaseException) -> None:
            future._acknowledged.set()
            if not future.done():
                future.set_exception(error)

        def on_reply(message: Dict[str, Any]) -> bool:
            try:
                reply = protocol.unwrap_reply(message)
            except BaseException as error:
                fail(error)
                return True
            if not reply.get("final"):
                future.task_ids = reply.get("task_ids") or [reply["task_id"]]
                future.task_id = future.task_ids[0]
                future._acknowledged.set()
                return False
            future.record = reply.get("task")
            _resolve(future, lambda: exchange.value(reply))
            return True

        self._send(exchange.request, Pending(on_reply, fail))
        future.wait_for_id(self.timeout)
        return future

    @staticmethod
    def _read_replies(sock: socket.socket, conversation: Conversation) -> None:
        try:
            while True:
                conversation.dispatch(protocol.recv_message(sock, protocol.MAX_REPLY_BYTES))
        except (EOFError, OSError, protocol.ProtocolError) as lost:
            conversation.lose(str(lost))


def _resolve(future: RemoteFuture, outcome: Callable[[], Any]) -> None:
    try:
        future.set_result(outcome())
    except StepCancelled as cancelled:
        future._cancel_error_value = cancelled
        concurrent.futures.Future.cancel(future)
        future.set_running_or_notify_cancel()
    except BaseException as error:
        future.set_exception(error)
