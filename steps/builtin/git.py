"""The git steps: read-only ``git.status``, ``git.current_branch`` and ``git.log``, and the
state-changing ``git.refresh_index``.

Each step checks its parameters, then runs the real ``git`` binary through :func:`run_git`,
the one place that starts git::

    step(repo, ...) ──> require_directory(repo) ──> run_git(repo, *argv)
        │  git -C repo --no-optional-locks -c core.fsmonitor=false <argv>   (stdout/stderr piped, LC_ALL=C)
        ├─ every POLL_INTERVAL_S: cancelled? kill and reap git, ctx.check() raises StepCancelled
        ├─ after GIT_CALL_TIMEOUT_S: kill and reap git, raise GitTimeout
        ├─ non-zero exit: NotAGitRepository or GitCommandError
        └─ exit 0 ──> stdout bytes ──> parse_status / parse_log ──> dict / list

The read-only steps are registered in the pool lane (``critical=False``, tag ``read-only``): git
reads the repository and, thanks to ``--no-optional-locks``, never takes ``index.lock`` to
refresh its stat cache, so it cannot make a concurrent ``git commit`` fail, and it runs
under the pool lane's read-only sandbox. A repository's configuration cannot make these
steps run a program: the fsmonitor hook is switched off for every call, and ``git.log``
passes ``--no-ext-diff --no-textconv`` (``git status`` takes neither: it runs no diff
driver). Clean/smudge filters named in ``.gitattributes`` are not switched off: switching
them off would make ``git status`` report files as changed. Each step also
carries :data:`STEP_LIMITS`, the supervisor's outer bound, which kills the worker's whole
process tree (git included) if everything else fails.

``git.refresh_index`` is the one that writes: ``git update-index -q --refresh`` records the
files' current stat data in ``.git/index``, as a plain ``git status`` in a terminal does on the
side. It runs in the critical lane (it takes ``index.lock``), and it is what keeps the
read-only steps fast on a fresh clone: there, files checked out in the same second as the
index was written are "racily clean", and a ``git status`` that may not write the index
re-reads every such file on every call (18-40 ms instead of 2-3 ms on this project's own
clone) until something refreshes it.

The parsers (:func:`parse_status`, :func:`parse_log`) are pure functions of git's
NUL-separated output, so tests can feed them bytes directly.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from typing import Any, Optional

from governor.context import current_context
from governor.limits import Limits
from governor.steps.builtin.errors import GitCommandError, GitTimeout, GitUnavailable, NotAGitRepository
from governor.steps.builtin.params import require_directory, require_int

#: Seconds one git call may run before it is killed (``GitTimeout``). Generous: a
#: ``git status`` on a cold, very large working tree can take many seconds, and a read-only
#: step that gives up too early is worse than one that waits; a hung git (a network
#: filesystem, a stuck hook) must still not hold a pool worker for ever.
GIT_CALL_TIMEOUT_S = 30.0

#: The supervisor's outer bound for a whole git step (``StepTimeout``, process tree
#: killed). Twice a call's timeout, because ``git.log`` makes two calls; with it, a step
#: that somehow ignores :data:`GIT_CALL_TIMEOUT_S` still ends.
STEP_LIMITS = Limits(timeout_s=2 * GIT_CALL_TIMEOUT_S)

#: How often a running git call checks its step's context for a cancel. Shorter reacts
#: faster (the supervisor's cancel grace is 0.1 s by default) but wakes the worker more;
#: git's output is collected between polls, so it never costs output.
POLL_INTERVAL_S = 0.05

#: ``git.refresh_index``'s reason when it could not take ``index.lock``.
LOCK_NOT_TAKEN = "could not take index.lock: another git process holds it, or the repository is not writable"

#: ``git.log``'s largest ``limit``: the result travels back by pickle and to clients as
#: JSON, so it is kept to a size a UI would show.
MAX_LOG_LIMIT = 1000

# Fixed by us, not by the user's environment: English messages (we match "not a git
# repository"), no pager or credential prompt, no optional lock on the index (no index
# refresh written: the steps are read-only, and run so under the sandbox).
_GIT_ENV = {"LC_ALL": "C", "LANGUAGE": "C", "GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0",
            "GIT_PAGER": "cat", "PAGER": "cat"}

# git log's per-commit fields, NUL-separated (no field can contain NUL): full sha, author
# name, author email, strict ISO 8601 author date, subject.
_LOG_FIELDS = ("sha", "author", "email", "date", "subject")

#: git's options before the command, for every call: no index lock, and no fsmonitor hook
#: (``core.fsmonitor`` may name any program; a read-only step must not run it). ``-c``
#: reaches the git processes git itself starts (submodules) through its environment.
_GIT_OPTIONS = ("--no-optional-locks", "-c", "core.fsmonitor=false")
_LOG_FORMAT = "%H%x00%an%x00%ae%x00%aI%x00%s"


def run_git(repo: str, *argv: str) -> bytes:
    """Run ``git -C repo <argv>`` and return its stdout.

    The call is bounded by :data:`GIT_CALL_TIMEOUT_S` and follows the running step's
    cancellation: while git runs, the step's context is polled every
    :data:`POLL_INTERVAL_S`; on a cancel git is killed and reaped and
    :class:`~governor.errors.StepCancelled` is raised.

    Args:
        repo: an existing directory (checked by the caller).
        argv: git's arguments after the global options.

    Returns:
        git's stdout, raw bytes.

    Raises:
        GitUnavailable: no ``git`` on ``PATH``.
        NotAGitRepository: ``repo`` is not inside a git working tree.
        GitCommandError: git exited with another non-zero status.
        GitTimeout: git ran longer than :data:`GIT_CALL_TIMEOUT_S`.
        StepCancelled: the step was cancelled while git ran.
    """
    ctx = current_context()
    ctx.check()
    git = shutil.which("git")
    if git is None:
        raise GitUnavailable("git is not installed or not on PATH; the git.* steps need it")
    timeout_s = GIT_CALL_TIMEOUT_S  # read at call time, so tests can patch it
    command = [git, "-C", repo, *_GIT_OPTIONS, *argv]
    try:
        # Not start_new_session: git stays in the worker's process group, so the
        # supervisor's tree kill (timeout, memory, shutdown) takes it too.
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env={**os.environ, **_GIT_ENV})
    except OSError as exc:
        raise GitUnavailable(f"could not start {git}: {exc}") from exc
    deadline = time.monotonic() + timeout_s
    with proc:
        while True:
            try:
                # communicate() with a timeout keeps what it read so far and may be called
                # again, so pipes never fill up while we poll for a cancel.
                stdout, stderr = proc.communicate(timeout=POLL_INTERVAL_S)
                break
            except subprocess.TimeoutExpired:
                if ctx.cancelled or time.monotonic() >= deadline:
                    proc.kill()
                    # Reap it (no zombie) without reading on: a grandchild git started
                    # (a hook, fsmonitor) may hold the pipes open. Leaving ``with`` closes them.
                    proc.wait()
                    ctx.check()
                    raise GitTimeout(argv, timeout_s) from None
    if proc.returncode != 0:
        message = stderr.decode("utf-8", "replace").strip()
        if "not a git repository" in message:
            raise NotAGitRepository(repo)
        raise GitCommandError(argv, proc.returncode, message)
    return stdout


def status(repo: str = ".") -> dict:
    """The working tree's status, from ``git status --porcelain=v2 --branch -z``.

    Args:
        repo: a directory inside a git working tree.

    Returns:
        A dict::

            {"branch": "main",         # None on a detached HEAD
             "head": "<sha>",          # None before the first commit
             "upstream": "origin/main",  # None without an upstream
             "ahead": 0, "behind": 0,  # 0 without an upstream
             "changed": [{"path": "b.txt", "orig_path": "a.txt", "index": "R", "worktree": "."}, ...],
             "untracked": ["new.txt", "newdir/"],
             "clean": False}

        ``changed`` lists tracked paths that differ from HEAD, in git's order. ``index`` and
        ``worktree`` are git's XY status letters (``"."`` for unchanged, ``"M"``, ``"A"``,
        ``"D"``, ``"R"``, ``"C"``, ``"T"``, ``"U"`` for unmerged); ``orig_path`` is the
        source of a rename or copy, else ``None``. ``untracked`` uses git's default mode:
        a wholly untracked directory appears once, with a trailing ``/``. Ignored files are
        not listed. ``clean`` is true when both lists are empty.

    Raises:
        StepInputError: ``repo`` does not exist, is not a directory, or is not a repository.
        GitUnavailable, GitCommandError, GitTimeout: as :func:`run_git`.
    """
    repo = require_directory("repo", repo)
    return parse_status(run_git(repo, "status", "--porcelain=v2", "--branch", "-z",
                                "--untracked-files=normal", "--ignored=no"))


def parse_status(output: bytes) -> dict:
    """Parse the output of ``git status --porcelain=v2 --branch -z`` into :func:`status`'s dict.

    Records are NUL-terminated; a rename or copy record (``2 ...``) is followed by one more
    NUL-terminated field, its original path. Paths are decoded as the file system would
    (``os.fsdecode``), so they round-trip to ``open()``.

    Raises:
        ValueError: for a record this parser does not understand.
    """
    result: dict[str, Any] = {"branch": None, "head": None, "upstream": None, "ahead": 0, "behind": 0,
                              "changed": [], "untracked": []}
    fields = output.split(b"\x00")
    if fields and fields[-1] == b"":
        fields.pop()  # the terminator of the last record
    records = iter(fields)
    for raw in records:
        record = os.fsdecode(raw)
        kind = record[:2]
        if kind == "# ":
            _parse_header(record, result)
        elif kind == "1 ":
            # 1 XY sub mH mI mW hH hI path
            xy, path = _split(record, 8)
            result["changed"].append(_change(path, xy))
        elif kind == "2 ":
            # 2 XY sub mH mI mW hH hI Xscore path, then origPath as the next field
            xy, path = _split(record, 9)
            original = next(records, None)
            if original is None:
                raise ValueError(f"git status: rename record without its original path: {record!r}")
            result["changed"].append(_change(path, xy, os.fsdecode(original)))
        elif kind == "u ":
            # u XY sub m1 m2 m3 mW h1 h2 h3 path
            xy, path = _split(record, 10)
            result["changed"].append(_change(path, xy))
        elif kind == "? ":
            result["untracked"].append(record[2:])
        elif kind == "! ":
            continue  # ignored files; not requested, but harmless if a config asks for them
        else:
            raise ValueError(f"git status: unexpected porcelain v2 record {record!r}")
    result["clean"] = not result["changed"] and not result["untracked"]
    return result


def _parse_header(record: str, result: dict) -> None:
    """Fold one ``# branch.*`` header line into ``result``; other headers are skipped."""
    key, _, value = record[2:].partition(" ")
    if key == "branch.oid":
        result["head"] = None if value == "(initial)" else value
    elif key == "branch.head":
        result["branch"] = None if value == "(detached)" else value
    elif key == "branch.upstream":
        result["upstream"] = value
    elif key == "branch.ab":
        ahead, behind = value.split()
        result["ahead"], result["behind"] = int(ahead), abs(int(behind))


def _split(record: str, fields_before_path: int) -> tuple[str, str]:
    """The XY field and the path of a change record (the path may contain spaces)."""
    parts = record.split(" ", fields_before_path)
    if len(parts) != fields_before_path + 1:
        raise ValueError(f"git status: truncated porcelain v2 record {record!r}")
    return parts[1], parts[-1]


def _change(path: str, xy: str, orig_path: Optional[str] = None) -> dict:
    return {"path": path, "orig_path": orig_path, "index": xy[0], "worktree": xy[1]}


def current_branch(repo: str = ".") -> Optional[str]:
    """The short name of the checked-out branch, or ``None`` on a detached HEAD.

    Uses ``git symbolic-ref --short -q HEAD``, which also works before the first commit
    (the unborn branch's name is returned).

    Args:
        repo: a directory inside a git working tree.

    Raises:
        StepInputError: ``repo`` does not exist, is not a directory, or is not a repository.
        GitUnavailable, GitCommandError, GitTimeout: as :func:`run_git`.
    """
    repo = require_directory("repo", repo)
    try:
        output = run_git(repo, "symbolic-ref", "--short", "-q", "HEAD")
    except GitCommandError as exc:
        if exc.returncode == 1:  # -q: HEAD is not a symbolic ref, i.e. detached
            return None
        raise
    return os.fsdecode(output.rstrip(b"\n")) or None


def refresh_index(repo: str = ".") -> dict:
    """Record the working tree's stat data in the index (``git update-index -q --refresh``).

    State-changing (critical lane): it takes ``index.lock`` and rewrites ``.git/index``, the
    way a plain ``git status`` does on the side. Contents are not touched: a modified file
    stays modified. Afterwards the read-only steps no longer re-read "racily clean" files
    (a fresh clone's) on every call. A lock it cannot take (another git command holds it,
    or the repository is not writable by this user) is not an error: the refresh is
    skipped and says so, since only speed depends on it.

    Args:
        repo: a directory inside a git working tree.

    Returns:
        ``{"refreshed": True, "skipped_because": None}``, or ``"refreshed": False`` with
        :data:`LOCK_NOT_TAKEN` as the reason.

    Raises:
        StepInputError: ``repo`` does not exist, is not a directory, or is not a repository.
        GitUnavailable, GitCommandError, GitTimeout: as :func:`run_git` (a bare repository,
            which has no working tree to refresh, is a ``GitCommandError``).
    """
    repo = require_directory("repo", repo)
    try:
        run_git(repo, "update-index", "-q", "--refresh")
    except GitCommandError as exc:
        # With -q, update-index exits 128 *without a message* when the index needs writing
        # and it could not take index.lock (builtin/update-index.c: "if (refresh_args.flags &
        # REFRESH_QUIET) exit(128)"); every other failure says what it is.
        if exc.returncode != 128 or exc.stderr:
            raise
        return {"refreshed": False, "skipped_because": LOCK_NOT_TAKEN}
    return {"refreshed": True, "skipped_because": None}


def log(repo: str = ".", limit: int = 20) -> list[dict]:
    """The last ``limit`` commits reachable from HEAD, newest first.

    Args:
        repo: a directory inside a git working tree.
        limit: how many commits, ``1 <= limit <= MAX_LOG_LIMIT``.

    Returns:
        ``[{"sha", "author", "email", "date", "subject"}, ...]``: the full sha, the author's
        name and email, the author date in strict ISO 8601 with its offset (e.g.
        ``"2024-05-01T12:00:00+02:00"``) and the subject line. An empty list when HEAD has
        no commit yet.

    Raises:
        StepInputError: a bad ``limit``; ``repo`` does not exist, is not a directory, or is
            not a repository.
        GitUnavailable, GitCommandError, GitTimeout: as :func:`run_git`.
    """
    limit = require_int("limit", limit, minimum=1, maximum=MAX_LOG_LIMIT)
    repo = require_directory("repo", repo)
    try:
        run_git(repo, "rev-parse", "--verify", "-q", "HEAD^{commit}")
    except GitCommandError as exc:
        if exc.returncode == 1:  # -q --verify: HEAD names no commit (an unborn branch)
            return []
        raise
    return parse_log(run_git(repo, "log", f"--max-count={limit}", f"--format=tformat:{_LOG_FORMAT}", "-z",
                             "--no-show-signature", "--no-color", "--no-ext-diff", "--no-textconv", "HEAD", "--"))


def parse_log(output: bytes) -> list[dict]:
    """Parse ``git log -z --format=tformat:%H%x00%an%x00%ae%x00%aI%x00%s`` into :func:`log`'s list.

    With ``-z`` every commit ends in NUL and the format puts NUL between its fields, so the
    output is a flat NUL-separated list, five fields per commit. Text is decoded as UTF-8
    (git's default log output encoding), replacing invalid bytes.

    Raises:
        ValueError: when the fields do not come in fives.
    """
    fields = output.decode("utf-8", "replace").split("\x00")
    if fields and fields[-1] == "":
        fields.pop()
    width = len(_LOG_FIELDS)
    if len(fields) % width:
        raise ValueError(f"git log: {len(fields)} fields is not a multiple of {width}")
    return [dict(zip(_LOG_FIELDS, fields[start:start + width])) for start in range(0, len(fields), width)]
