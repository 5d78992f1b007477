"""Governor: run many small steps fast and safely in worker processes.

Read-only steps run in parallel in a pool of loky workers; steps that change state run one
at a time, in order, in a critical lane. Every step runs in a worker process under
per-task limits (timeout, memory, cancellation) enforced by killing its worker's whole
process tree, and one worker's death fails only the task it was running.

    from steps import StepRegistry
    from governor import Supervisor, Limits

See README.md for the whole API.
"""

import logging

from governor.errors import (GovernorError, InvalidParameters, MemoryLimitExceeded, QueueFull, StepCancelled,
                             StepFailed, StepSkipped, StepTimeout, SupervisorClosed, UnknownStep,
                             WorkerCrashed, WorkerStartFailed, WorkflowFailed)
from governor.limits import Lane, Limits
from governor.supervisor import Scope, Supervisor
from governor.task import Call, TaskFuture, TaskState, WorkflowFuture
from governor.context import StepContext, current_context

# A library logs; the application decides where to: without this, Python's last-resort
# handler would print every WARNING (kills, crashes) to stderr.
logging.getLogger("governor").addHandler(logging.NullHandler())

__all__ = [
    "Call", "GovernorError", "InvalidParameters", "Lane", "Limits", "MemoryLimitExceeded", "QueueFull",
    "Scope", "StepCancelled", "StepContext", "StepFailed", "StepSkipped", "StepTimeout", "Supervisor",
    "SupervisorClosed", "TaskFuture", "TaskState", "UnknownStep", "WorkerCrashed", "WorkerStartFailed",
    "WorkflowFailed", "current_context",
]
