"""The planner: exact parameter counts, the seed's decision, the DeepSpeed cross-check, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cases.baichuan2_13b.modeling_baichuan import BaichuanConfig, count_parameters
from memdiag.cli import main as cli_main
from memdiag.commands.plan import parse_layout, parse_range
from memdiag.settings import PLAN, parse
from memdiag.errors import UsageError
from memdiag.plan.model import Architecture
from memdiag.plan.terms import Coefficients, Settings, forward_saved_bytes

REPO = Path(__file__).resolve().parents[2]
B13 = dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, intermediate_size=13696, vocab_size=125696)


def plan_json(*args):
    result = subprocess.run(
        [sys.executable, "-m", "memdiag", "plan", "--json", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_architecture_counts_match_the_model():
    arch = Architecture.from_case_model(B13)
    assert arch.num_parameters == count_parameters(BaichuanConfig(**B13))


def test_hf_config_json(tmp_path):
    cfg = dict(B13, num_key_value_heads=8, tie_word_embeddings=True, architectures=["LlamaForCausalLM"], model_type="llama")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    arch = Architecture.from_hf_config(path)
    assert arch.num_kv_heads == 8 and arch.tied_embeddings
    assert arch.facts.tied_parameters == B13["vocab_size"] * B13["hidden_size"]
    assert arch.num_parameters < Architecture.from_case_model(B13).num_parameters  # GQA + tied


@pytest.mark.parametrize("seq_len, layers", [(128, 2), (256, 4)])
def test_activation_terms_equal_the_saved_bytes_measured(seq_len, layers):
    """The formula against what saved_tensors_hooks count on our model in bf16."""
    import torch

    from cases.baichuan2_13b.modeling_baichuan import BaichuanForCausalLM
    from memdiag.categories import SavedTensorCounter

    cfg = dict(hidden_size=256, num_hidden_layers=layers, num_attention_heads=8, intermediate_size=688, vocab_size=4096)
    model = BaichuanForCausalLM(BaichuanConfig(**cfg)).to(torch.bfloat16)
    ids = torch.randint(0, 4096, (1, seq_len))
    counter = SavedTensorCounter()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        model(ids, labels=ids)
    arch = Architecture.from_case_model(cfg)
    predicted = forward_saved_bytes(arch, Settings(seq_len=seq_len), Coefficients())
    assert abs(predicted - counter.total_bytes) / counter.total_bytes < 0.02


def test_reference_loading_reproduces_the_seed_host_decision():
    data = plan_json("--host-ram", "500G")
    layouts = {(l["nodes"], l["devices_per_node"]): l for l in data["layouts"]}
    one_node = layouts[(1, 16)]  # one node of 8 BI-V150 cards (2 devices each)
    two_nodes = layouts[(2, 8)]  # 2 nodes x 4 cards
    assert one_node["host_peak_bytes_per_node"] > 500 * 2**30
    assert two_nodes["host_peak_bytes_per_node"] <= 500 * 2**30
    assert one_node["terms"]["host_load.model_full_copy_per_rank"] == 16 * 4 * one_node_params(data)
    zero_init = next(f for f in data["fixes_for_full_node"] if f["change"] == "load=zero_init")
    # lean loading leaves resuming (every rank reads its 12 B/param optimizer shard) the binding phase
    assert zero_init["host_peak_bytes_per_node"] < 250 * 2**30
    # with the benchmark's attention path the device side agrees: 2 nodes x 4 cards is the choice
    assert not one_node["fits"] and two_nodes["fits"] and zero_init["fits"]
    assert (data["recommended"]["nodes"], data["recommended"]["devices_per_node"]) == (2, 8)
    assert abs(data["measured"]["error"]) < 0.10  # against the seed's 56.59 GiB


def test_sdpa_math_keeps_one_score_tensor():
    """The ``sdpa_math`` coefficient: SDPA's math path with a float (ALiBi) mask saves one
    s x s tensor per head (the softmax output), where our plain attention saves two. (On the
    CPU the math path computes in fp32; on a device it stays bf16: 2 bytes an element.)"""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, a, seq, d = 1, 4, 256, 32
    q, k, v = (torch.randn(b, a, seq, d, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    mask = torch.randn(a, seq, seq, dtype=torch.bfloat16)

    def square_storages(attend) -> int:
        storages = set()

        def pack(t):
            if tuple(t.shape[-2:]) == (seq, seq):
                storages.add(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            attend()
        return len(storages)

    with sdpa_kernel(SDPBackend.MATH):
        assert square_storages(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)) == 1

    def plain():  # the upstream no-xformers path, as our model implements it
        scores = torch.matmul(q, k.transpose(2, 3)) / d**0.5 + mask
        scores = torch.max(scores, torch.tensor(torch.finfo(scores.dtype).min))
        return torch.matmul(torch.softmax(scores, dim=-1), v)

    assert square_storages(plain) == 2
    c = Coefficients()
    assert (c.layer_as2b, c.layer_as2b_sdpa_math) == (2 * 2, 1 * 2)  # tensors x bf16 bytes


def one_node_params(data):
    return data["model"]["num_parameters"]


def test_deepspeed_cross_check_is_exact():
    data = plan_json("--host-ram", "500G", "--layout", "2x8")
    ds = data["deepspeed_estimate"]
    assert abs(ds["memdiag_plus_explained_bytes"] - ds["device_bytes"]) <= 2


def test_zero_stage_and_offload_move_the_terms():
    base = plan_json("--host-ram", "2T", "--layout", "1x8")["layouts"][0]["terms"]
    stage2 = plan_json("--host-ram", "2T", "--layout", "1x8", "zero.stage=2")["layouts"][0]["terms"]
    assert stage2["device.parameters"] == 8 * base["device.parameters"]
    offload = plan_json("--host-ram", "2T", "--layout", "1x8", "offload=optimizer")["layouts"][0]["terms"]
    assert offload["device.optimizer_states"] == 0
    # DeepSpeed's layout on the host: fp32 master + both moments = the device's optimizer states
    master_and_moments = offload["host_steady.offloaded_fp32_master"] + offload["host_steady.offloaded_adam_moments"]
    assert master_and_moments == pytest.approx(8 * base["device.optimizer_states"], rel=1e-6)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--host-ram", "500X"], "'500X'"),
        (["--host-ram=-5G"], "negative"),
        (["--profile", "tpu"], "available"),
        (["--case", "llama"], "available"),
        (["--layout", "1x32"], "the profile has 16"),
        (["--layout", "two"], "NODESxDEVICES"),
        (["seq_lenn=4"], "seq_len"),
        (["offload=gpu"], "optimizer"),
    ],
)
def test_bad_plan_input_is_one_line_and_exit_2(capsys, argv, needle):
    assert cli_main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_the_cases_maximum_length_is_not_another_models(tmp_path, capsys):
    # Qwen2.5-7B-Instruct's shapes at 8k tokens: the case's Baichuan stops at 4096, this model does not
    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 256, "intermediate_size": 512,
           "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 1024,
           "max_position_embeddings": 32768, "tie_word_embeddings": False}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    result = subprocess.run(
        [sys.executable, "-m", "memdiag", "plan", "--json", "--host-ram", "1T", "--device-mem", "80G", "--model-config", str(path),
         "seq_len=8192", "activation_checkpointing=true"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "MEMDIAG_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["settings"]["seq_len"] == 8192
    assert "use_cache" not in result.stderr  # transformers' advice to a training run is not printed by the count
    assert cli_main(["plan", "--host-ram", "1T", "seq_len=8192"]) == 2  # the case's own model is held to it
    assert "model.model_max_length=4096" in capsys.readouterr().err


def test_a_users_model_on_auto_attention_is_counted_on_the_path_transformers_picks(tmp_path):
    # Qwen2 supports SDPA: attention=auto plans what attention=fused plans, the step counted on it
    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 256, "intermediate_size": 512,
           "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 1024,
           "max_position_embeddings": 32768, "tie_word_embeddings": False}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    common = ["--host-ram", "1T", "--device-mem", "80G", "--model-config", str(path), "--layout", "1x8", "seq_len=2048"]
    auto, fused = plan_json(*common), plan_json(*common, "attention=fused")
    assert auto["settings"]["attention"] == "fused"
    assert auto["layouts"][0]["terms"] == fused["layouts"][0]["terms"]


def test_parsers():
    assert parse_range("1-4", "--nodes") == [1, 2, 3, 4]
    assert parse_layout("2x8", 16) == (2, 8)
    with pytest.raises(UsageError):
        parse_range("4-1", "--nodes")
    values, groups = parse(["flash_attn=true", "seq_len=4096", "model.scale=small"], PLAN)
    assert values == {"attention": "fused", "seq_len": 4096} and groups == ["model.scale=small"]


def test_emit_writes_a_hostfile_config_and_scripts(tmp_path):
    out = tmp_path / "emit"
    assert cli_main(["plan", "--host-ram", "500G", "--layout", "2x8", "--emit", str(out), "load=zero_init"]) == 0
    assert (out / "hostfile").read_text() == "node0 slots=8\nnode1 slots=8\n"
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3
    for script in ("launch_deepspeed.sh", "launch_torchrun.sh"):
        text = (out / script).read_text()
        assert "memdiag run --" in text and subprocess.run(["bash", "-n", str(out / script)]).returncode == 0


def test_calibration_recovers_known_host_coefficients():
    """Runs whose host peaks follow known coefficients: the fit finds them again, and a
    coefficient that would come out negative is dropped rather than fitted below zero."""
    from dataclasses import replace

    from memdiag.plan.calibrate import Observation, fit, predict

    truth = replace(Coefficients(), host_runtime_bytes=300 * 2**20, host_state_factor=1.7,
                    host_bytes_per_model_param=6.0, host_rank_fixed_bytes=150 * 2**20)
    observations = []
    for hidden, layers in ((256, 2), (512, 4), (768, 6)):
        arch = Architecture.from_case_model(dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
                                                 intermediate_size=hidden * 3, vocab_size=8192))
        for ranks in (1, 2, 4):
            obs = Observation("x", arch, Settings(seq_len=128, load="zero_init", checkpoint_format="none"), ranks, ranks, {})
            predicted = predict(obs, truth)
            observations.append(replace(obs, measured={"runtime_base_per_rank": truth.host_runtime_bytes,
                                                       "host_peak_per_node": predicted["host_peak_per_node"]}))
    fitted = fit(observations, Coefficients())
    assert fitted.host_state_factor == pytest.approx(1.7, rel=1e-6)
    assert fitted.host_bytes_per_model_param == pytest.approx(6.0, rel=1e-6)
    assert fitted.host_rank_fixed_bytes == pytest.approx(150 * 2**20, rel=1e-6)
    no_fixed = [replace(o, measured=o.measured | {"host_peak_per_node": o.measured["host_peak_per_node"] - o.local_ranks * 400 * 2**20})
                for o in observations]
    assert fit(no_fixed, Coefficients()).host_rank_fixed_bytes == 0.0
