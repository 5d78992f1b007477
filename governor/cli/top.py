"""``governor top``: the daemon's live picture in the terminal (Textual; loaded only by this command).

Data flow::

    every --interval: a Textual thread worker -> Client.live() (the ``live`` op, governor.service.live)
                      -> call_from_thread -> TopApp.show(snapshot): tables updated in place
    c -> ConfirmCancel -> yes -> a thread worker -> Client.cancel(task_id)
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
from textual.widgets import Button, DataTable, Footer, Label, Static

from governor.client import Client, DaemonUnavailable
from governor.errors import GovernorError

#: How long a request to the daemon may take before top treats it as gone.
REQUEST_TIMEOUT_S = 5.0


def _seconds(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def _against(value: str, limit: str) -> str:
    return value if limit == "-" else f"{value} / {limit}"


def _mib(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.0f} MiB"


def worker_row(worker: Dict[str, Any]) -> List[str]:
    """A worker's cells: running time against its timeout, RSS against its memory limit."""
    rss = None if worker.get("rss_bytes") is None else worker["rss_bytes"] / (1 << 20)
    return [str(worker.get("pid") or "-"), worker["lane"], worker["state"], worker.get("step") or "-",
            str(worker["task_id"]) if worker.get("task_id") is not None else "-",
            _against(_seconds(worker.get("running_s")), _seconds(worker.get("timeout_s"))),
            _against(_mib(rss), _mib(worker.get("max_memory_mb")))]


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
    ConfirmCancel { align: center middle; }
    """
    BINDINGS = [Binding("q", "quit", "quit"), Binding("c", "cancel_selected", "cancel task")]

    def __init__(self, socket_path: Optional[Path], interval: float):
        super().__init__()
        self.socket_path, self.interval = socket_path, interval
        self._client: Optional[Client] = None
        self._shown_workers: List[Dict[str, Any]] = []

    def compose(self) -> ComposeResult:
        yield Static("connecting...", id="status")
        yield Label("lanes", classes="title")
        yield DataTable(id="lanes", cursor_type="none")
        yield Label("workers  (up/down select, c cancels the selected task)", classes="title")
        yield DataTable(id="workers", cursor_type="row")
        yield Label("last kills and crashes", classes="title")
        yield DataTable(id="kills", cursor_type="none")
        yield Label("steps over the last minute", classes="title")
        yield DataTable(id="steps", cursor_type="none")
        yield Footer()

    def on_mount(self) -> None:
        self._columns("lanes", "lane", "queued", "in flight", "warm spares", "busy", "idle", "starting")
        self._columns("workers", "pid", "lane", "state", "step", "task", "running / timeout", "RSS / limit")
        self._columns("kills", "when", "task", "step", "lane", "reason", "limit", "observed", "pid")
        self._columns("steps", "step", "lane", "ended", "per s", "p50", "p95")
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
            f"  kills {sum(sum(reasons.values()) for reasons in snapshot['worker_kills'].values())}")
        self._fill("lanes", [[lane["lane"], str(lane["queue_depth"]), str(lane["in_flight"]),
                              str(lane["warm_spares"]), *(str(lane["workers"].get(key, 0))
                                                          for key in ("busy", "idle", "starting"))]
                             for lane in snapshot["lanes"]])
        table = self.query_one("#workers", DataTable)
        selected = self._selected_worker()
        # A stable order (lane, then pid), so rows do not jump as workers come and go.
        self._shown_workers = sorted(snapshot["workers"], key=lambda w: (w["lane"], w.get("pid") or 1 << 62))
        self._fill("workers", [worker_row(worker) for worker in self._shown_workers])
        pids = [worker.get("pid") for worker in self._shown_workers]
        if selected is not None and selected.get("pid") in pids:
            table.move_cursor(row=pids.index(selected["pid"]))
        self._fill("kills", [[time.strftime("%H:%M:%S", time.localtime(kill["at"])), str(kill["task_id"]),
                              kill["step"], kill["lane"], kill["reason"], kill["limit"] or "-",
                              kill["observed"] or "-", str(kill["pid"] or "-")] for kill in snapshot["kills"][:10]])
        self._fill("steps", [[step["step"], step["lane"], str(step["count"]),
                              "-" if step["per_s"] is None else f"{step['per_s']:.2f}",
                              _seconds(step["p50_s"]), _seconds(step["p95_s"])] for step in snapshot["steps"]])

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

    def action_cancel_selected(self) -> None:
        worker = self._selected_worker()
        if worker is None or worker.get("task_id") is None:
            self.notify("the selected worker runs no task", severity="warning")
            return
        task_id, step = worker["task_id"], worker.get("step")

        def answered(yes: Optional[bool]) -> None:
            if yes:
                self.cancel_task(task_id)

        self.push_screen(ConfirmCancel(f"Cancel task {task_id} ({step}) on worker {worker.get('pid')}?"), answered)

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
