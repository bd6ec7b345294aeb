"""Stops on real runs of the CPU case: a signal to memdiag, SIGKILL to memdiag, a rank killed.

Each asserts what the user relies on: no process of the run left alive (checked by PID), a
truthful status in run.json, every sample written before the fault still readable, and a
report built from what was recorded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from memdiag.timeline import read_run
from memdiag.timeline import format as fmt

from .conftest import REPO, Memdiag, kill_leftovers, run_processes, wait_until_gone

LONG_RUN = ["case=baichuan2_13b", "steps=400", "seq_len=128", "stop_grace_s=30"]


def start(tmp_path, *extra) -> Memdiag:
    return Memdiag([*LONG_RUN, f"reports_dir={tmp_path / 'reports'}", *extra])


def assert_recorded(run_dir, *, min_steps: int = 3) -> None:
    run = read_run(run_dir)
    assert sorted(run.ranks) == [0, 1]
    for timeline in run.ranks.values():
        assert len(timeline.t_ns) > 10, "samples written before the fault must be readable"
        assert len(timeline.steps) >= min_steps
    assert not [p for p in run.problems if "wrong shape" in p or "not JSON" in p]


def node_events(run_dir, kind):
    run = read_run(run_dir)
    return [e for node in run.nodes.values() for e in node.events if e["kind"] == kind], run


@pytest.mark.parametrize("signum, times", [(signal.SIGTERM, 1), (signal.SIGINT, 1), (signal.SIGINT, 2)], ids=["SIGTERM", "SIGINT", "SIGINT-twice"])
def test_a_stop_signal_stops_everything_and_records_the_end(tmp_path, signum, times):
    memdiag = start(tmp_path)
    run_dir = memdiag.run_dir
    try:
        # rank 0 prints step 4 only after every rank finished step 3 (ZeRO-3's gathers keep them in
        # step); at "step 3" the other rank may still be in it, and is stopped before recording it
        memdiag.wait_for(r"step 4/400")
        signalled_ns = time.time_ns()
        for _ in range(times):  # twice: an impatient Ctrl-C (tests/faults/test_lifetime shows it skips the grace)
            memdiag.signal_group(signum)  # as a terminal's Ctrl-C, or a scheduler's SIGTERM
            time.sleep(0.05)
        code = memdiag.wait()
        assert code == 128 + signum, memdiag.output
        assert run_processes(run_dir) == [], "nothing memdiag started may outlive it"
        spec = json.loads((run_dir / fmt.RUN_JSON).read_text())
        assert spec["status"] == "interrupted" and spec["signal"] == signal.Signals(signum).name
        assert spec["exit_code"] == 128 + signum
        assert_recorded(run_dir)
        ended, run = node_events(run_dir, fmt.ENDED)
        assert ended, "the node watcher writes its last record"
        node = next(iter(run.nodes.values()))
        assert node.t_ns[-1] > signalled_ns, "the node timeline covers the shutdown"
        for name in (fmt.SUMMARY_JSON, "findings.json", fmt.REPORT_HTML):
            assert (run_dir / name).stat().st_size > 0
        assert "Traceback" not in memdiag.output
        assert "stopped (" + signal.Signals(signum).name in memdiag.output
    finally:
        kill_leftovers(run_dir)


def test_sigkill_to_memdiag_leaves_nothing_running_and_the_run_reads_abandoned(tmp_path):
    memdiag = start(tmp_path)
    run_dir = memdiag.run_dir
    try:
        memdiag.wait_for(r"step 4/400")  # every rank has recorded step 3 (see above)
        os.kill(memdiag.process.pid, signal.SIGKILL)
        memdiag.wait()
        left = wait_until_gone(run_dir, 60)
        assert left == [], f"still alive after memdiag's SIGKILL: {left}"
        ended, _ = node_events(run_dir, fmt.ENDED)
        assert ended and "died" in ended[-1]["reason"]
        assert json.loads((run_dir / fmt.RUN_JSON).read_text())["status"] == "running"  # nobody could say more
        assert_recorded(run_dir)
        report = subprocess.run(
            [sys.executable, "-m", "memdiag", "report", str(run_dir)], cwd=REPO, capture_output=True, text=True, timeout=600
        )
        assert report.returncode == 0, report.stderr
        spec = json.loads((run_dir / fmt.RUN_JSON).read_text())
        assert spec["status"] == "abandoned" and spec["abandoned_at"]
        assert "did not finish this run" in (run_dir / fmt.REPORT_HTML).read_text()
    finally:
        kill_leftovers(run_dir)


def test_a_killed_rank_fails_the_run_and_stops_the_rest(tmp_path):
    memdiag = start(tmp_path)
    run_dir = memdiag.run_dir
    try:
        memdiag.wait_for(r"step 3/400")
        rank1 = read_run(run_dir).ranks[1].header["pid"]
        os.kill(rank1, signal.SIGKILL)
        code = memdiag.wait()
        assert code != 0
        assert run_processes(run_dir) == []
        spec = json.loads((run_dir / fmt.RUN_JSON).read_text())
        assert spec["status"] == "failed" and spec["exit_code"] == code
        assert_recorded(run_dir, min_steps=2)  # the killed rank loses at most its last flush
        assert (run_dir / fmt.REPORT_HTML).exists()
        # the cause first: the killed rank and its signal, not the survivor's "Connection closed"
        cause = memdiag.output.index("rank 1 failed first: killed by SIGKILL (signal 9)")
        assert "Connection closed" not in memdiag.output[cause:]
    finally:
        kill_leftovers(run_dir)


def test_run_cmd_returns_the_commands_code_and_keeps_its_output(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text(
        "import sys, traceback\n"
        "print('training output', flush=True)\n"
        "traceback.print_stack()\n"
        "print('the script gives up', file=sys.stderr)\n"
        "sys.exit(3)\n"
    )
    memdiag = Memdiag([f"reports_dir={tmp_path / 'reports'}", "--", sys.executable, str(script)])
    code = memdiag.wait()
    assert code == 3, memdiag.output
    run_dir = memdiag.run_dir
    logs = run_dir / "logs"
    assert "training output" in (logs / "stdout.log").read_text()
    stderr = (logs / "stderr.log").read_text()
    assert "the script gives up" in stderr and "print_stack" in stderr
    assert "training output" in memdiag.output and "the script gives up" in memdiag.output  # streamed live too
    spec = json.loads((run_dir / fmt.RUN_JSON).read_text())
    assert spec["status"] == "failed" and spec["exit_code"] == 3


def test_sigterm_to_a_multinode_coordinator_stops_every_node(tmp_path):
    """Two simulated nodes: the coordinator passes the stop to each node part, which stops its
    own ranks and watcher and records its end; nothing of either node survives."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("sim-a.invalid slots=1\nsim-b.invalid slots=1\n")
    memdiag = Memdiag(["layout=2x1", f"hostfile={hostfile}", "nodes_here=true", "steps=400", "seq_len=128",
                       f"reports_dir={tmp_path / 'reports'}"])
    run_dir = memdiag.run_dir
    try:
        memdiag.wait_for(r"step 3/400")
        memdiag.signal_group(signal.SIGTERM)
        assert memdiag.wait() == 143
        assert run_processes(run_dir) == []
        spec = json.loads((run_dir / fmt.RUN_JSON).read_text())
        assert spec["status"] == "interrupted" and spec["signal"] == "SIGTERM"
        assert {n: r.get("status") for n, r in spec["nodes"].items()} == {"sim-a.invalid": "interrupted", "sim-b.invalid": "interrupted"}
        run = read_run(run_dir)
        assert sorted(run.ranks) == [0, 1] and all(len(t.steps) >= 3 for t in run.ranks.values())
        assert "Traceback" not in memdiag.output
    finally:
        kill_leftovers(run_dir)
