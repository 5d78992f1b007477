"""``governor run``: run steps once through an in-process Supervisor and show what they cost.

No daemon is involved: the command builds its own :class:`~governor.engine.supervisor.Supervisor`
over :func:`steps.builtin.default_registry`, and the ``with`` block shuts it down (cancelling
what runs if the command is interrupted). Data flow::

    argv ──> parse_step() per STEP ──> Call(name, kwargs, limits)   relative repo/store made absolute
         ──> Supervisor(...).check_call(call)   before any worker starts: UnknownStep or
                                                InvalidParameters become a UsageError (exit 2)
         ──> with Supervisor(...) as sup:
               [--view: git.refresh_index; a store without a chat: chat.create +
                chat.send_message; one after another, critical lane]
               ┌ rounds (default 5 when every step is read-only, else 1):
               │   the batch, submitted at once and awaited          timed: the batch total
               │   the same steps one after another in this process (spec.invoke), timed
               └ stop early when a step fails
         ──> a table (or --json) of medians, and the first batch's total; exit 0 when every
             step is done, else 1

A step's time is the worker's own (``Task.started_at`` to ``Task.ended_at``, both
``time.monotonic()`` in the worker); for a task that never reported them (killed, crashed)
it is the supervisor's dispatch to end.

Why rounds: the first batch runs in workers just forked, whose first call of a step pays
for what the fork left shared (copy-on-write faults, ~1 ms for ``chat.history``), while a
backend keeps its workers for thousands of switches. Alternating batch and comparison in
each round lets a noisy spell on the machine hit both alike; the first batch is still shown.
"""

from __future__ import annotations

import concurrent.futures
import difflib
import inspect
import json
import math
import os
import resource
import sqlite3
import statistics
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import attrs
import click

from governor.cli.options import parse_value
from governor.errors import GovernorError, InvalidParameters, StepCancelled, StepFailed, StepSkipped, UnknownStep
from governor.limits import Lane, Limits
from governor.engine.supervisor import Supervisor, default_workers
from governor.task import Call, Task
from governor.steps.builtin import chat, default_registry

#: The parameters that name paths on this machine. Workers resolve a relative path against
#: their own current directory, which need not be the caller's (a daemon's is not), so
#: these are made absolute here, at any depth (``task.execute`` nests step parameters).
PATH_PARAMS = frozenset({"repo", "store"})

#: How many messages ``--view`` shows, as a chat window would on opening.
VIEW_HISTORY_LIMIT = 50

#: What ``--view`` writes to a chat store that has no chat yet, so a first run shows a chat.
WELCOME_TITLE = "welcome"
WELCOME_TEXT = "hello from governor"

#: The most rounds ``--rounds`` takes: a few seconds of the view switch, not a soak test.
MAX_ROUNDS = 1000

#: Rounds of batch-then-comparison when every step is read-only and ``--rounds`` is not
#: given: enough for a median that one noisy round cannot move, at a few ms per round.
DEFAULT_ROUNDS = 5

#: The CPUs this process may run on: what a batch of CPU-bound steps can overlap.
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

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


def absolute_paths(value: Any, key: Optional[str] = None) -> Any:
    """``value`` with every string under a :data:`PATH_PARAMS` key made absolute, at any depth."""
    if isinstance(value, dict):
        return {k: absolute_paths(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [absolute_paths(item, key) for item in value]
    if key in PATH_PARAMS and isinstance(value, str) and value:
        return os.path.abspath(os.path.expanduser(value))
    return value


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
class Sequential:
    """The same steps one after another in this process, as the old registry ran them.

    Attributes:
        total_ms: the sum (over several rounds, the median of the rounds' sums), or
            ``None`` when the comparison was skipped.
        rerun: the steps called again in this process (the read-only ones).
        counted: the state-changing steps whose worker time stands in for a re-run.
        skipped_because: why there is no comparison, if there is none.
        cpu_ms: the CPU time the re-run steps used, in this process and in the processes
            they started and waited for (git): with :data:`CPUS` CPUs, no batch of them can
            take less than ``cpu_ms / CPUS``.
    """

    total_ms: Optional[float]
    rerun: Tuple[str, ...] = ()
    counted: Tuple[str, ...] = ()
    skipped_because: Optional[str] = None
    cpu_ms: Optional[float] = None


@attrs.frozen
class RunReport:
    """Everything ``governor run`` prints.

    Attributes:
        setup: the ``--view`` setup steps (the index refresh, and the welcome chat when
            the store had none).
        steps: the batch's steps, in the order given (the last round's).
        batch_ms: the batch's wall clock, from the first submit to the last result; over
            several rounds, the median.
        sequential: the one-after-another comparison.
        workers: the supervisor's pool workers.
        startup_ms: how long the supervisor took to have every worker warm.
        view: the ``--view`` repository and chat store, or ``None``.
        rounds: the rounds run (fewer than asked when a step failed; the figures are then
            that round's alone).
        first_batch_ms: the first round's batch, in workers that had run nothing yet.
    """

    setup: Tuple[StepRun, ...]
    steps: Tuple[StepRun, ...]
    batch_ms: Optional[float]
    sequential: Sequential
    workers: int
    startup_ms: float
    view: Optional[Dict[str, Any]] = None
    rounds: int = 1
    first_batch_ms: Optional[float] = None

    @property
    def ok(self) -> bool:
        """Whether every step, setup included, succeeded."""
        return all(run.ok for run in (*self.setup, *self.steps))

    def to_json(self) -> Dict[str, Any]:
        """The ``--json`` document."""
        sequential = self.sequential
        return {
            "ok": self.ok,
            "view": self.view,
            "setup": [run.to_json() for run in self.setup],
            "steps": [run.to_json() for run in self.steps],
            "totals": {
                "batch_ms": _rounded(self.batch_ms),
                "first_batch_ms": _rounded(self.first_batch_ms),
                "rounds": self.rounds,
                "sequential_ms": _rounded(sequential.total_ms),
                "sequential_rerun": list(sequential.rerun),
                "sequential_counted_from_workers": list(sequential.counted),
                "sequential_skipped_because": sequential.skipped_because,
                "sequential_cpu_ms": _rounded(sequential.cpu_ms),
                "cpus": CPUS,
                "saved_ms": _rounded(_saved(self.batch_ms, sequential.total_ms)),
                "startup_ms": _rounded(self.startup_ms),
                "workers": self.workers,
            },
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


def _saved(batch_ms: Optional[float], sequential_ms: Optional[float]) -> Optional[float]:
    return None if batch_ms is None or sequential_ms is None else sequential_ms - batch_ms


# ----------------------------------------------------------------------------- running


def _newest_chat(store: str) -> Optional[int]:
    """The id of the newest chat in ``store``, or ``None`` when it has none (or does not exist).

    Read here, directly: creating the file or its schema is left to the steps.
    """
    if not os.path.isfile(store):
        return None
    connection = sqlite3.connect(store, timeout=chat.BUSY_TIMEOUT_S)
    try:
        row = connection.execute("SELECT max(id) FROM chats").fetchone()
    except sqlite3.DatabaseError:  # no chats table yet (or not a chat store: the steps will say)
        return None
    finally:
        connection.close()
    return row[0] if row else None


def _run_sequential(registry: Any, runs: Sequence[StepRun]) -> Sequential:
    """Time the steps one after another in this process, calling each spec's ``invoke``.

    Read-only (pool) steps are called again. State-changing (critical) ones are not, since
    that would repeat their writes (a second message sent): their worker time is counted.
    Nothing is re-run unless every step succeeded, so a step that hung or failed is not
    run again without a limit here.
    """
    if not runs:
        return Sequential(None, skipped_because="no steps")
    if not all(run.ok for run in runs):
        return Sequential(None, skipped_because="not every step succeeded")
    total_s, cpu_s, rerun, counted = 0.0, 0.0, [], []
    for run in runs:
        if run.lane == Lane.CRITICAL.value:
            total_s += (run.time_ms or 0.0) / 1000
            counted.append(run.step)
            continue
        spec = registry.get(run.step)
        cpu_start, start = _cpu_s(), time.perf_counter()
        try:
            spec.invoke((), dict(run.params))
        except Exception as exc:  # it succeeded in its worker; report, do not fail the run
            return Sequential(None, skipped_because=f"{run.step} raised {type(exc).__name__} in this process: {exc}")
        total_s += time.perf_counter() - start
        cpu_s += _cpu_s() - cpu_start
        rerun.append(run.step)
    return Sequential(total_s * 1000, tuple(rerun), tuple(counted), cpu_ms=cpu_s * 1000 if rerun else None)


def _cpu_s() -> float:
    """CPU seconds used by this process and by the children it has waited for."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _median_sequential(rounds: Sequence[Sequential]) -> Sequential:
    """One :class:`Sequential` for rounds that all succeeded: the median total, the first round's lists."""
    first = rounds[0]
    if first.total_ms is None:
        return first
    cpu = [round_.cpu_ms for round_ in rounds if round_.cpu_ms is not None]
    return attrs.evolve(first, total_ms=statistics.median(round_.total_ms for round_ in rounds),
                        cpu_ms=statistics.median(cpu) if cpu else None)


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
            view: Optional[Tuple[str, str, Optional[int]]] = None, rounds: Optional[int] = None) -> RunReport:
    """Run ``calls`` (after the ``--view`` steps, if ``view``) through an in-process Supervisor.

    Args:
        calls: the steps, as parsed (paths already absolute).
        workers: pool workers (default: one per pool step, at most :func:`default_workers`).
        timeout_s: a per-step timeout for this run, on top of each step's own limits.
        view: ``(repo, store, chat_id)`` (absolute paths; ``chat_id`` ``None`` for the
            newest chat) to run the view switch first.
        rounds: how many times to run the batch and the comparison, alternating (default
            :data:`DEFAULT_ROUNDS` when every step is read-only, else 1).

    Returns:
        the :class:`RunReport`.

    Raises:
        click.UsageError: an unknown step or bad parameters, before any worker starts; or
            more than one round of a state-changing step (its writes would repeat).
    """
    registry = default_registry()
    limits = None if timeout_s is None else Limits(timeout_s=timeout_s)
    chat_id = None
    if view is not None:
        chat_id = view[2] if view[2] is not None else _newest_chat(view[1])
    # The view's calls need the chat id, which setup may only learn from chat.create: the
    # placeholder 1 checks their parameters now; they are rebuilt after setup.
    view_calls = [] if view is None else _view_calls(view[0], view[1], chat_id or 1)
    planned = [attrs.evolve(call, limits=limits) for call in (*view_calls, *calls)]
    pool_steps = sum(registry.classify(call.step).lane is Lane.POOL for call in planned if call.step in registry)
    workers = workers or max(1, min(default_workers(), pool_steps))
    rounds = _rounds(rounds, planned, registry)
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
                    return RunReport(tuple(setup), (), None, Sequential(None, skipped_because="setup failed"),
                                     workers, startup_ms, _view_json(view, chat_id), rounds=0)
                view_calls = _view_calls(view[0], view[1], chat_id)
            batch = [attrs.evolve(call, limits=limits) for call in (*view_calls, *calls)]
            batches: List[Tuple[float, List[StepRun]]] = []
            comparisons: List[Sequential] = []
            for _ in range(rounds):
                batches.append(_run_batch(sup, batch))
                comparisons.append(_run_sequential(registry, batches[-1][1]))
                if comparisons[-1].total_ms is None:  # a step failed: do not run it again
                    break
        except BaseException:
            # Interrupted (Ctrl-C): stop the steps rather than wait for them to end.
            sup.shutdown(wait=True, cancel_futures=True, cancel_running=True)
            raise
    first_batch_ms, rounds_run = batches[0][0], len(batches)
    if comparisons[-1].total_ms is None:  # a step failed: report that round, which shows why
        batches, comparisons = batches[-1:], comparisons[-1:]
    runs = _median_times(batches[-1][1], [runs for _, runs in batches])
    return RunReport(tuple(setup), tuple(runs), statistics.median(ms for ms, _ in batches),
                     _median_sequential(comparisons), workers, startup_ms, _view_json(view, chat_id),
                     rounds=rounds_run, first_batch_ms=first_batch_ms)


def _rounds(asked: Optional[int], planned: Sequence[Call], registry: Any) -> int:
    """The rounds to run: ``asked``, else :data:`DEFAULT_ROUNDS` when nothing would repeat a write."""
    critical = [call.step for call in planned
                if call.step in registry and registry.classify(call.step).lane is Lane.CRITICAL]
    if asked is None:
        return 1 if critical else DEFAULT_ROUNDS
    if asked > 1 and critical:
        raise click.UsageError(f"--rounds {asked} would repeat {critical[0]}, which changes state: "
                               "only read-only steps run in several rounds")
    return asked


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


def _median_times(last: Sequence[StepRun], rounds: Sequence[Sequence[StepRun]]) -> List[StepRun]:
    """The last round's rows, each step's time the median of its rounds."""
    if len(rounds) == 1:
        return list(last)
    medians = []
    for position, run in enumerate(last):
        times = [runs[position].time_ms for runs in rounds if runs[position].time_ms is not None]
        medians.append(attrs.evolve(run, time_ms=statistics.median(times) if times else None))
    return medians


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
        times = "" if report.rounds <= 1 else f"; times are medians of {report.rounds} rounds"
        sections.append((f"{title}: one batch, submitted at once{times}", report.steps))
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
    out.append("")
    seq = report.sequential
    median = ", median" if report.rounds > 1 else ""

    def total(label: str, value: str, note: str = "") -> str:
        return f"{label:<42}{value:>12}{note}"

    if report.rounds > 1:
        out.append(total("first batch (workers' first steps)", _format_ms(report.first_batch_ms)))
    out.append(total(f"batch total (wall clock{median})", _format_ms(report.batch_ms)))
    if seq.total_ms is None:
        out.append(total("one after another (this process)", "—", f"  ({seq.skipped_because})"))
    else:
        note = "" if not seq.counted else f"  ({', '.join(seq.counted)}: worker time, not re-run)"
        out.append(total(f"one after another (this process{median})", _format_ms(seq.total_ms), note))
        saved = _saved(report.batch_ms, seq.total_ms)
        speedup = f" ({seq.total_ms / report.batch_ms:.1f}x)" if report.batch_ms else ""
        if saved >= 0:
            out.append(total("saved by the parallel batch", _format_ms(saved), speedup))
        else:
            out.append(total("the batch took longer by", _format_ms(-saved), speedup))
        if seq.cpu_ms is not None:  # why a batch of CPU-bound steps gains little on few CPUs
            out.append(total("CPU time one after another (with git's)", _format_ms(seq.cpu_ms),
                             f"  (on {CPUS} CPU{'s' if CPUS != 1 else ''}: no batch of these steps under "
                             f"{_format_ms(seq.cpu_ms / CPUS)})"))
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
@click.option("--rounds", type=click.IntRange(min=1, max=MAX_ROUNDS), default=None,
              help=f"Run the batch and the one-after-another comparison this many times, alternating, "
                   f"and show medians (default: {DEFAULT_ROUNDS} when every step is read-only, else 1; "
                   "a state-changing step is never repeated).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document (steps, results, totals) instead "
                                                     "of the table.")
def run(steps: Tuple[str, ...], view_repo: Optional[str], store: Optional[str], chat_id: Optional[int],
        workers: Optional[int], timeout_s: Optional[float], rounds: Optional[int], as_json: bool) -> None:
    """Run STEPs through an in-process Supervisor and show what each cost.

    No daemon is needed: the command starts its own Supervisor over the built-in steps,
    submits the STEPs as one batch (read-only steps in parallel in the pool lane,
    state-changing ones in order in the critical lane), and prints one row per step: its
    lane, final status, time in its worker and peak memory. The batch's wall clock is
    compared with the same steps run one after another in this process, as a plain
    registry would (read-only steps are called again; state-changing ones are not
    repeated, and count with their worker time). Read-only steps run in several rounds
    (--rounds), batch and comparison alternating, and the table shows medians next to
    the first batch, whose workers had run nothing yet.

    \b
    STEP syntax:  NAME[:key=value,key=value,...]
      * a value is read as JSON when it parses, else kept as text:
        limit=5 is the int 5, flag=true a bool, repo=. the text ".",
        title='"42"' the text "42" (quotes kept from the shell)
      * parameters are separated by commas; a value with a comma in it
        must be a JSON string (text='"hi, there"') or list (ids=[1,2])
      * relative repo and store paths are made absolute before submitting

    \b
    Examples:
      governor run --view .
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
        kwargs = absolute_paths(call.kwargs)
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
            report = execute(calls, workers=workers, timeout_s=timeout_s, view=view, rounds=rounds)
    except GovernorError as error:  # e.g. WorkerStartFailed: no step could run at all
        raise click.ClickException(f"{type(error).__name__}: {error}") from error
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, default=repr))
    else:
        click.echo(format_table(report))
    if not report.ok:
        raise click.exceptions.Exit(1)


__all__ = ["RunReport", "Sequential", "StepRun", "StepSyntaxError", "absolute_paths", "execute", "format_table",
           "parse_step", "parse_value", "run"]
