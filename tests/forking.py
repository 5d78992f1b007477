"""Run a function in a forked child of the test process: a worker-like role on a real process.

For tests of what one process does to itself (``governor.workers.hygiene``) or to its descendants
(``governor.workers.proctree``), where a supervisor would be in the way.
"""

import json
import os
import traceback

#: How long a forked role that must hang (a step that never ends) hangs: far past any test,
#: whose own timeout (pytest-timeout) catches a role that never reports.
ROLE_PATIENCE_S = 60.0


def run_forked(fn, *args):
    """Run ``fn(*args)`` in a forked child and return what it returned (JSON over a pipe).

    The child never returns into pytest: it reports, then ``os._exit``. An exception in it
    fails the test with its traceback.
    """
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(reader)
        code = 0
        try:
            report = {"value": fn(*args)}
        except BaseException:
            report, code = {"error": traceback.format_exc()}, 1
        try:
            os.write(writer, json.dumps(report).encode())
        finally:
            os._exit(code)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    report = json.loads(data)
    assert "error" not in report, report.get("error")
    return report["value"]
