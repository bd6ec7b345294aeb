"""Where a CUDA rank's device memory went, phase by phase: what nvidia-smi shows (NVML's used
figure for the process) split into the tensors allocated at the phase's peak, the caching
allocator's reserve above them (cache and fragmentation; the inactive split bytes are the
fragmented part) and what lives outside torch's allocator (CUDA context, NCCL, cuBLAS
workspaces). The allocated and reserved peaks are exact (read from the allocator's peak counters
at every phase boundary); NVML's is the highest sample in the phase. The report draws it, the
markdown report tables it, and ``plan --calibrate`` fits the allocator reserve from it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memdiag.timeline.reader import RankTimeline, Run

CUDA_SOURCE_MARK = "torch.cuda allocator"


@dataclass(frozen=True)
class PhaseDevice:
    phase: str
    allocated_peak_bytes: int
    reserved_peak_bytes: int | None
    nvml_used_peak_bytes: int | None
    inactive_split_bytes: int | None

    @property
    def cache_bytes(self) -> int | None:
        """Reserved above the allocated peak: what the caching allocator keeps (never negative)."""
        if self.reserved_peak_bytes is None:
            return None
        return max(0, self.reserved_peak_bytes - self.allocated_peak_bytes)

    @property
    def outside_torch_bytes(self) -> int | None:
        """NVML's used figure above torch's reserve: context, NCCL, workspaces (never negative)."""
        if self.nvml_used_peak_bytes is None or self.reserved_peak_bytes is None:
            return None
        return max(0, self.nvml_used_peak_bytes - self.reserved_peak_bytes)


def is_cuda(track: RankTimeline) -> bool:
    return CUDA_SOURCE_MARK in str(track.header.get("device_source") or "")


def reconcile(run: Run) -> tuple[int, list[PhaseDevice]] | None:
    """(rank, its phases in order of first appearance) for the lowest rank that recorded CUDA's
    allocator; None for runs without one (the CPU accelerator has no cache or context)."""
    rank = next((r for r in run.rank_ids if is_cuda(run.ranks[r])), None)
    if rank is None:
        return None
    return rank, phase_devices(run.ranks[rank])


def phase_devices(track: RankTimeline) -> list[PhaseDevice]:
    t = np.asarray(track.t_ns)
    columns = {name: track.columns.get(name) for name in ("device_allocated_bytes", "device_reserved_bytes", "nvml_used_bytes")}
    by_name: dict[str, dict[str, list[float]]] = {}
    for phase in track.phases:
        figures = by_name.setdefault(phase.name, {"allocated": [], "reserved": [], "nvml": [], "inactive": []})
        end = phase.end_ns if phase.end_ns is not None else np.iinfo(np.int64).max
        inside = (t >= phase.begin_ns) & (t <= end)

        def sampled(name: str) -> float | None:
            values = columns[name]
            if values is None or not inside.any():
                return None
            window = np.asarray(values, dtype=float)[inside]
            return None if np.isnan(window).all() else float(np.nanmax(window))

        # exact peaks where the phase recorded them; the highest sample otherwise (runs before 1.3)
        for key, exact, column in (("allocated", phase.device_peak_bytes, "device_allocated_bytes"),
                                   ("reserved", phase.device_reserved_peak_bytes, "device_reserved_bytes"),
                                   ("nvml", None, "nvml_used_bytes")):
            value = exact if exact is not None else sampled(column)
            if value is not None:
                figures[key].append(float(value))
        inactive = (phase.end_event or {}).get("device_inactive_split_bytes")
        if inactive is not None:
            figures["inactive"].append(float(inactive))
    rows = []
    for name, figures in by_name.items():
        if not figures["allocated"]:
            continue
        top = {key: int(max(values)) if values else None for key, values in figures.items()}
        rows.append(PhaseDevice(name, top["allocated"], top["reserved"], top["nvml"], top["inactive"]))
    return rows
