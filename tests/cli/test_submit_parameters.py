"""``governor submit -p NAME=TEXT`` as a user types it: each text converted by the step's
annotation, an unknown name or a bad value refused before anything is submitted. A real
daemon (tests/daemon_harness.py), the real command in a subprocess."""

import json

from daemon_harness import daemon  # noqa: F401 (daemon: a fixture)
from governor.cli import EXIT_CODES


def test_a_value_the_annotation_does_not_take_is_refused_with_the_parameters_name(daemon):
    refused = daemon.cli("submit", "timed_sleep", "-p", "ms=abc", "--wait")
    assert refused.returncode == EXIT_CODES["bad_request"], refused.stderr
    assert "step 'timed_sleep': parameter 'ms' takes a number (float), not 'abc'" in refused.stderr
    assert json.loads(daemon.cli("status", "--json").stdout) == []


def test_an_unknown_parameter_is_named_with_its_closest_match(daemon):
    refused = daemon.cli("submit", "timed_sleep", "-p", "sm=5")
    assert refused.returncode == EXIT_CODES["bad_request"], refused.stderr
    assert "unknown parameter 'sm', did you mean 'ms'?" in refused.stderr
    assert json.loads(daemon.cli("status", "--json").stdout) == []


def test_texts_are_converted_by_the_annotation_not_guessed(daemon):
    # tag: str takes "5" as text (read as JSON it would be the number 5); ms: float takes "1"
    done = daemon.cli("submit", "timed_sleep", "-p", "ms=1", "-p", "tag=5", "--wait", "--json")
    assert done.returncode == 0, done.stderr
    tag, *_ = json.loads(done.stdout)["result"]
    assert tag == "5"
    # an unannotated parameter still reads its text as JSON when it parses
    echoed = daemon.cli("submit", "echo", "-p", "value=[1, 2]", "--wait", "--json")
    assert json.loads(echoed.stdout)["result"] == [1, 2], echoed.stderr


def test_steps_shows_one_step_in_full_and_names_a_misspelt_one(daemon):
    shown = daemon.cli("steps", "timed_sleep")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == "timed_sleep(ms: float, tag: str = '', meeting: str = '', expected: int = 0)"
    assert lines[1].strip().startswith("Sleep ``ms`` milliseconds")
    assert lines[2].startswith("lane: pool (")
    assert [line.split() for line in lines[lines.index("parameters:") + 1:]] == [
        ["name", "takes", "required"], ["ms", "float", "yes"], ["tag", "str"], ["meeting", "str"], ["expected", "int"]]
    misspelt = daemon.cli("steps", "timed_slep")
    assert misspelt.returncode == EXIT_CODES["bad_request"]
    assert "did you mean 'timed_sleep'" in misspelt.stderr
