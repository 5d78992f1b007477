"""A real ``governor serve`` in a subprocess, on a private socket and journal, for the tests."""

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from conftest import alive, wait_until
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
        # Bound to this process: if the test process dies without its teardown (os._exit
        # on a timeout), the daemon gets SIGTERM and shuts its workers down.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "parent_bound", str(os.getpid()),
             "-m", "governor", "serve", "--socket", str(self.socket), "--journal", str(self.journal),
             *steps, "--workers", str(self.workers), "--drain-timeout", "5", *self.extra_args],
            env=env, stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"))
        try:
            assert wait_until(self._answers, timeout=60), f"the daemon did not start:\n{self.log.read_text()}"
        except BaseException:
            if self.process.poll() is None:  # started, but too slowly: it must not outlive the test
                self.stop()
            raise
        return self

    def _answers(self) -> bool:
        assert self.process.poll() is None, f"the daemon exited:\n{self.log.read_text()}"
        try:
            # The socket is bound and listening before the workers start, and served only
            # after: until then a connection is accepted by the kernel and left unanswered.
            with Client(self.socket, timeout=1) as client:
                client.ping()
            return True
        except (DaemonUnavailable, TimeoutError):
            return False

    def stop(self, sig=signal.SIGTERM) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout=60)

    def cli(self, *args: str, cwd=None) -> subprocess.CompletedProcess:
        """Run the ``governor`` command (the installed console script when there is one)."""
        command = [shutil.which("governor")] if shutil.which("governor") else [sys.executable, "-m", "governor"]
        return subprocess.run([*command, "--socket", str(self.socket), *args],
                              capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.fixture
def daemon(tmp_path):
    """A ``governor serve`` subprocess for one test, stopped cleanly (exit 0) after it."""
    running = DaemonProcess(tmp_path).start()
    yield running
    if running.process.poll() is None:
        assert running.stop() == 0, running.log.read_text()


def kill_all(processes) -> None:
    """Kill what a ``kill -9``-ed daemon left (its workers) and wait until they are gone."""
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    assert wait_until(lambda: not any(alive(process.pid) for process in processes), timeout=15)


class InProcessDaemon:
    """A ``Daemon`` on its own event loop in a thread of the test process, with any config.

    Real socket, journal and workers; the test can read the daemon's statistics. Use it as
    a context manager: it starts the daemon and stops it (workers included) on exit.
    """

    def __init__(self, root: Path, builtin: bool = False, **config):
        from governor.service.config import DaemonConfig, load_registry
        from governor.service.daemon import Daemon

        self.socket = root / "run" / "governor.sock"
        self.journal = root / "state" / "journal.sqlite3"
        config = {"socket_path": self.socket, "journal_path": self.journal, "workers": 2,
                  "drain_timeout_s": 5, **config}
        registry = load_registry([] if builtin else ["step_library"], entry_points=False, builtin=builtin)
        self.daemon = Daemon(registry, DaemonConfig(**config))
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-daemon-loop")

    def __enter__(self) -> "InProcessDaemon":
        self._thread.start()
        self.call(self.daemon.start())
        return self

    def call(self, coroutine, timeout: float = 120):
        """Run ``coroutine`` on the daemon's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def statistics(self):
        async def read():
            return self.daemon.statistics()
        return self.call(read())

    def __exit__(self, *exc_info) -> None:
        try:
            self.call(self.daemon.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=60)
            self.loop.close()
