"""Adam's temporaries during the optimizer step: torch's real AdamW measured on this machine,
how a run's optimizer is resolved (the case's own, a ds_config's section, a Trainer's --optim),
and the step peak the planner adds for it."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from memdiag import launchcmd
from memdiag.config import compose
from memdiag.plan.inputs import for_run, optimizer_path
from memdiag.plan.model import Architecture
from memdiag.plan.terms import OPTIMIZER_STEP_TEMPORARIES, Coefficients, Settings, device_terms
from memdiag.settings import PLAN, RunSettings

from bench import optimizer_temporaries as bench_module  # the benchmark's own measurement, run here

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kind", sorted(OPTIMIZER_STEP_TEMPORARIES))
def test_torchs_adamw_allocates_the_temporaries_memdiag_counts(kind):
    # 25M fp32 elements (100 MB): far above glibc's mmap threshold, so each temporary is in the RSS peak
    measured = bench_module.step_temporaries(kind, 25_000_000, "cpu")
    assert measured == pytest.approx(OPTIMIZER_STEP_TEMPORARIES[kind], abs=0.15)


@pytest.mark.parametrize("ds, own, accelerator, expected", [
    ({"optimizer": {"type": "AdamW"}}, None, "cuda", "fused"),  # DeepSpeed's FusedAdam
    ({"optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}, None, "cuda", "torch_foreach"),
    ({"optimizer": {"type": "AdamW", "params": {"torch_adam": True, "foreach": False}}}, None, "cuda", "torch_for_loop"),
    ({}, None, "cuda", "fused"),  # no section: the HF Trainer's default optim, adamw_torch_fused
    ({"optimizer": {"type": "AdamW"}}, "torch_default", "cuda", "torch_foreach"),  # the case's own AdamW
    ({"optimizer": {"type": "AdamW"}}, "torch_default", "cpu", "torch_for_loop"),
])
def test_the_runs_optimizer_is_resolved_from_who_builds_it(ds, own, accelerator, expected):
    assert optimizer_path(RunSettings(), ds, own=own, accelerator=accelerator) == expected
    assert optimizer_path(RunSettings(optimizer="fused"), ds, own=own, accelerator=accelerator) == "fused"


def test_the_case_is_planned_with_its_own_optimizer_and_a_setting_wins():
    _, on_gpu = for_run(compose(["hardware=h200", "model.scale=small"], command=PLAN, detect_accelerator=False))
    _, fused = for_run(compose(["hardware=h200", "model.scale=small", "optimizer=fused"], command=PLAN, detect_accelerator=False))
    assert (on_gpu.optimizer, fused.optimizer) == ("torch_foreach", "fused")


def test_a_trainers_optim_becomes_the_setting_unless_the_ds_config_names_one(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    read = lambda extra: launchcmd.read(shlex.split(f"torchrun --nproc_per_node 8 train.py --deepspeed {ds} {extra}"))  # noqa: E731
    assert "optimizer=torch_foreach" in read("--optim adamw_torch").tokens
    assert "optimizer=fused" in read("--optim adamw_torch_fused").tokens
    assert any("--optim adafactor" in gap for gap in read("--optim adafactor").gaps)
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW"}}))
    assert not any(t.startswith("optimizer=") for t in read("--optim adamw_torch").tokens)


def test_the_step_peak_counts_one_fp32_partition_per_temporary_above_the_activations():
    # one rank, a model whose sub-group is far larger than its activations: the step binds
    arch = Architecture.for_case("baichuan2_13b", {"scale": "small", "vocab_size": 125696, "hidden_size": 2048,
                                                   "intermediate_size": 5504, "num_hidden_layers": 12,
                                                   "num_attention_heads": 16, "model_max_length": 4096,
                                                   "rms_norm_eps": 1e-6}, dtype="bf16", attention="plain")
    sub_group = 8e8
    steps = {}
    for kind in OPTIMIZER_STEP_TEMPORARIES:
        s = Settings(seq_len=128, optimizer=kind, ds_buffers={"sub_group_size": sub_group})
        steps[kind] = device_terms(arch, s, world=1, c=Coefficients())["step_fp32_grads_above_backward"]
    # each temporary is one more fp32 copy of the sub-group; the activations it replaces are the same
    assert steps["torch_foreach"] - steps["fused"] == pytest.approx(4 * sub_group)
    assert steps["torch_for_loop"] - steps["torch_foreach"] == pytest.approx(4 * sub_group)


def test_a_fused_linear_cross_entropy_keeps_no_logits():
    from memdiag.plan.terms import activation_terms, fused_linear_ce_bytes

    arch = Architecture(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, intermediate_size=14336, vocab_size=128256)
    plain = activation_terms(arch, Settings(seq_len=8192, attention="fused"), Coefficients())
    fused = activation_terms(arch, Settings(seq_len=8192, attention="fused", fused_cross_entropy=True), Coefficients())
    assert "logits_and_loss" not in fused and fused["activations"] == plain["activations"]
    # Liger's chunk: next_power_of_2(8192 rows / ceil(128256 / 4096) = 32) = 256 rows of logits at a time
    assert fused["fused_linear_cross_entropy"] == 2 * (2 * 8192 * 4096 + 128256 * 4096 + 256 * 128256)
    assert fused_linear_ce_bytes(8192, 4096, 128256, 2) < plain["logits_and_loss"] / 2
    assert sum(fused.values()) < sum(plain.values())  # no logits gradient in the backward either


def test_dataloader_workers_are_planned_per_rank_from_the_command_or_the_settings(tmp_path):
    from memdiag.plan.terms import host_terms, worker_copied_bytes

    arch = Architecture(hidden_size=1024, num_layers=4, num_heads=8, num_kv_heads=8, intermediate_size=2816, vocab_size=32000)
    c = Coefficients()
    s = Settings(dataloader_workers=4, dataloader_dataset_bytes=2 * 2**30)
    _, steady = host_terms(arch, s, local_ranks=8, world=16, runtime_context_bytes=0, cpu_accelerator=False, c=c)
    assert steady["dataloader_workers"] == 8 * 4 * (c.host_dataloader_worker_bytes + 2 * 2**30)
    _, none = host_terms(arch, Settings(), local_ranks=8, world=16, runtime_context_bytes=0, cpu_accelerator=False, c=c)
    assert "dataloader_workers" not in none
    # one epoch: each of 4 workers read a quarter; the long run: all of it
    assert worker_copied_bytes(100.0, 4, 1) == pytest.approx(25.0) and worker_copied_bytes(100.0, 4) == 100.0
    launch = launchcmd.read(shlex.split("torchrun --nproc_per_node 8 train.py --output_dir o --dataloader_num_workers 4"))
    assert "dataloader.num_workers=4" in launch.tokens and any("dataloader.dataset_bytes" in g for g in launch.gaps)
