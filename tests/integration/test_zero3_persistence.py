"""memdiag's ZeRO-3 persistent-parameter term against what DeepSpeed's stage 3 keeps gathered in
a real run (its CPU accelerator, gloo): the default threshold, none, every weight, and a
model-wide cap (bench/zero3_persistence.py prints the same side by side)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("zero3_persistence", REPO / "bench" / "zero3_persistence.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_persistent_parameter_term_is_what_deepspeed_keeps_gathered():
    bench = _bench()
    rows = bench.measure()
    assert len(rows) == 4
    for row in rows:
        assert bench.memdiag_persistent_bytes(row) == 2 * row["persistent_elements"], row["zero_optimization"]
    default, none, every, capped = (2 * r["persistent_elements"] for r in rows)
    # the defaults keep the biases and norms; 3e5 every weight too; the cap stops part-way
    assert none == 0 < default < capped < every == 2 * sum(rows[2]["tensor_numels"])
