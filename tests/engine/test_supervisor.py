"""The core executor: lanes, ordering, batches, workflows, errors, shutdown."""

import concurrent.futures
import threading

import psutil
import pytest

from conftest import BACKENDS, live_children
from governor import (Call, InvalidParameters, Limits, QueueFull, StepFailed, StepSkipped, StepTimeout, Supervisor,
                      SupervisorClosed, TaskState, UnknownStep, WorkflowFailed)
from governor.errors import RemoteTraceback
from governor.limits import Lane
from step_library import registry, wait_for_path


@pytest.mark.parametrize("backend", BACKENDS)
def test_view_switch_steps_run_at_once(supervisor, tmp_path):
    # Each step waits until all three have started (a cross-process barrier), so only an
    # executor that runs them at once gets through; the recorded times then show that all
    # three were in flight together, however loaded the machine.
    meeting = str(tmp_path)
    results = supervisor.run_batch([("chat.history", {"chat_id": 1, "meeting": meeting}),
                                    ("git.status", {"repo": ".", "meeting": meeting}),
                                    ("git.current_branch", {"repo": ".", "meeting": meeting})], timeout=90)
    assert len({pid for _, _, _, pid, _ in results}) == 3, "three workers ran the three steps"
    assert max(start for _, start, _, _, _ in results) < min(end for _, _, end, _, _ in results)


def test_mixed_submissions_from_threads_keep_critical_order(supervisor):
    barrier = threading.Barrier(4)
    futures = [[] for _ in range(4)]

    def submitter(index):
        barrier.wait()
        for n in range(50):
            if n % 2:
                futures[index].append(supervisor.submit("critical_record", 2, tag=f"{index}-{n}"))
            else:
                futures[index].append(supervisor.submit("timed_sleep", 40, tag=f"{index}-{n}"))

    threads = [threading.Thread(target=submitter, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [future for per_thread in futures for future in per_thread]
    assert len(every) == 200
    concurrent.futures.wait(every, timeout=100)
    critical = sorted((f.result() for f in every if f.step == "critical_record"), key=lambda r: r[4])
    pool = [f.result() for f in every if f.step == "timed_sleep"]
    # One at a time, in submission order (task ids are handed out in submission order).
    for earlier, later in zip(critical, critical[1:]):
        assert earlier[2] <= later[1], "critical steps overlapped or ran out of order"
    # Pool steps ran side by side: some pair of them overlapped in time.
    spans = sorted((start, end) for _, start, end, _, _ in pool)
    assert any(spans[i + 1][0] < spans[i][1] for i in range(len(spans) - 1))
    assert len({pid for *_, pid, _ in pool}) > 1


def test_workflow_runs_in_order_in_the_critical_lane(supervisor):
    flow = supervisor.workflow([("critical_record", {"ms": 1, "tag": "a"}), ("timed_sleep", {"ms": 1, "tag": "b"}),
                                Call("echo", ("c",))])
    first, second, third = flow.result(timeout=30)
    assert (first[0], second[0], third) == ("a", "b", "c")
    assert first[2] <= second[1]
    assert first[3] == second[3], "every workflow step runs in the one critical worker"


def test_workflow_stops_at_first_failure(supervisor):
    flow = supervisor.workflow([("echo", {"value": 1}), ("boom", {}), ("echo", {"value": 3}), ("echo", {"value": 4})])
    with pytest.raises(WorkflowFailed) as failed:
        flow.result(timeout=30)
    assert failed.value.index == 1
    assert isinstance(failed.value.error, ValueError)
    assert failed.value.results == [1]
    assert failed.value.skipped == ["echo", "echo"]
    for skipped in flow.steps[2:]:
        with pytest.raises(StepSkipped):
            skipped.result()
        assert skipped.state is TaskState.SKIPPED


def test_unknown_step_fails_at_once_with_suggestions(supervisor):
    with pytest.raises(UnknownStep) as unknown:
        supervisor.submit("git.stats")
    assert "git.status" in unknown.value.suggestions
    assert "did you mean 'git.status'" in str(unknown.value)


def test_bad_parameters_fail_at_submit(supervisor):
    with pytest.raises(InvalidParameters, match="timed_sleep"):
        supervisor.submit("timed_sleep", nonsense=1)
    with pytest.raises(InvalidParameters):
        supervisor.run_batch([("echo", {"value": 1}), ("echo", {})])


def test_a_raising_step_raises_its_own_exception_with_the_remote_traceback(supervisor):
    with pytest.raises(ValueError, match="^it broke$") as failed:
        supervisor.submit("boom", "it broke").result(timeout=30)
    assert type(failed.value) is ValueError, "the step's own exception, as ProcessPoolExecutor raises it"
    assert isinstance(failed.value.__cause__, RemoteTraceback)
    assert "in boom" in str(failed.value.__cause__)
    assert supervisor.submit("echo", 5).result(timeout=30) == 5, "the worker survives a raising step"


def test_a_step_error_that_does_not_pickle_is_a_step_failed(supervisor):
    with pytest.raises(StepFailed) as failed:
        supervisor.submit("raise_unpicklable", "it broke").result(timeout=30)
    error = failed.value
    assert error.exc_type.endswith("UnpicklableError") and error.exc_message == "it broke"
    assert error.original is None
    assert "in raise_unpicklable" in error.remote_traceback and "in raise_unpicklable" in str(error.__cause__)


def test_wrap_step_errors_keeps_every_step_error_a_step_failed(make_supervisor):
    sup = make_supervisor(workers=1, spares=0, wrap_step_errors=True)
    with pytest.raises(StepFailed) as failed:
        sup.submit("boom", "it broke").result(timeout=30)
    error = failed.value
    assert (error.exc_type, error.exc_message) == ("ValueError", "it broke")
    assert isinstance(error.original, ValueError)
    assert "in boom" in error.remote_traceback and "in boom" in str(error.__cause__)
    with pytest.raises(StepFailed) as noted:
        sup.submit("noted_boom", "bad row", ("row 7", "of orders.csv")).result(timeout=30)
    assert noted.value.__notes__ == ["row 7", "of orders.csv"]  # the step's own, as unwrapped


def test_unpicklable_result_is_a_clear_step_failure(supervisor):
    with pytest.raises(StepFailed, match="could not be sent back"):
        supervisor.submit("unpicklable_result").result(timeout=30)
    assert supervisor.submit("echo", 1).result(timeout=30) == 1


def test_run_batch_returns_exceptions_in_place_when_asked(supervisor):
    ok, failed = supervisor.run_batch([("echo", {"value": 1}), ("boom", {})], return_exceptions=True)
    assert ok == 1
    assert isinstance(failed, ValueError)
    with pytest.raises(ValueError):
        supervisor.run_batch([("echo", {"value": 1}), ("boom", {})])


def test_futures_work_with_as_completed(supervisor):
    futures = [supervisor.submit("echo", n) for n in range(20)]
    assert sorted(f.result() for f in concurrent.futures.as_completed(futures, timeout=60)) == list(range(20))


def test_classification_is_visible(supervisor):
    assert supervisor.classify("critical_record")[0] is Lane.CRITICAL
    lane, reason = supervisor.classify("echo")
    assert lane is Lane.POOL and "declared" in reason


def test_queue_full_refuses_and_queues_nothing(tmp_path):
    with Supervisor(registry, workers=1, queue_size=2) as sup:
        running = sup.submit("hold_until", str(tmp_path / "started"), str(tmp_path / "go"))
        wait_for_path(str(tmp_path / "started"))
        queued = [sup.submit("echo", n) for n in range(2)]
        with pytest.raises(QueueFull):
            sup.submit("echo", 3)
        with pytest.raises(QueueFull):
            sup.run_batch([("echo", {"value": 4})])
        assert sup.metrics()["queue_depth"]["pool"] == 2
        (tmp_path / "go").touch()
        running.result(timeout=30)
        assert [f.result(timeout=30) for f in queued] == [0, 1]
        assert sup.submit("echo", 5).result(timeout=30) == 5, "capacity is back once the queue drains"


def test_submit_after_shutdown_is_refused():
    sup = Supervisor(registry, workers=1)
    sup.start()
    sup.shutdown()
    with pytest.raises(SupervisorClosed):
        sup.submit("echo", 1)


def test_shutdown_runs_queued_work_then_leaves_no_process():
    sup = Supervisor(registry, workers=2).start()
    workers = live_children()
    assert len(workers) >= 2 + 1 + 2, "pool + spare + critical + spare are warm after start"
    futures = [sup.submit("timed_sleep", 20) for _ in range(6)]
    sup.shutdown(wait=True)
    assert all(f.done() and f.exception() is None for f in futures)
    assert not live_children()
    assert not any(psutil.pid_exists(w.pid) and w.status() != psutil.STATUS_ZOMBIE for w in workers)


def test_shutdown_can_cancel_pending(tmp_path):
    sup = Supervisor(registry, workers=1).start()
    running = sup.submit("hold_until", str(tmp_path / "started"), str(tmp_path / "go"))
    wait_for_path(str(tmp_path / "started"))
    pending = [sup.submit("echo", n) for n in range(5)]
    sup.shutdown(wait=False, cancel_futures=True)
    (tmp_path / "go").touch()
    sup.shutdown(wait=True)
    assert running.result() > 0, "a running step finishes"
    assert all(f.cancelled() for f in pending)


def test_per_submission_limits_override_the_step():
    # Only the submission's limit can end these steps: the supervisor's default (600 s) and
    # the step's own (declared_timeout_loop: 0.3 s) differ from it, and StepTimeout.limit_s
    # says which one fired. (Not just TimeoutError: on 3.11 result(timeout=...) raises the
    # builtin TimeoutError too, so that would pass with the override gone.)
    with Supervisor(registry, workers=1, limits=Limits(timeout_s=600)) as sup:
        over_default = sup.submit_call(Call("busy_loop", limits=Limits(timeout_s=0.2)))
        over_step = sup.submit_call(Call("declared_timeout_loop", limits=Limits(timeout_s=0.1)))
        for future, limit in ((over_default, 0.2), (over_step, 0.1)):
            with pytest.raises(StepTimeout) as timed_out:
                future.result(timeout=30)
            assert timed_out.value.limit_s == limit


def test_bad_supervisor_arguments():
    with pytest.raises(ValueError):
        Supervisor(registry, workers=0)
    with pytest.raises(TypeError):
        Supervisor(registry, workers="4")
    with pytest.raises(TypeError):
        Supervisor(registry, limits={"timeout_s": 1})


def test_done_callbacks_may_submit_and_shut_down():
    sup = Supervisor(registry, workers=2).start()
    chained = concurrent.futures.Future()
    first = sup.submit("echo", 1)
    first.add_done_callback(lambda done: chained.set_result(sup.submit("echo", done.result() + 1)))
    assert chained.result(timeout=30).result(timeout=30) == 2, "a callback re-entered submit()"
    last = sup.submit("echo", 3)
    last.add_done_callback(lambda done: sup.shutdown(wait=True))  # must not deadlock
    assert last.result(timeout=30) == 3
    sup.shutdown(wait=True)
    assert not live_children()


def test_leaving_the_block_on_an_exception_cancels_endless_work(tmp_path):
    with pytest.raises(RuntimeError):
        with Supervisor(registry, workers=1) as sup:
            endless = sup.submit("busy_loop", str(tmp_path / "pid"))
            wait_for_path(str(tmp_path / "pid"))
            raise RuntimeError("the caller failed")
    assert endless.cancelled()
    assert not live_children()


@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_returns_results_in_order(supervisor, chunksize):
    tags = [tag for tag, *_ in supervisor.map("timed_sleep", [3, 1, 2, 0, 1, 2, 0], "abcdefg", chunksize=chunksize)]
    assert tags == list("abcdefg")
    results = list(supervisor.map("echo", range(50), chunksize=chunksize))
    assert results == list(range(50))


def test_map_checks_every_call_before_it_submits_any(supervisor):
    with pytest.raises(InvalidParameters):
        supervisor.map("echo", [1, 2], [3, 4])  # echo takes one value
    with pytest.raises(UnknownStep):
        supervisor.map("ecco", [1])
    assert supervisor.metrics()["tasks"] == {}


def test_map_raises_a_failed_call_at_its_place(supervisor):
    results = supervisor.map("boom", ["first", "second"])
    with pytest.raises(ValueError, match="first"):
        next(results)


def test_a_chunk_killed_by_its_timeout_fails_its_own_calls_only(supervisor):
    results = supervisor.map("hang_on", range(6), [3] * 6, chunksize=2, timeout=60)
    assert [next(results), next(results)] == [0, 1]
    with pytest.raises(TimeoutError) as timed_out:
        next(results)
    assert isinstance(timed_out.value, StepTimeout), "the chunk of 2 and 3 hit the step's timeout"
    outcomes = supervisor.metrics()["tasks"]["pool"]["hang_on"]
    assert outcomes["timeout"] == 1, "one chunk killed"
    assert outcomes.get("ok", 0) >= 1 and "crashed" not in outcomes
