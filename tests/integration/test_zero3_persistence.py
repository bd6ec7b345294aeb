"""memdiag's ZeRO-3 persistent-parameter term against what DeepSpeed's stage 3 keeps gathered in
a real run (its CPU accelerator, gloo): the default threshold, none, every weight, and a
model-wide cap; and its reduction buffer with and without overlap_comm and contiguous gradients
(bench/zero3_persistence.py prints the same side by side)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import zero3_persistence as bench_module  # the benchmark's own measurement, run here

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def measured():
    bench = bench_module
    return bench, bench.measure()  # one real run serves both tests


def test_the_persistent_parameter_term_is_what_deepspeed_keeps_gathered(measured):
    bench, rows = measured
    assert len(rows) == 7
    for row in rows[:4]:
        assert bench.memdiag_persistent_bytes(row) == 2 * row["persistent_elements"], row["zero_optimization"]
    default, none, every, capped = (2 * r["persistent_elements"] for r in rows[:4])
    # the defaults keep the biases and norms; 3e5 every weight too; the cap stops part-way
    assert none == 0 < default < capped < every == 2 * sum(rows[2]["tensor_numels"])


def test_the_zero3_reduce_buffer_is_one_bucket_with_or_without_overlap_comm(measured):
    bench, rows = measured[0], measured[1][4:]
    overlap, plain, scattered = (r["reduce_buffers_bytes"] for r in rows)
    assert overlap == plain == 2 * 3e5 and scattered == 0
    for row in rows:
        assert bench.memdiag_terms(row)["zero3_reduce_bucket"] == row["reduce_buffers_bytes"], row["zero_optimization"]
