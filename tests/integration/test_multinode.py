"""Two simulated nodes x 2 ranks on this machine, through torchrun (static rendezvous on
127.0.0.1) and through the deepspeed launcher (--no_ssh --node_rank, a hostfile whose names do
not resolve): every node's timelines land in one run directory and read back as two nodes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memdiag.summary import summarize
from memdiag.timeline import read_run

REPO = Path(__file__).resolve().parents[2]
HOSTS = ["sim-node-a.invalid", "sim-node-b.invalid"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    hostfile = tmp / "hostfile"
    hostfile.write_text("# two nodes simulated on one machine\n" + "".join(f"{h} slots=4\n" for h in HOSTS))
    out = {}
    for launcher in ("torchrun", "deepspeed"):
        reports = tmp / launcher
        result = subprocess.run(
            [sys.executable, "-m", "memdiag", "run", "layout=2x2", f"hostfile={hostfile}", "nodes_here=true",
             f"launcher={launcher}", "steps=3", "seq_len=128", f"reports_dir={reports}"],
            cwd=REPO, capture_output=True, text=True, timeout=600,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        (run_dir,) = (reports / "baichuan2_13b").iterdir()
        out[launcher] = run_dir
    return out


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_nodes_in_one_run_directory(runs, launcher):
    run_dir = runs[launcher]
    spec = json.loads((run_dir / "run.json").read_text())
    assert spec["status"] == "completed" and spec["hosts"] == HOSTS and spec["layout"] == "2x2"
    assert {n: r["status"] for n, r in spec["nodes"].items()} == {h: "completed" for h in HOSTS}
    assert all(r["launcher"] == launcher for r in spec["nodes"].values())
    run = read_run(run_dir)
    assert sorted(run.nodes) == HOSTS  # one node watcher per simulated node
    by_node = {h: sorted(r for r, t in run.ranks.items() if t.header["host"] == h) for h in HOSTS}
    assert by_node == {HOSTS[0]: [0, 1], HOSTS[1]: [2, 3]}
    assert all(t.header["local_world_size"] == 2 and t.header["world_size"] == 4 for t in run.ranks.values())
    for host in HOSTS:  # each watcher saw its own node's two ranks, not the other node's
        node = run.nodes[host]
        assert len(node.t_ns) > 0 and sorted(node.rank_rss) == by_node[host]
    summary = summarize(run)
    assert sorted(summary.host_peak_bytes_per_node) == HOSTS
    assert (run_dir / "report.html").stat().st_size > 0
    assert not list(run_dir.glob("tmp*"))


def test_launchers_train_the_same(runs):
    losses = {k: summarize(read_run(v)).loss for k, v in runs.items()}
    assert losses["torchrun"] == pytest.approx(losses["deepspeed"], rel=1e-6)


def test_plan_run_drives_the_chosen_layout(tmp_path):
    """``memdiag plan --layout 2x1 --run``: the planned layout launched on two simulated nodes."""
    reports = tmp_path / "reports"
    result = subprocess.run(
        [sys.executable, "-m", "memdiag", "plan", "hardware=cpu", "model.scale=tiny", "seq_len=64", "load=zero_init",
         "--host-ram", "16G", "--device-mem", "16G", "--layout", "2x1", "--run", "--nodes-here",
         "--run-args", f"steps=2 reports_dir={reports}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "memdiag: running 2x1" in result.stdout
    (run_dir,) = (reports / "baichuan2_13b").iterdir()
    spec = json.loads((run_dir / "run.json").read_text())
    assert spec["status"] == "completed" and spec["layout"] == "2x1" and spec["config"]["seq_len"] == 64
    assert spec["config"]["load"] == "zero_init" and len(read_run(run_dir).nodes) == 2


def test_nodes_started_by_a_scheduler_join_one_run(tmp_path):
    """As under ``srun memdiag run ... node_rank=$SLURM_NODEID run_dir=DIR``: no coordinator;
    node 0 makes the directory, the other node joins it, node 0 finishes the run and reports."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "shared" / "run1"
    common = [sys.executable, "-m", "memdiag", "run", "layout=2x1", f"run_dir={run_dir}", "master_addr=127.0.0.1",
              f"master_port={port}", "steps=2", "seq_len=64"]
    parts = [subprocess.Popen([*common, f"node_rank={rank}"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (1, 0)]  # the joining node first: it waits for node 0's directory
    outputs = [p.communicate(timeout=600)[0] for p in parts]
    assert [p.returncode for p in parts] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "memdiag: done." in outputs[1] and "memdiag: done." not in outputs[0]
    spec = json.loads((run_dir / "run.json").read_text())
    assert spec["status"] == "completed" and spec["finished_by"] == "node_rank 0"
    assert sorted(spec["nodes"]) == ["node0", "node1"] and (run_dir / "report.html").exists()
    assert sorted(read_run(run_dir).nodes) == ["node0", "node1"]
