"""The architecture the planner needs, from the case or from any HF ``config.json``.

``facts`` (memdiag.plan.arch) are counted from the model itself: exact parameters, largest
layer, tied weights and saved-for-backward bytes. Without them (``from_case_model`` alone)
the dense-SwiGLU formula below stands in.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path

from memdiag.plan.arch import ModelFacts


@dataclass(frozen=True, kw_only=True)
class Architecture:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool = False
    fused_qkv: bool = True
    """Baichuan's W_pack; only the parameter names differ, not the count."""
    name: str = "model"
    facts: ModelFacts | None = None
    """Counted from the model (meta device, FakeTensorMode); they override the formulas."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @functools.cached_property  # the layout search asks for it per layout
    def num_parameters(self) -> int:
        if self.facts is not None:
            return self.facts.num_parameters
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        kv = self.num_kv_heads * self.head_dim
        attention = h * h + 2 * h * kv + h * h  # q, k, v, o
        per_layer = attention + 3 * h * i + 2 * h  # SwiGLU MLP, two RMSNorms
        head = 0 if self.tied_embeddings else v * h
        return v * h + self.num_layers * per_layer + h + head

    @property
    def largest_layer_params(self) -> int:
        """Parameters of the largest decoder layer (what ZeRO-3 gathers at once)."""
        if self.facts is not None:
            return self.facts.largest_layer_params
        return self.num_parameters // max(self.num_layers, 1)

    @property
    def largest_tensor_elements(self) -> int:
        if self.facts is not None:
            return self.facts.largest_tensor_elements
        return max(self.vocab_size * self.hidden_size, 3 * self.hidden_size * self.hidden_size, self.hidden_size * self.intermediate_size)

    @property
    def tensor_numels(self) -> tuple[int, ...]:
        """Each parameter's elements in ``named_parameters()`` order: counted, or the dense
        decoder's (embedding; per layer norm, q, k, v, o, norm, gate, up, down; norm; head)."""
        if self.facts is not None and self.facts.tensor_numels:
            return self.facts.tensor_numels
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        kv = self.num_kv_heads * self.head_dim
        layer = (h, h * h, h * kv, h * kv, h * h, h, h * i, h * i, h * i)
        return (v * h, *layer * self.num_layers, h) + (() if self.tied_embeddings else (v * h,))

    @classmethod
    def from_case_model(cls, model: dict) -> Architecture:
        return cls(
            hidden_size=int(model["hidden_size"]),
            num_layers=int(model["num_hidden_layers"]),
            num_heads=int(model["num_attention_heads"]),
            num_kv_heads=int(model.get("num_key_value_heads") or model["num_attention_heads"]),
            intermediate_size=int(model["intermediate_size"]),
            vocab_size=int(model["vocab_size"]),
            tied_embeddings=bool(model.get("tie_word_embeddings", False)),
            name=f"baichuan2 {model.get('scale', '')}".strip(),
        )

    @classmethod
    def from_facts(cls, facts: ModelFacts) -> Architecture:
        return cls(
            hidden_size=facts.hidden_size,
            num_layers=facts.num_layers,
            num_heads=facts.num_heads,
            num_kv_heads=facts.num_kv_heads,
            intermediate_size=facts.intermediate_size,
            vocab_size=facts.vocab_size,
            tied_embeddings=facts.tied_parameters > 0,
            name=facts.name,
            facts=facts,
        )

    @classmethod
    def counted(cls, config: dict, *, dtype: str, attention: str, model_class=None) -> Architecture:
        """From the model itself (cached per config); see memdiag.plan.arch."""
        from memdiag.plan import arch

        return cls.from_facts(arch.facts(config, dtype=dtype, attention=attention, model_class=model_class))

    @classmethod
    def for_case(cls, case: str, model: dict, *, dtype: str = "bf16", attention: str = "plain") -> Architecture:
        """The case's own model class, counted (its name from the config group, e.g. 13b)."""
        from memdiag.registry import get_case

        spec = get_case(case)
        # counted on the path the case's model is measured on; the terms scale s^2 to ``attention``
        counted = cls.counted(spec.model_config(model), dtype=dtype, attention=spec.model_attention, model_class=spec.model_class)
        scale = model.get("scale")
        return replace(counted, name=f"{case.split('_')[0]} {scale}".strip() if scale else counted.name)

    @classmethod
    def from_hf_config(cls, path: str | Path, *, dtype: str = "bf16", attention: str = "plain") -> Architecture:
        """Any HF decoder's ``config.json`` (or its directory), counted from the model itself."""
        from memdiag.plan import arch

        return cls.counted(arch.read_config(path), dtype=dtype, attention=attention)
