"""governor.service.live's arithmetic with no processes: windows, quantiles, chart buckets and which ends
count as kills, on real Task values and a fake clock (the daemon tests cover the wiring)."""

import pytest

from governor.callbacks import CallbackRunner
from governor.errors import MemoryLimitExceeded, StepTimeout
from governor.limits import Lane, Limits
from governor.service.live import MAX_ENDS, SERIES_BUCKET_S, SERIES_BUCKETS, WINDOW_S, HttpConfig, LiveModel
from governor.errors import HttpAddressError
from governor.task import Task, TaskFuture, TaskState, WorkflowFuture


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


WALL_OFFSET = 1_800_000_000.0  # wall = monotonic + offset; bucket-aligned


def ended(step: str, submitted: float, latency: float, state=TaskState.DONE, error=None, lane=Lane.POOL,
          limits=Limits()) -> TaskFuture:
    task = Task(1, step, lane, (), {}, limits, submitted, state=state, error=error, pid=4242)
    task.dispatched_at, task.ended_at = submitted, submitted + latency
    return TaskFuture(task, lambda *_: False, CallbackRunner())


@pytest.fixture
def clock():
    return Clock(1000.0)


@pytest.fixture
def model(clock):
    return LiveModel(clock, lambda: clock.now + WALL_OFFSET)


def test_the_window_keeps_the_last_minute_and_its_quantiles_are_nearest_rank(model, clock):
    clock.now += 2 * WINDOW_S
    model.task_ended(1, ended("old", clock.now - WINDOW_S - 5, 0.5))  # ended 60.5 s ago: out
    for index, latency in enumerate([0.01 * n for n in range(1, 21)]):  # 10 ms .. 200 ms
        model.task_ended(10 + index, ended("git.status", clock.now - 30, latency))
    figures = model.figures()
    [step] = figures["steps"]
    assert step["step"] == "git.status" and step["count"] == 20
    assert step["p50_s"] == pytest.approx(0.10) and step["p95_s"] == pytest.approx(0.19)
    assert figures["window_s"] == WINDOW_S and step["per_s"] == pytest.approx(20 / WINDOW_S)


def test_a_steps_latency_is_split_into_its_queue_wait_and_its_run(model, clock):
    clock.now += 10
    for waited in (0.1, 0.2, 3.0):  # a task that waited 3 s behind others still ran 0.2 s
        future = ended("crunch", clock.now - 5, waited + 0.2)
        future.task.dispatched_at = future.task.started_at = future.task.submitted_at + waited
        model.task_ended(1, future)
    never_ran = ended("crunch", clock.now - 5, 1.0, TaskState.CANCELLED)
    never_ran.task.dispatched_at = None  # cancelled in the queue
    model.task_ended(2, never_ran)
    [step] = model.figures()["steps"]
    assert step["count"] == 4
    assert step["run_p50_s"] == pytest.approx(0.2) and step["run_p95_s"] == pytest.approx(0.2)
    assert step["queue_p50_s"] == pytest.approx(0.2) and step["queue_p95_s"] == pytest.approx(3.0)
    assert step["p95_s"] == pytest.approx(3.2), "the latency is both parts together"


def test_just_after_a_start_rates_are_over_the_time_since_then(model, clock):
    clock.now += 10
    model.task_ended(1, ended("echo", clock.now - 1, 0.5))
    figures = model.figures()
    assert figures["window_s"] == 10 and figures["steps"][0]["per_s"] == pytest.approx(0.1)


def test_a_full_ring_says_how_much_of_the_window_it_still_covers(model, clock):
    clock.now += 2 * WINDOW_S
    for index in range(MAX_ENDS):  # all within the last 20 s, the oldest 20 s ago
        model.task_ended(index + 1, ended("noop", clock.now - 20 + index * (20 / MAX_ENDS), 0.0))
    assert model.figures()["window_s"] == pytest.approx(20)


def test_the_series_buckets_ends_by_when_they_ended(model, clock):
    clock.now += 3600 + SERIES_BUCKET_S / 2  # the newest bucket began half a bucket ago
    for ago in (1, 2, SERIES_BUCKET_S + 1, SERIES_BUCKETS * SERIES_BUCKET_S + 10):  # the last one: too old
        model.task_ended(1, ended("echo", clock.now - ago - 0.2, 0.2))
    points = model.figures()["series"]["points"]
    assert len(points) == SERIES_BUCKETS and points[-1]["t"] <= clock.now + WALL_OFFSET
    assert sum(point["count"] for point in points) == 3
    assert [point["count"] for point in points[-2:]] == [1, 2]


def test_kills_are_the_ends_a_worker_did_not_survive(model, clock):
    clock.now += 10
    model.task_ended(1, ended("spin", clock.now - 2, 1.0, TaskState.TIMED_OUT, StepTimeout("spin", 1, 1.0, 1.002, 77)))
    model.task_ended(2, ended("hog", clock.now - 2, 0.3, TaskState.OVER_MEMORY,
                              MemoryLimitExceeded("hog", 2, 100, None, 78, killed=False)))  # refused, not killed
    model.task_ended(3, ended("hog", clock.now - 2, 0.3, TaskState.OVER_MEMORY,
                              MemoryLimitExceeded("hog", 3, 100, 101.25, 79)))
    model.task_ended(4, ended("fine", clock.now - 2, 0.3))
    kills = model.figures()["kills"]
    assert [(kill["task_id"], kill["reason"], kill["limit"], kill["observed"], kill["pid"]) for kill in kills] == [
        (3, "memory", "100 MiB", "101.2 MiB", 79), (1, "timeout", "1 s", "1.002 s", 77)]


def test_a_workflow_counts_each_of_its_steps_under_its_one_id(model, clock):
    clock.now += 10
    steps = [ended("chat.create", clock.now - 2, 0.1, lane=Lane.CRITICAL),
             ended("chat.send_message", clock.now - 1, 0.2, lane=Lane.CRITICAL)]
    model.task_ended(9, WorkflowFuture(steps, CallbackRunner()))
    assert [(step["step"], step["count"]) for step in model.figures()["steps"]] == [
        ("chat.create", 1), ("chat.send_message", 1)]


@pytest.mark.parametrize("address, allowed", [("127.0.0.1:8765", True), ("[::1]:0", True), ("localhost:1", True),
                                              ("0.0.0.0:8765", False), ("10.1.2.3:80", False),
                                              ("example.com:80", False)])
def test_only_loopback_without_the_remote_flag(address, allowed):
    if allowed:
        assert HttpConfig.parse(address).port == int(address.rsplit(":", 1)[1])
    else:
        with pytest.raises(HttpAddressError):
            HttpConfig.parse(address)
        assert HttpConfig.parse(address, allow_remote=True).host in address


@pytest.mark.parametrize("address", ["8765", ":8765", "127.0.0.1:", "127.0.0.1:99999", "127.0.0.1:http"])
def test_malformed_addresses_are_refused(address):
    with pytest.raises(HttpAddressError):
        HttpConfig.parse(address, allow_remote=True)
