"""User done-callbacks never run on the manager thread (issue 16, item 6).

Real threads stand in for the manager: a "manager" thread protects itself and resolves
futures; events order everything, and each callback records the thread it ran on.
"""

import concurrent.futures
import logging
import threading

import pytest

from governor import Call
from governor.callbacks import CallbackFuture, CallbackRunner, NonBlocking
from step_library import wait_for_path

#: A deadlock detector for waits on events, not a timing.
PATIENCE_S = 30.0


@pytest.fixture
def runner():
    runner = CallbackRunner()
    yield runner
    runner.close()


def on_manager(runner, work):
    """Run ``work()`` on a fresh thread that protects itself first; return its ident."""
    idents = []

    def manager():
        runner.protect()
        idents.append(threading.get_ident())
        work()

    thread = threading.Thread(target=manager, name="test-manager")
    thread.start()
    thread.join(PATIENCE_S)
    assert not thread.is_alive()
    return idents[0]


def test_callbacks_due_on_the_protected_thread_run_on_the_callback_thread_in_order(runner):
    ran = []
    futures = [CallbackFuture(runner) for _ in range(3)]
    for index, future in enumerate(futures):
        for part in "ab":
            future.add_done_callback(lambda done, label=f"{index}{part}": ran.append((label, threading.get_ident())))
    manager = on_manager(runner, lambda: [future.set_result(None) for future in futures])
    runner.close()
    assert [label for label, _ in ran] == ["0a", "0b", "1a", "1b", "2a", "2b"]
    threads = {ident for _, ident in ran}
    assert len(threads) == 1 and manager not in threads and threading.get_ident() not in threads


def test_callbacks_due_on_any_other_thread_run_there_at_once(runner):
    ran_on = []
    future = CallbackFuture(runner)
    future.add_done_callback(lambda done: ran_on.append(threading.get_ident()))
    future.set_result(1)
    assert ran_on == [threading.get_ident()]


def test_a_non_blocking_callback_runs_on_the_protected_thread_itself(runner):
    # The daemon's end inbox: a hop through the callback thread per task is what it saves.
    ran_on = []
    future = CallbackFuture(runner)
    future.add_done_callback(NonBlocking(lambda done: ran_on.append(threading.get_ident())))
    manager = on_manager(runner, lambda: future.set_result(None))
    assert ran_on == [manager]


def test_a_blocking_callback_does_not_stall_the_manager(runner):
    release, blocked, manager_went_on = threading.Event(), threading.Event(), threading.Event()
    first, second = CallbackFuture(runner), CallbackFuture(runner)
    first.add_done_callback(lambda done: (blocked.set(), release.wait(PATIENCE_S)))
    second_ran = threading.Event()
    second.add_done_callback(lambda done: second_ran.set())

    def manager():
        first.set_result(None)
        assert blocked.wait(PATIENCE_S)
        second.set_result(None)  # while the first callback still blocks
        manager_went_on.set()

    on_manager(runner, manager)
    assert manager_went_on.is_set() and not release.is_set()
    assert not second_ran.is_set(), "the second callback waits its turn, behind the first"
    release.set()
    assert second_ran.wait(PATIENCE_S)


def test_a_callback_that_raises_is_logged_and_the_next_one_runs(runner, caplog):
    future = CallbackFuture(runner)
    after = threading.Event()
    future.add_done_callback(lambda done: 1 / 0)
    future.add_done_callback(lambda done: after.set())
    with caplog.at_level(logging.ERROR, logger="concurrent.futures"):
        on_manager(runner, lambda: future.set_exception(KeyError("x")))
        assert after.wait(PATIENCE_S)
        runner.close()
    assert any("exception calling callback" in record.message and record.exc_info[0] is ZeroDivisionError
               for record in caplog.records)


def test_a_callback_added_on_the_manager_to_a_done_future_is_deferred_too(runner):
    future = CallbackFuture(runner)
    future.set_result(None)
    ran_on = []
    manager = on_manager(runner, lambda: future.add_done_callback(lambda done: ran_on.append(threading.get_ident())))
    runner.close()
    assert ran_on and ran_on[0] != manager


def test_close_runs_what_is_due_then_ends_the_thread(runner):
    release = threading.Event()
    ran = []
    futures = [CallbackFuture(runner) for _ in range(5)]
    futures[0].add_done_callback(lambda done: release.wait(PATIENCE_S))
    for index, future in enumerate(futures):
        future.add_done_callback(lambda done, index=index: ran.append(index))
    on_manager(runner, lambda: [future.set_result(None) for future in futures])
    release.set()
    runner.close()
    assert ran == [0, 1, 2, 3, 4]
    assert not [thread for thread in threading.enumerate() if thread.name == "governor-callbacks"]


def test_a_callback_may_close_the_runner_without_deadlock(runner):
    future = CallbackFuture(runner)
    closed_from = []

    def shut_down(done):
        closed_from.append(runner.on_callback_thread())
        runner.close()  # as a callback that shuts its supervisor down does

    future.add_done_callback(shut_down)
    on_manager(runner, lambda: future.set_result(None))
    for thread in [thread for thread in threading.enumerate() if thread.name == "governor-callbacks"]:
        thread.join(PATIENCE_S)
        assert not thread.is_alive()
    assert closed_from == [True]


def test_a_callback_due_after_close_still_runs_and_is_reported(runner, caplog):
    future = CallbackFuture(runner)
    ran = []
    future.add_done_callback(lambda done: ran.append(done.result()))
    runner.close()
    with caplog.at_level(logging.ERROR, logger="concurrent.futures"):
        on_manager(runner, lambda: future.set_result(7))
    assert ran == [7]
    assert any("after the callback runner closed" in record.message for record in caplog.records)


def test_a_runner_without_deferred_callbacks_starts_no_thread(runner):
    future = CallbackFuture(runner)
    concurrent.futures.wait([future], timeout=0)
    on_manager(runner, lambda: future.set_result(None))
    assert concurrent.futures.wait([future], timeout=PATIENCE_S).done == {future}
    assert not [thread for thread in threading.enumerate() if thread.name == "governor-callbacks"]


# ------------------------------------------------------------ wired into the supervisor

@pytest.mark.parametrize("ending", ["hold_until", "segfault"])
def test_a_blocking_done_callback_never_stalls_the_lanes(make_supervisor, tmp_path, ending):
    """A task's done-callback that blocks (on a finished or a crashed task, both resolved
    on the manager thread) leaves every lane running: other tasks start and end."""
    sup = make_supervisor(workers=2, spares=0)
    go, release, entered = tmp_path / "go", threading.Event(), threading.Event()
    held = sup.submit("hold_until", str(tmp_path / "started"), str(go))
    wait_for_path(str(tmp_path / "started"))
    target = held if ending == "hold_until" else sup.submit("segfault")

    def blocking(done):
        entered.set()
        release.wait(PATIENCE_S)

    target.add_done_callback(blocking)
    go.touch()
    try:
        assert entered.wait(PATIENCE_S)
        assert sup.submit("echo", "lanes run").result(timeout=PATIENCE_S) == "lanes run"
        assert sup.submit_call(Call("critical_record", (1,))).result(timeout=PATIENCE_S) is not None
        assert held.result(timeout=PATIENCE_S) is not None
    finally:
        release.set()


def test_a_workflow_future_defers_its_callbacks_too(make_supervisor):
    sup = make_supervisor(workers=1, spares=0)
    ran_on = []
    future = sup.workflow([Call("echo", ("a",))])
    future.add_done_callback(lambda done: ran_on.append(threading.current_thread().name))
    assert future.result(timeout=PATIENCE_S) == ["a"]
    sup.shutdown(wait=True)  # the callbacks due have run when it returns
    assert ran_on and ran_on[0] != "governor-manager"
