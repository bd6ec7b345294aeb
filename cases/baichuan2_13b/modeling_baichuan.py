"""Baichuan2 (13B family) as a transformers ``PreTrainedModel``.

Written from the public architecture description so that parameter names match the public
Baichuan2-13B checkpoints (``model.layers.N.self_attn.W_pack.weight`` and so on) and
``from_pretrained`` loads them directly. The 13B model uses ALiBi position bias, a fused QKV
projection (``W_pack``), RMSNorm, a SwiGLU MLP and a normalised LM head (``NormHead``), with
untied embeddings. Attention is plain (the upstream code's path without xformers), so the
``heads x seq x seq`` scores and their softmax are materialised: the memory model counts them.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class BaichuanConfig(PretrainedConfig):
    model_type = "baichuan"

    def __init__(
        self,
        vocab_size: int = 125696,
        hidden_size: int = 5120,
        intermediate_size: int = 13696,
        num_hidden_layers: int = 40,
        num_attention_heads: int = 40,
        hidden_act: str = "silu",
        model_max_length: int = 4096,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = False,
        pad_token_id: int = 0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        tie_word_embeddings: bool = False,
        z_loss_weight: float = 0.0,
        attention: str = "plain",
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.hidden_act = hidden_act
        self.model_max_length = model_max_length
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.z_loss_weight = z_loss_weight
        # upstream's two paths: "plain" (no xformers: matmul, ALiBi, softmax), "sdpa_math" (SDPA)
        self.attention = attention
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )


def alibi_slopes(num_heads: int) -> list[float]:
    """Per-head ALiBi slopes, interleaved for head counts that are not powers of two (40)."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_2(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][: num_heads - closest]


def alibi_causal_bias(num_heads: int, seq_len: int, device=None) -> torch.Tensor:
    """``(heads, seq, seq)`` fp32 bias: ``slope * (j - i)`` for key j of query i, ``-inf``
    above the diagonal, as the upstream 13B training path builds it.

    The relative form keeps the bias near zero where softmax weighs most (the diagonal and
    the keys close to it). ``slope * j`` gives the same softmax in exact arithmetic but
    grows to thousands at j ~ 2000-4000, where bf16's spacing is 8-16 and the scores'
    differences are rounded away once the bias is cast to the model's dtype.
    """
    slopes = torch.tensor(alibi_slopes(num_heads), dtype=torch.float32, device=device)
    positions = torch.arange(seq_len, dtype=torch.float32, device=device)
    distance = positions[None, :] - positions[:, None]  # j - i: <= 0 on and below the diagonal
    bias = slopes[:, None, None] * distance[None, :, :]
    return bias.masked_fill(distance[None, :, :] > 0, float("-inf"))


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, epsilon: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.epsilon = epsilon

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # as upstream: normalise in float32 and cast once, to the weight's dtype
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class BaichuanAttention(nn.Module):
    def __init__(self, config: BaichuanConfig):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        if self.head_dim * self.num_heads != self.hidden_size:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_heads})"
            )
        self.W_pack = nn.Linear(self.hidden_size, 3 * self.hidden_size, bias=False)
        self.o_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        self.sdpa = config.attention == "sdpa_math"

    def forward(self, hidden_states: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        bsz, q_len, _ = hidden_states.shape
        qkv = self.W_pack(hidden_states).view(bsz, q_len, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.sdpa:
            # as the upstream 13B code does when xformers imports: SDPA with ALiBi as a float mask,
            # which no fused kernel takes, so SDPA's math path runs (one s^2 tensor saved, not two)
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
            return self.o_proj(out.transpose(1, 2).reshape(bsz, q_len, self.hidden_size))
        # as the upstream 13B code does without xformers: scores, ALiBi bias and softmax in the
        # model's dtype, clamped at the dtype's minimum (-inf + -inf would give NaN rows)
        scores = torch.matmul(query, key.transpose(2, 3)) / math.sqrt(self.head_dim)
        scores = torch.maximum(scores + bias, torch.tensor(torch.finfo(scores.dtype).min, device=scores.device))
        probs = F.softmax(scores, dim=-1)
        out = torch.matmul(probs, value).transpose(1, 2).reshape(bsz, q_len, self.hidden_size)
        return self.o_proj(out)


class BaichuanLayer(nn.Module):
    def __init__(self, config: BaichuanConfig):
        super().__init__()
        self.self_attn = BaichuanAttention(config)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), bias)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class NormHead(nn.Module):
    """LM head whose rows are L2-normalised before the projection (Baichuan2)."""

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states, F.normalize(self.weight))


class BaichuanPreTrainedModel(PreTrainedModel):
    config_class = BaichuanConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BaichuanLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        with _gathered(list(module.parameters(recurse=False))):
            std = self.config.initializer_range
            if isinstance(module, (nn.Linear, NormHead)):
                module.weight.data.normal_(mean=0.0, std=std)
            elif isinstance(module, nn.Embedding):
                module.weight.data.normal_(mean=0.0, std=std)
                if module.padding_idx is not None:
                    module.weight.data[module.padding_idx].zero_()
            elif isinstance(module, RMSNorm):
                module.weight.data.fill_(1.0)


def _gathered(params: list[nn.Parameter]):
    """Under ``deepspeed.zero.Init`` parameters are partitioned (empty here): gather them so
    initialisation matches the unpartitioned model, rank 0's values broadcast to all."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()


class BaichuanModel(BaichuanPreTrainedModel):
    def __init__(self, config: BaichuanConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(BaichuanLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        bias = alibi_causal_bias(
            self.config.num_attention_heads, input_ids.shape[1], device=input_ids.device
        ).to(hidden_states.dtype)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                hidden_states = self._gradient_checkpointing_func(layer.__call__, hidden_states, bias)
            else:
                hidden_states = layer(hidden_states, bias)
        return self.norm(hidden_states)


class BaichuanForCausalLM(BaichuanPreTrainedModel):
    def __init__(self, config: BaichuanConfig):
        super().__init__(config)
        self.model = BaichuanModel(config)
        self.lm_head = NormHead(config.hidden_size, config.vocab_size)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> NormHead:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        **_unused,
    ) -> CausalLMOutputWithPast:
        logits = self.lm_head(self.model(input_ids))
        loss = None
        if labels is not None:
            shift_logits = logits[..., :-1, :].contiguous().view(-1, self.config.vocab_size)
            shift_labels = labels[..., 1:].contiguous().view(-1).to(shift_logits.device)
            loss = F.cross_entropy(shift_logits.float(), shift_labels)
            if self.config.z_loss_weight > 0:
                z_loss = shift_logits.float().max(-1).values.pow(2).mean()
                loss = loss + self.config.z_loss_weight * z_loss
        return CausalLMOutputWithPast(loss=loss, logits=logits)


def count_parameters(config: BaichuanConfig) -> int:
    """Exact parameter count from the config (no model needed; used by plan and MFU)."""
    h, i, v, n = (
        config.hidden_size,
        config.intermediate_size,
        config.vocab_size,
        config.num_hidden_layers,
    )
    per_layer = 3 * h * h + h * h + 3 * h * i + 2 * h
    return v * h + n * per_layer + h + v * h
