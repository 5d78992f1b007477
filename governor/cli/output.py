"""Output for people and for scripts: task records as text or JSON, tables, id ranges.

Text is for people (times as local ISO 8601, errors as ``Type: message`` and the step's
traceback); ``--json`` gives the wire's records with the same local times. Nothing here
talks to the daemon: every function formats what a command already has.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Dict, List, Optional, Sequence, Tuple

import click

from governor import errors


def id_ranges(task_ids: Sequence[int]) -> str:
    """``3-7 9``: task ids as people read a long list (a batch's ids are consecutive)."""
    runs: List[List[int]] = []
    for task_id in task_ids:
        if runs and task_id == runs[-1][1] + 1:
            runs[-1][1] = task_id
        else:
            runs.append([task_id, task_id])
    return " ".join(str(first) if first == last else f"{first}-{last}" for first, last in runs)


#: The fields of a task record that are times (epoch seconds on the wire).
TIME_FIELDS = ("submitted_at", "started_at", "ended_at")


def local_time(epoch: Optional[float], timespec: str = "milliseconds") -> Optional[str]:
    """``epoch`` (seconds) as local ISO 8601 with its UTC offset, e.g. ``2026-12-02T13:05:11.042+01:00``."""
    return None if epoch is None else datetime.fromtimestamp(epoch).astimezone().isoformat(timespec=timespec)


def record_json(record: Dict[str, Any]) -> Dict[str, Any]:
    """A task record as ``--json`` prints it: the wire's record, times as local ISO 8601."""
    return {**record, **{field: local_time(record[field]) for field in TIME_FIELDS if field in record}}


def error_lines(wire: Dict[str, Any]) -> List[str]:
    """A record's error as people read it: ``Type: message``, then the step's traceback, if any.

    A step's own exception is named by its type (``StepFailed`` only says it came from a
    worker); a limit Governor enforced by Governor's (``StepTimeout: ...``); a workflow's
    failure is followed by its failed step's error, indented.
    """
    from governor.protocol import RemoteError, error_from_wire

    error = error_from_wire(wire)
    if isinstance(error, errors.StepFailed):
        lines = [f"{error.exc_type.rsplit('.', 1)[-1]}: {error.exc_message}"]
        if error.remote_traceback:
            lines += ["", *error.remote_traceback.rstrip("\n").splitlines()]
        return lines
    if isinstance(error, errors.WorkflowFailed) and isinstance(wire.get("fields", {}).get("error"), dict):
        return [f"WorkflowFailed: {error}"] + ["  " + line for line in error_lines(wire["fields"]["error"])]
    if isinstance(error, RemoteError):
        return [str(error)]
    return [f"{type(error).__name__}: {error}"]


def _json_text(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 100 else json.dumps(value, indent=2, default=str)


def format_record(record: Dict[str, Any]) -> str:
    """One task in full, for people: what ran, when, and its result or error with the traceback."""
    lines = [f"task {record['task_id']}: {record['step']} ({record['lane']} lane): {record['state']}"
             + (" (interrupted)" if record.get("interrupted") else "")
             + ("" if record.get("final", True) else " (still running)")]
    rows: List[Tuple[str, str]] = []
    for field, label in zip(TIME_FIELDS, ("submitted", "started", "ended")):
        if record.get(field) is not None:
            rows.append((label, local_time(record[field])))
    if record.get("started_at") is not None and record.get("ended_at") is not None:
        rows.append(("ran", f"{max(0.0, record['ended_at'] - record['started_at']):.3f} s"))
    rows.append(("attempts", str(record.get("attempts", 0))))
    if record.get("lane_key") is not None:
        rows.append(("lane key", record["lane_key"]))
    if record.get("priority"):
        rows.append(("priority", str(record["priority"])))
    if record.get("key") is not None:
        rows.append(("supersede", record["key"]))
    if record.get("steps_done") is not None:
        rows.append(("steps done", f"{record['steps_done']} of {len(record.get('calls', ())) or '?'}"))
    if record.get("limits"):
        rows.append(("limits", ", ".join(f"{k}={v}" for k, v in record["limits"].items() if v is not None)))
    for field in ("params", "calls"):
        if field in record:
            rows.append((field, _json_text(record[field])))
    if record["state"] == "done" and "result" in record:
        rows.append(("result", _json_text(record["result"])))
    for label, value in rows:
        first, *rest = value.splitlines() or [""]
        lines.append(f"  {label:<10} {first}")
        lines += [f"  {'':<10} {line}" for line in rest]
    if record.get("error") is not None:
        headline, *more = error_lines(record["error"])
        lines.append(f"  {'error':<10} {headline}")
        lines += [f"    {line}" if line else "" for line in more]
    return "\n".join(lines)


def error_headline(record: Dict[str, Any], width: int = 60) -> str:
    """The first line of a record's error, cut to ``width`` (``""`` when it has none), for a table's cell."""
    if record.get("error") is None:
        return ""
    text = error_lines(record["error"])[0]
    return text if len(text) <= width else text[:width - 1] + "…"


def table(headers: List[str], rows: List[List[Any]], indent: str = "") -> None:
    """Print ``rows`` under ``headers`` in left-aligned columns as wide as their widest cell."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max([len(header)] + [len(row[i]) for row in cells]) for i, header in enumerate(headers)]
    for row in [headers] + cells:
        click.echo(indent + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def echo_json(value: Any) -> None:
    """Print ``value`` as indented JSON (what it cannot encode, as text)."""
    click.echo(json.dumps(value, indent=2, default=str))


def echo_record(record: Dict[str, Any], as_json: bool) -> None:
    """One task in full: its record with ``--json``, else as text."""
    if as_json:
        echo_json(record_json(record))
    else:
        click.echo(format_record(record))


# ----------------------------------------------------------------------------- metrics


def seconds_text(value: Optional[float]) -> str:
    """``0.861 ms`` or ``23.2 ms`` under a second, ``2.4 s`` above; ``-`` when there is no figure."""
    if value is None:
        return "-"
    return f"{value * 1000:.3g} ms" if value < 1 else f"{value:.1f} s"


def _mib_text(value: Optional[float]) -> str:
    return "-" if value is None else f"{value / 2 ** 20:.1f} MiB"


def _percentiles(summary: Optional[Dict[str, Any]], text=seconds_text) -> str:
    """``p50 / p95`` of a histogram's summary, ``-`` when it has no samples."""
    if not summary or not summary.get("count"):
        return "-"
    return f"{text(summary['p50'])} / {text(summary['p95'])}"


def _counts(counts: Dict[str, int]) -> str:
    """``done 12, failed 1``: counts by name, largest first; ``-`` when there are none."""
    shown = [f"{name} {count:,}" for name, count in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
             if count]
    return ", ".join(shown) or "-"


def format_metrics(metrics: Dict[str, Any]) -> List[Tuple[str, List[str], List[List[Any]]]]:
    """The daemon's metrics snapshot as tables for people: ``(title, headers, rows)`` each.

    Times are split where the snapshot splits them: the wait in the lane's queue, and the
    run in a worker. Percentiles are over each step's recent tasks; counts since the start.
    """
    lanes = sorted(set(metrics["workers"]) | set(metrics["queue_depth"]))
    # A warm spare is an idle worker held back to replace a killed one at once: counted as
    # idle, and named, so that idle workers beside a long queue are not a mystery.
    tables = [("lanes", ["lane", "queued", "busy", "idle", "of which warm spares", "starting"],
               [[lane, metrics["queue_depth"].get(lane, 0),
                 *(metrics["workers"].get(lane, {}).get(key, 0) for key in ("busy", "idle")),
                 metrics["warm_spares"].get(lane, 0), metrics["workers"].get(lane, {}).get("starting", 0)]
                for lane in lanes])]
    steps = sorted({(lane, step) for lane, by_step in metrics["tasks"].items() for step in by_step}
                   | {(lane, step) for lane, by_step in metrics["timings"].items() for step in by_step})
    rows = []
    for lane, step in steps:
        timings = metrics["timings"].get(lane, {}).get(step, {})
        rows.append([step, lane, _counts(metrics["tasks"].get(lane, {}).get(step, {})),
                     _percentiles(timings.get("queue_wait_seconds")), _percentiles(timings.get("duration_seconds")),
                     _percentiles(timings.get("peak_rss_bytes"), _mib_text)])
    tables.append(("steps (p50 / p95 of recent tasks)",
                   ["step", "lane", "ended", "queue wait", "run time", "peak RSS"], rows))
    tables.append(("workers", ["lane", "started", "killed", "recycled", "redispatched tasks"],
                   [[lane, metrics["worker_spawns"].get(lane, 0), _counts(metrics["worker_kills"].get(lane, {})),
                     _counts(metrics["worker_recycles"].get(lane, {})), metrics.get("redispatched", {}).get(lane, 0)]
                    for lane in lanes]))
    memory, daemon = metrics["memory"], metrics.get("daemon", {})
    tables.append(("process", ["figure", "value"], [
        ["supervisor RSS", _mib_text(memory.get("supervisor_rss_bytes"))],
        ["workers' RSS", _mib_text(memory.get("workers_rss_bytes"))],
        ["pool sandbox", metrics.get("sandbox", {}).get("pool", "-")],
        *([["client connections", daemon["connections"]], ["waiting clients", daemon["waiters"]],
           ["unfinished tasks", daemon["live_tasks"]]] if daemon else [])]))
    return tables


def echo_tables(tables: List[Tuple[str, List[str], List[List[Any]]]]) -> None:
    """Print each ``(title, headers, rows)`` with :func:`table`, a blank line between them."""
    for index, (title, headers, rows) in enumerate(tables):
        if index:
            click.echo("")
        click.echo(title)
        table(headers, rows or [["(none)"] + [""] * (len(headers) - 1)], indent="  ")
