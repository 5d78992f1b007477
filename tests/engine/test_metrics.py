"""Metrics and logs after a known mix of outcomes: exact counts in both views, one WARNING a kill."""

import io
import json
import logging
import random
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import wait_until
from governor import Call, Limits, Supervisor
from governor.limits import Lane
from governor.logs import configure_logging
from governor.engine.metrics import FOLD_AT, HISTOGRAMS, MetricsRecorder
from governor.task import Task, TaskState
from step_library import registry, wait_for_path


@pytest.fixture
def known_mix(tmp_path, caplog):
    """3 ok, 1 failed, 1 timeout, 1 over memory, 1 cancelled, 1 crashed; yields the supervisor."""
    caplog.set_level(logging.DEBUG, logger="governor")
    with Supervisor(registry, workers=4) as sup:
        futures = [sup.submit("echo", n) for n in range(3)]
        futures.append(sup.submit("boom"))
        futures.append(sup.submit_call(Call("busy_loop", limits=Limits(timeout_s=0.2))))
        futures.append(sup.submit_call(Call("allocate", kwargs={"chunk_mb": 50, "total_mb": 2048},
                                            limits=Limits(max_memory_mb=150))))
        cancelled = sup.submit_call(Call("busy_loop", (str(tmp_path / "spinning"),), limits=Limits(cancel_grace_s=0)))
        wait_for_path(str(tmp_path / "spinning"))
        cancelled.cancel()
        futures.append(cancelled)
        futures.append(sup.submit("die", 9))
        for future in futures:
            try:
                future.result(timeout=60)
            except Exception:
                pass
        yield sup


EXPECTED = {"ok": 3, "failed": 1, "timeout": 1, "memory": 1, "cancelled": 1, "crashed": 1}


def outcomes_by_kind(tasks):
    totals = {}
    for steps in tasks.values():
        for outcomes in steps.values():
            for outcome, count in outcomes.items():
                totals[outcome] = totals.get(outcome, 0) + count
    return totals


def test_snapshot_counts_every_outcome_and_times_every_task(known_mix):
    snapshot = known_mix.metrics()
    json.dumps(snapshot)  # serialisable as it is
    assert outcomes_by_kind(snapshot["tasks"]) == EXPECTED
    pool = snapshot["timings"]["pool"]
    assert sum(step["latency_seconds"]["count"] for step in pool.values()) == 8
    assert sum(step["queue_wait_seconds"]["count"] for step in pool.values()) == 8
    assert pool["echo"]["latency_seconds"]["p50"] > 0
    assert pool["allocate"]["peak_rss_bytes"]["p99"] >= 150 * 2 ** 20
    assert snapshot["worker_kills"]["pool"] == {"timeout": 1, "memory": 1, "cancel": 1, "crash": 1}
    assert snapshot["queue_depth"] == {"critical": 0, "pool": 0}
    assert snapshot["workers"]["pool"]["busy"] == 0
    assert snapshot["workers"]["critical"]["idle"] == 2
    assert snapshot["memory"]["workers_rss_bytes"] > 0
    assert wait_until(lambda: known_mix.metrics()["worker_spawns"]["pool"] == 5 + 4, timeout=30), \
        "the four dead workers were replaced"
    assert wait_until(lambda: known_mix.metrics()["warm_spares"]["pool"] == 1, timeout=30)


def test_prometheus_text_parses_and_matches(known_mix):
    families = {family.name: family for family in text_string_to_metric_families(known_mix.prometheus_text())}
    tasks = {sample.labels["outcome"]: sample.value for sample in families["governor_tasks"].samples
             if sample.name == "governor_tasks_total"}
    assert {outcome: tasks.get(outcome, 0) for outcome in EXPECTED} == EXPECTED
    latency_counts = [sample.value for sample in families["governor_task_latency_seconds"].samples
                      if sample.name.endswith("_count")]
    assert sum(latency_counts) == 8
    kills = {sample.labels["reason"]: sample.value for sample in families["governor_worker_kills"].samples
             if sample.name == "governor_worker_kills_total"}
    assert kills == {"timeout": 1, "memory": 1, "cancel": 1, "crash": 1}
    assert families["governor_workers_rss_bytes"].samples[0].value > 0


def test_two_supervisors_keep_their_own_series(known_mix):
    with Supervisor(registry, workers=1) as other:
        other.submit("echo", 1).result(timeout=30)
        other_tasks = [sample for family in text_string_to_metric_families(other.prometheus_text())
                       for sample in family.samples if sample.name == "governor_tasks_total"]
    assert [sample.value for sample in other_tasks] == [1]


def test_each_kill_and_crash_logs_one_warning_with_its_fields(known_mix, caplog):
    records = caplog.get_records("setup")  # the mix ran in the fixture
    deaths = [record for record in records if record.levelno == logging.WARNING]
    assert sorted(record.reason for record in deaths) == ["cancel", "crash", "memory", "timeout"]
    for record in deaths:
        assert record.step in {"busy_loop", "allocate", "die"}
        assert record.lane == "pool"
        assert isinstance(record.pid, int) and isinstance(record.task_id, int)
    timeout = next(record for record in deaths if record.reason == "timeout")
    assert timeout.limit == 0.2 and timeout.observed >= 0.2
    memory = next(record for record in deaths if record.reason == "memory")
    assert memory.limit == 150 and memory.observed >= 150
    lifecycle = [record for record in records if record.levelno == logging.DEBUG]
    assert {record.reason for record in lifecycle if getattr(record, "reason", None)} >= {"done", "failed"}


def test_json_lines_output():
    stream = io.StringIO()
    handler = configure_logging("json", stream=stream)
    try:
        logging.getLogger("governor").warning("killed", extra={"task_id": 7, "step": "s", "lane": "pool",
                                                               "pid": 42, "reason": "timeout", "limit": 1.0,
                                                               "observed": 1.2})
    finally:
        logging.getLogger("governor").removeHandler(handler)
    document = json.loads(stream.getvalue().splitlines()[-1])
    assert document["level"] == "WARNING" and document["message"] == "killed"
    assert {key: document[key] for key in ("task_id", "step", "pid", "reason", "limit", "observed")} == {
        "task_id": 7, "step": "s", "pid": 42, "reason": "timeout", "limit": 1.0, "observed": 1.2}


def _finished_task(number, rng):
    """A task that ended in a random state, with random but plausible timings."""
    step = rng.choice(["echo", "boom", "sleep"])
    task = Task(number, step, rng.choice([Lane.POOL, Lane.CRITICAL]), (), {}, Limits(), submitted_at=100.0)
    task.state = rng.choice([TaskState.DONE, TaskState.FAILED, TaskState.TIMED_OUT, TaskState.CANCELLED])
    if rng.random() < 0.9:  # a few never reached a worker
        task.dispatched_at = 100.0 + rng.expovariate(1 / 0.002)
        task.started_at = task.dispatched_at + rng.expovariate(1 / 0.0005)
        task.peak_rss_bytes = rng.choice([None, rng.randrange(2 ** 20, 2 ** 32)])
    task.ended_at = (task.started_at or 100.0) + rng.choice([0.0, 0.0001, 0.25, 5.0, rng.expovariate(10)])
    return task


def test_figures_folded_in_batches_equal_figures_folded_task_by_task():
    """Rows wait to be folded in (until a read, or FOLD_AT of them): whatever the batches,
    every count, bucket, sum and the latest samples are the same as one task at a time."""
    rng = random.Random(12)
    tasks = [_finished_task(number, rng) for number in range(2 * FOLD_AT + 123)]
    batched, task_by_task = MetricsRecorder(), MetricsRecorder()
    for task in tasks:
        batched.task_finished(task)
        task_by_task.task_finished(task)
        task_by_task.histogram_buckets("latency_seconds")  # a read folds what is pending: this one task
    assert batched.snapshot({})["tasks"] == task_by_task.snapshot({})["tasks"]
    assert rounded_sums(batched.snapshot({})["timings"]) == rounded_sums(task_by_task.snapshot({})["timings"])
    for name in HISTOGRAMS:  # a batch's sum adds the same floats in another order
        assert rounded_sums(batched.histogram_buckets(name)) == rounded_sums(task_by_task.histogram_buckets(name))
    latencies = [task.ended_at - task.submitted_at for task in tasks if task.step == "echo" and task.lane is Lane.POOL]
    buckets, total = batched.histogram_buckets("latency_seconds")[("pool", "echo")]
    assert buckets[-1] == ("+Inf", len(latencies)) and total == pytest.approx(sum(latencies))
    assert buckets[3] == ("0.001", sum(1 for value in latencies if value <= 0.001))


def test_no_finished_task_is_lost_while_readers_fold():
    """Two threads record while a third reads (and so folds) all along: every task counted once."""
    recorder = MetricsRecorder()
    per_thread = 3 * FOLD_AT
    done = threading.Event()

    def record(seed):
        rng = random.Random(seed)
        for number in range(per_thread):
            recorder.task_finished(_finished_task(number, rng))

    def read():
        while not done.is_set():
            recorder.histogram_buckets("duration_seconds")

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=record, args=(seed,)) for seed in (1, 2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    done.set()
    reader.join()
    assert sum(outcomes_by_kind_total(recorder.snapshot({})["tasks"])) == 2 * per_thread


def rounded_sums(figures):
    """``figures`` with every float rounded to 9 significant digits."""
    if isinstance(figures, dict):
        return {key: rounded_sums(value) for key, value in figures.items()}
    if isinstance(figures, (list, tuple)):
        return [rounded_sums(value) for value in figures]
    return float(f"{figures:.9g}") if isinstance(figures, float) else figures


def outcomes_by_kind_total(tasks):
    return [count for steps in tasks.values() for outcomes in steps.values() for count in outcomes.values()]
