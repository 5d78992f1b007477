"""A step's route: its lane, its limits, its signature and its lane key, fixed when the
supervisor is built, and used on every submit."""

from __future__ import annotations

from typing import Any, Iterable

from governor.errors import InvalidParameters
from governor.limits import Lane, Limits
from governor.steps.parameters import StepParameters, signature_of


class Route:
    """Where a step runs and with what, fixed when the supervisor is built."""

    __slots__ = ("spec", "lane", "reason", "limits", "signature", "parameters", "_fitting_shapes", "_key")

    #: Argument shapes remembered per step as fitting its signature (see :meth:`check_arguments`).
    MAX_SHAPES = 64

    def __init__(self, spec: Any, lane: Lane, reason: str, limits: Limits):
        self.spec, self.lane, self.reason, self.limits = spec, lane, reason, limits
        self.signature = signature_of(spec.fn)
        self.parameters = StepParameters.of(spec.name, spec.fn)
        self._fitting_shapes: set = set()
        self._key = spec.key if lane is Lane.CRITICAL else None  # only the critical lane orders by key

    def check_arguments(self, args: tuple, kwargs: dict) -> None:
        """Raise ``InvalidParameters`` if ``args`` and ``kwargs`` do not fit the step's signature.

        Whether a call binds depends only on its shape (how many positional arguments, which
        keywords), so a shape that bound once is remembered: ``Signature.bind`` was most of
        a no-op's submit (~2 us of Python per call, and more under load).
        """
        shape = (len(args), *kwargs) if kwargs else len(args)
        if shape in self._fitting_shapes:
            return
        try:
            self.signature.bind(*args, **kwargs)
        except TypeError as exc:  # an unknown name is said with its closest match, as for step names
            why = self.parameters.unknown(kwargs) or exc
            raise InvalidParameters(f"bad parameters for step {self.spec.name!r}{self.signature}: {why}") from None
        if len(self._fitting_shapes) < self.MAX_SHAPES:
            self._fitting_shapes.add(shape)

    def key_of(self, args: tuple, kwargs: dict) -> Any:
        """The lane key of a call that fits the signature (``StepSpec.key``); ``None``: none.

        Raises:
            InvalidParameters: the key is not hashable, or its callable raised.
        """
        declared = self._key
        if declared is None:
            return None
        try:
            if callable(declared):
                key = declared(*args, **kwargs)
            else:
                bound = self.signature.bind(*args, **kwargs)
                bound.apply_defaults()
                key = bound.arguments[declared]
            hash(key)
        except Exception as exc:
            raise InvalidParameters(f"step {self.spec.name!r}: no lane key from its parameters: {exc!r}") from exc
        return key


def workflow_key(step_keys: Iterable[Any]) -> Any:
    """A workflow's lane key when none is given: the one key its steps declare, or ``None``
    (it runs alone, like any keyless critical step) when they declare none or several."""
    keys = {key for key in step_keys if key is not None}
    return keys.pop() if len(keys) == 1 else None
