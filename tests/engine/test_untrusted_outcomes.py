"""Nothing a worker sends up its own sockets is trusted (issue 27, item 2).

A step holds its worker's task and control sockets (fds of its own process) and can write
anything there. The supervisor's manager thread used to unpickle what came up: a forged
outcome ran the step's code in the supervisor, a 2**40-byte header with junk after it grew
the supervisor by gigabytes, and an outcome of the wrong shape left its task unresolved, so
``shutdown(cancel_running=True)`` hung. Now an outcome's envelope is read without pickle,
frames have a size cap, and anything that is not what a worker sends kills the worker and
fails its task with ``MalformedOutcome``; the step's value is unpickled by the caller that
asks for it.
"""

import os
import pickle
import socket
import struct
import threading
import time

import psutil
import pytest

from governor import MalformedOutcome, Supervisor
from governor.steps import StepRegistry
from governor.task import Pickled, Task
from governor.limits import Lane, Limits
from governor.workers.messages import (Dirty, Outcome, OutcomeKind, Skipped, dirty_to_wire, load_exception,
                                       outcome_to_wire, revoked_from_wire, skipped_to_wire, up_from_wire)


def worker_sockets():
    """This worker's two sockets to the supervisor (task, then control), by fd."""
    found = []
    for name in sorted(os.listdir("/proc/self/fd"), key=int):
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue  # not a socket
        with sock:
            try:
                if sock.family == socket.AF_UNIX and str(sock.getpeername()).endswith("/workers"):
                    found.append(int(name))
            except OSError:
                pass
    return found


class WritesWhenUnpickled:
    """Unpickling it creates ``path``: proof of who unpickled it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def forge(channel: str, path: str) -> None:
    """Send, as this worker's outcome (or control message), a pickle that writes ``path``
    when unpickled; then wait as a step that has not ended."""
    task, control = worker_sockets()
    payload = pickle.dumps(("ok", 0.0, 0.0, os.getpid(), WritesWhenUnpickled(path)) + (None,) * 8)
    os.write(task if channel == "task" else control, struct.pack("!i", len(payload)) + payload)
    time.sleep(120)


def huge_header() -> None:
    """Announce a 2**40-byte outcome and stream junk after it (until the socket closes)."""
    task = worker_sockets()[0]
    os.write(task, struct.pack("!iQ", -1, 2 ** 40))
    junk = b"\0" * (1 << 20)
    for _ in range(2048):  # 2 GiB, if nothing stops it
        os.write(task, junk)
    time.sleep(120)


def someone_elses() -> None:
    """Send a well-formed outcome that names another task, then wait as a step that has
    not ended: what a mix-up of outcomes and tasks would look like."""
    task = worker_sockets()[0]
    payload = outcome_to_wire(Outcome(OutcomeKind.OK, 0.0, 0.0, os.getpid(), 2 ** 40, value="not yours"))
    os.write(task, struct.pack("!i", len(payload)) + payload)
    time.sleep(120)


def wrong_shape() -> None:
    """Send an outcome of the wrong shape (a one-field tuple, pickled), then wait."""
    task = worker_sockets()[0]
    payload = pickle.dumps(("ok",))
    os.write(task, struct.pack("!i", len(payload)) + payload)
    time.sleep(120)


def sleeper(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


def echo(value):
    return value


@pytest.fixture
def registry():
    registry = StepRegistry()
    steps = {"pool.forge": forge, "pool.huge": huge_header, "pool.wrong": wrong_shape, "pool.other": someone_elses, "pool.sleep": sleeper,
             "pool.echo": echo, "critical.echo": echo}
    for name, fn in steps.items():
        registry.register(fn, name=name, critical=name.startswith("critical."))
    return registry


@pytest.mark.parametrize("channel", ["task", "control"])
def test_a_forged_outcome_runs_nothing_in_the_supervisor(registry, channel, tmp_path):
    target = tmp_path / "written-by-the-supervisor"
    with Supervisor(registry, workers=1) as sup:
        with pytest.raises(MalformedOutcome) as refused:
            sup.submit("pool.forge", channel, str(target)).result(timeout=60)
        assert f"its {channel} socket carried" in str(refused.value)
        assert sup.submit("pool.echo", "still served").result(timeout=60) == "still served"
        assert sup.submit("critical.echo", "and the critical lane").result(timeout=60) == "and the critical lane"
    assert not target.exists(), "the supervisor unpickled what a step sent it"


def test_a_huge_frame_header_fails_its_task_without_growing_the_supervisor(registry):
    me = psutil.Process()
    with Supervisor(registry, workers=1) as sup:
        assert sup.submit("pool.echo", "warm").result(timeout=60) == "warm"
        before = me.memory_info().rss
        with pytest.raises(MalformedOutcome) as refused:
            sup.submit("pool.huge").result(timeout=60)
        grown = me.memory_info().rss - before
        assert "over the cap" in str(refused.value)
        assert grown < 64 * 2 ** 20, f"the supervisor grew by {grown / 2 ** 20:.0f} MiB"
        assert sup.submit("pool.echo", "still served").result(timeout=60) == "still served"


def test_an_outcome_for_another_task_fails_the_running_one_instead_of_resolving_it(registry):
    with Supervisor(registry, workers=1) as sup:
        with pytest.raises(MalformedOutcome) as refused:
            sup.submit("pool.other").result(timeout=60)
        assert f"an outcome for task {2 ** 40} where task" in str(refused.value)
        assert sup.submit("pool.echo", "still served").result(timeout=60) == "still served"


def test_a_wrong_shaped_outcome_fails_its_task_and_shutdown_does_not_hang(registry):
    sup = Supervisor(registry, workers=2).start()
    try:
        running = sup.submit("pool.sleep", 60)
        with pytest.raises(MalformedOutcome):
            sup.submit("pool.wrong").result(timeout=60)
    finally:
        stopper = threading.Thread(target=sup.shutdown, kwargs={"cancel_running": True})
        stopper.start()
        stopper.join(60)
        assert not stopper.is_alive(), "shutdown(cancel_running=True) hung"
    assert running.cancelled()


# -- the wire format, with no process ----------------------------------------------------

def _task() -> Task:
    return Task(1, "step", Lane.POOL, (), {}, Limits(), 0.0)


def test_an_outcome_crosses_the_wire_with_its_value_still_pickled():
    sent = Outcome(OutcomeKind.OK, 1.5, 2.5, 42, 7, value={"a": [1, 2]}, peak_rss_bytes=7, rss_bytes=None)
    got = up_from_wire(outcome_to_wire(sent))
    assert type(got.value) is Pickled and got.value.load(_task()) == {"a": [1, 2]}
    assert got._replace(value=None) == sent._replace(value=None)
    error = Outcome(OutcomeKind.ERROR, 1.0, 2.0, 42, 8, exc_type="ValueError", exc_message="bad \udcff",
                    traceback_text="tb", exception=ValueError("bad"), denied_path="/etc/x")
    got = up_from_wire(outcome_to_wire(error))
    assert (got.exc_type, got.traceback_text, got.denied_path) == ("ValueError", "tb", "/etc/x")
    assert type(got.exception) is ValueError and got.exception.args == ("bad",)
    assert up_from_wire(dirty_to_wire(Dirty("fds left open"))) == Dirty("fds left open")
    assert up_from_wire(skipped_to_wire(Skipped(2 ** 40, 3))) == Skipped(2 ** 40, 3)


@pytest.mark.parametrize("frame", [b"", b"X", b"O", outcome_to_wire(Outcome(OutcomeKind.OK, 0, 0, 1, 1))[:-1],
                                   outcome_to_wire(Outcome(OutcomeKind.OK, 0, 0, 1, 1)) + b"more",
                                   outcome_to_wire(Outcome(OutcomeKind.CANCELLED, 0, 0, 1, 1)).replace(b"O\x02", b"O\x09", 1),
                                   pickle.dumps(("ok", 0.0, 0.0, 1)), skipped_to_wire(Skipped(1, 1))[:-2]],
                         ids=["empty", "unknown-tag", "tag-only", "cut", "trailing", "bad-kind", "old-pickle",
                              "cut-skipped"])
def test_a_malformed_frame_is_a_value_error(frame):
    with pytest.raises(ValueError):
        up_from_wire(frame)
    with pytest.raises(ValueError):
        revoked_from_wire(frame)


def test_an_exception_is_rebuilt_only_from_exception_classes_already_imported():
    assert load_exception(pickle.dumps(KeyError("k"))).args == ("k",)
    assert load_exception(pickle.dumps(WritesWhenUnpickled("/nonexistent/x"))) is None
    assert load_exception(pickle.dumps(os.system)) is None
    assert load_exception(b"\x80\x05cthis_module_is_not_imported\nError\n)R.") is None


def test_a_value_that_cannot_be_unpickled_fails_the_caller_the_same_way_each_time():
    value = Pickled(b"\x80\x05cno_such_module\nThing\n)R.")
    with pytest.raises(Exception) as first:
        value.load(_task())
    with pytest.raises(Exception) as second:
        value.load(_task())
    assert first.value is second.value and "could not be read back" in str(first.value)
