"""What the supervisor counts, and the snapshot users read.

The manager thread records; any thread may read a snapshot. Each record and each snapshot
takes one short lock: recording costs a dict update, never a syscall.
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Dict

from governor.limits import Lane
from governor.task import Task


class MetricsRecorder:
    """Counters the manager updates as tasks end and workers come and go."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._outcomes: Dict[tuple, int] = collections.Counter()
        self._spawns: Dict[str, int] = collections.Counter()
        self._kills: Dict[tuple, int] = collections.Counter()
        self._recycles: Dict[tuple, int] = collections.Counter()

    def task_finished(self, task: Task) -> None:
        with self._lock:
            self._outcomes[(task.lane.value, task.step, task.state.value)] += 1

    def worker_spawned(self, lane: Lane) -> None:
        with self._lock:
            self._spawns[lane.value] += 1

    def worker_killed(self, lane: Lane, reason: str) -> None:
        with self._lock:
            self._kills[(lane.value, reason)] += 1

    def worker_recycled(self, lane: Lane, reason: str) -> None:
        with self._lock:
            self._recycles[(lane.value, reason)] += 1

    def snapshot(self) -> Dict[str, Any]:
        """A JSON-serialisable copy of every counter."""
        with self._lock:
            tasks: Dict[str, Dict[str, Dict[str, int]]] = {}
            for (lane, step, outcome), count in self._outcomes.items():
                tasks.setdefault(lane, {}).setdefault(step, {})[outcome] = count
            return {
                "tasks": tasks,
                "worker_spawns": dict(self._spawns),
                "worker_kills": _nest(self._kills),
                "worker_recycles": _nest(self._recycles),
            }


def _nest(counter: Dict[tuple, int]) -> Dict[str, Dict[str, int]]:
    nested: Dict[str, Dict[str, int]] = {}
    for (lane, reason), count in counter.items():
        nested.setdefault(lane, {})[reason] = count
    return nested
