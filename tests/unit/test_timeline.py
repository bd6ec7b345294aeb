import json

import numpy as np

import pytest

from memdiag.errors import UsageError
from memdiag.timeline import TimelineWriter, read_run, rank_path
from memdiag.timeline import format as fmt


def write_rank(run_dir, rank, samples, events=()):
    writer = TimelineWriter(rank_path(run_dir, rank), {"rank": rank, "host": "n0", "world_size": 2})
    for t, rss in samples:
        writer.write({"kind": fmt.SAMPLE, "t": t, "rss_bytes": rss, "phase": "forward", "step": 0})
    for event in events:
        writer.write(event)
    writer.close()


def test_round_trip_and_phases(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"world_size": 2}))
    events = [
        {"kind": fmt.PHASE_BEGIN, "t": 5, "phase": "model_build", "step": 0},
        {"kind": fmt.PHASE_BEGIN, "t": 6, "phase": "zero_init", "step": 0},
        {"kind": fmt.PHASE_END, "t": 7, "phase": "zero_init", "host_peak_bytes": 300},
        {"kind": fmt.PHASE_END, "t": 9, "phase": "model_build", "host_peak_bytes": 400},
    ]
    write_rank(tmp_path, 0, [(1, 100), (2, 250), (3, 120)], events)
    write_rank(tmp_path, 1, [(1, 90), (2, 95)])
    run = read_run(tmp_path)
    assert run.problems == ["no node watcher timeline: node totals are summed from the rank files"]
    assert run.rank_ids == [0, 1]
    r0 = run.ranks[0]
    assert list(r0.columns["rss_bytes"]) == [100, 250, 120]
    assert [(p.name, p.depth, p.host_peak_bytes) for p in r0.phases] == [
        ("model_build", 0, 400),
        ("zero_init", 1, 300),
    ]
    assert r0.host_peak_bytes() == 400  # the exact phase peak beats the sampled 250


def test_torn_last_line_is_skipped_and_reported(tmp_path):
    write_rank(tmp_path, 0, [(1, 100), (2, 200)])
    with open(rank_path(tmp_path, 0), "a") as f:
        f.write('{"kind":"sample","t":3,"rss_')
    run = read_run(tmp_path)
    assert len(run.ranks[0].t_ns) == 2
    assert any("torn last line" in p for p in run.problems)
    assert any("run.json is missing" in p for p in run.problems)


def test_missing_and_empty_rank_files_are_reported(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"world_size": 3}))
    write_rank(tmp_path, 0, [(1, 100)])
    rank_path(tmp_path, 1).write_text("")
    run = read_run(tmp_path)
    assert run.rank_ids == [0]
    assert any("rank 1 has no data" in p for p in run.problems)
    assert any("[2]" in p for p in run.problems)


def test_unknown_major_version_is_refused(tmp_path):
    path = rank_path(tmp_path, 0)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"kind": "header", "t": 0, "format_version": "9.0"}) + "\n")
    with pytest.raises(UsageError, match="format 9.0"):
        read_run(tmp_path)


def test_writer_flushes_without_close(tmp_path):
    writer = TimelineWriter(rank_path(tmp_path, 0), {"rank": 0})
    writer.write({"kind": fmt.SAMPLE, "t": 1, "rss_bytes": 1})
    writer.flush()
    lines = rank_path(tmp_path, 0).read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["format_version"] == fmt.FORMAT_VERSION


def test_not_a_directory(tmp_path):
    with pytest.raises(UsageError, match="not a run directory"):
        read_run(tmp_path / "nope")


def test_node_file_rank_columns_and_pss_total(tmp_path):
    writer = TimelineWriter(tmp_path / "timeline" / "node-n0.jsonl", {"host": "n0"})
    rows = [
        {"0": {"pid": 1, "rss_bytes": 100, "children_rss_bytes": 5, "pss_bytes": 80}},
        {"0": {"pid": 1, "rss_bytes": 110, "children_rss_bytes": 0}, "1": {"pid": 2, "rss_bytes": 50, "pss_bytes": 40}},
        {"0": {"pid": 1, "rss_bytes": 120, "pss_bytes": 90}, "1": {"pid": 2, "rss_bytes": 60, "pss_bytes": 45}},
    ]
    for t, ranks in enumerate(rows):
        writer.write({"kind": fmt.SAMPLE, "t": t, "mem_total_bytes": 1000, "mem_available_bytes": 900 - t, "ranks": ranks})
    writer.close()
    run = read_run(tmp_path)
    node = run.nodes["n0"]
    assert list(node.rank_rss[0]) == [105, 110, 120]  # children counted with their rank
    assert list(node.rank_rss[1][1:]) == [50, 60]
    total = node.pss_total()
    assert total[0] == 80 and total[2] == 135
    assert total[1] != total[1]  # NaN: rank 0 had no PSS read on that sample


def test_minmax_downsampling_keeps_every_extreme():
    import numpy as np

    from memdiag.report.downsample import minmax_indices

    rng = np.random.default_rng(0)
    values = rng.normal(size=200_000)
    values[123_457] = 99.0  # a one-sample spike
    values[7] = -99.0
    keep = minmax_indices(values, buckets=500)
    assert len(keep) <= 1001
    assert values[keep].max() == 99.0 and values[keep].min() == -99.0
    assert np.all(np.diff(keep) > 0)  # time order
    short = rng.normal(size=300)
    assert len(minmax_indices(short, buckets=500)) == 300


def test_sample_batches_and_single_samples_read_alike(tmp_path):
    writer = TimelineWriter(rank_path(tmp_path, 0), {"rank": 0})
    writer.write(fmt.sample_batch(t=[1, 2, 3], phase=["a", "a", "b"], step=[0, 0, 1], rss_bytes=[10, 20, 30]))
    writer.write({"kind": fmt.SAMPLE, "t": 4, "phase": "b", "step": 1, "rss_bytes": 40, "hwm_bytes": 41})
    writer.close()
    timeline = read_run(tmp_path).ranks[0]
    assert list(timeline.t_ns) == [1, 2, 3, 4]
    assert list(timeline.columns["rss_bytes"]) == [10, 20, 30, 40]
    assert list(timeline.sample_phase) == ["a", "a", "b", "b"]
    assert timeline.columns["hwm_bytes"][3] == 41 and timeline.columns["hwm_bytes"][0] != timeline.columns["hwm_bytes"][0]


def test_report_renders_a_damaged_run_and_says_what_is_missing(tmp_path):
    from memdiag.report.build import build

    (tmp_path / "run.json").write_text(json.dumps({"world_size": 3, "status": "running"}))
    write_rank(tmp_path, 0, [(1_000_000_000 + i * 10_000_000, 100 + i) for i in range(50)])
    with open(rank_path(tmp_path, 0), "a") as f:
        f.write('{"kind":"sample","t":3,"rss_')  # killed mid-write
    rank_path(tmp_path, 1).write_text("")
    summary, path = build(tmp_path)
    html = path.read_text()
    assert "skipped 1 torn last line" in html and "rank 1 has no data" in html and "[2]" in html
    assert "still says running" in html  # no owner to ask, written moments ago: maybe live
    assert "fix_hp: the settings fixed for this run" in html  # every summary column explained
    assert summary.host_peak_bytes_per_rank == {"0": 149}


# lines a writer never produces, as a hand edit, a concatenation or another tool leaves them
WRONG_SHAPES = [
    b"[1,2,3]",
    b'"just a string"',
    b'{"kind":"sample","t":"oops","rss_bytes":5}',
    b'{"kind":"samples","t":[1,2,3],"rss_bytes":[1,2]}',
    b'{"kind":"samples","t":[1,2],"rss_bytes":["a","b"]}',
    b'{"kind":"samples","t":[[1],[2]],"rss_bytes":[1,2]}',
    b'{"kind":"phase_begin","t":4,"phase":7}',
    b'{"t":5}',
]


def test_wrong_shape_and_garbage_lines_are_skipped_and_counted_by_cause(tmp_path):
    write_rank(tmp_path, 0, [(1, 100), (2, 200)])
    with open(rank_path(tmp_path, 0), "ab") as f:
        f.write(b"\n".join(WRONG_SHAPES) + b"\n")
        f.write(b"\x00\xffgarbage\n" * 3500)
        f.write(b'{"kind":"sample","t":9,"rss_bytes":300}\n')  # a good line after the damage
        f.write(b'{"kind":"sample","t":10,"rss')
    run = read_run(tmp_path)
    assert list(run.ranks[0].columns["rss_bytes"]) == [100, 200, 300]
    lines = [p for p in run.problems if p.startswith("rank-0.jsonl")]
    assert len(lines) == 1, "one line per file, never one per bad line"
    assert "3,500 lines not JSON" in lines[0] and "1 torn last line" in lines[0]
    shape_count = sum(int(part.split()[0].replace(",", "")) for part in lines[0].split(": skipped ")[1].split(", ") if "wrong shape" in part)
    assert shape_count == len(WRONG_SHAPES)


def test_check_and_report_survive_wrong_shapes_and_check_says_it_cannot_judge(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    (tmp_path / "run.json").write_text(json.dumps({"world_size": 1, "status": "completed"}))
    rank_path(tmp_path, 0).parent.mkdir(parents=True)
    rank_path(tmp_path, 0).write_bytes(b'{"kind":"header","t":1,"format_version":"1.1","rank":0}\n' + b"\n".join(WRONG_SHAPES) + b"\n")
    for command in (["check"], ["report"]):
        result = subprocess.run([sys.executable, "-m", "memdiag", *command, str(tmp_path)], cwd=repo, capture_output=True, text=True, timeout=300)
        assert "Traceback" not in result.stderr, result.stderr
        if command == ["check"]:
            assert result.returncode == 2, result.stdout  # judged nothing: no samples
            assert "could not judge" in result.stdout
        else:
            assert result.returncode == 0 and (tmp_path / fmt.REPORT_HTML).exists()


def test_a_directory_that_is_not_a_run_is_refused_and_left_untouched(tmp_path):
    (tmp_path / "notes.txt").write_text("not a run")
    with pytest.raises(UsageError, match="not a run directory"):
        read_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_run_left_running_by_a_dead_memdiag_is_settled_as_abandoned(tmp_path):
    import platform
    import subprocess

    from memdiag import procs
    from memdiag.runstate import settle

    gone = subprocess.Popen(["true"])
    gone.wait()
    live = {"host": platform.node(), "pid": __import__("os").getpid(), "start_ticks": procs.start_ticks(__import__("os").getpid())}
    for owner, expected in ((live, "running"), ({"host": platform.node(), "pid": gone.pid, "start_ticks": 1}, "abandoned")):
        (tmp_path / "run.json").write_text(json.dumps({"status": "running", "owner": owner}))
        rank_path(tmp_path, 0).unlink(missing_ok=True)
        write_rank(tmp_path, 0, [(1_000_000_000, 100), (2_000_000_000, 200)])
        run = read_run(tmp_path)
        settle(run)
        spec = json.loads((tmp_path / "run.json").read_text())
        assert spec["status"] == expected
    assert spec["abandoned_at"].startswith("1970-01-01T00:00:02")  # the last sample's time


def test_samples_dropped_on_a_full_disk_mark_the_run_incomplete(tmp_path):
    from memdiag.runstate import settle

    (tmp_path / "run.json").write_text(json.dumps({"status": "completed"}))
    dropped = {"kind": fmt.DROPPED, "t": 9_000_000_000, "records": 3, "samples": 120,
               "first_t": 3_600_000_000_000, "last_t": 3_660_000_000_000, "reason": "the disk was full"}
    write_rank(tmp_path, 0, [(1, 100)], events=[dropped])
    run = read_run(tmp_path)
    settle(run)
    incomplete = json.loads((tmp_path / "run.json").read_text())["incomplete"]
    assert incomplete.startswith("incomplete: 120 samples dropped between 01:00:00 and 01:01:00 UTC")


def test_the_comparison_merges_phase_orders_without_running_backwards():
    from memdiag.report.compare import merge_orders

    case = ["init", "model_build", "ds_initialize", "train", "teardown"]
    script = ["load", "ds_initialize", "train"]  # a run -- CMD profile: memdiag's own load phase
    order = merge_orders([case, script])
    assert order == ["load", "init", "model_build", "ds_initialize", "train", "teardown"]
    for sequence in (case, script):
        positions = [order.index(name) for name in sequence]
        assert positions == sorted(positions)


def test_the_token_recipe_makes_ids_the_default_model_accepts(tmp_path):
    import numpy as np

    from cases.baichuan2_13b.data import main, scale_vocab_size

    main([str(tmp_path / "t.npy"), "--tokens", "50000"])
    tokens = np.load(tmp_path / "t.npy")
    assert tokens.max() < scale_vocab_size("tiny") == 16384
    main([str(tmp_path / "b.npy"), "--tokens", "1000", "--scale", "13b"])
    assert scale_vocab_size("13b") == 125696


def test_a_long_report_says_what_it_is_doing(tmp_path, monkeypatch, capsys):
    from memdiag.report import build as report

    (tmp_path / "run.json").write_text(json.dumps({"status": "completed", "world_size": 1}))
    write_rank(tmp_path, 0, [(1_000_000_000 + i * 10_000_000, 100 + i) for i in range(20)])
    report.build(tmp_path)
    assert "memdiag: report" not in capsys.readouterr().err  # a small run: quiet
    monkeypatch.setattr(report, "PROGRESS_BYTES", 0)  # as if the timelines were large
    report.build(tmp_path)
    err = capsys.readouterr().err
    assert "reading the timelines" in err and "drawing the figures" in err


def test_many_ranks_are_drawn_as_node_bands_with_the_ranks_that_stand_out(tmp_path):
    """Past 16 ranks the host chart draws each node's band and the standouts: each node's highest
    peak and fastest growth (here rank 3's spike and rank 14's climb), not every rank."""
    from memdiag.report.figures import MAX_RANK_LINES, host_figure, standout_ranks
    from memdiag.summary import summarize

    (tmp_path / "run.json").write_text(json.dumps({"world_size": 20}))
    for rank in range(20):
        rss = [1000 + rank] * 100
        if rank == 3:
            rss[50] = 50_000  # a spike
        if rank == 14:
            rss = [1000 + 40 * i for i in range(100)]  # a climb
        writer = TimelineWriter(rank_path(tmp_path, rank), {"rank": rank, "host": f"n{rank // 10}", "world_size": 20})
        writer.write(fmt.sample_batch(t=[10**9 + i * 10**7 for i in range(100)], phase=["forward"] * 100, step=[1] * 100,
                                      rss_bytes=rss, hwm_bytes=rss))
        writer.close()
    run = read_run(tmp_path)
    drawn, note = standout_ranks(run)
    assert 3 in drawn and 14 in drawn and len(drawn) <= MAX_RANK_LINES and "band" in note
    names = [trace.name for trace in host_figure(run, summarize(run)).data]
    assert "node n0 ranks' highest" in names and "node n1 ranks' lowest" in names
    assert sum(name.startswith("rank ") for name in names) == len(drawn) < 20
    assert standout_ranks(read_run(tmp_path), limit=20)[0] == list(range(20))  # few ranks: every one


def test_many_ranks_get_a_page_per_node_with_every_rank(tmp_path):
    """The full per-rank detail the main page leaves out is one click away: a page per node with
    every one of its ranks, plotly.js once beside them, linked from the report."""
    from memdiag.report.build import build

    (tmp_path / "run.json").write_text(json.dumps({"world_size": 20, "status": "completed"}))
    for rank in range(20):
        writer = TimelineWriter(rank_path(tmp_path, rank), {"rank": rank, "host": f"n{rank // 10}", "world_size": 20})
        writer.write(fmt.sample_batch(t=[10**9 + i * 10**7 for i in range(50)], phase=["forward"] * 50, step=[1] * 50,
                                      rss_bytes=[1000 + rank] * 50, hwm_bytes=[1000 + rank] * 50))
        writer.close()
    build(tmp_path)
    pages = sorted(tmp_path.glob("report-node-*.html"))
    assert [p.name for p in pages] == ["report-node-n0.html", "report-node-n1.html"]
    for page in pages:
        text = page.read_text()
        assert text.count('"name":"rank ') == 10 and "src='plotly.min.js'" in text and "href='report.html'" in text
    assert (tmp_path / "plotly.min.js").stat().st_size > 10**6
    assert "href='report-node-n0.html'" in (tmp_path / "report.html").read_text()


def test_a_rank_sampled_by_the_watcher_reads_like_one_that_sampled_itself(tmp_path):
    """sampler=watcher: the rank file holds events only; the node file's rank_samples become the
    rank's samples, each with the phase and step the rank's events put it in."""
    from memdiag.probes.device import SOURCE_CPU_ACCEL

    (tmp_path / "run.json").write_text(json.dumps({"world_size": 1}))
    writer = TimelineWriter(rank_path(tmp_path, 0), {"rank": 0, "host": "n0", "world_size": 1, "sampler": "watcher",
                                                     "device_source": SOURCE_CPU_ACCEL})
    for event in ({"kind": fmt.PHASE_BEGIN, "t": 100, "phase": "load", "step": 0},
                  {"kind": fmt.PHASE_END, "t": 200, "phase": "load", "host_peak_bytes": 900},
                  {"kind": fmt.PHASE_BEGIN, "t": 300, "phase": "forward", "step": 0},
                  {"kind": fmt.PHASE_END, "t": 400, "phase": "forward", "host_peak_bytes": 700},
                  {"kind": fmt.STEP, "t": 450, "step": 1, "loss": 1.0, "tokens": 8, "step_time_s": 0.1}):
        writer.write(event)
    writer.close()
    node = TimelineWriter(tmp_path / "timeline" / "node-n0.jsonl", {"host": "n0"})
    node.write({"kind": fmt.SAMPLE, "t": 150, "mem_total_bytes": 10**9, "mem_available_bytes": 5 * 10**8,
                "ranks": {"0": {"pid": 1, "rss_bytes": 800}}})
    node.write({"kind": fmt.RANK_SAMPLES, "rank": 0, "t": [150, 250, 350], "rss_bytes": [800, 500, 600],
                "hwm_bytes": [850, 850, 650]})
    node.write({"kind": fmt.RANK_SAMPLES, "rank": 0, "t": [500], "rss_bytes": [550], "hwm_bytes": [650]})
    node.close()
    run = read_run(tmp_path)
    rank = run.ranks[0]
    assert list(rank.t_ns) == [150, 250, 350, 500] and list(rank.columns["rss_bytes"]) == [800, 500, 600, 550]
    assert list(rank.sample_phase) == ["load", "", "forward", ""] and list(rank.sample_step) == [0, 0, 0, 1]
    assert list(rank.columns["device_allocated_bytes"]) == [800, 500, 600, 550]  # the CPU accelerator's "device"
    assert rank.host_peak_bytes() == 900  # the load phase's exact peak, as ever


class ScriptedAllocator:
    """The device interface the phase tracker reads at each boundary, answering with the peaks a
    CUDA allocator would have reached since the previous read (no CUDA here: the tracker, the
    device series and the reader are the code under test)."""

    source, is_host_memory = "cuda", False

    def __init__(self, peaks: list[int]) -> None:
        self.peaks = peaks

    def read_and_reset_peaks(self) -> tuple[int, int]:
        peak = self.peaks.pop(0)
        return peak, peak + 100

    def read(self, *, with_nvml: bool = True):
        from memdiag.probes.device import DeviceMem

        return DeviceMem(1, 2)

    def inactive_split_bytes(self) -> int:
        return 0


def test_device_points_read_at_the_ranks_boundaries_join_the_watchers_samples(tmp_path):
    """sampler=watcher on CUDA: no thread polls the allocator; the tracker's reads at each phase
    and layer boundary (the peak since the previous one) are written as device_samples, and each
    watcher sample gets the highest point since the sample before it."""
    import time

    from memdiag.phases import PhaseTracker
    from memdiag.sampler import DeviceSeries

    (tmp_path / "run.json").write_text(json.dumps({"world_size": 1}))
    writer = TimelineWriter(rank_path(tmp_path, 0), {"rank": 0, "host": "n0", "world_size": 1, "sampler": "watcher",
                                                     "device_source": "cuda"}, flush_interval_s=0.0)
    allocator = ScriptedAllocator([10, 40, 70, 30, 90, 20, 5])
    tracker = PhaseTracker(writer.write, allocator)
    series = DeviceSeries(writer, tracker)  # NVML is the watcher's (1.7), not read here
    tracker.device_listener = series.add
    times = []
    tracker.begin("forward")  # reads 10
    tracker.set_module("layers.0")  # 40
    tracker.set_module("layers.1")  # 70
    times.append(time.time_ns())  # a watcher sample here sees 10, 40 and 70
    tracker.set_module(None)  # 30
    times.append(time.time_ns())
    times.append(time.time_ns())  # nothing read between these two samples
    tracker.end("forward")  # 90
    tracker.begin("step")  # 20
    times.append(time.time_ns())
    tracker.end("step")  # 5, after the last sample: on the last sample
    series.close()
    writer.close()
    node = TimelineWriter(tmp_path / "timeline" / "node-n0.jsonl", {"host": "n0"})
    node.write({"kind": fmt.RANK_SAMPLES, "rank": 0, "t": times, "rss_bytes": [1, 2, 3, 4], "hwm_bytes": [1, 2, 3, 4],
                "nvml_used_bytes": [500, None, None, 600]})  # NVML as the watcher read it, at most every 0.1 s
    node.close()
    rank = read_run(tmp_path).ranks[0]
    allocated = rank.columns["device_allocated_bytes"]
    assert list(allocated[:2]) == [70, 30] and np.isnan(allocated[2]) and allocated[3] == 90
    assert rank.columns["device_reserved_bytes"][0] == 170
    nvml = rank.columns["nvml_used_bytes"]
    assert nvml[0] == 500 and np.isnan(nvml[1:3]).all() and nvml[3] == 600
    records = [json.loads(line) for line in rank_path(tmp_path, 0).read_text().splitlines()]
    assert all("nvml_used_bytes" not in r for r in records if r["kind"] == fmt.DEVICE_SAMPLES)
    forward = next(p for p in rank.phases if p.name == "forward")
    assert forward.device_peak_bytes == 90  # the phase's exact peak, as ever


def test_a_format_1_6_run_with_nvml_in_the_ranks_device_points_reads_as_it_did(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"world_size": 1}))
    writer = TimelineWriter(rank_path(tmp_path, 0), {"rank": 0, "host": "n0", "world_size": 1, "sampler": "watcher",
                                                     "device_source": "cuda", "format_version": "1.6"})
    writer.write({"kind": fmt.DEVICE_SAMPLES, "t": [15, 25], "device_allocated_bytes": [70, 80],
                  "device_reserved_bytes": [90, 95], "nvml_used_bytes": [500, None]})
    writer.close()
    node = TimelineWriter(tmp_path / "timeline" / "node-n0.jsonl", {"host": "n0", "format_version": "1.6"})
    node.write({"kind": fmt.RANK_SAMPLES, "rank": 0, "t": [10, 20, 30], "rss_bytes": [1, 2, 3], "hwm_bytes": [1, 2, 3]})
    node.close()
    rank = read_run(tmp_path).ranks[0]
    assert list(rank.columns["device_allocated_bytes"][1:]) == [70, 80]
    nvml = rank.columns["nvml_used_bytes"]
    assert np.isnan(nvml[0]) and nvml[1] == 500 and np.isnan(nvml[2])
