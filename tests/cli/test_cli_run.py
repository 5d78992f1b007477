"""``governor run``: STEP parsing, the table and JSON, exit codes, and one real ``python -m governor`` run.

The command tests go through the ``governor`` click group with ``CliRunner`` and start a
real in-process Supervisor (a few hundred ms each); usage errors are caught before any
worker starts. Every test works on a temporary git repository and chat store under
``tmp_path``, with the user's git config and XDG state kept out (``isolated_env``).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from governor.cli import main
from governor.cli.run import StepSyntaxError, parse_step
from governor.task import Call
from governor.steps.builtin import chat

REPO_ROOT = Path(__file__).resolve().parents[2]

#: The three steps of the view switch, in the order the table lists them.
VIEW_STEPS = ("chat.history", "git.status", "git.current_branch")

#: Bound on the real subprocess run: a deadlock detector, not a timing.
SUBPROCESS_PATIENCE_S = 120


@pytest.fixture(autouse=True)
def isolated_env(isolated_git_env, monkeypatch):
    """The shared git/XDG isolation, and no chat store from the environment."""
    monkeypatch.delenv(chat.STORE_ENV_VAR, raising=False)


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    """A git repository on branch ``main`` with one commit, and local identity config."""
    path = tmp_path / "repo"
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "user.name", "Test Author")
    git(path, "config", "user.email", "author@example.com")
    (path / "README").write_text("hello\n")
    git(path, "add", "README")
    git(path, "commit", "-q", "-m", "first")
    return path


def invoke(*args):
    return CliRunner().invoke(main, ["run", *map(str, args)], catch_exceptions=False)


def table_rows(output):
    """``{step: [lane, status]}`` from the table's step rows (two-space indented lines)."""
    rows = {}
    for line in output.splitlines():
        fields = line.split()
        if line.startswith("  ") and len(fields) >= 3 and fields[0] != "step" and not line.startswith("   "):
            rows.setdefault(fields[0], fields[1:3])
    return rows


# ----------------------------------------------------------------------------- STEP syntax


@pytest.mark.parametrize("text, expected", [
    ("git.status", Call("git.status")),
    ("git.status:", Call("git.status")),
    ("git.status:repo=.", Call("git.status", kwargs={"repo": "."})),
    ("git.log:repo=.,limit=5", Call("git.log", kwargs={"repo": ".", "limit": 5})),
    ("chat.history:chat_id=1", Call("chat.history", kwargs={"chat_id": 1})),
    ('chat.create:title="42"', Call("chat.create", kwargs={"title": "42"})),
    ('chat.send_message:chat_id=1,text="hi, there",author=bot',
     Call("chat.send_message", kwargs={"chat_id": 1, "text": "hi, there", "author": "bot"})),
    ('x:ids=[1,2],opts={"a":1,"b":[3,4]},flag=true,none=null,f=1.5',
     Call("x", kwargs={"ids": [1, 2], "opts": {"a": 1, "b": [3, 4]}, "flag": True, "none": None, "f": 1.5})),
    ('x:text="say \\"a, b\\""', Call("x", kwargs={"text": 'say "a, b"'})),
    ("x:path=a=b,empty=", Call("x", kwargs={"path": "a=b", "empty": ""})),
    ("x:title=hello world", Call("x", kwargs={"title": "hello world"})),
])
def test_step_arguments_parse_json_values_else_text(text, expected):
    assert parse_step(text) == expected


@pytest.mark.parametrize("text, message", [
    (":repo=.", "step name is missing"),
    ("git.log:limit", "has no '='"),
    ("git.log:1x=2", "not a parameter name"),
    ("git.log:limit=1,limit=2", "given twice"),
    ('chat.create:title="open', "is not closed"),
    ("git.log:repo=.,", "empty parameter"),
    ("git.log:repo=.,,limit=1", "empty parameter"),
])
def test_malformed_step_arguments_are_refused(text, message):
    with pytest.raises(StepSyntaxError, match=message):
        parse_step(text)


def test_the_paths_a_step_declares_are_made_absolute_against_this_directory(repo, monkeypatch):
    """The declared ``paths=`` (at any depth, defaults included), not a list of names kept here."""
    (repo / "sub").mkdir()
    monkeypatch.chdir(repo / "sub")
    nested = '[{"step":"git.current_branch","params":{"repo":".."}}]'
    document = json.loads(invoke("--json", "git.current_branch", f"task.execute:steps={nested}",
                                 "git.log:repo=..,limit=1").output)
    default, execute, log = (step["params"] for step in document["steps"])
    assert default == {"repo": str(repo / "sub")}, "repo='.' by default: this directory, not the worker's"
    assert execute == {"steps": [{"step": "git.current_branch", "params": {"repo": str(repo)}}]}
    assert log == {"repo": str(repo), "limit": 1}
    results = [step["result"] for step in document["steps"]]
    assert results[:2] == ["main", ["main"]] and [commit["subject"] for commit in results[2]] == ["first"]


# ----------------------------------------------------------------------------- the command


def test_view_creates_a_welcome_chat_on_a_fresh_store_then_shows_it(repo, tmp_path):
    store = tmp_path / "state" / "chat.sqlite3"
    first = invoke("--view", repo, "--store", store, "--users", "0")
    assert first.exit_code == 0, first.output
    rows = table_rows(first.output)
    assert rows["git.refresh_index"] == ["critical", "done"]
    assert rows["chat.create"] == ["critical", "done"]
    assert rows["chat.send_message"] == ["critical", "done"]
    assert all(rows[step] == ["pool", "done"] for step in VIEW_STEPS), first.output
    assert "setup" in first.output and "batch total (wall clock)" in first.output
    assert "governor bench --scenario view-real" in first.output, "the comparison is the bench's"
    with chat.allowing_stores([store]):
        assert chat.history(1, store=str(store))[0]["text"] == "hello from governor"

    again = invoke("--view", repo, "--store", store, "--json", "--users", "0")
    assert again.exit_code == 0, again.output
    document = json.loads(again.output)
    assert document["ok"] is True
    # The chat exists now: the index refresh is all the setup there is.
    assert [(step["step"], step["result"]) for step in document["setup"]] == [
        ("git.refresh_index", {"refreshed": True, "skipped_because": None})]
    assert [step["step"] for step in document["steps"]] == list(VIEW_STEPS)
    history, status, branch = (step["result"] for step in document["steps"])
    assert [message["text"] for message in history] == ["hello from governor"]
    assert status["branch"] == "main" and status["head"] == git(repo, "rev-parse", "HEAD")
    assert branch == "main"
    assert document["view"] == {"repo": str(repo), "store": str(store), "chat_id": 1}


def test_view_of_a_store_that_is_not_one_says_so_before_any_step_runs(repo, tmp_path):
    store = tmp_path / "not-sqlite"
    store.write_text("this is not a database\n")
    result = invoke("--json", "--view", repo, "--store", store, "--users", "0")
    assert result.exit_code == 1, result.output
    assert "ChatStoreError" in result.output and "cannot be read as SQLite" in result.output
    assert store.read_text() == "this is not a database\n"


def test_view_stops_after_a_failed_setup_and_exits_1(repo, tmp_path):
    (tmp_path / "state").write_text("a file where the store's directory should be\n")
    store = tmp_path / "state" / "chat.sqlite3"  # no chat yet, so setup creates one: it cannot
    result = invoke("--json", "--view", repo, "--store", store)
    assert result.exit_code == 1, result.output
    document = json.loads(result.output)
    assert [(step["step"], step["status"]) for step in document["setup"]] == [
        ("git.refresh_index", "done"), ("chat.create", "failed")]
    assert document["steps"] == [] and document["totals"]["batch_ms"] is None


def test_view_refreshes_a_racily_clean_index_before_the_read_only_steps_read_it(repo, tmp_path):
    """A fresh clone's index: the read-only git steps would re-read its files on every call."""
    index = repo / ".git" / "index"
    readme = (repo / "README").stat()
    os.utime(index, ns=(readme.st_atime_ns, readme.st_mtime_ns))
    result = invoke("--json", "--view", repo, "--store", tmp_path / "state" / "chat.sqlite3", "--users", "0")
    assert result.exit_code == 0, result.output
    assert index.stat().st_mtime_ns > readme.st_mtime_ns, "the index was written after its files"
    assert json.loads(result.output)["steps"][1]["result"]["clean"] is True


def test_a_refresh_another_git_blocks_is_shown_as_skipped_and_the_view_still_runs(repo, tmp_path):
    index = repo / ".git" / "index"
    readme = (repo / "README").stat()
    os.utime(index, ns=(readme.st_atime_ns, readme.st_mtime_ns))  # so the refresh must write
    (repo / ".git" / "index.lock").write_text("")  # another git is writing the index
    result = invoke("--view", repo, "--store", tmp_path / "state" / "chat.sqlite3", "--users", "0")
    assert result.exit_code == 0, result.output
    assert "index not refreshed" in result.output and "index refreshed" not in result.output
    assert table_rows(result.output)["git.refresh_index"] == ["critical", "done"]
    assert all(table_rows(result.output)[step] == ["pool", "done"] for step in VIEW_STEPS)


def test_json_document_has_each_step_and_the_totals(repo):
    result = invoke("--json", f"git.log:repo={repo},limit=5", f"git.current_branch:repo={repo}")
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    log, branch = document["steps"]
    assert set(log) == {"step", "params", "lane", "status", "time_ms", "peak_rss_mib", "result", "error"}
    assert log["params"] == {"repo": str(repo), "limit": 5}
    assert (log["lane"], log["status"], log["error"]) == ("pool", "done", None)
    assert [commit["subject"] for commit in log["result"]] == ["first"]
    assert log["time_ms"] > 0 and log["peak_rss_mib"] > 0
    assert branch["result"] == "main"
    totals = document["totals"]
    assert set(totals) == {"batch_ms", "startup_ms", "workers"}
    assert totals["batch_ms"] > 0 and totals["startup_ms"] > 0 and totals["workers"] == 2


def test_critical_steps_get_the_store_option_and_run_once(tmp_path):
    store = tmp_path / "chat.sqlite3"
    result = invoke("--json", "--store", store, "chat.create:title=notes")
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    (create,) = document["steps"]
    assert (create["lane"], create["status"], create["result"]) == ("critical", "done", 1)
    assert create["params"]["store"] == str(store)
    with chat.allowing_stores([store]):
        assert chat.newest_chat(str(store)) == 1


def test_a_failing_step_exits_1_and_the_others_still_run(repo, tmp_path):
    not_a_repo = tmp_path / "plain"
    not_a_repo.mkdir()
    result = invoke(f"git.status:repo={not_a_repo}", f"git.current_branch:repo={repo}")
    assert result.exit_code == 1, result.output
    rows = table_rows(result.output)
    assert rows["git.status"] == ["pool", "failed"]
    assert rows["git.current_branch"] == ["pool", "done"]
    assert "NotAGitRepository" in result.output


def test_timeout_kills_a_step_that_runs_past_it(repo, tmp_path, monkeypatch):
    # A git that never answers (the workers inherit PATH): the step must be killed, with
    # its process tree, at the run's --timeout rather than after git's own 30 s.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "git").write_text("#!/bin/sh\nexec sleep 60\n")
    (fake_bin / "git").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    result = invoke("--json", "--timeout", "0.5", f"git.current_branch:repo={repo}")
    assert result.exit_code == 1, result.output
    (step,) = json.loads(result.output)["steps"]
    assert step["status"] == "timed_out"
    assert step["error"].startswith("StepTimeout:")


def test_unknown_step_is_a_usage_error_that_suggests_close_names():
    result = invoke("git.stats:repo=.")
    assert result.exit_code == 2
    assert "unknown step 'git.stats'" in result.output and "did you mean 'git.status'" in result.output


def test_parameters_that_do_not_fit_are_a_usage_error_naming_the_right_one():
    result = invoke("git.log:repo=.,limt=5")
    assert result.exit_code == 2
    assert "did you mean 'limit'" in result.output and "git.log takes: repo='.', limit=20" in result.output


def test_malformed_step_and_no_step_are_usage_errors():
    malformed = invoke("git.log:limit")
    assert malformed.exit_code == 2 and "has no '='" in malformed.output
    nothing = invoke()
    assert nothing.exit_code == 2 and "--view" in nothing.output


def test_help_documents_the_step_syntax_and_lists_the_steps():
    result = invoke("--help")
    assert result.exit_code == 0
    for text in ("NAME[:key=value", "governor run --view .", "limit=5", "text='\"hi, there\"'",
                 "chat.send_message", "workflow.execute"):
        assert text in result.output


# ----------------------------------------------------------------------------- a real process


def test_python_m_governor_run_view_on_a_fresh_machine(repo, tmp_path):
    """The README's main job, as a new user runs it: ``--view .`` from inside their repository."""
    store = tmp_path / "fresh" / "chat.sqlite3"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    completed = subprocess.run([sys.executable, "-m", "governor", "run", "--view", ".", "--store", str(store)],
                               cwd=repo, env=env, capture_output=True, text=True, timeout=SUBPROCESS_PATIENCE_S)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    rows = table_rows(completed.stdout)
    for step in VIEW_STEPS:
        assert rows[step] == ["pool", "done"], completed.stdout
    assert f"view of {repo}, chat 1 of chat store {store}" in completed.stdout  # "." was made absolute
    assert store.is_file()
    # Then ten users switch the seed's 753 ms view, on the seed's one lane and on Governor.
    crowd_lines = completed.stdout.split("The seed's 753 ms view, 10 users")[1].splitlines()
    assert crowd_lines[1].split()[0] == "before" and crowd_lines[2].split()[0] == "Governor", completed.stdout


def test_view_json_carries_the_crowds_figures_for_both_engines(repo, tmp_path):
    result = invoke("--json", "--view", repo, "--store", tmp_path / "state" / "chat.sqlite3", "--users", "2")
    assert result.exit_code == 0, result.output
    crowd = json.loads(result.output)["crowd"]
    assert crowd["users"] == 2 and crowd["view_ms"] == 753
    assert crowd["governor"]["views"] >= 1
    assert crowd["before"]["engine"] == "before"
