"""The reference backend's steps and view profiles (``governor.bench.backend``).

Kept apart from the web app so that worker processes, which import the modules their steps
live in, never import Starlette: ``governor serve --steps governor.bench.backend`` loads
:data:`registry` through the backend, and its workers import only this module.

A view is a batch of parts. In the ``seed`` and ``seed-753`` profiles each part is a
cancellable wait (:func:`wait`) standing in for the seed backend's I/O; in the ``real``
profile the parts are the built-in git and chat steps, timed by :func:`builtin`. The steps
are named ``view.*``, so a daemon may serve them beside the built-in ones.
"""

from __future__ import annotations

import os
import time
from typing import Dict, List, Tuple

from governor.steps import StepRegistry, current_context
from governor.steps.builtin import chat, default_registry

#: The reference backend's steps.
registry = StepRegistry()

#: The built-in steps the ``real`` profile runs through :func:`builtin`.
_BUILTIN = default_registry()

#: The seed backend's view switch: chat history, git status, current branch (ms).
SEED: Tuple[Tuple[str, float], ...] = (("chat.history", 117), ("git.status", 19), ("git.current_branch", 9))

#: The seed's 753 ms view: twelve parts, run one after another by the seed's registry.
SEED_753: Tuple[Tuple[str, float], ...] = (
    ("chat.history", 117), ("files.tree", 110), ("git.log", 95), ("search.index", 80), ("lint.summary", 75),
    ("tests.last_run", 70), ("deps.audit", 60), ("ci.status", 50), ("issues.open", 40), ("blame.head", 28),
    ("git.status", 19), ("git.current_branch", 9))

#: Profile name -> the view's parts as (part, ms) waits; ``real`` is built from the app's repository and store.
WAIT_PROFILES: Dict[str, Tuple[Tuple[str, float], ...]] = {"seed": SEED, "seed-753": SEED_753}

#: Every profile the backend serves.
PROFILES = (*WAIT_PROFILES, "real")

#: How long saving a message takes in the wait profiles (a critical write, ms).
POST_MS = 5.0


@registry.step(name="view.wait", critical=False)
def wait(part: str, ms: float) -> dict:
    """Stand for one part of a view that takes ``ms`` ms; stop at once when cancelled.

    Returns:
        ``{"part", "ms", "pid"}``: the part, the milliseconds it took here, the worker.
    """
    context = current_context()
    started = time.monotonic()
    if context.wait(ms / 1000):
        context.check()
    return {"part": part, "ms": (time.monotonic() - started) * 1000, "pid": os.getpid()}


@registry.step(name="view.post", critical=True)
def post(chat_id: int, text: str) -> dict:
    """Stand for saving a message (the wait profiles' critical write)."""
    started = time.monotonic()
    time.sleep(POST_MS / 1000)
    return {"chat_id": chat_id, "chars": len(text), "ms": (time.monotonic() - started) * 1000}


@registry.step(name="view.builtin", critical=False)
def builtin(step: str, kwargs: dict) -> dict:
    """Run the read-only built-in ``step`` with ``kwargs``, timed like a :func:`wait` part."""
    started = time.monotonic()
    result = _BUILTIN.get(step).invoke((), kwargs)
    return {"part": step, "ms": (time.monotonic() - started) * 1000, "pid": os.getpid(), "result": result}


@registry.step(name="view.save_message", critical=True)
def save_message(chat_id: int, text: str, store: str) -> dict:
    """Save a message in the ``real`` profile's chat store (the built-in ``chat.send_message``)."""
    started = time.monotonic()
    message_id = chat.send_message(chat_id, text, store=store)
    return {"chat_id": chat_id, "message_id": message_id, "ms": (time.monotonic() - started) * 1000}


def run_step(name: str, kwargs: dict) -> dict:
    """Call the step ``name`` here, as the seed's registry did (and a plain process pool does)."""
    return registry.get(name).invoke((), kwargs)


def wait_calls(profile: str) -> List[Tuple[str, dict]]:
    """A wait profile's view as calls of :func:`wait`."""
    return [("view.wait", {"part": part, "ms": ms}) for part, ms in WAIT_PROFILES[profile]]
