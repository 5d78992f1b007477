"""Run a function in a forked child held by a real Landlock sandbox, and bring back what happened.

The sandbox is for life, so it is never applied to the test process: each call forks, the
child applies the policy, runs the function, sends ``(report, outcome)`` back through a
pipe by pickle and leaves with ``os._exit``; the parent reaps it before returning.
"""

from __future__ import annotations

import os
import pickle
import traceback
from typing import Any, Callable

import attrs
import pytest

from governor.workers import sandbox

ABI = sandbox.abi_version()

#: Skips a test, saying why, on a kernel without Landlock (or without the ABI it needs).
needs_landlock = pytest.mark.skipif(ABI < 1, reason="this kernel offers no Landlock")


def needs_abi(abi: int, what: str):
    return pytest.mark.skipif(ABI < abi, reason=f"{what} needs Landlock ABI {abi}; this kernel has {ABI}")


@attrs.frozen
class Outcome:
    """How the sandboxed function ended: its value, or its error and what denied_write made of it."""

    report: sandbox.SandboxReport
    value: Any = None
    error: Any = None
    denied: Any = None
    traceback: str = ""

    def unwrap(self) -> Any:
        """The value, or fail the test with the child's traceback."""
        assert self.error is None, f"the sandboxed function raised:\n{self.traceback}"
        return self.value


def run_sandboxed(fn: Callable[[sandbox.SandboxReport], Any], policy: sandbox.SandboxPolicy,
                  before: Callable[[], None] = lambda: None) -> Outcome:
    """``fn(report)`` in a forked child after ``before()`` and ``sandbox.apply(policy)``."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(read_end)
            before()
            report = sandbox.apply(policy)
            try:
                outcome = Outcome(report, value=fn(report))
            except Exception as error:
                outcome = Outcome(report, error=error, denied=sandbox.denied_write(error, report),
                                  traceback=traceback.format_exc())
            with os.fdopen(write_end, "wb") as pipe:
                pickle.dump(outcome, pipe)
        except BaseException:
            traceback.print_exc()
            code = 70
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, "the sandboxed child failed (see stderr)"
    return pickle.loads(data)


# -- steps for the tests through a real Supervisor (the worker template imports this module)

def write_file(path: str, text: str = "x") -> str:
    """Write ``path``: denied in a sandboxed pool worker unless the path was declared."""
    with open(path, "w") as handle:
        handle.write(text)
    return path


def signal_process(pid: int, signum: int = 0) -> None:
    """``os.kill(pid, signum)``: signal 0 checks the right to signal without delivering one."""
    os.kill(pid, signum)


def use_temp_dir() -> str:
    """Write a file in the worker's temp dir (``tempfile``'s default); return the dir."""
    import tempfile
    with tempfile.NamedTemporaryFile("w", delete=False) as handle:
        handle.write("scratch")
    return os.path.dirname(handle.name)
