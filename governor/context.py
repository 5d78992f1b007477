"""What a running step can ask of Governor: am I cancelled?

Inside a worker the supervisor's cancel reaches the step as a flag on its
:class:`StepContext` (set by the worker's control thread). A step that polls it
(``ctx.cancelled``, ``ctx.check()``) or sleeps through ``ctx.wait()`` stops at once and keeps
its worker warm; a step that ignores it is killed after ``Limits.cancel_grace_s``.

Outside a worker (a step function called directly, in a test or the sequential baseline)
:func:`current_context` returns a detached context that is never cancelled, so steps can
call it unconditionally.
"""

from __future__ import annotations

import threading
from typing import Optional

from governor.errors import StepCancelled


class StepContext:
    """The running step's view of its task.

    Attributes:
        task_id: the task's id within its supervisor (``0`` when detached).
        step: the step's name (``""`` when detached).
    """

    def __init__(self, task_id: int = 0, step: str = ""):
        self.task_id = task_id
        self.step = step
        self._cancelled = False
        # Made by the first wait() only: an Event costs a Condition and two locks, and a
        # context is made for every task, most of which never wait.
        self._wakeup: Optional[threading.Event] = None
        self._reason = "explicit"
        self._detail: Optional[str] = None

    @property
    def cancelled(self) -> bool:
        """True once the supervisor asked this step to stop."""
        return self._cancelled

    def check(self) -> None:
        """Raise :class:`~governor.errors.StepCancelled` if the step was asked to stop.

        Raising it (or letting it propagate) ends the task as cancelled without
        killing the worker.
        """
        if self._cancelled:
            raise StepCancelled(self.step, self.task_id, self._reason, self._detail)

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Sleep up to ``timeout`` seconds, waking early on cancel.

        Returns:
            True if the step was cancelled (then it should stop), False on timeout.
        """
        with _wakeup_lock:
            if self._wakeup is None:
                self._wakeup = threading.Event()
                if self._cancelled:
                    self._wakeup.set()
            wakeup = self._wakeup
        return wakeup.wait(timeout)

    def request_cancel(self, reason: str, detail: Optional[str]) -> None:
        """Set the flag (called by the worker's control thread, not by steps)."""
        self._reason, self._detail = reason, detail
        with _wakeup_lock:
            self._cancelled = True
            if self._wakeup is not None:
                self._wakeup.set()


# Orders a cancel against the first wait() of a step, which makes the context's Event.
_wakeup_lock = threading.Lock()
_DETACHED = StepContext()
_current: Optional[StepContext] = None


def current_context() -> StepContext:
    """The context of the step running in this process (a detached one outside workers)."""
    return _current if _current is not None else _DETACHED


def _set_current(context: Optional[StepContext]) -> None:
    global _current
    _current = context
