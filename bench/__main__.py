"""``python -m governor.bench``: a thin command line over :func:`bench.run`.

Exit status: 0 when every scenario ran and no process was left behind, 1 otherwise
(targets missed do not fail the run: speed is measured, not asserted), 2 for bad usage.
"""

from __future__ import annotations

import sys

import click
from governor.engine.supervisor import BACKENDS

from governor.bench.core import SCENARIOS, SIZES
from governor.bench.report import format_table
from governor.bench.runner import run


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--quick", is_flag=True, help="A short run (under a minute on 2 cores).")
@click.option("--scenario", "scenarios", multiple=True, type=click.Choice(list(SCENARIOS)),
              help="Run only this scenario (repeatable). Default: all but those a --backend adds and chaos.")
@click.option("--backend", type=click.Choice(BACKENDS), default="loky", show_default=True,
              help="Also measure the pool lane on this backend (ray: its scenario, on a local Ray node).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True),
              help="Write the figures as JSON here.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, writable=True),
              help="Write a markdown report here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, writable=True),
              help="Write a PNG of the distributions and curves here (needs matplotlib).")
@click.option("--size", type=click.Choice(sorted(SIZES)), default=None, hidden=True,
              help="Override the run size (tiny is for the smoke test).")
@click.option("--list", "list_only", is_flag=True, help="List the scenarios and exit.")
def main(quick: bool, scenarios: tuple, backend: str, json_path: str, report_path: str, plot_path: str,
         size: str, list_only: bool) -> None:
    """Benchmark Governor: view switch, overhead next to its peers, limits, memory, scaling.

    Progress goes to stderr, the table to stdout.
    """
    if list_only:
        for name, entry in SCENARIOS.items():
            needs = f" [--backend {entry.backend}]" if entry.backend else " [--scenario only]" if entry.named_only else ""
            click.echo(f"{name:<12} {entry.description}{needs}")
        return
    if size is not None and quick and size != "quick":
        raise click.UsageError("--quick and --size disagree")
    bench_run = run(scenarios or None, size or ("quick" if quick else "full"), backend=backend,
                    json_path=json_path, report_path=report_path, plot_path=plot_path)
    click.echo(format_table(bench_run))
    for name, trace in bench_run.errors.items():
        click.echo(f"\n{name} failed:\n{trace}", err=True)
    sys.exit(0 if bench_run.ok else 1)


if __name__ == "__main__":
    main(prog_name="python -m governor.bench")
