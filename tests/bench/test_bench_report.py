"""The bench's report and picture say what the run was, and can be read without the numbers.

A run is built here from ScenarioResults filled as a scenario fills them (no scenario is
run: tests/test_bench.py runs them all at the tiny size); the report and the picture are
then drawn from it for real (markdown written, PNG rendered with matplotlib).
"""

import datetime

import pytest

import governor
from governor.bench import plot, report, runner
from governor.bench.core import ScenarioResult
from governor.bench.scenarios import scenario_names
from governor.bench.stats import Summary

matplotlib = pytest.importorskip("matplotlib")
import matplotlib.image  # noqa: E402 (after the skip)


def build_run(scenarios, results):
    document = {
        "schema_version": runner.SCHEMA_VERSION, "machine": runner.machine(), "versions": runner.versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "parameters": {"quick": False, "size": "quick", "backend": "loky", "scenarios": scenarios},
        "scenarios": {name: result.to_json() for name, result in results.items()},
        "checks": {"leftover_processes": []},
    }
    return runner.BenchRun(document, results)


def governor_result():
    result = ScenarioResult()
    samples = [float(n) for n in range(1, 41)]
    summary = result.put("timeout_precision", Summary.of(samples), "timeout precision")
    result.put("where", str(report._CHECKOUT / "bench"), "repository")
    result.target("timeout precision p95", summary.p95, 25.0, "ms")  # 38.05: missed
    result.target("cancel busy step p95", 10.0, 50.0, "ms")  # met
    result.distribution("Governor: latency after the trigger", "timeout precision", samples)
    return result


def memory_result():
    result = ScenarioResult()
    workers = [{"pid": n, "role": "running" if n < 4 else "idle", "rss_mb": 20.0, "uss_mb": 8.0, "pss_mb": 9.0}
               for n in range(6)]
    result.put("per_worker", workers)
    result.put("supervisor.rss_growth_mb", 0.5)
    result.put("baseline.raw_loky_worker_uss_mb", 12.0)
    result.target("additional memory with 4 workers busy", 48.5, 100.0, "MiB")
    return result


def test_the_report_links_the_picture_it_was_written_with(tmp_path):
    bench_run = build_run(["governor"], {"governor": governor_result()})
    picture = tmp_path / "pictures" / "run-1.png"
    picture.parent.mkdir()
    assert plot.write_plot(bench_run, picture) is None
    bench_run.document["checks"]["plot"] = "written"
    written = tmp_path / "reports" / "run-1.md"
    written.parent.mkdir()
    report.write_markdown(bench_run, written, picture)
    text = written.read_text()
    link = text.split("](", 1)[1].split(")", 1)[0]
    assert link == "../pictures/run-1.png"
    assert (written.parent / link).resolve() == picture.resolve()


def test_the_report_says_the_version_that_ran_and_no_machine_path(monkeypatch):
    real_version = runner.importlib.metadata.version

    def run_from_a_checkout(package):  # no distribution metadata for governor, as when run from a checkout
        if package == "governor":
            raise runner.importlib.metadata.PackageNotFoundError(package)
        return real_version(package)

    monkeypatch.setattr(runner.importlib.metadata, "version", run_from_a_checkout)
    bench_run = build_run(["governor"], {"governor": governor_result()})
    text = report.markdown(bench_run)
    assert f"governor {governor.__version__}" in text and "governor not installed" not in text
    assert str(report._CHECKOUT) not in text and "| repository | <checkout>/bench |" in text
    assert str(report._CHECKOUT) not in report.format_table(bench_run)


def test_titles_name_the_scenarios_run_or_say_all():
    one = build_run(["governor"], {"governor": governor_result()})
    assert report.run_title(one.document).startswith("Governor benchmark: governor, size quick, ")
    assert report.markdown(one).startswith("# Governor benchmark: governor, size quick")
    every = build_run(scenario_names(), {})
    assert report.run_title(every.document).startswith("Governor benchmark, all scenarios, size quick")
    figure = plot.draw(one.document)
    assert figure._suptitle.get_text().startswith("Governor benchmark: governor, size quick")
    matplotlib.pyplot.close(figure)


def test_the_picture_shows_every_verdict_each_target_as_a_line_and_a_memory_panel():
    bench_run = build_run(["governor", "memory"], {"governor": governor_result(), "memory": memory_result()})
    figure = plot.draw(bench_run.document)
    axes = {axis.get_title(): axis for axis in figure.get_axes()}
    verdicts = axes["Targets of this run"]
    colours = [line.get_color() for line in verdicts.get_lines() if line.get_marker() == "o"]
    assert colours == [plot.MISSED, plot.MET, plot.MET], "one dot per target, coloured by its verdict"
    assert [label.get_text() for label in verdicts.get_yticklabels()] == [
        "timeout precision p95 [governor]", "cancel busy step p95 [governor]",
        "additional memory with 4 workers busy [memory]"]
    texts = [text.get_text() for text in verdicts.texts]
    assert "MISSED: 38 ms vs 25 ms" in texts and "met: 48.5 MiB vs 100 MiB" in texts
    latency = axes["Governor: latency after the trigger"]
    target_lines = [line for line in latency.get_lines() if line.get_label().startswith("target:")]
    assert [line.get_xdata()[0] for line in target_lines] == [25.0, 50.0], "each ms target as a line"
    memory = axes["Memory: what Governor adds, against bare loky workers"]
    assert sum(patch.get_height() for patch in memory.patches[:3]) == pytest.approx(48.5)
    assert [line.get_ydata()[0] for line in memory.get_lines()] == [100.0], "the budget as a line"
    matplotlib.pyplot.close(figure)


def test_the_picture_holds_every_label_of_the_verdicts(tmp_path):
    """A long target name (left) and a wild figure's verdict (right) must not fall off the picture."""
    from matplotlib.transforms import Bbox

    result = governor_result()
    long_name = "parallel view p50 beyond the slowest single step, ours / the best peer's, " * 3
    result.target(long_name, 1.02, 1.0, "x")  # long enough that the layout would give up
    result.target("a figure far past its limit", 1000.0, 1.0, "x")  # drawn at the axis' end, its text beyond
    bench_run = build_run(["governor"], {"governor": result})
    picture = tmp_path / "run.png"
    assert plot.write_plot(bench_run, picture) is None
    figure = plot.draw(bench_run.document)
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    [verdicts] = [axis for axis in figure.get_axes() if axis.get_title() == "Targets of this run"]
    labels = [*verdicts.get_yticklabels(), *verdicts.texts]
    assert any("1,000x" in label.get_text() for label in labels)
    drawn = Bbox.union([figure.bbox, *(label.get_window_extent(renderer) for label in labels)])
    height, width = matplotlib.image.imread(picture).shape[:2]
    scale = plot.DPI / figure.dpi
    assert width >= drawn.width * scale and height >= drawn.height * scale, (
        f"the labels span {drawn.width * scale:.0f} x {drawn.height * scale:.0f} px; the picture is {width} x {height}")
    matplotlib.pyplot.close(figure)


def test_a_stored_run_is_redrawn_from_its_json(tmp_path):
    bench_run = build_run(["governor"], {"governor": governor_result()})
    runner.write_json(bench_run, tmp_path / "run.json")
    assert plot.main([str(tmp_path / "run.json"), str(tmp_path / "run.png")]) == 0
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
