"""The report in a real browser: headless Chromium loads it from disk (no network), runs its
JavaScript, and the DOM must hold every figure with the expected number of traces and no
script errors. A screenshot lands in the test's temporary directory."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=8000",
]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (`.ci/run` installs Debian's chromium)")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    reports = tmp_path_factory.mktemp("browser-reports")
    result = subprocess.run(
        [sys.executable, "-m", "memdiag", "run", "steps=4", f"reports_dir={reports}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (run_dir,) = (reports / "baichuan2_13b").iterdir()
    return run_dir / "report.html"


def chromium(args, tmp_path, timeout=90):
    profile = tmp_path / "profile"
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=timeout,
    )


def test_every_figure_renders_with_its_traces_and_no_errors(report, tmp_path):
    result = chromium(["--dump-dom", report.as_uri()], tmp_path)
    dom = result.stdout
    assert "memdiag-errors" in dom, result.stderr[-2000:]
    errors = re.search(r'id="memdiag-errors"[^>]*data-errors="([^"]*)"', dom).group(1)
    assert errors == "", errors
    figures = re.findall(r'data-figure="([^"]+)" data-expected-traces="(\d+)"', dom)
    names = {name for name, _ in figures}
    assert {"host", "device", "categories", "layers", "stacks-host-load"} <= names  # the icicle of the load peak
    assert any(name.startswith("node-") for name in names)
    rendered = dict(re.findall(r'data-rendered-figure="([^"]+)" data-rendered-traces="(\d+)"', dom))
    for name, expected in figures:
        assert rendered.get(name) == expected, (name, expected, rendered)
    # every phase and finding label readable: the boxes Chromium laid out do not overlap
    labels = re.findall(r'data-rendered-figure="([^"]+)"[^>]*data-label-count="(\d+)" data-label-overlaps="(\d+)"', dom)
    assert dict((n, int(c)) for n, c, _ in labels)["host"] >= 4  # phases and finding marks
    assert [(n, int(o)) for n, _, o in labels if int(o)] == []


def test_labels_of_short_phases_overlap_before_they_are_moved(report, tmp_path):
    """The check is not vacuous: with the mover switched off the same report has overlapping labels."""
    html = report.read_text().replace("await memdiagUnclutter(plot);", "")
    raw = tmp_path / "raw.html"
    raw.write_text(html)
    dom = chromium(["--dump-dom", raw.as_uri()], tmp_path).stdout
    overlaps = [int(o) for o in re.findall(r'data-label-overlaps="(\d+)"', dom)]
    assert overlaps and max(overlaps) > 0


def test_screenshot(report, tmp_path):
    shot = tmp_path / "report.png"
    chromium([f"--screenshot={shot}", "--window-size=1300,2400", report.as_uri()], tmp_path)
    assert shot.exists() and shot.stat().st_size > 20_000
