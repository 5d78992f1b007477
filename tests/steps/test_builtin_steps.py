"""The built-in steps: git parsing and errors, the chat store, task/workflow sequences, registry.

Most tests call the step functions directly in this process (fast) on real temporary git
repositories and SQLite stores under ``tmp_path``; a few run them through a real
``Supervisor(default_registry())`` to prove they work in worker processes.

The autouse ``isolated_env`` fixture keeps every test away from the user's git config and
XDG state directory, and stops git from discovering a repository above ``tmp_path``.
"""

import datetime
import os
import pickle
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from conftest import alive
from governor import Call, StepCancelled, Supervisor
from governor.context import StepContext
from governor.limits import Lane, Limits
from governor.workers.sandbox import SandboxPolicy
from sandboxed import needs_landlock, run_sandboxed
from step_library import wait_for_path
from governor.steps.builtin import (WORKFLOWS, ChatNotFound, ChatStoreError, GitCommandError, GitTimeout, GitUnavailable,
                           NotAGitRepository, StepInputError, StepInputTypeError, SubStepFailed, Workflow,
                           WorkflowStep, Result, chat, default_registry, git, sequence)

AUTHOR_DATE = "2024-05-01T12:00:00+02:00"


@pytest.fixture(autouse=True)
def isolated_env(isolated_git_env, tmp_path, monkeypatch):
    """The shared git/XDG isolation, a chat store from the environment in tmp_path, and
    ``store`` parameters allowed anywhere under tmp_path."""
    monkeypatch.setenv(chat.STORE_ENV_VAR, str(tmp_path / "env-store" / "chat.sqlite3"))
    monkeypatch.setenv(chat.STORE_DIRS_ENV_VAR, str(tmp_path))


def run(repo, *args, env=None):
    """Run git in ``repo`` for the test's setup; return its stdout."""
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}).stdout.strip()


def commit(repo, message, **files):
    """Write ``files`` (name -> text), stage everything and commit at a fixed author date."""
    for name, text in files.items():
        Path(repo, name).write_text(text)
    run(repo, "add", "-A")
    run(repo, "commit", "-q", "-m", message, env={"GIT_AUTHOR_DATE": AUTHOR_DATE})
    return run(repo, "rev-parse", "HEAD")


def new_repo(path):
    path.mkdir()
    run(path, "init", "-q", "-b", "main")
    run(path, "config", "user.name", "Ada Lovelace")
    run(path, "config", "user.email", "ada@example.org")
    return path


@pytest.fixture
def repo(tmp_path):
    """A repository on ``main`` with two commits and the files a.txt, b.txt and 'c d.txt'."""
    path = new_repo(tmp_path / "repo")
    commit(path, "first", **{"a.txt": "a\n"})
    commit(path, "second: add b and c d", **{"b.txt": "b\n", "c d.txt": "c\n"})
    return path


@pytest.fixture
def empty_repo(tmp_path):
    return new_repo(tmp_path / "empty")


@pytest.fixture
def store(tmp_path):
    return str(tmp_path / "store" / "chat.sqlite3")


@pytest.fixture
def fake_git(tmp_path, monkeypatch):
    """Put a ``git`` on PATH that publishes its pid in a marker file, then hangs in ``sleep``.

    Returns the marker's path. ``exec`` keeps the pid, so the pid is the process to kill.
    """
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    marker = tmp_path / "git-started"
    script = bin_dir / "git"
    script.write_text(f'#!/bin/sh\necho $$ > "{marker}.tmp" && mv "{marker}.tmp" "{marker}"\nexec sleep 1000\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return marker


# -- git.status ----------------------------------------------------------------------------

def test_status_of_a_clean_repo(repo):
    assert git.status(str(repo)) == {
        "branch": "main", "head": run(repo, "rev-parse", "HEAD"), "upstream": None, "ahead": 0, "behind": 0,
        "changed": [], "untracked": [], "clean": True}


def test_status_reports_changes_renames_and_untracked_paths(repo):
    Path(repo, "a.txt").write_text("changed in the work tree\n")
    Path(repo, "b.txt").write_text("changed and staged\n")
    run(repo, "add", "b.txt")
    run(repo, "mv", "c d.txt", "e f.txt")
    Path(repo, "new file.txt").write_text("untracked\n")
    Path(repo, "newdir").mkdir()
    Path(repo, "newdir", "x.txt").write_text("untracked dir\n")
    status = git.status(repo)  # an os.PathLike repo is accepted too
    assert sorted(status["changed"], key=lambda change: change["path"]) == [
        {"path": "a.txt", "orig_path": None, "index": ".", "worktree": "M"},
        {"path": "b.txt", "orig_path": None, "index": "M", "worktree": "."},
        {"path": "e f.txt", "orig_path": "c d.txt", "index": "R", "worktree": "."},
    ]
    assert sorted(status["untracked"]) == ["new file.txt", "newdir/"]
    assert status["clean"] is False


def test_status_reports_upstream_ahead_and_behind(repo):
    run(repo, "branch", "base", "HEAD~1")
    run(repo, "checkout", "-q", "base")
    commit(repo, "only on base", **{"base.txt": "base\n"})
    run(repo, "checkout", "-q", "main")
    run(repo, "branch", "-q", "--set-upstream-to=base")
    status = git.status(str(repo))
    assert (status["upstream"], status["ahead"], status["behind"]) == ("base", 1, 1)


def test_detached_head_has_no_branch(repo):
    first = run(repo, "rev-parse", "HEAD~1")
    run(repo, "checkout", "-q", "--detach", "HEAD~1")
    status = git.status(str(repo))
    assert (status["branch"], status["head"], status["clean"]) == (None, first, True)
    assert git.current_branch(str(repo)) is None


def test_a_repo_without_commits(empty_repo):
    status = git.status(str(empty_repo))
    assert (status["branch"], status["head"], status["clean"]) == ("main", None, True)
    assert git.current_branch(str(empty_repo)) == "main"
    assert git.log(str(empty_repo)) == []
    Path(empty_repo, "first.txt").write_text("x\n")
    assert git.status(str(empty_repo))["untracked"] == ["first.txt"]


def test_current_branch_follows_checkouts_and_works_from_a_subdirectory(repo):
    assert git.current_branch(str(repo)) == "main"
    run(repo, "checkout", "-q", "-b", "feature/x")
    Path(repo, "sub").mkdir()
    assert git.current_branch(str(repo / "sub")) == "feature/x"


def test_parse_status_handles_every_record_kind():
    output = b"\x00".join([
        b"# branch.oid 1111111111111111111111111111111111111111",
        b"# branch.head topic",
        b"# branch.upstream origin/topic",
        b"# branch.ab +3 -2",
        b"# stash 4",  # a header we do not use
        b"1 .M N... 100644 100644 100644 aaaa aaaa spaced name.txt",
        b"2 R. N... 100644 100644 100644 aaaa aaaa R100 new name.txt",
        b"old name.txt",
        b"u UU N... 100644 100644 100644 100644 aaaa bbbb cccc conflict.txt",
        b"? untracked.txt",
        b"! ignored.txt",
    ]) + b"\x00"
    assert git.parse_status(output) == {
        "branch": "topic", "head": "1" * 40, "upstream": "origin/topic", "ahead": 3, "behind": 2,
        "changed": [
            {"path": "spaced name.txt", "orig_path": None, "index": ".", "worktree": "M"},
            {"path": "new name.txt", "orig_path": "old name.txt", "index": "R", "worktree": "."},
            {"path": "conflict.txt", "orig_path": None, "index": "U", "worktree": "U"},
        ],
        "untracked": ["untracked.txt"], "clean": False}


@pytest.mark.parametrize("output", [b"2 R. N... 100644 100644 100644 aaaa aaaa R100 new\x00",
                                    b"1 .M N... 100644\x00", b"X what\x00"])
def test_parse_status_rejects_what_it_does_not_understand(output):
    with pytest.raises(ValueError, match="git status"):
        git.parse_status(output)


# -- git.log -------------------------------------------------------------------------------

def test_log_lists_commits_newest_first(repo):
    commits = git.log(str(repo))
    assert [entry["subject"] for entry in commits] == ["second: add b and c d", "first"]
    assert commits[0]["sha"] == run(repo, "rev-parse", "HEAD")
    assert (commits[0]["author"], commits[0]["email"]) == ("Ada Lovelace", "ada@example.org")
    assert datetime.datetime.fromisoformat(commits[0]["date"]) == datetime.datetime.fromisoformat(AUTHOR_DATE)
    assert git.log(str(repo), limit=1) == commits[:1]


def test_log_keeps_unicode_and_takes_the_subject_line_only(repo):
    Path(repo, "a.txt").write_text("again\n")
    run(repo, "commit", "-q", "-am", "héllo → wörld\n\nthe body is not the subject")
    assert git.log(str(repo), limit=1)[0]["subject"] == "héllo → wörld"


@pytest.mark.parametrize("limit, error", [(0, StepInputError), (git.MAX_LOG_LIMIT + 1, StepInputError),
                                          (True, StepInputTypeError), ("5", StepInputTypeError),
                                          (2.0, StepInputTypeError)])
def test_log_validates_its_limit(repo, limit, error):
    with pytest.raises(error, match="limit"):
        git.log(str(repo), limit=limit)


# -- git.refresh_index ---------------------------------------------------------------------

def _racily_clean(repo: Path) -> Path:
    """Make every entry of ``repo``'s index racily clean, as a fresh clone's often are.

    Each tracked file and the index get the same whole-second mtime, 100 s ago, after the
    index has recorded the files' stat data: git must then re-read every file to trust it,
    and a refresh must write the index. Built from fixed times, not from the moments the
    fixture ran, so a second boundary between two commands cannot leave an entry non-racy.
    """
    index = repo / ".git" / "index"
    then = int(datetime.datetime.now().timestamp()) - 100
    for name in run(repo, "ls-files", "-z").split("\0"):
        if name:
            os.utime(repo / name, (then, then))
    run(repo, "update-index", "-q", "--refresh")
    os.utime(index, (then, then))
    return index


def test_refresh_index_makes_racily_clean_entries_clean_without_changing_the_status(repo):
    index = _racily_clean(repo)
    racy_mtime = index.stat().st_mtime_ns
    Path(repo, "a.txt").write_text("changed in the work tree\n")
    before = git.status(str(repo))
    assert git.status(str(repo)) == before and index.stat().st_mtime_ns == racy_mtime, \
        "the read-only status never writes the index"
    assert git.refresh_index(str(repo)) == {"refreshed": True, "skipped_because": None}
    assert index.stat().st_mtime_ns > racy_mtime, "the refresh wrote the index"
    assert git.status(str(repo)) == before, "only stat data changed: a modified file stays modified"


def test_refresh_index_is_skipped_not_failed_while_another_git_holds_the_lock(repo):
    _racily_clean(repo)  # so the index needs writing: with nothing to record, git takes no lock
    lock = Path(repo, ".git", "index.lock")
    lock.write_text("")
    assert git.refresh_index(str(repo)) == {"refreshed": False, "skipped_because": git.LOCK_NOT_TAKEN}
    assert lock.read_text() == "", "the other process's lock is left alone"


def test_refresh_index_of_a_bare_repository_is_git_s_error(tmp_path):
    bare = tmp_path / "bare.git"
    run(tmp_path, "init", "-q", "--bare", str(bare))
    with pytest.raises(GitCommandError, match="work tree"):
        git.refresh_index(str(bare))


# -- git errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("step", [git.status, git.current_branch, git.log, git.refresh_index])
def test_git_steps_reject_bad_paths(step, tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    with pytest.raises(StepInputError, match="does not exist"):
        step(str(tmp_path / "missing"))
    with pytest.raises(StepInputError, match="not a directory"):
        step(str(a_file))
    with pytest.raises(NotAGitRepository, match="not a git repository") as not_repo:
        step(str(plain_dir))
    assert isinstance(not_repo.value, ValueError)
    with pytest.raises(StepInputTypeError, match="repo must be a path"):
        step(42)
    with pytest.raises(StepInputError, match="empty"):
        step("")


@pytest.mark.parametrize("step", [git.status, git.current_branch, git.log, git.refresh_index])
def test_git_steps_say_when_git_is_missing(step, repo, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin-here"))
    with pytest.raises(GitUnavailable, match="git is not installed"):
        step(str(repo))


def test_other_git_failures_carry_git_s_message(tmp_path):
    bare = tmp_path / "bare.git"
    run(tmp_path, "init", "-q", "--bare", str(bare))
    with pytest.raises(GitCommandError, match="work tree") as failed:
        git.status(str(bare))
    assert failed.value.returncode == 128
    assert failed.value.argv[0] == "status"


def test_a_cancelled_git_call_is_killed_and_raises_step_cancelled(tmp_path, fake_git, monkeypatch):
    ctx = StepContext(task_id=7, step="git.status")
    monkeypatch.setattr(git, "current_context", lambda: ctx)

    def cancel_once_git_runs():
        wait_for_path(str(fake_git))
        ctx.request_cancel("explicit", "the test")

    canceller = threading.Thread(target=cancel_once_git_runs)
    canceller.start()
    with pytest.raises(StepCancelled, match="the test"):
        git.status(str(tmp_path))
    canceller.join()
    assert not alive(int(fake_git.read_text())), "the git child was killed and reaped"


def test_a_git_call_past_its_timeout_is_killed(tmp_path, fake_git, monkeypatch):
    monkeypatch.setattr(git, "GIT_CALL_TIMEOUT_S", 0.2)
    with pytest.raises(GitTimeout, match="0.2s") as timed_out:
        git.current_branch(str(tmp_path))
    assert isinstance(timed_out.value, TimeoutError)
    assert not alive(int(fake_git.read_text()))


# -- chat store ----------------------------------------------------------------------------

def test_chat_round_trip_returns_the_newest_messages_oldest_first(store):
    chat_id = chat.create("Planning", store=store)
    other = chat.create("Other", store=store)
    assert (chat_id, other) == (1, 2)
    ids = [chat.send_message(chat_id, f"message {n}", author="user" if n % 2 else "assistant", store=store)
           for n in range(5)]
    chat.send_message(other, "elsewhere", store=store)
    assert ids == sorted(ids)
    history = chat.history(chat_id, store=store)
    assert [message["text"] for message in history] == [f"message {n}" for n in range(5)]
    assert history[0]["author"] == "assistant" and history[1]["author"] == "user"
    assert {message["chat_id"] for message in history} == {chat_id}
    assert [message["id"] for message in history] == ids
    assert datetime.datetime.fromisoformat(history[0]["created_at"]).tzinfo is not None
    assert [message["text"] for message in chat.history(chat_id, limit=2, store=store)] == ["message 3", "message 4"]
    assert chat.history(chat.create("Empty", store=store), store=store) == []


def test_unknown_chats_are_refused(store):
    chat.create("exists", store=store)
    with pytest.raises(ChatNotFound, match="no chat with id 9") as missing:
        chat.send_message(9, "hello", store=store)
    assert isinstance(missing.value, LookupError) and isinstance(missing.value, ValueError)
    with pytest.raises(ChatNotFound):
        chat.history(9, store=store)
    with sqlite3.connect(store) as connection:
        assert connection.execute("SELECT COUNT(*) FROM messages").fetchone() == (0,)


@pytest.mark.parametrize("call, error, match", [
    (lambda s: chat.create("", store=s), StepInputError, "title must not be empty"),
    (lambda s: chat.create("   ", store=s), StepInputError, "title must not be empty"),
    (lambda s: chat.create(None, store=s), StepInputTypeError, "title must be a str"),
    (lambda s: chat.create("x" * (chat.MAX_TITLE_BYTES + 1), store=s), StepInputError, "title is"),
    (lambda s: chat.send_message(True, "hi", store=s), StepInputTypeError, "chat_id must be an int"),
    (lambda s: chat.send_message("1", "hi", store=s), StepInputTypeError, "chat_id must be an int"),
    (lambda s: chat.send_message(0, "hi", store=s), StepInputError, "chat_id must be 1 <= chat_id"),
    (lambda s: chat.send_message(1, "x" * (chat.MAX_TEXT_BYTES + 1), store=s), StepInputError, "65537 bytes"),
    (lambda s: chat.send_message(1, "é" * (chat.MAX_TEXT_BYTES // 2 + 1), store=s), StepInputError, "bytes"),
    (lambda s: chat.send_message(1, "nul\x00", store=s), StepInputError, "NUL"),
    (lambda s: chat.send_message(1, "\ud800", store=s), StepInputError, "not valid Unicode"),
    (lambda s: chat.send_message(1, b"bytes", store=s), StepInputTypeError, "text must be a str"),
    (lambda s: chat.send_message(1, "hi", author="", store=s), StepInputError, "author"),
    (lambda s: chat.history(1, limit=0, store=s), StepInputError, "limit"),
    (lambda s: chat.history(1, limit=chat.MAX_HISTORY_LIMIT + 1, store=s), StepInputError, "limit"),
    (lambda s: chat.history(1, store=42), StepInputTypeError, "store must be a path"),
])
def test_chat_parameters_are_validated(store, call, error, match):
    with pytest.raises(error, match=match):
        call(store)
    assert not os.path.exists(store), "nothing was written for a bad call"


def test_text_at_the_size_limit_is_accepted(store):
    chat_id = chat.create("big", store=store)
    chat.send_message(chat_id, "x" * chat.MAX_TEXT_BYTES, store=store)
    assert len(chat.history(chat_id, store=store)[0]["text"]) == chat.MAX_TEXT_BYTES


def test_store_is_created_in_wal_mode_with_its_schema(store):
    chat.create("first", store=store)
    with sqlite3.connect(store) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert connection.execute("PRAGMA user_version").fetchone() == (chat.SCHEMA_VERSION,)
        indexes = connection.execute("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall()
        assert ("messages_by_chat",) in indexes
        plan = " ".join(row[-1] for row in connection.execute(
            "EXPLAIN QUERY PLAN SELECT * FROM messages WHERE chat_id = 1 ORDER BY id DESC LIMIT 5"))
        assert "messages_by_chat" in plan


def test_a_newer_schema_or_a_directory_is_refused(store, tmp_path):
    chat.create("first", store=store)
    with sqlite3.connect(store) as connection:
        connection.execute(f"PRAGMA user_version = {chat.SCHEMA_VERSION + 1}")
    with pytest.raises(ChatStoreError, match="schema version"):
        chat.history(1, store=store)
    with pytest.raises(ChatStoreError, match="is a directory"):
        chat.create("x", store=str(tmp_path))
    with pytest.raises(ChatStoreError, match="is a directory"):
        chat.history(1, store=str(tmp_path))


def test_store_path_precedence(tmp_path, monkeypatch):
    assert chat.store_path(tmp_path / "explicit.db") == str(tmp_path / "explicit.db")
    assert chat.store_path() == str(tmp_path / "env-store" / "chat.sqlite3")
    monkeypatch.delenv(chat.STORE_ENV_VAR)
    assert chat.store_path() == str(tmp_path / "xdg-state" / "governor" / "chat.sqlite3")
    monkeypatch.setenv("XDG_STATE_HOME", "relative/is/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert chat.store_path() == str(tmp_path / "home" / ".local" / "state" / "governor" / "chat.sqlite3")


def test_steps_without_a_store_use_the_environment(tmp_path, monkeypatch):
    chat_id = chat.create("from env")
    assert (tmp_path / "env-store" / "chat.sqlite3").exists()
    monkeypatch.delenv(chat.STORE_ENV_VAR)
    chat.create("from xdg")
    assert (tmp_path / "xdg-state" / "governor" / "chat.sqlite3").exists()
    monkeypatch.setenv(chat.STORE_ENV_VAR, str(tmp_path / "env-store" / "chat.sqlite3"))
    assert chat.history(chat_id) == []


def test_concurrent_writers_and_readers_all_succeed(store):
    chat_id = chat.create("busy", store=store)
    errors = []
    barrier = threading.Barrier(6)

    def writer(name):
        barrier.wait()
        try:
            for n in range(20):
                chat.send_message(chat_id, f"{name}-{n}", store=store)
        except Exception as exc:  # reported below
            errors.append(exc)

    def reader():
        barrier.wait()
        try:
            for _ in range(20):
                chat.history(chat_id, store=store)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(f"w{i}",)) for i in range(4)]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    texts = [message["text"] for message in chat.history(chat_id, limit=1000, store=store)]
    assert len(texts) == 80
    for name in ("w0", "w1", "w2", "w3"):  # each writer's messages are in its own order
        assert [text for text in texts if text.startswith(name + "-")] == [f"{name}-{n}" for n in range(20)]


def test_a_store_parameter_may_only_name_a_file_in_the_allowed_directories(tmp_path, monkeypatch):
    monkeypatch.delenv(chat.STORE_DIRS_ENV_VAR)
    state = tmp_path / "xdg-state" / "governor"
    assert chat.create("in the state dir", store=state / "other.sqlite3") == 1
    assert chat.create("the env store by name", store=tmp_path / "env-store" / "chat.sqlite3") == 1
    outside = tmp_path / "elsewhere" / "chat.sqlite3"
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    for escape in (outside, state / ".." / ".." / "elsewhere" / "chat.sqlite3", state / ".." / "x.db"):
        with pytest.raises(StepInputError, match="outside the directories.*GOVERNOR_CHAT_STORE_DIRS"):
            chat.create("escape", store=escape)
    (state / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(StepInputError, match="outside"):
        chat.send_message(1, "through a symlink", store=state / "link" / "chat.sqlite3")
    with pytest.raises(StepInputError, match="outside"):
        chat.history(1, store=outside)
    assert not (tmp_path / "elsewhere").exists(), "no directory was made for a refused store"
    monkeypatch.setenv(chat.STORE_DIRS_ENV_VAR, os.pathsep.join(["relative/ignored", str(tmp_path / "elsewhere")]))
    assert chat.create("allowed by the operator", store=outside) == 1


def foreign_database(path):
    """Another application's SQLite file, in rollback-journal mode."""
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY, owner TEXT)")
        connection.execute("INSERT INTO accounts (owner) VALUES ('ada')")
    connection.close()
    return path


def test_a_foreign_sqlite_file_is_refused_and_left_exactly_as_it_was(tmp_path):
    foreign = foreign_database(tmp_path / "app.sqlite3")
    before = foreign.read_bytes()
    for attempt in (lambda: chat.create("intruder", store=foreign), lambda: chat.send_message(1, "x", store=foreign),
                    lambda: chat.history(1, store=foreign)):
        with pytest.raises(ChatStoreError, match="not a Governor chat store"):
            attempt()
    assert foreign.read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith("app")) == ["app.sqlite3"]
    with sqlite3.connect(foreign) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    connection.close()


def test_history_only_reads_a_missing_store_is_not_created(store):
    with pytest.raises(ChatNotFound):
        chat.history(1, store=store)
    assert not os.path.exists(store) and not os.path.exists(os.path.dirname(store))


#: A process that holds a chat store open and writes rows it never checkpoints: the rows
#: live only in the WAL until it exits. It says "ready" once they are committed.
_WAL_WRITER = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("PRAGMA wal_autocheckpoint = 0")
for text in ("only in the WAL 1", "only in the WAL 2"):
    connection.execute("INSERT INTO messages (chat_id, author, text, created_at) VALUES (1, 'w', ?, 'now')", (text,))
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def wal_writer(store):
    """A store with one chat and one message, and a function that starts the writer above."""
    chat.send_message(chat.create("shared", store=store), "checkpointed", store=store)
    started = []

    def start():
        writer = subprocess.Popen([sys.executable, "-c", _WAL_WRITER, store], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        started.append(writer)
        assert writer.stdout.readline() == "ready\n"
        return writer

    try:
        yield start
    finally:
        for writer in started:
            writer.stdin.close()
            writer.wait(timeout=60)


def test_history_reads_rows_another_process_has_not_checkpointed(store, wal_writer):
    wal_writer()
    assert os.path.getsize(store + "-wal") > 0
    texts = [message["text"] for message in chat.history(1, store=store)]
    assert texts == ["checkpointed", "only in the WAL 1", "only in the WAL 2"]


@needs_landlock
def test_history_works_in_a_sandboxed_worker_with_and_without_a_writer(store, wal_writer, tmp_path):
    (tmp_path / "tmp").mkdir()
    policy = SandboxPolicy(tmp_root=tmp_path / "tmp")

    def read(report):
        return [message["text"] for message in chat.history(1, store=store)]

    # No connection open: SQLite deleted -wal and -shm, and the sandbox may not make them.
    assert not os.path.exists(store + "-wal")
    assert run_sandboxed(read, policy).unwrap() == ["checkpointed"]
    wal_writer()
    assert run_sandboxed(read, policy).unwrap() == ["checkpointed", "only in the WAL 1", "only in the WAL 2"]
    store_dir = os.path.dirname(store)
    assert sorted(os.listdir(store_dir)) == ["chat.sqlite3", "chat.sqlite3-shm", "chat.sqlite3-wal"]


@needs_landlock
def test_git_steps_work_in_a_sandboxed_worker_and_write_nothing(repo, tmp_path):
    (tmp_path / "tmp").mkdir()
    (repo / "a.txt").write_text("changed\n")  # a stale stat cache: git would like to refresh the index
    (repo / "new.txt").write_text("untracked\n")
    index = repo / ".git" / "index"
    before = (index.read_bytes(), index.stat().st_mtime_ns)
    outcome = run_sandboxed(
        lambda report: (git.status(str(repo)), git.current_branch(str(repo)), git.log(str(repo), limit=5)),
        SandboxPolicy(tmp_root=tmp_path / "tmp"))
    status, branch, commits = outcome.unwrap()
    assert outcome.report.applied
    assert branch == "main" and [commit["subject"] for commit in commits] == ["second: add b and c d", "first"]
    assert [change["path"] for change in status["changed"]] == ["a.txt"] and status["untracked"] == ["new.txt"]
    assert (index.read_bytes(), index.stat().st_mtime_ns) == before
    assert not (repo / ".git" / "index.lock").exists()


def test_git_steps_never_run_the_repositorys_fsmonitor_hook(repo, tmp_path):
    marker = tmp_path / "fsmonitor-ran"
    hook = tmp_path / "fsmonitor-hook"
    hook.write_text(f"#!/bin/sh\necho ran >> '{marker}'\n")
    hook.chmod(0o755)
    run(repo, "config", "core.fsmonitor", str(hook))
    (repo / "a.txt").write_text("changed\n")
    assert git.status(str(repo))["changed"][0]["path"] == "a.txt"
    git.current_branch(str(repo))
    git.log(str(repo), limit=1)
    assert not marker.exists(), "git.status ran the repository's core.fsmonitor command"
    run(repo, "status")  # the hook is real: plain git does run it
    assert marker.exists()


# -- task.execute and workflow.execute -----------------------------------------------------

def test_task_execute_runs_steps_in_order(repo, store):
    results = sequence.execute_task([
        {"step": "chat.create", "params": {"title": "t", "store": store}},
        {"step": "chat.send_message", "params": {"chat_id": 1, "text": "hi", "store": store}},
        {"step": "git.current_branch", "params": {"repo": str(repo)}},
        {"step": "chat.history", "params": {"chat_id": 1, "store": store}},
    ])
    assert results[:3] == [1, 1, "main"]
    assert [message["text"] for message in results[3]] == ["hi"]


@pytest.mark.parametrize("steps, error, match", [
    ("chat.create", StepInputTypeError, "steps must be a list"),
    ([], StepInputError, "must not be empty"),
    ([{"step": "git.status"}] * (sequence.MAX_SEQUENCE_STEPS + 1), StepInputError, "at most"),
    ([("chat.create", {})], StepInputTypeError, r"steps\[0\] must be a dict"),
    ([{"step": "chat.create", "args": []}], StepInputError, "unknown keys"),
    ([{"params": {}}], StepInputTypeError, "'step' must be a step name"),
    ([{"step": "chat.create", "params": ["t"]}], StepInputTypeError, "must be a dict"),
    ([{"step": "chat.creat"}], StepInputError, "did you mean 'chat.create'"),
    ([{"step": "task.execute", "params": {"steps": []}}], StepInputError, "no nesting"),
    ([{"step": "workflow.execute", "params": {"name": "x"}}], StepInputError, "no nesting"),
    ([{"step": "chat.create", "params": {"titel": "t"}}], StepInputTypeError, "bad parameters for chat.create"),
    ([{"step": "chat.send_message", "params": {"text": "t"}}], StepInputTypeError, "missing a required"),
])
def test_task_execute_checks_every_item_before_running_any(store, steps, error, match):
    if isinstance(steps, list) and steps and isinstance(steps[-1], dict):
        steps = [{"step": "chat.create", "params": {"title": "first", "store": store}}] + steps
    with pytest.raises(error, match=match):
        sequence.execute_task(steps)
    assert not os.path.exists(store), "no step ran"


def test_a_failing_step_stops_the_task_and_keeps_what_completed(store):
    with pytest.raises(SubStepFailed) as failed:
        sequence.execute_task([
            {"step": "chat.create", "params": {"title": "t", "store": store}},
            {"step": "chat.send_message", "params": {"chat_id": 2, "text": "hi", "store": store}},
            {"step": "chat.create", "params": {"title": "never", "store": store}},
        ])
    error = failed.value
    assert (error.index, error.step, error.results) == (1, "chat.send_message", [1])
    assert isinstance(error.error, ChatNotFound) and error.__cause__ is error.error
    assert "step 1 ('chat.send_message') raised ChatNotFound" in str(error)
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.results, type(copy.error)) == (str(error), [1], ChatNotFound)
    with pytest.raises(ChatNotFound):
        chat.history(2, store=store)


class CancelledAtSecondCheck(StepContext):
    """A context whose cancel arrives while the first step of a sequence runs."""

    def __init__(self):
        super().__init__(task_id=3, step="task.execute")
        self.checks = 0

    def check(self):
        self.checks += 1
        if self.checks == 2:
            self.request_cancel("explicit", "stop now")
        super().check()


def test_a_cancelled_task_stops_between_steps(store, monkeypatch):
    monkeypatch.setattr(sequence, "current_context", CancelledAtSecondCheck)
    with pytest.raises(StepCancelled, match="stop now"):
        sequence.execute_task([{"step": "chat.create", "params": {"title": "a", "store": store}},
                               {"step": "chat.create", "params": {"title": "b", "store": store}}])
    with sqlite3.connect(store) as connection:
        assert connection.execute("SELECT title FROM chats").fetchall() == [("a",)]


def test_workflow_new_chat_with_message(store):
    chat_id, message_id = sequence.execute_workflow(
        "new-chat-with-message", {"title": "Hello", "text": "first words", "store": store})
    assert (chat_id, message_id) == (1, 1)
    sequence.execute_workflow("new-chat-with-message",
                              {"title": "Again", "text": "second", "author": "assistant", "store": store})
    (message,) = chat.history(2, store=store)
    assert (message["text"], message["author"]) == ("second", "assistant")
    assert chat.history(1, store=store)[0]["author"] == "user", "an omitted optional parameter keeps the default"


def test_workflow_repo_overview(repo):
    branch, status, commits = sequence.execute_workflow("repo-overview", {"repo": str(repo), "limit": 1})
    assert (branch, status["clean"], len(commits)) == ("main", True, 1)


@pytest.mark.parametrize("name, params, error, match", [
    ("new-chat", {}, StepInputError, "did you mean 'new-chat-with-message'"),
    (7, {}, StepInputTypeError, "workflow name"),
    ("new-chat-with-message", {"title": "t"}, StepInputError, r"missing \['text'\]"),
    ("new-chat-with-message", {"title": "t", "text": "x", "colour": 1}, StepInputError, r"unknown \['colour'\]"),
    ("new-chat-with-message", ["t"], StepInputTypeError, "params must be a dict"),
])
def test_workflow_parameters_are_checked_before_running(store, name, params, error, match):
    with pytest.raises(error, match=match):
        sequence.execute_workflow(name, params)
    assert not os.path.exists(store)


def test_every_workflow_uses_registered_steps_with_fitting_parameters():
    registry = default_registry()
    for workflow in WORKFLOWS.values():
        assert workflow.description
        every_param = dict.fromkeys(workflow.parameters, "x")
        for index, step in enumerate(workflow.steps):
            assert step.step in registry and step.step not in sequence.SEQUENCE_STEP_NAMES
            sequence._checked_step(f"{workflow.name}[{index}]", step.step, step.names(every_param))


def test_a_workflow_may_only_use_earlier_results():
    with pytest.raises(ValueError, match="not an earlier step"):
        Workflow("bad", "uses its own result", [WorkflowStep("chat.history", {"chat_id": Result(0)})])
    with pytest.raises(ValueError, match="no steps"):
        Workflow("empty", "nothing", [])


# -- registry and errors -------------------------------------------------------------------

def test_default_registry_declares_every_builtin_step():
    registry = default_registry()
    assert registry is not default_registry(), "a new registry on every call"
    pool = {"git.status", "git.current_branch", "git.log", "chat.history"}
    critical = {"git.refresh_index", "chat.create", "chat.send_message", "task.execute", "workflow.execute"}
    assert set(registry.names()) == pool | critical
    for name in registry:
        spec = registry.get(name)
        expected = Lane.POOL if name in pool else Lane.CRITICAL
        assert registry.classify(name).lane is expected
        assert spec.critical is (name in critical)
        assert ("read-only" in spec.tags) is (name in pool)
        assert spec.limits.timeout_s is not None and spec.description
        assert pickle.loads(pickle.dumps(spec.fn)) is spec.fn, "workers import steps by reference"
    assert registry.get("git.status").limits.timeout_s >= git.GIT_CALL_TIMEOUT_S


@pytest.mark.parametrize("error", [
    StepInputError("bad"), NotAGitRepository("/x"), GitUnavailable("no git"),
    GitCommandError(["status"], 128, "fatal"), GitTimeout(["log"], 30.0), ChatNotFound(3, "/s"),
    ChatStoreError("dir"), SubStepFailed(1, "chat.create", ValueError("v"), [1]),
])
def test_errors_pickle_with_their_message(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)


# -- in real workers -----------------------------------------------------------------------

def test_read_only_steps_run_together_in_the_pool(repo, store):
    chat_id = chat.create("seen from a worker", store=store)
    chat.send_message(chat_id, "hello", store=store)
    with Supervisor(default_registry(), workers=2) as sup:
        status, branch, history, commits = sup.run_batch([
            ("git.status", {"repo": str(repo)}), ("git.current_branch", {"repo": str(repo)}),
            ("chat.history", {"chat_id": chat_id, "store": store}), ("git.log", {"repo": str(repo), "limit": 1})])
        assert sup.classify("git.status")[0] is Lane.POOL
        with pytest.raises(StepInputError) as failed:
            sup.submit("git.status", str(repo / "missing")).result(timeout=60)
        overview = sup.submit("workflow.execute", "repo-overview", {"repo": str(repo)}).result(timeout=60)
    assert status == git.status(str(repo)) and status["clean"]
    assert branch == "main"
    assert [message["text"] for message in history] == ["hello"]
    assert commits == git.log(str(repo), limit=1)
    assert "does not exist" in str(failed.value.__cause__), "the worker's traceback, chained"
    assert overview[0] == "main" and overview[1] == status


def test_critical_steps_submitted_in_a_row_keep_their_order(store):
    with Supervisor(default_registry(), workers=2) as sup:
        created = sup.submit("chat.create", "ordered", store=store)
        # Not waiting for the chat: the critical lane runs these after it, in this order.
        sends = [sup.submit("chat.send_message", 1, f"message {n}", store=store) for n in range(20)]
        task = sup.submit("task.execute", [{"step": "chat.send_message",
                                            "params": {"chat_id": 1, "text": "from a task", "store": store}}])
        assert created.result(timeout=60) == 1
        message_ids = [future.result(timeout=60) for future in sends]
        assert task.result(timeout=60) == [21]
        # Only now: chat.history is a pool step, which does not wait for the critical lane.
        final = sup.submit("chat.history", 1, limit=100, store=store).result(timeout=60)
    assert message_ids == list(range(1, 21))
    assert [message["text"] for message in final] == [f"message {n}" for n in range(20)] + ["from a task"]


def test_cancelling_a_running_git_step_kills_git_and_keeps_the_worker(repo, store, fake_git):
    chat_id = chat.create("still served", store=store)
    # The fake git writes its marker from the sandboxed pool worker: declare where.
    with Supervisor(default_registry(), workers=1, sandbox_writes=[fake_git.parent]) as sup:
        # A long grace: the step must stop by itself (within one poll), not be killed.
        future = sup.submit_call(Call("git.status", kwargs={"repo": str(repo)}, limits=Limits(cancel_grace_s=30)))
        wait_for_path(str(fake_git))
        git_pid = int(fake_git.read_text())
        worker = psutil.Process(git_pid).ppid()
        assert future.cancel("user switched views")
        with pytest.raises(StepCancelled, match="user switched views") as cancelled:
            future.result(timeout=60)
        assert cancelled.value.killed is False
        assert not alive(git_pid)
        assert sup.submit("chat.history", chat_id, store=store).result(timeout=60) == []
        assert alive(worker), "the worker that ran the cancelled step is still serving"
