"""Where a view-load run's views spent their time: the work after a supersede, the slowest views."""

import sqlite3

import pytest

from governor.bench.view_times import ViewTimes, breakdown, journal_views, latency_split, work_after_supersede_s


def test_work_after_the_supersede_counts_only_what_ran_after_the_sessions_next_view_arrived():
    views = [
        # Ann's first view: one part ran 0-1 (before her next view came at 2), one 1-5, one never started.
        ViewTimes("ann", 0.0, ((0.0, 0.0, 1.0), (0.0, 1.0, 5.0), (0.0, None, None))),
        ViewTimes("ann", 2.0, ((2.0, 2.5, 3.0), (2.0, 3.0, 9.0))),  # superseded at 4: 5 s after
        ViewTimes("ann", 4.0, ((4.0, 4.0, 8.0),)),                    # her last: not superseded
        ViewTimes("bob", 3.0, ((3.0, 3.0, 7.0),)),                    # another session's view: never
    ]
    assert work_after_supersede_s(views) == pytest.approx(3.0 + 5.0)
    assert work_after_supersede_s(reversed(views)) == pytest.approx(8.0)  # by arrival, not by listing


def test_the_slowest_views_are_those_that_ended_before_the_next_came_and_took_longest():
    # Ann's views took 20 to 38 ms, each part starting 10 ms after the view came.
    views = [ViewTimes("ann", float(n), ((float(n), n + 0.01, n + 0.015), (float(n), n + 0.01, n + 0.02 + n / 1000)))
             for n in range(19)]
    # Bob's one slow view: its second part waited 300 ms to start, then ran 100 ms.
    views.append(ViewTimes("bob", 0.0, ((0.0, 0.0, 0.1), (0.0, 0.3, 0.4))))
    # A view superseded before it ended is no view anyone waited for.
    views.append(ViewTimes("cat", 0.0, ((0.0, 0.0, 9.0),)))
    views.append(ViewTimes("cat", 1.0, ((1.0, 1.0, 1.01),)))
    slowest = breakdown(views, workers=1)
    assert (slowest.views, slowest.slow) == (21, 2)
    assert slowest.server_p95_ms == pytest.approx(38)  # 20 views: the 20th, Ann's slowest
    assert slowest.server_ms == pytest.approx((400 + 38) / 2)  # Bob's and Ann's slowest
    assert slowest.last_start_ms == pytest.approx((300 + 10) / 2)
    assert slowest.longest_wait_ms == pytest.approx((300 + 10) / 2)
    assert slowest.unqueued_ms == pytest.approx((100 + 28) / 2)
    assert breakdown([ViewTimes("ann", 0.0, ((0.0, None, None),))], workers=1) is None


def test_a_daemons_journal_gives_one_view_per_batch_of_a_key(tmp_path):
    path = tmp_path / "journal.sqlite3"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE tasks (id INTEGER PRIMARY KEY, step TEXT, key TEXT, submitted_at REAL, "
                           "started_at REAL, ended_at REAL)")
        connection.executemany("INSERT INTO tasks (step, key, submitted_at, started_at, ended_at) VALUES (?, ?, ?, ?, ?)", [
            ("view.wait", "/view/ ann", 10.0, 10.1, 10.2), ("view.wait", "/view/ ann", 10.0, None, None),
            ("view.wait", "/view/ ann", 11.0, 11.0, 11.5), ("view.post", None, 10.5, 10.5, 10.6)])
    views = journal_views(path)
    assert views == [ViewTimes("ann", 10.0, ((10.0, 10.1, 10.2), (10.0, None, None))),
                     ViewTimes("ann", 11.0, ((11.0, 11.0, 11.5),))]
    assert work_after_supersede_s(views) == 0.0


def test_the_free_worker_share_is_the_part_of_the_queue_waits_when_fewer_parts_than_workers_ran():
    # Two workers. Ann's view waits 0-4 for its part; Bob's parts run 0-1 and 0-3 (two
    # busy, then one, then none): a worker was free from 1 to 4, 3 of the 4 s Ann waited.
    views = [ViewTimes("bob", 0.0, ((0.0, 0.0, 1.0), (0.0, 0.0, 3.0))),
             ViewTimes("ann", 0.0, ((0.0, 4.0, 10.0),))]
    slowest = breakdown(views, workers=2)
    assert slowest.slow == 1 and slowest.free_worker_share == pytest.approx(0.75)
    assert breakdown(views, workers=1).free_worker_share == pytest.approx(1 / 4)  # free only from 3 to 4


def test_the_users_slowest_views_are_split_along_the_servers_log_of_them():
    # Twenty of Ann's views, clicked at n s: 2 ms to the engine, parts ending 100 ms after
    # that, the results with the handler 1 ms later, at Ann 3 ms after that; her 20th view's
    # last part ended 300 ms after it came (the slowest 5 %).
    views, waited = [], []
    for n in range(20):
        arrived = n + 0.002
        ended = arrived + (0.3 if n == 19 else 0.1)
        views.append(ViewTimes("ann", arrived, ((arrived, arrived, ended),), str(n), ended + 0.001))
        waited.append(("ann", str(n), float(n), ended + 0.004))
    # Not in the split: a view the server logged without its answer (superseded), a view the
    # user waited for that the server never logged, and a view whose log has no seq.
    views.append(ViewTimes("ann", 30.0, ((30.0, 30.0, 31.0),), "30"))
    waited += [("ann", "30", 30.0, 40.0), ("bob", "1", 0.0, 50.0)]
    views.append(ViewTimes("cat", 0.0, ((0.0, 0.0, 60.0),), None, 60.0))
    waited.append(("cat", "1", 0.0, 60.0))
    split = latency_split(views, waited)
    assert split.views == 20
    assert (split.user_ms, split.http_in_ms, split.server_ms, split.answer_ms, split.http_out_ms) == pytest.approx(
        (306, 2, 300, 1, 3))
    # A daemon's journal has neither seq nor answer: no split.
    assert latency_split([ViewTimes("ann", 0.0, ((0.0, 0.0, 1.0),))], [("ann", "1", 0.0, 1.0)]) is None
