"""The architecture the planner needs, from the case or from any HF ``config.json``."""

from __future__ import annotations

import json
import functools
from dataclasses import dataclass
from pathlib import Path

from memdiag.errors import UsageError


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

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @functools.cached_property  # the layout search asks for it per layout
    def num_parameters(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        kv = self.num_kv_heads * self.head_dim
        attention = h * h + 2 * h * kv + h * h  # q, k, v, o
        per_layer = attention + 3 * h * i + 2 * h  # SwiGLU MLP, two RMSNorms
        head = 0 if self.tied_embeddings else v * h
        return v * h + self.num_layers * per_layer + h + head

    @property
    def largest_tensor_elements(self) -> int:
        return max(self.vocab_size * self.hidden_size, 3 * self.hidden_size * self.hidden_size, self.hidden_size * self.intermediate_size)

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
    def from_hf_config(cls, path: str | Path) -> Architecture:
        path = Path(path)
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise UsageError(f"--model-config {path}: no such file") from None
        except ValueError as exc:
            raise UsageError(f"--model-config {path} is not JSON: {exc}") from None
        needed = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
        missing = [k for k in needed if k not in cfg]
        if missing:
            raise UsageError(f"--model-config {path} lacks {', '.join(missing)} (a decoder-only HF config is expected)")
        return cls(
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            intermediate_size=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            name=cfg.get("_name_or_path") or (cfg.get("architectures") or [path.parent.name])[0],
        )
