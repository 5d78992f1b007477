"""User done-callbacks never run on the manager thread (issue 16, item 6).

A future's done-callbacks run on whichever thread resolves it. When that is the manager
thread (a task killed, crashed or skipped, or every task once the manager resolves all
futures itself), a callback that blocks stalls every lane. So:

    runner = CallbackRunner()                      # one per supervisor
    runner.protect()                               # on the manager thread, as it starts
    future = CallbackFuture(runner)                # (TaskFuture and WorkflowFuture derive from it)
    future.add_done_callback(user_callback)
    ...                                            # resolved on the manager thread:
                                                   #   user_callback runs on "governor-callbacks"
    runner.close()                                 # after the manager thread has ended

Data flow::

    protected thread: future.set_result() -> Future._invoke_callbacks -> runner.run(fn, future)
        -> queue ──> governor-callbacks thread: fn(future), in order, errors logged
    any other thread: future.set_result() -> ... -> runner.run(fn, future) -> fn(future) at once

Callbacks resolved on other threads run there at once, as ``concurrent.futures`` does, so
no hop is paid where none is needed. Governor's own bridges whose callback only hands the
future on (a deque append and at most one wake-up) wrap it in :class:`NonBlocking`: it runs
at once on any thread, sparing each task a hop through the callback thread. One thread
runs every deferred callback in the order they were due: a callback that blocks delays
the callbacks behind it, never a lane. The thread starts on the first deferred callback,
so a supervisor whose futures have none costs nothing. ``concurrent.futures.wait`` and
``as_completed`` do not use callbacks and are not deferred.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from typing import Any, Callable, FrozenSet, Optional

#: The same logger and message as ``concurrent.futures`` uses for a callback that raised.
_futures_log = logging.getLogger("concurrent.futures")

Callback = Callable[[concurrent.futures.Future], Any]


class NonBlocking:
    """A done-callback that may run on a protected thread: it never blocks, never takes a
    lock another thread holds for long, and never raises (the daemon's end inbox).

    Args:
        fn: the callback.
    """

    __slots__ = ("fn",)

    def __init__(self, fn: Callback):
        self.fn = fn

    def __call__(self, future: concurrent.futures.Future) -> Any:
        return self.fn(future)


class CallbackRunner:
    """Runs done-callbacks that are due on a protected thread on its own thread instead.

    Args:
        name: the callback thread's name.
    """

    _CLOSE = object()

    def __init__(self, name: str = "governor-callbacks"):
        self._name = name
        self._protected: FrozenSet[int] = frozenset()
        self._queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._closed = False

    def protect(self) -> None:
        """From now on, callbacks due on the calling thread run on the callback thread."""
        with self._lock:
            self._protected |= {threading.get_ident()}

    def on_callback_thread(self) -> bool:
        """Whether the caller is the callback thread (code there must not wait for :meth:`close`)."""
        return self._thread is not None and threading.current_thread() is self._thread

    def run(self, fn: Callback, future: concurrent.futures.Future) -> None:
        """Run ``fn(future)``: now, or on the callback thread if the caller is protected.

        Called by :class:`CallbackFuture` in place of each callback. Run now, an exception
        propagates to ``Future``, which logs it; deferred, it is logged the same way.
        """
        if isinstance(fn, NonBlocking) or threading.get_ident() not in self._protected:
            fn(future)
            return
        with self._lock:
            if self._closed:
                # Only a caller that closed too early gets here: run it rather than lose it.
                _futures_log.error("callback for %r was due after the callback runner closed; running it here",
                                   future)
                deferred = False
            else:
                deferred = True
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                    self._thread.start()
                self._queue.put((fn, future))
        if not deferred:
            fn(future)

    def close(self, wait: bool = True) -> None:
        """Run the callbacks already due, then stop the thread.

        Call it once the protected threads are done. From the callback thread itself (a
        callback that shuts the supervisor down) it never waits: the thread ends after the
        callback returns and the queue is drained.

        Args:
            wait: wait for the due callbacks to have run.
        """
        with self._lock:
            if not self._closed:
                self._closed = True
                if self._thread is not None:
                    self._queue.put(self._CLOSE)
            thread = self._thread  # a second close (the manager's, then the supervisor's) waits too
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is self._CLOSE:
                return
            fn, future = item
            try:
                fn(future)
            except Exception:
                _futures_log.exception("exception calling callback for %r", future)


class CallbackFuture(concurrent.futures.Future):
    """A ``Future`` whose done-callbacks go through a :class:`CallbackRunner`.

    Args:
        runner: decides where each callback runs.
    """

    def __init__(self, runner: CallbackRunner):
        super().__init__()
        self._runner = runner

    def add_done_callback(self, fn: Callback) -> None:
        """Attach ``fn``, called with the future once it is done (see the module docstring)."""
        runner = self._runner
        super().add_done_callback(lambda future: runner.run(fn, future))
