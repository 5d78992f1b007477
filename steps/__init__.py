"""Steps: the named units of work Governor runs in its worker processes.

A step is a module-level function, or a class with a ``run`` method (optionally a
:class:`Step` subclass), registered under a unique name in a :class:`StepRegistry`::

    registry = StepRegistry()

    @registry.step(name="git.status", critical=False, limits=Limits(timeout_s=5))
    def git_status(repo: str) -> str:
        ...

Each step runs in one of two lanes: :attr:`Lane.CRITICAL` (state-changing steps, one at a
time, in submission order) or :attr:`Lane.POOL` (read-only steps, in parallel). A step may
declare its lane with ``critical=``; otherwise the registry's :class:`StepClassifier`
decides from its name, category and tags, and falls back to critical.

``@step`` (also ``governor.step``) registers on :data:`REGISTRY`, the process-wide registry
a ``Supervisor()`` given no registry runs; :class:`StepLookup` tells which registered step
a submission means (a name, or the registered function or class).

A running step may call :func:`current_context` to poll for cancellation.

This package depends only on Governor's leaf modules (limits, errors, context), never on
its engine.
"""

from governor.context import StepContext, current_context
from governor.limits import Lane, Limits
from governor.steps.classifier import StepClassifier
from governor.steps.registry import REGISTRY, StepLookup, StepRegistry, step
from governor.steps.spec import Classification, Step, StepSpec

__all__ = [
    "Classification",
    "Lane",
    "Limits",
    "REGISTRY",
    "Step",
    "StepClassifier",
    "StepContext",
    "StepLookup",
    "StepRegistry",
    "StepSpec",
    "current_context",
    "step",
]
