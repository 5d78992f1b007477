"""The daemon checks a request's parameters against the step's signature and annotations
before it journals anything: a real ``governor serve`` (tests/daemon_harness.py), a real Client."""

import pytest

from daemon_harness import daemon  # noqa: F401 (daemon: a fixture)
from governor import Call
from governor.client import Client
from governor.errors import InvalidParameters


def test_a_value_its_annotation_does_not_take_is_refused_before_anything_is_journaled(daemon):
    with Client(daemon.socket) as client:
        with pytest.raises(InvalidParameters,
                           match=r"step 'timed_sleep': parameter 'ms' takes a number \(float\), not 'abc'"):
            client.submit("timed_sleep", ms="abc")
        with pytest.raises(InvalidParameters, match=r"parameter 'mb' takes an integer \(int\), not 1\.5"):
            client.run_batch([Call("noop"), Call("child_allocates", kwargs={"marker": "m", "mb": 1.5})])
        with pytest.raises(InvalidParameters, match="parameter 'expected' takes an integer"):
            client.workflow([Call("timed_sleep", kwargs={"ms": 1, "expected": "2"})])
        assert client.status() == []  # nothing journaled, not even the batch's good call
        tag, *_ = client.submit("timed_sleep", ms=1, tag="fine").result(timeout=60)  # an int for a float
        assert tag == "fine"


def test_an_unknown_parameter_is_named_with_its_closest_match(daemon):
    with Client(daemon.socket) as client:
        with pytest.raises(InvalidParameters, match="unknown parameter 'sm', did you mean 'ms'?"):
            client.submit("timed_sleep", sm=5)
        with pytest.raises(InvalidParameters, match="unknown parameter 'colour'$"):
            client.submit("timed_sleep", ms=5, colour="red")


def test_the_steps_reply_describes_each_parameter_for_the_cli(daemon):
    with Client(daemon.socket) as client:
        described = {step["name"]: step for step in client.steps()}
    assert described["timed_sleep"]["parameters"][:2] == [
        {"name": "ms", "kind": "POSITIONAL_OR_KEYWORD", "required": True, "type": "float", "nullable": False},
        {"name": "tag", "kind": "POSITIONAL_OR_KEYWORD", "required": False, "type": "str", "nullable": False}]
    assert described["echo"]["parameters"] == [
        {"name": "value", "kind": "POSITIONAL_OR_KEYWORD", "required": True, "type": None, "nullable": False}]
