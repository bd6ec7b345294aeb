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
        (["layout=2x"], "layout='2x': write NODESxRANKS_PER_NODE"),
        (["layout=2x2"], "layout 2x2 spans 2 nodes: give hostfile=FILE"),
        (["layout=2x2", "hostfile=HOSTS"], "layout 2x2 needs 2 hosts; hostfile"),
        (["layout=2x2", "nodes_here=true", "launcher=mpirun"], "launcher='mpirun': use one of torchrun, deepspeed"),
        (["layout=2x2", "node_rank=2", "run_dir=/tmp/x"], "node_rank=2 must be an integer in 0..1"),
        (["hardware=bi_v150", "layout=1x32"], "hardware profile BI-V150 has 16 devices per node"),
    ],
)
def test_bad_run_input(tmp_path, args, expected):
    hosts = tmp_path.parent / f"{tmp_path.name}-hostfile"
    hosts.write_text("only-one slots=4\n")
    args = [a.replace("HOSTS", str(hosts)) for a in args]
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
