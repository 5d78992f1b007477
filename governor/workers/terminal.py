"""Workers hold no terminal (issue 27): stdin from /dev/null, a terminal's output through a pipe.

A worker that holds the user's terminal as fd 0, 1 or 2 can queue keystrokes into it
(``ioctl(TIOCSTI)``, where ``legacy_tiocsti`` is 1 or as root) that the user's shell runs
once the program ends; a worker in a session of its own has no *controlling* terminal,
but an inherited descriptor is enough. So the template, before it forks any worker::

    fd 0 ──> /dev/null                               (workers never read the user's input)
    fd 1, 2: a terminal? ──> a pipe's write end       (every worker inherits the pipe)
             the template ── read end ──> copy ──> the terminal (a descriptor only it keeps)
    fd 1, 2: a file or a pipe already ──> left as it is (workers write to it directly)

What a step prints still reaches the terminal, through the template, in the order each
worker wrote it; the lines of two workers interleave as they would on the terminal.
"""

from __future__ import annotations

import os
from typing import Dict, List

#: What the template reads off a pipe at once.
CHUNK_BYTES = 65536


class TerminalForward:
    """The template's pipes standing in for its terminal outputs, and their copying."""

    def __init__(self, terminals: Dict[int, int]):
        #: read end of a pipe ──> the terminal descriptor its output goes to
        self._terminals = terminals

    @classmethod
    def install(cls) -> "TerminalForward":
        """Point this process's fd 0 at /dev/null and each terminal among fd 1, 2 at a pipe."""
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        terminals = {}
        for fd in (1, 2):
            if os.isatty(fd):
                read_end, write_end = os.pipe()
                terminals[read_end] = os.dup(fd)
                os.dup2(write_end, fd)
                os.close(write_end)
        return cls(terminals)

    @property
    def readers(self) -> List[int]:
        """The read ends to wait on."""
        return list(self._terminals)

    @property
    def descriptors(self) -> List[int]:
        """Every descriptor of ours: a forked worker closes them (the terminal among them)."""
        return [*self._terminals, *self._terminals.values()]

    def copy(self, read_end: int) -> None:
        """Copy what is waiting on ``read_end`` to its terminal. A terminal that is gone
        (hung up) drops the output: the pipe is still drained, so no worker blocks on it."""
        data = os.read(read_end, CHUNK_BYTES)
        terminal = self._terminals[read_end]
        try:
            while data:
                data = data[os.write(terminal, data):]
        except OSError:
            pass
