"""asyncio over a real supervisor, on real event loops (``asyncio.run``): no mocks.

Events are ordered by files the steps write and wait for (see ``step_library``); a test
waits for a file off the loop (``asyncio.to_thread``), so a blocked loop would deadlock the
test, which the timeouts then report.
"""

import asyncio
import os

import pytest

from api_steps import fail, hold_until, power, registry, wait_for_cancel
from governor import StepCancelled, Supervisor, aio
from step_library import wait_for_path


async def awaiting_the_running_step(awaitable, marker: str) -> asyncio.Task:
    """Await ``awaitable`` in a new task; return the task once the step wrote ``marker``."""
    waiting = asyncio.create_task(awaitable)
    await asyncio.to_thread(wait_for_path, marker)
    return waiting


@pytest.fixture
def sup():
    with Supervisor(registry, workers=2) as supervisor:
        yield supervisor


def test_asubmit_awaits_the_result_or_the_steps_error(sup):
    async def main():
        assert await sup.asubmit(power, 4) == 16
        assert await sup.asubmit("power", 2, exponent=5) == 32
        with pytest.raises(ValueError, match="boom"):
            await sup.asubmit(fail, "boom")
        return await asyncio.gather(*(sup.asubmit(power, n) for n in range(6)))

    assert asyncio.run(main()) == [n * n for n in range(6)]


def test_the_loop_keeps_running_while_a_step_runs(sup, tmp_path):
    started, go = str(tmp_path / "started"), str(tmp_path / "go")

    async def main():
        step = asyncio.create_task(sup.asubmit(hold_until, started, go))
        await asyncio.to_thread(wait_for_path, started)
        (tmp_path / "go").touch()  # only this coroutine releases the step: the loop was free
        return await step

    assert asyncio.run(main()) > 0


def test_cancelling_the_awaiting_task_cancels_the_governed_task(sup, tmp_path):
    marker = str(tmp_path / "running")

    async def main():
        waiting = await awaiting_the_running_step(sup.asubmit(wait_for_cancel, marker), marker)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(main())
    wait_for_path(marker + ".seen")  # the step itself saw the cancel


def test_a_cancelled_awaiter_leaves_the_future_cancelled_saying_why(sup, tmp_path):
    marker = str(tmp_path / "running")
    future = sup.submit(wait_for_cancel, marker)

    async def main():
        waiting = await awaiting_the_running_step(aio.result(future), marker)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(main())
    with pytest.raises(StepCancelled, match=aio.CANCEL_DETAIL):
        future.result(timeout=60)


def test_a_step_cancelled_by_someone_else_is_step_cancelled_not_the_awaiters_cancel(sup, tmp_path):
    marker = str(tmp_path / "running")
    future = sup.submit(wait_for_cancel, marker)

    async def main():
        waiting = await awaiting_the_running_step(aio.result(future), marker)
        future.cancel("by hand")
        with pytest.raises(StepCancelled, match="by hand"):
            await waiting
        assert not waiting.cancelled()

    asyncio.run(main())


def test_as_completed_yields_in_the_order_steps_finish(sup, tmp_path):
    first = sup.submit(hold_until, str(tmp_path / "a.started"), str(tmp_path / "a.go"))
    second = sup.submit(hold_until, str(tmp_path / "b.started"), str(tmp_path / "b.go"))

    async def main():
        await asyncio.to_thread(wait_for_path, str(tmp_path / "a.started"))
        await asyncio.to_thread(wait_for_path, str(tmp_path / "b.started"))
        (tmp_path / "b.go").touch()
        order = []
        async for future in aio.as_completed([first, second, first]):  # a duplicate comes once
            order.append(future)
            if future is second:
                (tmp_path / "a.go").touch()  # released only once the second was yielded
        return order

    assert asyncio.run(main()) == [second, first]
    assert first.result() != second.result(), "two workers ran them"


def test_as_completed_times_out_and_leaves_the_steps_running(sup, tmp_path):
    held = sup.submit(hold_until, str(tmp_path / "started"), str(tmp_path / "go"))
    done = sup.submit(power, 3)

    async def main():
        yielded = []
        with pytest.raises(TimeoutError, match="1 "):
            async for future in aio.as_completed([held, done], timeout=0.5):
                yielded.append(future)
        return yielded

    assert asyncio.run(main()) == [done]
    assert not held.done()
    (tmp_path / "go").touch()
    assert held.result(timeout=60) == int(open(tmp_path / "started").read())


def test_cancelling_the_iterating_task_cancels_what_it_was_waiting_for(sup, tmp_path):
    markers = [str(tmp_path / f"running{n}") for n in range(2)]
    futures = [sup.submit(wait_for_cancel, marker) for marker in markers]

    async def main():
        async def consume():
            async for future in aio.as_completed(futures):
                pass

        consumer = asyncio.create_task(consume())
        for marker in markers:
            await asyncio.to_thread(wait_for_path, marker)
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer

    asyncio.run(main())
    for future in futures:
        with pytest.raises(StepCancelled, match=aio.CANCEL_DETAIL):
            future.result(timeout=60)
    assert all(os.path.exists(marker + ".seen") for marker in markers)
