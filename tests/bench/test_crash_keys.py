"""The crash-keys bar at the tiny size (two trials), as ``python -m governor.bench --scenario
crash-keys`` runs it: 4 keys x 8 critical steps under the daemon, kill -9 in the middle,
a restart; counted from the ledger the steps append to."""

import governor.bench as bench
from governor.bench.scenarios import scenario_names


def test_a_killed_daemon_loses_nothing_runs_nothing_twice_and_keeps_each_keys_order():
    bench_run = bench.run(["crash-keys"], size="tiny", progress=False)
    assert not bench_run.errors, bench_run.errors
    assert bench_run.document["checks"]["leftover_processes"] == []
    totals = bench_run.document["scenarios"]["crash-keys"]["figures"]["totals"]
    assert (totals["lost"], totals["run_twice"], totals["out_of_order"], totals["wrongly_settled"]) == (0, 0, 0, 0), \
        totals
    assert totals["running_at_kill"] >= 1, "the kill never caught a step running: nothing was tested"
    assert "crash-keys" not in scenario_names()
