"""`memdiag demo 5290`: both loadings at two rank counts, one page, the check's verdicts."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_demo_5290_shows_the_copy_per_rank_and_lean_loading_without_it(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "memdiag", "demo", "5290", "--ranks", "1,2", "--scale", "tiny", "--reports-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"\[error\] load=reference: .* that is the 5290 pattern", result.stdout)
    assert not re.search(r"\[error\] load=zero_init", result.stdout)
    (page,) = tmp_path.glob("demo-5290-*/demo-5290.html")
    html = page.read_text()
    assert "data-figure='demo-5290'" in html and html.count("<h2>load=") == 2
    # each section names the line at every rank's load peak (memray): the reference loading's is the model's build
    reference = html.split("<h2>load=reference</h2>", 1)[1].split("<h2>load=", 1)[0]
    assert html.count("top stack at the load peak") == 2 and reference.count("modeling_baichuan.py") >= 3


def test_demo_needs_two_rank_counts(tmp_path):
    result = subprocess.run([sys.executable, "-m", "memdiag", "demo", "5290", "--ranks", "2", "--reports-dir", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "at least two" in result.stderr and not any(tmp_path.iterdir())
