"""Steps that write down what they did, in a registry of their own: critical steps in a SQLite
ledger, for the ``crash-keys`` and ``crash-load`` scenarios (``scenarios/crash_keys.py``,
``scenarios/crash_load.py``) and the tests of crash recovery; a pool step in a text file
(``ledger_mark``: pool workers may write only beneath the bench's scratch root).

A step appends a "start" row as it begins and an "end" row as it returns, so "run twice"
is counted (two "start" rows of one name), not assumed. The ledger is a file of its own,
written by the critical lane's workers (which are not sandboxed), each row committed.
"""

from __future__ import annotations

import os
import sqlite3
import time
from typing import List

from governor.bench.core import SCRATCH_ROOT
from governor.steps import StepRegistry

registry = StepRegistry()

#: How long a step waits for the ledger's lock held by another step's commit.
LEDGER_BUSY_S = 60.0


def record(ledger: str, name: str, event: str) -> None:
    """Append ``(name, event)`` to the ledger at ``ledger``, committed before it returns."""
    db = sqlite3.connect(ledger, timeout=LEDGER_BUSY_S)
    try:
        with db:
            db.execute("CREATE TABLE IF NOT EXISTS runs (name TEXT, event TEXT, pid INTEGER, at REAL)")
            db.execute("INSERT INTO runs VALUES (?, ?, ?, ?)", (name, event, os.getpid(), time.time()))
    finally:
        db.close()


def runs(ledger: str, event: str = "start") -> List[str]:
    """The names the ledger holds for ``event``, in the order they were written."""
    if not os.path.exists(ledger):
        return []
    db = sqlite3.connect(ledger, timeout=LEDGER_BUSY_S)
    try:
        return [name for (name,) in db.execute("SELECT name FROM runs WHERE event = ? ORDER BY rowid", (event,))]
    except sqlite3.OperationalError:  # no table yet: nothing has run
        return []
    finally:
        db.close()


def _run(ledger: str, name: str, ms: float, gate: str) -> str:
    record(ledger, name, "start")
    time.sleep(ms / 1000)
    while gate and not os.path.exists(gate):  # the step's work, held until its caller opens the gate
        time.sleep(0.01)
    record(ledger, name, "end")
    return name


@registry.step(critical=True, key="key", idempotent=True)
def ledger_again(ledger: str, key: str, name: str, ms: float = 0.0, gate: str = "") -> str:
    """An idempotent state-changing step of ``key``: logs its start, works ``ms``, waits for
    the file ``gate`` (when given), logs its end; returns ``name``."""
    return _run(ledger, name, ms, gate)


@registry.step(critical=True, key="key")
def ledger_once(ledger: str, key: str, name: str, ms: float = 0.0, gate: str = "") -> str:
    """:func:`ledger_again`, not idempotent: never run again after a crash."""
    return _run(ledger, name, ms, gate)


@registry.step(critical=False, writes=[SCRATCH_ROOT])
def ledger_mark(path: str, name: str) -> str:
    """A read-only (pool) step that leaves a trace of every run: appends ``name`` as a line
    to the text file ``path`` (one ``O_APPEND`` write: lines of concurrent runs never mix)."""
    with open(path, "a") as marks:
        marks.write(name + "\n")
    return name


def marks(path: str) -> List[str]:
    """The names :func:`ledger_mark` wrote to ``path``, one per run."""
    if not os.path.exists(path):
        return []
    with open(path) as lines:
        return lines.read().split()
