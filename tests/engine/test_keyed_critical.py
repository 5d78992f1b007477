"""Keyed critical lanes: one at a time per key in submission order, keys in parallel, and a
critical step without a key as a barrier. Ordered by the times each step recorded."""

import pytest

from conftest import wait_until

from governor import StepRegistry
from governor.errors import RegistrationError

KEYS = "abcd"
ROUNDS = 8


def overlap(first, second) -> bool:
    return first[1] < second[2] and second[1] < first[2]


def test_same_key_in_order_keys_in_parallel_and_a_keyless_step_alone(make_supervisor):
    sup = make_supervisor(workers=1, critical_workers=4)
    before, after = [], []
    for round_number in range(ROUNDS):
        if round_number == ROUNDS // 2:
            barrier = sup.submit("critical_record", 50, "barrier")
        for key in KEYS:
            future = sup.submit("keyed_record", key, 50, f"{key}{round_number}")
            (before if round_number < ROUNDS // 2 else after).append((key, future))
    runs = {key: [future.result(timeout=120) for k, future in before + after if k == key] for key in KEYS}
    alone = barrier.result(timeout=120)

    for key, steps in runs.items():
        assert [step[0] for step in steps] == [f"{key}{n}" for n in range(ROUNDS)], "submission order per key"
        for earlier, later in zip(steps, steps[1:]):
            assert earlier[2] <= later[1], f"two steps of key {key} overlapped: {earlier} {later}"
    assert any(overlap(first, second) for one in KEYS for two in KEYS if one < two
               for first in runs[one] for second in runs[two]), "no two keys ever ran at once"
    assert len({step[3] for steps in runs.values() for step in steps}) > 1, "the keys ran in one worker"
    assert max(future.result()[2] for _, future in before) <= alone[1], "the barrier started before earlier steps ended"
    assert alone[2] <= min(future.result()[1] for _, future in after), "a later step started before the barrier ended"


def test_a_workflow_takes_its_steps_key_and_keeps_other_keys_running(make_supervisor):
    sup = make_supervisor(workers=1, critical_workers=2)
    flow = sup.workflow([("keyed_record", {"chat": "a", "ms": 50, "tag": "a1"}),
                         ("keyed_record", {"chat": "a", "ms": 50, "tag": "a2"})])
    other = sup.submit("keyed_record", "b", 2000, "b1")
    assert wait_until(lambda: "b" in {worker["key"] for worker in sup.describe_workers()}), "workers show the key"
    first, second = flow.result(timeout=120)
    assert all(step.task.key == "a" for step in flow.steps)
    assert first[2] <= second[1]
    assert overlap(first, other.result(timeout=120)), "the workflow held back another key"


def test_a_key_must_name_a_parameter_of_a_critical_step():
    local = StepRegistry()
    with pytest.raises(RegistrationError, match="not one of its parameters"):
        local.register(lambda chat_id: chat_id, name="send", critical=True, key="chat")
    with pytest.raises(RegistrationError, match="pool step"):
        local.register(lambda chat_id: chat_id, name="read", critical=False, key="chat_id")
    spec = local.register(lambda chat_id, text="": chat_id, name="post", critical=True, key="chat_id")
    assert spec.key == "chat_id"



def test_metrics_show_the_critical_queue_per_key_for_the_keys_with_the_most(make_supervisor, tmp_path):
    from governor.engine.metrics import TOP_KEYS

    sup = make_supervisor(workers=1, critical_workers=1)
    ledger, gate = str(tmp_path / "ledger.db"), tmp_path / "gate"
    held = sup.submit("ledger_once", ledger=ledger, key="held", name="held", gate=str(gate))
    assert wait_until(lambda: any(worker["key"] == "held" for worker in sup.describe_workers()), timeout=60)
    queued = [sup.submit("ledger_once", ledger=ledger, key=key, name=f"{key}{n}")
              for key, times in [("a", 3), ("b", 2)] + [(f"k{n}", 1) for n in range(TOP_KEYS)]
              for n in range(times)]
    by_key = sup.metrics()["critical_queue_by_key"]
    assert len(by_key) == TOP_KEYS and list(by_key.items())[:2] == [("a", 3), ("b", 2)]
    assert 'governor_critical_queue_depth_by_key{key="a"} 3.0' in sup.prometheus_text()
    gate.touch()
    assert [future.result(timeout=120) for future in [held] + queued][0] == "held"
    assert sup.metrics()["critical_queue_by_key"] == {}
