"""A real daemon serving its status page, and the things the live-view tests look at it with."""

import re

import pytest

from conftest import wait_until
from daemon_harness import DaemonProcess
from governor.client import Client


class LiveDaemon(DaemonProcess):
    """``governor serve --http-addr 127.0.0.1:0`` (any free port); ``url`` is the one it prints."""

    def __init__(self, root, allow_cancel: bool = False, **options):
        extra = ("--http-addr", "127.0.0.1:0") + (("--http-allow-cancel",) if allow_cancel else ())
        super().__init__(root, extra_args=extra, **options)
        self.url = None

    def start(self) -> "LiveDaemon":
        super().start()
        printed = re.findall(r"status page on (http://\S+)", self.log.read_text())
        assert printed, self.log.read_text()
        self.url = printed[-1]  # the log is appended to across restarts: the newest line
        return self

    @property
    def base(self) -> str:
        """``http://host:port`` without the token."""
        return self.url.split("/?", 1)[0]

    @property
    def token(self) -> str:
        return self.url.split("token=", 1)[1]

    def live(self) -> dict:
        with Client(self.socket) as client:
            return client.live()

    def wait_live(self, predicate, timeout: float = 60.0) -> dict:
        """Poll the ``live`` op until ``predicate(snapshot)``; return that snapshot."""
        seen = {}

        def check() -> bool:
            seen["snapshot"] = self.live()
            return bool(predicate(seen["snapshot"]))

        assert wait_until(check, timeout=timeout, interval=0.1), seen.get("snapshot")
        return seen["snapshot"]


def running(step: str):
    """A predicate: some worker runs ``step``."""
    return lambda snapshot: [worker for worker in snapshot["workers"] if worker["step"] == step]


@pytest.fixture
def daemon(tmp_path):
    """A read-only status page on a fresh daemon (import it into a test module to use it)."""
    started = LiveDaemon(tmp_path).start()
    yield started
    if started.process.poll() is None:
        assert started.stop() == 0, started.log.read_text()
