"""Launch commands read as literal text: the launcher's layout and a Trainer script's arguments."""

import json
import shlex

import pytest

from memdiag import launchcmd
from memdiag.errors import UsageError


def read(text: str) -> launchcmd.Launch:
    return launchcmd.read(shlex.split(text))


@pytest.mark.parametrize("text, layout", [
    ("torchrun --nnodes 2 --nproc_per_node 8 train.py", "2x8"),
    ("torchrun --nnodes=4 --nproc-per-node=8 --rdzv-backend=c10d train.py --bf16", "4x8"),
    ("torchrun --nnodes 1:2 --nproc_per_node 4 -m my.train", "2x4"),
    ("python -m torch.distributed.run --nproc_per_node 2 train.py", "1x2"),
    ("deepspeed --num_gpus 8 --num_nodes 2 train.py --deepspeed ds.json", "2x8"),
    ("accelerate launch --num_machines 2 --num_processes 16 train.py", "2x8"),
    ("python train.py --bf16", "1x1"),
])
def test_the_launchers_layout(text, layout):
    assert f"layout={layout}" in read(text).tokens


def test_a_hostfile_gives_the_deepspeed_launchers_nodes(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode-a slots=4\nnode-b slots=4\n")
    assert "layout=2x4" in read(f"deepspeed --hostfile {hostfile} train.py").tokens


def test_a_trainer_scripts_arguments_become_settings(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    for i in range(2):
        (model / f"model-0000{i + 1}-of-00002.safetensors").write_bytes(b"")
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 3}}))
    launch = read(
        f"torchrun --nproc_per_node 8 train.py --model_name_or_path {model} --deepspeed {ds} --per_device_train_batch_size 2 "
        "--gradient_accumulation_steps=4 --bf16 True --gradient_checkpointing --cutoff_len 1024 --output_dir out "
        "--attn_implementation flash_attention_2 --resume_from_checkpoint ckpt"
    )
    assert launch.tokens == [
        "layout=1x8", f"ds_config={ds}", "micro_batch=2", "grad_accum=4", "dtype=bf16", "activation_checkpointing=true",
        "seq_len=1024", "attention=fused", "load=zero_init", "checkpoint_format=safetensors", "checkpoint_shards=2", "resume=true", "save=true",
    ]
    assert launch.model_dir == model and launch.gaps == []


@pytest.mark.parametrize("args, save", [
    ("--output_dir out", "save=true"),  # TrainingArguments: save_strategy "steps", every 500
    ("--output_dir out --save_strategy no", "save=false"),
    ("--output_dir out --save_strategy=epoch", "save=true"),
    ("--save_steps 200", "save=true"),
    ("--bf16", None),  # not a Trainer's arguments: nothing said about saving
])
def test_whether_the_run_saves_is_read_from_the_trainers_arguments(args, save):
    tokens = [t for t in read(f"torchrun --nproc_per_node 8 train.py {args}").tokens if t.startswith("save=")]
    assert tokens == ([save] if save else [])


def test_what_a_trainer_leaves_out_is_its_default_and_what_cannot_be_read_is_named():
    launch = read("torchrun --nproc_per_node gpu train.py --output_dir out --use_liger_kernel")
    assert "micro_batch=8" in launch.tokens and "grad_accum=1" in launch.tokens  # TrainingArguments' defaults
    gaps = " | ".join(launch.gaps)
    assert "--nproc_per_node gpu" in gaps and "give --layout" in gaps
    assert "seq_len=N" in gaps and "--model-config" in gaps
    assert "fused_cross_entropy=true" in launch.tokens  # Liger's fused linear cross-entropy
    assert not any(t.startswith("layout=") for t in launch.tokens)


def test_a_ds_config_the_command_contradicts_is_refused(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text('{"train_micro_batch_size_per_gpu": 4}')
    with pytest.raises(UsageError, match=r"train_micro_batch_size_per_gpu=4 but the command's --per_device_train_batch_size is 2"):
        read(f"torchrun --nproc_per_node 8 train.py --deepspeed {ds} --per_device_train_batch_size 2")


def test_an_empty_command_is_one_line():
    with pytest.raises(UsageError, match="give the launch command after --"):
        launchcmd.read([])


@pytest.mark.parametrize("text, gap", [
    ("torchrun --nproc_per_node abc train.py", "--nproc_per_node 'abc': not a whole number"),
    ("torchrun --nnodes x:y --nproc_per_node 2 train.py", "--nnodes 'y'"),
    ("deepspeed --num_gpus 0 train.py", "--num_gpus 0: not a positive count"),
    ("torchrun --nproc_per_node 8 train.py --per_device_train_batch_size lots", "give micro_batch=N"),
    ("torchrun --nproc_per_node 8 train.py --max_seq_length long", "give seq_len=N"),
])
def test_a_value_that_cannot_be_read_is_a_named_gap_not_an_error(text, gap):
    launch = read(text)
    assert any(gap in g for g in launch.gaps), launch.gaps


ACCELERATE_DS = """compute_environment: LOCAL_MACHINE
deepspeed_config:
  gradient_accumulation_steps: 4
  offload_optimizer_device: cpu
  offload_param_device: none
  zero3_init_flag: true
  zero3_save_16bit_model: true
  zero_stage: 3
distributed_type: DEEPSPEED
machine_rank: 0
mixed_precision: bf16
num_machines: 2
num_processes: 16
"""


def test_accelerates_config_file_gives_the_layout_and_its_deepspeed_plugin(tmp_path):
    config = tmp_path / "ds_z3.yaml"
    config.write_text(ACCELERATE_DS)
    launch = read(f"accelerate launch --config_file {config} train.py --output_dir out --save_strategy no")
    assert launch.tokens[:7] == ["layout=2x8", "dtype=bf16", "zero.stage=3", "offload=optimizer", "grad_accum=4", "load=zero_init",
                                 "save_16bit_weights=true"]
    assert f"accelerate config {config}" in launch.read


def test_accelerates_flags_win_over_its_config_file_and_bare_flags_keep_the_script(tmp_path):
    config = tmp_path / "ds_z3.yaml"
    config.write_text(ACCELERATE_DS)
    launch = read(f"accelerate launch --config_file {config} --use_deepspeed --num_processes 8 --num_machines 1 "
                  "--zero_stage 2 --offload_optimizer_device none train.py --fp16")
    assert "layout=1x8" in launch.tokens and "zero.stage=2" in launch.tokens and "offload=none" in launch.tokens
    assert launch.tokens[-1] == "dtype=fp16"  # the script's own argument, read after --use_deepspeed


def test_accelerates_named_ds_config_decides_and_its_default_file_is_read(tmp_path, monkeypatch):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    default = tmp_path / "hf" / "accelerate" / "default_config.yaml"
    default.parent.mkdir(parents=True)
    default.write_text(f"distributed_type: DEEPSPEED\nnum_processes: 4\ndeepspeed_config:\n  deepspeed_config_file: {ds}\n")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    launch = read("accelerate launch train.py")
    assert launch.tokens[:2] == ["layout=1x4", f"ds_config={ds}"]


def test_an_accelerate_config_that_is_not_yaml_is_a_named_gap(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("num_processes: [8\n")
    launch = read(f"accelerate launch --config_file {config} train.py")
    assert any("not readable YAML" in gap for gap in launch.gaps)
    assert not any(t.startswith("layout=") for t in launch.tokens)
