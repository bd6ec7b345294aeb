"""The sampling budget shared by every writer of samples, and the watcher's view of each rank
(phase, step, device figures) from its file: on literal samples and literal records."""

from __future__ import annotations

import json
import os

from memdiag.budget import SteadyClock, WindowBudget, device_roles, node_roles, rank_roles
from memdiag.rankstate import RankFollowers, RankState
from memdiag.timeline import TimelineWriter, rank_path
from memdiag.timeline import format as fmt

GIB = 2**30


def node_sample(t: int, *rss: int, available: int = 100 * GIB, pss: int | None = None) -> dict:
    ranks = {str(r): {"pid": 10 + r, "rss_bytes": v, "children_rss_bytes": 0} for r, v in enumerate(rss)}
    if pss is not None:
        ranks["0"]["pss_bytes"] = pss
    return {"kind": "sample", "t": t, "mem_available_bytes": available, "ranks": ranks}


def test_a_steady_window_keeps_the_samples_that_bound_it_in_time_order():
    budget = WindowBudget(1.0, rank_roles)
    assert budget.take({"t": 1, "rss_bytes": 5}, 0.0, steady=False) == [{"t": 1, "rss_bytes": 5}]
    out = []
    for i, rss in enumerate([50, 80, 20, 60, 70]):  # one window: 80 is its high, 20 its low
        out += budget.take({"t": 10 + i, "rss_bytes": rss}, 0.1 * i, steady=True)
    assert out == []
    out = budget.take({"t": 20, "rss_bytes": 55}, 1.0, steady=True)  # the window is over
    assert [s["t"] for s in out] == [11, 12]
    # leaving the steady state writes the open window first, then the sample itself
    budget.take({"t": 30, "rss_bytes": 90}, 1.1, steady=True)
    assert [s["t"] for s in budget.take({"t": 31, "rss_bytes": 1}, 1.2, steady=False)] == [30, 31]


def test_node_samples_are_bounded_by_the_ranks_total_memavailable_and_pss():
    budget = WindowBudget(1.0, node_roles)
    samples = [node_sample(1, 4 * GIB, 4 * GIB), node_sample(2, 6 * GIB, 5 * GIB),  # the ranks' highest total
               node_sample(3, 1 * GIB, 1 * GIB, available=200 * GIB),  # their lowest, and the most available
               node_sample(4, 3 * GIB, 3 * GIB, available=10 * GIB),  # the least available (someone else's memory)
               node_sample(5, 3 * GIB, 3 * GIB, pss=2 * GIB), node_sample(6, 3 * GIB, 3 * GIB)]
    kept = [s for i, s in enumerate(samples) for s in budget.take(s, 0.1 * i, steady=True)] + budget.close()
    assert [s["t"] for s in kept] == [2, 3, 4, 5]


def test_device_points_keep_the_windows_highest_peak_and_its_trough():
    budget = WindowBudget(1.0, device_roles)
    points = [{"t": i, "device_allocated_bytes": v, "device_reserved_bytes": v} for i, v in enumerate([5, 9, 2, 7])]
    kept = [p for i, point in enumerate(points) for p in budget.take(point, 0.1 * i, steady=True)] + budget.close()
    assert [p["device_allocated_bytes"] for p in kept] == [9, 2]


def test_steady_means_the_loop_has_run_its_full_rate_seconds_after_the_first_step():
    clock = SteadyClock(full_rate_s=10.0, steady_interval_s=1.0)
    assert not clock.steady(0.0, "ds_initialize", 0) and not clock.steady(1.0, "forward", 0)
    assert not clock.steady(2.0, "forward", 1)  # the loop's clock starts here
    assert not clock.steady(11.9, "backward", 5) and clock.steady(12.0, "", 6)
    assert not clock.steady(13.0, "save", 6)  # saving is sampled at full rate
    assert not SteadyClock(0.0, 0.0).steady(100.0, "forward", 3)  # steady_interval_s=0: every sample, always


def test_a_ranks_state_follows_its_phases_as_they_nest_and_end():
    state = RankState()
    records = [{"kind": "phase_begin", "phase": "load"}, {"kind": "phase_begin", "phase": "zero_init"},
               {"kind": "phase_end", "phase": "zero_init"}, {"kind": "phase_end", "phase": "load"},
               {"kind": "phase_begin", "phase": "forward", "device_allocated_bytes": 7},
               {"kind": "device_samples", "t": [1, 2], "device_allocated_bytes": [8, 9], "device_reserved_bytes": [10, 11]}]
    for record in records:
        state.feed(record)
    assert state.phase == "forward" and state.figures == {"device_allocated_bytes": 9, "device_reserved_bytes": 11}
    state.feed({"kind": "phase_end", "phase": "forward"})
    state.feed({"kind": "step", "step": 1})
    assert (state.phase, state.step) == ("", 1)
    # a rank sampling itself (sampler=rank) before any phase record: its samples say where it is
    own = RankState()
    own.feed(fmt.sample_batch(t=[1, 2], phase=["load", "load"], step=[0, 0], rss_bytes=[1, 2]))
    assert own.phase == "load"


def test_the_followers_read_each_rank_file_as_it_grows(tmp_path):
    writer = TimelineWriter(rank_path(tmp_path, 3), {"rank": 3}, flush_interval_s=0.0)
    followers = RankFollowers(tmp_path)
    writer.write({"kind": "phase_begin", "t": 1, "phase": "forward", "step": 0})
    assert followers.refresh([3])[3].phase == "forward"
    writer.write({"kind": "phase_end", "t": 2, "phase": "forward", "step": 0})
    writer.write({"kind": "step", "t": 3, "step": 1})
    assert (followers.refresh(["3"])[3].phase, followers.states[3].step) == ("", 1)
    writer.close()


def test_the_watchers_rank_samples_follow_the_budget_per_rank(tmp_path):
    """sampler=watcher: a steady rank's ticks are thinned to each window's bounds, a rank that is
    not steady keeps every tick; read from this process's real /proc."""
    from memdiag.node import RankProcesses, RankSampler

    writer = TimelineWriter(tmp_path / "node-n0.jsonl", {"host": "n0"})
    sampler = RankSampler(writer, steady=lambda rank, now: rank == 0, steady_interval_s=60.0)
    ranks = {0: RankProcesses(0, os.getpid(), []), 1: RankProcesses(1, os.getpid(), [])}
    for _ in range(50):
        sampler.sample(ranks)
    sampler.close()
    writer.close()
    records = [json.loads(line) for line in (tmp_path / "node-n0.jsonl").read_text().splitlines()]
    kept = {rank: sum(len(r["t"]) for r in records if r.get("rank") == rank and r["kind"] == "rank_samples") for rank in (0, 1)}
    assert kept[1] == 50 and 1 <= kept[0] <= 2
