"""memdiag's ZeRO-1/2 reduce-bucket term against the buffers DeepSpeed's stage_1_and_2 allocates
in a real run (its CPU accelerator, gloo): stage 1 and 2, overlap_comm and contiguous_gradients
on and off (bench/zero12_buckets.py prints the same side by side)."""

from __future__ import annotations

from pathlib import Path

from bench import zero12_buckets as bench_module  # the benchmark's own measurement, run here

REPO = Path(__file__).resolve().parents[2]


def test_the_reduce_bucket_term_is_the_buffers_deepspeed_allocates():
    bench = bench_module
    rows = bench.measure()
    assert len(rows) == 8
    for row in rows:
        zero = row["zero_optimization"]
        assert bench.memdiag_bucket_bytes(zero) == row["reduce_buffers_bytes"], zero
    # overlap_comm doubles the buffer; without contiguous gradients there is none
    by = {(r["zero_optimization"]["stage"], r["zero_optimization"]["overlap_comm"], r["zero_optimization"]["contiguous_gradients"]):
          r["reduce_buffers_bytes"] for r in rows}
    assert by[2, True, True] == 2 * by[2, False, True] > 0 and by[2, True, False] == 0
