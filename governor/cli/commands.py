"""The ``governor`` commands: a thin click layer over the Supervisor, the daemon and its client.

Every command parses its options, calls one domain object and prints: text for people by
default, ``--json`` for programs (times as local ISO 8601 either way). Data flow of a
client command::

    argv ──click──> options (--socket recorded on the LazyClient in ctx.obj, options.py)
         ──> LazyClient.ask(request): the light Client (no loky, psutil or supervisor imported)
         ──> one request; a Governor error ──> GovernorClickError (its row of EXIT_STATUSES, exits.py)
         ──> print (output.py); exit with the status of how the task ended (done 0, failed 1, ...)

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
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, TextIO, Tuple

import click

from governor import __version__, errors
from governor.cli.batch import read_batch
from governor.cli.exits import EXIT_CODES, GovernorClickError, client_error, exit_status, exit_statuses_epilog
from governor.cli.options import (LazyClient, cancel_on_interrupt_option, deprecated, json_option, limit_options,
                                  limits_from_options, parse_value, pass_client, socket_option, wait_timeout_option)
from governor.cli.output import (echo_json, echo_record, echo_tables, error_headline, format_metrics, format_record,
                                 id_ranges, local_time, record_json, table)
from governor.service.journal import STATES
from governor.service.live import http_config_from_options, http_options
from governor.protocol import DEFAULT_STATUS_LIMIT, MAX_PRIORITY, MAX_STATUS_LIMIT


@contextlib.contextmanager
def _interruptible(client: LazyClient, task_ids: Sequence[int], cancel_on_interrupt: bool) -> Iterator[None]:
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
            outcome = client.ask(lambda c: c.cancel(*task_ids))
            click.echo(f"\ninterrupted: cancelled {id_ranges(outcome['cancelled']) or 'none'}"
                       + (f"; already finished: {id_ranges(outcome['finished'])}" if outcome["finished"] else ""),
                       err=True)
        else:
            click.echo(f"\ninterrupted: task{'s' if len(task_ids) > 1 else ''} {ids} "
                       f"{'go' if len(task_ids) > 1 else 'goes'} on; see `governor status ID`, stop with "
                       "`governor cancel ID`", err=True)
        raise click.exceptions.Exit(EXIT_CODES["aborted"]) from None


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



@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]}, epilog=exit_statuses_epilog())
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
    ctx.call_on_close(ctx.ensure_object(LazyClient).close)


@main.command()
@socket_option
@click.option("--interval", type=click.FloatRange(min=0.1), default=0.25, show_default=True,
              help="Seconds between refreshes.")
@pass_client
def top(client: LazyClient, interval: float) -> None:
    """A live terminal view of the daemon (needs the live extra): lanes, workers, kills, latencies.

    \b
    Keys: up/down move the selection; c cancels a task by its id (the selected worker's
    task unless another id is typed), after a confirmation that names it; q quits.
    With no daemon it exits 3 at once, like every command. Once started, it keeps
    running while the daemon restarts, and says "reconnecting" meanwhile.
    """
    # Before Textual loads and takes the terminal: no daemon is an error, said at once.
    client.ask(lambda c: c.ping())
    client.close()  # top opens its own clients, on its own threads
    try:
        from governor.cli.top import run_top  # Textual loads only here: other commands stay fast
    except ImportError as missing:
        raise click.ClickException(f"governor top needs the live extra ({missing}): "
                                   "pip install 'governor[live]'") from None
    run_top(client.resolved_socket(), interval)


def _json_array(ctx: click.Context, param: click.Parameter, text: Optional[str]) -> Optional[list]:
    """An option's JSON array, as a list (``None`` when the option is not given)."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as error:
        raise click.BadParameter(f"not JSON: {error}") from None
    if not isinstance(value, list):
        raise click.BadParameter(f"a JSON array, such as '[\"db.sqlite3\", 5]', not {text!r}")
    return value


@main.command()
@socket_option
@click.option("--steps", "step_modules", multiple=True, metavar="MODULE[:ATTR]",
              help="Also serve the steps of MODULE: its `registry`, else the steps it registered with "
                   "@governor.step; or ATTR, a StepRegistry or a function taking the daemon's registry. "
                   "Repeatable. MODULE is looked for in --app-dir "
                   "first, as `python -m` does. Packages can also ship steps through the `governor.steps` "
                   "entry-point group.")
@click.option("--app-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=".",
              show_default=True, help="Where --steps modules are looked for first (it is put first on the "
                                      "daemon's and its workers' module path).")
@click.option("--builtin/--no-builtin", default=True, show_default=True,
              help="Serve the built-in git and chat steps.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Pool workers [default: 2 x CPUs, 4..16].")
@click.option("--critical-workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Critical workers: critical steps with the same key (@step(critical=True, key=...)) run one "
                   "at a time in order, different keys at once on up to this many; a step without a key alone.")
@click.option("--journal", "journal_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The SQLite journal [default: $XDG_STATE_HOME/governor/journal.sqlite3].")
@click.option("--journal-sync", type=click.Choice(["normal", "full"]), default="normal", show_default=True,
              help="How far a journal write goes before a submission is acknowledged: to the OS (normal: "
                   "survives kill -9 of the daemon) or to the disk (full: survives a power cut too, for an "
                   "fsync per write).")
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
@click.option("--initializer", default=None, metavar="MODULE:FUNCTION",
              help="Call FUNCTION in every worker before its first task (a connection, a model), as "
                   "Supervisor(initializer=...). MODULE is looked for as --steps modules are. Not with --backend ray.")
@click.option("--initargs", default=None, metavar="JSON", callback=_json_array,
              help="The initializer's arguments, as a JSON array.")
@click.option("--initializer-timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="SECONDS", help="How long a worker's initializer may take before its start fails "
                                      "[default: 60].")
@click.pass_context
def serve(ctx: click.Context, step_modules: List[str], app_dir: Path, builtin: bool, workers: Optional[int],
          critical_workers: int, journal_path: Optional[Path], journal_sync: str, metrics_addr: Optional[str],
          log_format: str, log_level: str,
          drain_timeout: float, allow_root: bool, backend: str, ray_address: Optional[str], sandbox: str,
          sandbox_writes: List[str], initializer: Optional[str], initargs: Optional[list],
          initializer_timeout: Optional[float], **http_settings: Any) -> None:
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
    failure is one line and exit status 14 (15: a daemon is already running there; 16: the
    journal cannot be opened or is not SQLite).

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
    if initializer is not None and backend == "ray":
        raise click.BadParameter("Ray reuses its workers for other work; use --backend loky",
                                 param_hint="--initializer")
    if initializer is None and (initargs is not None or initializer_timeout is not None):
        raise click.BadParameter("needs --initializer", param_hint="--initargs/--initializer-timeout")
    settings: Dict[str, Any] = {"workers": workers, "critical_workers": critical_workers, "allow_root": allow_root,
                                "drain_timeout_s": drain_timeout, "backend": backend, "ray_address": ray_address,
                                "sandbox": sandbox, "sandbox_writes": sandbox_writes, "journal_sync": journal_sync,
                                "initializer": initializer, "initargs": initargs or (),
                                "initializer_timeout_s": initializer_timeout}
    socket_path = ctx.ensure_object(LazyClient).resolved_socket()
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
        _import_step_modules([*step_modules, *([initializer] if initializer else [])], app_dir)
        registry = load_registry(step_modules, builtin=builtin)
        Daemon(registry, config).serve()
        if backend == "ray":
            _exit_past_ray()
    except (errors.DaemonAlreadyRunning, errors.JournalLocked) as error:
        raise GovernorClickError(str(error), "already_running") from None
    except errors.JournalUnavailable as error:
        raise GovernorClickError(str(error), "journal_unusable") from None
    except (errors.DaemonError, errors.RegistrationError, errors.BackendUnavailable,
            errors.SandboxUnavailable, errors.WorkerStartFailed) as error:
        raise GovernorClickError(str(error), "cannot_start") from None


def _exit_past_ray() -> None:
    """Exit 0 now that the daemon stopped cleanly with the Ray backend, skipping the
    interpreter's teardown of Ray's C++ core, which aborts the process (SIGABRT) after a
    SIGTERM on a loaded host (ray-project/ray#37288): ``atexit`` handlers and logging run
    first, as a normal exit would run them."""
    import atexit
    import os
    import sys

    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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
              help="A parameter; VALUE is converted by the step's annotation (int, float, bool, str, Path, "
                   "a JSON array or object), else read as JSON when it parses (5, true), else as text. "
                   "Repeatable.")
@click.option("--params", "params_json", default=None, metavar="OBJECT", help="All parameters as one JSON object.")
@click.option("--wait/--no-wait", default=False, show_default=True,
              help="Wait for the task and print its record (else print its id).")
@wait_timeout_option
@limit_options
@click.option("--key", default=None, help="Supersede key: cancels the unfinished steps of the previous "
                                          "submission with the same key.")
@click.option("--priority", type=click.IntRange(-MAX_PRIORITY, MAX_PRIORITY), default=0, show_default=True,
              help="Rank in the pool lane's queue: higher starts first; a second of waiting counts as one.")
@click.option("--batch", "batch_file", type=click.File("r"), default=None,
              help="Submit every line of a JSONL file ({\"step\": ..., \"params\": {...}, \"limits\": {...}}) as "
                   "one batch, all or nothing, and wait with a progress bar. Every line is checked first.")
@cancel_on_interrupt_option
@json_option
@socket_option
@pass_client
def submit(client: LazyClient, step: Optional[str], params: List[str], params_json: Optional[str], wait: bool,
           wait_timeout: Optional[float], timeout_s: Optional[float], max_memory_mb: Optional[float],
           old_limit_timeout: Optional[float], key: Optional[str], priority: int, batch_file: Optional[TextIO],
           cancel_on_interrupt: bool, as_json: bool) -> None:
    """Submit a step (or a batch of steps) to the daemon.

    \b
    Examples:
      governor submit git.status -p repo=.
      governor submit chat.send_message -p chat_id=1 -p text=hello --wait
      governor submit git.log --params '{"repo": "/src/app", "limit": 5}' --wait --wait-timeout 10
      governor submit mysteps.crunch -p n=9 --timeout 30 --max-memory 500 --wait
      governor submit git.status -p repo=. --priority 10
      governor submit --batch calls.jsonl

    --timeout and --max-memory are the task's own limits: past them it is killed.
    --wait-timeout only stops waiting; the task goes on. Relative paths in parameters
    are resolved against this directory, not the daemon's.
    Exit status: see `governor --help` (0 done, 1 failed, 4 timed out, ...).
    """
    limits = limits_from_options(timeout_s, max_memory_mb, old_limit_timeout)
    if batch_file is not None:
        if step is not None or params or params_json is not None or limits is not None or priority:
            raise click.UsageError("--batch takes its steps, parameters and limits from the file only, "
                                   "and no --priority")
        _submit_batch(client, batch_file, key, cancel_on_interrupt, as_json)
        return
    if step is None:
        raise click.UsageError("name a STEP, or give --batch FILE")
    if wait_timeout is not None and not wait:
        raise click.UsageError("--wait-timeout needs --wait")
    if timeout_s is not None and wait and wait_timeout is None:
        # --timeout used to mean --wait-timeout: say so while scripts may still mean that.
        click.echo("note: --timeout is the task's own time limit (it is killed past it); to stop waiting "
                   "and leave it running, use --wait-timeout", err=True)
    call_params = _parameters(client, step, params, params_json)
    from governor.task import Call

    # submit_call returns once the daemon journaled the task: the id is known.
    task_id = client.ask(lambda c: c.submit_call(Call(step, kwargs=call_params, limits=limits, priority=priority),
                                                       key=key).task_id)
    if not wait:
        click.echo(task_id)
        return
    with _interruptible(client, [task_id], cancel_on_interrupt):
        record = client.ask(lambda c: c.wait(task_id, timeout=wait_timeout))
    echo_record(record, as_json)
    raise click.exceptions.Exit(exit_status([record]))


def _parameters(client: LazyClient, step: str, params: List[str], params_json: Optional[str]) -> Dict[str, Any]:
    """``--params`` and the ``-p`` pairs (which win), each ``-p`` text converted by its annotation."""
    parsed: Dict[str, Any] = {}
    if params_json is not None:
        try:
            parsed = json.loads(params_json)
        except ValueError as error:
            raise click.BadParameter(f"not JSON: {error}", param_hint="--params") from None
        if not isinstance(parsed, dict):
            raise click.BadParameter("must be a JSON object", param_hint="--params")
    texts: Dict[str, str] = {}
    for item in params:
        name, equals, text = item.partition("=")
        if not equals or not name:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="-p")
        texts[name] = text
    if texts:
        parsed.update(client.ask(lambda c: _converted(c, step, texts)))
    return parsed


def _converted(client: Any, step: str, texts: Dict[str, str]) -> Dict[str, Any]:
    """``-p`` texts as the values the step's annotations say, by the daemon's description of
    the step: an unknown name or a bad value is refused here (``InvalidParameters``), before
    anything is submitted. A step the daemon does not list keeps the JSON-or-text reading:
    the daemon then refuses it by name, with its closest matches."""
    from governor.steps.parameters import StepParameters

    described = next((entry for entry in client.steps() if entry["name"] == step), None)
    if described is None or "parameters" not in described:
        return {name: parse_value(text) for name, text in texts.items()}
    return StepParameters.from_wire(step, described["parameters"]).from_texts(texts)


@main.command()
@click.argument("task_ids", type=click.IntRange(min=1), nargs=-1, required=True)
@wait_timeout_option
@click.option("--timeout", "old_timeout", type=click.FloatRange(min=0, min_open=True), default=None, hidden=True,
              callback=deprecated("--wait-timeout", "how long to wait; --timeout is a task's own limit"))
@cancel_on_interrupt_option
@json_option
@socket_option
@pass_client
def wait(client: LazyClient, task_ids: Tuple[int, ...], wait_timeout: Optional[float], old_timeout: Optional[float],
         cancel_on_interrupt: bool, as_json: bool) -> None:
    """Wait for tasks to end and print their records.

    \b
    Examples:
      governor wait 42
      governor wait 41 42 --wait-timeout 30 --json

    Exit status: that of the first task (in the order given) that did not end done.
    """
    timeout = wait_timeout if wait_timeout is not None else old_timeout
    deadline = None if timeout is None else time.monotonic() + timeout
    records = []
    with _interruptible(client, task_ids, cancel_on_interrupt):
        for task_id in task_ids:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            records.append(client.ask(lambda c: c.wait(task_id, timeout=left)))
    if as_json:  # a list, however many ids: a script need not count them
        echo_json([record_json(record) for record in records])
    else:
        click.echo("\n\n".join(format_record(record) for record in records))
    raise click.exceptions.Exit(exit_status(records))


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
@pass_client
def status(client: LazyClient, task_id: Optional[int], states: Tuple[str, ...], step: Optional[str], limit: int,
           as_json: bool) -> None:
    """Show one task in full (result, or error with its traceback), or the recent tasks.

    \b
    Examples:
      governor status                        the 50 most recent tasks, newest first
      governor status 42                     task 42 in full
      governor status --state failed --state timed_out -n 10
      governor status --state exhausted      tasks whose every attempt failed
      governor status --step git.status --json
    """
    if task_id is not None:
        if states or step is not None:
            raise click.UsageError("--state and --step filter the listing; not with a TASK_ID")
        record = client.ask(lambda c: c.status(task_id))
        echo_record(record, as_json)
        return
    found = client.ask(lambda c: c.status(states=states, step=step, limit=limit))
    if as_json:
        echo_json([record_json(record) for record in found])
        return
    table(["id", "step", "lane", "key", "state", "submitted", "ran_s", "attempts", "error"],
          [[t["task_id"], t["step"], t["lane"], t.get("lane_key") or "",
            t["state"] + (" (interrupted)" if t["interrupted"] else ""),
            local_time(t["submitted_at"], "seconds"),
            "" if t["started_at"] is None or t["ended_at"] is None else f"{t['ended_at'] - t['started_at']:.3f}",
            t["attempts"], error_headline(t)] for t in found])


@main.command()
@click.argument("task_ids", type=click.IntRange(min=1), nargs=-1, required=True)
@json_option
@socket_option
@pass_client
def cancel(client: LazyClient, task_ids: Tuple[int, ...], as_json: bool) -> None:
    """Cancel tasks: queued ones never run, running ones are stopped.

    \b
    Examples:
      governor cancel 41 42
      governor cancel 41 --json

    Exit status: 13 when any id is unknown (the others are still cancelled).
    """
    outcome = client.ask(lambda c: c.cancel(*task_ids))
    if as_json:
        echo_json(outcome)
    else:
        for key, label in (("cancelled", "cancelled"), ("finished", "already finished"),
                           ("unknown", "no such task")):
            if outcome[key]:
                click.echo(f"{label}: {' '.join(map(str, outcome[key]))}")
    if outcome["unknown"]:
        raise click.exceptions.Exit(EXIT_CODES["unknown_task"])


@main.command()
@click.argument("step", required=False)
@json_option
@socket_option
@pass_client
def steps(client: LazyClient, step: Optional[str], as_json: bool) -> None:
    """List the daemon's steps: lane, why that lane, and limits; or one STEP in full.

    \b
    Examples:
      governor steps
      governor steps timed_sleep
      governor steps --json
    """
    described = client.ask(lambda c: c.steps())
    if step is not None:
        chosen = [entry for entry in described if entry["name"] == step]
        if not chosen:
            raise client_error(errors.UnknownStep.for_name(step, [entry["name"] for entry in described]))
        described = chosen
        if not as_json:
            _echo_step(described[0])
            return
    if as_json:
        echo_json(described)
        return
    table(["step", "lane", "timeout_s", "max_memory_mb", "why"],
          [[s["name"], s["lane"], s["limits"]["timeout_s"] or "", s["limits"]["max_memory_mb"] or "", s["reason"]]
            for s in described])


def _echo_step(described: Dict[str, Any]) -> None:
    """One step in full: its signature and description, lane, limits and parameters."""
    click.echo(f"{described['name']}{described['signature']}")
    if described["description"]:
        click.echo(f"  {described['description']}")
    click.echo(f"lane: {described['lane']} ({described['reason']})")
    click.echo("limits: " + ", ".join(f"{name} {value if value is not None else '-'}"
                                      for name, value in described["limits"].items()))
    from governor.steps.parameters import StepParameters

    parameters = StepParameters.from_wire(described["name"], described.get("parameters", ())).parameters
    named = [parameter for parameter in parameters if parameter.by_name]
    if named:
        click.echo("parameters:")
        table(["name", "takes", "required"],
              [[parameter.name, (parameter.type.value if parameter.type else "any")
                + (" or null" if parameter.nullable else ""), "yes" if parameter.required else ""]
               for parameter in named], indent="  ")


@main.command()
@json_option
@socket_option
@pass_client
def workers(client: LazyClient, as_json: bool) -> None:
    """List the daemon's worker processes: pid, lane, current step, RSS, time on the step.

    \b
    Examples:
      governor workers
      governor workers --json
    """
    described = client.ask(lambda c: c.workers())
    if as_json:
        echo_json(described)
        return
    table(["pid", "lane", "state", "step", "running_s", "rss_mib"],
          [[w["pid"], w["lane"], w["state"], w["step"] or "",
            "" if w["running_s"] is None else f"{w['running_s']:.3f}",
            "" if w["rss_bytes"] is None else f"{w['rss_bytes'] / 2 ** 20:.1f}"] for w in described])


@main.command()
@click.option("--prometheus", is_flag=True, help="The Prometheus text format (what a scraper reads).")
@click.option("--json", "as_json", is_flag=True, help="The whole snapshot as JSON (every figure, unrounded).")
@socket_option
@pass_client
def metrics(client: LazyClient, prometheus: bool, as_json: bool) -> None:
    """Show the daemon's figures: lanes, each step's outcomes and times, workers, memory.

    Times are split into the wait in the lane's queue and the run in a worker, each as
    p50 / p95 of the step's recent tasks.

    \b
    Examples:
      governor metrics
      governor metrics --json
      governor metrics --prometheus
    """
    if prometheus and as_json:
        raise click.UsageError("--prometheus and --json are two formats: pick one")
    found = client.ask(lambda c: c.metrics("prometheus" if prometheus else "json"))
    if prometheus:
        click.echo(found.rstrip("\n"))
    elif as_json:
        echo_json(found)
    else:
        echo_tables(format_metrics(found))


@main.command()
@socket_option
@pass_client
def page(client: LazyClient) -> None:
    """Print the status page's URL, with a fresh token that opens it.

    The daemon must serve the page (`governor serve --http-addr [HOST:]PORT`); only its
    own user is given a token. The URL printed when the daemon started stays valid too.

    \b
    Examples:
      governor page
      xdg-open "$(governor page)"
    """
    click.echo(client.ask(lambda c: c.page()))


def _submit_batch(client: LazyClient, batch_file: TextIO, key: Optional[str], cancel_on_interrupt: bool,
                  as_json: bool) -> None:
    """Check every line, submit them as one batch request (all or nothing), then wait with a progress bar."""
    described = client.ask(lambda c: c.steps())
    lines = read_batch(batch_file, described)
    from governor.task import Call

    batch = client.ask(lambda c: c.submit_batch([Call(line.step, kwargs=line.params, limits=line.limits)
                                                 for line in lines], key=key))
    task_ids = list(batch.task_ids)
    records: Dict[int, Dict[str, Any]] = {}
    with _interruptible(client, task_ids, cancel_on_interrupt):
        waits = {client.ask(lambda c, task_id=task_id: c.wait_future(task_id)): task_id
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
                    raise client_error(error) from None
                records[waits[done]] = record
                failed += record["state"] != "done"
                bar.update(1, record)
    ordered = [records[task_id] for task_id in task_ids]
    click.echo(f"{len(ordered)} tasks: {len(ordered) - failed} done, {failed} failed", err=True)
    if as_json:
        echo_json([{"line": line.number, **record_json(record)} for line, record in zip(lines, ordered)])
    else:
        table(["line", "id", "step", "state", "error"],
              [[line.number, record["task_id"], record["step"], record["state"], error_headline(record)]
               for line, record in zip(lines, ordered)])
    raise click.exceptions.Exit(exit_status(ordered))


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
