"""What a registered step is: its callable plus everything declared about it.

A :class:`StepSpec` is an immutable, validated value. It is built by
:meth:`StepSpec.declare` (which :class:`~steps.registry.StepRegistry` calls), sent to the
worker processes by pickle, and run there with :meth:`StepSpec.invoke`. Pickling sends the
step's function or class *by reference* (module and qualified name), so a step must be
defined at a module's top level for workers that import rather than fork.

Every invalid declaration raises :class:`~governor.errors.RegistrationError` naming the
step, except bad ``Limits`` values, which ``Limits`` itself rejects when it is built.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Mapping
from typing import Any, Callable, ClassVar, Optional

import attrs

from governor.errors import InvalidParameters, RegistrationError
from governor.limits import Lane, Limits


class Step:
    """Optional base class for class-based steps.

    Subclass it, implement :meth:`run` and register the class. Its class attributes are
    the declaration's defaults; arguments given to the registry's ``step``/``register``
    win over them. The class is instantiated with no arguments for every call (steps are
    stateless), and its docstring's first line is the step's description.

    Example::

        @registry.step
        class CreateChat(Step):
            \"\"\"Create a chat session.\"\"\"
            name = "chat.create"
            tags = ("write",)

            def run(self, title: str) -> str:
                ...

    Attributes:
        name: the step's name (default: the class's ``__name__``).
        critical: ``True``/``False`` to choose the lane, ``None`` to let the classifier decide.
        category: an optional category, matched by the classifier like a tag.
        tags: strings the classifier matches against its tag rules.
        limits: the step's :class:`~governor.limits.Limits` (default: none of its own).
        paths: the parameters that name files or directories (see ``StepSpec.paths``).
        writes: paths the step writes beneath when it runs in the (sandboxed) pool lane.
        network: whether the step connects or binds TCP in the pool lane.
    """

    name: ClassVar[Optional[str]] = None
    critical: ClassVar[Optional[bool]] = None
    category: ClassVar[Optional[str]] = None
    tags: ClassVar[Iterable[str]] = ()
    limits: ClassVar[Optional[Limits]] = None
    paths: ClassVar[Iterable[str]] = ()
    writes: ClassVar[Iterable[str]] = ()
    network: ClassVar[Optional[bool]] = None

    def run(self, **params: Any) -> Any:
        """Do the step's work and return its result (it must pickle)."""
        raise NotImplementedError(f"{type(self).__name__} must implement run()")


def require_word(value: Any, what: str) -> str:
    """``value`` stripped, if it is a non-empty string without whitespace inside.

    Step names, categories, tags and the classifier's rules all obey this, so a rule can
    always be written for any step.

    Raises:
        RegistrationError: otherwise, saying ``what`` was wrong.
    """
    word = value.strip() if isinstance(value, str) else None
    if not word or any(char.isspace() for char in word):
        raise RegistrationError(f"{what} must be a non-empty string without whitespace, "
                                f"got {type(value).__name__} {value!r}")
    return word


def _check_runnable(fn: Any, name: Optional[str]) -> None:
    """Raise unless ``fn`` is a callable, or a class whose instances have a ``run`` method."""
    step = f"step {name!r}" if name else repr(fn)
    if inspect.isclass(fn):
        if not callable(getattr(fn, "run", None)):
            raise RegistrationError(f"{step}: class {fn.__qualname__} has no run() method")
        if issubclass(fn, Step) and fn.run is Step.run:
            raise RegistrationError(f"{step}: class {fn.__qualname__} does not override Step.run()")
    elif not callable(fn):
        raise RegistrationError(f"{step}: {type(fn).__name__} {fn!r} is not callable; a step is "
                                "a function or a class with a run() method")


def _step_name(value: Any) -> str:
    return require_word(value, "step name")


def _check_fn(spec: "StepSpec", attribute: attrs.Attribute, fn: Any) -> None:
    _check_runnable(fn, spec.name)


def _category(value: Any, spec: "StepSpec") -> Optional[str]:
    return None if value is None else require_word(value, f"category of step {spec.name!r}")


def _tag_set(value: Any, spec: "StepSpec") -> frozenset[str]:
    # frozenset("write") would silently become the tags {"w", "r", "i", "t", "e"}.
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise RegistrationError(f"step {spec.name!r}: tags must be an iterable of strings such as "
                                f"('write',), got {type(value).__name__} {value!r}")
    return frozenset(require_word(tag, f"each tag of step {spec.name!r}") for tag in value)


def _path_list(value: Any, spec: "StepSpec") -> tuple[str, ...]:
    # A lone string would be taken as its characters, as with tags.
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise RegistrationError(f"step {spec.name!r}: writes must be an iterable of paths such as "
                                f"['~/.cache/app'], got {type(value).__name__} {value!r}")
    paths = []
    for path in value:
        text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
        if not isinstance(text, str) or not text.strip():
            raise RegistrationError(f"step {spec.name!r}: each path in writes must be a non-empty str "
                                    f"or os.PathLike, got {type(path).__name__} {path!r}")
        paths.append(text)
    return tuple(paths)


def _check_network(spec: "StepSpec", attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, bool):
        raise RegistrationError(f"step {spec.name!r}: network must be True or False, "
                                f"got {type(value).__name__} {value!r}")


def _check_critical(spec: "StepSpec", attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise RegistrationError(f"step {spec.name!r}: critical must be True, False or None (let the "
                                f"classifier decide), got {type(value).__name__} {value!r}")


#: In a declared path, the segment that stands for every item of a list (or value of a dict).
EVERY_ITEM = "*"


def _path_set(value: Any, spec: "StepSpec") -> frozenset[tuple[str, ...]]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise RegistrationError(f"step {spec.name!r}: paths must be an iterable of parameter names such as "
                                f"('repo',), got {type(value).__name__} {value!r}")
    declared = set()
    for path in value:
        segments = tuple(path.split(".")) if isinstance(path, str) else ()
        if not segments or not segments[0].isidentifier() or not all(
                segment == EVERY_ITEM or segment.isidentifier() for segment in segments):
            raise RegistrationError(f"step {spec.name!r}: each of paths must be a parameter name, or a dotted "
                                    f"path into one with {EVERY_ITEM!r} for every item (e.g. "
                                    f"'steps.*.params.repo'), got {path!r}")
        declared.add(segments)
    return frozenset(declared)


def _check_key(spec: "StepSpec", attribute: attrs.Attribute, value: Any) -> None:
    if value is None or callable(value):
        return
    if not isinstance(value, str):
        raise RegistrationError(f"step {spec.name!r}: key must name a parameter (or be a callable of the "
                                f"parameters), got {type(value).__name__} {value!r}")
    if spec.critical is False:
        raise RegistrationError(f"step {spec.name!r}: key orders critical steps; a pool step (critical=False) "
                                f"has no order to keep")
    try:
        parameters = inspect.signature(spec.fn.run if inspect.isclass(spec.fn) else spec.fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: the submit will tell
        return
    if value not in parameters:
        raise RegistrationError(f"step {spec.name!r}: key {value!r} is not one of its parameters "
                                f"({', '.join(parameters) or 'none'})")


def _exception_types(value: Any, spec: "StepSpec") -> tuple:
    types = (value,) if isinstance(value, type) else tuple(value)
    if not all(isinstance(kind, type) and issubclass(kind, BaseException) for kind in types):
        raise RegistrationError(f"step {spec.name!r}: retry_on must be exception classes such as (OSError,), "
                                f"got {value!r}")
    return types


def _check_retries(spec: "StepSpec", attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RegistrationError(f"step {spec.name!r}: retries must be an int >= 0, got {value!r}")
    if value and spec.critical and not spec.idempotent:
        raise RegistrationError(f"step {spec.name!r}: a critical step retries only if it is declared "
                                f"idempotent=True (running it twice must be safe)")


def _check_backoff(spec: "StepSpec", attribute: attrs.Attribute, value: Any) -> None:
    if (not isinstance(value, tuple) or len(value) != 2
            or not all(isinstance(bound, (int, float)) and not isinstance(bound, bool) for bound in value)
            or not 0 <= value[0] <= value[1]):
        raise RegistrationError(f"step {spec.name!r}: retry_backoff must be (first, most) seconds with "
                                f"0 <= first <= most, got {value!r}")


def _check_limits(spec: "StepSpec", attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, Limits):
        raise RegistrationError(f"step {spec.name!r}: limits must be a Limits instance such as "
                                f"Limits(timeout_s=5), got {type(value).__name__} {value!r}")


@attrs.frozen
class StepSpec:
    """A registered step.

    Attributes:
        name: the unique name steps are submitted by.
        fn: a function, or a class whose instances have a ``run(*args, **kwargs)`` method.
        critical: the declared lane (``True``: critical, ``False``: pool), or ``None`` to
            let the :class:`~steps.classifier.StepClassifier` decide.
        category: an optional category; the classifier matches it like a tag.
        tags: free-form labels, matched case-insensitively by the classifier.
        limits: the step's own limits; fields left ``None`` inherit the supervisor's.
        description: one line for humans (default: the first line of ``fn``'s docstring).
        paths: the parameters that name files or directories on the caller's machine, as
            tuples of segments: ``("repo",)``, or a path into a nested value such as
            ``("steps", "*", "params", "repo")`` (``*``: every item). A daemon resolves a
            relative path found there against its client's working directory
            (:meth:`resolve_paths`), so a step never sees the daemon's own.
        writes: paths (``~`` allowed) the step may write beneath when it runs in the pool
            lane's read-only sandbox; the critical lane is not sandboxed.
        network: whether the step binds or connects TCP in the pool lane (the sandbox
            denies it to pool workers when no pool step declares it).
        key: what orders the step in the critical lane: the name of the parameter whose
            value is its lane key (``"chat_id"``), or a callable that takes the step's
            parameters and returns the key. Critical steps with the same key run one at a
            time in submission order; different keys may run at once
            (``Supervisor(critical_workers=N)``). ``None``: the step runs alone, after
            every critical step submitted before it and before every one after it.
        retries: how many times a failed attempt runs again (0: never) when its exception
            is one of ``retry_on`` (a ``WorkerCrashed`` too, if listed there). A timeout, a
            memory kill or a cancel is never retried. A critical step retries only if it is
            ``idempotent``.
        retry_on: the exception classes worth another attempt, e.g. ``(OSError,)``.
        retry_backoff: ``(first, most)`` seconds: the wait before attempt ``n + 1`` is drawn
            between ``first`` and ``min(most, first * 2 ** n)`` (exponential, with jitter).
        idempotent: running the step twice is safe (a critical step may then retry).
    """

    name: str = attrs.field(converter=_step_name)
    fn: Callable[..., Any] = attrs.field(validator=_check_fn)
    critical: Optional[bool] = attrs.field(default=None, validator=_check_critical)
    # These converters take the spec: name is converted before them, so their errors can name the step.
    category: Optional[str] = attrs.field(
        default=None, converter=attrs.Converter(_category, takes_self=True))
    tags: frozenset[str] = attrs.field(
        default=frozenset(), converter=attrs.Converter(_tag_set, takes_self=True))
    limits: Limits = attrs.field(factory=Limits, validator=_check_limits)
    description: str = attrs.field(validator=attrs.validators.instance_of(str))
    paths: frozenset[tuple[str, ...]] = attrs.field(
        default=frozenset(), converter=attrs.Converter(_path_set, takes_self=True))
    writes: tuple[str, ...] = attrs.field(default=(), converter=attrs.Converter(_path_list, takes_self=True))
    network: bool = attrs.field(default=False, validator=_check_network)
    key: Optional[Any] = attrs.field(default=None, validator=_check_key)
    idempotent: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    retries: int = attrs.field(default=0, validator=_check_retries)
    retry_on: tuple = attrs.field(default=(), converter=attrs.Converter(_exception_types, takes_self=True))
    retry_backoff: tuple = attrs.field(default=(0.1, 30.0), converter=tuple, validator=_check_backoff)

    @description.default
    def _first_docstring_line(self) -> str:
        # fn.__doc__, not inspect.getdoc: a Step subclass without a docstring would
        # otherwise be described by Step's own.
        lines = (self.fn.__doc__ or "").strip().splitlines()
        return lines[0].strip() if lines else ""

    @classmethod
    def declare(cls, fn: Any, *, name: Optional[str] = None, critical: Optional[bool] = None,
                category: Optional[str] = None, tags: Iterable[str] = (),
                limits: Optional[Limits] = None, description: Optional[str] = None,
                paths: Iterable[str] = (), writes: Iterable[str] = (),
                network: Optional[bool] = None, key: Optional[Any] = None,
                **retrying: Any) -> "StepSpec":
        """Build the spec for ``fn`` from what was declared about it.

        An argument left ``None`` (or ``tags`` or ``writes`` left empty) takes the value of the same-named
        class attribute when ``fn`` is a :class:`Step` subclass, else the field's default.
        ``name`` falls back to ``fn.__name__``.

        Raises:
            RegistrationError: when any part of the declaration is invalid.
        """
        _check_runnable(fn, name)  # first, or a non-callable would be reported as nameless
        explicit = {"name": name, "critical": critical, "category": category,
                    "tags": tags or None, "limits": limits, "description": description, "paths": paths or None,
                    "writes": writes or None, "network": network, "key": key}
        inherited = ({"name": fn.name, "critical": fn.critical, "category": fn.category,
                      "tags": fn.tags or None, "limits": fn.limits, "paths": fn.paths or None,
                      "writes": fn.writes or None, "network": fn.network}
                     if inspect.isclass(fn) and issubclass(fn, Step) else {})
        fields = {key: inherited.get(key) if value is None else value for key, value in explicit.items()}
        fields = {key: value for key, value in fields.items() if value is not None}
        if "name" not in fields:
            if not hasattr(fn, "__name__"):
                raise RegistrationError(f"{fn!r} has no __name__ to name the step after: pass name=...")
            fields["name"] = fn.__name__
        return cls(fn=fn, **fields, **{name: value for name, value in retrying.items() if value is not None})

    @property
    def is_class_based(self) -> bool:
        """True when ``fn`` is a class (instantiated per call, its ``run`` method invoked)."""
        return inspect.isclass(self.fn)

    def resolve_paths(self, kwargs: Mapping[str, Any], cwd: Optional[str]) -> dict[str, Any]:
        """``kwargs`` with every relative path in a declared :attr:`paths` place made absolute.

        A path is resolved against ``cwd`` (the caller's working directory), after ``~``
        is expanded. A top-level path parameter left out takes its default from the
        step's signature, resolved the same way, when that default is a non-empty string
        (``repo="."`` means the caller's directory, not the worker's). Values that are
        not strings, and empty strings, are left as they are: the step judges them.

        Args:
            kwargs: the call's keyword arguments (not changed).
            cwd: an absolute directory, or ``None`` when the caller sent none.

        Returns:
            A new dict (nested containers along a declared path are copied).

        Raises:
            InvalidParameters: a relative path with no ``cwd`` to resolve it against.
        """
        resolved = dict(kwargs)
        if not self.paths:
            return resolved  # the common case, without reading the signature on every call
        defaults = _string_defaults(self.fn)
        for path in sorted(self.paths):
            if len(path) == 1 and path[0] not in resolved and path[0] in defaults:
                resolved[path[0]] = defaults[path[0]]
            resolved = _resolve_at(resolved, path, cwd, self.name, where="")
        return resolved

    def invoke(self, args: tuple, kwargs: dict) -> Any:
        """Run the step once in this process and return its result."""
        if self.is_class_based:
            return self.fn().run(*args, **kwargs)
        return self.fn(*args, **kwargs)


def _string_defaults(fn: Any) -> dict[str, str]:
    """The parameters of a step's function (or ``run``) whose default is a non-empty string."""
    try:
        signature = inspect.signature(fn.run if inspect.isclass(fn) else fn)
    except (TypeError, ValueError):  # a builtin without a signature: no defaults to know
        return {}
    return {name: parameter.default for name, parameter in signature.parameters.items()
            if isinstance(parameter.default, str) and parameter.default}


def _resolve_at(value: Any, path: tuple[str, ...], cwd: Optional[str], step: str, where: str) -> Any:
    """``value`` with the strings at ``path`` made absolute; containers on the way are copied."""
    if not path:
        if not isinstance(value, str) or not value:
            return value
        expanded = os.path.expanduser(value)
        if os.path.isabs(expanded):
            return os.path.normpath(expanded)
        if cwd is None:
            raise InvalidParameters(f"step {step!r}: {where} is the relative path {value!r}, and the request "
                                    "carries no working directory to resolve it against; send an absolute path")
        return os.path.normpath(os.path.join(cwd, expanded))
    head, rest = path[0], path[1:]
    if head == EVERY_ITEM:
        if isinstance(value, (list, tuple)):
            return [_resolve_at(item, rest, cwd, step, f"{where}[{index}]") for index, item in enumerate(value)]
        if isinstance(value, Mapping):
            return {key: _resolve_at(item, rest, cwd, step, f"{where}[{key!r}]") for key, item in value.items()}
        return value
    if isinstance(value, Mapping) and head in value:
        return {**value, head: _resolve_at(value[head], rest, cwd, step, f"{where}.{head}" if where else head)}
    return value


@attrs.frozen
class Classification:
    """Which lane a step runs in, and why.

    Attributes:
        lane: :attr:`Lane.CRITICAL` or :attr:`Lane.POOL`.
        reason: which rule decided, for humans, e.g. ``"tag 'workflow' is critical"``.
    """

    lane: Lane = attrs.field(validator=attrs.validators.instance_of(Lane))
    reason: str = attrs.field(validator=attrs.validators.instance_of(str))
