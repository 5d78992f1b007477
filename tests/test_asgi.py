"""``governor.asgi`` behind a real uvicorn server: supersede, disconnect, lifespan.

The client is real (httpx, or a raw socket closed mid-request for a disconnect), the server
is the reference backend (``governor.bench.backend``) on uvicorn, the steps run in real
worker processes. Events are ordered by what the server recorded (each request's futures),
never by sleeps; the bench (``view-load``) measures how fast.
"""

import asyncio
import os
import signal
import sys

import pytest

from conftest import wait_until
from step_library import wait_for_path
from governor import TaskState
from web_harness import ServerThread, open_view, served, served_by_daemon  # noqa: F401

import httpx  # noqa: E402  (after web_harness: it skips the module without the web extra)

from governor.asgi import SUPERSEDED_STATUS, by_query  # noqa: E402
from governor.bench.view_steps import SEED, SEED_753  # noqa: E402


def ended_cancelled_or_never_started(futures, superseded_at=None):
    """Every step ended cancelled, and those still queued at the cancel never started; with
    ``superseded_at`` (when the newer request submitted), a step may also have ended done before it."""
    for future in futures:
        task = future.task
        if superseded_at is not None and task.state is TaskState.DONE:
            assert task.ended_at <= superseded_at, (task.kwargs, task.ended_at, superseded_at)
            continue
        assert task.state is TaskState.CANCELLED, (task.step, task.kwargs, task.state)
        if task.dispatched_at is None:
            assert task.started_at is None and task.pid is None


async def five_clicks(url: str, gap_s: float):
    """Five views of one session, ``gap_s`` apart; their responses in order."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        async def click(chat: int):
            await asyncio.sleep(chat * gap_s)  # the scenario's pacing, not an ordering
            return await client.get(f"/view/{chat}", params={"session": "ann", "profile": "seed"})
        return await asyncio.gather(*(click(chat) for chat in range(5)))


@pytest.mark.parametrize("served", [16], indirect=True)
def test_five_requests_of_one_session_leave_only_the_last_running(served):
    responses = asyncio.run(five_clicks(served.url, 0.030))

    assert [response.status_code for response in responses] == [SUPERSEDED_STATUS] * 4 + [200]
    for response in responses[:4]:
        assert response.json()["error"] == "superseded"
    last = responses[4].json()
    assert last["chat_id"] == 4 and [part["part"] for part in last["parts"]] == [part for part, _ in SEED]
    requests = list(served.views.recent)
    assert len(requests) == 5
    for governed, newer in zip(requests, requests[1:]):
        ended_cancelled_or_never_started(governed.futures, superseded_at=newer.futures[0].task.submitted_at)
    answered = requests[-1]
    assert all(future.task.state is TaskState.DONE for future in answered.futures)


def test_a_client_that_disconnects_mid_view_leaves_no_step_behind(served):
    # Two workers for the twelve parts: two run, ten wait in the queue when the client leaves.
    client = open_view(served.port, "/view/1?session=bob&profile=seed-753")
    assert wait_until(lambda: served.views.recent and any(
        future.task.state is TaskState.RUNNING for future in served.views.recent[-1].futures), timeout=60)
    client.close()

    [governed] = served.views.recent
    assert wait_until(lambda: all(future.done() for future in governed.futures), timeout=60)
    assert len(governed.futures) == len(SEED_753)
    ended_cancelled_or_never_started(governed.futures)
    assert {future.task.cancel_request.reason for future in governed.futures} == {"scope"}
    assert any(future.task.dispatched_at is None for future in governed.futures)  # some were still queued
    assert served.views.governor.metrics()["in_flight"]["pool"] == 0


def test_a_superseded_request_whose_client_is_gone_gets_no_answer_and_the_next_one_does(served):
    gone = open_view(served.port, "/view/1?session=cy&profile=seed-753")
    assert wait_until(lambda: served.views.recent, timeout=60)
    gone.close()
    answer = httpx.get(f"{served.url}/view/2", params={"session": "cy", "profile": "seed"}, timeout=60)

    assert answer.status_code == 200 and answer.json()["chat_id"] == 2
    first, second = served.views.recent
    ended_cancelled_or_never_started(first.futures, superseded_at=second.futures[0].task.submitted_at)
    assert all(future.task.state is TaskState.DONE for future in second.futures)


def test_a_superseded_request_is_answered_while_its_running_step_is_still_stopping(tmp_path):
    """The 409 does not wait for the superseded request's steps to end: here one runs on in
    C code that never sees the cooperative cancel, for its 60 s grace, and the answer comes
    while it still runs."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from governor import Call, Supervisor
    from governor.asgi import GovernorMiddleware, request_governor
    from step_library import registry

    governors = []

    async def run(request):
        governors.append(request_governor(request.scope))
        call = Call(request.path_params["what"], kwargs=dict(request.query_params.items() - {("session", "eve")}))
        return JSONResponse({"results": await governors[-1].run_batch([call])})

    supervisor = Supervisor(registry, workers=2)
    app = Starlette(routes=[Route("/run/{what}", run)],
                    middleware=[Middleware(GovernorMiddleware, governor=supervisor,
                                           supersede=by_query("session", prefix="/run/"))])
    with ServerThread(app=app) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        # Running, not just sent to a worker: a cancel that reached the worker first would have
        # kept the step from starting, and the future would be done at once.
        marker = tmp_path / "running"
        older = open_view(server.port, f"/run/deaf_to_cancel?session=eve&marker={marker}")
        wait_for_path(str(marker))
        assert client.get("/run/noop", params={"session": "eve"}).status_code == 200
        answer = older.makefile("rb").readline()  # the 409's status line
        [deaf] = governors[0].futures
        still_running = not deaf.done()  # read from the task itself, not from a worker listing
        older.close()
        if still_running:  # spare the shutdown the step's 60 s grace
            os.kill(deaf.task.pid, signal.SIGKILL)

    assert answer.split()[1] == str(SUPERSEDED_STATUS).encode(), answer
    assert still_running, "the 409 came only after the superseded step had stopped"


async def two_clicks_out_of_order(url: str):
    """Ann's second click (seq 2) reaches the server before her first (seq 1)."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        second = asyncio.create_task(client.get("/view/2", params={"session": "ann", "profile": "seed", "seq": 2}))
        await asyncio.sleep(0.05)  # the pace of the scenario, not an ordering: either way seq decides
        first = await client.get("/view/1", params={"session": "ann", "profile": "seed", "seq": 1})
        return first, await second


def test_a_click_that_arrives_after_a_newer_one_is_the_one_superseded(served):
    first, second = asyncio.run(two_clicks_out_of_order(served.url))
    assert (first.status_code, second.status_code) == (SUPERSEDED_STATUS, 200)
    assert second.json()["chat_id"] == 2


def test_through_a_daemon_a_click_that_arrives_after_a_newer_one_is_the_one_superseded(served_by_daemon):
    first, second = asyncio.run(two_clicks_out_of_order(served_by_daemon.url))
    assert (first.status_code, second.status_code) == (SUPERSEDED_STATUS, 200)
    assert second.json()["chat_id"] == 2


def test_by_query_keys_requests_by_path_prefix_and_parameter():
    key = by_query("session", prefix="/view/")
    assert key({"path": "/view/7", "query_string": b"session=ann&profile=seed"}) == "/view/ ann"
    assert key({"path": "/view/7", "query_string": b"profile=seed"}) is None
    assert key({"path": "/chats/7/messages", "query_string": b"session=ann"}) is None
    ordered = by_query("session", prefix="/view/", order="seq")
    assert ordered({"path": "/view/7", "query_string": b"session=ann&seq=12"}) == ("/view/ ann", 12)
    for seq in (b"", b"&seq=x", b"&seq=-1", b"&seq=" + str(2 ** 53 + 1).encode(), b"&seq=" + b"9" * 5000,
                b"&seq=%C2%B2", b"&seq=%D9%A3", b"&seq=1.5", b"&seq="):  # by arrival
        assert ordered({"path": "/view/7", "query_string": b"session=ann" + seq}) == ("/view/ ann", None)


def test_importing_governor_asgi_loads_no_engine_module():
    import subprocess

    code = ("import sys, governor.asgi; "
            "print(sorted(m for m in sys.modules if m.startswith('governor.engine') or m in ('psutil', 'loky')))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"


def test_through_a_daemon_a_newer_request_supersedes_and_a_disconnect_leaves_no_step_behind(served_by_daemon):
    from governor.client import Client

    server = served_by_daemon
    with Client(server.daemon.socket) as client:
        gone = open_view(server.port, "/view/1?session=dee&profile=seed-753")
        assert wait_until(lambda: client.status(states=["running"]), timeout=60)
        gone.close()
        assert wait_until(lambda: not client.status(states=["running", "queued"]), timeout=60)
        view = client.status(step="view.wait", limit=len(SEED_753))
        assert len(view) == len(SEED_753)
        assert {record["state"] for record in view} == {"cancelled"}
        assert any(record["started_at"] is None for record in view)  # queued ones never started

        responses = asyncio.run(five_clicks(server.url, 0.030))
        assert [response.status_code for response in responses] == [SUPERSEDED_STATUS] * 4 + [200]
        assert responses[4].json()["chat_id"] == 4
        # The 409s came at once; the superseded steps stop on their own, soon after.
        assert wait_until(lambda: not client.status(states=["running", "queued"]), timeout=60)


def test_a_request_whose_event_loop_is_gone_does_not_break_the_request_that_supersedes_it():
    from governor import Supervisor
    from governor.asgi import RequestGovernor
    from step_library import registry

    with Supervisor(registry, workers=1) as supervisor:
        async def first_request():
            return await RequestGovernor(supervisor, "view:gone").run_batch([("echo", {"value": 1})])
        assert asyncio.run(first_request()) == [1]  # its loop is closed now
        newer = supervisor.scope(key="view:gone")  # tells the first request, whose loop is gone
        assert newer.submit("echo", 2).result(timeout=60) == 2
