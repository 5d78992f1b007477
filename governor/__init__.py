"""Governor: run many small steps fast and safely in worker processes.

Read-only steps run in parallel in a pool of worker processes; steps that change state run one
at a time, in order, in a critical lane. Every step runs in a worker process under
per-task limits (timeout, memory, cancellation) enforced by killing its worker's whole
process tree, and one worker's death fails only the task it was running.

    from governor import StepRegistry, Supervisor, Limits, Call, step

``step`` registers a step on the process-wide registry that ``Supervisor()`` runs when
given none; ``StepRegistry`` makes a registry of your own (a library should).

The engine (``Supervisor``, ``Scope``, and with them psutil and prometheus_client)
and the step registry are imported on first use, not with the package: worker processes import ``governor`` for
its values and errors, and each module they do not load is private memory they do not
pay for, times every worker. See README.md for the whole API.
"""

import logging

__version__ = "0.1.0"

from governor.context import StepContext, current_context
from governor.errors import (BackendUnavailable, GovernorError, InvalidParameters, MalformedOutcome, MemoryLimitExceeded,
                             PoisonedTask, QueueFull, StepCancelled,
                             ReadOnlyViolation, RequestSuperseded, SandboxUnavailable, StepFailed, StepSkipped, StepTimeout,
                             SupervisorBroken, SupervisorClosed, SupervisorForked, UnknownStep,
                             WorkerCrashed, WorkerStartFailed, WorkflowFailed)
from governor.limits import Lane, Limits
from governor.task import Call, TaskFuture, TaskState, WorkflowFuture

# A library logs; the application decides where to: without this, Python's last-resort
# handler would print every WARNING (kills, crashes) to stderr.
logging.getLogger("governor").addHandler(logging.NullHandler())

_ENGINE = {"Supervisor": "governor.engine.supervisor", "Scope": "governor.engine.supervisor",
           "Client": "governor.client", "DaemonUnavailable": "governor.client",
           "AsyncClient": "governor.client.async_client",
           "StepRegistry": "governor.steps", "step": "governor.steps"}


def __getattr__(name: str):
    module = _ENGINE.get(name)
    if module is None:
        raise AttributeError(f"module 'governor' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "AsyncClient", "BackendUnavailable", "Call", "Client", "DaemonUnavailable", "GovernorError", "InvalidParameters", "Lane", "Limits", "MalformedOutcome", "MemoryLimitExceeded", "PoisonedTask", "QueueFull",
    "ReadOnlyViolation", "RequestSuperseded", "SandboxUnavailable", "Scope", "StepCancelled", "StepContext", "StepFailed", "StepRegistry", "StepSkipped", "StepTimeout", "Supervisor",
    "SupervisorBroken", "SupervisorClosed", "SupervisorForked", "TaskFuture", "TaskState", "UnknownStep", "WorkerCrashed", "WorkerStartFailed",
    "WorkflowFailed", "WorkflowFuture", "current_context", "step",
]
