"""Supervisor as a ``concurrent.futures.Executor``: code written for ProcessPoolExecutor runs on it.

``run_stdlib_patterns`` is the usage of the ``concurrent.futures`` documentation (map,
submit with ``as_completed``, ``wait``, ``with``, ``shutdown``, exceptions, callbacks): it
runs once on a ``ProcessPoolExecutor`` and once on a ``Supervisor`` over the same
functions, registered as steps, and both must give the same record.
"""

import concurrent.futures
import warnings
from concurrent.futures import FIRST_COMPLETED, FIRST_EXCEPTION, ProcessPoolExecutor

import pytest

import api_steps
from api_steps import PRIMES, Accumulate, fail, hold_until, is_prime, not_registered, power, registry
from governor import (InvalidParameters, StepCancelled, StepRegistry, Supervisor, SupervisorClosed,
                      UnknownStep)
from step_library import wait_for_path


def run_stdlib_patterns(executor_class, **options):
    """The stdlib's own executor usage, written once; returns what it observed."""
    seen = {}
    # The documentation's ProcessPoolExecutor example: map in a with block.
    with executor_class(**options) as executor:
        seen["primes"] = [(number, prime) for number, prime in zip(PRIMES, executor.map(is_prime, PRIMES))]
        seen["map_two_iterables"] = list(executor.map(power, [1, 2, 3, 4], [3, 2, 1]))
        seen["map_chunked"] = list(executor.map(power, range(10), chunksize=3))
        # submit + as_completed, keyed by future, as the ThreadPoolExecutor example does.
        future_to_n = {executor.submit(power, n): n for n in range(8)}
        seen["as_completed"] = sorted((future_to_n[future], future.result())
                                      for future in concurrent.futures.as_completed(future_to_n, timeout=60))
        # wait: everything, then the first exception.
        done, not_done = concurrent.futures.wait([executor.submit(power, 2, 10), executor.submit(power, 3)],
                                                 timeout=60)
        seen["wait_all"] = (sorted(future.result() for future in done), len(not_done))
        failing = executor.submit(fail, "boom")
        done, _ = concurrent.futures.wait([failing], timeout=60, return_when=FIRST_EXCEPTION)
        seen["exception"] = repr(failing.exception())
        try:
            failing.result()
        except ValueError as error:  # the step's own exception, as the stdlib re-raises it
            seen["except_value_error"] = (str(error), "traceback" in str(error.__cause__))
        done, _ = concurrent.futures.wait([executor.submit(power, 5)], timeout=60, return_when=FIRST_COMPLETED)
        seen["first_completed"] = [future.result() for future in done]
        # An exception in map is raised where its result is reached.
        results = executor.map(power, [2, "x"], [2, 2])
        seen["map_first"] = next(results)
        try:
            next(results)
        except TypeError as error:
            seen["map_error"] = type(error).__name__
        # Callbacks run with the finished future.
        called = []
        callback_future = executor.submit(power, 7)
        callback_future.add_done_callback(lambda future: called.append(future.result()))
        callback_future.result(timeout=60)
        concurrent.futures.wait([callback_future])
        seen["callback"] = called
        seen["is_executor"] = isinstance(executor, concurrent.futures.Executor)
    # Without a with block: construct, submit, shut down; no submission after that.
    executor = executor_class(**options)
    futures = [executor.submit(power, n, exponent=3) for n in range(4)]
    executor.shutdown(wait=True)
    seen["after_shutdown"] = [future.result() for future in futures]
    try:
        executor.submit(power, 1)
    except RuntimeError:  # SupervisorClosed is a RuntimeError
        seen["submit_after_shutdown"] = "RuntimeError"
    return seen


def test_code_written_for_process_pool_executor_runs_unchanged_on_a_supervisor():
    expected = run_stdlib_patterns(ProcessPoolExecutor, max_workers=2)
    assert expected["primes"][0] == (PRIMES[0], True), "the stdlib run itself is sound"
    assert expected["submit_after_shutdown"] == "RuntimeError"
    assert run_stdlib_patterns(Supervisor, registry=registry, workers=2) == expected


def test_submit_takes_a_registered_function_or_class_as_well_as_its_name():
    with Supervisor(registry, workers=1) as sup:
        assert sup.submit(power, 3).result(timeout=60) == 9
        assert sup.submit("power", 3).result(timeout=60) == 9
        by_class = sup.submit(Accumulate, [1, 2, 3])
        assert by_class.result(timeout=60) == 6 and by_class.step == "Accumulate"
        assert sup.run_batch([(power, {"base": 2}), (Accumulate, ([4, 5],), {})], timeout=60) == [4, 9]
        assert sup.classify(Accumulate)[0].value == "critical"
        with pytest.raises(InvalidParameters, match="'power'"):
            sup.submit(power, 1, 2, 3)


def test_an_unregistered_callable_says_how_to_register_it():
    with Supervisor(registry, workers=1) as sup:
        with pytest.raises(UnknownStep) as raised:
            sup.submit(not_registered, 1)
        message = str(raised.value)
        assert "api_steps.not_registered" in message and "@registry.step" in message
        with pytest.raises(UnknownStep, match="register"):
            sup.submit(lambda: None)
        with pytest.raises(UnknownStep, match="coroutine_step"):
            sup.submit(api_steps.coroutine_step)


def test_a_function_registered_under_two_names_must_be_submitted_by_name():
    twice = StepRegistry()
    twice.register(power, name="square", critical=False)
    twice.register(power, name="cube", critical=False)
    with Supervisor(twice, workers=1) as sup:
        with pytest.raises(UnknownStep, match="'square', 'cube'"):
            sup.submit(power, 2)
        assert sup.submit("cube", 2, 3).result(timeout=60) == 8


@pytest.mark.parametrize("bad", [3, None, b"power", ["power"]])
def test_a_step_of_another_type_is_a_clear_type_error(bad):
    sup = Supervisor(registry, workers=1)  # never started: the type is checked first
    with pytest.raises(TypeError) as raised:
        sup.submit(bad)
    message = str(raised.value)
    assert "registered name or by its registered function or class" in message
    assert "Attribute(" not in message and "must be <class" not in message, "not attrs' validator text"
    sup.shutdown()


def test_shutdown_cancel_futures_cancels_the_queued_and_lets_the_running_finish(tmp_path):
    sup = Supervisor(registry, workers=1).start()
    running = sup.submit(hold_until, str(tmp_path / "started"), str(tmp_path / "go"))
    wait_for_path(str(tmp_path / "started"))
    pending = [sup.submit(power, n) for n in range(5)]
    sup.shutdown(wait=False, cancel_futures=True)
    (tmp_path / "go").touch()
    sup.shutdown(wait=True)
    assert running.result() > 0, "a running step finishes, as with the stdlib"
    assert all(future.cancelled() for future in pending)
    with pytest.raises(StepCancelled, match="shutdown"):
        pending[0].result()


def test_shutdown_cancel_running_is_our_extension(tmp_path):
    sup = Supervisor(registry, workers=1).start()
    running = sup.submit(hold_until, str(tmp_path / "started"), str(tmp_path / "never"))
    wait_for_path(str(tmp_path / "started"))
    sup.shutdown(wait=True, cancel_futures=True, cancel_running=True)
    assert running.cancelled()


def test_cancel_pending_still_works_with_a_deprecation_warning(tmp_path):
    sup = Supervisor(registry, workers=1).start()
    running = sup.submit(hold_until, str(tmp_path / "started"), str(tmp_path / "go"))
    wait_for_path(str(tmp_path / "started"))
    pending = sup.submit(power, 2)
    with pytest.warns(DeprecationWarning, match="cancel_futures"):
        sup.shutdown(wait=False, cancel_pending=True)
    (tmp_path / "go").touch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling does not warn
        sup.shutdown(wait=True, cancel_futures=False)
    assert pending.cancelled() and running.result() > 0


def test_the_first_submission_starts_a_supervisor_once_even_from_many_threads():
    sup = Supervisor(registry, workers=2)
    with concurrent.futures.ThreadPoolExecutor(8) as threads:
        futures = list(threads.map(lambda n: sup.submit(power, n), range(16)))
    assert [future.result(timeout=60) for future in futures] == [n * n for n in range(16)]
    sup.shutdown()
    with pytest.raises(SupervisorClosed):
        sup.submit(power, 1)


def test_a_supervisor_shut_down_before_it_started_takes_no_work():
    sup = Supervisor(registry, workers=1)
    sup.shutdown()
    with pytest.raises(SupervisorClosed):
        sup.submit(power, 1)
    with pytest.raises(SupervisorClosed):
        sup.start()
