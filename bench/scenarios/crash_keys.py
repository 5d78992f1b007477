"""Scenario ``crash-keys``: keyed critical work under ``governor serve``, the daemon killed
with ``kill -9`` in the middle, then restarted on the same journal; :data:`TRIALS` times.

Each trial submits :data:`KEYS` keys x :data:`STEPS` critical steps of :data:`STEP_MS`
(``--critical-workers`` = KEYS), interleaved key by key, half the keys idempotent
(``ledger_again``), half not (``ledger_once``). Once a random number of steps has started
(a fixed seed), the daemon and its workers are killed; a new daemon then finishes the
work. Every step appends its start and end to a SQLite ledger (``bench/ledger_steps.py``),
so what ran is counted, not assumed. What must stay at zero, summed over the trials:

* lost: a task that did not end ``done`` (or ``interrupted``, for a step that is not
  idempotent), or ended ``done`` without its step having run to its end;
* run twice: a step that is not idempotent with two starts, or one run again although the
  journal had its end when the daemon was killed;
* out of order: a key whose steps first started out of submission order, or started
  before the step before them had ended;
* wrongly settled: an idempotent step running at the kill that was not run again, or a
  step that is not idempotent running at the kill that was not ``interrupted``.

Also counted, not a fault: ``rerun_unjournaled``, idempotent steps that had returned when the
daemon was killed, their end not yet journaled, and so ran again (the window every
at-least-once queue has between a step's return and the record of it; a step that is not
idempotent is ``interrupted`` there instead).

Runs only when named (``python -m governor.bench --scenario crash-keys``).
"""

from __future__ import annotations

import random
import signal
import sqlite3
import time
from pathlib import Path
from typing import Dict, List, Tuple

import psutil

from governor.bench import ledger_steps
from governor.bench.core import ScenarioContext, ScenarioResult, scenario
from governor.bench.scenarios.daemon import _start_daemon
from governor.client import Client

#: Trials per run size (each starts two daemons: about 5-15 s on 2 shared cores).
TRIALS = {"full": 10, "quick": 10, "tiny": 2}

#: The issue's bar: 4 keys x 8 critical steps of 50 ms, one critical worker per key.
KEYS, STEPS, STEP_MS = 4, 8, 50.0

#: How long a task may take to end after the restart: a deadlock detector.
WAIT_S = 120.0

#: The plan's seed: the same kill points every run.
SEED = 24


def _submit(client: Client, ledger: str) -> Dict[str, int]:
    """Every step, key by key interleaved; their task ids by step name (``k0s3``...)."""
    ids = {}
    for step in range(STEPS):
        for key in range(KEYS):
            name = f"k{key}s{step}"
            future = client.submit("ledger_again" if key < KEYS // 2 else "ledger_once", ledger=ledger,
                                   key=f"k{key}", name=name, ms=STEP_MS)
            ids[name] = future.wait_for_id(WAIT_S)
    return ids


def _events(ledger: str) -> List[Tuple[str, str]]:
    db = sqlite3.connect(ledger, timeout=ledger_steps.LEDGER_BUSY_S)
    try:
        return list(db.execute("SELECT name, event FROM runs ORDER BY rowid"))
    finally:
        db.close()


def _kill(process, kill_after: int, ledger: str) -> Tuple[set, set, int]:
    """Kill the daemon and its workers once ``kill_after`` steps have started: the steps that
    had started and ended by then, and how many rows the ledger held."""
    while len(ledger_steps.runs(ledger)) < kill_after:
        time.sleep(0.005)
    workers = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGKILL)
    process.wait()
    psutil.wait_procs(workers, timeout=30)
    return set(ledger_steps.runs(ledger)), set(ledger_steps.runs(ledger, "end")), len(_events(ledger))


def _journaled_done(journal: Path) -> set:
    """The ids the journal of a killed daemon holds as done."""
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    try:
        return {task_id for (task_id,) in db.execute("SELECT id FROM tasks WHERE state = 'done'")}
    finally:
        db.close()


def _order_faults(events: List[Tuple[str, str]], names: List[str], rows_at_kill: int) -> int:
    """How often one key's steps broke their order: a step first started out of submission
    order, or started while another step of the key was running (allowed only right after
    the kill, for the step the kill cut short)."""
    faults, running = 0, None
    first_starts = list(dict.fromkeys(name for name, event in events if event == "start" and name in names))
    faults += first_starts != sorted(first_starts, key=names.index)
    for row, (name, event) in enumerate(events):
        if name not in names:
            continue
        if event == "start":
            faults += running is not None and row < rows_at_kill
            running = name
        else:
            running = None
    return faults


def trial(directory: Path, kill_after: int) -> Dict[str, int]:
    """One trial (module docstring); its counts."""
    ledger = str(directory / "ledger.db")
    process, socket_path = _start_daemon(directory, 1, steps="governor.bench.ledger_steps",
                                         extra_args=("--critical-workers", str(KEYS)))
    try:
        with Client(socket_path) as client:
            ids = _submit(client, ledger)
        started, ended, rows_at_kill = _kill(process, kill_after, ledger)
        done_at_kill = _journaled_done(directory / "journal.sqlite3")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    process, socket_path = _start_daemon(directory, 1, steps="governor.bench.ledger_steps",
                                         extra_args=("--critical-workers", str(KEYS)))
    try:
        with Client(socket_path) as client:
            states = {name: client.wait(task_id, timeout=WAIT_S)["state"] for name, task_id in ids.items()}
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    events = _events(ledger)
    starts = [name for name, event in events if event == "start"]
    ends = {name for name, event in events if event == "end"}
    counts = {"lost": 0, "run_twice": 0, "out_of_order": 0, "wrongly_settled": 0, "rerun": 0,
              "rerun_unjournaled": 0, "interrupted": 0, "running_at_kill": len(started - ended)}
    for name, state in states.items():
        idempotent = int(name[1]) < KEYS // 2
        running_at_kill = name in started and name not in ended
        counts["lost"] += not (state == "done" and name in ends or state == "interrupted" and not idempotent)
        again = starts.count(name) > 1
        counts["run_twice"] += again and (not idempotent or ids[name] in done_at_kill)
        counts["rerun"] += idempotent and again
        counts["rerun_unjournaled"] += idempotent and again and name in ended and ids[name] not in done_at_kill
        counts["interrupted"] += state == "interrupted"
        counts["wrongly_settled"] += running_at_kill and (
            starts.count(name) < 2 if idempotent else state != "interrupted")
    for key in range(KEYS):
        counts["out_of_order"] += _order_faults(events, [f"k{key}s{step}" for step in range(STEPS)], rows_at_kill)
    return counts


@scenario("crash-keys", named_only=True)
def crash_keys(ctx: ScenarioContext) -> ScenarioResult:
    """kill -9 of the daemon during 4 keys x 8 critical steps: none lost, none run twice, order kept."""
    result, plan = ScenarioResult(), random.Random(SEED)
    totals: Dict[str, int] = {}
    trials = TRIALS[ctx.size_name]
    for number in range(trials):
        kill_after = plan.randint(KEYS, KEYS * STEPS - KEYS)
        ctx.progress(f"trial {number + 1} of {trials}: kill -9 after {kill_after} steps started")
        directory = ctx.scratch / f"trial-{number}"
        directory.mkdir()
        counts = trial(directory, kill_after)
        result.row(f"trial {number + 1}, killed after {kill_after} starts",
                   ", ".join(f"{name} {value}" for name, value in counts.items()))
        for name, value in counts.items():
            totals[name] = totals.get(name, 0) + value
    for name, value in totals.items():
        result.put(f"totals.{name}", value, f"{name.replace('_', ' ')}, {trials} trials")
    for name in ("lost", "run_twice", "out_of_order", "wrongly_settled"):
        result.target(f"{name.replace('_', ' ')} over {trials} trials", totals[name], 0, "")
    result.note(f"{KEYS} keys x {STEPS} critical steps of {STEP_MS:g} ms, --critical-workers {KEYS}; keys "
                f"k0-k{KEYS // 2 - 1} idempotent. 'rerun' counts idempotent steps run again after the restart "
                "(those running at the kill), 'interrupted' the others that were running.")
    return result
