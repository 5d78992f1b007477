"""The reference backend on a real uvicorn server, in a thread of the test process, on 127.0.0.1.

In the test's process, so a test can read the engine it built (the ``GovernedViews``, its
supervisor and the requests' futures) while it talks to the server over real sockets.
"""

import socket
import threading
from typing import Optional

import pytest

from conftest import wait_until

pytest.importorskip("starlette", reason="needs the web extra")
uvicorn = pytest.importorskip("uvicorn", reason="needs the web extra")

from governor.bench.backend import GovernedViews, Views, create_app  # noqa: E402


class ServerThread:
    """uvicorn serving ``create_app(views)`` (or another ASGI ``app``) on a free port; the
    lifespan starts and stops the engine."""

    def __init__(self, views: Optional[Views] = None, app=None):
        self.views = views
        self.server = uvicorn.Server(uvicorn.Config(app if app is not None else create_app(views), host="127.0.0.1",
                                                    port=0, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        assert wait_until(lambda: self.server.started or not self.thread.is_alive(), timeout=120)
        assert self.server.started, "uvicorn did not start (see the log above)"
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=120)
        assert not self.thread.is_alive(), "uvicorn did not stop"


def open_view(port: int, path: str) -> socket.socket:
    """Send ``GET path`` on a raw socket and return it unread (close it to disconnect)."""
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    return client


@pytest.fixture
def served(request):
    """An in-process Governor backend with ``workers`` pool workers (parametrise indirectly; default 2)."""
    workers = getattr(request, "param", 2)
    with ServerThread(GovernedViews(None, workers)) as server:
        yield server


@pytest.fixture
def served_by_daemon(tmp_path):
    """The backend through ``AsyncClient`` to a real ``governor serve`` of its steps (2 workers)."""
    from daemon_harness import DaemonProcess

    daemon = DaemonProcess(tmp_path, workers=2, builtin=True,
                           extra_args=("--steps", "governor.bench.backend", "--no-builtin")).start()
    try:
        with ServerThread(GovernedViews(str(daemon.socket), workers=2)) as server:
            server.daemon = daemon
            yield server
    finally:
        assert daemon.stop() == 0, daemon.log.read_text()
