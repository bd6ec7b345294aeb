"""ZeRO-3 CPU offload's host RAM per parameter: DeepSpeed itself, term by term, beside memdiag
and DeepSpeed's estimator.

Runs bench/offload_layout_rank.py (real DeepSpeed ZeRO-3, optimizer and parameters offloaded,
on its CPU accelerator) at two model sizes, REPEATS times each. Each run reports the bytes of
DeepSpeed's own host tensors by role (fp32 masters, their .grad buffers, Adam's moments, the flat
gradient partitions, the offloaded 16-bit parameters, every other CPU tensor) and the rank's RSS;
slopes between the two sizes give bytes per parameter free of the runtime and fixed buffers. The
tensors check memdiag's named terms exactly; RSS minus tensors is the retention memdiag carries
as ``host_offload_retained_bytes_per_param``. DeepSpeed's estimator counts 18 B (27 with its
default 1.5 buffer factor).

    python bench/offload_layout.py [--layers 8 32] [--hidden 2048] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from memdiag.plan.arch import ModelFacts  # noqa: E402
from memdiag.plan.estimator import estimate_zero3_model_states_mem_needs  # noqa: E402
from bench.one_rank import json_lines  # noqa: E402
from memdiag.plan.model import Architecture  # noqa: E402
from memdiag.plan.terms import Settings, offload_terms  # noqa: E402

RANK = Path(__file__).resolve().parent / "offload_layout_rank.py"


def measure(layers: int, hidden: int, timeout_s: float = 900, optimizer: str = "deepspeed") -> dict:
    """One real run (1 rank); the rank's RSS at each stage. ``optimizer``: deepspeed (its CPU
    Adam, JIT-compiled) or torch (AdamW as the client optimizer; the same host tensors)."""
    return json_lines(RANK, str(layers), str(hidden), optimizer, timeout_s=timeout_s)[-1]


def stack(layers: int, hidden: int) -> Architecture:
    n = layers * hidden * hidden
    return Architecture.from_facts(ModelFacts(
        name="linear stack", model_class="Sequential", num_parameters=n, num_layers=layers,
        largest_layer_params=hidden * hidden, largest_tensor_elements=hidden * hidden, tied_parameters=0,
        hidden_size=hidden, num_heads=1, num_kv_heads=1, intermediate_size=hidden, vocab_size=0,
    ))


def memdiag_terms_per_parameter(layers: int, hidden: int) -> dict[str, float]:
    arch = stack(layers, hidden)
    settings = Settings(offload="params", pin_memory=False, ds_buffers={"sub_group_size": 1e8})
    return {k: v / arch.num_parameters for k, v in offload_terms(arch, settings, local_ranks=1, world=1).items()}


def slopes(small: dict, large: dict) -> dict[str, float]:
    extra = large["parameters"] - small["parameters"]
    out = {stage: (large[f"{stage}_rss_bytes"] - small[f"{stage}_rss_bytes"]) / extra for stage in ("built", "initialized", "stepped")}
    out |= {name: (large["tensors"][name] - small["tensors"][name]) / extra for name in large["tensors"]}
    return out


def main() -> int:
    import statistics

    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, nargs=2, default=(8, 32))
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    runs = [slopes(measure(args.layers[0], args.hidden), measure(args.layers[1], args.hidden)) for _ in range(args.repeats)]
    measured = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    ours = memdiag_terms_per_parameter(args.layers[1], args.hidden)
    print(f"ZeRO-3 offload (optimizer + parameters, pin_memory=false), {args.layers[0]} and {args.layers[1]} layers of "
          f"{args.hidden}^2, 1 rank, median of {args.repeats}; bytes per parameter (slope between the sizes)")
    print(f"  {'host tensor':36} {'DeepSpeed':>9} {'memdiag':>8}")
    tensors = [k for k in measured if k not in ("built", "initialized", "stepped")]
    for name in tensors:
        print(f"  {name:36} {measured[name]:9.2f} {ours.get(name, 0.0):8.2f}")
    tensor_total = sum(measured[k] for k in tensors)
    retained = measured["stepped"] - tensor_total
    print(f"  {'all host tensors':36} {tensor_total:9.2f} {sum(v for k, v in ours.items() if k != 'offload_build_transients_retained'):8.2f}")
    print(f"  RSS after two steps {measured['stepped']:.2f} (after build {measured['built']:.2f}, after deepspeed.initialize "
          f"{measured['initialized']:.2f}); RSS minus tensors {retained:.2f}, memdiag carries "
          f"{ours['offload_build_transients_retained']:.2f} (offload_build_transients_retained)")
    total = sum(ours.values())
    cpu, _, _ = estimate_zero3_model_states_mem_needs(2, 1, cpu_offload=True, cpu_offload_params=True, additional_buffer_factor=1.0)
    per_param = cpu / 2
    print(f"  RSS per parameter: memdiag {total:.2f} ({(total - measured['stepped']) / measured['stepped']:+.1%}); DeepSpeed's "
          f"estimator {per_param:.1f} ({(per_param - measured['stepped']) / measured['stepped']:+.1%}), {1.5 * per_param:.1f} with "
          f"its 1.5 buffer factor ({(1.5 * per_param - measured['stepped']) / measured['stepped']:+.1%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
