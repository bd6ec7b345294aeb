"""ZeRO-3's persistent parameters: what DeepSpeed keeps gathered on every rank after first use,
beside memdiag's ``zero3_persistent_parameters`` term, for its defaults, no persistence, a
threshold over every weight, and a model-wide cap.

Runs bench/zero3_persistence_rank.py (real DeepSpeed stage 3, its CPU accelerator, gloo, 1 rank),
which reports the elements of every ``ds_persist`` parameter whose full data is still there after
a step.

    python bench/zero3_persistence.py
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from memdiag.plan.arch import ModelFacts  # noqa: E402
from bench.one_rank import json_lines  # noqa: E402
from memdiag.plan.model import Architecture  # noqa: E402
from memdiag.plan.terms import Coefficients, Settings, device_terms  # noqa: E402

RANK = Path(__file__).resolve().parent / "zero3_persistence_rank.py"


def measure(timeout_s: float = 900) -> list[dict]:
    return json_lines(RANK, timeout_s=timeout_s)


def memdiag_terms(row: dict) -> dict[str, float]:
    numels = tuple(row["tensor_numels"])
    arch = Architecture.from_facts(ModelFacts(
        name="stack", model_class="Sequential", num_parameters=sum(numels), num_layers=3, largest_layer_params=max(numels),
        largest_tensor_elements=max(numels), tied_parameters=0, hidden_size=512, num_heads=1, num_kv_heads=1,
        intermediate_size=512, vocab_size=0, tensor_numels=numels,
    ))
    return device_terms(arch, Settings(ds_buffers=row["zero_optimization"]), 1, Coefficients(), act={})


def memdiag_persistent_bytes(row: dict) -> float:
    return memdiag_terms(row)["zero3_persistent_parameters"]


def main() -> int:
    rows = measure()
    print("ZeRO-3 persistent parameters, bf16, 3 x (Linear 512 + LayerNorm 512): bytes kept gathered per rank")
    print(f"  {'param threshold':>15} {'model threshold':>15} {'DeepSpeed':>10} {'memdiag':>10}")
    for row in rows[:4]:
        zero = row["zero_optimization"]
        print(f"  {zero.get('stage3_param_persistence_threshold', '1e5 (default)')!s:>15} "
              f"{zero.get('stage3_model_persistence_threshold', 'none')!s:>15} "
              f"{2 * row['persistent_elements']:10.0f} {memdiag_persistent_bytes(row):10.0f}")
    print("ZeRO-3 gradient-reduction buffer, reduce_bucket_size 3e5: bytes")
    print(f"  {'overlap_comm':>12} {'contiguous':>10} {'DeepSpeed':>10} {'memdiag':>10}")
    for row in rows[4:]:
        zero = row["zero_optimization"]
        print(f"  {str(zero.get('overlap_comm', False)).lower():>12} {str(zero.get('contiguous_gradients', True)).lower():>10} "
              f"{row['reduce_buffers_bytes']:10.0f} {memdiag_terms(row)['zero3_reduce_bucket']:10.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
