"""Structured logs: the standard ``logging`` module, as text or as JSON lines.

Governor logs to the ``governor`` logger and never configures logging on import (a library
leaves that to the application). Records that concern a task carry these ``extra`` fields:
``task_id`` (``Task.public_id``: a daemon's journal id, else the supervisor's), ``step``,
``lane``, ``pid``, ``reason``, ``limit``, ``observed`` and, on the Ray lane, ``node``. Every task's life is logged at DEBUG; every kill and crash at WARNING
(:func:`log_death`).

:func:`configure_logging` is what the CLI uses: ``text`` appends the fields as
``key=value``; ``json`` writes one JSON object a line, for log shippers.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, Dict, Optional, TextIO

#: The ``extra`` fields Governor's records may carry, in the order they are shown.
FIELDS = ("task_id", "step", "lane", "pid", "reason", "limit", "observed", "node")

log = logging.getLogger("governor")


def log_death(message: str, task: Any, lane: Any, pid: Optional[int], reason: str, limit: Optional[float],
              observed: Optional[float], node: Optional[str] = None) -> None:
    """One WARNING per worker killed or crashed, with the fields an operator filters on.

    Args:
        reason: timeout, memory, cancel or crash (the metrics label too).
        limit, observed: the limit enforced and the value seen.
        node: the host of a Ray worker.
    """
    log.warning(message, extra={"task_id": task.public_id, "step": task.step, "lane": lane.value, "pid": pid,
                                "reason": reason, "limit": limit, "observed": observed, "node": node})


def record_fields(record: logging.LogRecord) -> Dict[str, Any]:
    """The Governor fields a record carries (those set and not ``None``)."""
    return {name: getattr(record, name) for name in FIELDS if getattr(record, name, None) is not None}


class TextFormatter(logging.Formatter):
    """``2026-11-27T14:00:00.123Z WARNING governor: message task_id=3 step=git.status ...``"""

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{name}={value}" for name, value in record_fields(record).items())
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {record.getMessage()}"
        if fields:
            line += f" {fields}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, message, the Governor fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        document = {"ts": _timestamp(record), "level": record.levelname, "logger": record.name,
                    "message": record.getMessage(), **record_fields(record)}
        if record.exc_info:
            document["exc"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str)


FORMATTERS = {"text": TextFormatter, "json": JsonFormatter}


def configure_logging(log_format: str = "text", level: int = logging.INFO,
                      stream: Optional[TextIO] = None) -> logging.Handler:
    """Send the ``governor`` logger's records to ``stream`` (stderr) as text or JSON lines.

    Returns:
        the handler installed (remove it with ``logging.getLogger("governor").removeHandler``).
    """
    if log_format not in FORMATTERS:
        raise ValueError(f"log format must be one of {sorted(FORMATTERS)}, not {log_format!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(FORMATTERS[log_format]())
    logger = logging.getLogger("governor")
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.datetime.fromtimestamp(record.created, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
