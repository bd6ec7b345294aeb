"""Architecture facts counted from the model itself (meta device, FakeTensorMode), checked
against published parameter counts, against a real forward, and against the case's formula."""

import json

import pytest
import torch

from memdiag.errors import UsageError
from memdiag.plan import arch as arch_mod
from memdiag.plan.model import Architecture
from memdiag.plan.terms import Coefficients, Settings, forward_saved_bytes

B13 = dict(vocab_size=125696, hidden_size=5120, intermediate_size=13696, num_hidden_layers=40, num_attention_heads=40)

# Published totals (what transformers' num_parameters() reports for the released checkpoints,
# also quoted in their model cards and papers: Llama-2-7B 6.74B, Mixtral-8x7B 46.7B, GPT-2 124M)
PUBLISHED = [
    ("llama-2-7b", dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32), 6_738_415_616, 0),
    ("mixtral-8x7b", dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2),
     46_702_792_704, 0),
    ("gpt2", dict(model_type="gpt2", vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024),
     124_439_808, 50257 * 768),  # GELU MLP, tied LM head
]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMDIAG_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("name, config, total, tied", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_parameter_counts_match_the_published_models(name, config, total, tied):
    facts = arch_mod.facts(config)
    assert facts.num_parameters == total
    assert facts.tied_parameters == tied


def test_moe_is_counted_from_the_model_not_the_dense_formula():
    mixtral = PUBLISHED[1][1]
    counted = arch_mod.facts(mixtral)
    formula = Architecture(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, intermediate_size=14336, vocab_size=32000)
    assert counted.num_parameters > 5 * formula.num_parameters  # 8 experts, not one MLP
    assert counted.largest_layer_params > 8 * 3 * 4096 * 14336  # a layer holds all its experts


def test_fake_forward_counts_what_a_real_forward_saves():
    """The FakeTensorMode count (nothing allocated) against saved_tensors_hooks on a real bf16
    forward of the same small Llama, at a length the fit did not use."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from memdiag.categories import SavedTensorCounter

    config = dict(model_type="llama", vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=4)
    facts = arch_mod.facts(config, attention="plain")
    torch.manual_seed(0)
    real_config = LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"})
    real_config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(real_config, dtype=torch.bfloat16).train()
    seq = 384
    ids = torch.randint(0, 2048, (1, seq))
    counter = SavedTensorCounter()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        model(input_ids=ids, labels=ids)
    predicted = 3 * facts.saved.layer(seq) + facts.saved.head(seq)
    assert abs(predicted - counter.total_bytes) / counter.total_bytes < 0.01


@pytest.mark.parametrize("attention", ["plain", "sdpa_math", "fused"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_case_counted_gives_todays_figures_within_1_percent(attention, checkpointing):
    formula = Architecture.from_case_model(B13)
    counted = Architecture.for_case("baichuan2_13b", dict(B13, scale="13b"))
    assert counted.num_parameters == formula.num_parameters and counted.name == "baichuan2 13b"
    for seq in (2048, 4096):
        s = Settings(seq_len=seq, attention=attention, activation_checkpointing=checkpointing)
        # what the forward keeps: the formula's terms are the counted ones for our model; the step's
        # peak (activation_terms) is counted through the backward too (tests/unit/test_step_peaks.py)
        a, b = forward_saved_bytes(formula, s, Coefficients()), forward_saved_bytes(counted, s, Coefficients())
        assert b == pytest.approx(a, rel=0.01)


def test_counted_facts_are_cached_per_config(tmp_path):
    config = PUBLISHED[2][1]
    first = arch_mod.facts(config)
    files = list((tmp_path / "cache" / "arch").glob("*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    data["num_parameters"] = 7  # the cache is what a second call reads
    files[0].write_text(json.dumps(data))
    assert arch_mod.facts(config).num_parameters == 7
    assert arch_mod.facts(config, dtype="fp32").num_parameters == first.num_parameters  # another key


@pytest.mark.parametrize(
    "config, needle",
    [
        ({"architectures": ["LlamaForCausalLM"], "hidden_size": 64}, "no model_type"),
        ({"model_type": "no-such-model", "hidden_size": 64}, "no-such-model"),
        ({"model_type": "llamma", "hidden_size": 64}, r"closest: llama\b"),
        ({"model_type": "internlm2", "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                                                  "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"}},
         "configuration_internlm2.py, modeling_internlm2.py, not found beside it"),
    ],
)
def test_a_config_transformers_cannot_build_is_one_clear_error(tmp_path, config, needle):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(UsageError, match=needle) as error:
        Architecture.from_hf_config(path)
    assert len(str(error.value)) < 400 and "\n" not in str(error.value)  # one line, never transformers' list of every type


BAICHUAN2_13B_CONFIG = {  # Baichuan2-13B-Base's config.json as published (its auto_map names files not here)
    "_from_model_config": True, "architectures": ["BaichuanForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig", "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
    "tokenizer_class": "BaichuanTokenizer", "bos_token_id": 1, "eos_token_id": 2, "gradient_checkpointing": False,
    "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02, "intermediate_size": 13696, "model_max_length": 4096,
    "model_type": "baichuan", "num_attention_heads": 40, "num_hidden_layers": 40, "pad_token_id": 0, "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.29.2", "use_cache": True, "vocab_size": 125696,
}


def test_a_bare_baichuan_config_is_planned_with_the_cases_model(tmp_path):
    """model_type "baichuan" is not in transformers; without its modeling files the case's own
    Baichuan class (registered for that type) counts it, to the case's exact parameters."""
    (tmp_path / "config.json").write_text(json.dumps(BAICHUAN2_13B_CONFIG))
    bare = Architecture.from_hf_config(tmp_path)
    model = {k: BAICHUAN2_13B_CONFIG[k] for k in B13} | {"scale": "13b"}
    case = Architecture.for_case("baichuan2_13b", model)
    assert bare.num_parameters == case.num_parameters == 13_896_668_160
    assert bare.largest_layer_params == case.largest_layer_params


def test_the_estimator_copy_is_deepspeeds():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs as upstream

    from memdiag.plan.estimator import estimate_zero3_model_states_mem_needs as ours

    for total, largest in ((6_738_415_616, 202_383_360), (13_896_668_160, 643_563_520), (124_439_808, 38_597_376)):
        for gpus in (1, 4, 8):
            for nodes in (1, 2):
                for offload, params in ((False, False), (True, False), (True, True)):
                    for zero_init in (True, False):
                        for factor in (1.0, 1.5):
                            args = (total, largest, gpus, nodes, offload, params, zero_init, factor)
                            assert ours(*args) == upstream(*args), args


def _layout(*args):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-m", "memdiag", "plan", "--json", *args], cwd=repo, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_offload_host_terms_follow_deepspeeds_layout_and_phases_are_named():
    """offload=optimizer: 18 B a parameter over the nodes in bf16 (fp32 master 4, moments 8, the
    masters' fp32 .grad buffers 4, the flat gradient partitions 2 in the model's dtype: the
    tensors tests/integration/test_offload_layout finds in DeepSpeed), and the retained build
    transients beside them; pinned buffers round up to powers of two; resuming reads each rank's
    12 B/param optimizer shard."""
    data = _layout("--host-ram", "2T", "--profile", "h100", "--layout", "2x8", "offload=optimizer", "load=zero_init")
    layout = data["layouts"][0]
    n = data["model"]["num_parameters"]
    terms = layout["terms"]
    offload = sum(v for k, v in terms.items() if k.startswith("host_steady.offloaded_"))
    assert offload == pytest.approx(18 * n / 2, rel=1e-6)
    retained = Coefficients().host_offload_retained_bytes_per_param
    assert terms["host_steady.offload_build_transients_retained"] == pytest.approx(retained * n / 2, rel=1e-6)
    unpinned = _layout("--host-ram", "2T", "--profile", "h100", "--layout", "2x8", "offload=optimizer", "load=zero_init",
                       "pin_memory=false")["layouts"][0]["terms"]
    assert "host_steady.pinned_power_of_two_rounding" not in unpinned
    # unset, the installed DeepSpeed's own default decides (true from 0.19.5)
    assert ("host_steady.pinned_power_of_two_rounding" in terms) == _deepspeed_pins_by_default()
    assert terms["host_resume.optimizer_shard_read"] == pytest.approx(8 * 12 * n / 16, rel=1e-6)
    assert set(layout["host_peak_bytes_by_phase"]) == {"load", "initialize", "training", "save", "resume"}
    judged = {p: v for p, v in layout["host_peak_bytes_by_phase"].items() if p in layout["judged_host_phases"]}
    assert layout["binding_host_phase"] == max(judged, key=judged.get)
    pinned = _layout("--host-ram", "2T", "--profile", "h100", "--layout", "2x8", "offload=optimizer", "load=zero_init", "pin_memory=true")
    rounding = pinned["layouts"][0]["terms"]["host_steady.pinned_power_of_two_rounding"]
    assert 0 < rounding < 8 * 2 * 4 * n / 16  # each pinned buffer at most doubles
    saved = _layout("--host-ram", "2T", "--profile", "h100", "--layout", "2x8", "save_16bit_weights=true")
    assert saved["layouts"][0]["terms"]["host_save.gathered_16bit_model_rank0"] == 2 * n


def test_the_device_verdict_uses_the_used_figure_and_json_gives_both():
    data = _layout("--host-ram", "500G", "--layout", "2x8")
    layout = data["layouts"][0]
    terms = layout["terms"]
    not_tensors = terms["device.allocator_reserve"] + terms["device.runtime_context"] + terms["device.nccl_buffers"]
    assert layout["device_used_peak_bytes"] - layout["device_allocated_peak_bytes"] == pytest.approx(not_tensors, abs=4)
    assert layout["device_verdict_uses"] == "used"
    assert layout["device_used_peak_bytes"] == layout["device_peak_bytes"]


def _deepspeed_pins_by_default() -> bool:
    """Read from DeepSpeed's own offload config class, not from memdiag."""
    from deepspeed.runtime.zero.offload_config import DeepSpeedZeroOffloadOptimizerConfig

    return DeepSpeedZeroOffloadOptimizerConfig().pin_memory


def test_pin_memory_unset_is_what_the_installed_deepspeed_pins():
    from memdiag.versions import deepspeed_pin_memory_default

    assert deepspeed_pin_memory_default() == _deepspeed_pins_by_default()


def test_the_verdict_judges_the_phases_the_run_goes_through():
    """Resuming reads every optimizer shard to the host: with offload it binds. A run that never
    resumes fits and is warned; resume=true judges it."""
    base = ["--host-ram", "480G", "--layout", "1x8", "offload=optimizer", "load=zero_init"]
    plain = _layout(*base)["layouts"][0]
    peaks = plain["host_peak_bytes_by_phase"]
    assert peaks["resume"] > plain["host_limit_bytes"] > max(peaks[p] for p in ("load", "initialize", "training"))
    assert plain["judged_host_phases"] == ["load", "initialize", "training"]
    assert plain["fits"] and "with resume=true host OOM" in plain["verdict"]
    assert plain["host_peak_bytes_per_node"] == max(peaks[p] for p in plain["judged_host_phases"])
    resumed = _layout(*base, "resume=true", "save=true")["layouts"][0]
    assert resumed["judged_host_phases"] == ["load", "initialize", "training", "save", "resume"]
    assert not resumed["fits"] and resumed["binding_host_phase"] == "resume"
    assert resumed["verdict"].startswith("host OOM by")


def test_a_layout_past_the_guards_line_is_not_recommended():
    """The seed's 2x8 peaks at 425 GiB a node: under a 440G limit it fits the limit but passes
    the guard's 95% line, where memdiag run would stop it; without the guard it fits."""
    guarded = _layout("--host-ram", "440G", "--layout", "2x8")["layouts"][0]
    assert guarded["host_peak_bytes_per_node"] <= guarded["host_limit_bytes"]
    assert guarded["host_peak_bytes_per_node"] > guarded["guard_line_bytes"] == int(0.95 * guarded["host_limit_bytes"])
    assert guarded["stopped_by_guard"] and not guarded["fits"] and "stopped by memdiag's guard" in guarded["verdict"]
    unguarded = _layout("--host-ram", "440G", "--layout", "2x8", "guard.fraction=1")["layouts"][0]
    assert unguarded["fits"] and not unguarded["stopped_by_guard"]
