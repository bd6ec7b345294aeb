"""`memdiag plan` on a user's own run: their model directory, their ds_config with HF's "auto"
values, their launch command - through --ds-config and through `plan -- CMD`, the same answer as
the equivalent keys."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HF_Z3_OFFLOAD = (REPO / "tests" / "data" / "ds_z3_offload_hf.json").read_text()

LLAMA_2_7B = {  # meta-llama/Llama-2-7b-hf's config.json
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16", "use_cache": True, "vocab_size": 32000,
}


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    (root / "Llama-2-7b-hf").mkdir()
    (root / "Llama-2-7b-hf" / "config.json").write_text(json.dumps(LLAMA_2_7B))
    for i in (1, 2):
        (root / "Llama-2-7b-hf" / f"model-0000{i}-of-00002.safetensors").write_bytes(b"")
    (root / "ds_z3_offload.json").write_text(HF_Z3_OFFLOAD)
    return root


def plan(cwd, *args):
    result = subprocess.run([sys.executable, "-m", "memdiag", "plan", "--json", "--host-ram", "1T", "--device-mem", "80G", *args],
                            cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def same(a: dict, b: dict) -> None:
    for key in ("device_used_peak_bytes", "host_peak_bytes_by_phase", "verdict", "terms"):
        assert a[key] == b[key], key


def test_the_ds_config_the_command_and_the_keys_give_one_answer(user_dir):
    settings = ["micro_batch=2", "grad_accum=4", "dtype=bf16", "activation_checkpointing=true", "seq_len=1024", "load=zero_init",
                "checkpoint_format=safetensors", "checkpoint_shards=2", "save=true"]  # a Trainer saves unless --save_strategy no
    by_file = plan(user_dir, "--model-config", "Llama-2-7b-hf", "--ds-config", "ds_z3_offload.json", "--layout", "2x8", *settings)
    by_keys = plan(user_dir, "--model-config", "Llama-2-7b-hf", "--layout", "2x8", *settings,
                   "offload=params", "pin_memory=true", "save_16bit_weights=true", "zero.stage=3")
    by_command = plan(user_dir, "--", "torchrun", "--nnodes", "2", "--nproc_per_node", "8", "train.py",
                      "--model_name_or_path", "Llama-2-7b-hf", "--deepspeed", "ds_z3_offload.json",
                      "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "4", "--bf16", "True",
                      "--gradient_checkpointing", "--max_seq_length", "1024", "--output_dir", "out")
    assert by_file["model"]["num_parameters"] == 6_738_415_616  # Llama-2-7B as published
    assert by_command["command"]["not_read"] == []
    assert by_file["ds_config"]["zero_optimization"]["reduce_bucket_size"] == 4096 * 4096  # "auto", as the Trainer fills it
    # the keys do not carry the file's buckets: compare what they share, and the file's own answer to the command's
    same(by_file["layouts"][0], by_command["command"]["layout"])
    for key in ("offload", "pin_memory", "save_16bit_weights", "micro_batch", "grad_accum", "dtype", "zero_stage", "save"):
        assert by_file["settings"][key] == by_keys["settings"][key] == by_command["settings"][key], key
    assert by_file["settings"]["attention"] == "fused"  # Llama supports SDPA: what transformers picks unasked
