"""``key=value`` plan settings (the names ``memdiag run`` uses) -> ``Settings``; one parser for
``memdiag plan`` and the published validation set."""

from __future__ import annotations

import difflib
from dataclasses import replace

from memdiag.errors import UsageError
from memdiag.plan.terms import Settings
from memdiag.units import parse_size

BOOL = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
PLAN_KEYS = {
    "zero.stage": ("zero_stage", int),
    "micro_batch": ("micro_batch", int),
    "seq_len": ("seq_len", int),
    "grad_accum": ("grad_accum", int),
    "dtype": ("dtype", str),
    "flash_attn": ("attention", "bool"),
    "attention": ("attention", str),
    "activation_checkpointing": ("activation_checkpointing", "bool"),
    "offload": ("offload", str),
    "load": ("load", str),
    "load.dtype": ("load_dtype", str),
    "checkpoint_format": ("checkpoint_format", str),
    "checkpoint_shards": ("checkpoint_shards", int),
    "pin_memory": ("pin_memory", "bool"),
    "save_16bit_weights": ("save_16bit_weights", "bool"),
}
RUN_KEYS = ("zero.stage", "micro_batch", "seq_len", "grad_accum", "dtype", "load", "load.dtype")
"""Plan settings that ``memdiag run`` takes too (the rest describe other code: flash_attn, offload)."""
CHOICES = {
    "dtype": ("bf16", "fp16", "fp32"),
    "offload": ("none", "optimizer", "params", "nvme"),
    "load": ("reference", "zero_init", "rank0_broadcast"),
    "attention": ("plain", "sdpa_math", "fused"),
    "load_dtype": ("bf16", "fp16", "fp32"),
    "checkpoint_format": ("bin", "safetensors", "none"),
}


def settings_from(overrides: list[str], base: Settings) -> tuple[Settings, list[str]]:
    changes: dict = {}
    passthrough = []
    for token in overrides:
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise UsageError(f"malformed override {token!r}: write key=value, e.g. seq_len=4096")
        if key in ("model.scale", "case", "hardware"):
            passthrough.append(token)
            continue
        if key not in PLAN_KEYS:
            close = difflib.get_close_matches(key, [*PLAN_KEYS, "model.scale", "case"], n=3, cutoff=0.5)
            raise UsageError(f"unknown key {key!r}" + (f"; closest valid keys: {', '.join(close)}" if close else ""))
        field, kind = PLAN_KEYS[key]
        try:
            if kind == "bool":
                parsed = BOOL[value.lower()]
            elif kind == "size":
                parsed = parse_size(value, name=key)
            else:
                parsed = kind(value)
        except (KeyError, ValueError):
            raise UsageError(f"{key}={value!r}: expected {'true or false' if kind == 'bool' else kind.__name__}") from None
        if key == "flash_attn":
            parsed = "fused" if parsed else "plain"
        if field in CHOICES and parsed not in CHOICES[field]:
            raise UsageError(f"{key}={value!r}: use one of {', '.join(CHOICES[field])}")
        changes[field] = parsed
    return replace(base, **changes), passthrough


