"""device_headroom: the device peak against capacity, fragmentation and allocator retries."""

from __future__ import annotations

from memdiag.checks.finding import Finding
from memdiag.device_stacks import read_device_tables
from memdiag.stacks import cite
from memdiag.timeline.reader import Run
from memdiag.units import format_bytes
import numpy as np

WARN_FRACTION = 0.9
FRAGMENTATION_FRACTION = 0.2


def capacity_of(run: Run, header: dict) -> tuple[int | None, str]:
    """The device's capacity: what the device reported (a real device's usable total is below
    its datasheet figure, e.g. an H200's about 140 GiB of 141), else the hardware profile's."""
    if "torch.cuda" in str(header.get("device_source") or "") and header.get("device_total_bytes"):
        return header["device_total_bytes"], "reported by the device (torch.cuda)"
    hardware = (run.spec.get("config") or {}).get("hardware") or {}
    if hardware.get("device_memory_bytes"):
        return hardware["device_memory_bytes"], f"hardware profile {hardware.get('name')}"
    return header.get("device_total_bytes"), header.get("device_source") or "device probe"


def check(run: Run) -> list[Finding]:
    findings = []
    device_tables = read_device_tables(run.path)  # CUDA runs: the first steps' device stacks
    for rank, timeline in sorted(run.ranks.items()):
        capacity, source = capacity_of(run, timeline.header)
        peak = timeline.device_peak_bytes()
        if not capacity or peak is None:
            continue
        reserved = timeline.columns["device_reserved_bytes"]
        allocated = timeline.columns["device_allocated_bytes"]
        peak_reserved = None if np.all(np.isnan(reserved)) else int(np.nanmax(reserved))
        top = max(peak, peak_reserved or 0)
        if top > WARN_FRACTION * capacity:
            lines, cited = cite(next((t for t in device_tables if t.get("rank") == rank), None))
            findings.append(
                Finding(
                    id="device_headroom",
                    severity="error" if top > capacity else "warning",
                    message=f"rank {rank}: device memory peaked at {format_bytes(top)}, "
                    f"{top / capacity:.0%} of {format_bytes(capacity)} ({source})" + lines,
                    evidence={"rank": rank, "peak_bytes": top, "capacity_bytes": capacity, "capacity_source": source,
                              "top_stacks": cited},
                    fix="lower micro_batch or seq_len, enable activation checkpointing, or add ranks so ZeRO-3 "
                    "partitions the model states further; see the categorised memory for the largest part",
                    ranks=[rank],
                )
            )
        if peak_reserved is not None and not np.array_equal(reserved, allocated, equal_nan=True):
            gap = reserved - allocated
            worst = int(np.nanmax(gap))
            if worst > FRAGMENTATION_FRACTION * peak_reserved and worst > 256 * 2**20:
                findings.append(
                    Finding(
                        id="device_fragmentation",
                        severity="warning",
                        message=f"rank {rank}: up to {format_bytes(worst)} reserved by the allocator but not "
                        "allocated (fragmentation)",
                        evidence={"rank": rank, "max_reserved_minus_allocated_bytes": worst},
                        fix="PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, or reuse buffers of one size",
                        ranks=[rank],
                    )
                )
        retries = max((e.get("alloc_retries") or 0 for e in timeline.events if e["kind"] == "memory"), default=0)
        if retries:
            findings.append(
                Finding(
                    id="device_alloc_retries",
                    severity="warning",
                    message=f"rank {rank}: the CUDA allocator had to free its cache and retry {retries} time(s)",
                    evidence={"rank": rank, "num_alloc_retries": retries},
                    fix="the device is at its limit: see device_headroom; expandable_segments reduces retries",
                    ranks=[rank],
                )
            )
    return findings
