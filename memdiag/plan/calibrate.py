"""Calibration: each term against what recorded runs measured; fit the empirical coefficients.

Measured per run (from the one reader): model states per rank (categorised memory after a step:
parameters, gradients, optimizer states), saved activations (after a forward), the runtime
base (RSS before the model build), the node's load-phase host peak and its whole-run peak.
Fitted: ``host_runtime_bytes`` (the mean runtime base) and, for the CPU accelerator's host RAM
while training, three coefficients by least squares: bytes per byte of training state (the
optimizer step's fp32 temporaries), bytes per model parameter on every rank (ZeRO-3 buckets),
and a fixed amount per rank (communication buffers, allocator arenas). bench/plan_accuracy
judges them out of sample (leave one run out).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from memdiag.checks.loadphase import run_loads
from memdiag.errors import UsageError
from memdiag.plan.model import Architecture
from memdiag.plan.terms import DEVICE_USED_ONLY, DTYPE_BYTES, Coefficients, Settings, device_terms, forward_saved_bytes, host_terms
from memdiag.summary import summarize
from memdiag.tables import render
from memdiag.timeline import read_run
from memdiag.timeline.reader import Run


def load_coefficients(path: Path) -> Coefficients:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"--coefficients {path}: {exc}") from None
    known = Coefficients().to_dict()
    unknown = set(data) - set(known)
    if unknown:
        raise UsageError(f"--coefficients {path}: unknown fields {sorted(unknown)}")
    return replace(Coefficients(), **data)


@dataclass(frozen=True)
class Observation:
    name: str
    arch: Architecture
    settings: Settings
    world: int
    local_ranks: int
    measured: dict[str, float]
    """Bytes, by the term ``predict`` names."""
    cpu_accelerator: bool = True
    """DeepSpeed's CPU accelerator: the training states live in host RAM (the steady host fit
    reads only such runs; on CUDA they are device memory)."""
    reserve_layers: float | None = None
    """What the caching allocator held above the allocated peak, in gathered layers; CUDA runs only."""


def observe(run: Run) -> Observation:
    config = run.spec.get("config")
    if not config:
        raise UsageError(f"{run.path}: no run.json config; calibrate from `memdiag run` runs")
    from memdiag.config import RunConfig
    from memdiag.plan.inputs import for_run

    try:
        arch, settings = for_run(RunConfig.from_dict(config))  # as `memdiag run` planned it
    except (TypeError, KeyError, OSError) as exc:
        raise UsageError(f"{run.path}: run.json's config cannot be read back ({exc}); calibrate from runs of this memdiag") from None
    rank0 = run.ranks[run.rank_ids[0]]
    memory = [e for e in rank0.events if e["kind"] == "memory"]
    after_step = [m for m in memory if m["phase"] == "step"]
    after_forward = [m for m in memory if m["phase"] == "forward"]
    if not after_step or not after_forward:
        raise UsageError(f"{run.path}: no categorised memory after a forward and a step")
    last = after_step[-1]
    loads = run_loads(run)
    load_per_node: dict[str, int] = {}
    for load in loads:
        load_per_node[load.host] = load_per_node.get(load.host, 0) + load.load_peak_bytes
    summary = summarize(run)
    measured = {
        "parameters": last["parameters_bytes"],
        "gradients": last["gradients_bytes"],
        "optimizer_states": last["optimizer_master_bytes"] + last["optimizer_exp_avg_bytes"] + last["optimizer_exp_avg_sq_bytes"],
        "saved_activations": max(m["activations_bytes"] for m in after_forward),
        "runtime_base_per_rank": float(np.mean([l.baseline_bytes for l in loads])),
        "host_load_per_node": float(max(load_per_node.values())),
        "host_peak_per_node": float(max(summary.host_peak_bytes_per_node.values())),
    }
    local = max(t.header.get("local_world_size", 1) for t in run.ranks.values())
    cpu_accelerator = (config.get("hardware") or {}).get("accelerator", "cpu") == "cpu"
    exact = [p.device_peak_bytes for p in rank0.phases if p.device_peak_bytes is not None]
    if not cpu_accelerator and exact:
        measured["device_allocated_peak"] = float(max(exact))  # torch.cuda.max_memory_allocated, per phase
    return Observation(run.path.name, arch, settings, len(run.ranks), local, measured,
                       cpu_accelerator=cpu_accelerator, reserve_layers=cuda_reserve_layers(run, arch, settings))


def cuda_reserve_layers(run: Run, arch: Architecture, settings: Settings) -> float | None:
    """What the caching allocator held above the allocated peak, in gathered layers (the unit of
    ``allocator_reserve_layers``), the median over ranks; None unless the run sampled CUDA's
    allocator (the CPU accelerator has no reserve to measure). The peaks are the phases' exact
    ones (``memdiag.reconcile``; the highest samples in runs recorded before they were kept)."""
    from memdiag.reconcile import is_cuda, phase_devices

    layer_bytes = DTYPE_BYTES[settings.dtype] * arch.largest_layer_params
    found = []
    for track in run.ranks.values():
        if not is_cuda(track):
            continue
        phases = phase_devices(track)
        allocated = [p.allocated_peak_bytes for p in phases]
        reserved = [p.reserved_peak_bytes for p in phases if p.reserved_peak_bytes is not None]
        if len(track.t_ns):  # a sampled value above every phase's (a sample outside any phase)
            for values, column in ((allocated, "device_allocated_bytes"), (reserved, "device_reserved_bytes")):
                sampled = track.columns.get(column)
                if sampled is not None and not np.isnan(sampled).all():
                    values.append(float(np.nanmax(sampled)))
        if allocated and reserved:
            found.append((max(reserved) - max(allocated)) / layer_bytes)
    return float(np.median(found)) if found else None


def predict(obs: Observation, c: Coefficients) -> dict[str, float]:
    dev = device_terms(obs.arch, obs.settings, obs.world, c)
    load, steady = host_terms(
        obs.arch, obs.settings, local_ranks=obs.local_ranks, world=obs.world,
        runtime_context_bytes=0, cpu_accelerator=obs.cpu_accelerator, c=c,
    )
    predicted = {
        "parameters": dev["parameters"],
        "gradients": dev["gradients"],
        "optimizer_states": dev["optimizer_states"],
        "saved_activations": forward_saved_bytes(obs.arch, obs.settings, c),
        "runtime_base_per_rank": c.host_runtime_bytes,
        "host_load_per_node": sum(load.values()),
        "host_peak_per_node": max(sum(load.values()), sum(steady.values())),
    }
    if not obs.cpu_accelerator:
        predicted["device_allocated_peak"] = sum(v for k, v in dev.items() if k not in DEVICE_USED_ONLY)
    return predicted


STEADY_FEATURES = ("host_state_factor", "host_bytes_per_model_param", "host_rank_fixed_bytes")


def steady_features(obs: Observation, c: Coefficients) -> tuple[np.ndarray, float]:
    """One rank's steady host RAM as ``features . coefficients + known``: the features are the
    training-state bytes, the model's parameter count and 1; known is runtime + activations."""
    dev = device_terms(obs.arch, obs.settings, obs.world, c)
    states = dev["parameters"] + dev["gradients"] + dev["optimizer_states"]
    known = c.host_runtime_bytes + forward_saved_bytes(obs.arch, obs.settings, c)
    return np.array([states, float(obs.arch.num_parameters), 1.0]), known


def fit(observations: list[Observation], c: Coefficients) -> Coefficients:
    """The runtime base is the mean measured one; the steady coefficients are a least-squares
    fit of each run's peak per local rank, dropping any that would come out negative."""
    runtime = float(np.mean([o.measured["runtime_base_per_rank"] for o in observations]))
    c = replace(c, host_runtime_bytes=runtime, source=f"calibrated on {len(observations)} runs")
    reserves = [o.reserve_layers for o in observations if o.reserve_layers is not None]
    if reserves:
        c = replace(c, allocator_reserve_layers=float(np.median(reserves)))
    # the steady host coefficients describe training states held in host RAM: CPU-accelerator runs
    on_host = [o for o in observations if o.cpu_accelerator]
    if not on_host:
        return c
    rows, targets = [], []
    for obs in on_host:
        features, known = steady_features(obs, c)
        rows.append(features)
        targets.append(obs.measured["host_peak_per_node"] / obs.local_ranks - known)
    x, y = np.array(rows), np.array(targets)
    active = list(range(len(STEADY_FEATURES)))[: max(1, min(len(STEADY_FEATURES), len(on_host)))]
    while active:
        solution, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (solution >= 0).all():
            break
        active.pop(int(np.argmin(solution)))
    fitted = dict.fromkeys(STEADY_FEATURES, 0.0)
    for index, value in zip(active, solution if active else []):
        fitted[STEADY_FEATURES[index]] = float(value)
    return replace(c, **fitted)


def table(observations: list[Observation], c: Coefficients) -> list[dict]:
    rows = []
    for obs in observations:
        predicted = predict(obs, c)
        for term, measured in obs.measured.items():
            rows.append({
                "run": obs.name, "term": term, "predicted_bytes": int(predicted[term]), "measured_bytes": int(measured),
                "error": (predicted[term] - measured) / measured if measured else 0.0,
            })
    return rows


def calibrate_main(run_dirs: list[Path], coefficients: Coefficients, out: Path | None = None) -> int:
    import sys

    observations = []
    for index, path in enumerate(run_dirs, 1):
        print(f"memdiag: reading run {index}/{len(run_dirs)}: {path}", file=sys.stderr, flush=True)
        observations.append(observe(read_run(path)))
    fitted = fit(observations, coefficients)
    rows = table(observations, fitted)
    cells = ([row["run"], row["term"], f"{row['predicted_bytes'] / 2**20:.1f} MiB", f"{row['measured_bytes'] / 2**20:.1f} MiB",
              f"{row['error']:+.1%}"] for row in rows)
    for line in render(["run", "term", "predicted", "measured", "error"], cells, right={2, 3, 4}):
        print(line)
    worst = max(abs(r["error"]) for r in rows)
    print(f"\nfitted: host_runtime_bytes={fitted.host_runtime_bytes / 2**20:.1f} MiB, "
          f"host_state_factor={fitted.host_state_factor:.3f}, host_bytes_per_model_param={fitted.host_bytes_per_model_param:.2f}, "
          f"host_rank_fixed_bytes={fitted.host_rank_fixed_bytes / 2**20:.1f} MiB, "
          f"allocator_reserve_layers={fitted.allocator_reserve_layers:.2f}"
          + ("" if any(o.reserve_layers is not None for o in observations) else " (no CUDA run: the published fit kept)")
          + ("" if any(o.cpu_accelerator for o in observations) else "; host state coefficients kept (no CPU-accelerator run holds its states in host RAM)")
          + f"; worst error {worst:.1%} (in sample)")
    if out:
        out.write_text(json.dumps(fitted.to_dict(), indent=2))
        print(f"coefficients written to {out} (use with --coefficients)")
    return 0
