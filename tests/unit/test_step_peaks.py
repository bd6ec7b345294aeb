"""The step's activation peak by stage, counted in FakeTensorMode: the fits reproduce a direct count,
the stages never add up, and the count agrees with what a real bf16 CPU step allocates."""


import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from bench import step_peaks as step_peaks_bench  # noqa: E402
from memdiag.plan import arch as arch_mod  # noqa: E402
from memdiag.plan import step_peaks  # noqa: E402
from memdiag.plan.model import Architecture  # noqa: E402
from memdiag.plan.terms import Coefficients, Settings, activation_terms, forward_saved_bytes  # noqa: E402

LLAMA = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 688,
    "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 6, "vocab_size": 8000,
    "max_position_embeddings": 16384, "torch_dtype": "float32", "tie_word_embeddings": False,
}


def _build(layers, attention="sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in LLAMA.items() if k not in ("model_type", "architectures")} | {"num_hidden_layers": layers})
    config._attn_implementation = attention
    torch.set_default_dtype(torch.bfloat16)
    try:
        return LlamaForCausalLM(config).train()
    finally:
        torch.set_default_dtype(torch.float32)


def _direct(layers, seq, checkpointing, attention="sdpa"):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        model = _build(layers, attention)
        if checkpointing:
            assert step_peaks.enable_checkpointing(model)
        return step_peaks.measure(model, torch.randint(0, LLAMA["vocab_size"], (1, seq)))


@pytest.fixture(scope="module")
def counted():
    return step_peaks.count(_build, vocab=LLAMA["vocab_size"], dtype="bf16", attention="fused")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_each_stage_fit_reproduces_a_direct_count_at_another_size(counted, checkpointing):
    # fitted on 1 and 2 layers at 1k-4k tokens, asked for 5 layers at 8k and at 1.5k
    for seq in (8192, 1536):
        direct = _direct(5, seq, checkpointing)
        for stage, fit in counted.stages(checkpointing).items():
            assert fit.at(5, seq) == pytest.approx(direct[stage], rel=1e-3), (stage, seq)


def test_parameter_gradients_are_not_activations():
    # the embedding's gradient (8000 x 256 bf16 = 4 MB) would set the layers' stage at short
    # sequences: it is ZeRO's bucket's to plan, and every stage grows with the sequence without it
    short, long = _direct(2, 64, False), _direct(2, 128, False)
    assert short["layers"] < 8000 * 256 * 2
    assert long["layers"] > short["layers"]


def test_checkpointing_keeps_one_hidden_state_per_layer(counted):
    fit = counted.stages(True)["head"]
    assert fit.x == pytest.approx(2 * LLAMA["hidden_size"])  # bf16 bytes per token per layer
    assert fit.y == pytest.approx(0.0, abs=1e-6)


def test_a_float32_config_counts_the_dtype_trained_in():
    facts = arch_mod.facts(LLAMA, dtype="bf16", attention="fused")
    # the config was saved as float32; the run trains in bf16: 2 bytes a hidden element kept
    assert facts.peaks.checkpointed["head"].x == pytest.approx(2 * LLAMA["hidden_size"])


def test_the_recomputed_layer_and_the_logits_are_never_counted_together():
    facts = arch_mod.facts(LLAMA, dtype="bf16", attention="fused")
    arch = Architecture.from_facts(facts)
    for seq in (512, 4096, 65536):
        s = Settings(seq_len=seq, attention="fused", activation_checkpointing=True)
        terms = activation_terms(arch, s, Coefficients())
        assert ("logits_and_loss" in terms) != ("recomputed_layer" in terms), terms
        stages = facts.peaks.checkpointed
        # a gradient window's fit is what is live beside the gradient: the plan adds the gradient there
        assert sum(terms.values()) == pytest.approx(
            max(f.at(arch.num_layers, seq) + int(k.partition(step_peaks.GRAD)[2] or 0) for k, f in stages.items()), rel=1e-9)
        # what the forward keeps is less than the sum of every part, more than the layers' inputs
        assert forward_saved_bytes(arch, s, Coefficients()) > terms["activations"]


@pytest.mark.parametrize("attention", ["fused", "plain"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_counted_peak_is_what_a_real_bf16_cpu_step_allocates(checkpointing, attention):
    # bench/step_peaks.py's own measurement: the peak RSS growth of one real bf16 step, glibc
    # returning every freed block above 64 KiB at once, so RSS follows the live tensors
    seq = 4096
    config = {k: v for k, v in LLAMA.items() if k not in ("architectures", "torch_dtype")}
    measured = step_peaks_bench.real_step_peak(config, seq, checkpointing, attention)
    planned, kept = step_peaks_bench.planned(config, seq, checkpointing, attention)
    print(f"{attention} checkpointing={checkpointing}: planned {planned / 2**20:.1f} MiB, real step {measured / 2**20:.1f} MiB")
    assert planned == pytest.approx(measured, rel=0.10)
    assert planned > kept  # the backward's transients (or the recomputed layer) are in the peak


def test_a_backward_that_cannot_be_counted_is_planned_from_the_forward(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("MEMDIAG_CACHE", str(tmp_path))

    def custom_kernel(*args, **kwargs):
        raise RuntimeError("an autograd Function FakeTensorMode cannot run")

    monkeypatch.setattr(step_peaks, "count", custom_kernel)
    facts = arch_mod.facts(dict(LLAMA, hidden_size=128), dtype="bf16", attention="fused")
    assert facts.peaks is None and facts.saved is not None
    assert "memdiag: warning: the model's backward could not be counted (RuntimeError" in capsys.readouterr().err
    s = Settings(seq_len=4096, attention="fused", activation_checkpointing=True)
    terms = activation_terms(Architecture.from_facts(facts), s, Coefficients())
    # the formula's stages: still never the logits and the recomputed layer together
    assert ("logits_and_loss" in terms) != ("recomputed_layer" in terms)


WIDE_SHORT = {  # the lm_head's and the embedding's gradients (62.5 MiB each) outweigh a short step's activations
    "model_type": "llama", "hidden_size": 1024, "intermediate_size": 2752, "num_attention_heads": 8, "num_key_value_heads": 8,
    "num_hidden_layers": 2, "vocab_size": 32000, "max_position_embeddings": 4096,
}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_parameters_gradient_is_counted_while_it_is_live(checkpointing):
    # a real step frees each gradient as it is accumulated (as ZeRO takes it); at 128 tokens the
    # peak is the embedding's or the lm_head's full gradient beside what is live then
    seq = 128
    measured = step_peaks_bench.real_step_peak(WIDE_SHORT, seq, checkpointing, "fused")
    planned, _ = step_peaks_bench.planned(WIDE_SHORT, seq, checkpointing, "fused")
    arch = Architecture.from_facts(arch_mod.facts(dict(WIDE_SHORT, architectures=[]), dtype="bf16", attention="fused"))
    terms = activation_terms(arch, Settings(seq_len=seq, attention="fused", activation_checkpointing=checkpointing), Coefficients())
    print(f"checkpointing={checkpointing}: planned {planned / 2**20:.1f} MiB, real step {measured / 2**20:.1f} MiB, {terms}")
    assert terms["parameter_gradient_in_flight"] == 32000 * 1024 * 2
    assert planned == pytest.approx(measured, rel=0.10)
    assert planned - terms["parameter_gradient_in_flight"] < 0.5 * measured  # without it the plan is far short
