"""``governor run --view``'s crowd: the seed's one lane against Governor, same users, same clicks."""

import concurrent.futures

from governor import Supervisor, TaskState
from governor.bench import view_steps
from governor.cli import crowd
from governor.task import Call

CALLS = [Call.of(call) for call in view_steps.wait_calls(crowd.PROFILE)]


def test_a_users_next_switch_cancels_that_users_last_view_only():
    with Supervisor(view_steps.registry, workers=2) as sup:
        first = crowd._governed(sup, "user 1", CALLS)
        other_user = crowd._governed(sup, "user 2", CALLS[-1:])
        second = crowd._governed(sup, "user 1", CALLS[-1:])
        concurrent.futures.wait(first + other_user + second, timeout=60)
    # Two workers for twelve parts: most of the superseded view never started.
    assert {future.task.state for future in first} == {TaskState.CANCELLED}
    assert any(future.task.dispatched_at is None for future in first)
    assert [future.task.state for future in other_user + second] == [TaskState.DONE] * 2


def test_the_seed_registry_runs_a_view_after_the_one_before_it_in_one_lane():
    lane = concurrent.futures.ThreadPoolExecutor(1)
    try:
        fast = [Call.of(("view.wait", {"part": "one", "ms": 1}))]
        views = [crowd._one_lane(lane, view_steps.registry, fast) for _ in range(3)]
        concurrent.futures.wait([future for view in views for future in view], timeout=60)
    finally:
        lane.shutdown()
    assert [len(view) for view in views] == [1, 1, 1]
    assert all(future.done() and future.exception() is None for view in views for future in view)


def test_the_crowd_reports_both_engines_on_the_same_users():
    report = crowd.run_crowd(users=2, seconds=0.5)
    assert [line.split()[0] for line in report.lines()[1:]] == ["before", "Governor"]
    assert report.to_json()["users"] == 2 and report.view_ms == 753
