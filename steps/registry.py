"""The table of named steps a supervisor can run.

Register steps with the :meth:`StepRegistry.step` decorator (or :meth:`StepRegistry.register`)
at a module's top level; the supervisor takes a :meth:`~StepRegistry.snapshot` when it
starts and sends it to its workers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable, Optional, TypeVar

from governor.errors import RegistrationError, UnknownStep
from governor.limits import Limits
from governor.steps.classifier import StepClassifier
from governor.steps.spec import Classification, StepSpec

StepCallable = TypeVar("StepCallable", bound=Callable[..., Any])


class StepRegistry:
    """Named steps, in registration order, and the classifier that assigns their lanes.

    Registration is thread-safe. Lanes are not stored: :meth:`classify` asks
    :attr:`classifier` each time, so rules added after a step was registered still apply.

    Args:
        classifier: decides the lane of steps that do not declare ``critical``
            (default: :meth:`StepClassifier.with_defaults`).

    Attributes:
        classifier: the registry's :class:`~steps.classifier.StepClassifier`; add rules to it.
    """

    def __init__(self, classifier: Optional[StepClassifier] = None):
        self.classifier = StepClassifier.with_defaults() if classifier is None else classifier
        self._specs: dict[str, StepSpec] = {}
        self._lock = threading.Lock()

    def step(self, fn: Optional[StepCallable] = None, *, name: Optional[str] = None,
             critical: Optional[bool] = None, category: Optional[str] = None, tags: Iterable[str] = (),
             limits: Optional[Limits] = None, description: Optional[str] = None, paths: Iterable[str] = (),
             writes: Iterable[str] = (), network: Optional[bool] = None, key: Optional[Any] = None,
             **retrying: Any) -> Any:
        """Register the decorated function or class as a step and return it unchanged.

        Usable bare (``@registry.step``) or with the keywords of :meth:`register`
        (``@registry.step(name="git.status", critical=False)``). Returning the original
        keeps it directly callable and picklable by reference.

        Raises:
            RegistrationError: as :meth:`register`.
        """
        if isinstance(fn, str):
            raise RegistrationError(f"pass the step's name as a keyword: @registry.step(name={fn!r})")

        def decorate(target: StepCallable) -> StepCallable:
            self.register(target, name=name, critical=critical, category=category, tags=tags,
                          limits=limits, description=description, paths=paths, writes=writes, network=network,
                          key=key, **retrying)
            return target

        return decorate if fn is None else decorate(fn)

    def register(self, fn: Callable[..., Any], *, name: Optional[str] = None,
                 critical: Optional[bool] = None, category: Optional[str] = None,
                 tags: Iterable[str] = (), limits: Optional[Limits] = None,
                 description: Optional[str] = None, paths: Iterable[str] = (), writes: Iterable[str] = (),
                 network: Optional[bool] = None, key: Optional[Any] = None, **retrying: Any) -> StepSpec:
        """Register ``fn`` as a step.

        Args:
            fn: a function, or a class whose instances have a ``run`` method (instantiated
                with no arguments for each call), e.g. a :class:`~steps.spec.Step` subclass.
            name: the step's unique name (default: a ``Step`` subclass's ``name``, else
                ``fn.__name__``). Surrounding whitespace is stripped; none is allowed inside.
            critical: ``True`` for the serial critical lane, ``False`` for the pool, ``None``
                to let the classifier decide.
            category: an optional category, matched by the classifier like a tag.
            tags: labels for the classifier's tag rules.
            limits: the step's own :class:`~governor.limits.Limits`.
            description: one line for humans (default: first line of the docstring).
            paths: the parameters that name files or directories, e.g. ``("repo",)``, or
                dotted paths into nested ones with ``*`` for every item
                (``"steps.*.params.repo"``). Through the daemon, a relative path there is
                resolved against the client's working directory, never the daemon's.
            writes: paths (``~`` allowed) the step writes beneath when it runs in the pool
                lane, whose workers the sandbox otherwise holds to read-only, e.g.
                ``["~/.cache/app"]``. A directory that does not exist is created when a
                pool worker starts.
            network: ``True`` if the step binds or connects TCP in the pool lane (default
                ``False``: where the kernel allows, pool workers may not).
            key: for a critical step, the parameter whose value is its lane key
                (``key="chat_id"``), or a callable of its parameters returning the key:
                critical steps with the same key run one at a time in submission order,
                different keys in parallel (``Supervisor(critical_workers=N)``). Without
                one, a critical step runs alone (see :attr:`StepSpec.key`).
            retrying: ``retries``, ``retry_on``, ``retry_backoff``, ``idempotent``: run a
                failed attempt again (see :class:`StepSpec`), e.g.
                ``retries=3, retry_on=(OSError,), retry_backoff=(0.1, 30.0)``.

        For a :class:`~steps.spec.Step` subclass, arguments left ``None`` (or ``tags`` left
        empty) come from its class attributes.

        Returns:
            The registered spec.

        Raises:
            RegistrationError: for a duplicate name or an invalid declaration.
        """
        spec = StepSpec.declare(fn, name=name, critical=critical, category=category, tags=tags,
                                limits=limits, description=description, paths=paths, writes=writes,
                                network=network, key=key, **retrying)
        with self._lock:
            existing = self._specs.get(spec.name)
            if existing is not None:
                raise RegistrationError(f"step {spec.name!r} is already registered (by {existing.fn!r})")
            self._specs[spec.name] = spec
        return spec

    def include(self, other: "StepRegistry") -> None:
        """Register every step of ``other`` here too (a daemon gathering steps from packages).

        Only the steps come over, not ``other``'s classifier rules: a step shipped for
        someone else's registry should declare ``critical=``.

        Raises:
            RegistrationError: a name is already registered here (nothing is added then).
        """
        incoming = other.snapshot()
        with self._lock:
            clashes = sorted(set(incoming) & set(self._specs))
            if clashes:
                raise RegistrationError(f"steps already registered: {', '.join(map(repr, clashes))}")
            self._specs.update(incoming)

    def only(self, keep: Callable[[StepSpec], bool]) -> "StepRegistry":
        """A new registry of the steps ``keep`` accepts (the steps only, as :meth:`include`
        takes them: the new registry's classifier has the default rules)."""
        chosen = StepRegistry()
        chosen._specs = {name: spec for name, spec in self.snapshot().items() if keep(spec)}
        return chosen

    def get(self, name: str) -> StepSpec:
        """The step called ``name``.

        Raises:
            UnknownStep: when there is none; it suggests close registered names.
        """
        spec = self._specs.get(name)
        if spec is None:
            raise UnknownStep.for_name(name, self.names())
        return spec

    def classify(self, name: str) -> Classification:
        """The lane the step called ``name`` runs in, and why.

        Raises:
            UnknownStep: when no step has that name.
        """
        return self.classifier.classify(self.get(name))

    def names(self) -> list[str]:
        """The registered names, in registration order."""
        with self._lock:
            return list(self._specs)

    def snapshot(self) -> dict[str, StepSpec]:
        """A copy of the table, name -> spec, unaffected by later registrations."""
        with self._lock:
            return dict(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __len__(self) -> int:
        return len(self._specs)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


class StepLookup:
    """Which registered step a submission means: its name, or the function or class registered.

    Built from one :meth:`StepRegistry.snapshot`, so it answers for that snapshot only (a
    supervisor keeps one for the steps it runs): ``sup.submit(square, 3)`` runs the step
    ``square`` was registered as.

    Args:
        specs: a snapshot, name -> spec.
    """

    def __init__(self, specs: Mapping[str, StepSpec]):
        self._names_by_target: dict[Any, list[str]] = {}
        for name, spec in specs.items():
            self._names_by_target.setdefault(spec.fn, []).append(name)

    def name_of(self, step: Any) -> str:
        """The registered name ``step`` designates.

        Args:
            step: a name (returned as it is: the caller checks that it is registered, with
                suggestions), or a function or class registered as a step.

        Raises:
            UnknownStep: ``step`` is not registered (the message says how to register it),
                or is registered under several names (submit one of them).
        """
        if isinstance(step, str):
            return step
        try:
            names = self._names_by_target.get(step, [])
        except TypeError:  # unhashable, so never registered: a step's fn is a dict key here
            names = []
        if len(names) == 1:
            return names[0]
        label = f"{getattr(step, '__module__', '?')}.{getattr(step, '__qualname__', repr(step))}"
        if names:
            raise UnknownStep(label, names, f"it is registered under several names "
                                            f"({', '.join(map(repr, names))}); submit one of them by name")
        raise UnknownStep(label, (), "it is not a step of this supervisor's registry; register it at a "
                                     "module's top level with @registry.step (or @governor.step) before "
                                     "the Supervisor is built, or submit a registered step's name")


#: The process-wide registry that :func:`step` registers on, and the one ``Supervisor()``
#: runs when given none: for an application's own steps. A library should keep its own
#: :class:`StepRegistry`, so that its step names cannot clash with its users'.
REGISTRY = StepRegistry()


def step(fn: Optional[StepCallable] = None, **declaration: Any) -> Any:
    """Register the decorated function or class on :data:`REGISTRY` and return it unchanged.

    ``@governor.step`` or ``@governor.step(name="git.status", critical=False)``: the keywords
    of :meth:`StepRegistry.register`.

    Raises:
        RegistrationError: as :meth:`StepRegistry.register`.
    """
    return REGISTRY.step(fn, **declaration)
