"""The errors the built-in steps raise.

Each one subclasses :class:`BuiltinStepError` and the builtin it means, so callers can catch
either the family or the familiar type (``except ValueError`` for bad input, ``except
LookupError`` for a missing chat, ``except TimeoutError`` for a git call that ran too long).

Raised inside a worker, they reach the submitter as the ``original`` of a
:class:`governor.errors.StepFailed` (its ``exc_type`` is e.g.
``"governor.steps.builtin.errors.NotAGitRepository"``), so every class pickles: its constructor's
arguments are kept in ``self.args`` in order.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence


class BuiltinStepError(Exception):
    """Base class of every error a built-in step raises on purpose."""


class StepInputError(BuiltinStepError, ValueError):
    """A parameter given to a built-in step is invalid: out of range, empty, a bad path."""


class StepInputTypeError(StepInputError, TypeError):
    """A parameter given to a built-in step has the wrong type (e.g. ``True`` as a chat id)."""


class NotAGitRepository(StepInputError):
    """The ``repo`` path exists but is not inside a git working tree.

    Attributes:
        path: the path as given.
    """

    def __init__(self, path: str):
        super().__init__(path)
        self.path = path

    def __str__(self) -> str:
        return f"{self.path!r} is not a git repository (or any of its parent directories)"


class GitUnavailable(BuiltinStepError, RuntimeError):
    """No ``git`` executable was found on ``PATH`` (or it could not be started)."""


class GitCommandError(BuiltinStepError, RuntimeError):
    """``git`` exited with an unexpected status.

    Attributes:
        argv: the git arguments (after ``git``), e.g. ``["status", "--porcelain=v2"]``.
        returncode: git's exit status.
        stderr: what git wrote to stderr, stripped.
    """

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str):
        super().__init__(list(argv), returncode, stderr)
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr

    def __str__(self) -> str:
        return f"git {' '.join(self.argv)} exited with status {self.returncode}: {self.stderr or '(no message)'}"


class GitTimeout(BuiltinStepError, TimeoutError):
    """One ``git`` call ran past its own timeout and was killed.

    Attributes:
        argv: the git arguments (after ``git``).
        timeout_s: the per-call timeout in seconds.
    """

    def __init__(self, argv: Sequence[str], timeout_s: float):
        super().__init__(list(argv), timeout_s)
        self.argv = list(argv)
        self.timeout_s = timeout_s

    def __str__(self) -> str:
        return f"git {' '.join(self.argv)} did not finish within {self.timeout_s:g}s and was killed"


class ChatNotFound(StepInputError, LookupError):
    """No chat has the given id in the chat store.

    Attributes:
        chat_id: the id asked for.
        store: the path of the chat store that was searched.
    """

    def __init__(self, chat_id: int, store: str):
        super().__init__(chat_id, store)
        self.chat_id = chat_id
        self.store = store

    def __str__(self) -> str:
        return f"no chat with id {self.chat_id} in the chat store {self.store!r}"


class ChatStoreError(BuiltinStepError, RuntimeError):
    """The chat store cannot be used: its path is a directory, or its schema is newer than ours."""


class SubStepFailed(BuiltinStepError, RuntimeError):
    """A step run inside ``task.execute`` or ``workflow.execute`` raised; the later ones did not run.

    Steps that completed before it are not undone (each one commits on its own).

    Attributes:
        index: the failed step's position in the sequence.
        step: the failed step's name.
        error: the exception it raised (also chained as ``__cause__`` where it was raised).
        results: the results of the steps that completed before it, in order.
    """

    def __init__(self, index: int, step: str, error: BaseException, results: Optional[Sequence[Any]] = None):
        super().__init__(index, step, error, list(results or ()))
        self.index = index
        self.step = step
        self.error = error
        self.results = list(results or ())

    def __str__(self) -> str:
        return (f"step {self.index} ({self.step!r}) raised {type(self.error).__name__}: {self.error}; "
                f"{len(self.results)} step(s) before it completed and were not undone")
