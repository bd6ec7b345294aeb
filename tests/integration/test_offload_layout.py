"""memdiag's CPU-offload host terms against DeepSpeed's own tensors in a real ZeRO-3 run
(optimizer and parameters offloaded, DeepSpeed's CPU accelerator, gloo): every named term's
bytes per parameter is the bytes DeepSpeed allocated for that role."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import offload_layout as bench_module  # the benchmark's own measurement, run here

REPO = Path(__file__).resolve().parents[2]


def test_each_offloaded_host_tensor_is_the_term_memdiag_names():
    bench = bench_module
    layers, hidden = 4, 1024
    # torch's AdamW steps the offloaded partitions: DeepSpeed's CPU Adam would be JIT-compiled
    # first (minutes on a 2-core machine) and allocates the same host tensors
    run = bench.measure(layers, hidden, timeout_s=900, optimizer="torch")
    n = run["parameters"]
    ours = bench.memdiag_terms_per_parameter(layers, hidden)
    named = {k: v for k, v in run["tensors"].items() if k != "other_cpu_tensors"}
    for name, nbytes in named.items():
        assert nbytes / n == pytest.approx(ours[name], rel=0.01), name
    # nothing else of the model's size sits in host tensors (the rest is buffers of fixed size)
    assert run["tensors"]["other_cpu_tensors"] / n < 0.5
    # and the process holds at least the tensors: RSS is not below what DeepSpeed allocated
    assert run["stepped_rss_bytes"] - run["start_rss_bytes"] > sum(named.values())
