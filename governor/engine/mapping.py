"""``Supervisor.map`` and ``Supervisor.imap_unordered``: lazy maps that keep their lane's queue bounded.

Everything runs on the thread that iterates (no thread of its own)::

    map(step, *iterables)  ──> MapRun: check the call's shape once; top up
    next(results)          ──> top up: pull calls from the iterables into tasks, while the
                               window (``buffersize``, else the lane's ``queue_size``) has room,
                               and submit as many as the lane's queue takes now
                           ──> wait for the oldest task (``map``) or for any task
                               (``imap_unordered``, woken by a done-callback) ──> yield

A map holds at most its window of tasks submitted and not yet yielded, so ``map`` over a
million calls neither raises ``QueueFull`` nor holds a million futures: the caller's memory
stays flat. When the lane's queue is full of other work and the map has nothing in
flight, it waits for room (``Supervisor._wait_for_room``) rather than raise.

``chunksize="auto"`` sends the first calls one per task, one per pool worker, and sizes the
chunks from the first one's time in its worker so that a chunk runs about
:data:`AUTO_CHUNK_TARGET_S`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import operator
import queue
import time
from typing import TYPE_CHECKING, Any, Callable, Deque, Iterable, Iterator, Optional, Set, Union

from governor.errors import QueueFull
from governor.task import Task, TaskFuture

if TYPE_CHECKING:
    from governor.engine.routes import Route
    from governor.engine.supervisor import Supervisor

#: ``chunksize="auto"`` aims at chunks that run this long in their worker: long enough that
#: the ~0.1-0.3 ms a task costs on its way is under 1 % of it, short enough that a chunk
#: killed by its timeout or a cancel loses little.
AUTO_CHUNK_TARGET_S = 0.05

#: ``chunksize="auto"`` never packs more calls than this into one task.
AUTO_CHUNK_MAX = 10_000

#: A map tops up its window only once this share of it is free (or it has nothing in
#: flight), so a long map takes the supervisor's lock and wakes the manager once per batch
#: rather than once per result.
TOP_UP_SHARE = 1 / 16

#: What ``progress`` may be: ``True`` (a tqdm bar), a callable, or ``None``.
Progress = Union[bool, Callable[[int, Optional[int]], Any], None]


class MapRun:
    """One map's state, owned by the thread that iterates it.

    Args:
        supervisor: submits the tasks and, when the lane is full, waits for room.
        route: the step's route (name, lane, limits).
        iterables: the map's iterables, zipped lazily.
        chunksize: calls per task, or ``"auto"``.
        buffersize: the most tasks submitted and not yet yielded (``None``: the lane's
            queue size).
        timeout: seconds from now for every result.
        progress: reported the calls done so far (see :func:`progress_reporter`).
    """

    def __init__(self, supervisor: "Supervisor", route: "Route", iterables: tuple, chunksize: Union[int, str],
                 buffersize: Optional[int], timeout: Optional[float], progress: Progress):
        self._supervisor = supervisor
        self._route = route
        self._calls = zip(*iterables)
        total = _known_length(iterables)
        workers = max(1, supervisor.workers)
        self._chunked = chunksize == "auto" or chunksize > 1
        self._chunksize = 1 if chunksize == "auto" else chunksize
        # "auto": one call per task for each pool worker, then no more tasks until the
        # first one's time sizes the rest (see _size_chunks).
        self._probe_left: Optional[int] = workers if chunksize == "auto" else None
        self._auto_cap = AUTO_CHUNK_MAX if total is None else max(1, -(-total // (4 * workers)))
        self._window = buffersize or supervisor.queue_size
        self._batch = max(1, int(self._window * TOP_UP_SHARE))
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._held: Deque[Task] = collections.deque()  # made, not yet taken by the lane's queue
        self._in_flight: Deque[TaskFuture] = collections.deque()  # submitted, in submission order
        self._watched: Set[TaskFuture] = set()  # imap_unordered's: submitted, waited for in any order
        self._outstanding = 0  # submitted and not yet yielded: at most the window
        self._exhausted = False
        self._report = progress_reporter(progress, total)
        self._done_calls = 0

    @property
    def _sizing(self) -> bool:
        return self._probe_left is not None

    def _finished(self) -> bool:
        return self._exhausted and not self._held and not self._outstanding

    # ----------------------------------------------------------------- feeding

    def top_up(self) -> None:
        """Submit tasks while the window and the lane's queue have room; if the map has
        nothing in flight, wait for the lane to have room rather than submit nothing."""
        while True:
            free = self._window - self._outstanding
            if free <= 0 or (self._outstanding and free < self._batch):
                return
            self._make_tasks(free - len(self._held))
            if not self._held:
                return
            room = self._supervisor._queue_room(self._route.lane)
            if room == 0:
                if self._outstanding:
                    return  # a result will come: try again after it
                room = self._supervisor._wait_for_room(self._route.lane, self._deadline)
            batch = [self._held[index] for index in range(min(room, free, len(self._held)))]
            try:
                self._supervisor._enqueue(batch)
            except QueueFull:
                continue  # another submitter took the room meanwhile
            for _ in batch:
                self._in_flight.append(self._held.popleft().future)
            self._outstanding += len(batch)

    def _make_tasks(self, wanted: int) -> None:
        route, now = self._route, self._supervisor._clock()
        while wanted > 0 and not self._exhausted and self._probe_left != 0:
            calls = list(itertools.islice(self._calls, self._chunksize))
            if not calls:
                self._exhausted = True
                return
            if self._chunked:
                task = Task(0, route.spec.name, route.lane, tuple(calls), {}, route.limits, now, chunk=True)
            else:
                task = Task(0, route.spec.name, route.lane, calls[0], {}, route.limits, now,
                            key=route.key_of(calls[0], {}))
            task.future = self._supervisor._future_of(task)
            self._held.append(task)
            wanted -= 1
            if self._probe_left is not None:
                self._probe_left -= 1

    def _size_chunks(self, first: TaskFuture) -> None:
        """``chunksize="auto"``: size the chunks from the first one's time in its worker."""
        self._probe_left = None
        task = first.task
        took = task.ended_at - task.started_at if task.started_at is not None and task.ended_at is not None else 0.0
        per_call = took / max(1, len(task.args))
        size = AUTO_CHUNK_MAX if per_call <= 0 else int(AUTO_CHUNK_TARGET_S / per_call)
        self._chunksize = max(1, min(self._auto_cap, size))

    # ----------------------------------------------------------------- results

    def results_in_order(self) -> Iterator[Any]:
        """``map``'s results, in the order of the calls."""
        try:
            while not self._finished():
                self.top_up()
                future = self._in_flight.popleft()
                value = future.result(self._remaining())
                yield from self._yielded(future, value)
        finally:
            self.close()

    def results_as_completed(self) -> Iterator[Any]:
        """``imap_unordered``'s results, as their tasks end."""
        ended: "queue.SimpleQueue[TaskFuture]" = queue.SimpleQueue()
        try:
            while not self._finished():
                self.top_up()
                while self._in_flight:
                    future = self._in_flight.popleft()
                    self._watched.add(future)
                    # A plain Future's callback, not the supervisor's deferred one: it runs on
                    # the manager thread, where a put on a SimpleQueue cannot block anything.
                    concurrent.futures.Future.add_done_callback(future, ended.put)
                try:
                    future = ended.get(timeout=self._remaining())
                except queue.Empty:
                    raise TimeoutError("the map's timeout passed before every result was ready") from None
                self._watched.discard(future)
                yield from self._yielded(future, future.result(0))
        finally:
            self.close()

    def _yielded(self, future: TaskFuture, value: Any) -> Iterator[Any]:
        self._outstanding -= 1
        if self._sizing:
            self._size_chunks(future)
        self._done_calls += len(value) if self._chunked else 1
        if self._report is not None:
            self._report(self._done_calls)
        if self._chunked:
            yield from value
        else:
            yield value

    def _remaining(self) -> Optional[float]:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def close(self) -> None:
        """Cancel what was submitted and not yielded; drop what was not submitted."""
        self._held.clear()
        for future in itertools.chain(self._in_flight, self._watched):
            future.cancel("the map's iterator was closed")
        self._in_flight.clear()
        self._watched.clear()
        if self._report is not None:
            self._report(None)
            self._report = None


def progress_reporter(progress: Progress, total: Optional[int]) -> Optional[Callable[[Optional[int]], None]]:
    """A function the map calls with the calls done so far, and with ``None`` once it ends.

    ``progress`` is a callable ``progress(done, total)`` (``total`` is ``None`` when the
    iterables have no length), called on the iterating thread after each result; or
    ``True`` for a tqdm bar (tqdm must be installed).
    """
    if progress is None or progress is False:
        return None
    if progress is True:
        try:
            from tqdm import tqdm
        except ImportError:
            raise ModuleNotFoundError("map(progress=True) draws a tqdm bar: install tqdm, or pass a "
                                      "callable progress(done, total)") from None
        bar = tqdm(total=total, unit="call")

        def report_on_bar(done: Optional[int]) -> None:
            if done is None:
                bar.close()
            else:
                bar.update(done - bar.n)
        return report_on_bar
    if not callable(progress):
        raise TypeError(f"progress must be True, None or a callable, not {type(progress).__name__}")

    def report(done: Optional[int]) -> None:
        if done is not None:
            progress(done, total)
    return report


def _known_length(iterables: Iterable[Any]) -> Optional[int]:
    """How many calls ``zip(*iterables)`` makes, when every iterable knows its length."""
    lengths = [operator.length_hint(iterable, -1) if hasattr(iterable, "__len__") else -1 for iterable in iterables]
    return None if not lengths or min(lengths) < 0 else min(lengths)
