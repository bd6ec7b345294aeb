"""Bad input: one line that says what is wrong, exit 2, nothing half-written."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["case=llama"], "available: baichuan2_13b"),
        (["stepz=3"], "closest valid keys: steps"),
        (["steps20"], "malformed override 'steps20'"),
        (["model.scale=huge"], "available: 13b, base, small, tiny"),
        (["host_ram=500X"], "host_ram='500X'"),
        (["host_ram=300M"], "predicted not to fit"),
        (["data=openwebtext", "data.path=/nonexistent/tokens.npy"], None),
    ],
)
def test_bad_run_input(tmp_path, args, expected):
    result = subprocess.run(
        [sys.executable, "-m", "memdiag", "run", *args, f"reports_dir={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if expected is None:  # a missing data file fails inside the ranks: exit 1 with the path
        assert result.returncode == 1
        assert "/nonexistent/tokens.npy" in result.stdout
        assert "python -m cases.baichuan2_13b.data" in result.stdout
        return
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not any(tmp_path.iterdir())  # nothing written
