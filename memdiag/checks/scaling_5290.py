"""scaling_5290: host RAM that grows with local ranks because every rank holds the whole model.

DeepSpeed issue 5290: built outside ``deepspeed.zero.Init`` (or read by every rank from every
checkpoint shard), each rank materialises all parameters (fp32 unless a dtype is given) before
``deepspeed.initialize`` partitions them, so node host RAM = ranks x model size. With zero.Init
a rank only ever holds its 1/world share plus one layer at a time.
"""

from __future__ import annotations

import numpy as np

from memdiag.checks.finding import Finding
from memdiag.checks.loadphase import (
    RanksForecast, full_node_ranks, limit_of, model_event, num_parameters, ranks_forecast, run_loads,
)
from memdiag.stacks import built_at, phase_table
from memdiag.timeline.reader import Run
from memdiag.units import format_bytes


def _where_built(run: Run) -> tuple[str, dict]:
    """`` (built at FILE:LINE, in FUNCTION: X live at the load peak on rank R)`` from the load
    phase's allocation stacks, when they were captured."""
    table = phase_table(run.path, "load")
    where = built_at(table) if table else None
    if not where:
        return "", {}
    return (f"; built at {where['file']}:{where['line']} (in {where['function']}): {format_bytes(where['bytes'])} "
            f"live at rank {where['rank']}'s load peak"), {"built_at": where}

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


WHOLE_MODEL_FRACTION = 0.9
"""A rank whose unpartitioned parameters come to this share of parameters x dtype bytes holds
the whole model (buffers and tied weights make the rest)."""
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}

FIX_BY_BUILDER = {
    "constructor": """\
# build the model partitioned: each rank materialises only its 1/world share
import deepspeed, torch
with deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=torch.bfloat16):
    model = {cls}(config)
engine, *_ = deepspeed.initialize(model=model, config=ds_config, ...)""",
    "from_pretrained": """\
# let transformers build under zero.Init and load one shard at a time: create the DeepSpeed
# config object BEFORE from_pretrained and keep it alive (TrainingArguments(deepspeed=ds_config)
# does the same when created first)
from transformers.integrations import HfDeepSpeedConfig
dschf = HfDeepSpeedConfig(ds_config)          # keep this reference
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
engine, *_ = deepspeed.initialize(model=model, config=ds_config, ...)""",
    "from_config": """\
# create the DeepSpeed config first, then build: transformers enters zero.Init itself
args = TrainingArguments(..., deepspeed=ds_config)   # or: dschf = HfDeepSpeedConfig(ds_config)
model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
trainer = Trainer(model=model, args=args, ...)""",
}
HOW_BUILT = {
    "constructor": "built by its constructor ({cls}(config)) outside deepspeed.zero.Init",
    "from_pretrained": "loaded with from_pretrained while no DeepSpeed ZeRO-3 config was alive "
    "(HfDeepSpeedConfig / TrainingArguments(deepspeed=...) created after it, or not at all)",
    "from_config": "built with from_config outside HfDeepSpeedConfig (TrainingArguments(deepspeed=...) "
    "created after the model)",
}


def model_inputs(run: Run) -> list[tuple[int, dict, int, str]]:
    """(rank, model_input event, local ranks, host) for every rank that recorded one."""
    found = []
    for rank, timeline in sorted(run.ranks.items()):
        event = next((e for e in timeline.events if e["kind"] == "model_input"), None)
        if event is not None:
            found.append((rank, event, int(timeline.header.get("local_world_size", 1)), timeline.header.get("host", "?")))
    return found


def check_model_input(run: Run) -> list[Finding]:
    """The pattern from what each rank handed deepspeed.initialize, whoever's code built it:
    unpartitioned under ZeRO-3, its parameters all materialised, on every rank."""
    inputs = model_inputs(run)
    if not inputs:
        return []
    stage = next((e.get("zero_stage") for _, e, _, _ in inputs if e.get("zero_stage") is not None), None)
    if stage is None:
        stage = (model_event(run) or {}).get("zero_stage")
    if stage != 3:
        return []
    whole = []
    for rank, event, _, _ in inputs:
        n = int(event.get("num_parameters") or 0)
        per = DTYPE_BYTES.get(str(event.get("dtype", "")).removeprefix("torch."), 2)
        if n and not event.get("partitioned") and event.get("materialised_bytes", 0) >= WHOLE_MODEL_FRACTION * n * per:
            whole.append(rank)
    if not whole or len(whole) < len(inputs):
        return []
    event = inputs[0][1]
    n, dtype = int(event["num_parameters"]), str(event.get("dtype", "?")).removeprefix("torch.")
    copy = int(max(e["materialised_bytes"] for _, e, _, _ in inputs))
    local = max(lw for _, _, lw, _ in inputs)
    # the one forecast host_limit_forecast quotes too, so the two never disagree
    ranks = ranks_forecast(run)
    per_rank_peak = ranks.node.load_per_rank_bytes if ranks else copy
    limit, _ = limit_of(run)
    forecast = ranks.table if ranks else {k: k * copy for k in sorted({1, 2, 4, 8, 16, local})}
    judged = full_node_ranks(run) or max(8, local)
    over = bool(limit and forecast.get(judged, judged * per_rank_peak) > limit)
    severity = "error" if local >= 2 and over else "warning"
    via = event.get("built_by", "constructor")
    cls = event.get("model_class", "Model")
    how = HOW_BUILT.get(via, via).format(cls=cls)
    fix = FIX_BY_BUILDER.get(via, FIX_CODE).replace("{cls}", cls)
    if dtype == "float32":
        fix += "\n# and give the dtype you train in: an fp32 copy is twice a bf16 one"
    causes = [f"the model was {how}", f"every rank held all {n / 1e6:,.1f}M parameters in {dtype}"]
    fits = ", ".join(f"{k} ranks {format_bytes(v)}" for k, v in forecast.items())
    verdict = ranks.sentence() if ranks else ("no host limit known" if not limit else
                                              RanksForecast(node=None, table=forecast, limit=limit).sentence())
    where, where_evidence = _where_built(run)
    return [
        Finding(
            id="scaling_5290",
            severity=severity,
            message=f"each rank handed deepspeed.initialize the whole model: {format_bytes(copy)} "
            f"({n / 1e6:,.1f}M parameters in {dtype}) on every one of {len(inputs)} rank(s), {how}{where}; the "
            f"DeepSpeed issue 5290 pattern: node host RAM grows by a whole copy per local rank. "
            f"Load peak per rank {format_bytes(per_rank_peak)}, so a node needs about {fits}; {verdict}"
            + ("" if local >= 2 else " (one local rank here: a forecast)"),
            evidence={
                "num_parameters": n,
                "dtype": dtype,
                "built_by": via,
                "hf_deepspeed_config": bool(event.get("hf_deepspeed_config")),
                "materialised_bytes_by_rank": {str(r): e["materialised_bytes"] for r, e, _, _ in inputs},
                "per_rank_load_peak_bytes": per_rank_peak,
                "local_ranks": local,
                "node_load_peak_bytes_by_local_ranks": {str(k): v for k, v in forecast.items()},
                "limit_bytes": limit,
                "causes": causes,
            } | where_evidence,
            fix=fix,
            ranks=whole,
            moments=[{"t": event["t"], "label": "whole model at deepspeed.initialize (5290)"}],
        )
    ]


def check(run: Run) -> list[Finding]:
    from_input = check_model_input(run)
    if from_input:
        return from_input
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
    where, where_evidence = _where_built(run)
    return [
        Finding(
            id="scaling_5290",
            severity="error",
            message=f"each rank spent {format_bytes(model_bytes)} of host RAM loading the model "
            f"({model_bytes / (4 * n):.2f}x an fp32 copy of {n / 1e6:,.1f}M parameters) instead of a "
            f"1/{world} share, so node host RAM grows by that much per local rank ({local} here: "
            f"{format_bytes(model_bytes * local)}); the DeepSpeed issue 5290 pattern. Cause: "
            + ("; ".join(found) if found else "the whole model was materialised on every rank") + where,
            evidence=evidence | {"causes": found} | where_evidence,
            fix=FIX_CODE,
            ranks=[l.rank for l in loads],
            moments=[{"t": max(l.load_end_ns for l in loads), "label": "load peak (5290)"}],
        )
    ]


MIN_NOISE_BYTES = 8 * 2**20
"""Below this the fit cannot tell a slope from page-granular noise."""


def fit_noise_floor(x, y, slope: float, intercept: float) -> float:
    """Twice the slope's standard error from the fit's residuals (with two rank counts there is
    none to measure: the fixed minimum)."""
    if len(x) <= 2:
        return float(MIN_NOISE_BYTES)
    residual = y - (slope * x + intercept)
    spread = float(np.sum((x - x.mean()) ** 2))
    stderr = float(np.sqrt(np.sum(residual**2) / (len(x) - 2) / spread)) if spread else 0.0
    return max(2 * stderr, float(MIN_NOISE_BYTES))


def check_many(runs: list[Run]) -> list[Finding]:
    """Across runs of one model at different local rank counts: fit node load bytes vs ranks."""
    points: dict[tuple, list[tuple[int, int]]] = {}
    partitioned: dict[tuple, list[bool]] = {}
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
        inputs = model_inputs(run)
        partitioned.setdefault((n, load_mode), []).append(bool(inputs) and all(e.get("partitioned") for _, e, _, _ in inputs))
    findings = []
    for (n, load_mode), pts in points.items():
        ranks = sorted({p[0] for p in pts})
        if len(ranks) < 2:
            continue
        x = np.array([p[0] for p in pts], dtype=float)
        y = np.array([p[1] for p in pts], dtype=float)
        slope, intercept = np.polyfit(x, y, 1)
        noise = fit_noise_floor(x, y, slope, intercept)
        fp32_copy, bf16_copy = 4 * n, 2 * n
        # the judge is the model's own copy: half a bf16 copy per rank is already a whole model
        # on every rank, at any scale; the noise floor only keeps run-to-run jitter out
        grows = slope >= max(FULL_COPY_FRACTION * bf16_copy, noise)
        # the runs' own evidence decides the cause: a model handed over whole on every rank is
        # 5290; one handed over partitioned grew by what zero.Init keeps in flight per rank
        whole = grows and not all(partitioned[(n, load_mode)])
        verdict = (
            "; that is the 5290 pattern: a whole copy per rank" if whole
            else "; the model reached deepspeed.initialize partitioned, so this is what zero.Init holds in flight "
            "per rank (each whole tensor of a random init is written in fp32, then broadcast)" if grows
            else "; below half a bf16 copy per rank: loading does not scale with ranks"
        )
        findings.append(
            Finding(
                id="scaling_5290_fit",
                severity="error" if whole else "warning" if grows else "info",
                message=f"load={load_mode}: node load-phase host RAM grows {format_bytes(slope)} per local rank "
                f"({slope / fp32_copy:.2f}x an fp32 copy of the model, {format_bytes(fp32_copy)}; {slope / bf16_copy:.2f}x a "
                f"bf16 copy) over {len(pts)} runs at {ranks} ranks; noise floor {format_bytes(noise)}" + verdict,
                evidence={
                    "load": load_mode,
                    "slope_bytes_per_rank": int(slope),
                    "intercept_bytes": int(intercept),
                    "noise_floor_bytes": int(noise),
                    "points": [{"local_ranks": a, "node_load_bytes": b} for a, b in pts],
                    "fp32_full_model_bytes": fp32_copy,
                    "bf16_full_model_bytes": bf16_copy,
                },
                fix=FIX_CODE if whole else "",
            )
        )
    return findings
