"""The view switch for real, end to end: a daemon with the built-in steps, two git
repositories and a chat store, and a client that switches views every 30 ms, each switch
superseding the last view's unfinished steps, while ordered chat messages are sent."""

import subprocess
import time

import psutil
import pytest

from conftest import alive, wait_until
from daemon_harness import DaemonProcess
from governor import StepCancelled
from governor.workers import sandbox, seccomp
from governor.client import Client

SWITCH_EVERY_S = 0.03
SWITCHES = 100

#: What holds the daemon's pool workers on this kernel (sandbox="auto", the default).
POOL_SANDBOX = sandbox.SandboxReport(min(sandbox.abi_version(), sandbox.KNOWN_ABI),
                                     seccomp=seccomp.unavailable() is None).label


def make_repo(path, branch):
    path.mkdir()
    git = lambda *args: subprocess.run(["git", *args], cwd=path, check=True, capture_output=True)  # noqa: E731
    git("init", "-q", "-b", branch)
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "Test")
    (path / "README").write_text(f"{branch}\n")
    git("add", "README")
    git("commit", "-q", "-m", f"first commit on {branch}")
    (path / "README").write_text("changed\n")
    (path / "untracked.txt").write_text("new\n")
    return path


@pytest.fixture
def workspace(tmp_path):
    store = tmp_path / "chat.sqlite3"
    daemon = DaemonProcess(tmp_path, workers=4, builtin=True, env={"GOVERNOR_CHAT_STORE": str(store)}).start()
    yield daemon, [make_repo(tmp_path / "alpha", "main"), make_repo(tmp_path / "beta", "feature")], store
    if daemon.process.poll() is None:
        assert daemon.stop() == 0


def view(repo, chat_id):
    return [("chat.history", {"chat_id": chat_id}), ("git.status", {"repo": str(repo)}),
            ("git.current_branch", {"repo": str(repo)})]


def test_rapid_view_switching(workspace):
    daemon, repos, store = workspace
    with Client(daemon.socket) as client:
        chats = [client.submit("chat.create", title=f"chat {n}").result(timeout=60) for n in range(2)]
        views, messages = [], []
        next_switch = time.monotonic()
        for n in range(SWITCHES):
            index = n % 2
            views.append((index, client.submit_batch(view(repos[index], chats[index]), key="view")))
            if n % 10 == 0:
                messages.append(client.submit("chat.send_message", chat_id=chats[0], text=f"message {n}"))
            next_switch += SWITCH_EVERY_S
            time.sleep(max(0.0, next_switch - time.monotonic()))  # pacing, not ordering

        last_index, last = views[-1]
        history, status, branch = last.result(timeout=120)
        assert branch == ["main", "feature"][last_index]
        assert status["branch"] == branch and not status["clean"]
        assert status["untracked"] == ["untracked.txt"]
        assert [change["path"] for change in status["changed"]] == ["README"]
        assert isinstance(history, list)

        # Views that finished inside their 30 ms were not superseded. A superseded view is
        # answered at once, its unfinished steps as cancelled: those still queued never
        # start; one already running may yet end done before the cancel reaches it
        # (tests/test_daemon.py supersedes a view deterministically).
        for index, future in views[:-1]:
            outcomes = future.result(timeout=120)
            for outcome, record_id in zip(outcomes, future.task_ids):
                record = client.wait(record_id, timeout=60)
                assert record["final"], record
                if isinstance(outcome, StepCancelled):
                    assert outcome.reason == "superseded"
                    if record["started_at"] is None:
                        assert record["state"] == "cancelled", record
                    assert record["state"] in ("cancelled", "done"), record
                    assert record["state"] == "done" or record["result"] is None, "cancelled work reported"
                else:
                    assert record["state"] == "done", (outcome, record)  # a failure says which and why

        assert [m.result(timeout=60) for m in messages] == sorted(m.result(timeout=60) for m in messages)
        texts = [message["text"] for message in client.submit("chat.history", chat_id=chats[0]).result(timeout=60)]
        assert texts == [f"message {n}" for n in range(0, SWITCHES, 10)], "critical writes kept their order"

        workers = client.workers()
        assert len(workers) == 4 + 1 + 1 + 1, "pool, its spare, the critical worker and its spare"
        # The built-in pool steps above ran read-only under the default sandbox ("auto").
        assert {w["sandbox"] for w in workers if w["lane"] == "pool"} == {POOL_SANDBOX}
        assert {w["sandbox"] for w in workers if w["lane"] == "critical"} == {"none"}
        pids = [worker["pid"] for worker in workers]
    daemon_pid = daemon.process.pid
    assert daemon.stop() == 0
    assert wait_until(lambda: not any(alive(pid) for pid in pids), timeout=15)
    with pytest.raises(psutil.NoSuchProcess):
        psutil.Process(daemon_pid).status()
