"""Plain functions, written as for ``ProcessPoolExecutor``, registered as steps.

The executor tests run the same code on a ``ProcessPoolExecutor`` and on a ``Supervisor``;
these functions are what both run. They live at module level so workers import them by
reference; ``registry`` is this module's own, so the tests do not depend on what other
test modules register.
"""

import asyncio
import math
import os

from governor import StepRegistry, current_context
from step_library import MARKERS, announce, wait_for_path

registry = StepRegistry()

PRIMES = [112272535095293, 112582705942171, 112272535095293, 115280095190773, 115797848077099,
          1099726899285419]


@registry.step(critical=False)
def is_prime(n: int) -> bool:
    """The example of the ``concurrent.futures`` documentation, unchanged."""
    if n < 2:
        return False
    if n == 2:
        return True
    if n % 2 == 0:
        return False
    sqrt_n = int(math.floor(math.sqrt(n)))
    for i in range(3, sqrt_n + 1, 2):
        if n % i == 0:
            return False
    return True


@registry.step(critical=False)
def power(base: int, exponent: int = 2) -> int:
    return base ** exponent


@registry.step(critical=False)
def fail(message: str) -> None:
    raise ValueError(message)


@registry.step(critical=False, writes=MARKERS)
def hold_until(marker: str, go: str) -> int:
    """Say we started (``marker``), then wait for ``go``; return the worker's pid."""
    announce(marker, os.getpid())
    wait_for_path(go)
    return os.getpid()


@registry.step(critical=False, writes=MARKERS)
def wait_for_cancel(marker: str) -> str:
    """Say we started (``marker``), then wait for a cancel and say so in ``marker + ".seen"``."""
    announce(marker, os.getpid())
    while not current_context().wait(60):
        pass
    announce(marker + ".seen", os.getpid())
    return "cancelled"


@registry.step(critical=True)
class Accumulate:
    """A class-based step, in the critical lane."""

    def run(self, values: list) -> int:
        return sum(values)


def not_registered(x: int) -> int:
    return x


async def coroutine_step() -> None:  # asyncio code nobody registered
    await asyncio.sleep(0)
