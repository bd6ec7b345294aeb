"""memdiag's ZeRO-1/2 reduce-bucket term against the buffers DeepSpeed's stage_1_and_2 allocates
in a real run (its CPU accelerator, gloo): stage 1 and 2, overlap_comm and contiguous_gradients
on and off (bench/zero12_buckets.py prints the same side by side)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("zero12_buckets", REPO / "bench" / "zero12_buckets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_reduce_bucket_term_is_the_buffers_deepspeed_allocates():
    bench = _bench()
    rows = bench.measure()
    assert len(rows) == 8
    for row in rows:
        zero = row["zero_optimization"]
        assert bench.memdiag_bucket_bytes(zero) == row["reduce_buffers_bytes"], zero
    # overlap_comm doubles the buffer; without contiguous gradients there is none
    by = {(r["zero_optimization"]["stage"], r["zero_optimization"]["overlap_comm"], r["zero_optimization"]["contiguous_gradients"]):
          r["reduce_buffers_bytes"] for r in rows}
    assert by[2, True, True] == 2 * by[2, False, True] > 0 and by[2, True, False] == 0
