"""A full filesystem under the run directory: during training (and space returning), during
the report, and the writer's bounded hold on literal records."""

from __future__ import annotations

import json
import os
import time

from memdiag.timeline import format as fmt
from memdiag.timeline import read_run
from memdiag.timeline.reader import _read_records
from memdiag.timeline.writer import TimelineWriter

from .conftest import Memdiag, fill, kill_leftovers, run_processes


def test_training_goes_on_through_a_full_disk_and_the_held_samples_land(small_fs):
    fs = small_fs(48)
    memdiag = Memdiag(["case=baichuan2_13b", "steps=60", "seq_len=128", f"reports_dir={fs}"])
    run_dir = memdiag.run_dir
    try:
        memdiag.wait_for(r"step 3/60")
        filler = fill(fs)
        full_from_ns = time.time_ns()
        memdiag.wait_for(r"is full \(")
        steps_when_full = memdiag.output.count("[memdiag] step ")
        time.sleep(4)
        full_to_ns = time.time_ns()
        filler.unlink()
        memdiag.wait_for(r"has room again")
        code = memdiag.wait()
        assert code == 0, memdiag.output
        assert memdiag.output.count("[memdiag] step ") > steps_when_full, "training went on"
        spec = json.loads((run_dir / fmt.RUN_JSON).read_text())
        assert spec["status"] == "completed" and spec["disk_full"] and spec["disk_full"][0]["to"]
        run = read_run(run_dir)
        assert not [p for p in run.problems if "skipped" in p], run.problems
        for timeline in run.ranks.values():
            held = (timeline.t_ns > full_from_ns) & (timeline.t_ns < full_to_ns)
            assert held.sum() > 10, "samples taken while the disk was full were held and written later"
            assert len(timeline.steps) == 60
        warnings = [e for t in run.ranks.values() for e in t.events if e["kind"] == fmt.WARNING]
        assert not [w for w in warnings if "is now off" in w["message"]], "no hook switched off for an I/O error"
        assert (run_dir / fmt.REPORT_HTML).stat().st_size > 0
    finally:
        kill_leftovers(run_dir)


def test_a_report_that_does_not_fit_is_said_in_one_line_and_nothing_is_half_written(small_fs):
    fs = small_fs(3)  # the timelines of a short run fit; the ~5 MB report does not
    memdiag = Memdiag(["case=baichuan2_13b", "steps=3", "seq_len=64", f"reports_dir={fs}"])
    code = memdiag.wait()
    run_dir = memdiag.run_dir
    assert code != 0
    assert "Traceback" not in memdiag.output
    assert "cannot write" in memdiag.output and "report.html" in memdiag.output and "it needs" in memdiag.output
    spec = json.loads((run_dir / fmt.RUN_JSON).read_text())
    assert spec["status"] == "completed"  # training did complete; only the report is missing
    assert not (run_dir / fmt.REPORT_HTML).exists() and not list(run_dir.glob("*.tmp"))
    for name in ("summary.json", "findings.json"):
        if (run_dir / name).exists():
            json.loads((run_dir / name).read_text())  # whole, never half a file
    assert run_processes(run_dir) == []


def test_writer_holds_the_newest_lines_drops_the_oldest_and_says_so(small_fs):
    fs = small_fs(1)
    path = fs / "timeline" / "rank-0.jsonl"
    writer = TimelineWriter(path, {"rank": 0}, hold_bytes=64 * 1024)
    filler = fill(fs)
    t0 = time.time_ns()
    for i in range(2000):  # ~170 KB of batches: more than the 64 KiB hold
        writer.write(fmt.sample_batch(t=[t0 + i * 10, t0 + i * 10 + 5], rss_bytes=[i, i]))
    writer.flush(force=True)
    assert writer.failing is not None and writer.dropped_samples > 0
    assert writer.held_bytes <= 64 * 1024 + 200
    filler.unlink()
    writer.flush(force=True)
    assert writer.failing is None
    writer.close()
    records, problems = _read_records(path)
    assert problems == [], "no torn or partial line, whatever the disk took"
    dropped = [r for r in records if r["kind"] == fmt.DROPPED]
    assert len(dropped) == 1 and dropped[0]["samples"] == writer.dropped_samples
    kept = [r for r in records if r["kind"] == fmt.SAMPLES]
    assert kept[-1]["rss_bytes"] == [1999, 1999], "the newest samples are the ones kept"
    assert len(kept) * 2 + dropped[0]["samples"] == 4000
    assert t0 <= dropped[0]["first_t"] < dropped[0]["last_t"] < kept[-1]["t"][0]


def test_a_short_write_leaves_no_torn_line(small_fs):
    fs = small_fs(1)
    path = fs / "rank-0.jsonl"
    writer = TimelineWriter(path, {"rank": 0})
    filler = fill(fs, leave_bytes=3000)  # room for part of the next write only
    t0 = time.time_ns()
    for i in range(200):
        writer.write(fmt.sample_batch(t=[t0 + i], rss_bytes=[i]))
    writer.flush(force=True)
    filler.unlink()
    writer.close()
    records, problems = _read_records(path)
    assert problems == []
    assert [r["rss_bytes"][0] for r in records if r["kind"] == fmt.SAMPLES] == list(range(200))
    os.remove(path)


def test_a_disk_that_never_returns_ends_in_a_truthful_run_json(small_fs):
    """The disk fills during training and stays full: training ends, the room held since the
    start takes the end record, which says what was lost; the console says it too."""
    fs = small_fs(48)
    memdiag = Memdiag(["case=baichuan2_13b", "steps=30", "seq_len=128", f"reports_dir={fs}"])
    run_dir = memdiag.run_dir
    try:
        memdiag.wait_for(r"step 3/30")
        fill(fs)
        memdiag.wait_for(r"is full \(")
        code = memdiag.wait()
        assert code != 0 and "Traceback" not in memdiag.output, memdiag.output
        spec = json.loads((run_dir / fmt.RUN_JSON).read_text())
        assert spec["status"] == "completed" and spec["disk_full"][-1]["to"] is None, (spec, memdiag.output[-3000:])
        assert "stayed full" in spec["incomplete"] and "stayed full" in memdiag.output
        assert not (run_dir / ".memdiag-reserve").exists()
        assert run_processes(run_dir) == []
    finally:
        kill_leftovers(run_dir)
