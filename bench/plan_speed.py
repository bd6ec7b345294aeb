"""The planner's full search: 1-16 nodes x 1-16 devices per node x every option combination
(loading, load dtype, flash attention, activation checkpointing, offload, ZeRO stage).

    python bench/plan_speed.py
"""

from __future__ import annotations

import itertools
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memdiag.config import compose  # noqa: E402
from memdiag.plan.model import Architecture  # noqa: E402
from memdiag.plan.search import recommend, search  # noqa: E402
from memdiag.plan.terms import Coefficients, Settings  # noqa: E402

OPTIONS = {
    "load": ("reference", "zero_init", "rank0_broadcast"),
    "load_dtype": (None, "bf16"),
    "attention": ("plain", "sdpa_math", "fused"),
    "activation_checkpointing": (False, True),
    "offload": ("none", "optimizer", "params"),
    "zero_stage": (1, 2, 3),
}


def main() -> int:
    config = compose(["hardware=bi_v150", "model.scale=13b", "nproc_per_node=1"], detect_accelerator=False)
    arch = Architecture.from_case_model(config.model)
    hardware = replace(config.hardware, cards_per_node=16, devices_per_card=1)
    base = Settings()
    combos = [dict(zip(OPTIONS, values)) for values in itertools.product(*OPTIONS.values())]
    started = time.perf_counter()
    evaluated = fitting = 0
    for combo in combos:
        results = search(
            arch, replace(base, **combo), hardware, Coefficients(), nodes=list(range(1, 17)), per_node=list(range(1, 17)),
            device_capacity_bytes=64 * 2**30, host_limit_bytes=500 * 2**30,
        )
        evaluated += len(results)
        fitting += recommend(results) is not None
    took = time.perf_counter() - started
    print(f"{len(combos)} option combinations x 16 nodes x 16 devices per node = {evaluated:,} layouts evaluated")
    print(f"full search: {took:.3f} s (target < 1 s); {fitting} combinations have a layout that fits")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
