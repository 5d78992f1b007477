"""The conversation both clients hold with the daemon: requests by id, replies routed to them.

One connection carries many requests at once: each has an id, and the reader (a thread in
:class:`~governor.client.sync_client.Client`, an asyncio task in
:class:`~governor.client.async_client.AsyncClient`) hands every reply to the request that
carries its id (:class:`Conversation`). :class:`Requests` builds what each call of the API
sends and says how to read its answer, so the two clients differ only in how they wait.

When the connection is lost, every request in flight fails with :class:`DaemonUnavailable`
(or :class:`~governor.errors.TooManyClients` when the daemon refused the connection).
"""

from __future__ import annotations

import itertools
import os
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import attrs

from governor import protocol
from governor.errors import GovernorError, StepCancelled
from governor.task import Call, TaskState


class DaemonUnavailable(GovernorError, ConnectionError):
    """No daemon answers on the socket (not started, or stopped), or it went away mid-request."""

    def __init__(self, socket_path: Union[str, Path], reason: str):
        super().__init__(str(socket_path), reason)
        self.socket_path = str(socket_path)
        self.reason = reason

    def __str__(self) -> str:
        return (f"no governor daemon at {self.socket_path} ({self.reason}); "
                "start one with `governor serve`, or pass the socket it listens on")


@attrs.frozen
class Pending:
    """A request awaiting replies: ``on_reply`` returns whether it was the last one."""

    on_reply: Callable[[Dict[str, Any]], bool]
    on_lost: Callable[[BaseException], None]


class Conversation:
    """The requests in flight on one connection, by id, and how the connection ended.

    The reader (a thread, or an asyncio task) calls :meth:`dispatch` and, at the end,
    :meth:`lose`; senders call :meth:`expect` first. A lock keeps the table whole across
    threads.
    """

    def __init__(self, socket_path: Path):
        self.socket_path = socket_path
        self.lost: Optional[BaseException] = None
        self._pending: Dict[Any, Pending] = {}
        self._notice: Optional[BaseException] = None
        self._lock = threading.Lock()

    def expect(self, request_id: Any, pending: Pending) -> None:
        """Route the replies to ``request_id`` to ``pending``; raise if the connection is lost."""
        with self._lock:
            if self.lost is not None:
                raise self.lost
            self._pending[request_id] = pending

    def forget(self, request_id: Any) -> None:
        """Stop routing replies to ``request_id`` (it got its last, or its sender gave up)."""
        with self._lock:
            self._pending.pop(request_id, None)

    def dispatch(self, message: Dict[str, Any]) -> None:
        """Hand one reply to its request. A reply to no request is the daemon speaking to the
        connection (a refusal, or an error about a broken frame): kept as the likely reason
        if the connection then ends."""
        request_id = message.get("id")
        if request_id is None:
            if message.get("ok") is False:
                self._notice = protocol.error_from_wire(message.get("error"))
            return
        with self._lock:
            pending = self._pending.get(request_id)
        if pending is not None and pending.on_reply(message):
            self.forget(request_id)

    def lose(self, reason: str) -> BaseException:
        """The connection ended: fail every request in flight, and every later one."""
        refusal = self._notice if isinstance(self._notice, ConnectionError) else None
        error = refusal or DaemonUnavailable(self.socket_path, f"connection lost: {reason}")
        with self._lock:
            self.lost = error
            pending, self._pending = list(self._pending.values()), {}
        for each in pending:
            each.on_lost(error)
        return error


@attrs.frozen
class Exchange:
    """A request, and how its (final) reply becomes the API's value."""

    request: protocol.Request
    value: Callable[[Dict[str, Any]], Any]


class Requests:
    """What each call of the client API sends, and how to read its answer (both clients)."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)

    def _id(self) -> int:
        return next(self._ids)

    def ping(self) -> Exchange:
        return Exchange(protocol.Ping(self._id()), _whole)

    def submit(self, call: Call, key: Optional[str], order: Optional[int] = None, ack: bool = True) -> Exchange:
        """A waiting submit; ``ack=False``: its one reply is the final one (protocol: Acknowledgements)."""
        return Exchange(protocol.Submit(self._id(), call.step, _keywords(call), True, key, order, call.limits, _cwd(),
                                        call.priority, ack),
                        lambda reply: _value_of(_unless_superseded(reply, reply["task"])))

    def batch(self, calls: Iterable[Any], key: Optional[str], order: Optional[int] = None) -> Exchange:
        step_calls = tuple(protocol.StepCall(call.step, _keywords(call), call.limits, call.priority)
                           for call in map(Call.of, calls))
        return Exchange(protocol.Batch(self._id(), step_calls, True, key, order, _cwd()),
                         lambda reply: [_outcome_of(_unless_superseded(reply, record)) for record in reply["tasks"]])

    def workflow(self, calls: Iterable[Any]) -> Exchange:
        step_calls = tuple(protocol.StepCall(call.step, _keywords(call), call.limits) for call in map(Call.of, calls))
        return Exchange(protocol.WorkflowRequest(self._id(), step_calls, True, _cwd()),
                         lambda reply: _value_of(reply["task"]))

    def cancel(self, task_ids: Iterable[int]) -> Exchange:
        return Exchange(protocol.Cancel(self._id(), tuple(task_ids)),
                         lambda reply: {name: reply[name] for name in ("cancelled", "finished", "unknown")})

    def status(self, task_id: Optional[int], states: Iterable[str] = (), step: Optional[str] = None,
               limit: int = protocol.DEFAULT_STATUS_LIMIT) -> Exchange:
        return Exchange(protocol.Status(self._id(), task_id, tuple(states) or None, step, limit),
                         lambda reply: reply["task"] if task_id is not None else reply["tasks"])

    def wait(self, task_id: int, timeout: Optional[float]) -> Exchange:
        return Exchange(protocol.Wait(self._id(), task_id, timeout),
                         lambda reply: {**reply["task"], "final": reply["final"]})

    def steps(self) -> Exchange:
        return Exchange(protocol.Steps(self._id()), lambda reply: reply["steps"])

    def workers(self) -> Exchange:
        return Exchange(protocol.Workers(self._id()), lambda reply: reply["workers"])

    def live(self) -> Exchange:
        return Exchange(protocol.Live(self._id()), lambda reply: reply["live"])

    def page(self) -> Exchange:
        return Exchange(protocol.Page(self._id()), lambda reply: reply["url"])

    def metrics(self, format: str) -> Exchange:
        return Exchange(protocol.Metrics(self._id(), format),
                         lambda reply: reply["text"] if format == "prometheus" else reply["metrics"])


def _whole(reply: Dict[str, Any]) -> Dict[str, Any]:
    return {key: value for key, value in reply.items() if key not in ("v", "id", "ok")}


def _keywords(call: Call) -> Dict[str, Any]:
    if call.args:
        raise TypeError("steps are called with keyword parameters over the socket")
    return call.kwargs


def _cwd() -> Optional[str]:
    """The caller's working directory, sent with every submission (``None`` if it was deleted)."""
    try:
        return os.getcwd()
    except OSError:
        return None


def _unless_superseded(reply: Dict[str, Any], record: Dict[str, Any]) -> Dict[str, Any]:
    """``record``, or, when the daemon answered early because a newer submission took the
    request's supersede key (``reply["superseded"]``) and the task is still stopping, the
    record as it will end: cancelled, superseded."""
    detail = reply.get("superseded")
    if detail is None or TaskState(record["state"]).terminal:
        return record
    cancelled = StepCancelled(record.get("step"), record.get("task_id"), "superseded", detail)
    return {**record, "error": protocol.error_to_wire(cancelled)}


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


def first_error(outcomes: List[Any]) -> Optional[BaseException]:
    """The first outcome of a batch that is an error, if any."""
    return next((outcome for outcome in outcomes if isinstance(outcome, BaseException)), None)
