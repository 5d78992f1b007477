"""Per-task resource limits and the lane names: plain values, no processes.

``Limits`` are declared on a step, defaulted by the supervisor and overridable for one
submission. A field left ``None`` inherits from the layer below (submission -> step ->
supervisor default); ``math.inf`` says "no limit" explicitly.
"""

from __future__ import annotations

import enum
import math
from typing import Optional

import attrs

#: How long a running step has to stop by itself after a cooperative cancel before its
#: worker is killed. Short, because a step that polls its context stops in well under a
#: millisecond and keeps its worker; a step that does not poll costs a respawn anyway.
DEFAULT_CANCEL_GRACE_S = 0.1


class Lane(str, enum.Enum):
    """Where a step runs: one at a time in order, or in parallel in the process pool."""

    CRITICAL = "critical"
    POOL = "pool"

    def __str__(self) -> str:
        return self.value


def _positive_or_none(instance, attribute, value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Limits.{attribute.name} must be a number of "
                        f"{'seconds' if attribute.name.endswith('_s') else 'MiB'} or None, "
                        f"not {type(value).__name__} {value!r}")
    if math.isnan(value) or value <= 0:
        raise ValueError(f"Limits.{attribute.name} must be > 0 (math.inf for no limit), got {value!r}")


def _non_negative_or_none(instance, attribute, value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Limits.{attribute.name} must be a number of seconds or None, "
                        f"not {type(value).__name__} {value!r}")
    if math.isnan(value) or value < 0 or math.isinf(value):
        raise ValueError(f"Limits.{attribute.name} must be a finite number >= 0, got {value!r}")


@attrs.frozen
class Limits:
    """Resource limits for one task.

    Args:
        timeout_s: seconds a step may run, counted from the moment it is handed to its
            (idle, warm) worker: time spent waiting in the lane's queue does not count.
            On expiry the worker and its process tree are killed: ``StepTimeout``.
        max_memory_mb: MiB of RSS the task's whole process tree (the worker plus every
            process the step started) may use, sampled by the supervisor. Over it the
            worker is killed: ``MemoryLimitExceeded``.
        cancel_grace_s: after a cancel, how long a running step has to notice its
            context's ``cancelled`` flag and stop before its worker is killed.
        memory_hard_cap: also cap the worker's address space (``RLIMIT_AS``) for the
            task's duration at its current size plus the RSS headroom left under
            ``max_memory_mb``, so the allocation that would cross the limit fails at once
            with ``MemoryError`` (reported as ``MemoryLimitExceeded`` with
            ``killed=False``: the worker survives and stays warm). It covers the worker
            alone (children are still sampled), and address space reserved but never
            touched counts against it, so a step that maps large sparse regions may be
            refused below the limit.
    """

    timeout_s: Optional[float] = attrs.field(default=None, validator=_positive_or_none)
    max_memory_mb: Optional[float] = attrs.field(default=None, validator=_positive_or_none)
    cancel_grace_s: Optional[float] = attrs.field(default=None, validator=_non_negative_or_none)
    memory_hard_cap: Optional[bool] = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(bool)))

    def __attrs_post_init__(self) -> None:
        if self.memory_hard_cap and self.max_memory_mb is None:
            raise ValueError("Limits.memory_hard_cap needs max_memory_mb")

    @classmethod
    def none(cls) -> "Limits":
        """Limits that set nothing: every field inherits."""
        return cls()

    def over(self, base: "Limits") -> "Limits":
        """These limits laid over ``base``: every field set here wins, the rest come from ``base``."""
        return Limits(**{field.name: getattr(base, field.name) if getattr(self, field.name) is None
                         else getattr(self, field.name) for field in attrs.fields(Limits)})

    @property
    def effective_timeout_s(self) -> Optional[float]:
        """The timeout to enforce, or ``None`` for none (unset or ``math.inf``)."""
        return None if self.timeout_s is None or math.isinf(self.timeout_s) else self.timeout_s

    @property
    def effective_memory_mb(self) -> Optional[float]:
        """The memory limit to enforce, or ``None`` for none (unset or ``math.inf``)."""
        return None if self.max_memory_mb is None or math.isinf(self.max_memory_mb) else self.max_memory_mb

    @property
    def effective_cancel_grace_s(self) -> float:
        """The grace period to use after a cancel."""
        return DEFAULT_CANCEL_GRACE_S if self.cancel_grace_s is None else self.cancel_grace_s
