"""Run a Python command that ends with the test process that started it.

``python -m parent_bound PID ARGS...`` asks the kernel for SIGTERM when its parent (PID)
dies (``PR_SET_PDEATHSIG``, which survives ``execve``), then becomes ``python ARGS...``.
A ``governor serve`` started this way shuts down, workers and template with it, even
when pytest ends with ``os._exit`` (its timeout, the deadlock detector) and runs no
teardown. SIGTERM rather than SIGKILL: the daemon's own shutdown takes its workers along.

The signal goes when the *thread* that started the child ends, so start the child from
a thread that outlives it (the test's own, as the harness does).
"""

import os
import signal
import sys

from governor.workers.libc import prctl

PR_SET_PDEATHSIG = 1


def main() -> None:
    parent, command = int(sys.argv[1]), sys.argv[2:]
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM, name="PR_SET_PDEATHSIG")
    if os.getppid() != parent:
        sys.exit(f"parent_bound: the parent {parent} was gone before the signal was armed")
    os.execv(sys.executable, [sys.executable, *command])


if __name__ == "__main__":
    main()
