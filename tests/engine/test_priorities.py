"""Priorities in the pool lane: a higher priority starts first, first come first served
within one, and aging (AGING_S of waiting is worth one step of priority) so that none
waits for ever."""

from governor import Call
from governor.engine import queues
from governor.limits import Lane, Limits
from governor.task import Task
from step_library import wait_for_path


def test_a_high_priority_task_queued_behind_six_starts_among_the_first_four(make_supervisor, tmp_path):
    dispatched = []  # tags in the order the tasks left the queue (on_dispatch runs on the manager thread)
    sup = make_supervisor(workers=2, spares=0, on_dispatch=lambda task: dispatched.append(task.args[-1]))
    go = str(tmp_path / "go")
    held = [sup.submit("hold_until", str(tmp_path / f"held{n}"), go) for n in range(2)]
    for n in range(2):
        wait_for_path(str(tmp_path / f"held{n}"))  # every pool worker is busy
    low = [sup.submit_call(Call("timed_sleep", (1, f"low{n}"))) for n in range(6)]
    high = sup.submit_call(Call("timed_sleep", (1, "high"), priority=10))
    open(go, "w").close()
    for future in held + low + [high]:
        future.result(timeout=60)
    order = dispatched[2:]
    assert order.index("high") < 4, order
    assert [tag for tag in order if tag != "high"] == [f"low{n}" for n in range(6)], "first come first served"


def ranked(now: float, priority: int) -> Task:
    return Task(0, "step", Lane.POOL, (), {}, Limits(), now, priority=priority)


def test_aging_lets_a_long_wait_go_before_a_later_higher_priority():
    queue = queues.RankedQueue()
    old = ranked(0.0, 0)
    queue.append(old)
    soon = ranked(0.5 * queues.AGING_S, 1)  # came 0.5 steps later, one step higher: first
    late = ranked(5.0 * queues.AGING_S, 3)  # came 5 steps later, 3 steps higher: after the old one
    queue.append(late)
    queue.append(soon)
    tie = ranked(0.0, 0)
    queue.append(tie)
    assert [queue.popleft() for _ in range(len(queue))] == [soon, old, tie, late]
    assert not queue
