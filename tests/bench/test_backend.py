"""The reference backend's ``real`` profile and its critical-lane write, on a real uvicorn server:
git on a repository of the test's own, and a chat store the app fills on first use."""

import concurrent.futures
import subprocess

import httpx
import pytest

from conftest import wait_until
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


def test_a_views_reads_start_before_background_reads_queued_ahead_of_them():
    """One pool worker, three digests (background reads) queued, then a view: the view's
    reads leave the queue first. With priorities ignored, every digest read, submitted
    first, would start before any of the view's."""
    with ServerThread(GovernedViews(None, workers=1)) as server, \
            concurrent.futures.ThreadPoolExecutor(4) as requests:
        # seed-753: twelve parts a view, 753 ms in all, so that most of the digests' 2.2 s of
        # reads still wait in the queue when the view arrives, however slowly requests come in.
        digests = [requests.submit(httpx.get, f"{server.url}/chats/{chat}/digest", params={"profile": "seed-753"},
                                   timeout=60) for chat in (1, 2, 3)]
        assert wait_until(lambda: len(server.views.recent) == 3 and all(
            len(governed.futures) == 12 for governed in server.views.recent), timeout=60)
        view = httpx.get(f"{server.url}/view/4", params={"session": "ann", "profile": "seed-753"}, timeout=60)
        assert view.status_code == 200 and all(digest.result().status_code == 200 for digest in digests)
        *background, shown = list(server.views.recent)
    assert {future.task.priority for governed in background for future in governed.futures} == {
        backend.BACKGROUND_PRIORITY}
    assert {future.task.priority for future in shown.futures} == {backend.VIEW_PRIORITY}
    background_starts = [future.task.started_at for governed in background for future in governed.futures]
    assert max(future.task.started_at for future in shown.futures) < max(background_starts)
