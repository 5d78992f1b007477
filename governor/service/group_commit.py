"""The daemon's journal writes, gathered over one turn of its event loop and committed together.

Data flow::

    request handlers (loop) ── write(fn) ──┐
    _task_done (loop) ──────── write(fn) ──┴─ pending: (fn, future), in arrival order
    manager thread ── write_later(fn) ─────── later: a deque, waking nothing (a pool step's start)
                    the first write of a group schedules flush() with call_soon, so it runs
                    once the loop has run what is ready now: every request and end of the turn
    flush() ── Journal.group(): the later writes, then fn(group) for each write; one
               transaction, one sync
            ── each write's future gets what its fn returned (or raised), after the commit

A submission is acknowledged once its future resolves, so never before it is durable (as
durable as the journal's ``sync`` makes it); a task's waiters are answered once its end is.
One fsync then covers every write of the turn, which is what makes ``--journal-sync full``
affordable under load.

A commit that fails as a whole (``sqlite3.OperationalError``: another process holds the
journal's lock past its busy timeout, the disk is full) is tried again, with every write it
held, every :data:`RETRY_S`; nothing waiting on it is answered meanwhile, and nothing is
lost. A single write that raises (an invalid transition) fails only its own future.

Loop thread only, but for :meth:`GroupCommit.write_later`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sqlite3
from typing import Any, Callable, Deque, List, Optional, Tuple

from governor.service.journal import Journal, JournalError, JournalGroup

log = logging.getLogger("governor.service.group_commit")

#: How soon a group whose commit failed is tried again: often enough that waiters hear soon
#: after the journal is free, rarely enough that a journal locked for minutes costs a
#: commit attempt a second.
RETRY_S = 1.0

Write = Callable[[JournalGroup], Any]


class GroupCommit:
    """Journal writes made in one turn of ``loop``, committed in one transaction.

    Args:
        journal: where the writes go.
        loop: the daemon's event loop; every method is called on it.
    """

    def __init__(self, journal: Journal, loop: asyncio.AbstractEventLoop):
        self._journal = journal
        self._loop = loop
        self._pending: List[Tuple[Write, Optional[asyncio.Future]]] = []
        self._later: Deque[Write] = collections.deque()
        self._flush_scheduled = False
        self.commits = 0  # groups committed, for the daemon's statistics

    def write(self, fn: Write) -> asyncio.Future:
        """Run ``fn(group)`` in this turn's transaction; the future resolves to its result
        once that transaction is committed (or to its exception)."""
        future = self._loop.create_future()
        self._pending.append((fn, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return future

    def write_later(self, fn: Write) -> None:
        """Run ``fn(group)`` in the next group the loop commits, whenever that is (any thread).

        For a write nobody waits for and that need not be durable soon: it wakes nothing
        (on a loaded machine a wake of the loop's thread costs a client milliseconds), and
        rides with the loop's next writes. ``fn`` reports its own failures.
        """
        self._later.append(fn)  # deque.append is atomic: no lock with the loop's popleft

    async def settle(self) -> None:
        """Return once every write made so far, :meth:`write_later` ones included, is committed
        (for a reader of the journal, such as ``status``: a running pool step reads running)."""
        if self._later or self._pending:
            await self.write(lambda group: None)

    def _flush(self) -> None:
        self._flush_scheduled = False
        later = [(self._later.popleft(), None) for _ in range(len(self._later))]  # before this turn's
        writes, self._pending = later + self._pending, []
        outcomes: List[Tuple[bool, Any]] = []
        try:
            with self._journal.group() as group:
                for fn, _ in writes:
                    try:
                        outcomes.append((True, fn(group)))
                    except sqlite3.OperationalError:
                        raise  # the whole transaction is in doubt: try it all again
                    except Exception as error:  # this write changed nothing; the others go on
                        outcomes.append((False, error))
        except JournalError as closed:  # the daemon stopped: these writes are the next start's to redo
            for _, future in writes:
                if future is not None and not future.done():
                    future.set_exception(closed)
            return
        except sqlite3.OperationalError as error:
            log.warning("could not commit %d journal writes (%s); trying again in %ss", len(writes), error, RETRY_S)
            self._pending[:0] = writes  # first again, in their order
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._loop.call_later(RETRY_S, self._flush)
            return
        self.commits += 1
        for (_, future), (ok, value) in zip(writes, outcomes):
            if future is None or future.cancelled():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
