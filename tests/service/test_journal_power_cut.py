"""The journal's power-cut promise, tested as SQLite's crash tests test theirs: record every
write and sync the journal makes, rebuild the files as a power cut would leave them at each
moment a submission was acknowledged (every write since a file's last sync lost), reopen
them, and count what survived.

The writes are recorded by strace (``-xx``: every byte, in hex) around a real ``Journal`` in
a child process; nothing in SQLite or the journal is replaced.
"""

import re
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

STRACE = shutil.which("strace")
pytestmark = pytest.mark.skipif(STRACE is None, reason="needs strace (apt-get install strace)")

#: Submissions the child makes, one transaction and one acknowledgement each.
SUBMISSIONS = 40

_CALL = re.compile(r"^(?P<name>\w+)\((?P<args>.*)\)\s+= (?P<result>-?\d+)")
_HEX = re.compile(r"\\x([0-9a-f]{2})")


def _bytes(quoted: str) -> bytes:
    """The bytes of one of strace's ``-xx`` strings (every byte as ``\\xNN``)."""
    return bytes(int(pair, 16) for pair in _HEX.findall(quoted))


def _trace(tmp_path: Path, sync: str) -> Tuple[List[tuple], Path]:
    """Run a child that submits ``SUBMISSIONS`` tasks one by one and says ``ACK n`` after
    each; return its file system calls, in order, and the journal's path."""
    journal = tmp_path / sync / "journal.sqlite3"
    script = textwrap.dedent(f"""
        import os
        from governor.service.journal import Journal, NewTask
        journal = Journal({str(journal)!r}, sync={sync!r})
        for n in range({SUBMISSIONS}):
            journal.submit([NewTask.step_call("echo", {{"value": n}}, "pool")])
            os.write(1, b"ACK %d\\n" % n)
        journal.close()
    """)
    trace = tmp_path / f"{sync}.strace"
    subprocess.run([STRACE, "-qq", "-xx", "-s", "10000000", "-o", str(trace),
                    "-e", "trace=openat,pwrite64,write,fsync,fdatasync,ftruncate,close",
                    sys.executable, "-c", script], check=True, capture_output=True, timeout=120)
    calls = []
    for line in trace.read_text().splitlines():
        match = _CALL.match(line)
        if match is not None and int(match["result"]) >= 0:
            calls.append((match["name"], match["args"], int(match["result"])))
    return calls, journal


def _images_at_each_ack(calls: List[tuple], journal: Path) -> List[Dict[str, bytes]]:
    """For each acknowledgement, the journal's files as a power cut right after it leaves
    them: each file as it was at its last sync (its later writes lost)."""
    watched = {str(journal): "db", f"{journal}-wal": "wal"}
    fds: Dict[int, str] = {}
    written = {"db": bytearray(), "wal": bytearray()}
    synced = {"db": b"", "wal": b""}
    images = []
    for name, args, result in calls:
        if name == "openat":
            path = _bytes(args.split(",")[1]).decode()
            if path in watched:
                fds[result] = watched[path]
            continue
        fd = int(args.split(",")[0])
        if name == "close":
            fds.pop(fd, None)
        elif name == "write" and fd == 1 and _bytes(args).startswith(b"ACK"):
            images.append(dict(synced))
        elif fd not in fds:
            continue
        elif name == "pwrite64":
            data = _bytes(args[args.index('"'):args.rindex('"') + 1])
            offset = int(args.rsplit(",", 1)[1])
            content = written[fds[fd]]
            content.extend(b"\0" * max(0, offset - len(content)))
            content[offset:offset + len(data)] = data
        elif name == "ftruncate":
            del written[fds[fd]][int(args.split(",")[1]):]
        elif name in ("fsync", "fdatasync"):
            synced[fds[fd]] = bytes(written[fds[fd]])
    return images


def _surviving_tasks(image: Dict[str, bytes], directory: Path) -> int:
    directory.mkdir()
    (directory / "journal.sqlite3").write_bytes(image["db"])
    (directory / "journal.sqlite3-wal").write_bytes(image["wal"])
    connection = sqlite3.connect(directory / "journal.sqlite3")
    try:
        return connection.execute("SELECT count(*) FROM tasks").fetchone()[0]
    except sqlite3.DatabaseError:  # no schema yet, or no database at all: nothing survived
        return 0
    finally:
        connection.close()


def _lost_after_a_power_cut(tmp_path: Path, sync: str) -> List[int]:
    """Per acknowledgement n, how many of the n + 1 acknowledged tasks a power cut loses."""
    calls, journal = _trace(tmp_path, sync)
    images = _images_at_each_ack(calls, journal)
    assert len(images) == SUBMISSIONS, "every acknowledgement was seen in the trace"
    return [n + 1 - _surviving_tasks(image, tmp_path / f"{sync}-cut-{n}") for n, image in enumerate(images)]


def test_with_full_sync_a_power_cut_loses_no_acknowledged_submission(tmp_path):
    assert _lost_after_a_power_cut(tmp_path, "full") == [0] * SUBMISSIONS


def test_with_normal_sync_a_power_cut_may_lose_acknowledged_submissions(tmp_path):
    # What "normal" does not promise, measured by the same model: the test above can fail.
    assert any(_lost_after_a_power_cut(tmp_path, "normal"))
