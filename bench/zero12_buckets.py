"""ZeRO-1/2 gradient-reduction buckets: DeepSpeed's own buffers beside memdiag's reduce_bucket
term, for stage 1 and 2 with and without overlap_comm and contiguous_gradients.

Runs bench/zero12_buckets_rank.py (real DeepSpeed, its CPU accelerator, gloo, 1 rank), which
records every buffer ``stage_1_and_2.setup_buckets`` puts in its reduction buckets. Beside them:
memdiag's term, and DeepSpeed's and HF's rule of thumb for ZeRO-2 ("overlap_comm uses 4.5x the
allgather_bucket_size and reduce_bucket_size values").

    python bench/zero12_buckets.py
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.one_rank import json_lines  # noqa: E402
from memdiag.plan.model import Architecture  # noqa: E402
from memdiag.plan.terms import Coefficients, Settings, device_terms  # noqa: E402

RANK = Path(__file__).resolve().parent / "zero12_buckets_rank.py"


def measure(timeout_s: float = 900) -> list[dict]:
    return json_lines(RANK, timeout_s=timeout_s)


def memdiag_bucket_bytes(zero: dict) -> float:
    arch = Architecture(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=256, vocab_size=256)
    terms = device_terms(arch, Settings(zero_stage=zero["stage"], ds_buffers=zero), 1, Coefficients(), act={})
    return terms.get("reduce_bucket", 0.0) + terms.get("allgather_bucket", 0.0)


def main() -> int:
    print("ZeRO-1/2 reduction buckets, bf16, reduce_bucket_size 3e6, allgather_bucket_size 5e6 (bytes)")
    print(f"  {'stage':5} {'overlap':7} {'contiguous':10} {'DeepSpeed':>10} {'memdiag':>10} {'4.5x rule':>10}")
    for row in measure():
        zero = row["zero_optimization"]
        rule = 4.5 * 2 * (zero["reduce_bucket_size"] + zero["allgather_bucket_size"]) if zero["overlap_comm"] else 0
        print(f"  {zero['stage']:<5} {str(zero['overlap_comm']).lower():7} {str(zero['contiguous_gradients']).lower():10} "
              f"{row['reduce_buffers_bytes']:10.0f} {memdiag_bucket_bytes(zero):10.0f} {rule:10.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
