"""End to end: `memdiag run` on the CPU case, 2 real ranks through torchrun, DeepSpeed ZeRO-3."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ORDER = ["model_build", "zero_init", "ds_initialize", "forward", "backward", "step", "teardown"]


def memdiag(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "memdiag", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rank_samples(run_dir, rank):
    """The rank's host samples as written, one dict per tick: by the node watcher
    (``rank_samples`` batches, sampler=watcher, the default) or by the rank's own sampler
    (``samples`` batches, sampler=rank)."""
    out = []
    for path in [run_dir / "timeline" / f"rank-{rank}.jsonl", *(run_dir / "timeline").glob("node-*.jsonl")]:
        for record in read_jsonl(path):
            if record["kind"] == "samples" or (record["kind"] == "rank_samples" and record["rank"] == rank):
                keys = [k for k in record if k not in ("kind", "rank")]
                out += [dict(zip(keys, row)) for row in zip(*(record[k] for k in keys))]
    return sorted(out, key=lambda sample: sample["t"])


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    reports = tmp_path_factory.mktemp("reports")
    result = memdiag("run", "case=baichuan2_13b", "steps=4", f"reports_dir={reports}")
    assert result.returncode == 0, result.stdout + result.stderr
    run_dirs = list((reports / "baichuan2_13b").iterdir())
    assert len(run_dirs) == 1
    return result, run_dirs[0]


def test_first_line_states_the_cpu_choice(cpu_run):
    result, _ = cpu_run
    first = result.stdout.splitlines()[0]
    assert "cpu" in first and "no accelerator" in first
    assert re.search(r"step 4/4 .*loss", result.stdout)


def test_both_ranks_recorded_every_phase_in_order(cpu_run):
    _, run_dir = cpu_run
    for rank in (0, 1):
        records = read_jsonl(run_dir / "timeline" / f"rank-{rank}.jsonl")
        assert records[0]["kind"] == "header" and records[0]["world_size"] == 2
        begins = [r["phase"] for r in records if r["kind"] == "phase_begin"]
        first_seen = [p for i, p in enumerate(begins) if p not in begins[:i]]
        assert [p for p in first_seen if p in ORDER] == ORDER
        assert begins.count("forward") == 4
        ends = [r for r in records if r["kind"] == "phase_end"]
        assert all(r["host_peak_bytes"] > 0 for r in ends)
        samples = rank_samples(run_dir, rank)
        assert len(samples) > 50
        assert all(b["t"] > a["t"] for a, b in zip(samples, samples[1:]))
        from memdiag.timeline import read_run

        seen = set(read_run(run_dir).ranks[rank].sample_phase)  # each sample joined to the rank's phases
        assert "forward" in seen
        assert seen & {"model_build", "zero_init"}  # samples carry the innermost phase


def test_loss_is_finite_and_summary_matches_the_timeline(cpu_run):
    _, run_dir = cpu_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert math.isfinite(summary["loss"]) and summary["steps"] == 4
    assert summary["tokens_per_s_per_device"] > 0
    for rank in (0, 1):
        records = read_jsonl(run_dir / "timeline" / f"rank-{rank}.jsonl")
        sample_max = max(r["rss_bytes"] for r in rank_samples(run_dir, rank))
        phase_max = max(r["host_peak_bytes"] for r in records if r["kind"] == "phase_end")
        assert summary["host_peak_bytes_per_rank"][str(rank)] == max(sample_max, phase_max)
    node_peak = next(iter(summary["host_peak_bytes_per_node"].values()))
    per_rank = summary["host_peak_bytes_per_rank"].values()
    assert max(per_rank) < node_peak <= sum(per_rank)
    spec = json.loads((run_dir / "run.json").read_text())
    assert spec["status"] == "completed" and spec["exit_code"] == 0
    import importlib.metadata

    assert spec["versions"]["deepspeed"] == importlib.metadata.version("deepspeed")  # what ran, recorded


def test_report_is_self_contained_with_a_trace_per_rank(cpu_run):
    _, run_dir = cpu_run
    html = (run_dir / "report.html").read_text()
    assert not re.search(r"<script[^>]*\bsrc=", html)  # no external script: opens offline
    assert not re.search(r"<link[^>]*\bhref=", html)
    assert len(html) > 3_000_000  # plotly.js is inline
    assert '"name":"rank 0 RSS"' in html and '"name":"rank 1 RSS"' in html
    for column in ("config", "fix_hp", "token/p/s", "loss", "mem", "MFU"):
        assert f"<th>{column}</th>" in html


def test_default_stacks_capture_each_phase_once_and_the_later_steps_run_untraced(cpu_run):
    """stacks=auto: memray's capture of each phase's first occurrence, so the phase holding the
    host peak has its stacks whichever it is; the first forward's capture ended before the second
    forward began."""
    import memray

    _, run_dir = cpu_run
    for rank in (0, 1):
        tables = {p.name: json.loads(p.read_text()) for p in (run_dir / "stacks").glob(f"host-rank-{rank}-*.json")}
        phases = {t["phase"] for t in tables.values()}
        assert {"load", "ds_initialize", "forward", "backward", "step"} <= phases
        assert not phases & {"model_build", "zero_init"}  # inside load's capture
        assert all(t["occurrence"] == "first" and t["stacks"] for t in tables.values())
        forward = tables[f"host-rank-{rank}-forward.json"]
        with memray.FileReader(run_dir / "stacks" / forward["capture"]) as reader:
            ended_ns = reader.metadata.end_time.timestamp() * 1e9  # memray's local time, as a naive datetime
        begins = [r["t"] for r in read_jsonl(run_dir / "timeline" / f"rank-{rank}.jsonl")
                  if r["kind"] == "phase_begin" and r["phase"] == "forward"]
        assert ended_ns < begins[1], "the second forward ran untraced"


def test_no_leftovers_outside_the_run_dir(cpu_run):
    _, run_dir = cpu_run
    assert not (run_dir / "tmp").exists()


def test_reference_loading_runs_and_a_checkpoint_is_saved_and_resumed(tmp_path):
    """load=reference builds the whole model (no zero.Init); save=true resume=true save a real
    DeepSpeed checkpoint after the last step and load it back, each recorded as its phase."""
    result = memdiag("run", "load=reference", "steps=2", "save=true", "resume=true", f"reports_dir={tmp_path}")
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = next((tmp_path / "baichuan2_13b").iterdir())
    for rank in (0, 1):
        records = read_jsonl(run_dir / "timeline" / f"rank-{rank}.jsonl")
        begins = [r["phase"] for r in records if r["kind"] == "phase_begin"]
        assert "model_build" in begins and "zero_init" not in begins
        last_step = len(begins) - 1 - begins[::-1].index("step")
        assert begins.index("checkpoint_save") > last_step
        assert begins.index("checkpoint_load") > begins.index("checkpoint_save")
    assert list((run_dir / "checkpoint").rglob("*optim_states.pt")), "each rank wrote its optimizer shard"
    # the save and the resume are phases of their own, so stacks=auto captured them
    assert {"checkpoint_save", "checkpoint_load"} <= {p.stem.split("-", 3)[-1] for p in (run_dir / "stacks").glob("host-rank-0-*.json")}


def test_categorised_memory_is_exact(cpu_run):
    """ZeRO-3, bf16, 2 ranks: each rank holds half the parameters in bf16, the fp32 master
    and both Adam moments of its half; activations at least the fp32 attention scores."""
    _, run_dir = cpu_run
    spec = json.loads((run_dir / "run.json").read_text())
    n, world = spec["num_parameters"], spec["world_size"]
    model = spec["config"]["model"]
    seq = spec["config"]["seq_len"]
    records = read_jsonl(run_dir / "timeline" / "rank-0.jsonl")
    memory = [r for r in records if r["kind"] == "memory"]
    assert [m["phase"] for m in memory[:3]] == ["forward", "backward", "step"]
    after_step = [m for m in memory if m["phase"] == "step"][-1]
    share = n / world
    assert share * 2 <= after_step["parameters_bytes"] <= share * 2 * 1.01  # bf16 + alignment
    assert after_step["optimizer_master_bytes"] == 2 * after_step["parameters_bytes"]
    assert after_step["optimizer_exp_avg_bytes"] == after_step["optimizer_master_bytes"]
    assert after_step["optimizer_exp_avg_sq_bytes"] == after_step["optimizer_master_bytes"]
    forward = [m for m in memory if m["phase"] == "forward"][-1]
    scores = model["num_attention_heads"] * seq * seq * 4 * model["num_hidden_layers"]
    assert forward["activations_bytes"] >= scores
    assert all(m["activations_bytes"] == 0 for m in memory if m["phase"] == "backward")
    counted = sum(v for k, v in after_step.items() if k.endswith("_bytes") and k not in ("allocator_bytes", "other_bytes"))
    assert counted + after_step["other_bytes"] == after_step["allocator_bytes"]


def test_forward_and_backward_peaks_name_their_layer(cpu_run):
    _, run_dir = cpu_run
    records = read_jsonl(run_dir / "timeline" / "rank-1.jsonl")
    ends = [r for r in records if r["kind"] == "phase_end" and r["phase"] in ("forward", "backward")]
    layers = {f"model.layers.{i}" for i in range(4)} | {"model.embed_tokens", "lm_head", "model.norm"}
    for end in ends:
        assert end["host_peak_module"] in layers | {"(root)", "model", "(outside layers)"}
        assert layers <= set(end["module_host_peaks"])
        assert max(end["module_host_peaks"].values()) == end["host_peak_bytes"]
    begins = [r["phase"] for r in records if r["kind"] == "phase_begin"]
    assert "optimizer_step" in begins


def test_node_watcher_saw_both_ranks_with_pss(cpu_run):
    _, run_dir = cpu_run
    (node_file,) = (run_dir / "timeline").glob("node-*.jsonl")
    samples = [r for r in read_jsonl(node_file) if r["kind"] == "sample"]
    with_both = [s for s in samples if set(s["ranks"]) == {"0", "1"}]
    assert len(with_both) > 10
    assert any("pss_bytes" in s["ranks"]["0"] for s in with_both)
    summary = json.loads((run_dir / "summary.json").read_text())
    watcher = next(iter(summary["node_watcher"].values()))
    assert 0 < watcher["pss_sum_peak_bytes"] <= watcher["rss_sum_peak_bytes"]
    html = (run_dir / "report.html").read_text()
    assert "host RAM stacked by rank" in html and "Categorised memory" in html
    assert "Peak host memory by layer" in html


def test_plan_predicts_the_measured_model_states_and_activations(cpu_run):
    """The planner's terms against this run's categorised memory: states exact, activations
    within 2% (the formula counts what saved_tensors_hooks count)."""
    _, run_dir = cpu_run
    sys.path.insert(0, str(REPO))
    from memdiag.plan.calibrate import observe, predict
    from memdiag.plan.terms import Coefficients
    from memdiag.timeline import read_run

    obs = observe(read_run(run_dir))
    predicted = predict(obs, Coefficients())
    for term in ("parameters", "gradients", "optimizer_states"):
        assert abs(predicted[term] - obs.measured[term]) / obs.measured[term] < 0.01, term
    assert abs(predicted["saved_activations"] - obs.measured["saved_activations"]) / obs.measured["saved_activations"] < 0.02


def test_the_run_path_visits_each_launch_module_at_most_twice(tmp_path):
    """`memdiag run` decides once where a run goes: followed from the CLI to the ranks, the
    path enters memdiag.runs, memdiag.launch and memdiag.multinode at most twice each."""
    import json

    script = Path(__file__).parent / "scripts" / "trace_launch_path.py"
    result = subprocess.run(
        [sys.executable, str(script), f"reports_dir={tmp_path}", "steps=1", "seq_len=64", "nproc_per_node=1"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    visits = json.loads(result.stdout.split("VISITS ", 1)[1])
    assert "memdiag.launch" in visits and "memdiag.runs" in visits
    for module in set(visits):
        assert visits.count(module) <= 2, visits


def test_sampler_watcher_leaves_the_ranks_without_a_thread_and_reads_alike(tmp_path):
    """The default, sampler=watcher, on the real case: no samples in the rank files (no sampler
    thread ran there), the node watcher's rank_samples stand in for them, phases and steps joined,
    and the checks and the report read the run as any other. The watcher keeps the budget: past
    sample.full_rate_s of the loop, each window keeps its bounds, for the ranks and the node."""
    import os

    import numpy as np

    from memdiag.timeline import read_run

    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-m", "memdiag", "run", "steps=24", "seq_len=64", "sample.full_rate_s=0.5",
                             "sample.steady_interval_s=0.5", f"reports_dir={tmp_path}"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=900, env=os.environ | {"PYTHONPATH": str(repo)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run_dir,) = (tmp_path / "baichuan2_13b").iterdir()
    for rank in (0, 1):
        kinds = {json.loads(line)["kind"] for line in (run_dir / "timeline" / f"rank-{rank}.jsonl").read_text().splitlines()}
        assert "samples" not in kinds and "sample" not in kinds and "phase_end" in kinds
    node = next((run_dir / "timeline").glob("node-*.jsonl")).read_text()
    assert '"kind":"rank_samples"' in node.replace(" ", "")
    run = read_run(run_dir)
    for timeline in run.ranks.values():
        assert timeline.header["sampler"] == "watcher"
        assert len(timeline.t_ns) > 50 and {"forward", "backward"} <= set(timeline.sample_phase)
        assert timeline.sample_step.max() >= 23
        exact = max(p.host_peak_bytes for p in timeline.phases if p.host_peak_bytes)  # VmHWM, read in the rank
        assert 0.5 * exact < np.nanmax(timeline.columns["rss_bytes"]) <= 1.05 * exact
        # the loop from 1 s past its first step (full_rate_s, and the watcher's view of the rank a
        # moment behind) to its last: each 0.5 s window keeps its highest and lowest (100 Hz: 50 ticks)
        steps = [s["t"] for s in timeline.steps]
        start, end = min(steps) + 1e9, max(steps)
        windows = (end - start) / 0.5e9
        assert windows > 2, "the loop was too short to reach the steady state"
        steady = int(((timeline.t_ns > start) & (timeline.t_ns < end)).sum())
        assert steady <= 3 * (windows + 1), (steady, windows)
        (node_timeline,) = run.nodes.values()
        kept = int(((node_timeline.t_ns > start) & (node_timeline.t_ns < end)).sum())  # 10 Hz: 5 a window
        assert kept <= 4 * (windows + 1), (kept, windows)
    assert "memdiag: done. loss" in result.stdout and (run_dir / "report.html").stat().st_size > 0
