"""The built-in steps a task or workflow may run: every one but ``task.execute`` and
``workflow.execute`` themselves (no nesting). ``steps.builtin.default_registry`` adds those
two; ``steps.builtin.sequence`` looks its sub-steps up here, so neither imports the other's
package face.
"""

from __future__ import annotations

from governor.steps.builtin import chat, git
from governor.steps.registry import StepRegistry

READ_ONLY = ("read-only",)

#: The parameters that name a path, per family: ``repo`` (git), ``store`` (chat).
PATH_PARAMETERS = (("repo",), ("store",))


def leaf_registry() -> StepRegistry:
    """A new registry holding the built-in git and chat steps."""
    registry = StepRegistry()
    repo, store = PATH_PARAMETERS
    # Read-only: parallel in the pool lane.
    registry.register(git.status, name="git.status", critical=False, category="git", tags=READ_ONLY,
                      limits=git.STEP_LIMITS, paths=repo)
    registry.register(git.current_branch, name="git.current_branch", critical=False, category="git",
                      tags=READ_ONLY, limits=git.STEP_LIMITS, paths=repo)
    registry.register(git.log, name="git.log", critical=False, category="git", tags=READ_ONLY,
                      limits=git.STEP_LIMITS, paths=repo)
    registry.register(chat.history, name="chat.history", critical=False, category="chat", tags=READ_ONLY,
                      limits=chat.STEP_LIMITS, paths=store)
    # State-changing: one at a time, in submission order, in the critical lane.
    registry.register(git.refresh_index, name="git.refresh_index", critical=True, category="git",
                      tags=("write",), limits=git.STEP_LIMITS, paths=repo)
    registry.register(chat.create, name="chat.create", critical=True, category="chat", tags=("write",),
                      limits=chat.STEP_LIMITS, paths=store)
    registry.register(chat.send_message, name="chat.send_message", critical=True, category="chat",
                      tags=("write",), limits=chat.STEP_LIMITS, paths=store)
    return registry
