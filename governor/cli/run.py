"""``governor run``: run steps once through an in-process Supervisor and show what each did.

No daemon is involved: the command builds its own :class:`~governor.engine.supervisor.Supervisor`
over :func:`steps.builtin.default_registry`, and the ``with`` block shuts it down (cancelling
what runs if the command is interrupted). Data flow::

    argv ──> parse_step() per STEP ──> Call(name, kwargs, limits)
         ──> StepSpec.resolve_paths(kwargs, cwd)    the step's declared paths= made absolute
         ──> Supervisor(...).check_call(call)   before any worker starts: UnknownStep or
                                                InvalidParameters become a UsageError (exit 2)
         ──> with Supervisor(...) as sup:
               [--view: git.refresh_index; a store without a chat: chat.create +
                chat.send_message; one after another, critical lane]
               the batch, submitted at once and awaited          timed: the batch total
         ──> a table (or --json) of each step's lane, status, time and peak RSS, and the
             batch's wall clock; exit 0 when every step is done, else 1

A step's time is the worker's own (``Task.started_at`` to ``Task.ended_at``, both
``time.monotonic()`` in the worker); for a task that never reported them (killed, crashed)
it is the supervisor's dispatch to end.

This command shows what one run of the steps did; how the batch compares with the same
steps one after another, or with other pools, over many rounds, is the benchmark's job:
``governor bench --scenario view-real``.
"""

from __future__ import annotations

import concurrent.futures
import difflib
import inspect
import json
import math
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import attrs
import click

from governor.cli import crowd
from governor.cli.options import parse_value
from governor.errors import GovernorError, InvalidParameters, StepCancelled, StepFailed, StepSkipped, UnknownStep
from governor.limits import Lane, Limits
from governor.engine.supervisor import Supervisor, default_workers
from governor.task import Call, Task
from governor.steps.builtin import chat, default_registry
from governor.steps.builtin.errors import BuiltinStepError

#: How many messages ``--view`` shows, as a chat window would on opening.
VIEW_HISTORY_LIMIT = 50

#: What ``--view`` writes to a chat store that has no chat yet, so a first run shows a chat.
WELCOME_TITLE = "welcome"
WELCOME_TEXT = "hello from governor"

#: The widest result shown in the table's last column (``--json`` gives every result whole).
RESULT_WIDTH = 56

_MIB = 2 ** 20


class StepSyntaxError(click.BadParameter):
    """A ``STEP[:key=value,...]`` argument that cannot be parsed (exit status 2)."""


# ----------------------------------------------------------------------------- parsing


def parse_step(text: str) -> Call:
    """Parse ``NAME[:key=value,key=value,...]`` into a :class:`~governor.task.Call`.

    Values are JSON when they parse as JSON (``limit=5`` is ``5``, ``flag=true`` is
    ``True``, ``title="1"`` is the string ``"1"``), else the text as given (``repo=.``).
    Parameters are separated by commas, except inside a JSON string (``text="a, b"``) or a
    JSON list or object (``ids=[1,2]``).

    Raises:
        StepSyntaxError: an empty name, a parameter without ``=``, a key that is not a
            Python identifier, a key given twice, an unterminated ``"``.
    """
    name, colon, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise StepSyntaxError(f"{text!r}: the step name is missing (expected NAME[:key=value,...])")
    kwargs: Dict[str, Any] = {}
    if colon and rest.strip():
        for item in _split_params(text, rest):
            key, equals, raw = item.partition("=")
            key = key.strip()
            if not equals:
                raise StepSyntaxError(f"{text!r}: parameter {item!r} has no '=' (expected key=value)")
            if not key.isidentifier():
                raise StepSyntaxError(f"{text!r}: {key!r} is not a parameter name")
            if key in kwargs:
                raise StepSyntaxError(f"{text!r}: parameter {key!r} is given twice")
            kwargs[key] = parse_value(raw)
    return Call(name, kwargs=kwargs)


def _split_params(text: str, params: str) -> List[str]:
    """Split ``params`` at the commas that are outside JSON strings, lists and objects."""
    items: List[str] = []
    current: List[str] = []
    depth, quoted, escaped = 0, False, False
    for char in params:
        if quoted:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth = max(0, depth - 1)
        elif char == "," and depth == 0:
            items.append("".join(current))
            current = []
            continue
        current.append(char)
    if quoted:
        raise StepSyntaxError(f"{text!r}: a '\"' is not closed (JSON-quote the whole value: "
                              "text='\"a, b\"')")
    items.append("".join(current))
    if any(not item.strip() for item in items):
        raise StepSyntaxError(f"{text!r}: an empty parameter (two commas in a row, or a trailing comma)")
    return items


# ----------------------------------------------------------------------------- results


@attrs.frozen
class StepRun:
    """What one step of the run did, as the table and the JSON show it.

    Attributes:
        step: the step's name.
        params: the keyword arguments it was given (paths made absolute).
        lane: ``"critical"`` or ``"pool"``.
        status: the task's final state (``"done"``, ``"failed"``, ``"timed_out"``, ...).
        time_ms: its run time (see the module docstring), ``None`` if it never ran; over
            several rounds, the median of its rounds.
        peak_rss_mib: the peak RSS of its worker's process tree while it ran, if known.
        result: its result when done, else ``None``.
        error: ``"Type: message"`` when it did not succeed, else ``None``.
        setup: whether ``--view`` ran it to prepare the repository or the chat store.
    """

    step: str
    params: Dict[str, Any]
    lane: str
    status: str
    time_ms: Optional[float]
    peak_rss_mib: Optional[float]
    result: Any = None
    error: Optional[str] = None
    setup: bool = False

    @property
    def ok(self) -> bool:
        """Whether the step succeeded."""
        return self.status == "done"

    @classmethod
    def of(cls, call: Call, lane: Lane, task: Optional[Task], outcome: Any, setup: bool = False) -> "StepRun":
        """Build the row from the task the supervisor ran and its result or error.

        Args:
            call: what was submitted.
            lane: the lane it was submitted to.
            task: the supervisor's record (``None`` if it was never dispatched).
            outcome: the result, or the exception in its place (``return_exceptions``).
            setup: mark the row as ``--view``'s setup.
        """
        failed = isinstance(outcome, BaseException)
        time_ms = peak = None
        if task is not None:
            start = task.started_at if task.started_at is not None else task.dispatched_at
            if start is not None and task.ended_at is not None:
                time_ms = max(0.0, task.ended_at - start) * 1000
            if task.peak_rss_bytes is not None:
                peak = task.peak_rss_bytes / _MIB
            status = task.state.value
        elif isinstance(outcome, StepSkipped):
            status = "skipped"
        elif isinstance(outcome, StepCancelled):
            status = "cancelled"
        else:
            status = "failed" if failed else "done"
        return cls(step=call.step, params=dict(call.kwargs), lane=lane.value, status=status, time_ms=time_ms,
                   peak_rss_mib=peak, result=None if failed else outcome,
                   error=describe_error(outcome) if failed else None, setup=setup)

    def to_json(self) -> Dict[str, Any]:
        """The step's object in ``--json``'s ``steps`` (or ``setup``) list."""
        return {"step": self.step, "params": self.params, "lane": self.lane, "status": self.status,
                "time_ms": _rounded(self.time_ms), "peak_rss_mib": _rounded(self.peak_rss_mib),
                "result": self.result, "error": self.error}


@attrs.frozen
class RunReport:
    """Everything ``governor run`` prints.

    Attributes:
        setup: the ``--view`` setup steps (the index refresh, and the welcome chat when
            the store had none).
        steps: the batch's steps, in the order given.
        batch_ms: the batch's wall clock, from the first submit to the last result
            (``None`` when setup failed and the batch never ran).
        workers: the supervisor's pool workers.
        startup_ms: how long the supervisor took to have every worker warm.
        view: the ``--view`` repository and chat store, or ``None``.
    """

    setup: Tuple[StepRun, ...]
    steps: Tuple[StepRun, ...]
    batch_ms: Optional[float]
    workers: int
    startup_ms: float
    view: Optional[Dict[str, Any]] = None

    @property
    def ok(self) -> bool:
        """Whether every step, setup included, succeeded."""
        return all(run.ok for run in (*self.setup, *self.steps))

    def to_json(self) -> Dict[str, Any]:
        """The ``--json`` document."""
        return {
            "ok": self.ok,
            "view": self.view,
            "setup": [run.to_json() for run in self.setup],
            "steps": [run.to_json() for run in self.steps],
            "totals": {"batch_ms": _rounded(self.batch_ms), "startup_ms": _rounded(self.startup_ms),
                       "workers": self.workers},
        }


def describe_error(error: BaseException) -> str:
    """``"NotAGitRepository: '/tmp' is not a git repository ..."``: what went wrong, in one line.

    A step's own exception is named by its type (``StepFailed`` only says it came from a
    worker); a limit Governor enforced is named by Governor's type (``StepTimeout: ...``).
    """
    if isinstance(error, StepFailed):
        return f"{error.exc_type.rsplit('.', 1)[-1]}: {error.exc_message}"
    return f"{type(error).__name__}: {error}"


def _rounded(value: Optional[float], digits: int = 3) -> Optional[float]:
    return None if value is None else round(value, digits)


# ----------------------------------------------------------------------------- running


def _view_calls(repo: str, store: str, chat_id: int) -> List[Call]:
    return [Call("chat.history", kwargs={"chat_id": chat_id, "limit": VIEW_HISTORY_LIMIT, "store": store}),
            Call("git.status", kwargs={"repo": repo}),
            Call("git.current_branch", kwargs={"repo": repo})]


def _refresh_index(sup: Supervisor, repo: str, limits: Optional[Limits]) -> StepRun:
    """Refresh ``repo``'s index in the critical lane, before the view reads it.

    The view's git steps may not write the index (they run read-only, in parallel), so on a
    fresh clone every one of their calls would re-read the "racily clean" files: 18-40 ms
    for a ``git status`` that takes 2-3 ms once the index is refreshed, in the batch and in
    the comparison alike. A plain ``git status`` in a terminal does the same refresh.
    """
    return _submit_one(sup, Call("git.refresh_index", kwargs={"repo": repo}, limits=limits))


def _setup_view(sup: Supervisor, store: str, limits: Optional[Limits]) -> Tuple[List[StepRun], Optional[int]]:
    """Create the welcome chat and its first message, one after the other, in the critical lane.

    Returns:
        the two rows (one if the chat could not be created) and the new chat's id (``None``
        if setup failed).
    """
    create = Call("chat.create", kwargs={"title": WELCOME_TITLE, "store": store}, limits=limits)
    created = _submit_one(sup, create)
    if not created.ok:
        return [created], None
    send = Call("chat.send_message", kwargs={"chat_id": created.result, "text": WELCOME_TEXT, "store": store},
                limits=limits)
    sent = _submit_one(sup, send)
    return [created, sent], created.result if sent.ok else None


def _submit_one(sup: Supervisor, call: Call) -> StepRun:
    """Run one setup step and wait for it (each needs the one before it)."""
    future = sup.submit_call(call)
    concurrent.futures.wait([future])
    return StepRun.of(call, sup.classify(call.step)[0], future.task, _outcome(future), setup=True)


def execute(calls: Sequence[Call], *, workers: Optional[int] = None, timeout_s: Optional[float] = None,
            view: Optional[Tuple[str, str, Optional[int]]] = None) -> RunReport:
    """Run ``calls`` (after the ``--view`` steps, if ``view``) through an in-process Supervisor.

    Args:
        calls: the steps, as parsed (paths already absolute).
        workers: pool workers (default: one per pool step, at most :func:`default_workers`).
        timeout_s: a per-step timeout for this run, on top of each step's own limits.
        view: ``(repo, store, chat_id)`` (absolute paths; ``chat_id`` ``None`` for the
            newest chat) to run the view switch first.

    Returns:
        the :class:`RunReport`.

    Raises:
        click.UsageError: an unknown step or bad parameters, before any worker starts.
        click.ClickException: ``view``'s chat store cannot be read.
    """
    registry = default_registry()
    limits = None if timeout_s is None else Limits(timeout_s=timeout_s)
    chat_id = None
    if view is not None and view[2] is None:
        try:
            chat_id = chat.newest_chat(view[1])
        except BuiltinStepError as error:  # not a chat store: said before any worker starts
            raise click.ClickException(describe_error(error)) from None
    elif view is not None:
        chat_id = view[2]
    # The view's calls need the chat id, which setup may only learn from chat.create: the
    # placeholder 1 checks their parameters now; they are rebuilt after setup.
    view_calls = [] if view is None else _view_calls(view[0], view[1], chat_id or 1)
    planned = [attrs.evolve(call, limits=limits) for call in (*view_calls, *calls)]
    pool_steps = sum(registry.classify(call.step).lane is Lane.POOL for call in planned if call.step in registry)
    workers = workers or max(1, min(default_workers(), pool_steps))
    # spares=0: a one-shot run does not need a warm replacement standing by, and each
    # spare is one more interpreter to start before the first step runs.
    sup = Supervisor(registry, workers=workers, spares=0)
    for call in planned:
        _check(sup, call)
    started = time.perf_counter()
    with sup:
        startup_ms = (time.perf_counter() - started) * 1000
        try:
            setup: List[StepRun] = []
            if view is not None:
                setup.append(_refresh_index(sup, view[0], limits))
                if setup[-1].ok and chat_id is None:
                    created, chat_id = _setup_view(sup, view[1], limits)
                    setup += created
                if not all(run.ok for run in setup):  # the view would only fail after it
                    return RunReport(tuple(setup), (), None, workers, startup_ms, _view_json(view, chat_id))
                view_calls = _view_calls(view[0], view[1], chat_id)
            batch_ms, runs = _run_batch(sup, [attrs.evolve(call, limits=limits) for call in (*view_calls, *calls)])
        except BaseException:
            # Interrupted (Ctrl-C): stop the steps rather than wait for them to end.
            sup.shutdown(wait=True, cancel_futures=True, cancel_running=True)
            raise
    return RunReport(tuple(setup), tuple(runs), batch_ms, workers, startup_ms, _view_json(view, chat_id))


def _run_batch(sup: Supervisor, batch: Sequence[Call]) -> Tuple[float, List[StepRun]]:
    """Submit ``batch`` at once, wait for all of it: its wall clock in ms, and a row per step.

    As ``run_batch`` submits, but keeping the futures: their tasks carry the worker
    timestamps and peak RSS the table shows.
    """
    start = time.perf_counter()
    futures = [sup.submit_call(call) for call in batch]
    concurrent.futures.wait(futures)
    batch_ms = (time.perf_counter() - start) * 1000
    return batch_ms, [StepRun.of(call, sup.classify(call.step)[0], future.task, _outcome(future))
                      for call, future in zip(batch, futures)]



def _outcome(future: concurrent.futures.Future) -> Any:
    """A finished future's result, or its error (returned, not raised)."""
    try:
        return future.result()
    except BaseException as error:  # every way a step can end is shown in its row
        return error


def _view_json(view: Optional[Tuple[str, str, Optional[int]]], chat_id: Optional[int]) -> Optional[Dict[str, Any]]:
    return None if view is None else {"repo": view[0], "store": view[1], "chat_id": chat_id}


def _check(sup: Supervisor, call: Call) -> None:
    """Raise a UsageError (exit 2) for an unknown step or parameters that do not fit."""
    try:
        sup.check_call(call)
    except UnknownStep as unknown:
        known = "" if unknown.suggestions else f" (known steps: {', '.join(_STEP_NAMES)})"
        raise click.UsageError(f"{unknown}{known}") from None
    except InvalidParameters as invalid:
        spec = _REGISTRY.get(call.step)
        accepted = list(_signature(spec).parameters)
        hints = [f"{key!r}: did you mean {', '.join(map(repr, close))}?"
                 for key in call.kwargs if key not in accepted
                 for close in [difflib.get_close_matches(key, accepted, n=2, cutoff=0.5)] if close]
        raise click.UsageError(f"{invalid}{'; ' if hints else ''}{'; '.join(hints)} "
                               f"({call.step} takes: {_describe_parameters(spec)})") from None


# ----------------------------------------------------------------------------- output


def _format_ms(value: Optional[float]) -> str:
    if value is None or math.isnan(value):
        return "—"
    digits = 1 if abs(value) >= 10 else 2
    return f"{value:,.{digits}f} ms"


def _format_mib(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.1f} MiB"


def _setup_title(setup: Sequence[StepRun]) -> str:
    """What the setup rows were for; a refresh that was skipped (or failed) is not called done."""
    done = []
    for run in setup:
        if run.step == "git.refresh_index":
            refreshed = run.ok and run.result["refreshed"]
            done.append("the repository's index refreshed" if refreshed else "the repository's index not refreshed")
        elif run.step == "chat.create":
            done.append("the chat store had no chat, so one was created")
    return f"setup (critical lane, one after another): {'; '.join(done)}"


def brief(run: StepRun) -> str:
    """A one-line, at most :data:`RESULT_WIDTH` characters, account of a step's result or error."""
    if run.error is not None:
        text = run.error
    elif isinstance(run.result, list):
        text = f"{len(run.result)} item{'s' if len(run.result) != 1 else ''}"
    elif isinstance(run.result, dict):
        text = ", ".join(f"{key}={_scalar(value)}" for key, value in run.result.items() if value is not None)
    else:
        text = _scalar(run.result)
    text = " ".join(text.split())
    return text if len(text) <= RESULT_WIDTH else text[:RESULT_WIDTH - 1] + "…"


def _scalar(value: Any) -> str:
    if isinstance(value, (list, dict)):
        return str(len(value))
    if isinstance(value, str) and len(value) == 40 and all(c in "0123456789abcdef" for c in value):
        return value[:10]  # a full git sha: the short form is what people read
    return str(value)


def format_table(report: RunReport) -> str:
    """The human-readable report: setup rows, step rows, errors and the totals."""
    header = ("step", "lane", "status", "time", "peak RSS", "result")
    sections = []
    if report.setup:
        sections.append((_setup_title(report.setup), report.setup))
    if report.steps:
        title = "view switch" if report.view is not None else "steps"
        sections.append((f"{title}: one batch, submitted at once", report.steps))
    every = [row for _, rows in sections for row in rows]
    cells = [[run.step, run.lane, run.status, _format_ms(run.time_ms), _format_mib(run.peak_rss_mib), brief(run)]
             for run in every]
    widths = [max(len(header[i]), *(len(line[i]) for line in cells)) for i in range(len(header) - 1)]

    def line(values: Sequence[str]) -> str:
        left = [values[0].ljust(widths[0]), values[1].ljust(widths[1]), values[2].ljust(widths[2])]
        right = [values[3].rjust(widths[3]), values[4].rjust(widths[4])]
        return "  " + "  ".join(left + right + [values[5]])

    out = []
    if report.view is not None:
        chat_text = "" if report.view["chat_id"] is None else f"chat {report.view['chat_id']} of "
        out.append(f"view of {report.view['repo']}, {chat_text}chat store {report.view['store']}")
    out.append(f"supervisor: {report.workers} pool worker{'s' if report.workers != 1 else ''} + 1 critical, "
               f"warm in {_format_ms(report.startup_ms)}")
    position = 0
    for title, rows in sections:
        out += ["", title, line(header)]
        for _ in rows:
            out.append(line(cells[position]))
            position += 1
    failed = [run for run in every if run.error is not None]
    if failed:
        out += ["", "errors:"] + [f"  {run.step}: {run.error}" for run in failed]
    out += ["", f"batch total (wall clock): {_format_ms(report.batch_ms)}",
            "(compared with one after another and with other pools: governor bench --scenario view-real)"]
    return "\n".join(out)


# ----------------------------------------------------------------------------- the command


#: The built-in steps, read here for --help, error messages and --store (never run from it).
_REGISTRY = default_registry()
_STEP_NAMES = tuple(_REGISTRY.names())


def _signature(spec: Any) -> inspect.Signature:
    signature = inspect.signature(spec.fn.run if inspect.isclass(spec.fn) else spec.fn)
    if inspect.isclass(spec.fn):  # as bound to an instance: without ``self``
        signature = signature.replace(parameters=list(signature.parameters.values())[1:])
    return signature


def _describe_parameters(spec: Any) -> str:
    """``chat_id, limit=50, store=None``: the parameters as a user types them."""
    return ", ".join(name if parameter.default is inspect.Parameter.empty else f"{name}={parameter.default!r}"
                     for name, parameter in _signature(spec).parameters.items())


def _steps_epilog() -> str:
    lines = ["\b", "Built-in steps (lane, parameters):"]
    for name in _STEP_NAMES:
        lane = _REGISTRY.classify(name).lane.value
        lines.append(f"  {name:<20} {lane:<9} {_describe_parameters(_REGISTRY.get(name))}")
    return "\n".join(lines)


@click.command(epilog=_steps_epilog(), context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("steps", nargs=-1, metavar="[STEP[:key=value,...]]...")
@click.option("--view", "view_repo", is_flag=False, flag_value=".", default=None, metavar="[REPO]",
              help="Run the view switch on REPO (default '.'): chat.history + git.status + "
                   "git.current_branch. First, in the critical lane, refreshes REPO's index "
                   "(git.refresh_index) and, on a chat store without a chat, creates one "
                   f"({WELCOME_TITLE!r}, with the message {WELCOME_TEXT!r}).")
@click.option("--store", type=click.Path(dir_okay=False), default=None,
              help="The chat store for --view and for every step that takes a store and was not given "
                   f"one (default: ${chat.STORE_ENV_VAR}, else $XDG_STATE_HOME/governor/{chat.STORE_FILE_NAME}).")
@click.option("--chat", "chat_id", type=click.IntRange(min=1), default=None,
              help="The chat --view shows (default: the newest).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Pool workers (default: one per read-only step, at most 2 x CPUs clamped to 4..16).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="SECONDS", help="Per-step timeout for this run; a step past it is killed (timed_out).")
@click.option("--users", type=click.IntRange(min=0), default=crowd.DEFAULT_USERS, show_default=True,
              help=f"With --view, then: this many simulated users switch the seed's 753 ms view for "
                   f"{crowd.DEFAULT_SECONDS:g} s, on the seed's one lane and on Governor (0: skip).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document (steps, results, totals) instead "
                                                     "of the table.")
def run(steps: Tuple[str, ...], view_repo: Optional[str], store: Optional[str], chat_id: Optional[int],
        workers: Optional[int], timeout_s: Optional[float], users: int, as_json: bool) -> None:
    """Run STEPs through an in-process Supervisor and show what each did.

    No daemon is needed: the command starts its own Supervisor over the built-in steps,
    submits the STEPs as one batch (read-only steps in parallel in the pool lane,
    state-changing ones in order in the critical lane), and prints one row per step: its
    lane, final status, time in its worker and peak memory, then the batch's wall clock.
    How the batch compares with the same steps one after another, over many rounds, is
    measured by `governor bench --scenario view-real`.

    \b
    STEP syntax:  NAME[:key=value,key=value,...]
      * a value is read as JSON when it parses, else kept as text:
        limit=5 is the int 5, flag=true a bool, repo=. the text ".",
        title='"42"' the text "42" (quotes kept from the shell)
      * parameters are separated by commas; a value with a comma in it
        must be a JSON string (text='"hi, there"') or list (ids=[1,2])
      * relative paths in the parameters a step declares as paths (repo,
        store) are made absolute against this directory before submitting

    \b
    Examples:
      governor run --view .
      governor run --view . --users 25
      governor run --view ~/src/app --store /tmp/chat.sqlite3
      governor run git.status:repo=. git.log:repo=.,limit=5
      governor run chat.history:chat_id=1,limit=10
      governor run chat.send_message:chat_id=1,text='"hello, world"'
      governor run --json --timeout 2 git.current_branch:repo=.

    Exit status: 0 when every step is done, 1 when any failed, timed out or was
    cancelled, 2 for bad usage (an unknown step, parameters that do not fit).
    """
    if not steps and view_repo is None:
        raise click.UsageError("give at least one STEP, or --view [REPO]")
    store_path = os.path.abspath(os.path.expanduser(store)) if store is not None else None
    calls = []
    for text in steps:
        try:
            call = parse_step(text)
        except StepSyntaxError as error:
            error.param_hint = "STEP"
            raise
        # The paths the step declares (paths=) mean the caller's directory, not a worker's.
        kwargs = _REGISTRY.get(call.step).resolve_paths(call.kwargs, os.getcwd()) \
            if call.step in _STEP_NAMES else dict(call.kwargs)
        if store_path is not None and "store" not in kwargs and call.step in _STEP_NAMES \
                and "store" in _signature(_REGISTRY.get(call.step)).parameters:
            kwargs["store"] = store_path
        calls.append(attrs.evolve(call, kwargs=kwargs))
    view = None
    if view_repo is not None:
        view_store = store_path or os.path.abspath(chat.store_path())
        view = (os.path.abspath(os.path.expanduser(view_repo)), view_store, chat_id)
    elif chat_id is not None:
        raise click.UsageError("--chat applies to --view only")
    # The stores named on this command line are its user's own choice: let the steps use them.
    stores = [call.kwargs["store"] for call in calls if isinstance(call.kwargs.get("store"), str)]
    try:
        with chat.allowing_stores(stores + ([view[1]] if view else [])):
            report = execute(calls, workers=workers, timeout_s=timeout_s, view=view)
        crowded = crowd.run_crowd(users) if view is not None and users else None
    except GovernorError as error:  # e.g. WorkerStartFailed: no step could run at all
        raise click.ClickException(f"{type(error).__name__}: {error}") from error
    if as_json:
        click.echo(json.dumps({**report.to_json(), "crowd": crowded and crowded.to_json()}, indent=2, default=repr))
    else:
        click.echo(format_table(report) + ("\n\n" + "\n".join(crowded.lines()) if crowded else ""))
    if not report.ok:
        raise click.exceptions.Exit(1)


__all__ = ["RunReport", "StepRun", "StepSyntaxError", "execute", "format_table", "parse_step", "parse_value", "run"]
