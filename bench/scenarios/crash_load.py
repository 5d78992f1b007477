"""Scenario ``crash-load``: ``kill -9`` of the daemon under the load of many clients, then a
restart on the same journal; :data:`TRIALS` times.

Each trial starts ``governor serve`` and :data:`CLIENTS` clients, each on its own connection,
submitting one task at a time: a critical step (``ledger_once``, every :data:`CRITICAL_EVERY`
th task) or a pool step (``ledger_mark``). Each critical step waits at a gate of its own
until the trial opens it; once a random number of critical steps has started (a fixed
seed), the last of them is left at its closed gate and the daemon and its workers are
killed, so every kill cuts a critical step short; a new daemon then finishes the work. A
task counts as accepted once its submission was acknowledged (``submit`` returned its id).
Every run of a step leaves a trace (``bench/ledger_steps.py``): critical steps a start and
an end row in a SQLite ledger, pool steps a line in a text file, so what ran is counted,
not assumed. What must stay at zero, summed over the trials:

* lost: an accepted task that did not end ``done`` after the restart (or ``interrupted``,
  for the critical step running at the kill), or ended ``done`` without a trace of its run;
* run twice: a critical step started twice, or a pool step run again although the journal
  had its end when the daemon was killed;
* out of order: critical steps whose first starts are not in the order they were accepted.

Also counted, not a fault: pool steps run again after the restart (those running or sent
to a worker at the kill: read-only work is re-run rather than lost).

Runs only when named (``python -m governor.bench --scenario crash-load``).
"""

from __future__ import annotations

import concurrent.futures
import random
import signal
import time
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

import attrs
import psutil

from governor.bench import ledger_steps
from governor.bench.core import ScenarioContext, ScenarioResult, scenario
from governor.bench.scenarios.crash_keys import _journaled_done
from governor.bench.scenarios.daemon import _start_daemon
from governor.client import Client, DaemonUnavailable

#: Trials per run size, and each trial's clients and tasks per client (the daemon issue's
#: load: 50 clients).
TRIALS = {"full": 10, "quick": 10, "tiny": 2}
CLIENTS = {"full": 50, "quick": 50, "tiny": 5}
TASKS_PER_CLIENT = {"full": 40, "quick": 40, "tiny": 10}

#: One task in this many is a critical step.
CRITICAL_EVERY = 10

#: Pool workers of each daemon.
WORKERS = 4

#: How long a task may take to end after the restart: a deadlock detector.
WAIT_S = 120.0

#: Lost tasks described per trial (in the figures), at most.
LOST_EXAMPLES = 10

#: The plan's seed: the same kill points every run.
SEED = 25


@attrs.frozen
class Accepted:
    """A task whose submission the daemon acknowledged."""

    name: str
    task_id: int
    critical: bool


def _client(socket_path: Path, ledger: str, marks: str, gates: Path, number: int, tasks: int) -> List[Accepted]:
    """One client's submissions, one at a time, until done or the daemon dies."""
    accepted = []
    try:
        with Client(socket_path) as client:
            for n in range(tasks):
                name = f"c{number}t{n}"
                if n % CRITICAL_EVERY == 0:
                    future = client.submit("ledger_once", ledger=ledger, key="all", name=name,
                                           gate=str(gates / name))
                else:
                    future = client.submit("ledger_mark", path=marks, name=name)
                accepted.append(Accepted(name, future.task_id, n % CRITICAL_EVERY == 0))
    except DaemonUnavailable:
        pass  # killed: what was acknowledged before is what was accepted
    return accepted


def _kill_while_running(process, kill_after: int, ledger: str, gates: Path) -> None:
    """Open the gate of each critical step that starts, up to the ``kill_after``th: leave
    that one at its closed gate and kill the daemon and its workers. Polling the ledger
    rather than timing the kill makes sure a critical step is running when it lands (after
    :data:`WAIT_S` without enough starts it kills anyway, and the counts show it)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        started = ledger_steps.runs(ledger)
        _open(gates, started[:kill_after - 1])
        if len(started) >= kill_after:
            break
        time.sleep(0.005)
    workers = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGKILL)
    process.wait()
    psutil.wait_procs(workers, timeout=30)


def _open(gates: Path, names: Iterable[str]) -> None:
    for name in names:
        (gates / name).touch()


def trial(directory: Path, clients: int, tasks: int, kill_after: int) -> Tuple[Dict[str, int], List[str]]:
    """One trial (module docstring): its counts, and what each lost task looked like."""
    ledger, marks, gates = str(directory / "ledger.db"), str(directory / "marks.txt"), directory / "gates"
    gates.mkdir()
    process, socket_path = _start_daemon(directory, WORKERS, steps="governor.bench.ledger_steps")
    try:
        with concurrent.futures.ThreadPoolExecutor(clients + 1) as pool:
            killed = pool.submit(_kill_while_running, process, kill_after, ledger, gates)
            submitted = [pool.submit(_client, socket_path, ledger, marks, gates, number, tasks)
                         for number in range(clients)]
            accepted = [task for each in submitted for task in each.result()]
            killed.result()
        done_at_kill = _journaled_done(directory / "journal.sqlite3")
        # after the kill every gate opens: the new daemon runs the rest of the critical steps freely
        _open(gates, (f"c{number}t{n}" for number in range(clients) for n in range(0, tasks, CRITICAL_EVERY)))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    process, socket_path = _start_daemon(directory, WORKERS, steps="governor.bench.ledger_steps")
    try:
        with Client(socket_path) as client:
            states = {task.name: client.wait(task.task_id, timeout=WAIT_S)["state"] for task in accepted}
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    return _count(accepted, states, done_at_kill, ledger, marks)


def _count(accepted: List[Accepted], states: Dict[str, str], done_at_kill: set, ledger: str,
           marks: str) -> Tuple[Dict[str, int], List[str]]:
    starts, ends = ledger_steps.runs(ledger), set(ledger_steps.runs(ledger, "end"))
    pool_runs = ledger_steps.marks(marks)
    counts = {"accepted": len(accepted), "lost": 0, "run_twice": 0, "out_of_order": 0, "interrupted": 0,
              "pool_rerun": 0}
    lost = []
    for task in accepted:
        state = states[task.name]
        runs = starts.count(task.name) if task.critical else pool_runs.count(task.name)
        ran = task.name in ends if task.critical else runs > 0
        if not (state == "done" and ran or state == "interrupted" and task.critical):
            counts["lost"] += 1
            lost.append(f"task {task.task_id} ({'critical' if task.critical else 'pool'}): {state}, {runs} runs, "
                        f"{'done' if task.task_id in done_at_kill else 'not done'} in the journal at the kill")
        counts["interrupted"] += state == "interrupted"
        if task.critical:
            counts["run_twice"] += runs > 1
        else:
            counts["run_twice"] += runs > 1 and task.task_id in done_at_kill
            counts["pool_rerun"] += runs > 1 and task.task_id not in done_at_kill
    critical_ids = {task.name: task.task_id for task in accepted if task.critical}
    first_starts = [name for name in dict.fromkeys(starts) if name in critical_ids]
    counts["out_of_order"] = int(first_starts != sorted(first_starts, key=critical_ids.get))
    return counts, lost


@scenario("crash-load", named_only=True)
def crash_load(ctx: ScenarioContext) -> ScenarioResult:
    """kill -9 of the daemon under 50 clients: no accepted task lost, none run twice, critical order kept."""
    result, plan = ScenarioResult(), random.Random(SEED)
    trials, clients, tasks = TRIALS[ctx.size_name], CLIENTS[ctx.size_name], TASKS_PER_CLIENT[ctx.size_name]
    critical = clients * -(-tasks // CRITICAL_EVERY)
    totals: Dict[str, int] = {}
    for number in range(trials):
        kill_after = plan.randint(1, critical // 2)
        ctx.progress(f"trial {number + 1} of {trials}: {clients} clients, kill -9 after {kill_after} critical starts")
        directory = ctx.scratch / f"trial-{number}"
        directory.mkdir()
        counts, lost = trial(directory, clients, tasks, kill_after)
        result.row(f"trial {number + 1}, killed after {kill_after} critical starts",
                   ", ".join(f"{name} {value}" for name, value in counts.items()))
        if lost:  # what the lost tasks looked like, so that a failure explains itself
            result.put(f"lost_examples.trial_{number + 1}", lost[:LOST_EXAMPLES])
            result.row(f"trial {number + 1}, lost, e.g.", "; ".join(lost[:3]))
        for name, value in counts.items():
            totals[name] = totals.get(name, 0) + value
    for name, value in totals.items():
        result.put(f"totals.{name}", value, f"{name.replace('_', ' ')}, {trials} trials")
    for name in ("lost", "run_twice", "out_of_order"):
        result.target(f"{name.replace('_', ' ')} over {trials} trials", totals[name], 0, "")
    result.note(f"{clients} clients x {tasks} tasks, one at a time, every {CRITICAL_EVERY}th critical "
                f"(ledger_once), the rest pool steps (ledger_mark); {WORKERS} pool workers. 'pool rerun' counts "
                "pool steps run again after the restart because their end was not journaled at the kill.")
    return result
