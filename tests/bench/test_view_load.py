"""The ``view-load`` scenario at the tiny size, as ``python -m governor.bench --scenario view-load``
runs it: four engines behind the reference backend on uvicorn, users over real HTTP. The
shape of what it reports, never a timing (the bench measures; this checks it can)."""

import pytest

pytest.importorskip("uvicorn", reason="needs the web extra")

import governor.bench as bench  # noqa: E402
from governor.bench.runner import scenario_names  # noqa: E402
from governor.bench.scenarios.view_load import ENGINES  # noqa: E402

#: A fresh server per engine, four of them, on a shared machine.
pytestmark = pytest.mark.timeout(600)


def test_view_load_runs_only_when_named_and_reports_every_engine():
    assert "view-load" not in scenario_names() and scenario_names(["view-load"]) == ["view-load"]
    bench_run = bench.run(["view-load"], size="tiny", progress=False)
    assert not bench_run.errors, bench_run.errors
    assert bench_run.document["checks"]["leftover_processes"] == []
    scenario = bench_run.document["scenarios"]["view-load"]
    for engine in ENGINES:
        run = scenario["figures"][engine.name.replace(" ", "_")]["seed-753"]["users_2"]
        assert {"views_per_s", "wasted_worker_s", "after_supersede_worker_s", "cpu_s", "uss_mib", "aborted",
                "gave_up", "errors"} <= set(run)
        assert run["errors"] == 0 and run["uss_mib"] > 0 and run["after_supersede_worker_s"] >= 0
        # The users' slowest views split along the server's log (a daemon's journal has no answers).
        assert ("latency_split" in run) is not engine.daemon, engine
        if not engine.daemon:
            assert run["latency_split"]["views"] > 0 and run["latency_split"]["answer_ms"] >= 0
        # Every worker ran a part before the users came (the seed's registry has one lane).
        assert run["warmed_workers"] == (1 if engine.name == "before" else 2), engine
        # Every engine's server logged its views (through the daemon, its journal did).
        assert run["slowest_views"]["views"] > 0
    # Every row of the report reads as text: no figure shown as a raw dict.
    assert not [row for row in bench_run.results["view-load"].rows if row.text.startswith("{")]
    names = [target["name"] for target in scenario["targets"]]
    assert sum("five answers" in name for name in names) == 2
    assert sum("p95 < 200 ms" in name for name in names) == 2
