"""asyncio over an in-process supervisor: await a step, iterate steps as they finish.

::

    async def view(sup):
        status = await sup.asubmit("git.status", repo=".")      # the result, or the step's error
        futures = [sup.submit(name) for name in names]
        async for future in aio.as_completed(futures):            # each TaskFuture as it ends
            print(future.result())

A task's future is resolved on a Governor thread; :func:`result` and :func:`as_completed`
hand that over to the event loop with ``call_soon_threadsafe``, so nothing here blocks the
loop. Unlike ``asyncio.wrap_future``, a step cancelled by someone else (a scope, a
supersede, a shutdown) reaches the awaiting coroutine as
:class:`~governor.errors.StepCancelled` saying why, a plain exception, and not as an
``asyncio.CancelledError``, which asyncio reserves for cancelling the awaiting task itself.

Cancel-safety: cancelling the asyncio task that awaits :func:`result` (or iterates
:func:`as_completed`) cancels the governed tasks it was waiting for, with the detail
:data:`CANCEL_DETAIL`: a queued step never starts, a running one gets the cooperative
cancel and then its worker is killed after ``cancel_grace_s``, as with ``future.cancel()``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any, AsyncIterator, Iterable, Optional

from governor.task import TaskFuture, WorkflowFuture

#: The detail a cancel carries when the awaiting asyncio task was cancelled (it reaches
#: ``StepCancelled``'s message and the logs).
CANCEL_DETAIL = "the asyncio task awaiting it was cancelled"


def _hand_over(future: concurrent.futures.Future, loop: asyncio.AbstractEventLoop, deliver) -> None:
    """Call ``deliver(future)`` on ``loop``'s thread once ``future`` is done."""

    def done(finished: concurrent.futures.Future) -> None:  # on the thread that resolved it
        try:
            loop.call_soon_threadsafe(deliver, finished)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    future.add_done_callback(done)


def _copy_outcome(source: concurrent.futures.Future, waiter: asyncio.Future) -> None:
    if waiter.done():  # the awaiting task was cancelled in the meantime
        return
    try:
        waiter.set_result(source.result())
    except Exception as error:  # the step's error, or StepCancelled saying why
        waiter.set_exception(error)


async def result(future: concurrent.futures.Future) -> Any:
    """Await ``future`` (a ``TaskFuture`` or ``WorkflowFuture``) without blocking the loop.

    Returns:
        the step's result.

    Raises:
        the step's error, as ``future.result()`` would (``StepCancelled`` when the task was
        cancelled by anyone but the awaiting task). If the awaiting task is cancelled, the
        governed task is cancelled too and ``asyncio.CancelledError`` propagates.
    """
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    _hand_over(future, loop, lambda finished: _copy_outcome(finished, waiter))
    try:
        return await waiter
    except asyncio.CancelledError:
        _cancel(future)
        raise


def _cancel(future: concurrent.futures.Future) -> None:
    if isinstance(future, (TaskFuture, WorkflowFuture)):
        future.cancel(CANCEL_DETAIL)  # ours say why
    else:
        future.cancel()


async def as_completed(futures: Iterable[concurrent.futures.Future],
                       timeout: Optional[float] = None) -> AsyncIterator[concurrent.futures.Future]:
    """Yield each of ``futures`` once it is done, in the order they finish.

    The async twin of ``concurrent.futures.as_completed``: it yields the finished futures
    themselves (call ``result()`` on them; it does not block), duplicates once.

    Args:
        futures: task or workflow futures (any ``concurrent.futures.Future`` works).
        timeout: seconds from the call for all of them; ``None`` waits as long as it takes.

    Raises:
        TimeoutError: some had not finished after ``timeout`` (they go on running).

    Leaving the loop early (``break``) leaves the rest running, as the stdlib does; if the
    iterating task is cancelled while it waits for the next future, the futures not yet
    yielded are cancelled with it.
    """
    pending = set(futures)
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    finished: asyncio.Queue = asyncio.Queue()
    for future in pending:
        _hand_over(future, loop, finished.put_nowait)
    try:
        while pending:
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                future = await asyncio.wait_for(finished.get(), remaining)
            except TimeoutError:
                raise TimeoutError(f"{len(pending)} (of the futures given) unfinished after {timeout}s") from None
            pending.discard(future)
            yield future
    except asyncio.CancelledError:
        for future in pending:
            _cancel(future)
        raise
