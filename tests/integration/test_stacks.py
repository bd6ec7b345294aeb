"""Which line held the memory at a phase's peak (memray, `stacks=`), on real runs: a known buffer
in a known function is the top stack with its size, and the raw capture opens with memray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).resolve().parent / "scripts" / "known_buffer.py"


def test_a_known_buffer_is_the_top_stack_at_the_load_peak(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "memdiag", "run", f"reports_dir={tmp_path / 'reports'}", "--", sys.executable, str(SCRIPT)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (run_dir,) = (tmp_path / "reports" / "custom").iterdir()
    table = json.loads((run_dir / "stacks" / "host-rank-0-load.json").read_text())
    top = table["stacks"][0]
    line = next(i for i, text in enumerate(SCRIPT.read_text().splitlines(), 1) if "the line the stacks must name" in text)
    assert top["bytes"] == pytest.approx(64 * 2**20, rel=0.01) and top["count"] == 1
    assert top["user_frame"] == ["load_known_buffer", str(SCRIPT), line]
    assert table["peak_bytes"] >= top["bytes"]
    # memray's own tools open the raw capture
    import memray

    with memray.FileReader(run_dir / "stacks" / table["capture"]) as reader:
        assert reader.metadata.peak_memory == table["peak_bytes"]
    flamegraph = subprocess.run([sys.executable, "-m", "memray", "flamegraph", "-f", "-o", str(tmp_path / "flame.html"),
                                 str(run_dir / "stacks" / table["capture"])], capture_output=True, text=True, timeout=300)
    assert flamegraph.returncode == 0 and (tmp_path / "flame.html").stat().st_size > 0, flamegraph.stderr
    # and the report shows it, the line named
    assert f"{SCRIPT}:{line} (load_known_buffer)" in (run_dir / "report.html").read_text()
    # host_limit names that line when the node's peak nears the limit (a what-if just above it)
    host_limit = _what_if_host_limit(run_dir)
    assert f"{SCRIPT}:{line} (load_known_buffer)" in host_limit["message"], host_limit["message"]
    assert host_limit["evidence"]["top_stacks"][0]["line"] == line
    # device stacks need CUDA's allocator: this rank says so instead of recording nothing silently
    header = json.loads((run_dir / "timeline" / "rank-0.jsonl").read_text().splitlines()[0])
    assert header["device_stacks"].startswith("off: device allocation stacks need CUDA")


def _what_if_host_limit(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    peak = max(summary["host_peak_bytes_per_node"].values())
    result = subprocess.run([sys.executable, "-m", "memdiag", "check", "--json", "--host-ram", str(int(peak * 1.02)),
                             str(run_dir)], capture_output=True, text=True, timeout=300)
    return next(f for f in json.loads(result.stdout) if f["id"] == "host_limit")


def test_stacks_off_captures_nothing(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "memdiag", "run", "stacks=off", f"reports_dir={tmp_path / 'reports'}", "--", sys.executable, str(SCRIPT)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = (tmp_path / "reports" / "custom").iterdir()
    assert not (run_dir / "stacks").exists() or not any((run_dir / "stacks").glob("host-*"))
    assert "run again with stacks=load" in _what_if_host_limit(run_dir)["message"]


def test_without_memray_one_line_says_stacks_are_off_and_the_run_records_the_rest(tmp_path):
    """memray missing (another platform or Python): the rank says so once, every other figure is
    recorded, the run ends well and the finding says which stacks= would have named the line."""
    shadow = tmp_path / "shadow" / "memray"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("memray is not built for this platform")\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(shadow.parent), os.environ.get("PYTHONPATH")])))
    result = subprocess.run(
        [sys.executable, "-m", "memdiag", "run", f"reports_dir={tmp_path / 'reports'}", "--", sys.executable, str(SCRIPT)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    said = [line for line in result.stdout.splitlines() if line.startswith("memdiag: warning:") and "stacks" in line]
    assert len(said) == 1 and "host allocation stacks are off" in said[0] and "not built for this platform" in said[0]
    (run_dir,) = (tmp_path / "reports" / "custom").iterdir()
    assert not list(run_dir.glob("stacks/host-*"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert max(summary["host_peak_bytes_per_node"].values()) > 64 * 2**20  # the buffer is in the host figures
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
