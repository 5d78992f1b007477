"""Limits are bounded where the platform bounds them (issue 16, item 1).

Absurd values are a ``ValueError`` at construction, naming the field and its bound, never an
``OverflowError`` from a timer or an rlimit later on; every value accepted fits the timer or
the rlimit that will enforce it. No processes: ``Limits`` is a plain value.
"""

import math
import resource
import threading
import time

import pytest
from hypothesis import given, strategies as st

from governor.limits import MAX_MEMORY_MB, MAX_TIMEOUT_S, Limits

#: The fields that hold a number, and what each accepts besides "a positive number".
NUMERIC = ("timeout_s", "max_memory_mb", "cancel_grace_s")

#: 25 days: the timeout that took the supervisor down (issue 16); any finite, sane one is valid.
TWENTY_FIVE_DAYS_S = 2_200_000

ABSURD = [
    ("timeout_s", math.nan), ("timeout_s", -1), ("timeout_s", -math.inf), ("timeout_s", 0), ("timeout_s", 0.0),
    ("timeout_s", 10 ** 400), ("timeout_s", 10 ** 5000), ("timeout_s", True), ("timeout_s", False),
    ("timeout_s", math.nextafter(MAX_TIMEOUT_S, math.inf)), ("timeout_s", 1e300),
    ("max_memory_mb", math.nan), ("max_memory_mb", -0.5), ("max_memory_mb", 0), ("max_memory_mb", 10 ** 400),
    ("max_memory_mb", True), ("max_memory_mb", MAX_MEMORY_MB + 1),
    ("cancel_grace_s", math.nan), ("cancel_grace_s", -1e-9), ("cancel_grace_s", math.inf), ("cancel_grace_s", 10 ** 400),
    ("cancel_grace_s", True), ("cancel_grace_s", MAX_TIMEOUT_S * 2),
]


def case_id(value) -> str:
    """A test id that pytest can print (``str`` of an int over 4,300 digits raises)."""
    return f"int{value.bit_length()}bits" if isinstance(value, int) and value > 10 ** 30 else repr(value)


@pytest.mark.parametrize(("field", "value"), ABSURD, ids=[f"{field}={case_id(value)}" for field, value in ABSURD])
def test_absurd_values_are_a_value_error_naming_the_field_and_the_bound(field, value):
    with pytest.raises(ValueError) as refused:
        Limits(**{field: value})
    assert not isinstance(refused.value, OverflowError)
    message = str(refused.value)
    assert f"Limits.{field}" in message
    bound = MAX_MEMORY_MB if field == "max_memory_mb" else MAX_TIMEOUT_S
    assert f"<= {bound:.0f}" in message, message


@pytest.mark.parametrize("field", NUMERIC)
def test_a_value_that_is_not_a_number_is_a_type_error(field):
    with pytest.raises(TypeError, match=f"Limits.{field}"):
        Limits(**{field: "5"})


def test_a_long_finite_timeout_is_valid():
    limits = Limits(timeout_s=TWENTY_FIVE_DAYS_S, cancel_grace_s=TWENTY_FIVE_DAYS_S)
    assert limits.effective_timeout_s == TWENTY_FIVE_DAYS_S
    assert limits.effective_cancel_grace_s == TWENTY_FIVE_DAYS_S
    assert Limits(timeout_s=MAX_TIMEOUT_S).effective_timeout_s == MAX_TIMEOUT_S


def test_infinity_still_means_no_limit_and_zero_grace_means_kill_at_once():
    limits = Limits(timeout_s=math.inf, max_memory_mb=math.inf, cancel_grace_s=0)
    assert (limits.effective_timeout_s, limits.effective_memory_mb, limits.effective_cancel_grace_s) == (None, None, 0)


def fits_a_platform_timer(seconds: float) -> bool:
    """Whether a Python wait takes ``seconds``: acquiring a free lock returns at once, but
    checks its timeout first (``OverflowError`` past ``threading.TIMEOUT_MAX``)."""
    lock = threading.Lock()
    try:
        acquired = lock.acquire(timeout=seconds)
    except OverflowError:
        return False
    assert acquired
    lock.release()
    return math.isfinite(time.monotonic() + seconds)


numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(),
                    st.integers(min_value=2 ** 30, max_value=2 ** 2000), st.booleans())


@given(field=st.sampled_from(NUMERIC), value=numbers)
def test_every_number_is_accepted_within_its_bounds_or_refused_with_a_value_error(field, value):
    try:
        limits = Limits(**{field: value})
    except ValueError:
        return
    assert not isinstance(value, bool)
    stored = getattr(limits, field)
    if field == "max_memory_mb":
        assert stored == math.inf or 0 < stored <= MAX_MEMORY_MB
    elif field == "timeout_s":
        assert stored == math.inf or (0 < stored and fits_a_platform_timer(stored))
    else:
        assert fits_a_platform_timer(stored) and stored >= 0


@given(timeout=st.floats(min_value=1e-6, max_value=MAX_TIMEOUT_S), grace=st.floats(min_value=0, max_value=MAX_TIMEOUT_S))
def test_every_finite_timeout_up_to_the_bound_is_valid_and_fits_a_timer(timeout, grace):
    limits = Limits(timeout_s=timeout, cancel_grace_s=grace)
    assert fits_a_platform_timer(limits.effective_timeout_s)
    assert fits_a_platform_timer(limits.effective_cancel_grace_s)


def test_the_largest_memory_limit_fits_the_hard_caps_rlimit():
    # The hard cap sets RLIMIT_AS to the address space's size plus the limit (governor.workers.worker).
    with open("/proc/self/statm") as statm:
        size_bytes = int(statm.read().split()[0]) * resource.getpagesize()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = size_bytes + int(Limits(max_memory_mb=MAX_MEMORY_MB).effective_memory_mb * 2 ** 20)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))  # raises OverflowError if it cannot hold it
    try:
        assert resource.getrlimit(resource.RLIMIT_AS)[0] == cap
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
