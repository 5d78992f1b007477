"""``Supervisor.map`` and ``imap_unordered``: lazy, bounded, never ``QueueFull``.

Counting what a generator has handed out shows how far ahead a map reads; a step that
holds until a path exists orders events across processes; the memory bar runs in a
subprocess of its own, so its RSS is the map's alone.
"""

import itertools
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from conftest import wait_until
from governor import QueueFull


def counting(iterable, handed):
    """Yield from ``iterable``, counting in ``handed[0]`` how many items were taken."""
    for item in iterable:
        handed[0] += 1
        yield item


def test_map_over_more_calls_than_the_queue_holds_waits_instead_of_raising(make_supervisor):
    sup = make_supervisor(workers=2, queue_size=20)
    with pytest.raises(QueueFull):
        sup.run_batch([("echo", {"value": n}) for n in range(21)])  # the bound map must keep
    assert list(sup.map("echo", range(500))) == list(range(500))
    assert list(sup.map("echo", range(500), chunksize=7)) == list(range(500))


def test_map_reads_its_iterables_lazily_and_buffersize_bounds_what_is_in_flight(make_supervisor):
    sup = make_supervisor(workers=2)
    handed = [0]
    results = sup.map("echo", counting(itertools.count(), handed), buffersize=3)
    assert handed[0] == 3, "the first buffer is submitted before map returns"
    for taken, value in enumerate(itertools.islice(results, 50), start=1):
        assert value == taken - 1
        assert handed[0] <= taken + 3, "never more than buffersize submitted and not yet yielded"
    results.close()
    handed_default = [0]
    endless = sup.map("echo", counting(itertools.count(), handed_default))  # returns: it does not read all
    assert next(endless) == 0
    endless.close()
    assert handed_default[0] <= sup.queue_size


def test_map_waits_for_room_when_other_work_fills_the_lane(make_supervisor, tmp_path):
    sup = make_supervisor(workers=1, spares=0, queue_size=2)
    go = str(tmp_path / "go")
    holders = [sup.submit("hold_until", str(tmp_path / "held0"), go)]
    assert wait_until(lambda: os.path.exists(tmp_path / "held0"))
    # A step never seen to end is sent to no busy worker ahead: these two wait in the queue.
    holders += [sup.submit("hold_until", str(tmp_path / f"held{n}"), go) for n in (1, 2)]
    outcome = {}

    def run_map():
        try:
            outcome["results"] = list(sup.map("echo", range(10)))
        except BaseException as error:  # the test reports it below
            outcome["error"] = error

    mapper = threading.Thread(target=run_map)
    mapper.start()
    assert wait_until(lambda: sup._manager._room_waiters == 1), "the map waits for room rather than raise QueueFull"
    (tmp_path / "go").touch()
    mapper.join(timeout=60)
    assert outcome == {"results": list(range(10))}
    assert all(holder.result(timeout=30) for holder in holders)


def test_map_refuses_a_bad_buffersize_or_chunksize_before_it_submits_anything(supervisor):
    with pytest.raises(ValueError):
        supervisor.map("echo", [1], buffersize=0)
    with pytest.raises(TypeError):
        supervisor.map("echo", [1], chunksize="big")
    with pytest.raises(TypeError):
        supervisor.map("echo")
    assert supervisor.metrics()["tasks"] == {}


def test_chunksize_auto_packs_tiny_calls_into_few_tasks(make_supervisor):
    sup = make_supervisor(workers=2)
    assert list(sup.map("echo", range(3000), chunksize="auto")) == list(range(3000))
    tasks = sum(sup.metrics()["tasks"]["pool"]["echo"].values())
    assert tasks < 3000 / 10, f"{tasks} tasks for 3000 calls of a no-op"


def test_imap_unordered_yields_results_as_their_tasks_end(make_supervisor, tmp_path):
    sup = make_supervisor(workers=2, spares=0)
    gate, opened = str(tmp_path / "gate"), str(tmp_path / "open")
    (tmp_path / "open").touch()
    markers = [str(tmp_path / f"m{n}") for n in range(10)]
    results = sup.imap_unordered("hold_until", markers, [gate] + [opened] * 9)
    firsts = list(itertools.islice(results, 9))  # all but the first call, which holds one worker
    assert len(firsts) == 9 and not os.path.exists(gate)
    (tmp_path / "gate").touch()
    assert len(list(results)) == 1


def test_progress_is_told_the_calls_done_and_their_total(supervisor):
    seen = []
    assert list(supervisor.map("echo", range(12), chunksize=5, progress=lambda done, total: seen.append(
        (done, total)))) == list(range(12))
    assert seen == [(5, 12), (10, 12), (12, 12)]
    seen.clear()
    list(supervisor.imap_unordered("echo", (n for n in range(3)), progress=lambda done, total: seen.append(
        (done, total))))
    assert seen == [(1, None), (2, None), (3, None)]


def test_progress_true_draws_a_tqdm_bar(supervisor, capsys):
    pytest.importorskip("tqdm")
    assert list(supervisor.map("echo", range(20), progress=True)) == list(range(20))
    assert "20/20" in capsys.readouterr().err


MAP_MEMORY_PROGRAM = textwrap.dedent("""
    import sys
    import psutil
    sys.path.insert(0, sys.argv[1])
    from governor import Supervisor
    from step_library import registry

    me = psutil.Process()
    with Supervisor(registry, workers=2) as sup:
        assert list(sup.map("echo", range(1000))) == list(range(1000))  # warm: the map's own costs paid
        before = peak = me.memory_info().rss
        total = 0
        for n, value in enumerate(sup.map("echo", range(300_000))):
            total += value
            if n % 5_000 == 0:
                peak = max(peak, me.memory_info().rss)
        assert total == sum(range(300_000)), total
    print((peak - before) / 2 ** 20)
""")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_map_over_300k_calls_without_chunksize_keeps_the_callers_memory_flat(tmp_path):
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", MAP_MEMORY_PROGRAM, tests], capture_output=True, text=True,
                          timeout=850, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    grew_mib = float(done.stdout.strip().splitlines()[-1])
    assert grew_mib < 150, f"the caller's RSS grew {grew_mib:.1f} MiB"
