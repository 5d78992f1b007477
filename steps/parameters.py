"""A step's parameters, checked like a command line's: names, then values by annotation.

Three callers, one description:

* the supervisor binds every call to the step's signature, and an unknown keyword is named
  with its closest match (``unknown parameter 'uri', did you mean 'url'?``);
* the daemon checks the JSON values a request carries against the step's annotations
  (``delay: float`` refuses ``"abc"``) before it journals the task;
* the CLI converts ``-p NAME=TEXT`` by the same annotations (``5`` stays text for a
  ``str``, becomes ``5.0`` for a ``float``), from the description the daemon sends with
  its steps (:meth:`StepParameters.to_wire`), so it refuses a bad value before submitting.

Annotations understood: ``int``, ``float``, ``bool``, ``str``, ``pathlib.Path`` (sent as
text), lists, tuples and sets (a JSON array), dicts and mappings (a JSON object), each
optionally ``Optional[...]``. A parameter with another annotation, or none, is not checked:
its value goes through as given.
"""

from __future__ import annotations

import difflib
import enum
import inspect
import json
import math
import pathlib
import reprlib
import typing
from collections.abc import Mapping
from typing import Any, Optional

import attrs

from governor.errors import InvalidParameters

#: Words a command line may use for a boolean (case does not matter), as click's BOOL does.
_TRUE_WORDS = frozenset({"true", "1", "yes", "y", "on"})
_FALSE_WORDS = frozenset({"false", "0", "no", "n", "off"})

#: How alike an unknown name and a parameter's must be for the one to be suggested: as for
#: step names (``UnknownStep.for_name``), low enough that ``sm`` suggests ``ms``.
_CLOSE_ENOUGH = 0.5

#: How a command line writes "no value" for an optional parameter that is not text.
_NULL_WORDS = frozenset({"null", "none"})


class ParameterType(enum.Enum):
    """What an annotated parameter accepts. The value is its name on the wire (``"type"``)."""

    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    STR = "str"
    PATH = "path"
    LIST = "list"
    DICT = "dict"

    @classmethod
    def of(cls, annotation: Any) -> tuple[Optional["ParameterType"], bool]:
        """The type an annotation asks for (``None``: not checked), and whether it allows ``None``."""
        nullable = False
        arguments = typing.get_args(annotation)
        if _is_union(annotation) and type(None) in arguments:
            rest = [argument for argument in arguments if argument is not type(None)]
            if len(rest) != 1:
                return None, True
            annotation, nullable = rest[0], True
        origin = typing.get_origin(annotation) or annotation
        if origin is bool:  # before int: bool is an int
            return cls.BOOL, nullable
        for checked, classes in _CLASSES:
            if isinstance(origin, type) and issubclass(origin, classes):
                return checked, nullable
        return None, nullable

    @property
    def described(self) -> str:
        """What a value of this type is, for an error message."""
        return _DESCRIBED[self]

    def accepts(self, value: Any) -> bool:
        """Whether a JSON value (as the daemon receives it) is of this type."""
        if self is ParameterType.INT:
            return isinstance(value, int) and not isinstance(value, bool)
        if self is ParameterType.FLOAT:
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        return isinstance(value, _JSON_TYPES[self])

    def from_text(self, text: str) -> Any:
        """The value a command line's ``text`` means for this type; ``ValueError`` if none."""
        if self in (ParameterType.STR, ParameterType.PATH):
            return text
        if self is ParameterType.BOOL:
            word = text.strip().lower()
            if word in _TRUE_WORDS or word in _FALSE_WORDS:
                return word in _TRUE_WORDS
            raise ValueError(text)
        if self is ParameterType.INT:
            return int(text)
        if self is ParameterType.FLOAT:
            number = float(text)
            if not math.isfinite(number):  # JSON cannot carry it
                raise ValueError(text)
            return number
        value = json.loads(text)
        if not self.accepts(value):
            raise ValueError(text)
        return value


_CLASSES = ((ParameterType.INT, int), (ParameterType.FLOAT, float), (ParameterType.STR, str),
               (ParameterType.PATH, pathlib.PurePath), (ParameterType.LIST, (list, tuple, set, frozenset)),
               (ParameterType.DICT, (dict, Mapping)))
_JSON_TYPES = {ParameterType.BOOL: bool, ParameterType.STR: str, ParameterType.PATH: str,
               ParameterType.LIST: list, ParameterType.DICT: dict}
_DESCRIBED = {ParameterType.INT: "an integer", ParameterType.FLOAT: "a number", ParameterType.BOOL: "true or false",
              ParameterType.STR: "text", ParameterType.PATH: "a path (text)",
              ParameterType.LIST: "a JSON array", ParameterType.DICT: "a JSON object"}


def signature_of(fn: Any) -> inspect.Signature:
    """The signature a call of a step binds to: its function's, or its class's ``run`` without ``self``."""
    if inspect.isclass(fn):
        signature = inspect.signature(fn.run)
        return signature.replace(parameters=list(signature.parameters.values())[1:])
    return inspect.signature(fn)


def _is_union(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    return origin is typing.Union or (origin is not None and getattr(origin, "__name__", "") == "UnionType")


@attrs.frozen
class Parameter:
    """One parameter of a step.

    Attributes:
        name: its name.
        kind: how a call binds it: an ``inspect.Parameter`` kind's name (``"KEYWORD_ONLY"``...).
        required: whether a call must give it (it has no default).
        type: what its annotation accepts, or ``None`` when it is not checked.
        nullable: whether ``None`` is accepted (``Optional[...]``, or a default of ``None``).
    """

    name: str
    kind: str = inspect.Parameter.POSITIONAL_OR_KEYWORD.name
    required: bool = False
    type: Optional[ParameterType] = None
    nullable: bool = False

    @property
    def by_name(self) -> bool:
        """Whether a call may give it by name (``-p NAME=...``, a JSON ``params`` key)."""
        return self.kind in _BY_NAME

    def check(self, value: Any, step: str) -> None:
        """Refuse a JSON ``value`` that this parameter's annotation does not accept.

        Raises:
            InvalidParameters: naming the step, the parameter, what it takes and what came.
        """
        if self.type is None or (value is None and self.nullable) or self.type.accepts(value):
            return
        raise InvalidParameters(f"step {step!r}: parameter {self.name!r} takes {self._takes()}, "
                                f"not {reprlib.repr(value)}")

    def from_text(self, text: str, step: str) -> Any:
        """The value a command line's ``text`` means for this parameter.

        Raises:
            InvalidParameters: ``text`` means no value this parameter takes.
        """
        if self.type is None:
            return _json_or_text(text)
        if self.nullable and self.type not in (ParameterType.STR, ParameterType.PATH) \
                and text.strip().lower() in _NULL_WORDS:
            return None
        try:
            return self.type.from_text(text)
        except ValueError:
            raise InvalidParameters(f"step {step!r}: parameter {self.name!r} takes {self._takes()}, "
                                    f"not {text!r}") from None

    def _takes(self) -> str:
        return f"{self.type.described}{' or null' if self.nullable else ''} ({self.type.value})"


#: The kinds of parameter a call may give by name.
_BY_NAME = frozenset({inspect.Parameter.POSITIONAL_OR_KEYWORD.name, inspect.Parameter.KEYWORD_ONLY.name})


def _json_or_text(text: str) -> Any:
    """An unannotated parameter's text: JSON if it parses (``5``, ``true``), else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


@attrs.frozen
class StepParameters:
    """The parameters of one step, as its signature and annotations declare them.

    Attributes:
        step: the step's name, for messages.
        parameters: every parameter of its signature, in order.
    """

    step: str
    parameters: tuple[Parameter, ...]

    @classmethod
    def of(cls, step: str, fn: Any) -> "StepParameters":
        """The parameters of a step's ``fn`` (a function, or a class with a ``run`` method).

        Annotations that cannot be resolved (a forward reference to a name not importable)
        leave their parameters unchecked rather than failing the step's registration.
        """
        try:
            hints = typing.get_type_hints(fn.run if inspect.isclass(fn) else fn)
        except Exception:  # any error in a user's annotations: check names only
            hints = {}
        parameters = []
        for parameter in signature_of(fn).parameters.values():
            checked, nullable = ParameterType.of(hints.get(parameter.name))
            parameters.append(Parameter(parameter.name, parameter.kind.name, parameter.default is parameter.empty,
                                        checked, nullable or parameter.default is None))
        return cls(step, tuple(parameters))

    @property
    def takes_any_keyword(self) -> bool:
        """Whether the step takes ``**kwargs`` (then no name is unknown)."""
        return any(parameter.kind == inspect.Parameter.VAR_KEYWORD.name for parameter in self.parameters)

    def unknown(self, names: typing.Iterable[str]) -> Optional[str]:
        """Say which of ``names`` the step does not take, with the closest match; ``None`` if all fit."""
        if self.takes_any_keyword:
            return None
        known = [parameter.name for parameter in self.parameters if parameter.by_name]
        unknown = [name for name in names if name not in known]
        if not unknown:
            return None
        said = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=1, cutoff=_CLOSE_ENOUGH)
            said.append(f"unknown parameter {name!r}" + (f", did you mean {close[0]!r}?" if close else ""))
        return "; ".join(said)

    def check_values(self, params: Mapping[str, Any]) -> None:
        """Refuse a JSON value that its parameter's annotation does not accept (see :meth:`Parameter.check`)."""
        for parameter in self.parameters:
            if parameter.by_name and parameter.name in params:
                parameter.check(params[parameter.name], self.step)

    def from_texts(self, texts: Mapping[str, str]) -> dict[str, Any]:
        """A command line's ``NAME=TEXT`` pairs as values, each converted by its annotation.

        Raises:
            InvalidParameters: an unknown name (with the closest match), or a text that
                means no value its parameter takes.
        """
        unknown = self.unknown(texts)
        if unknown is not None:
            raise InvalidParameters(f"step {self.step!r}: {unknown}")
        by_name = {parameter.name: parameter for parameter in self.parameters if parameter.by_name}
        return {name: by_name[name].from_text(text, self.step) if name in by_name else _json_or_text(text)
                for name, text in texts.items()}

    def to_wire(self) -> list[dict[str, Any]]:
        """The parameters as JSON, as the daemon's ``steps`` reply lists them under ``parameters``:
        ``{"name", "kind", "required", "type", "nullable"}`` each (``type`` null when not checked)."""
        return [{"name": parameter.name, "kind": parameter.kind, "required": parameter.required,
                 "type": parameter.type and parameter.type.value, "nullable": parameter.nullable}
                for parameter in self.parameters]

    @classmethod
    def from_wire(cls, step: str, wire: typing.Iterable[Mapping[str, Any]]) -> "StepParameters":
        """The parameters :meth:`to_wire` listed (a type this side does not know is not checked)."""
        types = {checked.value: checked for checked in ParameterType}
        return cls(step, tuple(Parameter(item["name"], item["kind"], bool(item.get("required")),
                                         types.get(item.get("type")), bool(item.get("nullable")))
                               for item in wire))
