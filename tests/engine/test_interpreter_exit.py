"""A program that ends with a live supervisor exits promptly and leaves no process, as with
``ProcessPoolExecutor``: no ``shutdown()``, ``shutdown(wait=False)``, an uncaught exception,
``sys.exit``, and Ctrl-C in or out of ``with``. A supervisor used in a forked child fails
with a clear error.

Each program runs in a subprocess of its own session, so a Ctrl-C can be played as a
terminal plays it: SIGINT to the whole foreground process group. Every process it started
carries a marker in its environment, which is how the test finds what was left behind.
"""

import os
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from conftest import ctrl_c_not_ignored, processes_marked, wait_until

#: Generous: the standard library's executor exits in about a second here.
EXIT_WITHIN_S = 20.0

PROGRAM = """
import os, sys, time
from governor import StepRegistry, Supervisor

registry = StepRegistry()

@registry.step()
def square(x):
    return x * x

@registry.step()
def nap(seconds):
    time.sleep(seconds)
    return seconds

def ready():
    print("ready", flush=True)

if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "ctrl-c-in-with":
        with Supervisor(registry, workers=2) as sup:
            sup.submit(nap, 600)
            ready()
            time.sleep(600)
    sup = Supervisor(registry, workers=2)
    print(sup.submit(square, 3).result(), flush=True)
    if mode == "shutdown-no-wait":
        sup.submit(nap, 0.2)
        sup.shutdown(wait=False)
    elif mode == "uncaught-exception":
        sup.submit(nap, 600)
        raise ValueError("the program failed")
    elif mode == "sys-exit":
        sup.submit(nap, 600)
        sys.exit(3)
    elif mode == "ctrl-c":
        sup.submit(nap, 600)
        ready()
        time.sleep(600)
    elif mode == "forked-child":
        pid = os.fork()
        if pid == 0:
            try:
                sup.submit(square, 4)
            except Exception as exc:
                print(f"child: {type(exc).__name__}: {exc}", flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
        print("parent:", sup.submit(square, 5).result(), flush=True)
"""


def marked_processes(marker: str):
    """Live processes whose environment carries ``marker`` (every one the program started)."""
    return processes_marked(marker, "GOVERNOR_EXIT_TEST")


@pytest.fixture
def program(tmp_path):
    path = tmp_path / "program.py"
    path.write_text(PROGRAM)
    marker = uuid.uuid4().hex
    started = []

    def start(mode: str) -> subprocess.Popen:
        env = {**os.environ, "GOVERNOR_EXIT_TEST": marker}
        with ctrl_c_not_ignored():  # as a terminal starts it, however pytest was started
            process = subprocess.Popen([sys.executable, str(path), mode], cwd=tmp_path, env=env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        started.append(process)
        return process

    start.marker = marker
    yield start
    for process in marked_processes(marker):  # a failed test must not leak either
        process.kill()
    for process in started:
        process.kill()
        process.communicate()


def finish(process: subprocess.Popen):
    started = time.monotonic()
    try:
        out, err = process.communicate(timeout=EXIT_WITHIN_S)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"the program did not exit within {EXIT_WITHIN_S}s\nstdout: {out}\nstderr: {err}")
    return process.returncode, out, err, time.monotonic() - started


@pytest.mark.parametrize("mode, code", [("no-shutdown", 0), ("shutdown-no-wait", 0),
                                        ("uncaught-exception", 1), ("sys-exit", 3)])
def test_a_program_that_ends_with_a_live_supervisor_exits_and_leaves_nothing(program, mode, code):
    returncode, out, err, _ = finish(program(mode))
    assert out.splitlines()[0] == "9", err
    assert returncode == code, err
    assert "Traceback" not in err or mode == "uncaught-exception", err
    assert "failed" not in err.replace("the program failed", ""), err  # no "LocalLanes.close failed"
    assert wait_until(lambda: not marked_processes(program.marker), timeout=10), marked_processes(program.marker)


@pytest.mark.parametrize("mode", ["ctrl-c", "ctrl-c-in-with"])
def test_one_ctrl_c_ends_the_program_and_its_workers(program, mode):
    process = program(mode)
    assert process.stdout.readline().strip() in ("9", "ready")
    if mode == "ctrl-c":
        assert process.stdout.readline().strip() == "ready"
    os.killpg(process.pid, signal.SIGINT)  # what a terminal does: the whole foreground group
    returncode, _, err, _ = finish(process)
    assert "KeyboardInterrupt" in err
    # The Ctrl-C is the program's to handle: a template that died of it too orphaned its
    # workers and held up the exit by seconds.
    assert "template.py" not in err, err
    assert returncode != 0
    assert wait_until(lambda: not marked_processes(program.marker), timeout=10), marked_processes(program.marker)


def test_a_supervisor_used_in_a_forked_child_fails_clearly_and_the_parent_goes_on(program):
    returncode, out, err, _ = finish(program("forked-child"))
    assert returncode == 0, err
    lines = out.splitlines()
    assert lines[1].startswith("child: SupervisorForked: this supervisor was started by process "), out
    assert lines[2] == "parent: 25", out
    assert wait_until(lambda: not marked_processes(program.marker), timeout=10), marked_processes(program.marker)
