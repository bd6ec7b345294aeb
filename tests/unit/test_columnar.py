"""Compaction of ended runs' rank files into Parquet (memdiag/timeline/columnar.py), on files the
real TimelineWriter wrote; read back through the one reader."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from memdiag.timeline import TimelineWriter, rank_path, read_run
from memdiag.timeline import columnar
from memdiag.timeline.compact import compact_run
from memdiag.timeline import format as fmt

T0 = 1_800_000_000 * 10**9


def literal_levels(t_s, rss):
    t = (T0 + np.array(t_s) * 1e9).astype(np.int64)
    return columnar.sample_levels(t, {"rss_bytes": np.array(rss, dtype=np.float64)})


def test_levels_keep_each_windows_bounds_and_last_sample():
    # 0.25 s apart: four samples a 1 s window; the highest of the whole run is one sample at 1.25 s
    t_s = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25]
    rss = [5, 3, 4, 6, 5, 90, 4, 5, 2, 7]
    keep = literal_levels(t_s, rss)
    level1 = [t for t, k in zip(t_s, keep) if k >= 1]
    # window [0,1): low 3 @0.25, high 6 @0.75 (also the last); [1,2): low 4 @1.5, high 90 @1.25, last @1.75;
    # [2,3): low 2 @2.0, high and last 7 @2.25; and the run's first sample
    assert level1 == [0.0, 0.25, 0.75, 1.25, 1.5, 1.75, 2.0, 2.25]
    assert keep[5] == len(columnar.LEVEL_WINDOWS_S)  # the spike survives every level
    assert keep[0] == keep[-1] == len(columnar.LEVEL_WINDOWS_S)
    # one 10 s window holds them all: its lowest (2), highest (90), last, and the first
    assert [t for t, k in zip(t_s, keep) if k >= 2] == [0.0, 1.25, 2.0, 2.25]


def test_levels_pass_over_missing_figures():
    t = (T0 + np.arange(6) * 2e8).astype(np.int64)  # 0 .. 1.0 s: rows 0-4 in the first 1 s window
    device = np.array([np.nan, 7, np.nan, 3, np.nan, np.nan])
    keep = columnar.sample_levels(t, {"device_allocated_bytes": device, "nvml_used_bytes": np.full(6, np.nan)})
    # first row; window 0: highest 7 (row 1), lowest 3 (row 3), last (row 4); window 1: its only row
    assert [i for i, k in enumerate(keep) if k >= 1] == [0, 1, 3, 4, 5]


def write_run(run_dir, *, status="completed", seconds=30, hz=50, columnar_mode="always", spike_at=None):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps({"world_size": 1, "status": status, "timeline_columnar": columnar_mode}))
    writer = TimelineWriter(rank_path(run_dir, 0), {"rank": 0, "host": "n0", "world_size": 1, "sample_hz": hz})
    n = seconds * hz
    t = T0 + (np.arange(n) * 1e9 / hz).astype(np.int64)
    rss = (2**30 + (np.arange(n) % 97) * 2**20).astype(np.int64)
    if spike_at is not None:
        rss[spike_at] += 40 * 2**30
    device = [None if i % 5 == 0 else int(r // 2) for i, r in enumerate(rss)]
    writer.write({"kind": fmt.PHASE_BEGIN, "t": int(t[0]) - 1, "phase": "load", "step": 0, "rss_bytes": int(rss[0])})
    for start in range(0, n, 10):
        end = min(start + 10, n)
        writer.write(fmt.sample_batch(
            t=t[start:end].tolist(), phase=["load" if i < n // 2 else "forward" for i in range(start, end)],
            step=[0 if i < n // 2 else 1 for i in range(start, end)], rss_bytes=rss[start:end].tolist(),
            hwm_bytes=rss[start:end].tolist(), device_allocated_bytes=device[start:end],
        ))
        if start == n // 2:
            writer.write({"kind": fmt.PHASE_END, "t": int(t[start]), "phase": "load", "host_peak_bytes": int(rss.max())})
            writer.write({"kind": fmt.STEP, "t": int(t[start]) + 1, "step": 1, "loss": 2.5, "tokens": 2048, "step_time_s": 1.0})
    writer.close()
    return t, rss


def same_columns(a, b):
    return all(np.array_equal(a.columns[k], b.columns[k], equal_nan=True) for k in a.columns)


def test_an_ended_run_compacts_and_reads_back_the_same(tmp_path):
    t, rss = write_run(tmp_path / "run")
    before = read_run(tmp_path / "run")
    lines = compact_run(before)
    assert len(lines) == 1 and "rank-0.samples.parquet and rank-0.events.parquet" in lines[0]
    jsonl = rank_path(tmp_path / "run", 0)
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["kind"] for r in records] == [fmt.HEADER, fmt.COLUMNAR]
    assert records[1]["samples"] == len(t) and records[1]["events"] == 3 and records[1]["steps"] == 1
    after = read_run(tmp_path / "run")
    a, b = before.ranks[0], after.ranks[0]
    assert np.array_equal(a.t_ns, b.t_ns) and np.array_equal(a.sample_step, b.sample_step) and same_columns(a, b)
    assert list(a.sample_phase) == list(b.sample_phase)
    assert [e for e in b.events if e["kind"] != fmt.COLUMNAR] == a.events  # every event, as it was written
    assert [(p.name, p.host_peak_bytes) for p in a.phases] == [(p.name, p.host_peak_bytes) for p in b.phases]
    assert b.sample_level_s is None and after.problems == before.problems
    # a file the data tools read as it is: named columns, bytes as integers, missing figures null
    table = pq.read_table(columnar.samples_path(jsonl)).sort_by("seq")  # stored coarsest level first
    assert table.column("rss_bytes").to_pylist() == rss.tolist()
    assert table.column("device_allocated_bytes").null_count == len(t) // 5
    assert set(table.column("phase").to_pylist()) == {"load", "forward"}
    assert compact_run(after) == []  # once


def test_a_budget_reads_a_coarse_level_that_keeps_the_peak(tmp_path):
    write_run(tmp_path / "run", seconds=120, hz=100, spike_at=7_777)
    full = read_run(tmp_path / "run")
    compact_run(full)
    coarse = read_run(tmp_path / "run", max_samples=1_000)
    rank = coarse.ranks[0]
    assert rank.sample_level_s is not None and len(rank.t_ns) <= 1_000 < len(full.ranks[0].t_ns)
    assert np.nanmax(rank.columns["rss_bytes"]) == np.nanmax(full.ranks[0].columns["rss_bytes"])
    assert np.nanmax(rank.columns["device_allocated_bytes"]) == np.nanmax(full.ranks[0].columns["device_allocated_bytes"])
    assert np.all(np.diff(rank.t_ns) > 0)


@pytest.mark.parametrize("case", ["running", "never", "auto-small", "torn"])
def test_runs_that_are_not_compacted(tmp_path, case):
    run_dir = tmp_path / "run"
    write_run(run_dir, status="running" if case == "running" else "completed",
              columnar_mode={"never": "never", "auto-small": "auto"}.get(case, "always"))
    if case == "torn":
        with open(rank_path(run_dir, 0), "a") as f:
            f.write('{"kind":"samples","t":[1')
    before = rank_path(run_dir, 0).read_bytes()
    assert compact_run(read_run(run_dir)) == []
    assert rank_path(run_dir, 0).read_bytes() == before
    assert not columnar.samples_path(rank_path(run_dir, 0)).exists()


def test_a_lost_samples_file_is_one_problem_and_the_events_still_read(tmp_path):
    write_run(tmp_path / "run")
    compact_run(read_run(tmp_path / "run"))
    columnar.samples_path(rank_path(tmp_path / "run", 0)).write_bytes(b"not parquet")
    run = read_run(tmp_path / "run")
    assert any("rank-0.samples.parquet" in p and "cannot be read" in p for p in run.problems)
    assert len(run.ranks[0].t_ns) == 0 and [p.name for p in run.ranks[0].phases] == ["load"]
    columnar.events_path(rank_path(tmp_path / "run", 0)).unlink()
    run = read_run(tmp_path / "run")
    assert any("rank-0.events.parquet" in p and "cannot be read" in p for p in run.problems)
    assert run.ranks[0].phases == []


def test_a_compaction_cut_short_leaves_the_journal_in_charge(tmp_path):
    """Killed after the Parquet file was written but before the JSONL was replaced: the JSONL
    still holds every sample and no columnar record, so it is what is read, and compacted again."""
    write_run(tmp_path / "run")
    jsonl = rank_path(tmp_path / "run", 0)
    journal = jsonl.read_bytes()
    compact_run(read_run(tmp_path / "run"))
    jsonl.write_bytes(journal)
    run = read_run(tmp_path / "run")
    assert len(run.ranks[0].t_ns) == 30 * 50 and not run.problems[:-1]
    assert len(compact_run(run)) == 1


def phase(name, begin_s, end_s, host, device=None):
    t = lambda s: T0 + int(s * 1e9)  # noqa: E731
    end = {"kind": fmt.PHASE_END, "t": t(end_s), "phase": name, "host_peak_bytes": host}
    if device is not None:
        end["device_peak_bytes"] = device
    return [{"kind": fmt.PHASE_BEGIN, "t": t(begin_s), "phase": name, "step": 0}, end]


def test_event_levels_keep_each_windows_peak_phases_whole():
    events = [
        *phase("load", 0.0, 0.1, 500),  # outside the loop: every level
        *phase("forward", 0.2, 0.3, 10, 1),  # the first forward: every level
        *phase("forward", 0.4, 0.5, 70, 2),  # highest host in [0, 1)
        *phase("forward", 0.6, 0.7, 20, 9),  # highest device in [0, 1)
        *phase("forward", 0.8, 0.9, 30, 3),  # the window's last
        *phase("forward", 1.2, 1.3, 40, 4),  # below the next in every way
        *phase("forward", 1.4, 1.5, 50, 5),  # the run's last forward: every level
        {"kind": fmt.STEP, "t": T0 + int(0.95e9), "step": 1},
        {"kind": fmt.STEP, "t": T0 + int(1.55e9), "step": 2},
        {"kind": fmt.WARNING, "t": T0 + int(1.6e9), "message": "x"},
    ]
    keep = columnar.event_levels(events)
    top = len(columnar.LEVEL_WINDOWS_S)
    pairs = [(keep[i], keep[i + 1]) for i in range(0, 14, 2)]
    assert all(a == b for a, b in pairs)  # a phase's begin and end stand or fall together
    levels = [a for a, _ in pairs]
    assert levels[0] == top and levels[1] == top and levels[6] == top
    assert levels[2] == top and levels[3] == top  # the run's highest host and device peaks
    assert levels[4] == 1  # [0, 1)'s last, nothing coarser
    assert levels[5] == 0  # [1, 2)'s highest and last are the run's last forward
    assert keep[-1] == top and keep[-2] == top and keep[-3] == top  # the warning; the first and last step



def test_a_disk_that_will_not_take_the_parquet_leaves_the_journal_and_says_so(tmp_path, monkeypatch):
    write_run(tmp_path / "run")
    journal = rank_path(tmp_path / "run", 0).read_bytes()

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pyarrow.parquet.write_table", full)  # ENOSPC where compaction writes
    lines = compact_run(read_run(tmp_path / "run"))
    assert len(lines) == 1 and lines[0].startswith("rank-0.jsonl stays JSONL: cannot write") and "No space left" in lines[0]
    assert rank_path(tmp_path / "run", 0).read_bytes() == journal
    assert not list((tmp_path / "run" / "timeline").glob("*.parquet*"))


def test_a_node_file_moves_into_parquet_and_reads_back_the_same(tmp_path):
    """A node watcher's file as its writer wrote it: samples of two ranks (PSS and children on
    some), rank_samples of both, a warning. Compacted with rank 0's samples moved to its rank
    file: the node's samples read back equal from Parquet, rank 1's rank_samples stay, rank 0's
    go; a coarse level keeps the node's one-sample high."""
    from memdiag.timeline.compact import compact_node_file
    from memdiag.timeline.reader import read_node_file

    path = fmt.node_path(tmp_path, "n0")
    writer = TimelineWriter(path, {"host": "n0"})
    rng = np.random.default_rng(0)
    for i in range(400):  # 40 s at 10 Hz
        ranks = {str(r): {"pid": 10 + r, "rss_bytes": int(1e9 + rng.integers(0, 1e6)), "children_rss_bytes": 5 * r,
                          "children": r} for r in (0, 1)}
        if i == 123:
            ranks["1"]["rss_bytes"] = int(9e9)  # the node's highest, one sample
        if i % 10 == 0:
            ranks["1"] |= {"pss_bytes": int(8e8), "children_pss_bytes": 3, "children_roles": {"forked worker": {"count": 1, "pss_bytes": 3}}}
        writer.write({"kind": fmt.SAMPLE, "t": T0 + i * 10**8, "mem_total_bytes": 64 * 10**9,
                      "mem_available_bytes": int(50e9 - i), "cgroup_usage_bytes": None, "ranks": ranks})
        if i % 4 == 0:
            for r in (0, 1):
                writer.write({"kind": fmt.RANK_SAMPLES, "rank": r, "t": [T0 + i * 10**8], "rss_bytes": [1], "hwm_bytes": [2]})
        if i == 200:
            writer.write({"kind": fmt.WARNING, "t": T0 + i * 10**8, "key": "x", "message": "a warning"})
    writer.close()
    before, problems = read_node_file(path)
    assert compact_node_file(before, problems, moved_ranks={0}) is None
    kinds = [json.loads(line)["kind"] for line in path.read_text().splitlines()]
    assert kinds[:2] == ["header", "columnar"] and "sample" not in kinds
    after, problems = read_node_file(path)
    assert not problems and np.array_equal(after.t_ns, before.t_ns)
    for name in ("rank_rss", "rank_pss", "rank_children_rss", "rank_children_pss"):
        assert getattr(after, name).keys() == getattr(before, name).keys()
        for rank, values in getattr(before, name).items():
            assert np.array_equal(getattr(after, name)[rank], values, equal_nan=True), (name, rank)
    assert np.array_equal(after.columns["mem_available_bytes"], before.columns["mem_available_bytes"])
    assert after.rank_children_roles == before.rank_children_roles == {0: {}, 1: {"forked worker": 1}}
    assert set(after.rank_samples) == {1} and [e["kind"] for e in after.events if e["kind"] != "columnar"] == ["warning"]
    coarse, _ = read_node_file(path, max_samples=10)  # the 60 s level: one window
    assert len(coarse.t_ns) < 10 and np.nanmax(coarse.rank_rss[1]) == 9e9 + 5
    assert coarse.sample_level_s == 60.0
