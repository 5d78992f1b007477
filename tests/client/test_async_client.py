"""governor.AsyncClient against a real daemon, on real event loops."""

import asyncio
import signal

import psutil
import pytest

from daemon_harness import daemon, kill_all  # noqa: F401 (a fixture)
from governor import AsyncClient, Call, Limits, StepCancelled, StepFailed, StepTimeout, UnknownStep
from governor.client import DaemonUnavailable


def test_the_api_round_trips(daemon):
    async def scenario():
        async with AsyncClient(daemon.socket) as client:
            assert (await client.ping())["version"] == 1
            assert await client.submit("echo", value=[1, "two"]) == [1, "two"]
            with pytest.raises(StepFailed):
                await client.submit("boom")
            with pytest.raises(UnknownStep):
                await client.submit("no.such.step")
            with pytest.raises(StepTimeout):
                await client.submit_call(Call("busy_loop", limits=Limits(timeout_s=0.2)))
            assert await client.run_batch([("echo", {"value": n}) for n in range(5)]) == list(range(5))
            outcomes = await client.run_batch([("echo", {"value": 1}), ("boom", {})], return_exceptions=True)
            assert outcomes[0] == 1 and isinstance(outcomes[1], StepFailed)
            assert await client.workflow([("echo", {"value": "a"}), ("echo", {"value": "b"})]) == ["a", "b"]
            many = await asyncio.gather(*(client.submit("echo", value=n) for n in range(50)))
            assert many == list(range(50))
            recent = await client.status()
            record = await client.wait(recent[0]["task_id"], timeout=30)
            assert record["final"] and (await client.status(record["task_id"]))["state"] == record["state"]
            assert any(step["name"] == "echo" for step in await client.steps())
            assert (await client.cancel(recent[0]["task_id"]))["finished"] == [recent[0]["task_id"]]
    asyncio.run(scenario())


def test_cancelling_the_awaiting_task_cancels_the_governed_task(daemon, tmp_path):
    marker = tmp_path / "running"

    async def scenario():
        async with AsyncClient(daemon.socket) as client:
            awaiting = asyncio.create_task(client.submit("busy_loop", marker=str(marker)))
            while not marker.exists():  # the step writes it once it runs
                await asyncio.sleep(0.02)
            [running] = [t for t in await client.status() if t["step"] == "busy_loop"]
            awaiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await awaiting
            record = await client.wait(running["task_id"], timeout=60)
            assert record["final"] and record["state"] == "cancelled", record
            batch = asyncio.create_task(client.run_batch([("timed_sleep", {"ms": 60_000})] * 2))
            await asyncio.sleep(0)  # sent; cancelled before or after the acknowledgement
            batch.cancel()
            with pytest.raises(asyncio.CancelledError):
                await batch
            sleeping = [t for t in await client.status() if t["step"] == "timed_sleep"]
            for task in sleeping:
                assert (await client.wait(task["task_id"], timeout=60))["state"] == "cancelled"
    asyncio.run(scenario())


def test_daemon_loss_is_daemon_unavailable(daemon):
    async def scenario():
        client = AsyncClient(daemon.socket)
        pending = asyncio.create_task(client.submit("timed_sleep", ms=120_000))
        while not [t for t in await client.status() if t["step"] == "timed_sleep"]:
            await asyncio.sleep(0.02)
        children = psutil.Process(daemon.process.pid).children(recursive=True)
        daemon.stop(signal.SIGKILL)
        with pytest.raises(DaemonUnavailable):
            await pending
        await client.close()
        return children
    kill_all(asyncio.run(scenario()))


def test_a_superseded_batch_is_answered_while_its_running_step_is_still_stopping(daemon, tmp_path):
    """The daemon answers the superseded batch when the newer one arrives, not after its steps
    stop: here one runs on in C code deaf to the cooperative cancel, for its 60 s grace."""
    marker = tmp_path / "running"
    stubborn = Call("deaf_to_cancel", kwargs={"marker": str(marker)})

    async def scenario():
        async with AsyncClient(daemon.socket) as client, AsyncClient(daemon.socket) as newer:
            older = asyncio.create_task(client.run_batch([stubborn, ("echo", {"value": 1})], key="view:ann",
                                                         return_exceptions=True))
            while not marker.exists():  # the step writes its pid once it runs
                await asyncio.sleep(0.02)
            assert await newer.run_batch([("echo", {"value": 2})], key="view:ann") == [2]
            outcomes = await older
            [record] = [t for t in await client.status() if t["step"] == "deaf_to_cancel"]
            return outcomes, record

    outcomes, record = asyncio.run(scenario())
    psutil.Process(int(marker.read_text())).kill()  # spare the daemon's shutdown the 60 s grace
    assert isinstance(outcomes[0], StepCancelled) and outcomes[0].reason == "superseded", outcomes
    assert record["state"] == "running", "the answer came only after the superseded step had stopped"


def test_a_batch_of_the_most_calls_a_request_may_hold_comes_back_whole(daemon):
    """Its final reply, a record per task, is over the request cap (1 MiB) and over the
    backlog a client that reads may have waiting (8 MiB), under the reply cap (64 MiB)."""
    from governor import Client
    from governor.protocol import MAX_BATCH_CALLS

    calls = [("text_of", {"size": 1000})] * MAX_BATCH_CALLS
    with Client(daemon.socket) as client:
        assert client.run_batch(calls, timeout=300) == ["x" * 1000] * MAX_BATCH_CALLS

    async def scenario():
        async with AsyncClient(daemon.socket) as client:
            return await client.run_batch(calls)
    assert asyncio.run(scenario()) == ["x" * 1000] * MAX_BATCH_CALLS
