"""A busy pool worker gets its next task while it runs a short one ("sent ahead"), so it
starts it the moment it sends its outcome, without sleeping in between. Every promise holds
for the task sent ahead: it waits for the one before it, a cancel keeps it from starting,
and the death of its worker hands it to another worker instead of failing it.

Each test first runs ``hold_until`` a few times with its go file already there, so the
supervisor knows the step as a short one (a step it has never seen, or a long one, gets
nothing sent ahead); then one ``hold_until`` holds the only worker, and the task submitted
behind it shows as running while the worker is still busy: it was sent ahead. A task sent
ahead that waits behind a step that turned out long is taken back once another worker is
free.
"""

import concurrent.futures
import os
import signal

import pytest

from conftest import wait_until
from governor import Call, Limits
from governor.limits import Lane
from governor.engine import slots
from governor.errors import StepCancelled, WorkerCrashed
from step_library import wait_for_path


#: Runs that make a step known as short: its typical time is a moving average that starts at
#: its first run, which a loaded machine (load 25) can make long; 20 runs wash out even a
#: first run 100 times too long.
KNOWN_SHORT_RUNS = 20


def known_short(sup, tmp_path):
    go = tmp_path / "go-now"
    go.touch()
    for number in range(KNOWN_SHORT_RUNS):
        sup.submit("hold_until", str(tmp_path / f"short-{number}"), str(go)).result(timeout=60)


def held(sup, tmp_path, limits=None, name="held"):
    """``hold_until`` running in a worker; returns its future, its go file and its pid."""
    marker, go = tmp_path / name, tmp_path / f"{name}-go"
    future = sup.submit_call(Call("hold_until", (str(marker), str(go)), limits=limits))
    wait_for_path(str(marker))
    return future, go, int(marker.read_text())


def sent_ahead(future):
    """Whether a task behind the held one left the queue for the busy worker."""
    return wait_until(future.running, timeout=30)


def test_a_task_sent_ahead_runs_after_the_task_before_it_in_the_same_worker(make_supervisor, tmp_path):
    sup = make_supervisor(workers=1)
    known_short(sup, tmp_path)
    first, go, worker = held(sup, tmp_path)
    behind = sup.submit("pid")
    assert sent_ahead(behind)
    assert not behind.done()  # it waits for the held one
    go.touch()
    assert first.result(timeout=60) == behind.result(timeout=60) == worker


def test_a_long_step_gets_nothing_sent_ahead(make_supervisor, tmp_path):
    sup = make_supervisor(workers=1)
    first, go, _ = held(sup, tmp_path)  # a step never seen before: not known to be short
    behind = sup.submit("pid")
    assert not wait_until(behind.running, timeout=1.0)
    go.touch()
    first.result(timeout=60)
    behind.result(timeout=60)


def test_a_task_cancelled_while_sent_ahead_never_starts(make_supervisor, tmp_path):
    sup = make_supervisor(workers=1)
    go, arrived = tmp_path / "go", tmp_path / "cancel-arrived"
    # The held step must be known as short too, so something is sent ahead behind it.
    already = tmp_path / "go-now"
    already.touch()
    for number in range(KNOWN_SHORT_RUNS):
        sup.submit("hold_until_cancel_arrives", str(tmp_path / f"short-{number}"), str(already),
                   str(arrived)).result(timeout=60)
    first = sup.submit("hold_until_cancel_arrives", str(tmp_path / "held"), str(go), str(arrived))
    wait_for_path(str(tmp_path / "held"))
    worker = int((tmp_path / "held").read_text())
    marker = tmp_path / "behind-started"
    behind = sup.submit("hold_until", str(marker), str(go))  # it would say so if it started
    assert sent_ahead(behind)
    assert behind.cancel()
    # The cancel must reach the worker before the held step ends (else the task starts and
    # is cancelled as a running one): the held step says when it has.
    wait_for_path(str(arrived))
    go.touch()
    assert first.result(timeout=60) == worker
    with pytest.raises(StepCancelled):
        behind.result(timeout=60)
    assert not marker.exists()
    assert sup.submit("pid").result(timeout=60) == worker  # and its worker was not killed for it


def end_by(death, first, worker):
    """End the held task ``first`` (in ``worker``) by ``death``: its worker killed from
    outside (a crash), or a cancel without grace (a kill of ours)."""
    if death == "outside kill":
        os.kill(worker, signal.SIGKILL)
        with pytest.raises(WorkerCrashed):
            first.result(timeout=60)
    else:
        first.cancel()
        with pytest.raises(StepCancelled):
            first.result(timeout=60)


@pytest.mark.parametrize("death", ["outside kill", "cancel without grace"])
def test_a_task_sent_ahead_goes_to_another_worker_when_its_worker_dies(make_supervisor, tmp_path, death):
    sup = make_supervisor(workers=1)
    known_short(sup, tmp_path)
    first, _, worker = held(sup, tmp_path, limits=Limits(cancel_grace_s=0))
    behind = sup.submit("pid")
    assert sent_ahead(behind)
    end_by(death, first, worker)
    assert behind.result(timeout=60) not in (worker, None)
    assert sup.metrics()["redispatched"]["pool"] == 1
    # Its worker died for the task before it: a death it is not to blame for, which
    # brings it no nearer to failing as a poisoned task (it had not read its arguments).
    assert behind.task.workers_lost == 0


def test_a_task_waiting_behind_a_step_that_turned_out_long_goes_to_a_free_worker(make_supervisor, tmp_path):
    sup = make_supervisor(workers=2)
    known_short(sup, tmp_path)
    holds = {pid: (future, go) for future, go, pid in (held(sup, tmp_path, name=name) for name in "ab")}
    behind = sup.submit("pid")
    assert sent_ahead(behind)
    stuck = behind.task.pid  # the worker it was sent to
    (free, (future, go)), = [(pid, hold) for pid, hold in holds.items() if pid != stuck]
    go.touch()
    assert future.result(timeout=60) == free
    assert behind.result(timeout=30) == free  # taken back from the busy worker, run on the free one
    still, go = holds[stuck]
    assert not still.done()
    assert sup.metrics()["redispatched"]["pool"] == 1
    go.touch()
    assert still.result(timeout=60) == stuck


def test_the_outcome_after_a_task_taken_back_is_never_taken_for_it(make_supervisor, tmp_path, monkeypatch):
    """The race the task socket's ``Skipped`` settles, made to happen: the worker's control
    thread takes ``behind`` back while its held step runs, and its answer (``Revoked``) is
    held (the worker's test hook) until the outcome of the next task sent to that worker has
    come. That outcome must not be taken for ``behind``'s: ``behind`` runs again and returns
    its own value, and the next task returns its own."""
    hook = tmp_path / "hook"
    hook.mkdir()
    monkeypatch.setenv("GOVERNOR_TEST_HOLD_REVOKED", str(hook))
    sup = make_supervisor(workers=2)
    known_short(sup, tmp_path)
    for number in range(KNOWN_SHORT_RUNS):  # echo is known short too
        assert sup.submit("echo", number).result(timeout=60) == number
    holds = {pid: (future, go) for future, go, pid in (held(sup, tmp_path, name=name) for name in "ab")}
    behind = sup.submit("echo", "behind")
    assert sent_ahead(behind)
    stuck = behind.task.pid
    (first, stuck_go), = [hold for pid, hold in holds.items() if pid == stuck]
    (other, other_go), = [hold for pid, hold in holds.items() if pid != stuck]
    other_go.touch()  # a worker is free: behind is asked back from the stuck one
    other.result(timeout=60)
    wait_for_path(str(hook / "revoked"))  # taken back in the worker; Revoked not sent
    stuck_go.touch()
    assert first.result(timeout=60) == stuck  # the outcome before behind's place
    # The free worker held by a step not known to be short: the next task is sent ahead
    # to the stuck worker (where behind looked started, had its Skipped been missed).
    meeting, meeting_go = tmp_path / "meeting", tmp_path / "meeting-go"
    meeting.mkdir()
    holder = sup.submit("meet", str(meeting), "holder", 2, str(meeting_go))
    wait_for_path(str(meeting / "holder"))
    after = sup.submit("echo", "after")
    concurrent.futures.wait([behind, after], timeout=60, return_when=concurrent.futures.FIRST_COMPLETED)
    (hook / "answer").touch()  # Revoked now comes after that outcome
    assert behind.result(timeout=60) == "behind"
    assert after.result(timeout=60) == "after"
    meeting_go.touch()
    assert holder.result(timeout=60) == "holder"


def test_a_late_answer_about_a_task_taken_back_never_takes_back_its_next_sending(make_supervisor, tmp_path,
                                                                                monkeypatch):
    """A task taken back may be sent ahead to the same worker again, and asked back again
    once the worker has taken it. The worker's answer about the first sending (its
    ``Revoked``, held here by the worker's test hook) then arrives while the second runs:
    it must not take the second back, or the task runs twice and the worker's next outcome
    is taken for another task's. Answers name the assignment's number, not only the task."""
    hook = tmp_path / "hook"
    hook.mkdir()
    monkeypatch.setenv("GOVERNOR_TEST_HOLD_REVOKED", str(hook))
    sup = make_supervisor(workers=2)
    known_short(sup, tmp_path)
    monkeypatch.setattr(slots, "SEND_AHEAD_BELOW_S", 60.0)  # hold_until, however slow it ran, is short
    lanes = sup._manager._backends[Lane.POOL]  # private, read only: what the supervisor believes of a run
    first, first_go, stuck = held(sup, tmp_path, name="first")
    # The other worker runs steps never seen before: nothing is sent ahead to it.
    other, other_go = tmp_path / "other", tmp_path / "other-go"
    other.mkdir()
    sup.submit("meet", str(other), "other", 2, str(other_go))
    wait_for_path(str(other / "other"))
    behind_marker, behind_go = tmp_path / "behind", tmp_path / "behind-go"
    behind = sup.submit("hold_until", str(behind_marker), str(behind_go))
    second_marker, second_go = tmp_path / "second", tmp_path / "second-go"
    second = sup.submit("hold_until", str(second_marker), str(second_go))
    assert sent_ahead(behind) and sent_ahead(second)
    assert behind.task.pid == second.task.pid == stuck
    other_go.touch()  # a worker is free: both are asked back; the worker's answer about behind is held
    wait_for_path(str(hook / "revoked"))
    again_marker, again_go = tmp_path / "again", tmp_path / "again-go"
    sup.submit("hold_until_cancel_arrives", str(again_marker), str(again_go), str(tmp_path / "unused"))
    wait_for_path(str(again_marker))  # the free worker is busy again, with a step never seen
    first_go.touch()  # the stuck worker skips behind, and takes second (its control thread is held)
    assert first.result(timeout=60) == stuck
    wait_for_path(str(second_marker))

    def behind_sent_ahead_again():
        run = lanes._running.get(behind.task.id)
        return run is not None and run.slot.pid == stuck and run in run.slot.aheads
    assert wait_until(behind_sent_ahead_again, timeout=30)  # behind's Skipped came; behind went back
    again_go.touch()  # a worker is free again: behind's second sending is asked back too
    assert wait_until(lambda: getattr(lanes._running.get(behind.task.id), "taking_back", False), timeout=30)
    second_go.touch()  # ... but the worker takes it as second ends (its control thread is still held)
    assert second.result(timeout=60) == stuck
    wait_for_path(str(behind_marker))
    (hook / "answer").touch()  # the late Revoked about behind's first sending comes now
    assert not wait_until(lambda: sup.metrics()["redispatched"]["pool"] > 1, timeout=3), (
        "a late answer about behind's first sending took back its second, which the worker runs")
    behind_go.touch()
    assert behind.result(timeout=60) == stuck


def test_runs_cut_short_by_a_cancel_never_make_a_long_step_look_short(make_supervisor, tmp_path, monkeypatch):
    """A cancelled run's time is how soon the cancel came, not how long the step takes:
    counted, a step that only ever ends by cancel would look short, and tasks would be
    sent ahead to wait behind it."""
    monkeypatch.setattr(slots, "SEND_AHEAD_BELOW_S", 60.0)  # any run that ended counts as short
    sup = make_supervisor(workers=1)
    for number in range(3):
        marker = tmp_path / f"cut-{number}"
        cut = sup.submit("cooperative", str(marker))
        wait_for_path(str(marker))
        cut.cancel()
        with pytest.raises(StepCancelled):
            cut.result(timeout=60)
    marker = tmp_path / "running"
    running = sup.submit("cooperative", str(marker))
    wait_for_path(str(marker))
    behind = sup.submit("pid")
    assert not wait_until(behind.running, timeout=2), "sent ahead behind a step never seen to end"
    running.cancel()
    assert behind.result(timeout=60) > 0


def known_short_pid(sup, monkeypatch):
    """``pid`` known as short too; and every step that ran counts as short, however slowly
    the loaded machine ran it: how deep a worker's send-ahead goes is the typical times'
    business (``SEND_AHEAD_BELOW_S``), and these tests are about what a deep one does."""
    monkeypatch.setattr(slots, "SEND_AHEAD_BELOW_S", 60.0)
    for _ in range(5):
        sup.submit("pid").result(timeout=60)


def test_a_busy_worker_gets_several_short_tasks_sent_ahead_and_runs_them_in_order(make_supervisor, tmp_path,
                                                                                  monkeypatch):
    sup = make_supervisor(workers=1)
    known_short(sup, tmp_path)
    known_short_pid(sup, monkeypatch)
    first, go, worker = held(sup, tmp_path)
    behind = [sup.submit("pid") for _ in range(4)]
    assert all(sent_ahead(future) for future in behind)  # more than one deep
    assert not any(future.done() for future in behind)
    go.touch()
    assert first.result(timeout=60) == worker
    assert [future.result(timeout=60) for future in behind] == [worker] * 4
    starts = [future.task.started_at for future in behind]
    assert starts == sorted(starts)  # in the order they were submitted


@pytest.mark.parametrize("death", ["outside kill", "cancel without grace"])
def test_a_death_costs_only_the_task_that_ran_however_many_were_sent_ahead(make_supervisor, tmp_path, death,
                                                                          monkeypatch):
    sup = make_supervisor(workers=1)
    known_short(sup, tmp_path)
    known_short_pid(sup, monkeypatch)
    first, _, worker = held(sup, tmp_path, limits=Limits(cancel_grace_s=0))
    behind = [sup.submit("pid") for _ in range(4)]
    assert all(sent_ahead(future) for future in behind)
    end_by(death, first, worker)
    pids = [future.result(timeout=60) for future in behind]
    assert worker not in pids and None not in pids
    assert sup.metrics()["redispatched"]["pool"] == 4
    assert [future.task.workers_lost for future in behind] == [0] * 4  # none blamed for the death
