"""``governor submit --batch FILE``: every line of a JSONL file checked before anything is submitted.

A line is ``{"step": NAME, "params": {...}, "limits": {"timeout_s": S, "max_memory_mb": M}}``
(``params`` and ``limits`` may be left out: no parameters, the step's own limits). Each
line is checked here against the daemon's
own description of its steps (``Client.steps``): the step's name, and its parameters bound
to the step's signature, which the daemon sends as ``parameters`` next to its text. Every
line at fault is named by its number, so a file is mended in one pass; the daemon checks
the batch again when it arrives and refuses it as a whole.
"""

from __future__ import annotations

import inspect
import json
from typing import Any, Dict, Iterator, List, Optional, Sequence

import attrs

from governor import errors
from governor.cli.exits import GovernorClickError
from governor.limits import Limits

#: At most this many bad lines are listed when a batch file is refused (then a count).
MAX_BATCH_PROBLEMS_SHOWN = 20


@attrs.frozen
class BatchLine:
    """One step of a batch file.

    Attributes:
        number: its line number in the file (1-based), for messages.
        step: the step's name.
        params: its parameters.
        limits: its own limits, or ``None`` for the step's.
    """

    number: int
    step: str
    params: Dict[str, Any]
    limits: Optional[Limits] = None


class BatchRefused(GovernorClickError):
    """A batch file with lines at fault: nothing was submitted (exit status 8)."""

    def __init__(self, problems: List[str]):
        super().__init__("nothing was submitted:\n  " + "\n  ".join(problems), "bad_request")
        self.problems = problems


def read_batch(lines: Iterator[str], described_steps: Sequence[Dict[str, Any]]) -> List[BatchLine]:
    """Parse and check every line of a batch file against the daemon's steps, submitting nothing.

    Blank lines are skipped; ``params`` may be left out.

    Args:
        lines: the file's lines.
        described_steps: the daemon's steps, as ``Client.steps`` gives them.

    Raises:
        BatchRefused: every line at fault (up to :data:`MAX_BATCH_PROBLEMS_SHOWN`), each
            named by its line number; or no line at all.
    """
    from governor.protocol import MAX_BATCH_CALLS

    steps = {step["name"]: step for step in described_steps}
    parsed: List[BatchLine] = []
    problems: List[str] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            parsed.append(_batch_line(number, line, steps))
        except ValueError as problem:
            problems.append(f"line {number}: {problem}")
    if not parsed and not problems:
        problems.append("the file has no steps")
    if len(parsed) > MAX_BATCH_CALLS:
        problems.append(f"{len(parsed)} steps; a batch holds at most {MAX_BATCH_CALLS:,} (split the file)")
    if problems:
        shown = problems[:MAX_BATCH_PROBLEMS_SHOWN]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more")
        raise BatchRefused(shown)
    return parsed


def _batch_line(number: int, line: str, steps: Dict[str, Dict[str, Any]]) -> BatchLine:
    try:
        item = json.loads(line)
    except ValueError as error:
        raise ValueError(f"not JSON ({error})") from None
    if not isinstance(item, dict) or not isinstance(item.get("step"), str):
        raise ValueError('expected an object {"step": NAME, "params": {...}}')
    extra = sorted(set(item) - {"step", "params", "limits"})
    if extra:
        raise ValueError(f"unknown field{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))} "
                         "(a line has \"step\", \"params\" and \"limits\")")
    step, params = item["step"], item.get("params", {})
    if not isinstance(params, dict):
        raise ValueError('"params" must be an object')
    limits = _limits(item.get("limits"))
    if step not in steps:
        raise ValueError(str(errors.UnknownStep.for_name(step, steps)))
    signature = step_signature(steps[step])
    if signature is not None:
        try:
            signature.bind(**params)
        except TypeError as error:
            raise ValueError(f"bad parameters for step {step!r}{steps[step]['signature']}: {error}") from None
    return BatchLine(number, step, params, limits)


def _limits(value: Any) -> Optional[Limits]:
    """A line's ``limits`` object as the daemon will read it, or why it will not."""
    from governor.protocol import ProtocolError
    from governor.protocol.decoders import limits

    try:
        return limits(value)
    except ProtocolError as error:
        raise ValueError(f'"limits": {error}') from None


def step_signature(described: Dict[str, Any]) -> Optional[inspect.Signature]:
    """The signature a described step's parameters bind to, or ``None`` if the daemon sent none.

    Only names, kinds and whether a parameter is required are known here: defaults are
    stood in for by ``None``, which is all :meth:`inspect.Signature.bind` needs.
    """
    if "parameters" not in described:  # an older daemon: it still checks the batch when it arrives
        return None
    kinds = {kind.name: kind for kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                          inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.KEYWORD_ONLY,
                                          inspect.Parameter.VAR_KEYWORD)}
    parameters = []
    for parameter in described["parameters"]:
        kind = kinds[parameter["kind"]]
        # A variadic parameter takes no default; any other without one is required.
        required = parameter["required"] or kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        parameters.append(inspect.Parameter(parameter["name"], kind,
                                            default=inspect.Parameter.empty if required else None))
    return inspect.Signature(parameters)
