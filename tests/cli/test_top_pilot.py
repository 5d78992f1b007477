"""``governor top`` driven by Textual's pilot against a real daemon: what the keys do."""

import asyncio

import pytest

from daemon_harness import daemon  # noqa: F401 (a fixture)
from governor import StepCancelled
from governor.client import Client

pytest.importorskip("textual", reason="governor top needs the live extra (pip install -e '.[live]')")

from governor.cli.top import SPARE_STATE, CancelPrompt, ConfirmCancel, TopApp  # noqa: E402
from textual.widgets import DataTable  # noqa: E402

#: A real daemon and a real app on a shared 2-core machine: a generous guard, not a timing.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


async def until(pilot, predicate, timeout: float = 60.0) -> None:
    """Let the app run until ``predicate()`` (its refreshes are what we wait for)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "the app never got there"
        await pilot.pause(0.05)


def test_c_cancels_a_task_by_id_after_a_confirmation_that_names_it(daemon):
    with Client(daemon.socket) as client:
        future = client.submit("timed_sleep", ms=600_000)
        task_id = future.wait_for_id(30)
        question = f"Cancel task {task_id} (timed_sleep, running in the pool lane)?"

        async def scenario() -> None:
            app = TopApp(daemon.socket, interval=0.1)
            async with app.run_test(size=(160, 48)) as pilot:
                table = app.query_one("#workers", DataTable)
                await until(pilot, lambda: any(w.get("task_id") == task_id for w in app._shown_workers))
                states = lambda: [table.get_row_at(row)[2] for row in range(table.row_count)]  # noqa: E731
                await until(pilot, lambda: SPARE_STATE in states())  # the spares are named as such

                # Typed: the id, whatever row is selected (the first is an idle critical worker).
                assert app._shown_workers[0]["task_id"] is None
                await pilot.press("c")
                await until(pilot, lambda: isinstance(app.screen, CancelPrompt))
                await pilot.press(*str(task_id), "enter")
                await until(pilot, lambda: isinstance(app.screen, ConfirmCancel))
                assert app.screen.question == question
                await pilot.press("n")
                await until(pilot, lambda: not isinstance(app.screen, ConfirmCancel))
                assert not future.done()

                # Escape asks nothing; Enter alone takes the selected worker's task.
                await pilot.press("c")
                await until(pilot, lambda: isinstance(app.screen, CancelPrompt))
                await pilot.press("escape")
                await until(pilot, lambda: not isinstance(app.screen, CancelPrompt))
                busy = next(i for i, w in enumerate(app._shown_workers) if w.get("task_id") == task_id)
                await pilot.press(*["down"] * busy)
                await until(pilot, lambda: table.cursor_row == busy)
                await pilot.press("c")
                await until(pilot, lambda: isinstance(app.screen, CancelPrompt))
                await pilot.press("enter")
                await until(pilot, lambda: isinstance(app.screen, ConfirmCancel))
                assert app.screen.question == question
                await pilot.press("y")
                await until(pilot, future.done)

                # A task that has ended is not offered for a cancel.
                await pilot.press("c")
                await until(pilot, lambda: isinstance(app.screen, CancelPrompt))
                await pilot.press(*str(task_id), "enter")
                await until(pilot, lambda: not isinstance(app.screen, CancelPrompt))
                await until(pilot, lambda: any("already ended: cancelled" in str(note.message)
                                               for note in app._notifications))
                assert not isinstance(app.screen, ConfirmCancel)
                await pilot.press("q")

        asyncio.run(scenario())
        with pytest.raises(StepCancelled):
            future.result(60)
