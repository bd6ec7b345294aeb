"""A rank and its children under `memdiag run -- torchrun`: DataLoader workers, forked and
spawned, and a Python subprocess (as DeepSpeed's op builder) inherit the rank's
RANK and run directory, but only the rank is recorded as the rank; the node watcher counts the
children as the rank's, RSS and PSS equal to what /proc says of them at the same moment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).resolve().parent / "scripts" / "rank_children.py"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("children")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "memdiag", "run", f"reports_dir={tmp / 'reports'}", "--",
         sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT)],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    seen = {r["rank"]: r for r in (json.loads(line) for line in result.stdout.splitlines() if line.startswith("{"))}
    assert sorted(seen) == [0, 1]
    (run_dir,) = (tmp / "reports" / "custom").iterdir()
    return run_dir, seen


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_only_the_rank_is_recorded_as_the_rank(run):
    run_dir, seen = run
    for rank in (0, 1):
        headers = [r for r in _records(run_dir / "timeline" / f"rank-{rank}.jsonl") if r["kind"] == "header"]
        assert len(headers) == 1, headers  # the spawned worker and the subprocess were left alone
        assert headers[0]["pid"] == seen[rank]["pids"][0]
    assert sorted(p.name for p in (run_dir / "timeline").glob("rank-*.jsonl")) == ["rank-0.jsonl", "rank-1.jsonl"]


def test_the_children_are_counted_as_the_ranks_as_proc_says_at_that_moment(run):
    from memdiag.timeline import read_run

    run_dir, seen = run
    (node,) = read_run(run_dir).nodes.values()
    samples = [r for r in _records(node.path) if r["kind"] == "sample"]
    for rank in (0, 1):
        said = seen[rank]
        entries = [(s["t"], s["ranks"][str(rank)]) for s in samples if str(rank) in s.get("ranks", {})]
        # the watcher's reads nearest to the rank's own, within the window the children held still
        near = [e for t, e in entries if abs(t - said["t"]) < 2.0e9]
        # a read while the rank had no children leaves their figures out (format 1.7)
        rss = min((e.get("children_rss_bytes", 0) for e in near), key=lambda v: abs(v - said["children_rss_bytes"]))
        assert rss == pytest.approx(said["children_rss_bytes"], rel=0.05)
        with_pss = [e for e in near if "children_pss_bytes" in e]
        assert with_pss, "no PSS read while the children held their memory"
        pss = min(with_pss, key=lambda e: abs(e["children_pss_bytes"] - said["children_pss_bytes"]))["children_pss_bytes"]
        assert pss == pytest.approx(said["children_pss_bytes"], rel=0.05)
        # each worker's 64 MiB is its own; the forked one shares the rest of the rank's pages
        assert pss >= 2 * 64 * 2**20 and pss < rss
        roles = node.rank_children_roles[rank]
        assert roles.get("forked worker") == 1 and roles.get("spawned worker", 0) >= 1 and roles.get("other", 0) >= 1
        # the node's per-rank figure carries them: the rank's RSS with its children
        assert np.nanmax(node.rank_rss[rank]) > np.nanmax(node.rank_children_rss[rank]) > 0


def test_the_run_reads_whole_and_a_check_names_the_children(run):
    from memdiag.timeline import read_run

    run_dir, _ = run
    assert read_run(run_dir).problems == []  # every node sample, children and roles included, is read
    result = subprocess.run([sys.executable, "-m", "memdiag", "check", "--json", str(run_dir)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    findings = {f["id"]: f for f in json.loads(result.stdout) if f["id"] == "children_memory" and f["evidence"]["rank"] == 0}
    finding = findings["children_memory"]
    # two 64 MiB workers and a Python beside a rank that holds little: well over the share
    assert finding["evidence"]["measure"] == "PSS" and finding["evidence"]["children_peak_bytes"] >= 2 * 64 * 2**20
    assert "forked worker" in finding["message"] and "num_workers" in finding["fix"]


def test_a_failed_run_says_what_the_rank_raised_and_where(tmp_path):
    script = Path(__file__).resolve().parent / "scripts" / "raise_at_step.py"
    raise_line = next(i for i, line in enumerate(script.read_text().splitlines(), 1) if "raise ValueError" in line)
    result = subprocess.run(
        [sys.executable, "-m", "memdiag", "run", f"reports_dir={tmp_path / 'reports'}", "--",
         sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
        cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode != 0
    (run_dir,) = (tmp_path / "reports" / "custom").iterdir()
    said = f"rank 1 raised ValueError: bad batch at step 2 at {script}:{raise_line} (in train_step)"
    spec = json.loads((run_dir / "run.json").read_text())
    assert spec["status"] == "failed"
    assert spec["error"] == {"rank": 1, "type": "ValueError", "message": "bad batch at step 2", "file": str(script),
                             "line": raise_line, "function": "train_step"}
    status = next(f for f in json.loads((run_dir / "findings.json").read_text()) if f["id"] == "run_status")
    assert said in status["message"] and status["ranks"] == [1]
    assert said in (run_dir / "report.html").read_text()
    assert said in result.stdout  # the console's last lines name it too
