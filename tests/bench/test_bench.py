"""Smoke test of the benchmark harness: every scenario at the tiny size, once (the ``ray``
scenario in its own tests, marked ``ray``: it needs the ray extra).

It checks the shape of what the harness writes (the JSON's documented keys, the report,
the picture), never a timing: speed is measured by ``python -m governor.bench``, not asserted here.
"""

import datetime
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

# ``bench`` lives at the repository's root and is not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import governor.bench as bench  # noqa: E402
from governor.bench import plot, report  # noqa: E402
from governor.bench.__main__ import main  # noqa: E402
from governor.bench.peers import MpirePeer, MpPoolPeer, PebblePeer, StdlibPeer  # noqa: E402
from governor.bench.scenarios import sandbox as sandbox_scenario  # noqa: E402
from governor.bench.scenarios import scenario_names  # noqa: E402
from governor.bench.stats import Summary, percentile  # noqa: E402
from governor.workers.sandbox import SandboxPolicy  # noqa: E402

#: The tiny run starts every pool several times: minutes on a loaded 2-core machine.
pytestmark = pytest.mark.timeout(280)

TOP_LEVEL = {"schema_version", "machine", "versions", "date", "parameters", "scenarios", "checks"}
MACHINE = {"cpu_count", "cpu_model", "memory_total_mb", "os", "kernel", "python", "load_average_1m_at_start"}
VERSIONS = {"governor", "loky", "psutil", "pebble", "matplotlib", "ray"}
SCENARIO = {"elapsed_s", "figures", "targets", "notes", "distributions", "curves"}
TARGET = {"name", "value", "limit", "unit", "met"}
DISTRIBUTION = {"n", "p50_ms", "p95_ms", "p99_ms", "mean_ms", "min_ms", "max_ms"}

#: One figure per scenario that must be a distribution (checks the shared latency format).
HEADLINE_DISTRIBUTIONS = {
    "view-switch": ("batch",),
    "overhead": ("peers", "governor", "roundtrip"),
    "governor": ("cancel_busy",),
    "scaling": ("by_workers", 0, "latency"),
}

#: The ray scenario's headline distributions, one per measurement, on the Ray lane.
RAY_DISTRIBUTIONS = [("peers", "governor-ray", figure)
                     for figure in ("roundtrip", "timeout_precision", "cancel_busy_resolved")]

#: Its Ray / loky ratios.
RAY_RATIOS = ["roundtrip_p50", "roundtrip_p95", "throughput", "timeout_precision_p50", "timeout_precision_p95",
              "cancel_busy_resolved_p50", "cancel_busy_resolved_p95"]

REPOSITORY = Path(__file__).resolve().parents[2]


def has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    paths = {"json_path": out / "bench.json", "report_path": out / "bench.md", "plot_path": out / "bench.png"}
    bench_run = bench.run(size="tiny", **paths)
    return bench_run, paths


def test_every_scenario_runs_and_the_json_has_the_documented_schema(tiny_run):
    bench_run, paths = tiny_run
    assert not bench_run.errors, bench_run.errors
    document = json.loads(paths["json_path"].read_text())
    assert set(document) == TOP_LEVEL
    assert document["schema_version"] == bench.SCHEMA_VERSION
    assert set(document["machine"]) == MACHINE
    assert set(document["versions"]) == VERSIONS
    datetime.datetime.fromisoformat(document["date"])
    assert document["parameters"] == {"quick": False, "size": "tiny", "backend": "loky",
                                      "scenarios": scenario_names()}
    assert_scenarios_have_the_schema(document, scenario_names())
    for name, path in HEADLINE_DISTRIBUTIONS.items():
        assert_distribution(document["scenarios"][name]["figures"], path)
    assert document["checks"]["leftover_processes"] == []
    assert bench_run.ok


def test_overhead_judges_ours_against_mp_pool_the_fastest_peer(tiny_run):
    _, paths = tiny_run
    targets = json.loads(paths["json_path"].read_text())["scenarios"]["overhead"]["targets"]
    names = {target["name"] for target in targets}
    assert "round-trip p50, ours / mp.Pool's <= 1.25x" in names
    assert "throughput of 20 no-ops, mp.Pool's / ours <= 1.25x" in names


def test_overhead_says_what_a_no_op_costs_in_cpu_on_each_side(tiny_run):
    _, paths = tiny_run
    peers = json.loads(paths["json_path"].read_text())["scenarios"]["overhead"]["figures"]["peers"]
    for name, figures in peers.items():
        cpu = figures["cpu_per_task_us"]
        assert set(cpu) == {"process", "workers"} and cpu["process"] > 0, name
        assert cpu["workers"] > 0, f"{name}: its workers' CPU was not seen"
        assert figures["worker_sleeps_per_task"] >= 0, name


def test_the_daemon_scenario_says_what_a_task_costs_the_daemon_in_cpu(tiny_run):
    _, paths = tiny_run
    cpu = json.loads(paths["json_path"].read_text())["scenarios"]["daemon"]["figures"]["daemon_cpu_per_task"]
    runs = [cpu["roundtrip"]] + [cpu[where][form][clients] for where in ("daemon_normal", "daemon_full")
                                 for form in ("submit", "batch") for clients in cpu[where][form]]
    for figures in runs:
        assert set(figures) == {"loop_us", "other_threads_us", "sleeps"}, figures
        assert figures["loop_us"] > 0 and figures["other_threads_us"] > 0 and figures["sleeps"] >= 0, figures


def assert_scenarios_have_the_schema(document, names):
    assert set(document["scenarios"]) == set(names)
    for name, entry in document["scenarios"].items():
        assert set(entry) == SCENARIO, name
        assert entry["figures"], name
        for target in entry["targets"]:
            assert set(target) == TARGET, (name, target)


def assert_distribution(figures, path):
    node = figures
    for key in path:
        node = node[key]
    assert set(node) == DISTRIBUTION, path
    assert node["n"] >= 1


def test_the_report_names_every_scenario_and_target(tiny_run):
    bench_run, paths = tiny_run
    markdown = paths["report_path"].read_text()
    for name in scenario_names():
        assert f"## {name}" in markdown
    assert "## Targets" in markdown
    table = report.format_table(bench_run)
    assert all(f"== {name}" in table for name in scenario_names())


def test_the_picture_is_written(tiny_run):
    bench_run, paths = tiny_run
    if not has_matplotlib():
        pytest.skip("matplotlib is not installed")
    assert paths["plot_path"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert bench_run.document["checks"]["plot"] == "written"


def test_without_matplotlib_the_picture_is_skipped_with_a_reason(tiny_run, tmp_path, monkeypatch):
    bench_run, _ = tiny_run
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes ``import matplotlib`` fail
    reason = plot.write_plot(bench_run, tmp_path / "none.png")
    assert "matplotlib is not installed" in reason
    assert not (tmp_path / "none.png").exists()


@pytest.mark.parametrize("peer_class", [StdlibPeer, PebblePeer, MpirePeer, MpPoolPeer], ids=lambda peer: peer.name)
def test_the_peers_start_their_workers_without_forking_this_threaded_process(peer_class, monkeypatch):
    # A child forked from a process with threads may inherit a lock one of them held (Python
    # 3.12+ warns of it); this test process has threads, as the bench's has.
    monkeypatch.setattr(os, "fork", _no_fork)
    with peer_class(2) as peer:
        assert peer.warm() == 2 and peer.submit("echo", "x").result(timeout=60) == "x"


def test_the_sandbox_scenario_times_apply_without_forking_this_process(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "fork", _no_fork)
    policy = SandboxPolicy(tmp_root=str(tmp_path))
    assert 0 < sandbox_scenario._apply_seconds(policy) < 60


def _no_fork():
    raise AssertionError(f"os.fork() in the bench's own process, which runs {threading.active_count()} threads")


def test_the_cli_lists_scenarios_and_rejects_unknown_ones():
    runner = CliRunner()
    listed = runner.invoke(main, ["--list"])
    assert listed.exit_code == 0
    assert all(name in listed.output for name in bench.SCENARIOS)
    assert runner.invoke(main, ["--scenario", "no-such-scenario"]).exit_code == 2
    assert runner.invoke(main, ["--backend", "no-such-backend"]).exit_code == 2


def test_a_backend_adds_its_scenarios_to_the_run():
    assert "ray" in bench.SCENARIOS and "ray" not in scenario_names()
    assert scenario_names(backend="ray") == scenario_names() + ["ray"]
    assert scenario_names(["overhead"], backend="ray") == ["overhead", "ray"]
    assert scenario_names(["ray"]) == ["ray"]


def test_without_ray_the_ray_scenario_fails_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes ``import ray`` fail
    bench_run = bench.run(["ray"], size="tiny", progress=False)
    error = bench_run.document["scenarios"]["ray"]["error"]
    assert error.startswith("BackendUnavailable: ") and "[ray]" in error
    assert not bench_run.ok


def check_ray_run(document, started_by_scenario):
    assert document["parameters"]["scenarios"] == ["ray"]
    assert_scenarios_have_the_schema(document, ["ray"])
    figures = document["scenarios"]["ray"]["figures"]
    for path in RAY_DISTRIBUTIONS:
        assert_distribution(figures, path)
    assert all(figures["ratios"]["governor"][key] > 0 for key in RAY_RATIOS)
    assert figures["node"]["started_by_scenario"] is started_by_scenario
    assert document["checks"]["leftover_processes"] == []


@pytest.mark.ray
def test_the_ray_scenario_uses_the_ray_this_process_initialised_and_leaves_it_running(ray_node, tmp_path):
    bench_run = bench.run(["ray"], size="tiny", backend="ray", progress=False, json_path=tmp_path / "ray.json")
    assert not bench_run.errors, bench_run.errors
    check_ray_run(json.loads((tmp_path / "ray.json").read_text()), started_by_scenario=False)
    assert ray_node.is_initialized()


@pytest.mark.ray
def test_the_ray_scenario_starts_and_stops_its_own_node_from_the_command_line(tmp_path):
    pytest.importorskip("ray", reason="the ray extra is not installed")
    # A fresh interpreter, where no Ray runs yet; its leftover check sees Ray's shutdown.
    done = subprocess.run([sys.executable, "-m", "governor.bench", "--size", "tiny", "--backend", "ray", "--scenario", "ray",
                           "--json", str(tmp_path / "ray.json")], cwd=REPOSITORY, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    document = json.loads((tmp_path / "ray.json").read_text())
    assert document["parameters"]["backend"] == "ray"
    check_ray_run(document, started_by_scenario=True)


def test_percentiles_interpolate_like_numpy():
    assert percentile([1.0], 99) == 1.0
    assert percentile([0.0, 10.0], 50) == 5.0
    assert percentile(list(range(101)), 95) == 95
    summary = Summary.of_seconds([0.001, 0.002, 0.003])
    assert (summary.n, summary.p50, summary.min, summary.max) == (3, 2.0, 1.0, 3.0)
