"""The seats file: 8 bytes per live worker, mapped by the worker and by the supervisor.

A worker writes into its seat the negated id of the task it takes off its socket, before
it unpickles the task's arguments, then the id itself, before the step starts (:class:`Seat`,
in the worker). When a worker dies with a task assigned, the supervisor reads the seat
(:class:`Seats`) to know how far it got: a task its worker never took goes to another
worker instead of failing (an idle worker killed from outside just as a task was sent to
it); one whose unpickling killed it fails as ``PoisonedTask`` (each worker it went to
would die alike); one whose step had started crashed. Two stores per task, no message,
no syscall.
"""

from __future__ import annotations

import mmap
import struct
from typing import Optional

#: Bytes of the seats file per worker: the id of the task the worker has taken.
SEAT_BYTES = 8


class Seat:
    """A worker's own seat (in the worker process)."""

    def __init__(self, path: str, index: int):
        with open(path, "r+b") as file:
            self._map = mmap.mmap(file.fileno(), 0)
        self._offset = index * SEAT_BYTES

    def write(self, task_id: int) -> None:
        struct.pack_into("q", self._map, self._offset, task_id)

    def read(self) -> int:
        return struct.unpack_from("q", self._map, self._offset)[0]

    def close(self) -> None:
        self._map.close()


class Seats:
    """The supervisor's map of the whole file: one seat per live worker, handed out and
    taken back here (on the manager thread)."""

    def __init__(self, path: str, capacity: int):
        self.path = path
        with open(path, "wb") as file:
            file.truncate(capacity * SEAT_BYTES)
        with open(path, "r+b") as file:
            self._map = mmap.mmap(file.fileno(), 0)
        self._free = list(range(capacity - 1, -1, -1))

    def take(self) -> Optional[int]:
        """A free seat, cleared; ``None`` if every seat is in use."""
        if not self._free:
            return None
        seat = self._free.pop()
        struct.pack_into("q", self._map, seat * SEAT_BYTES, 0)
        return seat

    def task_taken(self, seat: int) -> int:
        """The id of the task the seat's worker last took off its socket (0: none); its
        negative while the worker unpickled that task's arguments."""
        return struct.unpack_from("q", self._map, seat * SEAT_BYTES)[0]

    def give_back(self, seat: int) -> None:
        self._free.append(seat)

    def close(self) -> None:
        self._map.close()
