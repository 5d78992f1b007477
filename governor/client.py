"""``governor.Client``: the Supervisor's API, over the daemon's Unix socket.

One connection carries many requests at once: each has an id, and a reader thread hands
every reply to the request that carries its id. A ``submit`` is acknowledged once the
daemon has journaled it (the future learns its ``task_id`` then); the future resolves
when the final reply arrives. Errors come back as the same Governor error types the
Supervisor raises (rebuilt by ``protocol.error_from_wire``).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import socket
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

from governor import protocol
from governor.errors import GovernorError, StepCancelled
from governor.paths import default_socket_path
from governor.task import Call, _ExplainedCancelFuture


class DaemonUnavailable(GovernorError, ConnectionError):
    """No daemon answers on the socket (not started, or stopped)."""

    def __init__(self, socket_path: Union[str, Path], reason: str):
        super().__init__(str(socket_path), reason)
        self.socket_path = str(socket_path)
        self.reason = reason

    def __str__(self) -> str:
        return (f"no governor daemon at {self.socket_path} ({self.reason}); "
                "start one with `governor serve`, or pass the socket it listens on")


class RemoteFuture(_ExplainedCancelFuture):
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
        reply = self._client._request(protocol.Cancel(self._client._next_id(), tuple(self.task_ids)))
        return bool(reply["cancelled"])

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
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.connect(str(self.socket_path))
        except (FileNotFoundError, ConnectionRefusedError) as error:
            self._sock.close()
            raise DaemonUnavailable(self.socket_path, error.strerror or type(error).__name__) from None
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._pending: Dict[int, Callable[[Dict[str, Any]], bool]] = {}
        self._pending_lock = threading.Lock()
        self._closed_error: Optional[BaseException] = None
        self._reader = threading.Thread(target=self._read_replies, name="governor-client", daemon=True)
        self._reader.start()

    # ----------------------------------------------------------------- the API

    def ping(self) -> Dict[str, Any]:
        """The daemon's pid and protocol version."""
        return self._request(protocol.Ping(self._next_id()))

    def submit(self, step: str, /, **params: Any) -> RemoteFuture:
        """Run ``step(**params)`` in the daemon; the future resolves to its result.

        Returns once the daemon has journaled the task (so it is durable, and
        ``future.task_id`` is set), like ``Supervisor.submit``, raising at once what the
        daemon refused: ``UnknownStep``, ``InvalidParameters``, ``QueueFull``.
        """
        return self.submit_call(Call(step, kwargs=params))

    def submit_call(self, call: Call, key: Optional[str] = None) -> RemoteFuture:
        """Like :meth:`submit` for a ``Call`` (its limits travel; positional args do not).

        Args:
            key: a supersede key: the daemon cancels the unfinished steps of the previous
                submission with the same key.
        """
        if call.args:
            raise TypeError("steps are called with keyword parameters over the socket")
        future = self._submit(protocol.Submit(self._next_id(), call.step, call.kwargs, True, key, call.limits),
                              unwrap=lambda reply: _value_of(reply["task"]))
        future.wait_for_id(self.timeout)
        return future

    def submit_batch(self, calls: Iterable[Any], key: Optional[str] = None) -> RemoteFuture:
        """Submit many steps at once without waiting; the future resolves to their outcomes.

        Each outcome is a step's result, or its error (not raised), in the order of
        ``calls``. ``key`` supersedes the previous submission with the same key as a
        whole: a view switch that cancels what is left of the last view.
        """
        step_calls = tuple(_step_call(Call.of(item)) for item in calls)
        future = self._submit(protocol.Batch(self._next_id(), step_calls, True, key),
                              unwrap=lambda reply: [_outcome_of(record) for record in reply["tasks"]])
        future.wait_for_id(self.timeout)
        return future

    def run_batch(self, calls: Iterable[Any], *, return_exceptions: bool = False,
                  timeout: Optional[float] = None) -> List[Any]:
        """Submit many steps at once and wait for all; as ``Supervisor.run_batch``."""
        future = self.submit_batch(calls)
        try:
            outcomes = future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel("the batch timed out")
            raise TimeoutError(f"the batch had not finished after {timeout}s") from None
        if not return_exceptions:
            first = next((outcome for outcome in outcomes if isinstance(outcome, BaseException)), None)
            if first is not None:
                raise first
        return outcomes

    def workflow(self, calls: Iterable[Any]) -> RemoteFuture:
        """Run steps in order in the critical lane; the future resolves to their results."""
        step_calls = tuple(_step_call(Call.of(item)) for item in calls)
        future = self._submit(protocol.Workflow(self._next_id(), step_calls, True),
                              unwrap=lambda reply: _value_of(reply["task"]))
        future.wait_for_id(self.timeout)
        return future

    def cancel(self, *task_ids: int) -> Dict[str, List[int]]:
        """Cancel tasks by id: ``{"cancelled": [...], "finished": [...], "unknown": [...]}``."""
        reply = self._request(protocol.Cancel(self._next_id(), task_ids))
        return {outcome: reply[outcome] for outcome in ("cancelled", "finished", "unknown")}

    def status(self, task_id: Optional[int] = None, *, states: Iterable[str] = (), step: Optional[str] = None,
               limit: int = protocol.DEFAULT_STATUS_LIMIT) -> Any:
        """One task's journal record, or the recent tasks' records (newest first).

        Args:
            states, step, limit: for the recent tasks: only those in one of ``states`` (any
                when empty) and of ``step`` (any when ``None``), the last ``limit`` of them.
        """
        reply = self._request(protocol.Status(self._next_id(), task_id, tuple(states) or None, step, limit))
        return reply["task"] if task_id is not None else reply["tasks"]

    def wait(self, task_id: int, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Wait for a task to end (or ``timeout``); return its record (``final`` says which)."""
        return self.wait_future(task_id, timeout).result()

    def wait_future(self, task_id: int, timeout: Optional[float] = None) -> concurrent.futures.Future:
        """:meth:`wait` without blocking: a future of the record (so many tasks can be awaited at once)."""
        record: concurrent.futures.Future = concurrent.futures.Future()

        def on_reply(reply: concurrent.futures.Future) -> None:
            try:
                wire = reply.result()
            except BaseException as error:  # the daemon's refusal (UnknownTask) or a lost connection
                record.set_exception(error)
            else:
                record.set_result({**wire["task"], "final": wire["final"]})

        self._request_future(protocol.Wait(self._next_id(), task_id, timeout)).add_done_callback(on_reply)
        return record

    def steps(self) -> List[Dict[str, Any]]:
        """The daemon's steps: name, lane, reason, limits, description, signature."""
        return self._request(protocol.Steps(self._next_id()))["steps"]

    def workers(self) -> List[Dict[str, Any]]:
        """The daemon's workers: pid, lane, state, step, running_s, rss_bytes."""
        return self._request(protocol.Workers(self._next_id()))["workers"]

    def metrics(self, format: str = "json") -> Any:
        """The daemon's metrics snapshot, or its Prometheus text with ``format="prometheus"``."""
        reply = self._request(protocol.Metrics(self._next_id(), format))
        return reply["text"] if format == "prometheus" else reply["metrics"]

    def close(self) -> None:
        """Close the connection; unfinished futures fail with ``DaemonUnavailable``."""
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

    def _next_id(self) -> int:
        return next(self._ids)

    def _send(self, request: protocol.Request, on_reply: Callable[[Dict[str, Any]], bool]) -> None:
        with self._pending_lock:
            if self._closed_error is not None:
                raise self._closed_error
            self._pending[request.id] = on_reply
        with self._send_lock:
            try:
                protocol.send_message(self._sock, request.to_wire())
            except OSError as error:
                raise DaemonUnavailable(self.socket_path, str(error)) from None

    def _request(self, request: protocol.Request) -> Dict[str, Any]:
        """Send one request and wait for its (single) reply, up to ``self.timeout``."""
        return self._request_future(request).result(self.timeout)

    def _request_future(self, request: protocol.Request) -> concurrent.futures.Future:
        """Send one request; the future resolves to its (single) reply."""
        reply: concurrent.futures.Future = concurrent.futures.Future()

        def on_reply(message: Dict[str, Any]) -> bool:
            try:
                reply.set_result(protocol.unwrap_reply(message))
            except BaseException as error:
                reply.set_exception(error)
            return True

        self._send(request, on_reply)
        return reply

    def _submit(self, request: protocol.Request, unwrap: Callable[[Dict[str, Any]], Any]) -> RemoteFuture:
        """Send a waiting submit/batch/workflow: an ack with ids, then a final reply."""
        future = RemoteFuture(self)

        def on_reply(message: Dict[str, Any]) -> bool:
            try:
                reply = protocol.unwrap_reply(message)
            except BaseException as error:
                future._acknowledged.set()
                future.set_exception(error)
                return True
            if not reply.get("final"):
                future.task_ids = reply.get("task_ids") or [reply["task_id"]]
                future.task_id = future.task_ids[0]
                future._acknowledged.set()
                return False
            future.record = reply.get("task")
            _resolve(future, lambda: unwrap(reply))
            return True

        self._send(request, on_reply)
        return future

    def _read_replies(self) -> None:
        error: BaseException
        try:
            while True:
                message = protocol.recv_message(self._sock)
                with self._pending_lock:
                    handler = self._pending.get(message.get("id"))
                if handler is None:
                    continue  # a reply to nobody (e.g. an error about a broken frame)
                if handler(message):
                    with self._pending_lock:
                        self._pending.pop(message.get("id"), None)
        except (EOFError, OSError, protocol.ProtocolError) as lost:
            error = DaemonUnavailable(self.socket_path, f"connection lost: {lost}")
        with self._pending_lock:
            self._closed_error = error
            handlers, self._pending = list(self._pending.values()), {}
        for handler in handlers:
            handler({"v": protocol.PROTOCOL_VERSION, "id": None, "ok": False,
                     "error": protocol.error_to_wire(error)})


def _step_call(call: Call) -> protocol.StepCall:
    if call.args:
        raise TypeError("steps are called with keyword parameters over the socket")
    return protocol.StepCall(call.step, call.kwargs)


def _outcome_of(record: Dict[str, Any]) -> Any:
    """A finished task record's result, or its error (returned, not raised)."""
    try:
        return _value_of(record)
    except BaseException as error:
        return error


def _value_of(record: Dict[str, Any]) -> Any:
    """A finished task record's result, or its error raised."""
    if record.get("error") is not None:
        raise protocol.error_from_wire(record["error"])
    return record.get("result")


def _resolve(future: RemoteFuture, outcome: Callable[[], Any]) -> None:
    try:
        future.set_result(outcome())
    except StepCancelled as cancelled:
        future._cancel_error_value = cancelled
        concurrent.futures.Future.cancel(future)
        future.set_running_or_notify_cancel()
    except BaseException as error:
        future.set_exception(error)
