"""How every run ends on the console (report/ending.py), whatever started it: findings first,
then how it ended, then the report's path; the exit status each ending gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memdiag.checks.finding import Finding
from memdiag.report.ending import ending
from memdiag.summary import summarize
from memdiag.timeline import TimelineWriter, format as fmt, rank_path, read_run

SIGKILLED = (Path(__file__).resolve().parents[1] / "data" / "torchrun_sigkill.txt").read_text()


@pytest.fixture
def run(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"world_size": 1}))
    writer = TimelineWriter(rank_path(tmp_path, 0), {"rank": 0, "host": "n0", "world_size": 1})
    writer.write(fmt.sample_batch(t=[1, 2], phase=["forward"] * 2, step=[1, 1], rss_bytes=[2**30] * 2, hwm_bytes=[2**30] * 2))
    writer.write({"kind": fmt.STEP, "t": 3, "step": 1, "loss": 2.5, "tokens": 100, "step_time_s": 1.0})
    writer.close()
    return read_run(tmp_path)


FINDINGS = [Finding(id="leak_host", severity="warning", message="grows"), Finding(id="x", severity="info", message="i")]


@pytest.mark.parametrize("what", ["the run", "the command", "the recording"])
def test_every_starter_ends_alike(run, what):
    html = run.path / "report.html"
    lines, code = ending(run.path, {"status": "completed"}, summarize(run), FINDINGS, 0, html=html, guard=None, what=what)
    assert lines[0].startswith("[WARN ] leak_host: grows") and lines[1] == "memdiag: 1 info finding(s) in the report"
    assert lines[2].startswith("memdiag: done. loss 2.5000") and "host RAM peak per node: 1.00 GiB (node n0)" in lines[2]
    assert lines[-1] == f"memdiag: report {html}" and code == 0


def test_the_guard_a_signal_and_a_failure_each_say_how_it_ended(run):
    html, summary = run.path / "report.html", summarize(run)
    lines, code = ending(run.path, {"status": "stopped_by_guard"}, summary, [], 143, html=html,
                         guard={"reason": "the ranks hold 9 GiB"}, what="the command")
    assert lines[0].startswith("memdiag: the guard stopped the command: the ranks hold 9 GiB") and code == 1
    lines, code = ending(run.path, {"status": "interrupted", "signal": "SIGTERM"}, summary, [], 143, html=html, guard=None)
    assert lines[0] == "memdiag: the run was stopped (SIGTERM); the report shows what was recorded" and code == 143
    (run.path / "logs").mkdir()
    (run.path / "logs" / "launcher.log").write_text(SIGKILLED)
    lines, code = ending(run.path, {"status": "failed"}, summary, [], 1, html=html, guard=None)
    assert lines[0] == "memdiag: the run failed (exit code 1)" and lines[1].startswith("rank 1 failed first: killed by SIGKILL")
    lines, code = ending(run.path, {"status": "failed"}, summary, [], 0, html=html, guard=None, what="the recording",
                         echoed_stderr=True)
    assert lines[0] == "memdiag: the recording failed (an uncaught exception)" and code == 1
    assert lines[1].startswith("memdiag: rank 1 failed first") and lines[-1] == f"memdiag: report {html}"


def test_a_case_run_fails_on_an_error_finding_and_a_command_keeps_its_status(run):
    error = [Finding(id="host_limit", severity="error", message="over")]
    args = dict(html=run.path / "report.html", guard=None)
    assert ending(run.path, {"status": "completed"}, summarize(run), error, 0, what="the run", **args)[1] == 1
    assert ending(run.path, {"status": "completed"}, summarize(run), error, 0, what="the command", **args)[1] == 0
