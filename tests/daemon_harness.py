"""A real ``governor serve`` in a subprocess, on a private socket and journal, for the tests."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from conftest import wait_until
from governor.client import Client, DaemonUnavailable

TESTS = Path(__file__).parent


class DaemonProcess:
    """``governor serve`` in a subprocess on a private socket and journal."""

    def __init__(self, root: Path, workers: int = 2, builtin: bool = False, env: dict = None,
                 extra_args: tuple = ()):
        self.root = root
        self.extra_args = tuple(extra_args)
        self.builtin = builtin
        self.env = env or {}
        self.socket = root / "run" / "governor.sock"
        self.journal = root / "state" / "journal.sqlite3"
        self.workers = workers
        self.process = None
        self.log = root / "daemon.log"

    def start(self) -> "DaemonProcess":
        env = {**os.environ, **self.env,
               "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
        steps = [] if self.builtin else ["--steps", "step_library", "--no-builtin"]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "governor", "serve", "--socket", str(self.socket), "--journal", str(self.journal),
             *steps, "--workers", str(self.workers), "--drain-timeout", "5", *self.extra_args],
            env=env, stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"))
        assert wait_until(self._answers, timeout=60), f"the daemon did not start:\n{self.log.read_text()}"
        return self

    def _answers(self) -> bool:
        assert self.process.poll() is None, f"the daemon exited:\n{self.log.read_text()}"
        try:
            with Client(self.socket) as client:
                client.ping()
            return True
        except DaemonUnavailable:
            return False

    def stop(self, sig=signal.SIGTERM) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout=60)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """Run the ``governor`` command (the installed console script when there is one)."""
        command = [shutil.which("governor")] if shutil.which("governor") else [sys.executable, "-m", "governor"]
        return subprocess.run([*command, "--socket", str(self.socket), *args],
                              capture_output=True, text=True, timeout=120)
