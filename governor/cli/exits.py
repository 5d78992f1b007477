"""How every ``governor`` command ends: one table of exit statuses, and Governor's errors mapped onto it.

A script tells outcomes apart by the exit status alone: a task's end (done 0, failed 1,
timed out 4, ...), the daemon's refusal (8, 9, 13), or a start-up failure (14, 15, 16). An error
from the client becomes a :class:`GovernorClickError`, which click prints as ``Error: ...``
and exits with its row's code.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence

import attrs
import click

from governor import errors


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
    ExitStatus("still_running", 10, "--wait-timeout passed first; the task goes on"),
    ExitStatus("skipped", 11, "a task was skipped (an earlier workflow step failed)"),
    ExitStatus("interrupted", 12, "the daemon died while a critical task ran"),
    ExitStatus("unknown_task", 13, "no such task (status, cancel, wait)"),
    ExitStatus("cannot_start", 14, "serve: it cannot start (socket directory, metrics address, steps)"),
    ExitStatus("already_running", 15, "serve: a daemon already has that socket or journal"),
    ExitStatus("journal_unusable", 16, "serve: the journal cannot be opened read-write, or is not SQLite"),
    ExitStatus("aborted", 130, "Ctrl-C while waiting; the tasks go on unless --cancel-on-interrupt"),
)

#: Exit status by name (see :data:`EXIT_STATUSES`).
EXIT_CODES = {status.name: status.code for status in EXIT_STATUSES}

#: Governor's refusals, each with its row; any other Governor error is "failed".
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


def client_error(error: BaseException) -> GovernorClickError:
    """``error`` (raised by the client) as the click error of its row in :data:`EXIT_STATUSES`."""
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


def exit_status(records: Sequence[Dict[str, Any]]) -> int:
    """The exit status of the first task (in the order given) that did not end done; else 0."""
    for record in records:
        state = record["state"] if record.get("final", True) else "still_running"
        if state != "done":
            return EXIT_CODES.get(state, EXIT_CODES["failed"])
    return EXIT_CODES["done"]


def exit_statuses_epilog() -> str:
    """The table as ``governor --help`` ends with it."""
    return "\n".join(["\b", "Exit status (every command):"]
                     + [f"  {status.code:>3}  {status.name:<19} {status.meaning}" for status in EXIT_STATUSES])
