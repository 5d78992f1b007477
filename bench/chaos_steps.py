"""The steps of the ``chaos`` scenario, in a registry of their own (see ``scenarios/chaos.py``).

Steps that must be caught in the act announce their worker's pid in a marker file. Steps
that leave processes behind start them with :func:`spawn_children`, which tags every one
with the run's token and the task's index in its environment (``GOVERNOR_CHAOS``), so
the scenario can tell, by scanning the system, which task left which process running.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import time
from pathlib import Path

from governor.bench.core import SCRATCH_ROOT
from governor.steps import StepRegistry, current_context

registry = StepRegistry()

#: The environment variable that tags a process a chaos step started: ``TOKEN:INDEX``.
TAG = "GOVERNOR_CHAOS"

#: How long a tagged child lives if nothing kills it: long past any task, so a child that
#: outlives its task is seen as an orphan, and short enough that a run which crashed
#: before its cleanup leaves nothing on the machine for long.
CHILD_LIFETIME_S = 300


def _announce(marker: str) -> None:
    """Publish this worker's pid at ``marker`` atomically (write, then rename)."""
    Path(marker + ".tmp").write_text(str(os.getpid()))
    os.rename(marker + ".tmp", marker)


def spawn_children(tag: str) -> None:
    """Start three tagged ``sleep`` processes the way steps leave them behind: a child in the
    worker's process group, a child in a new session, and a daemon (double fork + setsid:
    the shell between exits, so the daemon is an orphan in a session of its own)."""
    env = dict(os.environ, **{TAG: tag})
    sleep = ["sleep", str(CHILD_LIFETIME_S)]
    subprocess.Popen(sleep, env=env)
    subprocess.Popen(sleep, env=env, start_new_session=True)
    subprocess.run(["sh", "-c", f"setsid {' '.join(sleep)} >/dev/null 2>&1 &"], env=env, check=True)


@registry.step(critical=False)
def ok(value: int, ms: float = 0.0, tag: str = ""):
    """An innocent step: sleep ``ms``, return ``value`` (with ``tag``, leave children running)."""
    if tag:
        spawn_children(tag)
    if ms:
        time.sleep(ms / 1000)
    return value


@registry.step(critical=False)
def crash(how: str, tag: str = ""):
    """Die on our own: ``"exit"`` (``os._exit``) or ``"segv"`` (a segfault), children first."""
    if tag:
        spawn_children(tag)
    if how == "segv":
        ctypes.string_at(0)
    os._exit(7)


@registry.step(critical=False, writes=[SCRATCH_ROOT])
def hang(marker: str, cooperative: bool = False, tag: str = ""):
    """Start children (with ``tag``), announce, then never end: spin, or with
    ``cooperative`` wait for a cancel and stop. Killed from outside, timed out or cancelled."""
    if tag:
        spawn_children(tag)
    if marker:
        _announce(marker)
    if cooperative:
        ctx = current_context()
        while not ctx.wait(0.01):
            pass
        ctx.check()
    while True:
        pass
