"""Arguments a worker must rebuild: an object of a class from the submitting program's
``__main__`` reaches its step, and one that cannot be rebuilt fails its own task, without
killing the worker (which before made every replacement die of it in turn, the task never
ending)."""

import subprocess
import sys
import textwrap

import pytest

from governor import StepFailed
from step_library import Unrebuildable

SCRIPT = textwrap.dedent("""
    from governor import StepRegistry, Supervisor

    registry = StepRegistry()

    class Point:
        def __init__(self, x):
            self.x = x

    @registry.step(critical=False)
    def describe(point):
        return f"{type(point).__name__} x={point.x}"

    if __name__ == "__main__":
        with Supervisor(registry, workers=1) as sup:
            print(sup.submit("describe", Point(3)).result(timeout=60))
            print("redispatched", sum(sup.metrics()["redispatched"].values()))
""")


def test_an_object_of_a_class_from_the_callers_main_reaches_its_step(tmp_path):
    script = tmp_path / "app.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["Point x=3", "redispatched 0"]


def test_an_argument_the_worker_cannot_rebuild_fails_its_task_and_only_it(make_supervisor):
    sup = make_supervisor(workers=1, spares=0)
    worker = sup.submit("pid").result(timeout=60)
    with pytest.raises(StepFailed, match="could not be rebuilt in the worker: this object cannot be rebuilt here"):
        sup.submit("echo", Unrebuildable()).result(timeout=30)
    assert sup.submit("pid").result(timeout=60) == worker  # the same worker: it did not die
    assert sup.metrics()["redispatched"] == {}
