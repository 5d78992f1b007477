"""Cancellation groups (:class:`Scope`, from ``Supervisor.scope()``) and :func:`gather`, the
wait behind ``run_batch``."""

from __future__ import annotations

import concurrent.futures
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterable, List, Optional, Sequence

from governor.task import CancelRequest, Call, TaskFuture, WorkflowFuture

if TYPE_CHECKING:
    from governor.engine.supervisor import Supervisor

#: A scope forgets its finished futures when it holds this many (then at each doubling),
#: so a long-lived scope neither grows without bound nor rescans on every submit.
SCOPE_PRUNE_MIN = 64


class Scope:
    """A cancellation group, like a browser's AbortController.

    Steps submitted through a scope can be stopped together with :meth:`cancel` (queued
    ones are dropped, running ones get a cooperative cancel, then are killed after their
    grace). As a context manager, leaving the block normally waits for every step of the
    scope; leaving it with an exception cancels them instead.
    """

    def __init__(self, supervisor: "Supervisor"):
        self._supervisor = supervisor
        self._lock = threading.Lock()
        self._futures: List[concurrent.futures.Future] = []
        self._prune_at = SCOPE_PRUNE_MIN
        self._cancel_request: Optional[CancelRequest] = None
        self._on_cancel: List[Callable[[CancelRequest], None]] = []
        #: Where the scope stands among those of its supersede key (``Supervisor.scope``'s ``order``).
        self.order: Optional[int] = None

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._cancel_request is not None

    def submit(self, step: str, /, *args: Any, **kwargs: Any) -> TaskFuture:
        """:meth:`Supervisor.submit`, in this scope."""
        return self._adopt(self._supervisor.submit_call(Call(step, args, kwargs)))

    def submit_call(self, call: Call) -> TaskFuture:
        """:meth:`Supervisor.submit_call`, in this scope."""
        return self._adopt(self._supervisor.submit_call(call))

    def workflow(self, calls: Iterable[Any]) -> WorkflowFuture:
        """:meth:`Supervisor.workflow`, in this scope."""
        return self._adopt(self._supervisor.workflow(calls))

    def run_batch(self, calls: Iterable[Any], *, return_exceptions: bool = False,
                  timeout: Optional[float] = None) -> List[Any]:
        """:meth:`Supervisor.run_batch`, in this scope (a cancel stops the batch's steps)."""
        futures = [self.submit_call(Call.of(item)) for item in calls]
        return gather(futures, return_exceptions, timeout)

    @property
    def finished(self) -> bool:
        """Whether every step submitted through the scope has ended."""
        with self._lock:
            return all(future.done() for future in self._futures)

    def cancel(self, detail: Optional[str] = None) -> int:
        """Cancel every unfinished step of the scope, and any submitted through it later.

        Returns:
            how many steps were asked to stop.
        """
        return self.cancel_for(CancelRequest("scope", detail))

    def cancel_for(self, request: CancelRequest) -> int:
        """:meth:`cancel` with the reason given (the first reason given is kept)."""
        with self._lock:
            if self._cancel_request is None:
                self._cancel_request = request
            futures, self._futures = self._futures, []
            callbacks, self._on_cancel = self._on_cancel, []
        stopped = sum(self._stop(future) for future in futures)
        for callback in callbacks:
            callback(self._cancel_request)
        return stopped

    def on_cancel(self, callback: Callable[[CancelRequest], None]) -> None:
        """Call ``callback(request)`` once, when the scope is cancelled (at once if it is already).

        It runs on the cancelling thread, right after the scope's steps were asked to stop
        and before they have stopped: what waits for the steps' ends can answer its caller
        now (a superseded web request's 409) instead of after a running step's grace.
        """
        with self._lock:
            if self._cancel_request is None:
                self._on_cancel.append(callback)
                return
        callback(self._cancel_request)

    def _stop(self, future: concurrent.futures.Future) -> bool:
        steps = future.steps if isinstance(future, WorkflowFuture) else [future]
        return any([self._supervisor._cancel(step.task, self._cancel_request)
                    for step in steps if not step.done()])

    def _adopt(self, future: concurrent.futures.Future) -> Any:
        with self._lock:
            if self._cancel_request is None:
                self._futures.append(future)
                if len(self._futures) >= self._prune_at:  # amortised: a scan per doubling
                    self._futures = [kept for kept in self._futures if not kept.done()]
                    self._prune_at = max(SCOPE_PRUNE_MIN, 2 * len(self._futures))
                return future
        self._stop(future)  # submitted into a scope already cancelled: stop it at once
        return future

    def __enter__(self) -> "Scope":
        return self

    def __exit__(self, exc_type: Any, *exc_info: Any) -> None:
        if exc_type is not None:
            self.cancel(f"the scope's block raised {exc_type.__name__}")
            return
        with self._lock:
            futures = list(self._futures)
        concurrent.futures.wait(futures)


def gather(futures: Sequence[concurrent.futures.Future], return_exceptions: bool,
           timeout: Optional[float]) -> List[Any]:
    """Wait for ``futures`` (at most ``timeout``; then cancel the rest and raise ``TimeoutError``);
    their results in order, or the first error in that order unless ``return_exceptions``."""
    _, not_done = concurrent.futures.wait(futures, timeout)
    if not_done:
        for future in not_done:
            future.cancel("the batch timed out")
        raise TimeoutError(f"{len(not_done)} of {len(futures)} steps had not finished after {timeout}s")
    errors = [future.exception() if not future.cancelled() else _cancel_error(future) for future in futures]
    if not return_exceptions:
        first = next((error for error in errors if error is not None), None)
        if first is not None:
            raise first
        return [future.result() for future in futures]
    return [error if error is not None else future.result() for future, error in zip(futures, errors)]


def _cancel_error(future: concurrent.futures.Future) -> BaseException:
    try:
        future.result()
    except concurrent.futures.CancelledError as cancelled:
        return cancelled
    raise AssertionError("unreachable: the future was cancelled")
