"""Task ends, handed from the supervisor's threads to the daemon's loop in bulk.

Data flow::

    manager thread: a task's future resolves -> EndInbox._put (a NonBlocking done-callback,
                    so it runs there, not on the supervisor's callback thread):
                    append the record id; wake the loop only if no drain is due yet
    loop thread:    _drain -> on_end(record id) for every end that came, in order

Under load one wake-up of the loop (a byte on its self-pipe) then carries every end since
the last turn, and those ends share one group commit; before, each end woke the callback
thread and then the loop, one at a time.

Why the flag is enough without a lock: a producer appends *before* it reads the flag, and
the drain clears the flag *before* it pops. A producer that reads the flag set was therefore
seen before the drain began popping; one that reads it cleared schedules a drain of its own
(at worst one that finds nothing). deque appends and pops are atomic.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
from typing import Callable, Deque

from governor.callbacks import NonBlocking


class EndInbox:
    """Record ids of ended tasks, delivered to ``on_end`` on ``loop`` in bulk.

    Args:
        loop: the daemon's event loop.
        on_end: called on the loop with each ended task's record id, in the order they ended.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, on_end: Callable[[int], None]):
        self._loop = loop
        self._on_end = on_end
        self._ended: Deque[int] = collections.deque()
        self._drain_due = False

    def watch(self, record_id: int, future: concurrent.futures.Future) -> None:
        """Deliver ``record_id`` once ``future`` is done (any thread)."""
        future.add_done_callback(NonBlocking(functools.partial(self._put, record_id)))

    def _put(self, record_id: int, _future: concurrent.futures.Future) -> None:
        self._ended.append(record_id)
        if not self._drain_due:
            self._drain_due = True
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:
                pass  # the loop is closed: the daemon has stopped, and the journal keeps the task

    def _drain(self) -> None:
        self._drain_due = False
        for _ in range(len(self._ended)):  # what came later has a drain of its own due
            self._on_end(self._ended.popleft())
