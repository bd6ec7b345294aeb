"""`memdiag report RUN --markdown`: report.md and PNGs drawn by the system Chromium (plotly's
static export), the pictures linked from report.html."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from memdiag.timeline import TimelineWriter, rank_path
from memdiag.timeline import format as fmt

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(
    not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")),
    reason="no Chromium (`.ci/run` installs Debian's chromium)",
)


def test_markdown_and_pictures_for_an_issue(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({
        "status": "completed", "world_size": 1, "layout": "1x1", "host_limit_bytes": 8 * 2**30,
        "host_limit_source": "test", "versions": {"torch": "x"},
    }))
    writer = TimelineWriter(rank_path(tmp_path, 0), {"rank": 0, "host": "n0", "world_size": 1, "local_world_size": 1})
    writer.write({"kind": fmt.PHASE_BEGIN, "t": 1_000_000_000, "phase": "model_build", "step": 0, "rss_bytes": 10})
    for i in range(100):
        writer.write({"kind": fmt.SAMPLE, "t": 1_000_000_000 + i * 10_000_000, "rss_bytes": 2**30 + i * 2**20, "phase": "model_build", "step": 0})
    writer.write({"kind": fmt.PHASE_END, "t": 2_000_000_000, "phase": "model_build", "host_peak_bytes": 2**30 + 2**27})
    writer.close()
    (tmp_path / "findings.json").write_text(json.dumps([
        {"id": "not_released", "severity": "info", "message": "an info finding the HTML shows too", "evidence": {}, "fix": ""},
    ]))
    result = subprocess.run([sys.executable, "-m", "memdiag", "report", "--markdown", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    md = (tmp_path / "report.md").read_text()
    assert "**Host RAM peak per phase, per node**" in md and "| model_build |" in md and "status **completed**" in md
    # the same findings as the HTML page, every severity counted
    assert "**Findings** (0 errors, 0 warnings, 1 info)" in md and "**[info] not_released**" in md
    pictures = sorted((tmp_path / "figures").glob("*.png"))
    assert [p.name for p in pictures] == ["host.png"], result.stdout  # no device data: no device picture
    assert pictures[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pictures[0].stat().st_size > 10_000
    assert "![host](figures/host.png)" in md
    assert "href='figures/host.png'" in (tmp_path / "report.html").read_text()
