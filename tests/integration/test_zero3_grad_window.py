"""The mechanism behind ``parameter_gradient_in_flight`` in a real DeepSpeed stage 3 run (its CPU
accelerator, gloo): a parameter whose gradient is larger than ``reduce_bucket_size`` (an lm_head's,
an embedding's) is reduce-scattered from its own full-size gradient, which autograd made whole;
the smaller ones go through the bucket. memdiag counts that whole gradient while it is live
(memdiag/plan/step_peaks.py; tests/unit/test_step_peaks.py puts it beside a real step's bytes)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

from bench.one_rank import json_lines  # noqa: E402

RANK = Path(__file__).resolve().parents[2] / "bench" / "zero3_grad_window_rank.py"


def test_a_gradient_larger_than_the_bucket_is_reduced_whole_from_its_own_storage():
    (row,) = json_lines(RANK)
    embedding, layer, head = row["parameter_elements"]
    assert layer < row["bucket"] < head == embedding
    # the lm_head's and the embedding's gradients, each whole; the layer's went through the bucket
    assert sorted(row["reduced_from_own_storage"]) == [embedding, head]
