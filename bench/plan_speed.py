"""The planner's speed, two ways:

1. the full search in process: 1-16 nodes x 1-16 devices per node x every option combination
   (loading, load dtype, attention, activation checkpointing, offload, ZeRO stage), with the
   model's facts counted from the model (cached);
2. ``memdiag plan --host-ram 500G`` as a whole process, interpreter start included: with a cold
   facts cache (the model is built on the meta device and run under FakeTensorMode once) and
   warm (what every later plan pays).

    python bench/plan_speed.py
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile
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
    "offload": ("none", "optimizer", "params", "nvme"),
    "zero_stage": (1, 2, 3),
}


def main() -> int:
    config = compose(["hardware=bi_v150", "model.scale=13b", "nproc_per_node=1"], detect_accelerator=False)
    arch = Architecture.for_case("baichuan2_13b", config.model)
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
    repo = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, MEMDIAG_CACHE=cache)
        # a user's ds_config is checked by the installed DeepSpeed (an import of seconds) once per
        # zero section and version; later plans read the cached verdict
        users = Path(cache) / "ds_config.json"
        users.write_text('{"train_micro_batch_size_per_gpu": "auto", "bf16": {"enabled": "auto"}, '
                         '"zero_optimization": {"stage": 3, "overlap_comm": true, "reduce_bucket_size": "auto"}}')
        for extra in ([], ["--ds-config", str(users), "micro_batch=1", "dtype=bf16"]):  # what its "auto" leaves to the Trainer
            for label in ("cold cache", "warm cache", "warm cache"):
                started = time.perf_counter()
                subprocess.run([sys.executable, "-m", "memdiag", "plan", "--host-ram", "500G", *extra], cwd=repo, env=env,
                               check=True, capture_output=True)
                print(f"memdiag plan --host-ram 500G{' --ds-config USERS.json' if extra else ''}, whole process ({label}): "
                      f"{time.perf_counter() - started:.2f} s" + (" (target < 1 s)" if label == "warm cache" else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
