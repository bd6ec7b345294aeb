"""scaling_5290: host RAM that grows with local ranks because every rank holds the whole model.

DeepSpeed issue 5290: built outside ``deepspeed.zero.Init`` (or read by every rank from every
checkpoint shard), each rank materialises all parameters (fp32 unless a dtype is given) before
``deepspeed.initialize`` partitions them, so node host RAM = ranks x model size. With zero.Init
a rank only ever holds its 1/world share plus one layer at a time.
"""

from __future__ import annotations

import numpy as np

from memdiag.checks.finding import Finding
from memdiag.checks.loadphase import model_event, num_parameters, run_loads
from memdiag.timeline.reader import Run
from memdiag.units import format_bytes

FULL_COPY_FRACTION = 0.5
"""A rank whose load cost is at least half a bf16 copy of the model holds the whole model."""
NOISE_FLOOR_BYTES = 96 * 2**20
"""Below this, a load's cost is runtime growth (zero.Init's own modules, allocator arenas)."""

FIX_CODE = """\
# build partitioned: each rank materialises only its 1/world share
import deepspeed, torch
with deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=torch.bfloat16):
    model = AutoModelForCausalLM.from_config(config)          # or from_pretrained(dir) with
# HfDeepSpeedConfig(ds_config) alive beforehand, so transformers enters zero.Init itself
# and loads one shard at a time; or memdiag's helper:
#   from memdiag.loading import load_zero3; model = load_zero3(cls, dir, ds_config)
engine, *_ = deepspeed.initialize(model=model, config=ds_config, ...)"""


def causes(run: Run, built_under_zero_init: bool, read_checkpoint: bool) -> list[str]:
    found = []
    model_input = model_event(run, "model_input") or {}
    if not built_under_zero_init or model_input.get("partitioned") is False:
        found.append("the model was built outside deepspeed.zero.Init (every rank holds all parameters)")
    dtype = model_input.get("dtype", "")
    if "float32" in dtype:
        found.append("the parameters were materialised in fp32 (4 bytes each; no dtype given at load)")
    if read_checkpoint and not built_under_zero_init:
        found.append("every rank read every checkpoint shard")
    return found


def check(run: Run) -> list[Finding]:
    loads = run_loads(run)
    n = num_parameters(run)
    if not loads or not n:
        return []
    model_bytes = int(np.mean([l.model_bytes for l in loads]))
    bf16_full = 2 * n
    world = max(len(run.ranks), 1)
    evidence = {
        "num_parameters": n,
        "per_rank_load_bytes": {str(l.rank): l.model_bytes for l in loads},
        "mean_load_bytes": model_bytes,
        "bf16_full_model_bytes": bf16_full,
        "fp32_full_model_bytes": 4 * n,
        "share_bytes_bf16": bf16_full // world,
        "local_ranks": max(l.local_world_size for l in loads),
    }
    if model_bytes < max(FULL_COPY_FRACTION * bf16_full, NOISE_FLOOR_BYTES):
        return []
    built = all(l.built_under_zero_init for l in loads)
    found = causes(run, built, any(l.read_checkpoint for l in loads))
    if not found and model_bytes < 4 * n:
        return []  # partitioned at build and no whole fp32 copy's worth of growth: not 5290
    local = evidence["local_ranks"]
    return [
        Finding(
            id="scaling_5290",
            severity="error",
            message=f"each rank spent {format_bytes(model_bytes)} of host RAM loading the model "
            f"({model_bytes / (4 * n):.2f}x an fp32 copy of {n / 1e6:,.1f}M parameters) instead of a "
            f"1/{world} share, so node host RAM grows by that much per local rank ({local} here: "
            f"{format_bytes(model_bytes * local)}); the DeepSpeed issue 5290 pattern. Cause: "
            + ("; ".join(found) if found else "the whole model was materialised on every rank"),
            evidence=evidence | {"causes": found},
            fix=FIX_CODE,
            ranks=[l.rank for l in loads],
            moments=[{"t": max(l.load_end_ns for l in loads), "label": "load peak (5290)"}],
        )
    ]


def check_many(runs: list[Run]) -> list[Finding]:
    """Across runs of one model at different local rank counts: fit node load bytes vs ranks."""
    points: dict[tuple, list[tuple[int, int]]] = {}
    for run in runs:
        loads = run_loads(run)
        n = num_parameters(run)
        if not loads or not n:
            continue
        load_mode = (run.spec.get("config") or {}).get("load", "?")
        by_host: dict[str, int] = {}
        for l in loads:
            by_host[l.host] = by_host.get(l.host, 0) + l.model_bytes
        for host, total in by_host.items():
            local = sum(1 for l in loads if l.host == host)
            points.setdefault((n, load_mode), []).append((local, total))
    findings = []
    for (n, load_mode), pts in points.items():
        ranks = sorted({p[0] for p in pts})
        if len(ranks) < 2:
            continue
        x = np.array([p[0] for p in pts], dtype=float)
        y = np.array([p[1] for p in pts], dtype=float)
        slope, intercept = np.polyfit(x, y, 1)
        grows = slope >= max(FULL_COPY_FRACTION * 2 * n, NOISE_FLOOR_BYTES)
        findings.append(
            Finding(
                id="scaling_5290_fit",
                severity="error" if grows else "info",
                message=f"load={load_mode}: node load-phase host RAM grows {format_bytes(slope)} per local rank "
                f"({slope / (4 * n):.2f}x an fp32 copy of the model) over {len(pts)} runs at {ranks} ranks"
                + ("; that is the 5290 pattern" if grows else "; flat enough: loading does not scale with ranks"),
                evidence={
                    "load": load_mode,
                    "slope_bytes_per_rank": int(slope),
                    "intercept_bytes": int(intercept),
                    "points": [{"local_ranks": a, "node_load_bytes": b} for a, b in pts],
                    "fp32_full_model_bytes": 4 * n,
                },
                fix=FIX_CODE if grows else "",
            )
        )
    return findings
