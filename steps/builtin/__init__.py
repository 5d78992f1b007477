"""The built-in steps the Governor daemon and CLI run, and :func:`default_registry`.

==========================  ========  ==========================================================
step                        lane      function
==========================  ========  ==========================================================
``git.status``              pool      :func:`steps.builtin.git.status`
``git.current_branch``      pool      :func:`steps.builtin.git.current_branch`
``git.log``                 pool      :func:`steps.builtin.git.log`
``git.refresh_index``       critical  :func:`steps.builtin.git.refresh_index`
``chat.history``            pool      :func:`steps.builtin.chat.history`
``chat.create``             critical  :func:`steps.builtin.chat.create`
``chat.send_message``       critical  :func:`steps.builtin.chat.send_message`
``task.execute``            critical  :func:`steps.builtin.sequence.execute_task`
``workflow.execute``        critical  :func:`steps.builtin.sequence.execute_workflow`
==========================  ========  ==========================================================

Every step is a module-level function, so worker processes import it by reference, and
each declares its lane explicitly (read-only steps ``critical=False`` with the
``read-only`` tag; the others ``critical=True``, which the default classifier would also
decide from their names) and its own outer :class:`~governor.limits.Limits`.

Usage::

    from governor import Supervisor
    from governor.steps.builtin import default_registry

    with Supervisor(default_registry()) as sup:
        branch, status = sup.run_batch([("git.current_branch", {"repo": "/abs/repo"}),
                                        ("git.status", {"repo": "/abs/repo"})])

Steps run in the workers' current directory and environment (the supervisor's), so pass
absolute ``repo`` paths to a Supervisor. Each step declares its path parameters
(``paths=``: ``repo``, ``store``, and those nested in ``task.execute`` and
``workflow.execute``), so through the daemon a relative one is resolved against the
client's working directory. Set ``GOVERNOR_CHAT_STORE`` in the daemon (or pass
``store=``, a file in the state directory or in a directory of
``GOVERNOR_CHAT_STORE_DIRS``) to choose the chat store. The read-only steps run unchanged
under the pool lane's sandbox: git takes no optional lock, ``chat.history`` opens the
store read-only. Errors a step raises on purpose are in
:mod:`steps.builtin.errors`.
"""

from __future__ import annotations

from governor.steps.builtin import chat, git, leaves, sequence
from governor.steps.builtin.errors import (BuiltinStepError, ChatNotFound, ChatStoreError, GitCommandError, GitTimeout,
                                  GitUnavailable, NotAGitRepository, StepInputError, StepInputTypeError,
                                  SubStepFailed)
from governor.steps.builtin.leaves import READ_ONLY, leaf_registry
from governor.steps.builtin.sequence import WORKFLOWS, Param, Result, Workflow, WorkflowStep
from governor.steps.registry import StepRegistry

#: The tag of the steps that only read, which the default classifier puts in the pool lane.
def default_registry() -> StepRegistry:
    """A new :class:`~steps.registry.StepRegistry` holding every built-in step.

    A new one on every call, so callers (and tests) may add their own steps or classifier
    rules without affecting anyone else.
    """
    registry = leaf_registry()
    repo, store = leaves.PATH_PARAMETERS
    registry.register(sequence.execute_task, name="task.execute", critical=True, tags=("task",),
                      limits=sequence.STEP_LIMITS, paths=[f"steps.*.params.{name}" for name in repo + store])
    registry.register(sequence.execute_workflow, name="workflow.execute", critical=True, tags=("workflow",),
                      limits=sequence.STEP_LIMITS, paths=[f"params.{name}" for name in repo + store])
    return registry


__all__ = [
    "BuiltinStepError", "ChatNotFound", "ChatStoreError", "GitCommandError", "GitTimeout", "GitUnavailable",
    "NotAGitRepository", "Param", "READ_ONLY", "Result", "StepInputError", "StepInputTypeError", "SubStepFailed",
    "WORKFLOWS", "Workflow", "WorkflowStep", "default_registry",
]
