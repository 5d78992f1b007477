"""Steps that run other steps: ``task.execute`` (an ad-hoc list) and ``workflow.execute`` (a named one).

Both run their steps one after another, inside the one task and worker process that runs
them, by calling the built-in steps' functions directly (looked up by name in
:func:`steps.builtin.default_registry`)::

    task.execute([{"step": "chat.create", "params": {"title": "t"}}, {"step": "git.status"}])
        ──> check every item (name known, not nested, parameters fit the signature)
        ──> for each: ctx.check(); result = step(**params)  ──> [result, result, ...]

    workflow.execute("new-chat-with-message", {"title": "t", "text": "hi"})
        ──> WORKFLOWS["new-chat-with-message"] ──> the same loop, each step's parameters
            resolved from the workflow's parameters (Param) and earlier results (Result)

Both are critical (they may change state), so the whole sequence runs alone in the
critical lane and no other critical step interleaves with it. Every item is checked before
the first one runs, so a typo in step 3 does not leave steps 1 and 2 half-done. Parameter
*values* are checked by each step when it runs: a failure raises
:class:`~steps.builtin.errors.SubStepFailed` (with the results so far); the completed steps
are not undone, since each one commits on its own.

The inner steps run under the outer task's limits and cancellation (not their own
``Limits``): a cancel stops the sequence between steps, or inside a git call.
Nesting ``task.execute``/``workflow.execute`` is refused, so a sequence is always flat and
finite.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import types
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import attrs

from governor.context import current_context
from governor.errors import StepCancelled, UnknownStep
from governor.limits import Limits
from governor.steps.builtin.errors import StepInputError, StepInputTypeError, SubStepFailed
from governor.steps.builtin.leaves import leaf_registry
from governor.steps.registry import StepRegistry
from governor.steps.spec import StepSpec

#: The names of the sequence steps, which may not appear inside a sequence.
SEQUENCE_STEP_NAMES = frozenset({"task.execute", "workflow.execute"})

#: Most steps one ``task.execute`` may run. A sequence holds the critical lane for its whole
#: run, so it is kept to what a caller would type or generate for one action; submit more
#: work as several tasks so other critical steps get a turn.
MAX_SEQUENCE_STEPS = 100

#: The supervisor's outer bound for a whole sequence: long enough for many git and chat
#: steps (each bounded by its own per-call timeout), short enough that a stuck sequence
#: frees the critical lane within minutes. A submission's ``Limits`` may override it.
STEP_LIMITS = Limits(timeout_s=300)

# The keys a task.execute item may have.
_ITEM_KEYS = frozenset({"step", "params"})


@attrs.frozen
class Param:
    """In a workflow step's parameters: the workflow parameter called ``name``.

    Attributes:
        name: the workflow parameter's name.
        required: when false and the caller did not give it, the step's parameter is left
            out, so the step's own default applies.
    """

    name: str
    required: bool = True


@attrs.frozen
class Result:
    """In a workflow step's parameters: the result of the workflow's step number ``index``."""

    index: int


ParamValue = Union[Param, Result, Any]


@attrs.frozen
class WorkflowStep:
    """One step of a workflow: a built-in step's name and how to build its parameters.

    Attributes:
        step: the registered name, e.g. ``"chat.create"``.
        params: parameter name -> a :class:`Param`, a :class:`Result` or a literal value.
    """

    step: str
    params: Mapping[str, ParamValue] = attrs.field(factory=dict, converter=lambda p: types.MappingProxyType(dict(p)))

    def names(self, given: Mapping[str, Any]) -> list[str]:
        """The parameter names this step gets when the workflow was given ``given``."""
        return [key for key, value in self.params.items()
                if not (isinstance(value, Param) and not value.required and value.name not in given)]

    def resolve(self, given: Mapping[str, Any], results: list) -> dict:
        """This step's parameters, from the workflow's parameters and the earlier results."""
        resolved = {}
        for key in self.names(given):
            value = self.params[key]
            if isinstance(value, Param):
                value = given[value.name]
            elif isinstance(value, Result):
                value = results[value.index]
            resolved[key] = value
        return resolved


def _check_steps(workflow: "Workflow", attribute: attrs.Attribute, steps: tuple) -> None:
    if not steps:
        raise ValueError(f"workflow {workflow.name!r} has no steps")
    for position, step in enumerate(steps):
        for value in step.params.values():
            if isinstance(value, Result) and not 0 <= value.index < position:
                raise ValueError(f"workflow {workflow.name!r} step {position} ({step.step}) uses Result"
                                 f"({value.index}), which is not an earlier step")


@attrs.frozen
class Workflow:
    """A named, fixed sequence of built-in steps.

    Attributes:
        name: what ``workflow.execute`` is called with.
        description: one line for humans (the CLI lists it).
        steps: the steps, run in order; ``workflow.execute`` returns their results in a list.
    """

    name: str
    description: str
    steps: tuple[WorkflowStep, ...] = attrs.field(converter=tuple, validator=_check_steps)

    @property
    def parameters(self) -> dict[str, bool]:
        """Every parameter the workflow takes -> whether it is required."""
        found: dict[str, bool] = {}
        for step in self.steps:
            for value in step.params.values():
                if isinstance(value, Param):
                    found[value.name] = found.get(value.name, False) or value.required
        return found


#: The named workflows ``workflow.execute`` runs. To add one, add an entry here: each
#: step's parameters are literals, ``Param("name")`` (a workflow parameter; pass
#: ``required=False`` to fall back on the step's default) or ``Result(i)`` (the result of
#: step ``i``, an earlier one).
WORKFLOWS: Mapping[str, Workflow] = types.MappingProxyType({workflow.name: workflow for workflow in (
    Workflow(
        name="new-chat-with-message",
        description="Create a chat titled `title` and post `text` to it; returns [chat_id, message_id].",
        steps=(
            WorkflowStep("chat.create", {"title": Param("title"), "store": Param("store", required=False)}),
            WorkflowStep("chat.send_message", {
                "chat_id": Result(0), "text": Param("text"), "author": Param("author", required=False),
                "store": Param("store", required=False)}),
        )),
    Workflow(
        name="repo-overview",
        description="The branch, status and recent log of `repo`; returns [branch, status, log].",
        steps=(
            WorkflowStep("git.current_branch", {"repo": Param("repo", required=False)}),
            WorkflowStep("git.status", {"repo": Param("repo", required=False)}),
            WorkflowStep("git.log", {"repo": Param("repo", required=False), "limit": Param("limit", required=False)}),
        )),
)})


def execute_task(steps: list) -> list:
    """Run built-in steps in order in this process and return their results.

    Args:
        steps: ``[{"step": name, "params": {...}}, ...]``, at most
            :data:`MAX_SEQUENCE_STEPS` items; ``"params"`` may be left out for none.
            ``task.execute`` and ``workflow.execute`` may not appear.

    Returns:
        Each step's result, in order.

    Raises:
        StepInputError: a malformed item, an unknown or nested step name, or parameters that
            do not fit the step's signature (:class:`StepInputTypeError`); nothing has run.
        SubStepFailed: a step raised; the steps before it completed and stay done.
        StepCancelled: the task was cancelled; it stopped between steps or inside one.
    """
    if not isinstance(steps, (list, tuple)):
        raise StepInputTypeError(f"steps must be a list of {{'step': name, 'params': {{...}}}}, "
                                 f"got {type(steps).__name__}")
    if not steps:
        raise StepInputError("steps must not be empty")
    if len(steps) > MAX_SEQUENCE_STEPS:
        raise StepInputError(f"steps has {len(steps)} items; at most {MAX_SEQUENCE_STEPS} run in one task")
    plan = []
    for index, item in enumerate(steps):
        where = f"steps[{index}]"
        if not isinstance(item, Mapping):
            raise StepInputTypeError(f"{where} must be a dict {{'step': name, 'params': {{...}}}}, "
                                     f"got {type(item).__name__}")
        unknown = set(item) - _ITEM_KEYS
        if unknown:
            raise StepInputError(f"{where} has unknown keys {sorted(map(str, unknown))}; "
                                 f"an item has 'step' and optionally 'params'")
        params = item.get("params")
        params = {} if params is None else params
        if not isinstance(params, Mapping):
            raise StepInputTypeError(f"{where}['params'] must be a dict, got {type(params).__name__}")
        spec = _checked_step(where, item.get("step"), list(params))
        plan.append((spec, functools.partial(_fixed, dict(params))))
    return _run_in_order(plan)


def execute_workflow(name: str, params: Optional[dict] = None) -> list:
    """Run the workflow ``name`` from :data:`WORKFLOWS` with ``params``; return its steps' results.

    Args:
        name: a key of :data:`WORKFLOWS`.
        params: the workflow's parameters (see :attr:`Workflow.parameters`).

    Returns:
        Each of the workflow's steps' results, in order.

    Raises:
        StepInputError: an unknown workflow, a missing or unknown parameter; nothing has run.
        SubStepFailed: a step raised; the steps before it completed and stay done.
        StepCancelled: the task was cancelled; it stopped between steps or inside one.
    """
    if not isinstance(name, str):
        raise StepInputTypeError(f"name must be a workflow name (str), got {type(name).__name__}")
    workflow = WORKFLOWS.get(name)
    if workflow is None:
        close = difflib.get_close_matches(name, list(WORKFLOWS), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise StepInputError(f"unknown workflow {name!r}{hint} (known: {', '.join(sorted(WORKFLOWS))})")
    params = {} if params is None else params
    if not isinstance(params, Mapping):
        raise StepInputTypeError(f"params must be a dict, got {type(params).__name__}")
    accepted = workflow.parameters
    unknown = sorted(map(str, set(params) - set(accepted)))
    missing = sorted(key for key, required in accepted.items() if required and key not in params)
    if unknown or missing:
        problems = ([f"unknown {unknown}"] if unknown else []) + ([f"missing {missing}"] if missing else [])
        signature = ", ".join(f"{key}{'' if required else '?'}" for key, required in accepted.items())
        raise StepInputError(f"workflow {name!r} parameters: {'; '.join(problems)} (it takes: {signature})")
    given = dict(params)
    plan = [(_checked_step(f"workflow {name!r} step {index}", step.step, step.names(given)),
             functools.partial(step.resolve, given))
            for index, step in enumerate(workflow.steps)]
    return _run_in_order(plan)


def _fixed(params: dict, results: list) -> dict:
    return params


def _checked_step(where: str, name: Any, param_names: list) -> StepSpec:
    """The built-in step called ``name``, if it may run in a sequence with these parameter names.

    Raises:
        StepInputError: ``name`` is not a str, unknown, or a sequence step.
        StepInputTypeError: the parameter names do not fit the step's signature.
    """
    if not isinstance(name, str):
        raise StepInputTypeError(f"{where}: 'step' must be a step name (str), got {type(name).__name__}")
    if name in SEQUENCE_STEP_NAMES:
        raise StepInputError(f"{where}: {name!r} cannot run inside a task or workflow (no nesting)")
    registry = _builtin_registry()
    try:
        spec = registry.get(name)
    except UnknownStep as unknown:
        raise StepInputError(f"{where}: {unknown}") from None
    if not all(isinstance(key, str) for key in param_names):
        raise StepInputTypeError(f"{where} ({name}): parameter names must be strings")
    signature = inspect.signature(spec.fn)
    try:
        signature.bind(**dict.fromkeys(param_names))  # names only; each step checks values itself
    except TypeError as exc:
        raise StepInputTypeError(f"{where}: bad parameters for {name}{signature}: {exc}") from None
    return spec


@functools.cache
def _builtin_registry() -> StepRegistry:
    """The steps a task or workflow may run, built once per process (only read here)."""
    return leaf_registry()


def _run_in_order(plan: list[tuple[StepSpec, Callable[[list], dict]]]) -> list:
    """Run each ``(spec, params_for)`` in order; ``params_for`` gets the results so far."""
    ctx = current_context()
    results: list = []
    for index, (spec, params_for) in enumerate(plan):
        ctx.check()
        try:
            results.append(spec.invoke((), params_for(results)))
        except StepCancelled:
            raise  # the task's own cancel: let the worker report it as cancelled
        except Exception as exc:
            raise SubStepFailed(index, spec.name, exc, results) from exc
    return results
