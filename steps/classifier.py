"""Which lane a step runs in: the serial CRITICAL lane or the parallel POOL lane.

A step that changes state (creates a chat, sends a message, runs a task or a workflow)
must run alone and in submission order; a read-only step may run in parallel with others.
:class:`StepClassifier` decides from the step's declaration and a few configurable rules.

Precedence, first decision wins:

1. The step's declared ``critical=True``/``False``.
2. An exact-name rule (case-sensitive).
3. Tag rules, matched case-insensitively against the step's tags and its category (a
   category is just one more tag for matching): if any matching rule says critical, the
   step is critical; else if any says pool, it is pool.
4. Glob patterns (:func:`fnmatch.fnmatchcase`) on the name: critical if any matching
   pattern says critical, else pool if a pool pattern matches.
5. Nothing decided: CRITICAL. Wrongly serialising a read-only step only costs speed;
   wrongly parallelising a state-changing one corrupts state.

Within a level critical beats pool for the same reason. Adding a rule for a name, tag or
pattern that already has one replaces it, so the defaults can be overridden.

Rules are meant to be set up before steps are classified: the classifier takes no lock.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from typing import Optional, Union

from governor.errors import RegistrationError
from governor.limits import Lane
from governor.steps.spec import Classification, StepSpec, require_word

LaneLike = Union[Lane, str]

#: Step names that always run in the critical lane under the default rules.
CRITICAL_STEP_NAMES = (
    "IDESendMessageStep", "CreateChatStep", "TaskExecutionStep", "WorkflowExecutionStep",
    "chat.create", "chat.send_message", "task.execute", "workflow.execute",
)
#: Tags (or categories) that make a step critical under the default rules.
CRITICAL_TAGS = ("workflow", "task", "ide", "write", "mutating")
#: Tags (or categories) that let a step run in the pool under the default rules.
POOL_TAGS = ("read-only", "readonly", "query")

CRITICAL_BY_DEFAULT = Classification(Lane.CRITICAL, "no rule matched: critical by default (conservative)")


def _lane(value: LaneLike, rule: str) -> Lane:
    try:
        return Lane(value)
    except ValueError:
        raise RegistrationError(f"the lane of {rule} must be Lane.CRITICAL, Lane.POOL, 'critical' or 'pool', "
                                f"got {type(value).__name__} {value!r}") from None


def _most_cautious(candidates: Iterable[Classification]) -> Optional[Classification]:
    """The first critical candidate, else the first one, else ``None``."""
    # min() keeps the first of equal keys, and False (critical) sorts before True.
    return min(candidates, key=lambda candidate: candidate.lane is not Lane.CRITICAL, default=None)


class StepClassifier:
    """Assigns each step a lane, with the reason, by the precedence in the module docstring.

    Args:
        names: exact step name -> lane.
        patterns: glob pattern on step names -> lane.
        tags: tag or category (any case) -> lane.

    A lane is a :class:`~governor.limits.Lane` or its value, ``"critical"`` or ``"pool"``.

    Raises:
        RegistrationError: for an empty name, pattern or tag, or an unknown lane.
    """

    def __init__(self, *, names: Optional[Mapping[str, LaneLike]] = None,
                 patterns: Optional[Mapping[str, LaneLike]] = None,
                 tags: Optional[Mapping[str, LaneLike]] = None):
        self._names: dict[str, Lane] = {}
        self._patterns: dict[str, Lane] = {}
        self._tags: dict[str, Lane] = {}  # keys casefolded
        for name, lane in (names or {}).items():
            self.add_name(name, lane)
        for pattern, lane in (patterns or {}).items():
            self.add_pattern(pattern, lane)
        for tag, lane in (tags or {}).items():
            self.add_tag(tag, lane)

    @classmethod
    def empty(cls) -> "StepClassifier":
        """A classifier without rules: only declarations decide, everything else is critical."""
        return cls()

    @classmethod
    def with_defaults(cls) -> "StepClassifier":
        """A classifier with the built-in rules (what :class:`~steps.registry.StepRegistry` uses).

        :data:`CRITICAL_STEP_NAMES` are critical; :data:`CRITICAL_TAGS` are critical and
        :data:`POOL_TAGS` are pool.
        """
        tags = {**dict.fromkeys(CRITICAL_TAGS, Lane.CRITICAL), **dict.fromkeys(POOL_TAGS, Lane.POOL)}
        return cls(names=dict.fromkeys(CRITICAL_STEP_NAMES, Lane.CRITICAL), tags=tags)

    def add_name(self, name: str, lane: LaneLike) -> None:
        """Run the step called exactly ``name`` in ``lane``."""
        self._names[require_word(name, "a name rule")] = _lane(lane, f"name rule {name!r}")

    def add_pattern(self, pattern: str, lane: LaneLike) -> None:
        """Run steps whose names match the glob ``pattern`` (e.g. ``"git.*"``) in ``lane``."""
        self._patterns[require_word(pattern, "a pattern rule")] = _lane(lane, f"pattern rule {pattern!r}")

    def add_tag(self, tag: str, lane: LaneLike) -> None:
        """Run steps carrying ``tag`` (as a tag or as their category, in any case) in ``lane``."""
        self._tags[require_word(tag, "a tag rule").casefold()] = _lane(lane, f"tag rule {tag!r}")

    def classify(self, spec: StepSpec) -> Classification:
        """The lane ``spec`` runs in, and which rule decided it."""
        if spec.critical is not None:
            return Classification(Lane.CRITICAL if spec.critical else Lane.POOL,
                                  f"declared critical={spec.critical}")
        for level in (self._by_name, self._by_tags, self._by_patterns):
            decision = _most_cautious(level(spec))
            if decision is not None:
                return decision
        return CRITICAL_BY_DEFAULT

    def _by_name(self, spec: StepSpec) -> list[Classification]:
        lane = self._names.get(spec.name)
        return [] if lane is None else [Classification(lane, f"name matches rule {spec.name!r} ({lane})")]

    def _by_tags(self, spec: StepSpec) -> list[Classification]:
        labels = [("category", spec.category)] if spec.category else []
        labels += [("tag", tag) for tag in sorted(spec.tags)]
        decisions = []
        for kind, label in labels:
            lane = self._tags.get(label.casefold())
            if lane is not None:
                decisions.append(Classification(lane, f"{kind} {label!r} is {lane}"))
        return decisions

    def _by_patterns(self, spec: StepSpec) -> list[Classification]:
        return [Classification(lane, f"name matches pattern {pattern!r} ({lane})")
                for pattern, lane in self._patterns.items() if fnmatch.fnmatchcase(spec.name, pattern)]
