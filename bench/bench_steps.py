"""The steps the benchmark runs, in a registry of their own.

They live at module level so worker processes import them by reference, and they are
plain functions, so the same objects serve the Supervisor (by registered name) and the
peers (loky, the stdlib pool, pebble: by function). Steps that must be caught in the act
(a busy loop to cancel, workers to measure while they hold a task) announce themselves by
writing their pid to a marker file: a cross-process event, not a sleep.

Timestamps the steps return are ``time.monotonic()`` readings, which on Linux come from
the system-wide ``CLOCK_MONOTONIC`` and so compare directly with the supervisor's clock.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from governor.bench.core import SCRATCH_ROOT
from governor.steps import StepRegistry, current_context
from governor.steps.builtin import default_registry

registry = StepRegistry()

#: The three steps of the view switch, in ms: chat history, git status, current branch.
VIEW_SWITCH_MS = (117, 19, 9)

#: How often the cooperative step polls its context. 1 ms makes its stop latency a
#: property of the governor rather than of the step, at ~1 % of a core while it waits.
COOPERATIVE_POLL_S = 0.001

#: How often a held step looks for its release file. 5 ms keeps ten waiting workers well
#: under 1 % of a core each; the release is not timed, so its latency does not matter.
HOLD_POLL_S = 0.005


def _announce(marker: str) -> None:
    """Publish this worker's pid at ``marker`` atomically (write, then rename)."""
    if marker:
        Path(marker + ".tmp").write_text(str(os.getpid()))
        os.rename(marker + ".tmp", marker)


@registry.step(critical=False)
def noop():
    """Do nothing: the round trip is all overhead."""
    return None


@registry.step(critical=False)
def echo(value):
    """Return ``value``: a no-op that takes one argument, for ``map``."""
    return value


@registry.step(critical=False)
def sleep_ms(ms: float):
    """Sleep ``ms`` milliseconds (an I/O-bound step) and return the worker's pid."""
    time.sleep(ms / 1000)
    return os.getpid()


@registry.step(name="chat.history", critical=False)
def chat_history():
    """The slowest step of the view switch."""
    return sleep_ms(VIEW_SWITCH_MS[0])


@registry.step(name="git.status", critical=False)
def git_status():
    """The middle step of the view switch."""
    return sleep_ms(VIEW_SWITCH_MS[1])


@registry.step(name="git.current_branch", critical=False)
def git_current_branch():
    """The fastest step of the view switch."""
    return sleep_ms(VIEW_SWITCH_MS[2])


#: The built-in steps, for :func:`builtin`.
_BUILTIN = default_registry()


@registry.step(critical=False)
def builtin(step: str, kwargs: dict):
    """Run the built-in step ``step`` with ``kwargs``: how a peer pool runs the real view."""
    return _BUILTIN.get(step).invoke((), kwargs)


#: The view switch as the old registry ran it: these functions, one after another.
VIEW_SWITCH_STEPS = (("chat.history", chat_history), ("git.status", git_status),
                     ("git.current_branch", git_current_branch))


@registry.step(critical=False)
def started_at():
    """Return the worker's ``time.monotonic()`` as the step starts (a timestamped no-op)."""
    return time.monotonic()


@registry.step(critical=False, writes=[SCRATCH_ROOT])
def busy(marker: str = ""):
    """Announce, then spin in Python forever: a step that never looks at its context."""
    _announce(marker)
    while True:
        pass


@registry.step(critical=False, writes=[SCRATCH_ROOT])
def cooperative(marker: str = ""):
    """Announce, then poll ``current_context().cancelled`` until cancelled; stop by raising."""
    _announce(marker)
    ctx = current_context()
    while not ctx.cancelled:
        time.sleep(COOPERATIVE_POLL_S)
    ctx.check()


@registry.step(critical=False)
def allocate(chunk_mb: int, pause_s: float, total_mb: int):
    """Allocate ``chunk_mb`` MiB (every page touched) every ``pause_s`` up to ``total_mb``."""
    chunks = []
    for _ in range(total_mb // chunk_mb):
        chunks.append(bytearray(chunk_mb * 2 ** 20))
        time.sleep(pause_s)
    return len(chunks)


@registry.step(critical=False, writes=[SCRATCH_ROOT])
def hold(marker: str, release: str):
    """Announce at ``marker``, then hold the worker until the file ``release`` exists."""
    _announce(marker)
    ctx = current_context()
    while not os.path.exists(release):
        if ctx.wait(HOLD_POLL_S):
            ctx.check()
    return os.getpid()
