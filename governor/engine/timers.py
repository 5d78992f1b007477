"""Deadlines on the monotonic clock: a heap with lazy deletion.

Entries are ``(when, seq, kind, target)``, where ``kind`` is what the owner acts on when
the entry comes due: a bound handler called with ``target`` (the local lanes) or an enum
member (the Ray lane); never a string, so a typo fails at import. Nothing is removed when
a task ends early: the owner checks, as each entry comes due, whether it still applies, and :meth:`Timers.prune`
rebuilds the heap when stale entries outnumber live ones. The clock is injected so the
logic can be tested without waiting (trio's ``Deadlines``, ``run(clock=...)``).
"""

from __future__ import annotations

import heapq
import itertools
import time
from typing import Any, Callable, Iterator, List, Optional, Tuple


class Timers:
    """A heap of ``(when, seq, kind, target)`` entries, ordered by time, then insertion."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._heap: List[Tuple[float, int, Any, Any]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def after(self, delay: float, kind: Any, target: Any) -> float:
        """Schedule ``(kind, target)`` ``delay`` seconds from now; return the due time."""
        when = self.clock() + delay
        heapq.heappush(self._heap, (when, next(self._seq), kind, target))
        return when

    def next_due(self) -> Optional[float]:
        """When the earliest entry is due, or ``None`` if there is none."""
        return self._heap[0][0] if self._heap else None

    def pop_due(self) -> Iterator[Tuple[Any, Any]]:
        """Yield ``(kind, target)`` of every entry due by now, earliest first."""
        now = self.clock()
        while self._heap and self._heap[0][0] <= now:
            _, _, kind, target = heapq.heappop(self._heap)
            yield kind, target

    def prune(self, still_applies: Callable[[Any, Any], bool]) -> None:
        """Drop every entry for which ``still_applies(kind, target)`` is false."""
        self._heap = [entry for entry in self._heap if still_applies(entry[2], entry[3])]
        heapq.heapify(self._heap)

    def prune_if_stale(self, live: int, still_applies: Callable[[Any, Any], bool]) -> None:
        """:meth:`prune` once entries outnumber the ``live`` things they may be for 4 to 1
        (and there are more than 64): tasks that end before their deadlines leave entries
        behind, and a heap of mostly stale entries costs every push and pop."""
        if len(self._heap) > 64 and len(self._heap) > 4 * live:
            self.prune(still_applies)
