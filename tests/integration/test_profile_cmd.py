"""`memdiag run -- CMD`: a DeepSpeed script that imports nothing of memdiag, profiled unchanged."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).resolve().parent / "scripts" / "standalone_zero3.py"


def test_script_knows_nothing_of_memdiag():
    assert "memdiag" not in SCRIPT.read_text().split('"""', 2)[2]


def test_torchrun_job_is_profiled_and_the_users_pythonpath_kept(tmp_path):
    user_dir = tmp_path / "user_site"
    user_dir.mkdir()
    marker = tmp_path / "user_sitecustomize_ran"
    (user_dir / "sitecustomize.py").write_text(
        f"import os\nopen({str(marker)!r} + '.' + str(os.getpid()), 'w').close()\n"
    )
    env = dict(os.environ, PYTHONPATH=str(user_dir), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(
        [sys.executable, "-m", "memdiag", "run", f"reports_dir={tmp_path / 'reports'}", "--", *torchrun, str(SCRIPT)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("standalone done") == 2
    assert len(list(tmp_path.glob("user_sitecustomize_ran.*"))) >= 3  # agent + 2 ranks
    (run_dir,) = (tmp_path / "reports" / "custom").iterdir()
    for rank in (0, 1):
        lines = (run_dir / "timeline" / f"rank-{rank}.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        phases = {r["phase"] for r in records if r["kind"] == "phase_begin"}
        assert {"zero_init", "ds_initialize", "forward", "backward", "step", "optimizer_step"} <= phases
        steps = [r for r in records if r["kind"] == "step"]
        assert len(steps) == 3 and all(s["loss"] > 0 for s in steps)
        model = next(r for r in records if r["kind"] == "model")
        assert model["zero_stage"] == 3 and model["model_class"] == "LlamaForCausalLM"
    assert list((run_dir / "timeline").glob("node-*.jsonl"))
    html = (run_dir / "report.html").read_text()
    assert "standalone_zero3.py" in html and "(2 ranks recorded)" in html and "? ?x?" not in html
    assert ("data-figure='device'" in html) != ("id='no-device-figure'" in html)  # a chart, or why not
    spec = json.loads((run_dir / "run.json").read_text())
    assert spec["status"] == "completed" and spec["world_size"] == 2
    # the command's run ends on the console as a case's run does: how it ended, the report last
    last = result.stdout.strip().splitlines()[-2:]
    assert last[0].startswith("memdiag: done. loss ") and "host RAM peak per node" in last[0], last
    assert last[1] == f"memdiag: report {run_dir / 'report.html'}"


def test_bad_key_for_cmd_mode(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "memdiag", "run", "sample_hx=5", "--", "true"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "sample_hz" in result.stderr


@pytest.mark.parametrize(
    "launcher, env_extra, ranks",
    [
        (["deepspeed", "--num_gpus", "2"], {}, 2),  # the deepspeed launcher (adds --local_rank)
        # plain python: DeepSpeed needs the launcher's variables, given here by hand
        ([sys.executable], {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29591"}, 1),
    ],
    ids=["deepspeed-launcher", "plain-python"],
)
def test_other_launchers_are_profiled(tmp_path, launcher, env_extra, ranks):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **env_extra)
    result = subprocess.run(
        [sys.executable, "-m", "memdiag", "run", f"reports_dir={tmp_path / 'reports'}", "--", *launcher, str(SCRIPT)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("standalone done") == ranks
    (run_dir,) = (tmp_path / "reports" / "custom").iterdir()
    assert sorted(p.name for p in (run_dir / "timeline").glob("rank-*.jsonl")) == [f"rank-{r}.jsonl" for r in range(ranks)]
    for rank in range(ranks):
        records = [json.loads(line) for line in (run_dir / "timeline" / f"rank-{rank}.jsonl").read_text().splitlines()]
        assert len([r for r in records if r["kind"] == "step"]) == 3
        assert records[0]["local_world_size"] == ranks
    node = [json.loads(line) for line in next((run_dir / "timeline").glob("node-*.jsonl")).read_text().splitlines()]
    seen = {int(k) for r in node if r["kind"] == "sample" for k in r.get("ranks", {})}
    assert seen == set(range(ranks))  # the watcher found the ranks below this launcher too


@pytest.mark.parametrize("how", ["case", "case_run_dir", "command"])
def test_a_run_started_outside_the_checkout_writes_only_where_it_was_told(tmp_path, how):
    """A relative reports_dir (or run_dir) is the user's directory's, not the checkout's: the
    ranks and the node watcher (started in the checkout) get the run directory as an absolute path."""
    name = f"outside-{tmp_path.name}"
    if how == "case":
        args = ["run", "reports_dir=rel", "steps=1", "seq_len=64", "nproc_per_node=1"]
    elif how == "case_run_dir":  # a single node writes the run directory it was given
        args = ["run", "run_dir=rel/a/mine", "steps=1", "seq_len=64", "nproc_per_node=1"]
    else:
        args = ["run", "reports_dir=rel", f"name={name}", "--", sys.executable, "-c", "import time; time.sleep(1.5)"]
    result = subprocess.run([sys.executable, "-m", "memdiag", *args], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600, env=os.environ | {"PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (run_dir,) = [p.parent for p in (tmp_path / "rel").glob("*/*/run.json")]
    spec = json.loads((run_dir / "run.json").read_text())
    assert spec["status"] == "completed" and Path(spec["run_dir"]).is_absolute()
    assert list((run_dir / "timeline").glob("node-*.jsonl")) and list((run_dir / "timeline").glob("rank-*.jsonl"))
    assert not (REPO / "reports" / name).exists() and not (REPO / "rel").exists()


def test_the_guard_stops_a_single_process_command_from_outside_the_checkout(tmp_path):
    """`memdiag run host_ram=... -- python script.py`: no launcher gives the script a RANK, yet
    it is the job's rank 0 to the node watcher, so the guard stops it at its line: the run reads
    stopped_by_guard, the console and the findings say so, the stacks land in the user's run."""
    script = tmp_path / "grow.py"
    script.write_text("import time\nheld = []\nfor _ in range(40):\n    held.append(bytearray(64 * 2**20))\n"
                      "    held[-1][::4096] = b'x' * len(held[-1][::4096])\n    time.sleep(0.1)\ntime.sleep(30)\n")
    result = subprocess.run(
        [sys.executable, "-m", "memdiag", "run", "host_ram=1G", "guard.grace_s=2", "stacks=off", "reports_dir=mine",
         "name=grow", "--", sys.executable, str(script)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=os.environ | {"PYTHONPATH": str(REPO)},
    )
    out = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in result.stdout, out[-3000:]
    (run_dir,) = (tmp_path / "mine" / "grow").iterdir()
    spec = json.loads((run_dir / "run.json").read_text())
    assert spec["status"] == "stopped_by_guard", spec
    assert "[ERROR] oom_guard" in result.stdout and "the guard stopped the command" in result.stdout
    assert list((run_dir / "stacks").glob("rank-0*.txt"))
    findings = json.loads((run_dir / "findings.json").read_text())
    guard = next(f for f in findings if f["id"] == "oom_guard")
    assert guard["severity"] == "error" and guard["moments"]
    # the fix speaks of what the script did: it never reached deepspeed.initialize
    assert "never called it" in next(f for f in findings if f["id"] == "host_limit")["fix"]
    assert not list(REPO.glob("mine")) and not (REPO / "reports" / "grow").exists()
