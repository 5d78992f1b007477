"""A step's parameters checked like a command line's: unknown names with their closest match,
values by annotation (JSON values from the socket, texts from ``-p``). No processes."""

import pathlib
from typing import Dict, List, Optional

import pytest

from governor.errors import InvalidParameters
from governor.steps.parameters import ParameterType, StepParameters


def fetch(url: str, delay: float = 0.5, retries: int = 3, verbose: bool = False, out: Optional[pathlib.Path] = None,
          headers: Dict[str, str] = None, tags: List[str] = (), extra=None, *, note: "str | None" = None):
    return url


def parameters_of(fn) -> StepParameters:
    return StepParameters.of("fetch", fn)


def test_an_unknown_name_is_named_with_its_closest_match():
    said = parameters_of(fetch).unknown(["uri", "delay", "zzz", "retires"])
    assert said == ("unknown parameter 'uri', did you mean 'url'?; unknown parameter 'zzz'; "
                    "unknown parameter 'retires', did you mean 'retries'?")
    assert parameters_of(fetch).unknown(["url", "note"]) is None


def test_a_step_taking_any_keyword_has_no_unknown_name():
    def open_step(**anything):
        pass
    assert parameters_of(open_step).unknown(["whatever"]) is None


@pytest.mark.parametrize("name, text, value", [
    ("url", "5", "5"),  # text stays text for a str, though it parses as JSON
    ("delay", "2", 2.0), ("delay", "1e-3", 0.001),
    ("retries", "7", 7),
    ("verbose", "yes", True), ("verbose", "False", False), ("verbose", "0", False),
    ("out", "out.txt", "out.txt"), ("out", "null", "null"),  # a path may be named null
    ("headers", '{"a": "b"}', {"a": "b"}), ("headers", "null", None),
    ("tags", '["x", "y"]', ["x", "y"]),
    ("extra", "5", 5), ("extra", "five", "five"),  # unannotated: JSON when it parses, else text
    ("note", "null", "null"),  # text: "null" is the word, not no value
])
def test_texts_are_converted_by_the_annotation(name, text, value):
    converted = parameters_of(fetch).from_texts({name: text})
    assert converted == {name: value} and type(converted[name]) is type(value)


@pytest.mark.parametrize("name, text, takes", [
    ("delay", "abc", "a number (float)"), ("delay", "nan", "a number (float)"),
    ("retries", "2.5", "an integer (int)"), ("verbose", "maybe", "true or false (bool)"),
    ("headers", "[1]", "a JSON object or null (dict)"), ("tags", "x,y", "a JSON array (list)"),
])
def test_a_text_that_means_no_value_of_the_annotation_is_refused_with_the_parameters_name(name, text, takes):
    with pytest.raises(InvalidParameters) as refused:
        parameters_of(fetch).from_texts({"url": "u", name: text})
    assert str(refused.value) == f"step 'fetch': parameter {name!r} takes {takes}, not {text!r}"


def test_texts_with_an_unknown_name_are_refused_before_any_conversion():
    with pytest.raises(InvalidParameters, match="unknown parameter 'dealy', did you mean 'delay'"):
        parameters_of(fetch).from_texts({"url": "u", "dealy": "abc"})


@pytest.mark.parametrize("params", [
    {"url": "u", "delay": 1}, {"url": "u", "delay": 1.5, "retries": 2, "verbose": True, "out": None,
                               "headers": {}, "tags": ["a"], "extra": object(), "note": None},
])
def test_json_values_of_the_annotated_kinds_pass(params):
    parameters_of(fetch).check_values(params)


@pytest.mark.parametrize("name, value", [
    ("delay", "abc"), ("delay", True), ("retries", 1.5), ("verbose", 1), ("url", 5), ("url", None),
    ("tags", {"a": 1}), ("headers", ["a"]),
])
def test_json_values_the_annotation_does_not_accept_are_refused(name, value):
    with pytest.raises(InvalidParameters, match=f"step 'fetch': parameter {name!r} takes "):
        parameters_of(fetch).check_values({"url": "u", name: value})


def test_a_class_steps_run_and_annotations_that_do_not_resolve():
    class Step:
        def run(self, count: int, later: "NotImportable" = None):  # noqa: F821
            pass
    described = StepParameters.of("s", Step)
    assert [parameter.type for parameter in described.parameters] == [None, None]  # names only
    assert described.unknown(["cont"]) == "unknown parameter 'cont', did you mean 'count'?"


def test_the_description_survives_the_wire():
    described = parameters_of(fetch)
    assert StepParameters.from_wire("fetch", described.to_wire()) == described
    assert described.to_wire()[1] == {"name": "delay", "kind": "POSITIONAL_OR_KEYWORD", "required": False,
                                      "type": "float", "nullable": False}
    assert ParameterType.of(Optional[List[int]]) == (ParameterType.LIST, True)


def test_only_what_a_call_may_name_is_known_by_name():
    def positional(a: int, /, b: int, *rest: int, **more: int):
        pass
    described = parameters_of(positional)
    assert [parameter.kind for parameter in described.parameters] == [
        "POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD", "VAR_POSITIONAL", "VAR_KEYWORD"]
    assert described.takes_any_keyword and not parameters_of(fetch).takes_any_keyword
    described.check_values({"a": "not checked: it cannot be named", "b": 1})
    with pytest.raises(InvalidParameters, match="parameter 'b' takes an integer"):
        described.check_values({"b": "x"})
