"""The status page in a real browser (headless Chromium, CI installs it) against a real daemon."""

import asyncio
import json

import pytest

pytest.importorskip("aiohttp", reason="the status page needs the live extra (pip install -e '.[live]')")

from browser import BINARY, Chromium  # noqa: E402
from governor import Call, Limits, StepTimeout  # noqa: E402
from governor.client import Client  # noqa: E402
from live_harness import daemon  # noqa: E402,F401 (a fixture)

#: Real processes, a real browser, a shared 2-core machine: a generous guard, not a timing.
pytestmark = [pytest.mark.skipif(BINARY is None, reason="no chromium here (CI installs Debian's: see .ci/run)"),
              pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture
def chromium(tmp_path):
    browser = Chromium(tmp_path)
    yield browser
    browser.close()


def test_the_page_shows_a_running_step_live_then_its_kill(daemon, chromium, tmp_path):
    chromium.start(daemon.url)  # the printed URL, token and all, as a person would paste it

    async def scenario() -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            page = await chromium.page(session)
            await page.wait_for_text("#connection", "live")
            # The page's script took the token out of the address bar, and into no cookie.
            assert await page.evaluate("location.href") == daemon.base + "/"
            assert json.loads(await page.evaluate("JSON.stringify(document.cookie)")) == ""
            with Client(daemon.socket) as client:
                held = client.submit_call(Call("timed_sleep", kwargs={"ms": 60_000},
                                               limits=Limits(timeout_s=120, max_memory_mb=800)))
                held_id = held.wait_for_id(30)
                row = await page.wait_for_text("#workers tbody", "timed_sleep", str(held_id), "busy", "/ 120.0 s",
                                               "/ 800 MiB")
                assert "pool" in row
                await page.wait_for_text("#tasks tbody", str(held_id), "running")
                killed = client.submit_call(Call("busy_loop", limits=Limits(timeout_s=1)))
                with pytest.raises(StepTimeout):
                    killed.result(60)
                kills = await page.wait_for_text("#kills tbody", "busy_loop", "timeout", "1 s")
                assert str(killed.task_id) in kills
                await page.wait_for_text("#tasks tbody", "timed_out")
                await page.wait_for_text("#steps tbody", "busy_loop")
                assert await page.evaluate("document.querySelectorAll('#throughput rect').length") >= 1
                assert await page.evaluate("document.querySelectorAll('#latency circle.p95').length") >= 1
                assert "cancel" not in await page.text("#workers tbody")  # read-only: no cancel buttons
                await page.screenshot(tmp_path / "status-page.png")
                held.cancel()
            # Nothing loaded from elsewhere: every resource is the daemon's own.
            sources = await page.evaluate("performance.getEntriesByType('resource').map(e => e.name)")
            assert sources and all(source.startswith(daemon.base + "/") for source in sources), sources

    asyncio.run(scenario())
    assert (tmp_path / "status-page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_page_without_the_token_is_refused(daemon, chromium):
    chromium.start(daemon.base + "/")  # no token, no cookie

    async def scenario() -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            page = await chromium.page(session)
            body = await page.wait_for_text("body", "needs the token")
            assert "Workers" not in body
            status = await page.evaluate("fetch('/api/live').then(r => r.status)")
            assert status == 403
            # A wrong token in the URL opens nothing either.
            await page.call("Page.navigate", url=daemon.base + "/?token=wrong")
            await page.wait_for_text("body", "needs the token")
            assert json.loads(await page.evaluate("JSON.stringify(document.cookie)")) == ""

    asyncio.run(scenario())


def test_the_latency_chart_leaves_a_gap_where_no_task_ended(daemon, chromium):
    """A bucket with no end is drawn as nothing: the line stops and starts again after it."""
    chromium.start(daemon.url)

    async def scenario() -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            page = await chromium.page(session)
            await page.wait_for_text("#connection", "live")
            # The page's own chart(), on points with two empty buckets in the middle; read back
            # in the same turn, before the next snapshot redraws it.
            path = await page.evaluate("""(() => {
                const points = [0.1, 0.2, null, null, 0.3, 0.4].map((v) => ({p50_s: v}));
                chart("latency", points, [{cls: "p50", value: (p) => p.p50_s, label: seconds}], 5);
                return document.querySelector("#latency path.p50").getAttribute("d");
            })()""")
            segments = path.split("M")[1:]
            assert len(segments) == 2, path
            assert [segment.count("L") for segment in segments] == [1, 1], path

    asyncio.run(scenario())
