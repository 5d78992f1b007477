"""Per-task resource limits and the lane names: plain values, no processes.

``Limits`` are declared on a step, defaulted by the supervisor and overridable for one
submission. A field left ``None`` inherits from the layer below (submission -> step ->
supervisor default); ``math.inf`` says "no limit" explicitly.
"""

from __future__ import annotations

import enum
import math
import threading
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


#: The longest timeout (and cancel grace) a limit may set: the longest wait a Python lock or
#: event accepts on this platform (``threading.TIMEOUT_MAX``, about 292 years on 64-bit
#: Linux). Any longer and no timer could hold it; an ``OverflowError`` deep in a wait would
#: take down the thread that waits (issue 16). A single ``select`` takes at most ~24.8 days
#: (``INT_MAX`` ms), so a manager waits for a longer deadline in slices.
MAX_TIMEOUT_S = threading.TIMEOUT_MAX

#: The largest memory limit, in MiB: 2**42 MiB (4 EiB). ``memory_hard_cap`` sets
#: ``RLIMIT_AS`` to the worker's address-space size plus the limit, and an rlimit holds at
#: most 2**63 - 1 bytes; half of that is left for the worker's own address space (at most
#: 128 TiB on x86-64), so the sum always fits.
MAX_MEMORY_MB = 2 ** 42

#: Integers this large are shown by their size, not their digits, in an error message:
#: ``repr`` of an int over 4,300 digits raises ``ValueError`` itself.
_LARGEST_SHOWN_INT = 10 ** 30


def _show(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _LARGEST_SHOWN_INT:
        return f"an integer of {value.bit_length()} bits"
    return repr(value)


def _quantity(unit: str, maximum: float, zero_allowed: bool, unlimited_allowed: bool):
    """A validator for an optional limit in ``unit``: a real number in its bounds, or ``None``.

    ``math.inf`` means "no limit" where ``unlimited_allowed``; otherwise, as NaN, a bool, a
    negative number, zero (unless ``zero_allowed``) and anything over ``maximum``, it is a
    ``ValueError`` naming the field and the bound. Only a value that is not a number at all
    is a ``TypeError``. Integers of any size are compared exactly, so ``10**400`` is a
    ``ValueError``, never an ``OverflowError``.
    """
    bound = (f"{'>= 0' if zero_allowed else '> 0'} and <= {maximum:.0f} {unit}"
             + (" (math.inf for no limit)" if unlimited_allowed else ""))

    def validate(instance: object, attribute: "attrs.Attribute", value: object) -> None:
        if value is None:
            return
        name = f"Limits.{attribute.name}"
        if isinstance(value, bool):  # an int to Python, but True seconds is nobody's intent
            raise ValueError(f"{name} must be a number of {unit} {bound}, not the bool {value!r}")
        if not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number of {unit} or None, not {type(value).__name__} {value!r}")
        if value != value:  # NaN compares false with every bound below
            raise ValueError(f"{name} must be {bound}, got NaN")
        if unlimited_allowed and value == math.inf:
            return
        if value < 0 or (value == 0 and not zero_allowed) or value > maximum:
            raise ValueError(f"{name} must be {bound}, got {_show(value)}")

    return validate


@attrs.frozen
class Limits:
    """Resource limits for one task.

    Every number is checked at construction against what the platform can enforce: NaN, a
    bool, a negative number, zero (except for ``cancel_grace_s``), or more than
    :data:`MAX_TIMEOUT_S` seconds / :data:`MAX_MEMORY_MB` MiB is a ``ValueError`` naming the
    field and its bound; a value that is not a number is a ``TypeError``.

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

    timeout_s: Optional[float] = attrs.field(
        default=None, validator=_quantity("seconds", MAX_TIMEOUT_S, zero_allowed=False, unlimited_allowed=True))
    max_memory_mb: Optional[float] = attrs.field(
        default=None, validator=_quantity("MiB", MAX_MEMORY_MB, zero_allowed=False, unlimited_allowed=True))
    cancel_grace_s: Optional[float] = attrs.field(
        default=None, validator=_quantity("seconds", MAX_TIMEOUT_S, zero_allowed=True, unlimited_allowed=False))
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
