"""What the ``governor`` commands share: options declared once, and how a typed value is read.

Light on purpose: the client commands import this module, and a client command must not pay
for the engine (loky, psutil, the supervisor) it never runs.

``--socket`` is accepted on the group and on every command that talks to the daemon (or is
the daemon): ``governor --socket S status`` and ``governor status --socket S`` are the same.
Each occurrence records the path on the :class:`LazyClient` in ``ctx.obj``; the command's
own comes last, so it wins. ``GOVERNOR_SOCKET`` is read where the path is used, not by click,
so that it never overrides a ``--socket`` given before the command.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import click

from governor import errors
from governor.cli.exits import client_error

T = TypeVar("T")

#: The environment variable naming the daemon's socket when no ``--socket`` is given.
SOCKET_ENV_VAR = "GOVERNOR_SOCKET"


class LazyClient:
    """The daemon's client for one command, opened on first use.

    It knows where the daemon listens from the start (``--socket``), and connects only when
    a command first asks: ``--help`` and usage errors never need a daemon.

    Attributes:
        socket_path: the ``--socket`` given last (group or command), or ``None``.
    """

    def __init__(self) -> None:
        self.socket_path: Optional[Path] = None
        self._client = None

    def resolved_socket(self) -> Optional[Path]:
        """``--socket``, else ``$GOVERNOR_SOCKET``, else ``None`` (the default path)."""
        if self.socket_path is not None:
            return self.socket_path
        from_env = os.environ.get(SOCKET_ENV_VAR)
        return Path(from_env) if from_env else None

    def client(self):
        """The connected :class:`~governor.client.Client` (``DaemonUnavailable`` if none listens)."""
        if self._client is None:
            from governor.client import Client

            self._client = Client(self.resolved_socket())
        return self._client

    def ask(self, request: Callable[[Any], T]) -> T:
        """``request(client)``, with Governor's errors turned into exit-coded click errors.

        Raises:
            GovernorClickError: the error's row of :data:`~governor.cli.exits.EXIT_STATUSES`.
        """
        try:
            return request(self.client())
        except errors.GovernorError as error:
            raise client_error(error) from None

    def close(self) -> None:
        """Close the client, if one was opened."""
        if self._client is not None:
            self._client.close()
            self._client = None


#: Passes the command's :class:`LazyClient` (made on first use) as the first argument.
pass_client = click.make_pass_decorator(LazyClient, ensure=True)


def _remember_socket(ctx: click.Context, param: click.Parameter, value: Optional[Path]) -> None:
    if value is not None:
        ctx.ensure_object(LazyClient).socket_path = value


#: ``--socket PATH``, for the group and for each command that reaches the daemon.
socket_option = click.option(
    "--socket", type=click.Path(dir_okay=False, path_type=Path), default=None, expose_value=False,
    callback=_remember_socket, metavar="PATH",
    help=f"The daemon's Unix socket [default: ${SOCKET_ENV_VAR}, else $XDG_RUNTIME_DIR/governor/governor.sock, "
         "else a per-user temp dir].")

#: ``--json``, for each command that prints records: machine-readable output instead of text.
json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print JSON (times as local ISO 8601) instead of text.")

#: ``--cancel-on-interrupt``, for each command that waits for tasks.
cancel_on_interrupt_option = click.option(
    "--cancel-on-interrupt", is_flag=True,
    help="On Ctrl-C, cancel the tasks waited for (by default they go on; either way, exit 130).")


def parse_value(raw: str) -> Any:
    """``raw`` as JSON if it parses, else ``raw`` itself (so ``5`` is an int, ``.`` a str)."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def deprecated(new: str, meaning: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A callback that accepts an option's old name and says, on stderr, which one to use."""

    def warn(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is not None:
            click.echo(f"warning: {param.opts[0]} is deprecated: use {new} ({meaning})", err=True)
        return value

    return warn


_SECONDS = click.FloatRange(min=0, min_open=True)


def limit_options(command: Callable) -> Callable:
    """``--timeout`` and ``--max-memory``: the task's own limits, enforced by killing it.

    ``--limit-timeout``, the old name of ``--timeout``, is still accepted with a warning.
    """
    for option in reversed([
        click.option("--timeout", "timeout_s", type=_SECONDS, default=None, metavar="SECONDS",
                     help="This task's own time limit: past it the task is killed (exit 4). "
                          "To stop waiting and leave the task running, see --wait-timeout."),
        click.option("--max-memory", "max_memory_mb", type=click.FloatRange(min=0, min_open=True), default=None,
                     metavar="MIB", help="This task's memory limit: over this RSS (its whole process tree) "
                                         "the task is killed (exit 5)."),
        click.option("--limit-timeout", "old_limit_timeout", type=_SECONDS, default=None, hidden=True,
                     callback=deprecated("--timeout", "the task's own time limit")),
    ]):
        command = option(command)
    return command


def limits_from_options(timeout_s: Optional[float], max_memory_mb: Optional[float],
                        old_limit_timeout: Optional[float] = None):
    """The :class:`~governor.limits.Limits` that :func:`limit_options` asked for, or ``None`` for none.

    Raises:
        click.UsageError: ``--timeout`` and its old name both given.
        click.BadParameter: a figure the supervisor cannot enforce.
    """
    if timeout_s is not None and old_limit_timeout is not None:
        raise click.UsageError("--limit-timeout is the old name of --timeout: give --timeout alone")
    timeout_s = timeout_s if timeout_s is not None else old_limit_timeout
    if timeout_s is None and max_memory_mb is None:
        return None
    from governor.limits import Limits

    try:
        return Limits(timeout_s=timeout_s, max_memory_mb=max_memory_mb)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--timeout/--max-memory") from None


def wait_timeout_option(command: Callable) -> Callable:
    """``--wait-timeout``, for each command that waits: how long to wait, not how long the task may run."""
    return click.option("--wait-timeout", type=_SECONDS, default=None, metavar="SECONDS",
                        help="Give up waiting after SECONDS in all (exit 10); the tasks go on.")(command)
