"""A user's project with its own ``steps.py`` and ``bench.py`` runs Governor from inside it.

Governor installs its packages as ``governor.steps`` and ``governor.bench``: the user's
``steps`` and ``bench`` modules and Governor's must not shadow each other, in the user's
script, in Governor's worker processes and in ``python -m governor.bench``. Each check runs
in a subprocess whose working directory is the project, as a user would run it.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

import governor

#: The user's files, as a new user writes them with the README in hand.
USER_STEPS = '''
    import os
    import sys

    from governor import StepRegistry, step

    registry = StepRegistry()


    @registry.step(critical=False)
    def shout(text: str) -> str:
        return text.upper()


    @step(critical=False)
    def where() -> dict:
        """What the worker process sees under the two names."""
        import bench
        import governor.bench
        import governor.steps
        import steps
        return {"pid": os.getpid(), "steps": steps.__file__, "bench": bench.__file__,
                "governor.steps": governor.steps.__file__, "governor.bench": governor.bench.__file__}
'''

USER_BENCH = '''
    """The user's own benchmark module, unrelated to Governor's."""
    WHO = "the user's bench"
'''

USER_MAIN = '''
    import json
    import os

    import bench
    import steps
    from governor import Supervisor, step
    from governor.steps import REGISTRY

    if __name__ == "__main__":
        with Supervisor(steps.registry, workers=1) as sup:
            shouted = sup.submit(steps.shout, "hi").result(timeout=60)
        with Supervisor(workers=1) as sup:  # the registry @governor.step registers on
            where = sup.submit(steps.where).result(timeout=60)
        print(json.dumps({"shout": shouted, "where": where, "bench": bench.WHO, "main_pid": os.getpid(),
                          "default_steps": REGISTRY.names()}))
'''


@pytest.fixture
def project(tmp_path):
    root = tmp_path / "myapp"
    root.mkdir()
    for name, text in (("steps.py", USER_STEPS), ("bench.py", USER_BENCH), ("main.py", USER_MAIN)):
        (root / name).write_text(textwrap.dedent(text))
    return root


def run_in(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=project, env=env, capture_output=True, text=True,
                          timeout=90)


def test_the_users_steps_and_bench_and_governors_do_not_shadow_each_other(project):
    done = run_in(project, "main.py")
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["shout"] == "HI" and seen["bench"] == "the user's bench"
    where = seen["where"]
    assert where["pid"] != seen["main_pid"], "it ran in a worker process"
    assert Path(where["steps"]) == project / "steps.py"
    assert Path(where["bench"]) == project / "bench.py"
    package = Path(governor.__file__).parent.parent
    assert Path(where["governor.steps"]).parent.name == "steps" and package in Path(where["governor.steps"]).parents
    assert Path(where["governor.bench"]).parent.name == "bench" and package in Path(where["governor.bench"]).parents
    assert seen["default_steps"] == ["where"]


def test_governors_bench_runs_from_a_directory_holding_a_bench_py(project):
    done = run_in(project, "-m", "governor.bench", "--list")
    assert done.returncode == 0, done.stderr
    assert "view-switch" in done.stdout


def test_a_directory_without_them_has_no_top_level_steps_or_bench(tmp_path):
    done = run_in(tmp_path, "-c", "import importlib.util as u; print(u.find_spec('steps'), u.find_spec('bench'))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["None", "None"], "Governor installs no top-level steps or bench"


@pytest.mark.slow
def test_a_built_wheel_installs_everything_under_governor(tmp_path):
    source = Path(governor.__file__).parent.parent
    if not (source / "pyproject.toml").exists():
        pytest.skip("not run from a source checkout")
    copy = tmp_path / "source"  # setuptools writes build/ next to the sources: not in the checkout
    copy.mkdir()
    for name in ("pyproject.toml", "setup.cfg", "README.md", "governor", "steps", "bench"):
        if (source / name).is_dir():
            shutil.copytree(source / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source / name, copy)
    # Build isolation fetches the build backend, as a normal `pip install .` does.
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path),
                            str(copy)], timeout=300, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    [wheel] = tmp_path.glob("governor-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"governor"}
    names = zipfile.ZipFile(wheel).namelist()
    assert "governor/steps/registry.py" in names and "governor/bench/runner.py" in names
    assert "governor/workers/worker.py" in names and "governor/service/web_static/index.html" in names


def test_the_way_in_does_not_import_the_engine(tmp_path):
    """A worker imports governor for its values and errors; the engine would be private memory
    in every worker. Defining steps must not load it either, nor reaching for either client."""
    probe = ("import sys\n"
             "import governor.client\n"
             "from governor import AsyncClient, Call, Client, Limits, StepRegistry, StepFailed, step\n"
             "@step(critical=False)\n"
             "def f(): pass\n"
             "heavy = ('loky', 'psutil', 'cloudpickle', 'prometheus_client', 'governor.engine', 'governor.service')\n"
             "print(sorted(name for name in sys.modules if name.startswith(heavy)))\n")
    done = run_in(tmp_path, "-c", probe)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
