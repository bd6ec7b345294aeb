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
        (["data=openwebtext", "data.path=/nonexistent/tokens.npy"], "data.path=/nonexistent/tokens.npy: no such file"),
        (["data=openwebtext", "data.path=TOKENS_13B"], "outside the model's vocabulary (0..16383)"),
        (["checkpoint=/nope"], "checkpoint=/nope: no such directory"),
        (["checkpoint=CKPT_NO_SHARD"], "lists model-00002-of-00002.safetensors, which is missing"),
        (["reports_dir=HOSTS"], "is a file, not a directory"),
        (["layout=2x1", "hostfile=TWO_HOSTS"], "is not installed here|is not reachable"),
        (["layout=2x"], "layout='2x': write NODESxRANKS_PER_NODE"),
        (["layout=2x2"], "layout 2x2 spans 2 nodes: give hostfile=FILE"),
        (["layout=2x2", "hostfile=HOSTS"], "layout 2x2 needs 2 hosts; hostfile"),
        (["layout=2x2", "nodes_here=true", "launcher=mpirun"], "launcher='mpirun': use one of torchrun, deepspeed"),
        (["layout=2x2", "node_rank=2", "run_dir=/tmp/x"], "node_rank=2 must be an integer in 0..1"),
        (["hardware=bi_v150", "layout=1x32"], "hardware profile BI-V150 has 16 devices per node"),
    ],
)
def test_bad_run_input(tmp_path, args, expected):
    import json

    import numpy as np

    aside = tmp_path.parent / f"{tmp_path.name}-inputs"  # inputs live beside the reports dir, which must stay empty
    aside.mkdir()
    hosts = aside / "hostfile"
    hosts.write_text("only-one slots=4\n")
    two_hosts = aside / "two-hosts"
    two_hosts.write_text("unreachable-a.invalid slots=1\nunreachable-b.invalid slots=1\n")
    tokens = aside / "tokens-13b.npy"
    np.save(tokens, np.arange(1000, dtype=np.int64) * 125)  # ids of the 13B tokenizer, beyond the tiny model's 16384
    ckpt = aside / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (ckpt / "model-00001-of-00002.safetensors").write_bytes(b"")
    replace = {"TWO_HOSTS": two_hosts, "HOSTS": hosts, "TOKENS_13B": tokens, "CKPT_NO_SHARD": ckpt}
    for key, value in replace.items():
        args = [a.replace(key, str(value)) for a in args]
    reports = [] if any(a.startswith("reports_dir=") for a in args) else [f"reports_dir={tmp_path}"]
    result = subprocess.run(
        [sys.executable, "-m", "memdiag", "run", *args, *reports],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    alternatives = expected.split("|")  # either message, where the machine decides (ssh/rsync present or not)
    assert len(lines) == 1 and any(a in lines[0] for a in alternatives), result.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def _memdiag(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "memdiag", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_run_with_nothing_after_the_dashes_is_refused(tmp_path):
    result = _memdiag("run", f"reports_dir={tmp_path}", "--")
    assert result.returncode == 2 and "nothing after `--`" in result.stderr
    assert not any(tmp_path.iterdir())


def test_check_and_report_refuse_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for command in ("check", "report"):
        result = _memdiag(command, tmp_path)
        assert result.returncode == 2 and "not a run directory" in result.stderr
        assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def _small_run(run_dir):
    import json

    from memdiag.timeline import TimelineWriter, rank_path
    from memdiag.timeline import format as fmt

    (run_dir / "run.json").write_text(json.dumps({"status": "completed", "world_size": 1, "host_limit_bytes": 64 * 2**30}))
    writer = TimelineWriter(rank_path(run_dir, 0), {"rank": 0, "host": "n0", "world_size": 1, "local_world_size": 1})
    for i in range(20):
        writer.write({"kind": fmt.SAMPLE, "t": 1_000_000_000 + i * 10_000_000, "rss_bytes": 1_500_000_000 + i, "phase": "forward", "step": 0})
    writer.close()


def test_a_what_if_never_changes_the_recorded_findings(tmp_path):
    _small_run(tmp_path)
    assert _memdiag("check", tmp_path).returncode == 0
    recorded = (tmp_path / "findings.json").read_text()
    what_if = _memdiag("check", "--host-ram", "1G", tmp_path)
    assert what_if.returncode == 1 and "host_limit" in what_if.stdout and "findings.json unchanged" in what_if.stdout
    assert (tmp_path / "findings.json").read_text() == recorded


def test_report_out_for_one_run_writes_there_and_a_bad_out_is_one_line(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _small_run(run_dir)
    out = tmp_path / "elsewhere" / "mine.html"
    result = _memdiag("report", run_dir, "--out", out)
    assert result.returncode == 0 and out.stat().st_size > 0, result.stderr
    result = _memdiag("report", run_dir, "--out", "/proc/memdiag/x.html")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "not writable" in result.stderr


def test_unwritable_places_are_one_line_before_anything_runs(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [
        (["run", "reports_dir=/proc/memdiag-reports"], "not writable"),
        (["plan", "--host-ram", "500G", "--layout", "2x8", "--emit", a_file], "is a file, not a directory"),
        (["plan", "--host-ram", "500G", "--layout", "2x8", "--emit", "/proc/memdiag-emit"], "not writable"),
    ]
    for args, needle in cases:
        result = _memdiag(*args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and needle in lines[0], (args, result.stderr)


@pytest.mark.parametrize("args, needle", [
    (["run", "stepz=3"], "closest valid keys: steps"),
    (["run", "load=lazy"], "load='lazy': use one of reference, zero_init"),
    (["plan", "seq_lenn=3"], "closest valid keys: seq_len"),
    (["plan", "steps=3"], "'steps' is not a setting of `memdiag plan`"),
    (["run", "zero.stage=2", "--", "true"], "'zero.stage' is not a setting of `memdiag run --`"),
    (["run", "sample_hz=fast", "--", "true"], "sample_hz=fast: expected a number"),
])
def test_keys_are_refused_before_torch_is_imported(tmp_path, args, needle):
    """A bad key or value must not wait for torch and DeepSpeed to import (20 s on a loaded
    machine), in any command: one line, exit 2."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "memdiag", *args[:1], f"reports_dir={tmp_path}" if args[0] == "run" else "--json", *args[1:]],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert result.returncode == 2 and len(errors) == 1 and needle in errors[0], result.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "deepspeed" not in imported


def test_the_first_line_says_what_will_run(tmp_path):
    result = _memdiag("run", "model.scale=base", "nproc_per_node=1", "host_ram=300M", f"reports_dir={tmp_path}")
    assert result.returncode == 2  # the plan refuses 300M: nothing launched
    first = result.stdout.splitlines()[0]
    assert "model.scale=base, 1 rank per node" in first and "tiny" not in first


def test_top_on_a_directory_that_is_not_a_run_says_so(tmp_path):
    result = _memdiag("top", "--once", tmp_path)
    assert result.returncode == 2 and "not a run directory" in result.stderr
    result = _memdiag("top", "--once", "--reports-dir", tmp_path)
    assert result.returncode == 2 and "no runs under" in result.stderr


def test_output_to_a_closed_pipe_ends_quietly():
    result = subprocess.run(f"{sys.executable} -m memdiag plan --host-ram 500G | head -1", shell=True, cwd=REPO,
                            capture_output=True, text=True, timeout=300, executable="/bin/bash")
    assert result.stdout.startswith("baichuan2 13b") and result.stdout.count("\n") == 1
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr


def test_a_run_json_of_the_wrong_shape_is_a_broken_run_not_a_traceback(tmp_path):
    (tmp_path / "timeline").mkdir()
    (tmp_path / "run.json").write_text("[1, 2]")
    result = _memdiag("check", tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "run.json holds a JSON list, not an object" in result.stdout
