"""The ``governor`` command: a thin click layer over the Supervisor, the daemon and its client.

Every command parses its options, calls one domain object and prints: text for people by
default, ``--json`` for programs (times as local ISO 8601 either way). Data flow of a
client command::

    argv ──click──> options (--socket recorded on the Connection in ctx.obj, cli_options.py)
         ──> Connection.client(): the light Client (no loky, psutil or supervisor imported)
         ──> one request; a Governor error ──> GovernorClickError (its row of EXIT_STATUSES)
         ──> print; exit with the status of how the task ended (done 0, failed 1, ...)

Only ``serve``, ``run`` and ``bench`` import the engine, inside the command.

Waiting commands (``submit --wait``, ``submit --batch``, ``wait``) print the task ids on
stderr before they wait; on Ctrl-C they say the tasks go on (or, with
``--cancel-on-interrupt``, cancel them) and exit 130.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, TextIO, Tuple

import attrs
import click

from governor import __version__, errors
from governor.cli.options import Connection, cancel_on_interrupt_option, json_option, parse_value, socket_option
from governor.service.journal import STATES
from governor.service.live import http_config_from_options, http_options
from governor.protocol import DEFAULT_STATUS_LIMIT, MAX_STATUS_LIMIT


@attrs.frozen
class ExitStatus:
    """One row of the exit-status table every command shares.

    Attributes:
        name: the outcome (a task state where it is one).
        code: the process exit status.
        meaning: what it means, as ``governor --help`` prints it.
    """

    name: str
    code: int
    meaning: str


#: One table for every command: a task's end, the daemon's refusal, a start-up failure.
EXIT_STATUSES = (
    ExitStatus("done", 0, "success; with a wait, every task ended done"),
    ExitStatus("failed", 1, "a step raised (or an unexpected error)"),
    ExitStatus("usage", 2, "bad usage: an unknown option, a malformed argument"),
    ExitStatus("daemon_unavailable", 3, "no daemon answers on the socket"),
    ExitStatus("timed_out", 4, "a task ran past its timeout and was killed"),
    ExitStatus("over_memory", 5, "a task went over its memory limit and was killed"),
    ExitStatus("cancelled", 6, "a task was cancelled (or superseded)"),
    ExitStatus("crashed", 7, "a task's worker died"),
    ExitStatus("bad_request", 8, "refused: unknown step, bad parameters, a bad batch line"),
    ExitStatus("queue_full", 9, "refused: the lane's queue is full"),
    ExitStatus("still_running", 10, "--timeout passed first; the task goes on"),
    ExitStatus("skipped", 11, "a task was skipped (an earlier workflow step failed)"),
    ExitStatus("interrupted", 12, "the daemon died while a critical task ran"),
    ExitStatus("unknown_task", 13, "no such task (status, cancel, wait)"),
    ExitStatus("cannot_start", 14, "serve: it cannot start (socket directory, metrics address, steps)"),
    ExitStatus("already_running", 15, "serve: a daemon already has that socket or journal"),
    ExitStatus("aborted", 130, "Ctrl-C while waiting; the tasks go on unless --cancel-on-interrupt"),
)

#: Exit status by name (see :data:`EXIT_STATUSES`).
EXIT_CODES = {status.name: status.code for status in EXIT_STATUSES}

_EXIT_FOR_ERROR = [
    (errors.QueueFull, "queue_full"),
    (errors.UnknownStep, "bad_request"),
    (errors.InvalidParameters, "bad_request"),
    (errors.UnknownTask, "unknown_task"),
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


def _ask(connection: Connection, request):
    """``request(client)``, with Governor's errors turned into exit-coded click errors."""
    try:
        return request(connection.client())
    except errors.GovernorError as error:
        raise _client_error(error) from None


pass_connection = click.make_pass_decorator(Connection, ensure=True)

@contextlib.contextmanager
def _interruptible(connection: Connection, task_ids: Sequence[int], cancel_on_interrupt: bool) -> Iterator[None]:
    """Wait inside this block; Ctrl-C says what happens to ``task_ids`` and exits 130.

    The ids are printed on stderr on entry, so they are known even if the wait is cut short.
    """
    ids = id_ranges(task_ids)
    try:
        click.echo(f"waiting for task{'s' if len(task_ids) > 1 else ''} {ids} "
                   f"(Ctrl-C {'cancels' if cancel_on_interrupt else 'leaves'} {'them' if len(task_ids) > 1 else 'it'}"
                   f"{'' if cancel_on_interrupt else ' running'})", err=True)
        yield
    except KeyboardInterrupt:
        if cancel_on_interrupt:
            outcome = _ask(connection, lambda client: client.cancel(*task_ids))
            click.echo(f"\ninterrupted: cancelled {id_ranges(outcome['cancelled']) or 'none'}"
                       + (f"; already finished: {id_ranges(outcome['finished'])}" if outcome["finished"] else ""),
                       err=True)
        else:
            click.echo(f"\ninterrupted: task{'s' if len(task_ids) > 1 else ''} {ids} "
                       f"{'go' if len(task_ids) > 1 else 'goes'} on; see `governor status ID`, stop with "
                       "`governor cancel ID`", err=True)
        raise click.exceptions.Exit(EXIT_CODES["aborted"]) from None


def id_ranges(task_ids: Sequence[int]) -> str:
    """``3-7 9``: task ids as people read a long list (a batch's ids are consecutive)."""
    runs: List[List[int]] = []
    for task_id in task_ids:
        if runs and task_id == runs[-1][1] + 1:
            runs[-1][1] = task_id
        else:
            runs.append([task_id, task_id])
    return " ".join(str(first) if first == last else f"{first}-{last}" for first, last in runs)


def _exit_status(records: Sequence[Dict[str, Any]]) -> int:
    """The exit status of the first task (in the order given) that did not end done; else 0."""
    for record in records:
        state = record["state"] if record.get("final", True) else "still_running"
        if state != "done":
            return EXIT_CODES.get(state, EXIT_CODES["failed"])
    return EXIT_CODES["done"]


# ----------------------------------------------------------------------------- output


#: The fields of a task record that are times (epoch seconds on the wire).
TIME_FIELDS = ("submitted_at", "started_at", "ended_at")


def local_time(epoch: Optional[float], timespec: str = "milliseconds") -> Optional[str]:
    """``epoch`` (seconds) as local ISO 8601 with its UTC offset, e.g. ``2026-12-02T13:05:11.042+01:00``."""
    return None if epoch is None else datetime.fromtimestamp(epoch).astimezone().isoformat(timespec=timespec)


def record_json(record: Dict[str, Any]) -> Dict[str, Any]:
    """A task record as ``--json`` prints it: the wire's record, times as local ISO 8601."""
    return {**record, **{field: local_time(record[field]) for field in TIME_FIELDS if field in record}}


def error_lines(wire: Dict[str, Any]) -> List[str]:
    """A record's error as people read it: ``Type: message``, then the step's traceback, if any.

    A step's own exception is named by its type (``StepFailed`` only says it came from a
    worker); a limit Governor enforced by Governor's (``StepTimeout: ...``); a workflow's
    failure is followed by its failed step's error, indented.
    """
    from governor.protocol import RemoteError, error_from_wire

    error = error_from_wire(wire)
    if isinstance(error, errors.StepFailed):
        lines = [f"{error.exc_type.rsplit('.', 1)[-1]}: {error.exc_message}"]
        if error.remote_traceback:
            lines += ["", *error.remote_traceback.rstrip("\n").splitlines()]
        return lines
    if isinstance(error, errors.WorkflowFailed) and isinstance(wire.get("fields", {}).get("error"), dict):
        return [f"WorkflowFailed: {error}"] + ["  " + line for line in error_lines(wire["fields"]["error"])]
    if isinstance(error, RemoteError):
        return [str(error)]
    return [f"{type(error).__name__}: {error}"]


def _json_text(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 100 else json.dumps(value, indent=2, default=str)


def format_record(record: Dict[str, Any]) -> str:
    """One task in full, for people: what ran, when, and its result or error with the traceback."""
    lines = [f"task {record['task_id']}: {record['step']} ({record['lane']} lane): {record['state']}"
             + (" (interrupted)" if record.get("interrupted") else "")
             + ("" if record.get("final", True) else " (still running)")]
    rows: List[Tuple[str, str]] = []
    for field, label in zip(TIME_FIELDS, ("submitted", "started", "ended")):
        if record.get(field) is not None:
            rows.append((label, local_time(record[field])))
    if record.get("started_at") is not None and record.get("ended_at") is not None:
        rows.append(("ran", f"{max(0.0, record['ended_at'] - record['started_at']):.3f} s"))
    rows.append(("attempts", str(record.get("attempts", 0))))
    if record.get("key") is not None:
        rows.append(("key", record["key"]))
    if record.get("limits"):
        rows.append(("limits", ", ".join(f"{k}={v}" for k, v in record["limits"].items() if v is not None)))
    for field in ("params", "calls"):
        if field in record:
            rows.append((field, _json_text(record[field])))
    if record["state"] == "done" and "result" in record:
        rows.append(("result", _json_text(record["result"])))
    for label, value in rows:
        first, *rest = value.splitlines() or [""]
        lines.append(f"  {label:<10} {first}")
        lines += [f"  {'':<10} {line}" for line in rest]
    if record.get("error") is not None:
        headline, *more = error_lines(record["error"])
        lines.append(f"  {'error':<10} {headline}")
        lines += [f"    {line}" if line else "" for line in more]
    return "\n".join(lines)


def _error_headline(record: Dict[str, Any], width: int = 60) -> str:
    if record.get("error") is None:
        return ""
    text = error_lines(record["error"])[0]
    return text if len(text) <= width else text[:width - 1] + "…"


def _table(headers: List[str], rows: List[List[Any]]) -> None:
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max([len(header)] + [len(row[i]) for row in cells]) for i, header in enumerate(headers)]
    for row in [headers] + cells:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


def _echo_record(record: Dict[str, Any], as_json: bool) -> None:
    """One task in full: its record with ``--json``, else as text."""
    if as_json:
        _echo_json(record_json(record))
    else:
        click.echo(format_record(record))


# ----------------------------------------------------------------------------- the group


class _Commands(click.Group):
    """The command group; ``run`` (which needs the engine) is imported only when it is named.

    A client command must start fast: importing ``governor.cli.run`` would load the
    supervisor, loky and psutil for nothing.
    """

    #: Commands defined in heavy modules: name -> (module, attribute).
    LAZY = {"run": ("governor.cli.run", "run")}

    def list_commands(self, ctx: click.Context) -> List[str]:
        return sorted([*super().list_commands(ctx), *self.LAZY])

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        if name in self.LAZY:
            import importlib

            module, attribute = self.LAZY[name]
            return getattr(importlib.import_module(module), attribute)
        return super().get_command(ctx, name)


def _exit_statuses_epilog() -> str:
    return "\n".join(["\b", "Exit status (every command):"]
                     + [f"  {status.code:>3}  {status.name:<19} {status.meaning}" for status in EXIT_STATUSES])


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]}, epilog=_exit_statuses_epilog())
@click.version_option(version=__version__, prog_name="governor")
@socket_option
@click.pass_context
def main(ctx: click.Context) -> None:
    """Governor: run many small steps fast and safely in worker processes.

    \b
    Examples:
      governor run --view .                  the view switch on this repository
      governor run git.status:repo=. git.log:repo=.,limit=5
      governor serve                         the supervisor daemon, in the foreground
      governor submit git.status -p repo=. --wait
      governor status --state failed         the recent failures
    """
    ctx.call_on_close(ctx.ensure_object(Connection).close)


@main.command()
@socket_option
@click.option("--interval", type=click.FloatRange(min=0.1), default=0.25, show_default=True,
              help="Seconds between refreshes.")
@pass_connection
def top(connection: Connection, interval: float) -> None:
    """A live terminal view of the daemon (needs the live extra): lanes, workers, kills, latencies.

    \b
    Keys: up/down move the selection, c cancels the selected task (asks first), q quits.
    It keeps running while the daemon restarts, and says "reconnecting" meanwhile.
    """
    try:
        from governor.cli.top import run_top  # Textual loads only here: other commands stay fast
    except ImportError as missing:
        raise click.ClickException(f"governor top needs the live extra ({missing}): "
                                   "pip install 'governor[live]'") from None
    run_top(connection.resolved_socket(), interval)


@main.command()
@socket_option
@click.option("--steps", "step_modules", multiple=True, metavar="MODULE[:ATTR]",
              help="Also load the steps of MODULE (its `registry`, or ATTR: a StepRegistry or a "
                   "function taking the daemon's registry). Repeatable. MODULE is looked for in --app-dir "
                   "first, as `python -m` does. Packages can also ship steps through the `governor.steps` "
                   "entry-point group.")
@click.option("--app-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=".",
              show_default=True, help="Where --steps modules are looked for first (it is put first on the "
                                      "daemon's and its workers' module path).")
@click.option("--builtin/--no-builtin", default=True, show_default=True,
              help="Serve the built-in git and chat steps.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Pool workers [default: 2 x CPUs, 4..16].")
@click.option("--journal", "journal_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The SQLite journal [default: $XDG_STATE_HOME/governor/journal.sqlite3].")
@click.option("--metrics-addr", default=None, metavar="[HOST:]PORT",
              help="Serve Prometheus metrics over HTTP here: PORT (on 127.0.0.1), HOST:PORT or [IPV6]:PORT. "
                   "Off by default.")
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
@http_options
@click.option("--sandbox", type=click.Choice(["auto", "require", "off"]), default="auto", show_default=True,
              help="Hold pool workers to read-only with Landlock: what the kernel offers (auto), or refuse to "
                   "start without it (require). Not applied on --backend ray.")
@click.option("--sandbox-write", "sandbox_writes", multiple=True, type=click.Path(path_type=str), metavar="PATH",
              help="A path every pool worker may also write beneath. Repeatable.")
@click.pass_context
def serve(ctx: click.Context, step_modules: List[str], app_dir: Path, builtin: bool, workers: Optional[int],
          journal_path: Optional[Path], metrics_addr: Optional[str], log_format: str, log_level: str,
          drain_timeout: float, allow_root: bool, backend: str, ray_address: Optional[str], sandbox: str,
          sandbox_writes: List[str], **http_settings: Any) -> None:
    """Run the supervisor daemon in the foreground (as systemd and supervisord expect).

    \b
    Examples:
      governor serve
      governor serve --socket /tmp/g/governor.sock --journal /tmp/g/journal.sqlite3 --workers 8
      governor serve --steps mysteps --metrics-addr 9464 --log-format json
      governor serve --steps myapp.steps:register --app-dir ~/src/myapp
      governor serve --backend ray --ray-address 10.0.0.5:6379 --workers 64
      governor serve --http-addr 127.0.0.1:8765     a live status page (prints its URL)

    Before any worker starts it checks the socket's directory, that no daemon has the
    socket or the journal, the metrics address, and that the --steps modules import; a
    failure is one line and exit status 14 (15: a daemon is already running there).

    Stop it with SIGTERM or Ctrl-C: it stops accepting, lets running steps finish (up to
    --drain-timeout), keeps queued ones in the journal for the next start, and exits 0.
    """
    from governor.logs import configure_logging
    from governor.service.config import DaemonConfig, load_registry, parse_metrics_addr
    from governor.service.daemon import Daemon
    from governor.service.preflight import preflight

    configure_logging(log_format, getattr(logging, log_level.upper()))
    if ray_address is not None and backend != "ray":
        raise click.BadParameter("needs --backend ray", param_hint="--ray-address")
    if sandbox == "require" and backend == "ray":
        raise click.BadParameter("the Ray lane runs no sandbox; use --backend loky", param_hint="--sandbox")
    settings: Dict[str, Any] = {"workers": workers, "allow_root": allow_root, "drain_timeout_s": drain_timeout,
                                "backend": backend, "ray_address": ray_address, "sandbox": sandbox,
                                "sandbox_writes": sandbox_writes}
    socket_path = ctx.ensure_object(Connection).resolved_socket()
    if socket_path is not None:
        settings["socket_path"] = socket_path
    if journal_path is not None:
        settings["journal_path"] = journal_path
    if metrics_addr is not None:
        try:
            settings["metrics_addr"] = parse_metrics_addr(metrics_addr)
        except errors.MetricsAddressInvalid as error:
            raise click.BadParameter(str(error), param_hint="--metrics-addr") from None
    settings["http"] = http_config_from_options(**http_settings)
    try:
        config = DaemonConfig(**settings)
        preflight(config)
        _import_step_modules(step_modules, app_dir)
        registry = load_registry(step_modules, builtin=builtin)
        Daemon(registry, config).serve()
    except (errors.DaemonAlreadyRunning, errors.JournalLocked) as error:
        raise GovernorClickError(str(error), "already_running") from None
    except (errors.DaemonError, errors.RegistrationError, errors.BackendUnavailable,
            errors.SandboxUnavailable) as error:
        raise GovernorClickError(str(error), "cannot_start") from None


def _import_step_modules(step_modules: Sequence[str], app_dir: Path) -> None:
    """Import each ``--steps`` module from ``app_dir`` first, showing a failure as the module's own.

    ``app_dir`` goes first on ``sys.path``, as ``python -m`` puts the current directory (the
    ``governor`` script's own directory is what Python would look in otherwise). Local
    workers get the daemon's ``sys.path``; a Ray node's workers do not, so it also goes
    first on ``PYTHONPATH``, which the node the daemon starts inherits.

    Raises:
        GovernorClickError: (cannot_start) no such module, naming where it was looked for; or
            the module raised while importing, with its traceback from its own code on.
    """
    import importlib
    import os
    import sys

    directory = str(app_dir.resolve())
    sys.path.insert(0, directory)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [directory, os.environ.get("PYTHONPATH")]))
    for name in step_modules:
        module_name = name.partition(":")[0]
        try:
            importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name is not None and (module_name + ".").startswith(error.name + "."):  # it, or its package
                raise GovernorClickError(f"no module named {error.name!r} in {directory} or on the module path; "
                                         "run `governor serve` from the directory that holds it, or pass "
                                         "--app-dir DIR", "cannot_start") from None
            raise GovernorClickError(_module_error(module_name, error), "cannot_start") from None
        except Exception as error:  # the module's own code raised: show it as Python would
            raise GovernorClickError(_module_error(module_name, error), "cannot_start") from None


def _module_error(module_name: str, error: BaseException) -> str:
    """The import failure of a steps module, its traceback starting at the module's own frames."""
    import traceback

    import importlib

    # Governor's and the import machinery's frames come first: the user's module is what to read.
    machinery = (str(Path(__file__).parent), str(Path(importlib.__file__).parent), "<frozen importlib")
    frames = error.__traceback__
    while frames is not None and frames.tb_frame.f_code.co_filename.startswith(machinery):
        frames = frames.tb_next
    shown = "".join(traceback.format_exception(type(error), error, frames)).rstrip()
    return f"the steps module {module_name!r} failed to import:\n{shown}"


@main.command()
@click.argument("step", required=False)
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE",
              help="A parameter; VALUE is read as JSON when it parses (5, true, \"x\"), else as text. Repeatable.")
@click.option("--params", "params_json", default=None, metavar="OBJECT", help="All parameters as one JSON object.")
@click.option("--wait/--no-wait", default=False, show_default=True,
              help="Wait for the task and print its record (else print its id).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="With --wait: give up waiting after S seconds (exit 10; the task goes on).")
@click.option("--limit-timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="This task's own timeout in seconds (kills it when it runs longer).")
@click.option("--key", default=None, help="Supersede key: cancels the unfinished steps of the previous "
                                          "submission with the same key.")
@click.option("--batch", "batch_file", type=click.File("r"), default=None,
              help="Submit every line of a JSONL file ({\"step\": ..., \"params\": {...}}) as one batch, all "
                   "or nothing, and wait with a progress bar. Every line is checked first.")
@cancel_on_interrupt_option
@json_option
@socket_option
@pass_connection
def submit(connection: Connection, step: Optional[str], params: List[str], params_json: Optional[str], wait: bool,
           timeout: Optional[float], limit_timeout: Optional[float], key: Optional[str], batch_file: Optional[TextIO],
           cancel_on_interrupt: bool, as_json: bool) -> None:
    """Submit a step (or a batch of steps) to the daemon.

    \b
    Examples:
      governor submit git.status -p repo=.
      governor submit chat.send_message -p chat_id=1 -p text=hello --wait
      governor submit git.log --params '{"repo": "/src/app", "limit": 5}' --wait --timeout 10
      governor submit --batch calls.jsonl

    Relative paths in parameters are resolved against this directory, not the daemon's.
    Exit status: see `governor --help` (0 done, 1 failed, 4 timed out, ...).
    """
    if batch_file is not None:
        if step is not None or params or params_json is not None or limit_timeout is not None:
            raise click.UsageError("--batch takes its steps and parameters from the file only")
        _submit_batch(connection, batch_file, key, cancel_on_interrupt, as_json)
        return
    if step is None:
        raise click.UsageError("name a STEP, or give --batch FILE")
    call_params = _parameters(params, params_json)
    from governor.limits import Limits
    from governor.task import Call

    limits = Limits(timeout_s=limit_timeout) if limit_timeout else None
    # submit_call returns once the daemon journaled the task: the id is known.
    task_id = _ask(connection, lambda client: client.submit_call(
        Call(step, kwargs=call_params, limits=limits), key=key).task_id)
    if not wait:
        click.echo(task_id)
        return
    with _interruptible(connection, [task_id], cancel_on_interrupt):
        record = _ask(connection, lambda client: client.wait(task_id, timeout=timeout))
    _echo_record(record, as_json)
    raise click.exceptions.Exit(_exit_status([record]))


def _parameters(params: List[str], params_json: Optional[str]) -> Dict[str, Any]:
    parsed: Dict[str, Any] = {}
    if params_json is not None:
        try:
            parsed = json.loads(params_json)
        except ValueError as error:
            raise click.BadParameter(f"not JSON: {error}", param_hint="--params") from None
        if not isinstance(parsed, dict):
            raise click.BadParameter("must be a JSON object", param_hint="--params")
    for item in params:
        name, equals, value = item.partition("=")
        if not equals or not name:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="-p")
        parsed[name] = parse_value(value)
    return parsed


@main.command()
@click.argument("task_ids", type=click.IntRange(min=1), nargs=-1, required=True)
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Give up waiting after S seconds in all (exit 10; the tasks go on).")
@cancel_on_interrupt_option
@json_option
@socket_option
@pass_connection
def wait(connection: Connection, task_ids: Tuple[int, ...], timeout: Optional[float], cancel_on_interrupt: bool,
         as_json: bool) -> None:
    """Wait for tasks to end and print their records.

    \b
    Examples:
      governor wait 42
      governor wait 41 42 --timeout 30 --json

    Exit status: that of the first task (in the order given) that did not end done.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    records = []
    with _interruptible(connection, task_ids, cancel_on_interrupt):
        for task_id in task_ids:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            records.append(_ask(connection, lambda client: client.wait(task_id, timeout=left)))
    if as_json:  # a list, however many ids: a script need not count them
        _echo_json([record_json(record) for record in records])
    else:
        click.echo("\n\n".join(format_record(record) for record in records))
    raise click.exceptions.Exit(_exit_status(records))


@main.command()
@click.argument("task_id", type=click.IntRange(min=1), required=False)
@click.option("--state", "states", multiple=True, type=click.Choice(STATES),
              help="Only tasks in this state. Repeatable.")
@click.option("--step", default=None, metavar="NAME", help="Only tasks of this step.")
@click.option("-n", "--limit", type=click.IntRange(min=1, max=MAX_STATUS_LIMIT), default=DEFAULT_STATUS_LIMIT,
              show_default=True,
              help="How many tasks, newest first.")
@json_option
@socket_option
@pass_connection
def status(connection: Connection, task_id: Optional[int], states: Tuple[str, ...], step: Optional[str], limit: int,
           as_json: bool) -> None:
    """Show one task in full (result, or error with its traceback), or the recent tasks.

    \b
    Examples:
      governor status                        the 50 most recent tasks, newest first
      governor status 42                     task 42 in full
      governor status --state failed --state timed_out -n 10
      governor status --step git.status --json
    """
    if task_id is not None:
        if states or step is not None:
            raise click.UsageError("--state and --step filter the listing; not with a TASK_ID")
        record = _ask(connection, lambda client: client.status(task_id))
        _echo_record(record, as_json)
        return
    found = _ask(connection, lambda client: client.status(states=states, step=step, limit=limit))
    if as_json:
        _echo_json([record_json(record) for record in found])
        return
    _table(["id", "step", "lane", "state", "submitted", "ran_s", "attempts", "error"],
           [[t["task_id"], t["step"], t["lane"], t["state"] + (" (interrupted)" if t["interrupted"] else ""),
             local_time(t["submitted_at"], "seconds"),
             "" if t["started_at"] is None or t["ended_at"] is None else f"{t['ended_at'] - t['started_at']:.3f}",
             t["attempts"], _error_headline(t)] for t in found])


@main.command()
@click.argument("task_ids", type=click.IntRange(min=1), nargs=-1, required=True)
@json_option
@socket_option
@pass_connection
def cancel(connection: Connection, task_ids: Tuple[int, ...], as_json: bool) -> None:
    """Cancel tasks: queued ones never run, running ones are stopped.

    \b
    Examples:
      governor cancel 41 42
      governor cancel 41 --json

    Exit status: 13 when any id is unknown (the others are still cancelled).
    """
    outcome = _ask(connection, lambda client: client.cancel(*task_ids))
    if as_json:
        _echo_json(outcome)
    else:
        for key, label in (("cancelled", "cancelled"), ("finished", "already finished"),
                           ("unknown", "no such task")):
            if outcome[key]:
                click.echo(f"{label}: {' '.join(map(str, outcome[key]))}")
    if outcome["unknown"]:
        raise click.exceptions.Exit(EXIT_CODES["unknown_task"])


@main.command()
@json_option
@socket_option
@pass_connection
def steps(connection: Connection, as_json: bool) -> None:
    """List the daemon's steps: lane, why that lane, and limits.

    \b
    Examples:
      governor steps
      governor steps --json
    """
    described = _ask(connection, lambda client: client.steps())
    if as_json:
        _echo_json(described)
        return
    _table(["step", "lane", "timeout_s", "max_memory_mb", "why"],
           [[s["name"], s["lane"], s["limits"]["timeout_s"] or "", s["limits"]["max_memory_mb"] or "", s["reason"]]
            for s in described])


@main.command()
@json_option
@socket_option
@pass_connection
def workers(connection: Connection, as_json: bool) -> None:
    """List the daemon's worker processes: pid, lane, current step, RSS, time on the step.

    \b
    Examples:
      governor workers
      governor workers --json
    """
    described = _ask(connection, lambda client: client.workers())
    if as_json:
        _echo_json(described)
        return
    _table(["pid", "lane", "state", "step", "running_s", "rss_mib"],
           [[w["pid"], w["lane"], w["state"], w["step"] or "",
             "" if w["running_s"] is None else f"{w['running_s']:.3f}",
             "" if w["rss_bytes"] is None else f"{w['rss_bytes'] / 2 ** 20:.1f}"] for w in described])


@main.command()
@click.option("--prometheus", is_flag=True, help="The Prometheus text format instead of JSON.")
@socket_option
@pass_connection
def metrics(connection: Connection, prometheus: bool) -> None:
    """Print the daemon's metrics (a JSON snapshot, or the Prometheus text).

    \b
    Examples:
      governor metrics
      governor metrics --prometheus
    """
    found = _ask(connection, lambda client: client.metrics("prometheus" if prometheus else "json"))
    click.echo(found if prometheus else json.dumps(found, indent=2))


# ----------------------------------------------------------------------------- batches


#: At most this many bad lines are listed when a batch file is refused (then a count).
MAX_BATCH_PROBLEMS_SHOWN = 20


@attrs.frozen
class BatchLine:
    """One step of a batch file.

    Attributes:
        number: its line number in the file (1-based), for messages.
        step: the step's name.
        params: its parameters.
    """

    number: int
    step: str
    params: Dict[str, Any]


def read_batch(lines: Iterator[str], described_steps: Sequence[Dict[str, Any]]) -> List[BatchLine]:
    """Parse and check every line of a batch file against the daemon's steps, submitting nothing.

    A line is a JSON object ``{"step": NAME, "params": {...}}`` (``params`` may be left out);
    blank lines are skipped. Each step must be one of ``described_steps`` (as ``Client.steps``
    gives them) and its parameters must fit the step's signature, as the daemon will check.

    Raises:
        BatchRefused: every line at fault (up to :data:`MAX_BATCH_PROBLEMS_SHOWN`), each
            named by its line number; or no line at all.
    """
    from governor.protocol import MAX_BATCH_CALLS

    signatures = {step["name"]: step["signature"] for step in described_steps}
    parsed: List[BatchLine] = []
    problems: List[str] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            parsed.append(_batch_line(number, line, signatures))
        except ValueError as problem:
            problems.append(f"line {number}: {problem}")
    if not parsed and not problems:
        problems.append("the file has no steps")
    if len(parsed) > MAX_BATCH_CALLS:
        problems.append(f"{len(parsed)} steps; a batch holds at most {MAX_BATCH_CALLS:,} (split the file)")
    if problems:
        shown = problems[:MAX_BATCH_PROBLEMS_SHOWN]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more")
        raise BatchRefused(shown)
    return parsed


class BatchRefused(GovernorClickError):
    """A batch file with lines at fault: nothing was submitted (exit status 8)."""

    def __init__(self, problems: List[str]):
        super().__init__("nothing was submitted:\n  " + "\n  ".join(problems), "bad_request")
        self.problems = problems


def _batch_line(number: int, line: str, signatures: Dict[str, str]) -> BatchLine:
    try:
        item = json.loads(line)
    except ValueError as error:
        raise ValueError(f"not JSON ({error})") from None
    if not isinstance(item, dict) or not isinstance(item.get("step"), str):
        raise ValueError('expected an object {"step": NAME, "params": {...}}')
    extra = sorted(set(item) - {"step", "params"})
    if extra:
        raise ValueError(f"unknown field{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))} "
                         "(a line has \"step\" and \"params\")")
    step, params = item["step"], item.get("params", {})
    if not isinstance(params, dict):
        raise ValueError('"params" must be an object')
    if step not in signatures:
        raise ValueError(str(errors.UnknownStep.for_name(step, signatures)))
    signature = _signature_from_text(signatures[step])
    if signature is not None:
        try:
            signature.bind(**params)
        except TypeError as error:
            raise ValueError(f"bad parameters for step {step!r}{signatures[step]}: {error}") from None
    return BatchLine(number, step, params)


def _signature_from_text(text: str):
    """The :class:`inspect.Signature` that ``text`` (``str(signature)``) shows, to bind parameters to.

    Parsed, never evaluated: defaults and annotations are kept as placeholders. ``None``
    when the text does not parse (a default whose repr is not Python): the daemon still
    checks those parameters when the batch arrives, and refuses the batch as a whole.
    """
    import ast
    import inspect

    try:
        function = ast.parse(f"def _{text}: pass").body[0]
    except SyntaxError:
        return None
    arguments, Parameter = function.args, inspect.Parameter
    positional = [*arguments.posonlyargs, *arguments.args]
    first_default = len(positional) - len(arguments.defaults)
    parameters = [Parameter(arg.arg, Parameter.POSITIONAL_ONLY if index < len(arguments.posonlyargs)
                            else Parameter.POSITIONAL_OR_KEYWORD,
                            default=None if index >= first_default else Parameter.empty)
                  for index, arg in enumerate(positional)]
    if arguments.vararg is not None:
        parameters.append(Parameter(arguments.vararg.arg, Parameter.VAR_POSITIONAL))
    parameters += [Parameter(arg.arg, Parameter.KEYWORD_ONLY, default=Parameter.empty if default is None else None)
                   for arg, default in zip(arguments.kwonlyargs, arguments.kw_defaults)]
    if arguments.kwarg is not None:
        parameters.append(Parameter(arguments.kwarg.arg, Parameter.VAR_KEYWORD))
    return inspect.Signature(parameters)


def _submit_batch(connection: Connection, batch_file: TextIO, key: Optional[str], cancel_on_interrupt: bool,
                  as_json: bool) -> None:
    """Check every line, submit them as one batch request (all or nothing), then wait with a progress bar."""
    described = _ask(connection, lambda client: client.steps())
    lines = read_batch(batch_file, described)
    batch = _ask(connection, lambda client: client.submit_batch([(line.step, line.params) for line in lines],
                                                              key=key))
    task_ids = list(batch.task_ids)
    records: Dict[int, Dict[str, Any]] = {}
    with _interruptible(connection, task_ids, cancel_on_interrupt):
        waits = {_ask(connection, lambda client, task_id=task_id: client.wait_future(task_id)): task_id
                 for task_id in task_ids}
        failed = 0

        def counts(_: Any) -> str:
            return f"{len(records) - failed} done, {failed} failed"

        with click.progressbar(length=len(task_ids), label="waiting", show_pos=True, show_percent=True,
                               item_show_func=counts, file=click.get_text_stream("stderr")) as bar:
            for done in concurrent.futures.as_completed(waits):
                try:
                    record = done.result()
                except errors.GovernorError as error:
                    raise _client_error(error) from None
                records[waits[done]] = record
                failed += record["state"] != "done"
                bar.update(1, record)
    ordered = [records[task_id] for task_id in task_ids]
    click.echo(f"{len(ordered)} tasks: {len(ordered) - failed} done, {failed} failed", err=True)
    if as_json:
        _echo_json([{"line": line.number, **record_json(record)} for line, record in zip(lines, ordered)])
    else:
        _table(["line", "id", "step", "state", "error"],
               [[line.number, record["task_id"], record["step"], record["state"], _error_headline(record)]
                for line, record in zip(lines, ordered)])
    raise click.exceptions.Exit(_exit_status(ordered))


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
