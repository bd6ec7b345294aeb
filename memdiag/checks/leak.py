"""leak: memory that keeps growing step after step once training is steady.

A Theil-Sen slope (the median of pairwise slopes, robust to a few outliers such as a
checkpoint save) of the resident figure at the start of every step, warm-up excluded, for host
RSS and device allocation separately. Over a short steady window growth must be large (2% of
the resident figure a step) and consistent (the values rise with the step number); glibc arenas
and caching allocators grow in a few jumps early on and then level off, which is not a leak.
Over a long window (LONG_WINDOW_STEPS and more) the run's own noise decides: a slope three
standard errors above zero (from the residuals around it) that still holds in the second half
is a leak however small against the process (9 MiB a step in a 1.8 GiB rank over 200 steps),
and the finding says when, at that rate, the node reaches its host limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memdiag.checks.finding import Finding
from memdiag.timeline.reader import Run
from memdiag.units import format_bytes

MIN_STEADY_STEPS = 8
RELATIVE_THRESHOLD = 0.02
RELATIVE_CAP_BYTES = 64 * 2**20
"""Growth per step that counts: 2% of the resident figure where the steady window starts (not
its mean, which a leak would raise), at most 64 MiB (64 GiB over 1000 steps is always a leak).
A healthy CPU-accelerator rank creeps up to ~1% a step for dozens of steps as glibc arenas
fill in jumps, and one CI run saw 1.05%."""
MIN_RANK_CORRELATION = 0.85
"""Growth must be consistent, not a few allocator jumps among +-50 MB of step-to-step noise."""
LONG_WINDOW_STEPS = 40
"""Over this many steady steps a slope is trusted even when it grows in jumps."""
WARMUP_FRACTION = 0.5
"""The first half of the steps is warm-up: glibc arenas and caches keep growing for a dozen steps."""
MIN_WARMUP_STEPS = 3
HOST_THRESHOLD_BYTES_PER_STEP = 2 * 2**20
DEVICE_THRESHOLD_BYTES_PER_STEP = 2**20


def theil_sen(x: np.ndarray, y: np.ndarray) -> float:
    i, j = np.triu_indices(len(x), k=1)
    dx = x[j] - x[i]
    keep = dx != 0
    return float(np.median((y[j] - y[i])[keep] / dx[keep]))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Rank correlation: 1.0 when every step is higher than the one before."""
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    if np.std(rx) == 0 or np.std(ry) == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


@dataclass(frozen=True)
class Growth:
    slope: float
    late_slope: float
    rho: float
    threshold: float
    """The slope that counts: 2% of the resident figure a step over a short window; the
    floor or three standard errors of the slope, whichever is larger, over a long one."""
    sustained: bool
    """Consistent growth: rank-ordered (short window), or still growing in the second half (long)."""
    standard_error: float = 0.0

    @property
    def leaks(self) -> bool:
        return self.slope >= self.threshold and self.sustained


def slope_standard_error(steps: np.ndarray, values: np.ndarray, slope: float) -> float:
    """The slope's standard error from the residuals around it (a robust sigma: 1.4826 MAD)."""
    residuals = values - slope * steps
    residuals = residuals - np.median(residuals)
    sigma = 1.4826 * float(np.median(np.abs(residuals)))
    spread = float(np.sum((steps - steps.mean()) ** 2))
    return sigma / np.sqrt(spread) if spread > 0 else float("inf")


def steady_growth(steps: np.ndarray, values: np.ndarray, floor_bytes: float) -> Growth:
    """How the steady window grows, and whether that is a leak (see the module docstring)."""
    slope = theil_sen(steps, values)
    half = len(steps) // 2
    late_slope = theil_sen(steps[half:], values[half:])
    rho = spearman(steps, values)
    if len(steps) >= LONG_WINDOW_STEPS:
        error = slope_standard_error(steps, values, slope)
        threshold = max(floor_bytes, 3 * error)
        return Growth(slope, late_slope, rho, threshold, late_slope >= slope / 2, error)
    threshold = max(floor_bytes, min(RELATIVE_THRESHOLD * float(values[0]), RELATIVE_CAP_BYTES))
    return Growth(slope, late_slope, rho, threshold, rho >= MIN_RANK_CORRELATION)


def step_series(run: Run, rank: int, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(step, value) at the first forward of every step."""
    seen, steps, values = set(), [], []
    for event in run.ranks[rank].events:
        if event["kind"] == "phase_begin" and event["phase"] == "forward" and event.get(key) is not None:
            step = event.get("step", 0)
            if step in seen:
                continue
            seen.add(step)
            steps.append(step)
            values.append(event[key])
    return np.array(steps, dtype=float), np.array(values, dtype=float)


def check(run: Run) -> list[Finding]:
    findings = []
    device_is_host = any("process RSS" in (t.header.get("device_source") or "") for t in run.ranks.values())
    series = [("host", "rss_bytes", HOST_THRESHOLD_BYTES_PER_STEP)]
    if not device_is_host:
        series.append(("device", "device_allocated_bytes", DEVICE_THRESHOLD_BYTES_PER_STEP))
    for memory, key, threshold in series:
        for rank in run.rank_ids:
            steps, values = step_series(run, rank, key)
            warmup = max(MIN_WARMUP_STEPS, int(len(steps) * WARMUP_FRACTION))
            steps, values = steps[warmup:], values[warmup:]
            if len(steps) < MIN_STEADY_STEPS:
                continue
            growth = steady_growth(steps, values, threshold)
            if not growth.leaks:
                continue  # no growth, or the allocator's staircase: a few jumps that level off
            slope, late_slope, rho, threshold = growth.slope, growth.late_slope, growth.rho, growth.threshold
            reach = time_to_limit(run, rank, slope) if memory == "host" else None
            findings.append(
                Finding(
                    id=f"leak_{memory}",
                    severity="warning",
                    message=f"rank {rank}: {memory} memory grows {format_bytes(slope)} per step over "
                    f"{len(steps)} steady steps (steps {int(steps[0])}-{int(steps[-1])}, warm-up excluded"
                    + (f"; {slope / growth.standard_error:.0f} standard errors above the run's noise" if growth.standard_error else "")
                    + f"); at that rate 1000 more steps add {format_bytes(slope * 1000)}"
                    + (f"; {reach[2]}" if reach else ""),
                    evidence={
                        "rank": rank,
                        "memory": memory,
                        "slope_bytes_per_step": int(slope),
                        "late_slope_bytes_per_step": int(late_slope),
                        "rank_correlation": rho,
                        "threshold_bytes_per_step": threshold,
                        "first_step": int(steps[0]),
                        "last_step": int(steps[-1]),
                        "first_bytes": int(values[0]),
                        "last_bytes": int(values[-1]),
                        "standard_error_bytes_per_step": growth.standard_error,
                        "steps_to_host_limit": None if reach is None else reach[0],
                        "seconds_to_host_limit": None if reach is None else reach[1],
                    },
                    fix="look for tensors kept across steps: losses or outputs appended to a list without "
                    ".item()/.detach(), caches keyed by step, hooks that store inputs; compare two "
                    "steps with torch.cuda.memory_snapshot() or tracemalloc on the host",
                    ranks=[rank],
                )
            )
    return findings


def time_to_limit(run: Run, rank: int, slope: float) -> tuple[int, float | None, str] | None:
    """(steps, seconds, words) until the rank's node reaches its host limit, if every rank of
    the node grows as this one does; None without a limit."""
    limit = run.spec.get("host_limit_bytes")
    host = run.ranks[rank].header.get("host")
    local = [r for r in run.rank_ids if run.ranks[r].header.get("host") == host] or [rank]
    lasts = [step_series(run, r, "rss_bytes")[1] for r in local]
    node_now = sum(float(v[-1]) for v in lasts if len(v))
    if not limit or slope <= 0 or node_now <= 0:
        return None
    steps = max(0, int((limit - node_now) / (slope * len(local))))
    first_forward: dict[int, int] = {}
    for e in run.ranks[rank].events:
        if e["kind"] == "phase_begin" and e["phase"] == "forward" and "t" in e:
            first_forward.setdefault(e.get("step", 0), e["t"])
    starts = [first_forward[k] for k in sorted(first_forward)]
    step_s = float(np.median(np.diff(starts))) / 1e9 if len(starts) > 2 else None
    seconds = None if step_s is None else steps * step_s
    when = f"about {steps} more steps" + (f" ({_duration(steps * step_s)})" if step_s else "")
    return steps, seconds, f"the node reaches its {format_bytes(limit)} host limit in {when} if its {len(local)} rank(s) grow alike"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
