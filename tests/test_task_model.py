"""Task, Timers and WorkflowRun without a process or a thread of their own: the state
machine, the deadline heap on an injected clock, and a workflow's stop at its first
failure. (Their futures are real ``CallbackFuture`` objects on a real runner; no
supervisor, no worker.)
"""

import pytest

from governor.callbacks import CallbackRunner
from governor.errors import InvalidTransition, StepCancelled, StepFailed, StepSkipped, WorkflowFailed
from governor.limits import Lane, Limits
from governor.task import CancelRequest, Task, TaskFuture, TaskState, WorkflowFuture, WorkflowRun
from governor.engine.timers import Timers


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def runner():
    runner = CallbackRunner()
    yield runner
    runner.close()


def make_task(runner, task_id=1, step="echo", cancels=None):
    task = Task(task_id, step, Lane.POOL, (), {}, Limits(), 0.0)
    task.future = TaskFuture(task, cancels or (lambda task, request: task.request_cancel(request)[0]), runner)
    return task


# ------------------------------------------------------------------------------ Task

def test_a_task_moves_only_forward_and_ends_once(runner):
    task = make_task(runner)
    task.transition(TaskState.RUNNING)
    assert task.end(TaskState.DONE) is TaskState.RUNNING
    assert task.end(TaskState.FAILED) is None  # terminal stays terminal
    with pytest.raises(InvalidTransition):
        task.transition(TaskState.RUNNING)
    assert task.state is TaskState.DONE


@pytest.mark.parametrize("state", [TaskState.DONE, TaskState.TIMED_OUT, TaskState.CRASHED, TaskState.OVER_MEMORY])
def test_a_queued_task_cannot_end_as_only_a_run_can(runner, state):
    with pytest.raises(InvalidTransition):
        make_task(runner).end(state)


def test_cancelling_a_queued_task_cancels_it_at_once_and_keeps_the_first_reason(runner):
    task = make_task(runner)
    assert task.request_cancel(CancelRequest("explicit", "first")) == (True, True)
    assert task.request_cancel(CancelRequest("shutdown", "second")) == (True, False)
    assert task.state is TaskState.CANCELLED and task.cancel_request.detail == "first"
    task.resolve()
    with pytest.raises(StepCancelled, match="first"):
        task.future.result(timeout=0)
    assert task.future.cancelled()


def test_a_running_task_with_a_cancel_request_ends_cancelled_whatever_came_back(runner):
    task = make_task(runner)
    task.transition(TaskState.RUNNING)
    assert task.request_cancel(CancelRequest("explicit")) == (True, False)
    assert task.request_cancel(CancelRequest("timeout", "later")) == (True, False)
    assert task.end(TaskState.DONE) is TaskState.RUNNING
    assert task.state is TaskState.CANCELLED and isinstance(task.error, StepCancelled)
    assert task.cancel_request.reason == "explicit"  # the first reason stands


def test_once_claimed_for_a_kill_only_the_kill_ends_the_task(runner):
    task = make_task(runner)
    assert not task.claim_for_kill()  # queued: nothing to kill
    task.transition(TaskState.RUNNING)
    assert task.claim_for_kill()
    assert task.end(TaskState.DONE) is None  # the outcome that crossed the kill
    assert task.end(TaskState.TIMED_OUT, TimeoutError("late"), by_kill=True) is TaskState.RUNNING
    assert task.state is TaskState.TIMED_OUT


def test_a_cancel_after_the_end_is_refused_unless_the_task_was_cancelled(runner):
    done, cancelled = make_task(runner, 1), make_task(runner, 2)
    done.transition(TaskState.RUNNING)
    done.end(TaskState.DONE)
    cancelled.request_cancel(CancelRequest("explicit"))
    assert done.request_cancel(CancelRequest("explicit")) == (False, False)
    assert cancelled.request_cancel(CancelRequest("explicit")) == (True, False)


def test_resolve_gives_the_future_the_terminal_state(runner):
    done, failed = make_task(runner, 1), make_task(runner, 2)
    for task in (done, failed):
        task.transition(TaskState.RUNNING)
    done.end(TaskState.DONE)
    failed.end(TaskState.FAILED, StepFailed("echo", 2, "ValueError", "bad", ""))
    done.resolve("value")
    failed.resolve()
    assert done.future.result(timeout=0) == "value"
    assert isinstance(failed.future.exception(timeout=0), StepFailed)


# ----------------------------------------------------------------------------- Timers

def test_timers_come_due_on_the_injected_clock_in_time_then_insertion_order():
    clock = FakeClock()
    timers = Timers(clock)
    timers.after(2.0, "late", 1)
    assert timers.after(1.0, "early", 2) == 1001.0
    timers.after(1.0, "early-too", 3)
    assert timers.next_due() == 1001.0
    assert list(timers.pop_due()) == []  # nothing due yet: the clock has not moved
    clock.now = 1001.0
    assert list(timers.pop_due()) == [("early", 2), ("early-too", 3)]
    clock.now = 1005.0
    assert list(timers.pop_due()) == [("late", 1)]
    assert timers.next_due() is None and len(timers) == 0


def test_stale_timers_are_pruned_only_when_they_outnumber_the_live():
    timers = Timers(FakeClock())
    for target in range(100):
        timers.after(1.0, "deadline", target)
    live = set(range(10))
    applies = lambda kind, target: target in live  # noqa: E731 - a predicate read once
    timers.prune_if_stale(live=30, still_applies=applies)
    assert len(timers) == 100  # 100 <= 4 x 30: not yet worth a rebuild
    timers.prune_if_stale(live=10, still_applies=applies)
    assert len(timers) == 10


# --------------------------------------------------------------------------- WorkflowRun

def make_workflow(runner, count=3):
    tasks = [make_task(runner, index + 1, f"step{index}") for index in range(count)]
    future = WorkflowFuture([task.future for task in tasks], runner)
    flow = WorkflowRun(tasks, future)
    for task in tasks:
        task.workflow = flow
    return flow, tasks


def finish(task, state, error=None):
    task.transition(TaskState.RUNNING)
    task.end(state, error)


def test_a_workflow_succeeds_with_every_result_in_order(runner):
    flow, tasks = make_workflow(runner)
    for index, task in enumerate(tasks):
        finish(task, TaskState.DONE)
        assert flow.step_finished(task, index) == ()
        assert flow.future.done() is (index == len(tasks) - 1)
    assert flow.future.result(timeout=0) == [0, 1, 2]


def test_a_workflow_stops_at_its_first_failure_and_skips_the_rest(runner):
    flow, tasks = make_workflow(runner)
    finish(tasks[0], TaskState.DONE)
    flow.step_finished(tasks[0], "first")
    error = StepFailed("step1", 2, "ValueError", "bad", "")
    finish(tasks[1], TaskState.FAILED, error)
    assert flow.step_finished(tasks[1], None) == [tasks[2]]
    assert isinstance(tasks[2].error, StepSkipped) and tasks[2].error.failed_step == "step1"
    failure = flow.future.exception(timeout=0)
    assert isinstance(failure, WorkflowFailed)
    assert (failure.index, failure.error, failure.results, failure.skipped) == (1, error, ["first"], ["step2"])


def test_a_cancelled_step_cancels_the_workflow(runner):
    flow, tasks = make_workflow(runner, count=2)
    tasks[0].request_cancel(CancelRequest("explicit", "user"))
    assert flow.step_finished(tasks[0], None) == [tasks[1]]
    assert flow.future.cancelled()
    with pytest.raises(StepCancelled, match="user"):
        flow.future.result(timeout=0)


def test_cancelling_a_workflow_cancels_each_unfinished_step(runner):
    flow, tasks = make_workflow(runner)
    finish(tasks[0], TaskState.DONE)
    assert flow.future.cancel("enough")
    assert [task.state for task in tasks] == [TaskState.DONE, TaskState.CANCELLED, TaskState.CANCELLED]
