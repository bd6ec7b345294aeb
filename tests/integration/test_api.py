"""`memdiag.record` and `memdiag.MemdiagCallback`: the same run directory as `memdiag run`
writes (rank timelines with phases and steps, the node watcher's, run.json, the report),
from a script started by its own launcher."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memdiag.timeline import read_run

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).resolve().parent / "scripts" / "api_record.py"


@pytest.mark.parametrize("mode, ranks", [("engine", 2), ("trainer", 1)])
def test_the_python_api_writes_a_whole_run_directory(tmp_path, mode, ranks):
    run_dir = tmp_path / "run"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if ranks == 1:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29597")
        launcher = [sys.executable]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    result = subprocess.run([*launcher, str(SCRIPT), mode, str(run_dir)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    spec = json.loads((run_dir / "run.json").read_text())
    assert spec["status"] == "completed" and spec["recorded_by"] == "memdiag.record" and spec["world_size"] == ranks
    run = read_run(run_dir)
    assert sorted(run.ranks) == list(range(ranks)) and run.nodes
    for timeline in run.ranks.values():
        phases = {p.name for p in timeline.phases}
        assert {"ds_initialize", "forward", "backward", "step"} <= phases
        assert len(timeline.steps) == 3 and all(s["loss"] > 0 for s in timeline.steps)
        assert len(timeline.t_ns) > 10  # sampled by the watcher local rank 0 started (sampler=watcher)
    for name in ("summary.json", "findings.json", "report.html"):
        assert (run_dir / name).stat().st_size > 0
    # rank 0 ends on the console as `memdiag run` ends a run: how it ended, then the report, once
    report_line = f"memdiag: report {run_dir.resolve() / 'report.html'}"
    assert result.stdout.count(report_line) == 1, result.stdout[-2000:]
    lines = result.stdout.splitlines()
    done = lines[lines.index(report_line) - 1]
    assert done.startswith("memdiag: done. loss ") and "tokens/s per device, host RAM peak per node: " in done
