"""The reference page in a real browser: five views clicked 50 ms apart, the last one shown.

Debian's chromium, driven by Playwright (launched by path: Playwright's own browser
downloads are not needed). The backend is the in-process Governor one on uvicorn; the test
reads its requests' futures to see how the superseded views' steps ended.

Firefox ESR, Debian's ``firefox-esr``, the same way over WebDriver BiDi: Playwright drives
only its own patched Firefox (a download), so puppeteer-core (Node, in tests/bench/firefox:
``npm ci`` there with ``PUPPETEER_SKIP_DOWNLOAD=1``; .ci/run does it) launches the system's
by path and clicks, and the test reads what the page and the server recorded. It skips,
saying why, where node, firefox-esr or that install is missing.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from conftest import wait_until
from governor import TaskState
from web_harness import GovernedViews, ServerThread

playwright = pytest.importorskip("playwright.sync_api", reason="needs playwright (the test extra)")
browser_flags = pytest.importorskip("browser", reason="needs the live extra (tests/browser.py)")

#: Between two clicks, as the issue's rapid switching.
CLICK_GAP_S = 0.050

CLICKS = 5

#: Playwright starts chromium itself (headless, over a pipe): only the other flags are ours.
FLAGS = [flag for flag in browser_flags.FLAGS if not flag.startswith(("--headless", "--remote-"))]


def test_five_rapid_clicks_show_the_last_view_and_cancel_the_other_four(record_property):
    if browser_flags.BINARY is None:
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    # Four workers for the twelve parts of seed-753: a superseded view has parts running
    # (the long ones, dispatched first) and parts queued when the next click comes.
    with ServerThread(GovernedViews(None, workers=4)) as server, playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=browser_flags.BINARY, args=FLAGS)
        try:
            page = browser.new_page()
            page.goto(f"{server.url}/?session=eve&profile=seed-753")
            started = time.monotonic()
            for chat in range(1, CLICKS + 1):
                pause = started + (chat - 1) * CLICK_GAP_S - time.monotonic()
                if pause > 0:
                    time.sleep(pause)  # the user's pace, not an ordering
                page.click(f"#chat-{chat}")
            page.wait_for_function(f"window.painted && window.painted.chat === {CLICKS}", timeout=60_000)
            shown = page.get_attribute("#view", "data-chat")
            clicks = page.evaluate("window.clicks")
            painted = page.evaluate("window.painted")
        finally:
            browser.close()

        assert_the_last_view_shown_and_the_others_cancelled(server, shown, clicks, painted, record_property)


FIREFOX = shutil.which("firefox-esr") or shutil.which("firefox")

#: puppeteer-core's install and the script it runs.
FIREFOX_DRIVER = Path(__file__).parent / "firefox"


def test_five_rapid_clicks_in_firefox_show_the_last_view_and_cancel_the_other_four(record_property):
    node = shutil.which("node")
    if node is None or FIREFOX is None:
        pytest.skip("needs node and firefox-esr (apt-get install nodejs firefox-esr)")
    if not (FIREFOX_DRIVER / "node_modules" / "puppeteer-core").is_dir():
        pytest.skip(f"needs puppeteer-core: PUPPETEER_SKIP_DOWNLOAD=1 npm ci --prefix {FIREFOX_DRIVER}")
    with ServerThread(GovernedViews(None, workers=4)) as server:
        # A session of its own, so that whatever Firefox leaves behind dies with the group.
        driver = subprocess.Popen([node, str(FIREFOX_DRIVER / "clicks.mjs"), FIREFOX,
                                   f"{server.url}/?session=eve&profile=seed-753", str(CLICKS),
                                   str(CLICK_GAP_S * 1000)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = driver.communicate(timeout=120)
        finally:
            # puppeteer starts Firefox in a session of its own: kill node's whole tree by
            # parentage, then its group, so nothing outlives a node that hung.
            with contextlib.suppress(psutil.NoSuchProcess):
                for process in psutil.Process(driver.pid).children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        process.kill()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
        assert driver.returncode == 0, err
        seen = json.loads(out.strip().splitlines()[-1])
        record_property("browser", seen["version"])
        assert_the_last_view_shown_and_the_others_cancelled(server, seen["shown"], seen["clicks"], seen["painted"],
                                                            record_property)


def assert_the_last_view_shown_and_the_others_cancelled(server, shown, clicks, painted, record_property):
    """The page shows the last view clicked; each superseded view's steps ended cancelled (or
    done before the next click's request), and those still queued never started."""
    assert shown == str(CLICKS)
    assert [click["chat"] for click in clicks] == list(range(1, CLICKS + 1))
    last_click_to_paint_ms = painted["at"] - clicks[-1]["at"]
    record_property("last_click_to_paint_ms", round(last_click_to_paint_ms, 1))
    print(f"last click to view painted: {last_click_to_paint_ms:.0f} ms")
    requests = list(server.views.recent)
    assert [governed.key for governed in requests] == ["/view/ eve"] * CLICKS
    assert wait_until(lambda: all(future.done() for governed in requests for future in governed.futures),
                      timeout=60)
    for governed, newer in zip(requests, requests[1:]):
        superseded_at = newer.futures[0].task.submitted_at
        for future in governed.futures:
            task = future.task
            assert task.state is TaskState.CANCELLED or (
                task.state is TaskState.DONE and task.ended_at <= superseded_at), (task.kwargs, task.state)
            if task.dispatched_at is None:  # queued when cancelled: it never started
                assert task.started_at is None and task.pid is None
    assert all(future.task.state is TaskState.DONE for future in requests[-1].futures)

