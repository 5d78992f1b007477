"""What is particular to the Ray backend: choosing it, its set-up errors, its link's safety.

Everything a step's caller sees (limits, kills, crashes, cancels) is tested once for both
backends in test_governor.py and test_core.py.
"""

import json
import os
import socket
import struct
import sys
import textwrap
import threading

import pytest

from conftest import alive, wait_until
from governor import BackendUnavailable, Call, Limits, StepTimeout, Supervisor, TaskState, WorkerStartFailed
from governor.engine import ray_lane
from governor.limits import Lane
from step_library import KillsItsFirstReader, registry, wait_for_path


def test_a_bad_backend_or_ray_options_without_ray_are_refused():
    with pytest.raises(ValueError, match="backend must be one of 'loky', 'ray'"):
        Supervisor(registry, backend="dask")
    with pytest.raises(ValueError, match="need backend='ray'"):
        Supervisor(registry, ray_address="auto")


@pytest.mark.ray
def test_ray_options_cannot_let_ray_retry_a_step():
    pytest.importorskip("ray", reason="the ray extra is not installed")
    with pytest.raises(ValueError, match="may not set max_retries"):
        Supervisor(registry, backend="ray", ray_options={"max_retries": 3})


def test_without_the_extra_the_error_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without Ray sees: ImportError
    with pytest.raises(BackendUnavailable, match=r"pip install 'governor\[ray\]'"):
        Supervisor(registry, backend="ray")


@pytest.mark.ray
def test_steps_the_cluster_cannot_import_fail_the_start(ray_node, tmp_path, monkeypatch):
    # A module only this process can import (the node's workers do not have tmp_path).
    (tmp_path / "only_here.py").write_text(textwrap.dedent('''
        from governor.steps import StepRegistry
        registry = StepRegistry()

        @registry.step(critical=False)
        def hello():
            return "hi"
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    from only_here import registry as unreachable

    with pytest.raises(WorkerStartFailed, match="only_here"):
        Supervisor(unreachable, workers=2, backend="ray").start()


@pytest.mark.ray
def test_the_link_refuses_a_peer_without_the_token(ray_node, caplog):
    with Supervisor(registry, workers=2, backend="ray") as sup:
        # The listener is private on purpose; this test plays a stranger who found its port.
        lane = sup._manager._backends[Lane.POOL]
        with socket.create_connection(lane._listener.getsockname()) as stranger:
            frame = json.dumps({"token": "guess", "pid": 1, "node": "x"}).encode()
            stranger.sendall(len(frame).to_bytes(4, "big") + frame)
            stranger.settimeout(30)
            assert stranger.recv(1) == b"", "the link was closed on the stranger"
        assert "refused a Ray link" in caplog.text
        assert sup.submit("echo", "still fine").result(timeout=60) == "still fine"


@pytest.mark.ray
def test_a_supervisor_uses_the_ray_it_finds_and_leaves_it_running(ray_node):
    with Supervisor(registry, workers=2, backend="ray") as sup:
        assert sup.submit("echo", 1).result(timeout=60) == 1
        assert sup.metrics()["workers"]["pool"]["busy"] == 0
    assert ray_node.is_initialized(), "the session's node is not the supervisor's to stop"


@pytest.mark.ray
def test_a_task_whose_worker_died_before_it_started_runs_on_another(ray_node, tmp_path):
    # Ray fails a task whose leased worker dies, even before the step could start (it leases
    # dying workers under load). The step never ran, so it is submitted again, not failed.
    marker = tmp_path / "first-reader"
    with Supervisor(registry, workers=2, backend="ray") as sup:
        future = sup.submit("echo", KillsItsFirstReader(str(marker)))
        assert future.result(timeout=60) == str(marker)
        assert future.state is TaskState.DONE
        assert "crash" not in sup.metrics()["worker_kills"].get("pool", {}), "no crash was counted"
    assert wait_until(lambda: not alive(int(marker.read_text())), timeout=10), "the first reader died"


@pytest.mark.ray
def test_a_silent_peer_does_not_hold_up_a_workers_link(ray_node, tmp_path, monkeypatch):
    # The stranger below is dropped after HELLO_TIMEOUT_S; long enough that a slow Ray
    # worker start cannot outlast it (closing the stranger ends its wait at once).
    monkeypatch.setattr(ray_lane, "HELLO_TIMEOUT_S", 120.0)
    with Supervisor(registry, workers=1, backend="ray") as sup:
        # Kill the warmed worker, so the next step runs on a worker with no link yet.
        with pytest.raises(StepTimeout):
            sup.submit_call(Call("busy_loop", limits=Limits(timeout_s=0.3))).result(timeout=60)
        lane = sup._manager._backends[Lane.POOL]  # private: this test plays a stranger on its port
        with socket.create_connection(lane._listener.getsockname()) as stranger:
            future = sup.submit("hold_until", str(tmp_path / "started"), str(tmp_path / "go"))
            wait_for_path(str(tmp_path / "started"))
            # "busy" needs the new worker's link admitted; the stranger, who said nothing,
            # is only dropped after HELLO_TIMEOUT_S, so it must still be connected then.
            assert wait_until(lambda: any(w["state"] == "busy" for w in sup.describe_workers()), timeout=30)
            stranger.setblocking(False)
            with pytest.raises(BlockingIOError):
                stranger.recv(1)  # still open, not yet dropped: the link did not wait for it
        (tmp_path / "go").touch()
        future.result(timeout=60)


def _standing_by(sup):
    return [w["pid"] for w in sup.describe_workers() if w["lane"] == "pool" and w["state"] == "idle"]


@pytest.mark.ray
@pytest.mark.parametrize("spares", [0, 1])
def test_the_lane_keeps_a_warm_ray_worker_standing_by_when_asked(ray_node, spares, caplog):
    with Supervisor(registry, workers=1, spares=spares, backend="ray") as sup:
        if not spares:
            assert sup.submit("echo", 1).result(timeout=60) == 1
            assert _standing_by(sup) == [] and sup.metrics()["warm_spares"]["pool"] == 0
            return
        assert wait_until(lambda: len(_standing_by(sup)) == 1, timeout=30), "a standby worker linked up"
        assert sup.metrics()["warm_spares"]["pool"] == 1
        with pytest.raises(StepTimeout):  # a kill releases the standby for the next step
            sup.submit_call(Call("busy_loop", limits=Limits(timeout_s=0.3))).result(timeout=60)
        killed = [record for record in caplog.records if getattr(record, "reason", None) == "timeout"]
        assert [record.node for record in killed] == [socket.gethostname()], "the kill's WARNING names the node"
        assert sup.submit("echo", 2).result(timeout=60) == 2
        assert wait_until(lambda: len(_standing_by(sup)) == 1, timeout=30), "and another stands by again"


@pytest.mark.ray
def test_the_manager_thread_never_waits_on_the_gcs_to_hand_ray_a_task(ray_node, monkeypatch):
    # Ray exports a remote function on its first .remote(), with synchronous calls to the
    # GCS. Made on the manager thread (once per supervisor and step, before the fix), they
    # would stall every timer, kill and dispatch of both lanes for as long as the GCS takes.
    # The lane submits one entry function, exported while the supervisor starts.
    function_manager = ray_node._private.worker.global_worker.function_actor_manager
    export = function_manager.export
    exported_on = []

    def record(remote_function):
        exported_on.append(threading.current_thread().name)
        return export(remote_function)

    monkeypatch.setattr(function_manager, "export", record)
    for _ in range(2):  # each supervisor's first step, standby and check
        with Supervisor(registry, workers=2, spares=1, backend="ray") as sup:
            assert sup.submit("echo", 1).result(timeout=60) == 1
            assert sup.submit("noop").result(timeout=60) is None
            assert wait_until(lambda: len(_standing_by(sup)) == 1, timeout=30), "a standby worker linked up"
    assert [name for name in exported_on if name.startswith("governor-")] == []


def _frame(message) -> bytes:
    payload = json.dumps(message).encode()
    return struct.pack("!i", len(payload)) + payload


@pytest.mark.ray
def test_a_message_cut_in_two_by_the_network_holds_up_nothing(ray_node):
    with Supervisor(registry, workers=1, backend="ray") as sup:
        lane = sup._manager._backends[Lane.POOL]  # private: this test plays a worker on its link
        with socket.create_connection(lane._listener.getsockname()) as peer:
            peer.sendall(_frame({"token": lane._token, "pid": os.getpid(), "node": "elsewhere"}))
            standing_by = _frame(["standing_by", 999, os.getpid()])
            peer.sendall(standing_by[:7])  # the rest is late: a network between here and there
            assert sup.submit("echo", 1).result(timeout=30) == 1, "the manager thread did not wait for it"
            assert sup.describe_workers(timeout=30) is not None
            peer.sendall(standing_by[7:])
            peer.settimeout(30)
            reply = peer.recv(4096)  # a standby the lane never asked for is released at once
            assert json.loads(reply[4:]) == ["release", 999]


@pytest.mark.ray
def test_a_peer_that_stops_halfway_through_its_hello_is_dropped(ray_node, monkeypatch):
    monkeypatch.setattr(ray_lane, "HELLO_TIMEOUT_S", 0.5)
    with Supervisor(registry, workers=1, backend="ray") as sup:
        lane = sup._manager._backends[Lane.POOL]
        with socket.create_connection(lane._listener.getsockname()) as stranger:
            stranger.sendall(_frame({"token": "not the token"})[:6])
            stranger.settimeout(30)
            assert stranger.recv(1) == b"", "dropped after HELLO_TIMEOUT_S"
        assert sup.submit("echo", 1).result(timeout=30) == 1
