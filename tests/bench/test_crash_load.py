"""The daemon's kill -9 bar under many clients at the tiny size (two trials), as ``python -m
governor.bench --scenario crash-load`` runs it: clients submitting critical and pool steps,
kill -9 of the daemon in the middle, a restart; counted from the traces the steps leave."""

import governor.bench as bench
from governor.bench.scenarios import scenario_names


def test_a_daemon_killed_under_load_loses_no_accepted_task_and_runs_none_twice():
    bench_run = bench.run(["crash-load"], size="tiny", progress=False)
    assert not bench_run.errors, bench_run.errors
    assert bench_run.document["checks"]["leftover_processes"] == []
    totals = bench_run.document["scenarios"]["crash-load"]["figures"]["totals"]
    assert (totals["lost"], totals["run_twice"], totals["out_of_order"]) == (0, 0, 0), totals
    assert totals["accepted"] > 0 and totals["interrupted"] >= 1, "the kill never caught a critical step running"
    assert "crash-load" not in scenario_names()
