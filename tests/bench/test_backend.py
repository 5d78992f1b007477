"""The reference backend's ``real`` profile and its critical-lane write, on a real uvicorn server:
git on a repository of the test's own, and a chat store the app fills on first use."""

import subprocess

import httpx
import pytest

from web_harness import GovernedViews, ServerThread

from governor.bench import backend


@pytest.fixture
def demo_repo(tmp_path, isolated_git_env, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    for command in (["init", "-q", "-b", "trunk"], ["commit", "-q", "--allow-empty", "-m", "first"]):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *command], cwd=repo, check=True)
    monkeypatch.setenv("GOVERNOR_DEMO_REPO", str(repo))
    monkeypatch.delenv("GOVERNOR_CHAT_STORE", raising=False)
    return repo


def test_the_real_view_reads_git_and_the_filled_chat_store_and_a_message_is_saved(demo_repo, monkeypatch):
    monkeypatch.setattr(backend, "REAL_MESSAGES", 500)  # the fill's size is not what is tested
    with ServerThread(GovernedViews(None, workers=2)) as server:
        view = httpx.get(f"{server.url}/view/3", params={"session": "fay", "profile": "real"}, timeout=60).json()
        saved = httpx.post(f"{server.url}/chats/3/messages", params={"profile": "real"}, json={"text": "hello"},
                           timeout=60)
        again = httpx.get(f"{server.url}/view/3", params={"session": "fay", "profile": "real"}, timeout=60).json()

    history, status, branch = view["parts"]
    assert [part["part"] for part in view["parts"]] == ["chat.history", "git.status", "git.current_branch"]
    assert len(history["result"]) == backend.HISTORY_LIMIT
    assert branch["result"] == "trunk" and "branch" in status["result"]
    assert saved.status_code == 201
    assert again["parts"][0]["result"][-1]["text"] == "hello"
