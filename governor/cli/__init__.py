"""The ``governor`` command line: a thin click layer over the engine, the daemon and its client.

``main`` is the entry point (``governor`` and ``python -m governor``); the commands live in
:mod:`~governor.cli.commands`, ``governor run`` in :mod:`~governor.cli.run` and ``governor top``
in :mod:`~governor.cli.top`, each imported only by the command that needs it. ``EXIT_CODES``
is the exit status of each outcome, shared by every command.
"""

from governor.cli.commands import main
from governor.cli.exits import EXIT_CODES, EXIT_STATUSES

__all__ = ["EXIT_CODES", "EXIT_STATUSES", "main"]
