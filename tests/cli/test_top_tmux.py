"""``governor top`` the way a person uses it: in a terminal (tmux) against a real daemon running
real steps, reading the screen with capture-pane and pressing keys with send-keys."""

import os
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import wait_until
from daemon_harness import daemon  # noqa: F401 (a fixture)
from governor import Call, Limits, StepCancelled, StepTimeout
from governor.client import Client

pytest.importorskip("textual", reason="governor top needs the live extra (pip install -e '.[live]')")
TMUX = shutil.which("tmux")
#: Real processes, a real terminal, a shared 2-core machine: a generous guard, not a timing.
pytestmark = [pytest.mark.skipif(TMUX is None, reason="no tmux here (CI installs it: see .ci/run)"),
              pytest.mark.slow, pytest.mark.timeout(240)]


class Tmux:
    """A private tmux server (its own socket name) with one 160x50 window."""

    def __init__(self, name: str):
        self.name = name

    def run(self, *args: str) -> str:
        return subprocess.run([TMUX, "-L", self.name, *args], check=True, capture_output=True, text=True,
                              timeout=60).stdout

    def start(self, command: str) -> None:
        self.run("new-session", "-d", "-s", "top", "-x", "160", "-y", "50", command)

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "top")

    def wait_for(self, *needles: str, timeout: float = 60.0) -> str:
        """Wait until the screen shows every needle; return the screen."""
        return self._wait(lambda screen: all(needle in screen for needle in needles), f"never showed {needles}",
                          timeout)

    def wait_for_line(self, predicate, timeout: float = 60.0) -> str:
        """Wait for a line of the screen that ``predicate`` accepts; return it."""
        screen = self._wait(lambda screen: any(map(predicate, screen.splitlines())), "no such line", timeout)
        return next(line for line in screen.splitlines() if predicate(line))

    def _wait(self, shows, failure: str, timeout: float) -> str:
        seen = {"screen": ""}

        def check() -> bool:
            seen["screen"] = self.screen()
            return shows(seen["screen"])

        assert wait_until(check, timeout=timeout, interval=0.1), f"{failure}:\n{seen['screen']}"
        return seen["screen"]

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", "top", *keys)

    def close(self) -> None:
        subprocess.run([TMUX, "-L", self.name, "kill-server"], capture_output=True, timeout=60)


@pytest.fixture
def tmux(tmp_path):
    terminal = Tmux(f"governor-top-{os.getpid()}-{tmp_path.name}")
    yield terminal
    terminal.close()


def workers_rows(screen: str) -> list:
    """The workers table's lines, in order, from a captured screen."""
    lines = screen.splitlines()
    start = next(index for index, line in enumerate(lines) if line.split()[:3] == ["pid", "lane", "state"])
    rows = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        rows.append(line)
    return rows


def ask_to_cancel(tmux, task_id: int, question: str) -> None:
    """Press c and type the task's id, as a person who read it on the screen would."""
    tmux.keys("c")
    tmux.wait_for("Cancel which task?")
    tmux.keys(str(task_id), "Enter")
    tmux.wait_for(question)


def test_top_in_a_terminal_shows_steps_kills_cancels_and_survives_a_restart(daemon, tmux):
    top = f"{shlex.quote(sys.executable)} -m governor --socket {shlex.quote(str(daemon.socket))} top --interval 0.25"
    tmux.start(f"{top}; echo top exited $?; sleep 600")
    tmux.wait_for("live  daemon pid", "critical", "pool", "steps over the last minute")

    with Client(daemon.socket) as client:
        held = client.submit_call(Call("timed_sleep", kwargs={"ms": 600_000}, limits=Limits(timeout_s=900)))
        held_id = held.wait_for_id(30)
        screen = tmux.wait_for("timed_sleep", "/ 900.0 s")
        [row] = [line for line in workers_rows(screen) if "timed_sleep" in line]
        assert row.split()[1:6] == ["pool", "busy", "timed_sleep", "-", str(held_id)]  # no lane key; the daemon's id

        killed = client.submit_call(Call("busy_loop", limits=Limits(timeout_s=1)))
        with pytest.raises(StepTimeout) as timeout:
            killed.result(60)
        kill = tmux.wait_for_line(lambda line: "busy_loop" in line and " timeout " in line)
        assert kill.split()[1:9] == [str(killed.task_id), "busy_loop", "pool", "timeout", "1", "s",
                                     f"{timeout.value.elapsed_s:.4g}", "s"]
        assert str(timeout.value.pid) in kill
        tmux.wait_for("busy_loop", "timed_sleep", "p95")

        assert "idle (warm spare)" in tmux.wait_for("idle (warm spare)")
        # Ask to cancel the held task by its id: the confirmation names it; answer yes.
        ask_to_cancel(tmux, held_id, f"Cancel task {held_id} (timed_sleep, running in the pool lane)?")
        tmux.keys("y")
        with pytest.raises(StepCancelled):
            held.result(60)
        tmux.wait_for(f"task {held_id} cancelled")  # the notification: the daemon's reply
        tmux.wait_for_line(lambda line: line.split()[1:5] == [str(held_id), "timed_sleep", "pool", "cancel"])

    # The daemon restarts: top says so, then shows the new one.
    old_pid = daemon.process.pid
    assert daemon.stop() == 0
    tmux.wait_for("reconnecting")
    daemon.start()
    assert daemon.process.pid != old_pid
    tmux.wait_for(f"live  daemon pid {daemon.process.pid}")

    tmux.keys("q")
    tmux.wait_for("top exited 0")
