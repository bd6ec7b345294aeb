"""Our Baichuan2 implementation: names, counts, ALiBi, causality, sharded round trip."""

import math

import pytest
import torch

from cases.baichuan2_13b.modeling_baichuan import (
    BaichuanConfig,
    BaichuanForCausalLM,
    alibi_causal_bias,
    alibi_slopes,
    count_parameters,
)

TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4
)

# The weight map of the public Baichuan2-13B-Base checkpoint (pytorch_model.bin.index.json):
# the global names and those of one layer.
PUBLIC_NAMES = {
    "model.embed_tokens.weight",
    "model.norm.weight",
    "lm_head.weight",
    "model.layers.0.self_attn.W_pack.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.mlp.gate_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
}


def test_parameter_names_match_the_public_checkpoint():
    names = {n for n, _ in BaichuanForCausalLM(BaichuanConfig(**TINY)).named_parameters()}
    layer0_and_global = {n for n in names if not n.startswith("model.layers.") or ".0." in n}
    assert layer0_and_global == PUBLIC_NAMES


def test_13b_parameter_count_on_the_meta_device():
    config = BaichuanConfig()  # defaults are the 13B model
    with torch.device("meta"):
        model = BaichuanForCausalLM(config)
    counted = sum(p.numel() for p in model.parameters())
    assert counted == count_parameters(config)
    assert 13.8e9 < counted < 14.0e9


def test_alibi_slopes_for_40_heads():
    slopes = alibi_slopes(40)
    assert len(slopes) == 40
    assert slopes[0] == pytest.approx(2 ** (-8 / 32))  # power-of-two part of 32 heads
    assert slopes[32] == pytest.approx(2 ** (-8 / 64))  # interleaved from 64 heads: index 0
    assert slopes[33] == pytest.approx(2 ** (-8 / 64 * 3))
    assert alibi_slopes(8) == pytest.approx([2 ** (-(i + 1)) for i in range(8)])


def test_alibi_bias_is_causal_and_linear_in_key_position():
    bias = alibi_causal_bias(4, 5)
    assert bias.shape == (4, 5, 5)
    assert torch.isinf(bias[:, 0, 1:]).all() and not torch.isinf(bias[:, 4, :]).any()
    slope = alibi_slopes(4)[1]
    assert bias[1, 4, 3].item() == pytest.approx(3 * slope)


def test_future_tokens_do_not_change_earlier_logits():
    torch.manual_seed(0)
    model = BaichuanForCausalLM(BaichuanConfig(**TINY)).eval()
    a = torch.randint(0, 512, (1, 12))
    b = a.clone()
    b[0, 8:] = (b[0, 8:] + 7) % 512
    with torch.no_grad():
        la, lb = model(a).logits, model(b).logits
    assert torch.allclose(la[0, :8], lb[0, :8], atol=1e-5)
    assert not torch.allclose(la[0, 8:], lb[0, 8:])


def test_lm_head_rows_are_normalised():
    model = BaichuanForCausalLM(BaichuanConfig(**TINY))
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)  # scaling the raw rows must not change the logits
        hidden = torch.randn(1, 3, 64)
        logits = model.lm_head(hidden)
        expected = hidden @ torch.nn.functional.normalize(model.lm_head.weight).T
    assert torch.allclose(logits, expected, atol=1e-5)


def test_loss_is_shifted_cross_entropy():
    torch.manual_seed(0)
    model = BaichuanForCausalLM(BaichuanConfig(**TINY))
    ids = torch.randint(0, 512, (2, 10))
    out = model(ids, labels=ids)
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1))
    assert out.loss.item() == pytest.approx(manual.item(), rel=1e-5)
    assert math.isfinite(out.loss.item())


def test_sharded_save_and_reload_gives_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = BaichuanForCausalLM(BaichuanConfig(**TINY)).eval()
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    shards = [p for p in tmp_path.iterdir() if p.name.startswith("model-")]
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    reloaded = BaichuanForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
