"""The pool lane's queue: higher priorities first, first come first served within one,
and aging so that no priority waits for ever.

The aging rule: waiting :data:`AGING_S` seconds counts as much as one step of priority.
A task of priority ``p`` queued at time ``t`` is ranked as if it had been queued at
``t - p * AGING_S`` with no priority, and tasks start in that order. So a task of
priority 10 goes ahead of the priority-0 tasks queued in the 10 s before it, but not of
one that has waited longer than that: a task waits behind later arrivals of priority
``q`` above its own ``p`` for at most ``(q - p) * AGING_S`` seconds. Ranks are fixed when
a task is queued, so the order is a heap's, not a re-sort as time passes.
"""

from __future__ import annotations

import collections
import heapq
import itertools
from typing import Deque, Iterator, List, Tuple

from governor.task import Task

#: Seconds of waiting worth one step of priority (see the module docstring).
AGING_S = 1.0


class RankedQueue:
    """A lane's queue in rank order (the module docstring), with a deque's ``append``,
    ``popleft``, ``clear``, ``len`` and iteration (in no particular order).

    Tasks of priority 0, the common case, go in a plain deque (their order is their rank
    order); only the others pay for the heap.
    """

    __slots__ = ("_plain", "_ranked", "_seq")

    def __init__(self) -> None:
        self._plain: Deque[Task] = collections.deque()
        self._ranked: List[Tuple[float, int, Task]] = []
        self._seq = itertools.count()  # first come first served among equal ranks

    def append(self, task: Task) -> None:
        if task.priority == 0:
            self._plain.append(task)
        else:
            heapq.heappush(self._ranked, (task.submitted_at - task.priority * AGING_S, next(self._seq), task))

    def popleft(self) -> Task:
        """The task of the best rank, taken off the queue.

        Raises:
            IndexError: the queue is empty.
        """
        plain, ranked = self._plain, self._ranked
        if ranked and (not plain or ranked[0][0] < plain[0].submitted_at):
            return heapq.heappop(ranked)[2]
        return plain.popleft()

    def clear(self) -> None:
        self._plain.clear()
        self._ranked.clear()

    def __len__(self) -> int:
        return len(self._plain) + len(self._ranked)

    def __iter__(self) -> Iterator[Task]:
        yield from self._plain
        yield from (entry[2] for entry in self._ranked)
