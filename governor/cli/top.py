"""``governor top``: the daemon's live picture in the terminal (Textual; loaded only by this command).

Data flow::

    every --interval: a Textual thread worker -> Client.live() (the ``live`` op, governor.service.live)
                      -> call_from_thread -> TopApp.show(snapshot): tables updated in place
    c -> CancelPrompt (a task id; Enter alone: the selected worker's task)
      -> a thread worker -> Client.status(task_id): still running?  -> ConfirmCancel naming it
      -> yes -> a thread worker -> Client.cancel(task_id)
    the daemon gone -> "reconnecting" in the header; each tick tries a new Client

Everything drawn is a field of the snapshot; nothing is computed here but units.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Footer, Input, Label, Static

from governor.cli.output import seconds_text
from governor.client import Client, DaemonUnavailable
from governor.errors import GovernorError, UnknownTask
from governor.service.journal import TERMINAL_STATES

#: How long a request to the daemon may take before top treats it as gone.
REQUEST_TIMEOUT_S = 5.0


def _pair(p50: Optional[float], p95: Optional[float]) -> str:
    return "-" if p50 is None else f"{seconds_text(p50)} / {seconds_text(p95)}"


def _against(value: str, limit: str) -> str:
    return value if limit == "-" else f"{value} / {limit}"


def _mib(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.0f} MiB"


#: What an idle worker held back as a lane's warm spare is called in the workers table.
SPARE_STATE = "idle (warm spare)"


def worker_row(worker: Dict[str, Any], state: Optional[str] = None) -> List[str]:
    """A worker's cells: running time against its timeout, RSS against its memory limit.

    ``state`` replaces the worker's own (a spare is shown as one).
    """
    rss = None if worker.get("rss_bytes") is None else worker["rss_bytes"] / (1 << 20)
    return [str(worker.get("pid") or "-"), worker["lane"], state or worker["state"], worker.get("step") or "-",
            "-" if worker.get("key") is None else str(worker["key"]),
            str(worker["task_id"]) if worker.get("task_id") is not None else "-",
            _against(seconds_text(worker.get("running_s")), seconds_text(worker.get("timeout_s"))),
            _against(_mib(rss), _mib(worker.get("max_memory_mb")))]


def critical_keys_text(keys: List[Dict[str, Any]]) -> str:
    """The critical lane keys with the most tasks queued, for the status line ("" when none)."""
    return ("  critical queue by key: " + ", ".join(f"{key['key']} {key['queued']}" for key in keys)) if keys else ""


def worker_states(workers: List[Dict[str, Any]], lanes: List[Dict[str, Any]]) -> List[str]:
    """Each worker's state as shown: a lane's last ``warm_spares`` idle workers are its spares.

    A lane keeps spares beyond the workers it may run tasks on, to replace a killed worker
    at once; any idle worker can be the one, so the last idle ones are labelled.
    """
    spares = {lane["lane"]: lane["warm_spares"] for lane in lanes}
    states = [worker["state"] for worker in workers]
    for index in reversed(range(len(workers))):
        lane = workers[index]["lane"]
        if states[index] == "idle" and spares.get(lane, 0) > 0:
            states[index] = SPARE_STATE
            spares[lane] -= 1
    return states


class CancelPrompt(ModalScreen[Optional[int]]):
    """Asks which task to cancel: an id typed, or Enter alone for ``suggested``; Escape for none."""

    BINDINGS = [Binding("escape", "dismiss_none", "back")]

    def __init__(self, suggested: Optional[int]):
        super().__init__()
        self.suggested = suggested

    def compose(self) -> ComposeResult:
        hint = f"Enter alone: task {self.suggested}, the selected worker's" if self.suggested else "type its id"
        with Vertical(id="confirm"):
            yield Label(f"Cancel which task? ({hint}; Escape: none)")
            yield Input(placeholder=str(self.suggested or ""), type="integer", id="task-id")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        typed = event.value.strip()
        self.dismiss(int(typed) if typed else self.suggested)

    def action_dismiss_none(self) -> None:
        self.dismiss(None)


class ConfirmCancel(ModalScreen[bool]):
    """Asks before a cancel: y/Enter on Yes cancels, n/Escape does not."""

    BINDINGS = [Binding("y", "answer(True)", "yes"), Binding("n,escape", "answer(False)", "no")]

    def __init__(self, question: str):
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm"):
            yield Label(self.question)
            with Horizontal():
                yield Button("Yes (y)", id="yes", variant="error")
                yield Button("No (n)", id="no")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


class TopApp(App):
    """The live view. ``socket_path``: the daemon's socket (``None``: the default one)."""

    TITLE = "governor top"
    CSS = """
    #status { height: 1; background: $boost; }
    DataTable { height: auto; max-height: 16; margin-bottom: 1; }
    .title { text-style: bold; }
    #confirm { width: 64; height: auto; border: thick $error; background: $surface; padding: 1 2; }
    #confirm Horizontal { height: auto; margin-top: 1; }
    ConfirmCancel, CancelPrompt { align: center middle; }
    """
    BINDINGS = [Binding("q", "quit", "quit"), Binding("c", "cancel_task", "cancel a task")]

    def __init__(self, socket_path: Optional[Path], interval: float):
        super().__init__()
        self.socket_path, self.interval = socket_path, interval
        self._client: Optional[Client] = None
        self._shown_workers: List[Dict[str, Any]] = []

    def compose(self) -> ComposeResult:
        yield Static("connecting...", id="status")
        yield Label("lanes", classes="title")
        yield DataTable(id="lanes", cursor_type="none")
        yield Label("workers  (up/down select; c cancels a task by id, the selected one's by default)",
                    classes="title")
        yield DataTable(id="workers", cursor_type="row")
        yield Label("last kills and crashes", classes="title")
        yield DataTable(id="kills", cursor_type="none")
        yield Label("steps over the last minute (a latency is its queue wait, then its run time)",
                    classes="title")
        yield DataTable(id="steps", cursor_type="none")
        yield Footer()

    def on_mount(self) -> None:
        self._columns("lanes", "lane", "queued", "in flight", "warm spares", "busy", "idle", "starting")
        self._columns("workers", "pid", "lane", "state", "step", "key", "task", "running / timeout", "RSS / limit")
        self._columns("kills", "when", "task", "step", "lane", "reason", "limit", "observed", "pid")
        self._columns("steps", "step", "lane", "ended", "per s", "queue wait p50 / p95", "run time p50 / p95")
        self.query_one("#workers", DataTable).focus()
        self.poll()
        self.set_interval(self.interval, self.poll)

    def _columns(self, table: str, *names: str) -> None:
        self.query_one(f"#{table}", DataTable).add_columns(*names)

    # ----------------------------------------------------------------- fetching (thread workers)

    @work(thread=True, exclusive=True, group="poll")
    def poll(self) -> None:
        try:
            if self._client is None:
                self._client = Client(self.socket_path, timeout=REQUEST_TIMEOUT_S)
            snapshot = self._client.live()
        except (GovernorError, OSError) as gone:  # DaemonUnavailable, a reset, a timeout
            self._drop_client()
            self.call_from_thread(self.lost, gone)
            return
        self.call_from_thread(self.show, snapshot)

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def lost(self, why: BaseException) -> None:
        reason = "no daemon" if isinstance(why, DaemonUnavailable) else type(why).__name__
        self.query_one("#status", Static).update(f"reconnecting... ({reason} at {self.socket_path or 'default'})")

    # ----------------------------------------------------------------- drawing (the app's thread)

    def show(self, snapshot: Dict[str, Any]) -> None:
        """Redraw every table from one snapshot, keeping the selected worker selected."""
        memory = snapshot.get("memory", {})
        self.query_one("#status", Static).update(
            f"live  daemon pid {snapshot['daemon_pid']}  {time.strftime('%H:%M:%S', time.localtime(snapshot['at']))}"
            f"  workers RSS {_mib(memory.get('workers_rss_bytes', 0) / (1 << 20))}"
            f"  kills {sum(sum(reasons.values()) for reasons in snapshot['worker_kills'].values())}"
            + critical_keys_text(snapshot.get("critical_keys", [])))
        self._fill("lanes", [[lane["lane"], str(lane["queue_depth"]), str(lane["in_flight"]),
                              str(lane["warm_spares"]), *(str(lane["workers"].get(key, 0))
                                                          for key in ("busy", "idle", "starting"))]
                             for lane in snapshot["lanes"]])
        table = self.query_one("#workers", DataTable)
        selected = self._selected_worker()
        # A stable order (lane, then pid), so rows do not jump as workers come and go.
        self._shown_workers = sorted(snapshot["workers"], key=lambda w: (w["lane"], w.get("pid") or 1 << 62))
        self._fill("workers", [worker_row(worker, state) for worker, state
                               in zip(self._shown_workers, worker_states(self._shown_workers, snapshot["lanes"]))])
        pids = [worker.get("pid") for worker in self._shown_workers]
        if selected is not None and selected.get("pid") in pids:
            table.move_cursor(row=pids.index(selected["pid"]))
        self._fill("kills", [[time.strftime("%H:%M:%S", time.localtime(kill["at"])), str(kill["task_id"]),
                              kill["step"], kill["lane"], kill["reason"], kill["limit"] or "-",
                              kill["observed"] or "-", str(kill["pid"] or "-")] for kill in snapshot["kills"][:10]])
        self._fill("steps", [[step["step"], step["lane"], str(step["count"]),
                              "-" if step["per_s"] is None else f"{step['per_s']:.2f}",
                              _pair(step.get("queue_p50_s"), step.get("queue_p95_s")),
                              _pair(step.get("run_p50_s"), step.get("run_p95_s"))] for step in snapshot["steps"]])

    def _fill(self, name: str, rows: List[List[str]]) -> None:
        table = self.query_one(f"#{name}", DataTable)
        row = table.cursor_row
        table.clear()
        table.add_rows(rows)
        if rows and table.cursor_type == "row":
            table.move_cursor(row=min(row, len(rows) - 1))

    def _selected_worker(self) -> Optional[Dict[str, Any]]:
        table = self.query_one("#workers", DataTable)
        if not self._shown_workers or not 0 <= table.cursor_row < len(self._shown_workers):
            return None
        return self._shown_workers[table.cursor_row]

    # ----------------------------------------------------------------- cancel

    def action_cancel_task(self) -> None:
        """Ask for a task id (the selected worker's by default), then confirm naming the task."""
        worker = self._selected_worker()
        suggested = None if worker is None else worker.get("task_id")

        def chosen(task_id: Optional[int]) -> None:
            if task_id is not None:
                self.confirm_cancel(task_id)

        self.push_screen(CancelPrompt(suggested), chosen)

    @work(thread=True, group="cancel")
    def confirm_cancel(self, task_id: int) -> None:
        """Look the task up by id, now: the confirmation names it, whatever the table shows since."""
        try:
            with Client(self.socket_path, timeout=REQUEST_TIMEOUT_S) as client:
                record = client.status(task_id)
        except UnknownTask:
            self.call_from_thread(self.notify, f"no task {task_id}", severity="warning")
            return
        except (GovernorError, OSError) as failed:
            self.call_from_thread(self.notify, f"task {task_id} could not be looked up: {failed}", severity="error")
            return
        if record["state"] in TERMINAL_STATES:
            self.call_from_thread(self.notify, f"task {task_id} ({record['step']}) already ended: {record['state']}")
            return

        def answered(yes: Optional[bool]) -> None:
            if yes:
                self.cancel_task(task_id)

        question = f"Cancel task {task_id} ({record['step']}, {record['state']} in the {record['lane']} lane)?"
        self.call_from_thread(self.push_screen, ConfirmCancel(question), answered)

    @work(thread=True, group="cancel")
    def cancel_task(self, task_id: int) -> None:
        try:
            with Client(self.socket_path, timeout=REQUEST_TIMEOUT_S) as client:
                outcome = client.cancel(task_id)
        except (GovernorError, OSError) as failed:
            self.call_from_thread(self.notify, f"cancel of task {task_id} failed: {failed}", severity="error")
            return
        said = "cancelled" if task_id in outcome["cancelled"] else "had already finished"
        self.call_from_thread(self.notify, f"task {task_id} {said}")

    def on_unmount(self) -> None:
        self._drop_client()


def run_top(socket_path: Optional[Path], interval: float) -> None:
    """Run ``governor top`` in this terminal until ``q``."""
    TopApp(socket_path, interval).run()
