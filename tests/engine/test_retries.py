"""Retries: a failed attempt whose exception the step lists in ``retry_on`` runs again after
a backoff; the last failure ends the task ``EXHAUSTED`` and says how many attempts ran."""

import pytest

from governor import Limits, TaskState
from governor.errors import RegistrationError
from governor import Call, StepRegistry


def test_a_step_that_fails_twice_returns_on_its_third_attempt(supervisor, tmp_path):
    future = supervisor.submit("flaky", str(tmp_path / "count"), 2)
    assert future.result(timeout=60) == 3
    assert future.state is TaskState.DONE
    assert supervisor.metrics()["retries"]["pool"]["flaky"] == 2


def test_a_step_that_always_fails_runs_four_attempts_and_ends_exhausted(supervisor, tmp_path):
    counter = tmp_path / "count"
    future = supervisor.submit("flaky", str(counter), 100)
    with pytest.raises(OSError) as failed:
        future.result(timeout=60)
    assert future.state is TaskState.EXHAUSTED
    assert counter.read_text() == "4"
    assert "all 4 attempts failed" in "".join(failed.value.__notes__)
    assert supervisor.metrics()["tasks"]["pool"]["flaky"] == {"exhausted": 1}


def test_a_timeout_is_never_retried_even_when_retry_on_covers_it(supervisor, tmp_path):
    counter = tmp_path / "count"  # flaky_hang retries on any Exception, StepTimeout included
    future = supervisor.submit_call(Call("flaky_hang", (str(counter),), limits=Limits(timeout_s=0.5)))
    with pytest.raises(TimeoutError):
        future.result(timeout=60)
    assert future.state is TaskState.TIMED_OUT and counter.read_text() == "1"


def test_a_critical_step_retries_only_if_idempotent():
    local = StepRegistry()
    with pytest.raises(RegistrationError, match="idempotent"):
        local.register(lambda: None, name="send", critical=True, retries=2, retry_on=(OSError,))
    assert local.register(lambda: None, name="save", critical=True, retries=2, retry_on=(OSError,),
                          idempotent=True).retries == 2


@pytest.mark.parametrize("critical_workers", [1, 2])
def test_a_critical_retry_keeps_its_place_in_its_keys_order(make_supervisor, tmp_path, critical_workers):
    """The next step of the key, queued behind a step that fails once, starts only after its
    retry ran: the retry waits out its backoff at the head of the queue (one critical worker:
    the lane's one order; two: the key's)."""
    from governor.bench.ledger_steps import runs

    sup = make_supervisor(workers=1, critical_workers=critical_workers)
    ledger = str(tmp_path / "ledger.db")
    first = sup.submit("ledger_flaky", ledger=ledger, key="a", name="a1", failures=1)
    second = sup.submit("ledger_once", ledger=ledger, key="a", name="a2")
    assert [first.result(timeout=60), second.result(timeout=60)] == ["a1", "a2"]
    assert runs(ledger) == ["a1", "a1", "a2"]
