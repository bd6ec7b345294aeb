"""The step's activation peak that ``memdiag plan`` counts (``memdiag/plan/step_peaks.py``: the
model's forward and backward in FakeTensorMode, the highest of its three stages) beside what one
real bf16 training step of the same model allocates on this machine's CPU, for HF decoders with
and without activation checkpointing, on SDPA's fused kernel and on eager attention. Beside them:
what the forward keeps for the backward (saved_tensors_hooks' figure): the backward's transients
are the difference, or under checkpointing the recomputed layer less the head's freed tensors.

Measured: the process's peak RSS growth over one forward and backward (VmHWM reset through
/proc/self/clear_refs after a warm step), with glibc told to hand every freed block above 64 KiB
back to the kernel (MALLOC_MMAP_THRESHOLD_), so RSS follows the live tensors. Parameters' gradients
are freed as they are accumulated (ZeRO moves each into its bucket), in both.

    python bench/step_peaks.py [--seq 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODELS = {
    # small enough for a real CPU step in seconds, with each family's own layer code
    "llama": {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 4,
              "num_key_value_heads": 4, "num_hidden_layers": 6, "vocab_size": 8000, "max_position_embeddings": 16384},
    "qwen2 (GQA, qkv bias)": {"model_type": "qwen2", "hidden_size": 256, "intermediate_size": 1024, "num_attention_heads": 8,
                              "num_key_value_heads": 2, "num_hidden_layers": 6, "vocab_size": 16000,
                              "max_position_embeddings": 16384, "tie_word_embeddings": False},
    "mistral": {"model_type": "mistral", "hidden_size": 256, "intermediate_size": 896, "num_attention_heads": 8,
                "num_key_value_heads": 2, "num_hidden_layers": 6, "vocab_size": 8000, "max_position_embeddings": 16384,
                "sliding_window": None},
}
ATTENTION = {"fused": "sdpa", "plain": "eager"}
"""memdiag's attention setting -> transformers' attn_implementation."""


def _real_step(config: dict, seq: int, checkpointing: bool, attention: str) -> int:
    """Run in a fresh process (``--real-step``): the peak RSS growth of one bf16 step."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from memdiag.probes.host import read_proc_status, reset_peak_rss

    torch.manual_seed(0)
    hf = AutoConfig.for_model(config["model_type"], **{k: v for k, v in config.items() if k != "model_type"})
    hf._attn_implementation = ATTENTION[attention]
    model = AutoModelForCausalLM.from_config(hf).to(torch.bfloat16).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    ids = torch.randint(0, hf.vocab_size, (1, seq))
    model(input_ids=ids[:, :8], labels=ids[:, :8]).loss.backward()  # first-call caches, not the step's
    reset_peak_rss()
    base = read_proc_status().rss_bytes
    model(input_ids=ids, labels=ids).loss.backward()
    return read_proc_status().hwm_bytes - base


def real_step_peak(config: dict, seq: int, checkpointing: bool, attention: str) -> int:
    """Bytes one real bf16 training step of ``config`` adds at its peak, in a process of its own."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, __file__, "--real-step", json.dumps(config), str(seq), str(int(checkpointing)), attention],
        capture_output=True, text=True, env=env, timeout=900, check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


def planned(config: dict, seq: int, checkpointing: bool, attention: str) -> tuple[float, float]:
    """(memdiag's counted step peak, what the forward keeps for the backward)."""
    from memdiag.plan.arch import facts
    from memdiag.plan.model import Architecture
    from memdiag.plan.terms import Coefficients, Settings, activation_terms, forward_saved_bytes

    arch = Architecture.from_facts(facts(dict(config, architectures=[]), dtype="bf16", attention=attention))
    s = Settings(seq_len=seq, attention=attention, activation_checkpointing=checkpointing)
    c = Coefficients()
    peak = sum(activation_terms(arch, s, c).values())
    return peak, forward_saved_bytes(arch, s, c)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--real-step":
        config, seq, ckpt, attention = json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
        print(_real_step(config, seq, ckpt, attention))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=4096)
    args = parser.parse_args()
    print(f"one bf16 training step at {args.seq} tokens, micro-batch 1; MiB; planned/measured")
    print(f"{'model':24} {'attention':9} {'ckpt':5} {'memdiag plans':>14} {'real step':>10} {'ratio':>6}   {'forward keeps':>14}")
    for name, config in MODELS.items():
        for attention in ATTENTION:
            for ckpt in (False, True):
                peak, saved = planned(config, args.seq, ckpt, attention)
                measured = real_step_peak(config, args.seq, ckpt, attention)
                print(f"{name:24} {attention:9} {str(ckpt).lower():5} {peak / 2**20:14.1f} {measured / 2**20:10.1f} "
                      f"{peak / measured:6.3f}   {saved / 2**20:14.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
