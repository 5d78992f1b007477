"""The bounded chaos run (issue 16): the ``chaos`` scenario at the tiny size, through the
harness as ``python -m governor.bench --scenario chaos`` runs it. Outside kills, cancels,
timeouts, crashes and double forks among innocent tasks, each kind at least twice.
"""

import pytest

import governor.bench as bench
from governor.bench.scenarios import scenario_names


@pytest.fixture(scope="module")
def figures():
    bench_run = bench.run(["chaos"], size="tiny", progress=False)
    assert not bench_run.errors, bench_run.errors
    assert bench_run.document["checks"]["leftover_processes"] == []
    return bench_run.document["scenarios"]["chaos"]["figures"]


def test_no_innocent_task_fails_and_nothing_hangs(figures):
    assert figures["tasks"] >= 30 and figures["outside_kills"] >= 2
    assert (figures["innocent_failures"], figures["unexpected"], figures["hangs"]) == (0, 0, 0), (
        figures["innocent_examples"], figures["unexpected_examples"])


def test_the_supervisor_reports_its_growth(figures):
    for figure in ("rss_mb", "fds", "threads"):
        assert set(figures["supervisor"][figure]) == {"before", "after", "growth"}


def test_no_step_process_outlives_its_task(figures):
    assert figures["orphans"] == {"after_task": 0, "after_task_by_kind": {}, "after_shutdown": 0}


def test_chaos_runs_only_when_named():
    assert "chaos" in bench.SCENARIOS and "chaos" not in scenario_names()
    assert scenario_names(["chaos"]) == ["chaos"]
