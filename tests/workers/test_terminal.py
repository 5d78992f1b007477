"""Workers hold no terminal (issue 27), checked in a program started on a real pseudo-terminal.

The program (the test's child) takes the pty as its controlling terminal and as fds 0, 1
and 2, as a program run from a shell does, then starts a Supervisor and runs a probe in a
critical and in a pool worker. No worker may hold any descriptor of the terminal, stdin
reads /dev/null, and what a step prints still reaches the terminal.
"""

import json
import os
import pty
import select
import subprocess
import sys
import textwrap
import time

#: Deadlock detector only: the program normally ends in a few seconds.
PROGRAM_PATIENCE_S = 120

PROGRAM = textwrap.dedent("""
    import fcntl, json, os, termios
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # the pty is our controlling terminal, as in a shell
    from governor import Supervisor
    from governor.steps import StepRegistry

    def probe(lane):
        print(f"printed by the {lane} step", flush=True)
        terminal_fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd") if os.isatty(int(fd)))
        return {"terminal_fds": terminal_fds, "stdin": os.readlink("/proc/self/fd/0"), "session": os.getsid(0) == os.getpid()}

    registry = StepRegistry()
    registry.register(probe, name="critical.probe", critical=True)
    registry.register(probe, name="pool.probe", critical=False)
    with Supervisor(registry, workers=1) as sup:
        probes = {lane: sup.submit(f"{lane}.probe", lane).result(timeout=60) for lane in ("critical", "pool")}
    print("RESULT " + json.dumps(probes), flush=True)
""")


def test_workers_hold_no_terminal_and_their_output_still_reaches_it(tmp_path):
    script = tmp_path / "program.py"
    script.write_text(PROGRAM)
    master, slave = pty.openpty()
    program = subprocess.Popen([sys.executable, str(script)], stdin=slave, stdout=slave, stderr=slave,
                               start_new_session=True, cwd=os.getcwd())
    os.close(slave)
    output = b""
    deadline = time.monotonic() + PROGRAM_PATIENCE_S
    try:
        while b"RESULT" not in output or not output.endswith(b"\n"):
            assert time.monotonic() < deadline, f"the program did not finish:\n{output.decode(errors='replace')}"
            ready, _, _ = select.select([master], [], [], 1)
            if ready:
                try:
                    output += os.read(master, 65536)
                except OSError:  # EIO: every holder of the terminal closed it
                    break
        assert program.wait(timeout=PROGRAM_PATIENCE_S) == 0, output.decode(errors="replace")
    finally:
        if program.poll() is None:
            program.kill()
            program.wait()
        os.close(master)
    text = output.decode(errors="replace").replace("\r\n", "\n")
    assert "RESULT" in text, text
    probes = json.loads(text.split("RESULT ", 1)[1].splitlines()[0])
    for lane in ("critical", "pool"):
        assert probes[lane] == {"terminal_fds": [], "stdin": os.devnull, "session": True}, (lane, text)
        assert f"printed by the {lane} step" in text
