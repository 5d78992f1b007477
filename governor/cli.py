"""The ``governor`` command: a thin click layer over the Supervisor, the daemon and its client.

Every command parses its options, calls one domain object and prints. Governor's errors
become :class:`click.ClickException` subclasses with distinct exit codes (:data:`EXIT_CODES`),
so a script can tell a timeout from a crash from a typo.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import click

from governor import __version__, errors
from governor.cli_run import parse_value, run

#: ``governor submit --wait`` exit codes, by how the task (or the request) ended.
EXIT_CODES = {
    "done": 0,
    "failed": 1,
    "daemon_unavailable": 3,
    "timed_out": 4,
    "over_memory": 5,
    "cancelled": 6,
    "crashed": 7,
    "bad_request": 8,
    "queue_full": 9,
    "still_running": 10,
    "skipped": 11,
    "interrupted": 12,
}

_EXIT_FOR_ERROR = [
    (errors.QueueFull, "queue_full"),
    (errors.UnknownStep, "bad_request"),
    (errors.InvalidParameters, "bad_request"),
]


class GovernorClickError(click.ClickException):
    """A Governor error, shown as ``Error: ...`` with the exit code of its kind."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.exit_code = EXIT_CODES[kind]


def _client_error(error: BaseException) -> GovernorClickError:
    from governor.client import DaemonUnavailable
    from governor.protocol import ProtocolError

    if isinstance(error, DaemonUnavailable):
        return GovernorClickError(str(error), "daemon_unavailable")
    if isinstance(error, ProtocolError):
        return GovernorClickError(str(error), "bad_request")
    for cls, kind in _EXIT_FOR_ERROR:
        if isinstance(error, cls):
            return GovernorClickError(str(error), kind)
    return GovernorClickError(str(error), "failed")


socket_option = click.option(
    "--socket", "socket_path", type=click.Path(dir_okay=False, path_type=Path), envvar="GOVERNOR_SOCKET",
    default=None, help="The daemon's Unix socket [default: $XDG_RUNTIME_DIR/governor/governor.sock, "
                       "else a per-user temp dir; env GOVERNOR_SOCKET].")


class _Connected:
    """Opens the client on first use, so ``--help`` never needs a daemon."""

    def __init__(self, socket_path: Optional[Path]):
        self.socket_path = socket_path
        self._client = None

    def client(self):
        if self._client is None:
            from governor.client import Client

            try:
                self._client = Client(self.socket_path)
            except errors.GovernorError as error:
                raise _client_error(error) from None
        return self._client

    def ask(self, request):
        """``request(client)``, with Governor's errors turned into exit-coded click errors."""
        client = self.client()
        try:
            return request(client)
        except errors.GovernorError as error:
            raise _client_error(error) from None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


pass_connection = click.make_pass_decorator(_Connected)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=__version__, prog_name="governor")
@socket_option
@click.pass_context
def main(ctx: click.Context, socket_path: Optional[Path]) -> None:
    """Governor: run many small steps fast and safely in worker processes.

    \b
    Examples:
      governor run --view .                  the view switch on this repository
      governor run git.status:repo=. git.log:repo=.,limit=5
      governor serve                         the supervisor daemon, in the foreground
      governor submit git.status -p repo=$PWD --wait
      governor status                        the recent tasks
    """
    connection = _Connected(socket_path)
    ctx.obj = connection
    ctx.call_on_close(connection.close)


main.add_command(run)


@main.command()
@socket_option
@click.option("--steps", "step_modules", multiple=True, metavar="MODULE[:ATTR]",
              help="Also load the steps of MODULE (its `registry`, or ATTR: a StepRegistry or a "
                   "function taking the daemon's registry). Repeatable. Packages can also ship steps "
                   "through the `governor.steps` entry-point group.")
@click.option("--builtin/--no-builtin", default=True, show_default=True,
              help="Serve the built-in git and chat steps.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Pool workers [default: 2 x CPUs, 4..16].")
@click.option("--journal", "journal_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The SQLite journal [default: $XDG_STATE_HOME/governor/journal.sqlite3].")
@click.option("--metrics-addr", default=None, metavar="HOST:PORT",
              help="Serve Prometheus metrics over HTTP here (e.g. 127.0.0.1:9464). Off by default.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="Logs on stderr as text or JSON lines.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="On SIGTERM/SIGINT, seconds running steps may take to finish before they are cancelled "
                   "(they are then resumed, or reported interrupted, at the next start).")
@click.option("--allow-root", is_flag=True, help="Also accept connections from root.")
@click.option("--backend", type=click.Choice(["loky", "ray"]), default="loky", show_default=True,
              help="Where the pool lane runs: local worker processes, or tasks on a Ray cluster "
                   "(needs the ray extra). The critical lane is always local.")
@click.option("--ray-address", default=None, metavar="ADDR",
              help="With --backend ray: the cluster to join (auto, HOST:PORT, ray://...) "
                   "[default: a private local node on 127.0.0.1].")
@click.option("--sandbox", type=click.Choice(["auto", "require", "off"]), default="auto", show_default=True,
              help="Hold pool workers to read-only with Landlock: what the kernel offers (auto), or refuse to "
                   "start without it (require). Not applied on --backend ray.")
@click.option("--sandbox-write", "sandbox_writes", multiple=True, type=click.Path(path_type=str), metavar="PATH",
              help="A path every pool worker may also write beneath. Repeatable.")
@click.pass_context
def serve(ctx: click.Context, socket_path: Optional[Path], step_modules: List[str], builtin: bool,
          workers: Optional[int],
          journal_path: Optional[Path], metrics_addr: Optional[str], log_format: str, log_level: str,
          drain_timeout: float, allow_root: bool, backend: str, ray_address: Optional[str], sandbox: str,
          sandbox_writes: List[str]) -> None:
    """Run the supervisor daemon in the foreground (as systemd and supervisord expect).

    \b
    Examples:
      governor serve
      governor serve --socket /tmp/g/governor.sock --journal /tmp/g/journal.sqlite3 --workers 8
      governor serve --steps myapp.steps --metrics-addr 127.0.0.1:9464 --log-format json
      governor serve --backend ray --ray-address 10.0.0.5:6379 --workers 64

    Stop it with SIGTERM or Ctrl-C: it stops accepting, lets running steps finish (up to
    --drain-timeout), keeps queued ones in the journal for the next start, and exits 0.
    """
    from governor.daemon import Daemon, DaemonConfig, DaemonError, load_registry
    from governor.logs import configure_logging

    configure_logging(log_format, getattr(logging, log_level.upper()))
    socket_path = socket_path or ctx.obj.socket_path
    if ray_address is not None and backend != "ray":
        raise click.BadParameter("needs --backend ray", param_hint="--ray-address")
    if sandbox == "require" and backend == "ray":
        raise click.BadParameter("the Ray lane runs no sandbox; use --backend loky", param_hint="--sandbox")
    settings: Dict[str, Any] = {"workers": workers, "allow_root": allow_root, "drain_timeout_s": drain_timeout,
                                "backend": backend, "ray_address": ray_address, "sandbox": sandbox,
                                "sandbox_writes": sandbox_writes}
    if socket_path is not None:
        settings["socket_path"] = socket_path
    if journal_path is not None:
        settings["journal_path"] = journal_path
    if metrics_addr is not None:
        host, _, port = metrics_addr.rpartition(":")
        if not host or not port.isdigit():
            raise click.BadParameter("expected HOST:PORT", param_hint="--metrics-addr")
        settings["metrics_addr"] = (host, int(port))
    try:
        Daemon(load_registry(step_modules, builtin=builtin), DaemonConfig(**settings)).serve()
    except (DaemonError, errors.RegistrationError, errors.BackendUnavailable, errors.SandboxUnavailable,
            ImportError) as error:
        raise click.ClickException(str(error)) from None


@main.command()
@click.argument("step", required=False)
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE",
              help="A parameter; VALUE is read as JSON when it parses (5, true, \"x\"), else as text. Repeatable.")
@click.option("--json", "json_params", default=None, metavar="OBJECT", help="All parameters as one JSON object.")
@click.option("--wait/--no-wait", default=False, show_default=True,
              help="Wait for the result and print it as JSON (else print the task id).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="With --wait: give up waiting after S seconds (exit 10; the task goes on).")
@click.option("--limit-timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="This task's own timeout in seconds (kills it when it runs longer).")
@click.option("--key", default=None, help="Supersede key: cancels the unfinished steps of the previous "
                                          "submission with the same key.")
@click.option("--batch", "batch_file", type=click.File("r"), default=None,
              help="Submit every line of a JSONL file ({\"step\": ..., \"params\": {...}}) and wait, "
                   "with a progress bar.")
@pass_connection
def submit(connection: _Connected, step: Optional[str], params: List[str], json_params: Optional[str], wait: bool,
           timeout: Optional[float], limit_timeout: Optional[float], key: Optional[str], batch_file) -> None:
    """Submit a step to the daemon.

    \b
    Examples:
      governor submit git.status -p repo=$PWD
      governor submit chat.send_message -p chat_id=1 -p text=hello --wait
      governor submit git.log --json '{"repo": "/src/app", "limit": 5}' --wait --timeout 10
      governor submit --batch calls.jsonl

    \b
    Exit codes with --wait: 0 done, 1 failed, 3 no daemon, 4 timed out, 5 over memory,
    6 cancelled, 7 crashed, 8 bad request (unknown step, bad parameters), 9 queue full,
    10 still running after --timeout, 11 skipped, 12 interrupted.
    """
    if batch_file is not None:
        _submit_batch(connection, batch_file)
        return
    if step is None:
        raise click.UsageError("name a STEP, or give --batch FILE")
    call_params = _parameters(params, json_params)
    from governor.limits import Limits
    from governor.task import Call

    limits = Limits(timeout_s=limit_timeout) if limit_timeout else None
    # submit_call returns once the daemon journaled the task: the id is known.
    task_id = connection.ask(lambda client: client.submit_call(
        Call(step, kwargs=call_params, limits=limits), key=key).task_id)
    if not wait:
        click.echo(task_id)
        return
    record = connection.ask(lambda client: client.wait(task_id, timeout=timeout))
    click.echo(json.dumps(record, indent=2, default=str))
    state = record["state"] if record["final"] else "still_running"
    if state != "done":
        sys.exit(EXIT_CODES.get(state, EXIT_CODES["failed"]))


def _parameters(params: List[str], json_params: Optional[str]) -> Dict[str, Any]:
    parsed: Dict[str, Any] = {}
    if json_params is not None:
        try:
            parsed = json.loads(json_params)
        except ValueError as error:
            raise click.BadParameter(f"not JSON: {error}", param_hint="--json") from None
        if not isinstance(parsed, dict):
            raise click.BadParameter("must be a JSON object", param_hint="--json")
    for item in params:
        name, equals, value = item.partition("=")
        if not equals or not name:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="-p")
        parsed[name] = parse_value(value)
    return parsed


def _submit_batch(connection: _Connected, batch_file) -> None:
    from governor.task import Call

    calls = []
    for number, line in enumerate(batch_file, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            calls.append(Call(item["step"], kwargs=item.get("params", {})))
        except (ValueError, KeyError, TypeError) as error:
            raise click.BadParameter(f"line {number}: {error}", param_hint="--batch") from None
    futures = connection.ask(lambda client: [client.submit_call(call) for call in calls])
    failures = 0
    with click.progressbar(length=len(futures), label="waiting", file=sys.stderr) as bar:
        import concurrent.futures

        for future in concurrent.futures.as_completed(futures):
            failures += future.cancelled() or future.exception() is not None
            bar.update(1)
    click.echo(json.dumps({"submitted": len(futures), "failed": failures,
                           "task_ids": [future.task_id for future in futures]}))
    if failures:
        sys.exit(EXIT_CODES["failed"])


@main.command()
@click.argument("task_id", type=click.IntRange(min=1), required=False)
@pass_connection
def status(connection: _Connected, task_id: Optional[int]) -> None:
    """Show one task's journal record, or the recent tasks.

    \b
    Examples:
      governor status          the 50 most recent tasks, newest first
      governor status 42       task 42 in full, with its result or error
    """
    found = connection.ask(lambda client: client.status(task_id))
    if task_id is not None:
        click.echo(json.dumps(found, indent=2, default=str))
        return
    _table(["id", "step", "lane", "state", "attempts", "interrupted"],
           [[t["task_id"], t["step"], t["lane"], t["state"], t["attempts"], "yes" if t["interrupted"] else ""]
            for t in found])


@main.command()
@click.argument("task_ids", type=click.IntRange(min=1), nargs=-1, required=True)
@pass_connection
def cancel(connection: _Connected, task_ids: List[int]) -> None:
    """Cancel tasks: queued ones never run, running ones are stopped.

    \b
    Example:
      governor cancel 41 42
    """
    outcome = connection.ask(lambda client: client.cancel(*task_ids))
    click.echo(json.dumps(outcome))
    if outcome["unknown"]:
        sys.exit(EXIT_CODES["bad_request"])


@main.command()
@pass_connection
def steps(connection: _Connected) -> None:
    """List the daemon's steps: lane, why that lane, and limits.

    \b
    Example:
      governor steps
    """
    described = connection.ask(lambda client: client.steps())
    _table(["step", "lane", "timeout_s", "max_memory_mb", "why"],
           [[s["name"], s["lane"], s["limits"]["timeout_s"], s["limits"]["max_memory_mb"], s["reason"]]
            for s in described])


@main.command()
@pass_connection
def workers(connection: _Connected) -> None:
    """List the daemon's worker processes: pid, lane, current step, RSS, time on the step.

    \b
    Example:
      governor workers
    """
    described = connection.ask(lambda client: client.workers())
    _table(["pid", "lane", "state", "step", "running_s", "rss_mib"],
           [[w["pid"], w["lane"], w["state"], w["step"] or "",
             "" if w["running_s"] is None else f"{w['running_s']:.3f}",
             "" if w["rss_bytes"] is None else f"{w['rss_bytes'] / 2 ** 20:.1f}"] for w in described])


@main.command()
@click.option("--prometheus", is_flag=True, help="The Prometheus text format instead of JSON.")
@pass_connection
def metrics(connection: _Connected, prometheus: bool) -> None:
    """Print the daemon's metrics.

    \b
    Examples:
      governor metrics
      governor metrics --prometheus
    """
    found = connection.ask(lambda client: client.metrics("prometheus" if prometheus else "json"))
    click.echo(found if prometheus else json.dumps(found, indent=2))


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
              add_help_option=False)
@click.pass_context
def bench(ctx: click.Context) -> None:
    """Run the benchmark harness: the same as `python -m governor.bench` (see `governor bench --help`).

    \b
    Examples:
      governor bench --quick
      governor bench --scenario overhead --json out.json --report out.md --plot out.png
    """
    from governor.bench.__main__ import main as bench_main

    bench_main.main(args=ctx.args, prog_name="governor bench")


def _table(headers: List[str], rows: List[List[Any]]) -> None:
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max([len(header)] + [len(row[i]) for row in cells]) for i, header in enumerate(headers)]
    for row in [headers] + cells:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
