"""`memdiag top` on a real run, in a real terminal: tmux runs it beside the training and its
screen is read with capture-pane."""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="no tmux (`.ci/run` installs it)")


def test_top_shows_ranks_phase_step_and_memory_while_the_run_goes(tmp_path):
    reports = tmp_path / "reports"
    run = subprocess.Popen([sys.executable, "-m", "memdiag", "run", "steps=300", "seq_len=128", f"reports_dir={reports}"],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    session = f"memdiag-top-{tmp_path.name}"
    try:
        for line in run.stdout:  # until training has started
            if "step 3/300" in line:
                break
        subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "40",
                        f"cd {REPO} && COLUMNS=160 {sys.executable} -m memdiag top --reports-dir {reports} --interval 0.5"],
                       check=True)
        screens = []
        deadline = time.monotonic() + 120  # a safety net, not a measurement
        while time.monotonic() < deadline:
            time.sleep(1.0)
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout
            screens.append(screen)
            if "forward" in screen or "backward" in screen or "step/" in screen:
                steps = [int(row.split("│")[3]) for row in screen.splitlines() if row.count("│") >= 8 and row.split("│")[3].strip().isdigit()]
                if steps and max(steps) >= 3:
                    break
        screen = screens[-1]
        assert "memdiag top" in screen and "[running]" in screen, screen
        assert "node " in screen and "MemAvailable" in screen
        rows = [row for row in screen.splitlines() if row.count("│") >= 8]
        assert len(rows) == 2, screen  # rank 0 and rank 1
        assert any(p in screen for p in ("forward", "backward", "step", "optimizer_step")), screen
        assert "MiB" in screen and "forecast: load peak" in screen
        assert "/metrics" in screen  # where the node's Prometheus endpoint is
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
        import os
        import signal

        os.killpg(run.pid, signal.SIGTERM)
        run.wait(timeout=300)


def test_top_says_it_is_waiting_for_the_first_sample_and_what_ended(tmp_path):
    import subprocess
    import sys

    from memdiag.rundir import RunDir

    rundir = RunDir.create(tmp_path, "case", "1x2")
    rundir.start(host_limit=(2**30, "override"), case="case", layout="1x2")

    def screen() -> str:
        result = subprocess.run([sys.executable, "-m", "memdiag", "top", "--once", str(rundir.path)],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert "waiting for the first sample" in screen() and "n/a" not in screen()
    rundir.end(status="failed", exit_code=1, duration_s=1.0)
    assert "the run has ended without a sample" in screen()
