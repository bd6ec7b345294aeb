"""bench/gpu_check.sh, the GPU check CI cannot run: its syntax, and its dry mode here (the
preparation and import checks), with a PASS/FAIL line per check and an exit status."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.sh"


def test_the_gpu_check_parses_and_its_dry_mode_passes_here(tmp_path):
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=60)
    env = dict(os.environ, OUT=str(tmp_path), GPU_CHECK_DRY="1", GPU_CHECK_PYTHON=sys.executable,
               GPU_CHECK_SITE=str(tmp_path / "site"))
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    summary = (tmp_path / "summary.txt").read_text()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "PASS imports" in summary and "PASS bash -n" in summary and "FAIL" not in summary


def test_a_failing_step_is_a_fail_line_and_exit_1(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), GPU_CHECK_DRY="1", GPU_CHECK_PYTHON="/nonexistent/python",
               GPU_CHECK_SITE=str(tmp_path / "site"))
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1 and "FAIL imports" in (tmp_path / "summary.txt").read_text()
