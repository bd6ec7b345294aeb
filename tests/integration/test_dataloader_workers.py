"""DataLoader workers' host RAM against memdiag's term, on real forked workers (torch's
DataLoader, persistent workers, Linux's fork): a dataset held as one numpy array is shared, one
held as Python objects is copied as workers read it (bench/dataloader_workers.py prints the same)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import dataloader_workers as bench_module  # the benchmark's own measurement, run here

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("form, epochs", [("numpy", 1), ("python", 1), ("python", 3)])
def test_each_workers_own_memory_is_the_term_memdiag_names(form, epochs):
    bench = bench_module
    row = bench.measure(form, 64, 2, epochs)
    assert row["workers"] == 2
    for uss in row["worker_uss_bytes"]:  # USS: what a worker adds to the node beside its rank
        assert uss == pytest.approx(bench.memdiag_worker_bytes(row, epochs), rel=0.2), (form, epochs)
    if form == "numpy":  # shared with the rank: RSS counts the array, the worker holds none of it
        assert max(row["worker_uss_bytes"]) < 0.25 * row["dataset_bytes"] < min(row["worker_rss_bytes"])
