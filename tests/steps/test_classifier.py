"""StepClassifier: the rules, their precedence and their validation."""

import pytest

from governor.errors import RegistrationError
from governor.limits import Lane
from governor.steps.classifier import CRITICAL_STEP_NAMES, CRITICAL_TAGS, POOL_TAGS, StepClassifier
from governor.steps.spec import Classification, StepSpec


def noop() -> None:
    """Do nothing."""


def spec(name: str = "some.step", **declared) -> StepSpec:
    return StepSpec(name=name, fn=noop, **declared)


def test_nothing_matched_is_critical_by_default():
    assert StepClassifier.empty().classify(spec()) == Classification(
        Lane.CRITICAL, "no rule matched: critical by default (conservative)")
    assert StepClassifier.with_defaults().classify(spec("git.status")).lane is Lane.CRITICAL


@pytest.mark.parametrize("critical, lane, opposite", [(True, Lane.CRITICAL, Lane.POOL),
                                                      (False, Lane.POOL, Lane.CRITICAL)])
def test_declared_critical_wins_over_every_rule(critical, lane, opposite):
    classifier = StepClassifier(names={"chat.create": opposite}, tags={"write": opposite},
                                patterns={"chat.*": opposite})
    decided = classifier.classify(spec("chat.create", critical=critical, tags={"write"}))
    assert decided == Classification(lane, f"declared critical={critical}")


@pytest.mark.parametrize("name", CRITICAL_STEP_NAMES)
def test_builtin_names_are_critical(name):
    assert StepClassifier.with_defaults().classify(spec(name)) == Classification(
        Lane.CRITICAL, f"name matches rule {name!r} (critical)")


@pytest.mark.parametrize("tag", CRITICAL_TAGS)
def test_builtin_critical_tags(tag):
    assert StepClassifier.with_defaults().classify(spec(tags={tag})) == Classification(
        Lane.CRITICAL, f"tag {tag!r} is critical")


@pytest.mark.parametrize("tag", POOL_TAGS)
def test_builtin_pool_tags(tag):
    assert StepClassifier.with_defaults().classify(spec(tags={tag})) == Classification(
        Lane.POOL, f"tag {tag!r} is pool")


def test_category_is_matched_like_a_tag():
    classifier = StepClassifier.with_defaults()
    assert classifier.classify(spec(category="query")) == Classification(Lane.POOL, "category 'query' is pool")
    assert classifier.classify(spec(category="workflow")).lane is Lane.CRITICAL


def test_tags_and_categories_match_case_insensitively():
    classifier = StepClassifier(tags={"Read-Only": Lane.POOL})
    assert classifier.classify(spec(tags={"READ-ONLY"})) == Classification(
        Lane.POOL, "tag 'READ-ONLY' is pool")
    assert classifier.classify(spec(category="read-only")).lane is Lane.POOL


def test_a_critical_tag_beats_a_pool_tag():
    decided = StepClassifier.with_defaults().classify(spec(tags={"query", "write"}))
    assert decided == Classification(Lane.CRITICAL, "tag 'write' is critical")


def test_name_rule_beats_tag_rules():
    classifier = StepClassifier(names={"git.status": "pool"}, tags={"write": "critical"})
    assert classifier.classify(spec("git.status", tags={"write"})) == Classification(
        Lane.POOL, "name matches rule 'git.status' (pool)")


def test_tag_rules_beat_patterns():
    classifier = StepClassifier(patterns={"git.*": "pool"}, tags={"mutating": "critical"})
    assert classifier.classify(spec("git.commit", tags={"mutating"})).reason == "tag 'mutating' is critical"
    assert classifier.classify(spec("git.log")) == Classification(
        Lane.POOL, "name matches pattern 'git.*' (pool)")


def test_a_critical_pattern_beats_a_pool_pattern():
    classifier = StepClassifier(patterns={"git.*": "pool", "*.commit": "critical"})
    assert classifier.classify(spec("git.commit")) == Classification(
        Lane.CRITICAL, "name matches pattern '*.commit' (critical)")
    assert classifier.classify(spec("hg.status")).reason.startswith("no rule matched")


def test_patterns_are_case_sensitive_globs():
    classifier = StepClassifier(patterns={"git.*": Lane.POOL})
    assert classifier.classify(spec("GIT.status")).lane is Lane.CRITICAL


def test_a_later_rule_replaces_an_earlier_one():
    classifier = StepClassifier.with_defaults()
    classifier.add_name("task.execute", "pool")
    classifier.add_tag("WRITE", "pool")
    assert classifier.classify(spec("task.execute")).lane is Lane.POOL
    assert classifier.classify(spec(tags={"write"})).lane is Lane.POOL


def test_add_methods_match_the_constructor():
    classifier = StepClassifier.empty()
    classifier.add_name("a.b", Lane.POOL)
    classifier.add_pattern("x.*", "pool")
    classifier.add_tag("fast", "pool")
    assert [classifier.classify(spec(name, tags=tags)).lane
            for name, tags in [("a.b", ()), ("x.y", ()), ("q", {"fast"})]] == [Lane.POOL] * 3


@pytest.mark.parametrize("method", ["add_name", "add_pattern", "add_tag"])
@pytest.mark.parametrize("key", ["", "   ", "two words", None, 3])
def test_rules_need_a_word(method, key):
    with pytest.raises(RegistrationError, match="must be a non-empty string without whitespace"):
        getattr(StepClassifier.empty(), method)(key, Lane.POOL)


@pytest.mark.parametrize("lane", ["parallel", "CRITICAL", True, None, 1])
def test_lanes_must_be_lanes(lane):
    with pytest.raises(RegistrationError, match=r"lane of name rule 'x' must be Lane.CRITICAL, Lane.POOL"):
        StepClassifier(names={"x": lane})


def test_lane_strings_are_converted():
    classifier = StepClassifier(names={"a": "critical", "b": "pool"})
    assert [classifier.classify(spec(name)).lane for name in "ab"] == [Lane.CRITICAL, Lane.POOL]
