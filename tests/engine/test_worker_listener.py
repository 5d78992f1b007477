"""Nothing a step sends to the worker listener is trusted (issue 27).

A pool step found the supervisor's worker listener (the peer of its own worker's
sockets) and sent a hello that the supervisor unpickled: the step's code ran in the
supervisor, writing a file the sandboxed step itself could not. A hello is now JSON with
the supervisor's secret, from the process the kernel names as the peer (SO_PEERCRED),
which must be the worker the template forked for that slot; a hello that does not come in
one piece never holds the manager thread.
"""

import os
import pickle
import socket
import struct

import pytest

from governor import Supervisor
from governor.steps import StepRegistry

#: Sockets a step keeps open after it returns (in its worker process, for the next task).
_held = []


def listener_address() -> str:
    """The worker listener's path: the peer of this worker's own sockets."""
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue  # not a socket
        try:
            if sock.family == socket.AF_UNIX:
                peer = sock.getpeername()
                if isinstance(peer, str) and peer.endswith("/workers"):
                    return peer
        except OSError:
            pass
        finally:
            sock.close()
    raise LookupError("no worker listener among this worker's sockets")


class WritesInTheUnpickler:
    """What the forged hello carries: unpickling it writes ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def send_forged_hello(path: str) -> str:
    """Connect to the worker listener and send a pickled 'hello' that writes ``path`` when unpickled."""
    payload = pickle.dumps(("task", 1, os.getpid(), WritesInTheUnpickler(path)))
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(listener_address())
        sock.sendall(struct.pack("!i", len(payload)) + payload)
        sock.recv(1)  # until the supervisor closes it
    return "sent"


def send_half_a_hello() -> str:
    """Connect to the worker listener, announce a 1 MiB hello, send none of it, keep the socket."""
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(listener_address())
    sock.sendall(struct.pack("!i", 1 << 20))
    _held.append(sock)
    return "sent"


def echo(value):
    return value


def hostile_registry():
    registry = StepRegistry()
    registry.register(send_forged_hello, name="pool.forge", critical=False)
    registry.register(send_half_a_hello, name="pool.half", critical=False)
    registry.register(echo, name="pool.echo", critical=False)
    registry.register(echo, name="critical.echo", critical=True)
    return registry


def test_a_forged_hello_runs_nothing_in_the_supervisor(tmp_path, caplog):
    target = tmp_path / "written-by-the-supervisor"
    with Supervisor(hostile_registry(), workers=1) as sup:
        assert sup.submit("pool.forge", str(target)).result(timeout=60) == "sent"
        assert sup.submit("critical.echo", "alive").result(timeout=60) == "alive"
    assert not target.exists(), "the supervisor unpickled what a step sent it"
    assert any("refused a connection to the worker listener" in record.getMessage() for record in caplog.records)


def test_half_a_hello_never_holds_the_supervisor():
    with Supervisor(hostile_registry(), workers=1) as sup:
        assert sup.submit("pool.half").result(timeout=60) == "sent"
        assert sup.submit("critical.echo", "still served").result(timeout=60) == "still served"
        assert sup.submit("pool.echo", "and the pool").result(timeout=60) == "and the pool"
