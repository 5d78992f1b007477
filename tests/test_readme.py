"""Every python example in README.md runs as written.

Each ```python block runs as its own script, in a fresh interpreter, in an empty temporary
directory (so it imports the installed Governor, not files lying around). A block that
cannot run alone (it needs a Ray cluster or a running daemon) follows an HTML comment
starting ``<!-- fragment`` and is only compiled.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"

#: A python block and the line before it: ``(comment?)`` then the fenced code.
BLOCK = re.compile(r"(?:^(?P<marker><!--[^\n]*-->)\n)?^```python\n(?P<code>.*?)^```$", re.MULTILINE | re.DOTALL)


def examples():
    text = README.read_text()
    found = []
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start("code"))  # the block's first line, 0-based = fence line 1-based
        fragment = bool(match.group("marker")) and match.group("marker").startswith("<!-- fragment")
        found.append(pytest.param(match.group("code"), fragment, id=f"README.md:{line}"))
    return found


def test_the_readme_has_runnable_examples():
    runnable = [param for param in examples() if not param.values[1]]
    assert len(runnable) >= 3, "the API section's examples are marked as fragments"


@pytest.mark.parametrize("code, fragment", examples())
def test_a_readme_example_runs_as_written(code, fragment, tmp_path):
    compile(code, "README example", "exec")
    if fragment:
        return
    script = tmp_path / "example.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
