"""A user's ds_config read as it is: the settings it decides, HF's "auto" values filled as the
HF Trainer fills them (checked against transformers' own HfTrainerDeepSpeedConfig), and its ZeRO
section checked by the installed DeepSpeed."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from memdiag import dsconfig
from memdiag.config import compose, load_ds_config
from memdiag.errors import UsageError
from memdiag.settings import PLAN

REPO = Path(__file__).resolve().parents[2]

HF_Z3_OFFLOAD = (Path(__file__).resolve().parents[1] / "data" / "ds_z3_offload_hf.json").read_text()
"""The shape of transformers' and LLaMA-Factory's examples/deepspeed/ds_z3_offload_config.json."""


def test_the_settings_a_plain_ds_config_decides_are_read_from_it(tmp_path):
    text = '{"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 8, "zero_optimization": {"stage": 2}, "fp16": {"enabled": true}}'
    assert dsconfig.settings_from(json.loads(text), "ds.json", given=set()) == {
        "micro_batch": 4, "grad_accum": 8, "zero_stage": 2, "dtype": "fp16"}
    # what the user gave as keys wins, and is not read
    assert dsconfig.settings_from(json.loads(text), "ds.json", given={"micro_batch"}) == {"grad_accum": 8, "zero_stage": 2, "dtype": "fp16"}
    # neither precision section enabled: DeepSpeed trains in fp32 (its bf16/fp16 "enabled" default false)
    assert dsconfig.settings_from({"bf16": {}}, "ds.json", given=set())["dtype"] == "fp32"


@pytest.mark.parametrize("given, needle", [
    (set(), 'train_micro_batch_size_per_gpu is "auto" .*--per_device_train_batch_size.*give micro_batch='),
    ({"micro_batch"}, 'gradient_accumulation_steps is "auto" .*give grad_accum='),
    ({"micro_batch", "grad_accum"}, r'bf16.enabled is "auto" .*--bf16 / --fp16.*give dtype='),
])
def test_an_auto_value_nothing_fills_is_refused_naming_the_key(given, needle):
    with pytest.raises(UsageError, match=needle):
        dsconfig.settings_from(json.loads(HF_Z3_OFFLOAD), "ds.json", given=given)


def test_auto_values_are_filled_as_the_hf_trainer_fills_them():
    """memdiag's fill against transformers' HfTrainerDeepSpeedConfig on the same arguments."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    hidden, micro, accum, world = 5120, 2, 4, 16
    ours = dsconfig.fill_auto(json.loads(HF_Z3_OFFLOAD), micro_batch=micro, grad_accum=accum, dtype="bf16",
                              hidden_size=hidden, world_size=world)
    args = SimpleNamespace(  # TrainingArguments' fields the fill reads, at their defaults but these
        world_size=world, per_device_train_batch_size=micro, gradient_accumulation_steps=accum, max_grad_norm=1.0,
        learning_rate=5e-5, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0, save_on_each_node=False,
        fp16=False, fp16_full_eval=False, bf16=True, bf16_full_eval=False, get_warmup_steps=lambda n: 0,
    )
    theirs = HfTrainerDeepSpeedConfig(json.loads(HF_Z3_OFFLOAD))
    theirs.trainer_config_process(args)
    theirs.trainer_config_finalize(args, SimpleNamespace(config=SimpleNamespace(hidden_size=hidden)), num_training_steps=10)
    assert ours == theirs.config
    assert dsconfig.still_auto(ours) == []


def test_a_users_ds_config_plans_as_the_equivalent_keys(tmp_path, monkeypatch):
    """ds_config=FILE (relative to where the user stands) gives the settings it decides and its
    ZeRO section; planning it equals planning the case with the same keys."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ds.json").write_text(HF_Z3_OFFLOAD)
    users = compose(["ds_config=ds.json", "micro_batch=2", "grad_accum=4", "dtype=bf16"], command=PLAN, detect_accelerator=False)
    assert users.ds_config_is_users and users.ds_config == str(tmp_path / "ds.json")
    keys = compose(["micro_batch=2", "grad_accum=4", "offload=params", "pin_memory=true", "save_16bit_weights=true"],
                   command=PLAN, detect_accelerator=False)
    from memdiag.plan.inputs import for_run

    (_, planned), (_, by_keys) = for_run(users), for_run(keys)
    assert (planned.offload, planned.pin_memory, planned.save_16bit_weights) == ("params", True, True)
    for field in ("zero_stage", "micro_batch", "grad_accum", "dtype", "offload", "pin_memory", "save_16bit_weights"):
        assert getattr(planned, field) == getattr(by_keys, field), field
    zero = load_ds_config(users)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 5120 * 5120  # "auto": the case model's hidden size squared


def test_a_zero_section_the_installed_deepspeed_refuses_is_one_line(tmp_path):
    bad = json.loads(HF_Z3_OFFLOAD)
    bad["zero_optimization"]["stage3_prefetch_bucket"] = 5e7  # a typo of stage3_prefetch_bucket_size
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(bad))
    result = subprocess.run(
        [sys.executable, "-m", "memdiag", "plan", "--host-ram", "1T", f"ds_config={path}", "micro_batch=1", "grad_accum=1", "dtype=bf16"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "stage3_prefetch_bucket" in lines[0] and "Traceback" not in result.stderr


@pytest.mark.parametrize("text, needle", [
    ('{"zero_optimization": {', "is not JSON"),
    ("[1, 2]", "a DeepSpeed config is a JSON object"),
])
def test_a_ds_config_that_is_not_one_is_refused(tmp_path, text, needle):
    path = tmp_path / "ds.json"
    path.write_text(text)
    with pytest.raises(UsageError, match=needle):
        compose([f"ds_config={path}"], command=PLAN, detect_accelerator=False)

