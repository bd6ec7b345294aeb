"""not_released: memory freed after loading that the allocator keeps instead of returning.

After ``deepspeed.initialize`` the whole-model copies of loading are freed, but glibc keeps
freed chunks in its arenas, resident and counted in RSS while nothing uses them. The hooks read
glibc's own figure (``mallinfo2().fordblks``, the bytes in free chunks) right after initialize;
it bounds what ``malloc_trim`` can hand back. With ``load.trim=true`` the rank trims and records
RSS before and after, which is the measured effect (fordblks itself does not drop: the chunks
stay on the free lists, only their pages go back). One public report saw gc + malloc_trim take
RSS from ~258 GB to ~68 GB per process.
"""

from __future__ import annotations

from memdiag.checks.finding import Finding
from memdiag.checks.loadphase import num_parameters, rank_load, stacks_setting
from memdiag.stacks import cite_phase
from memdiag.timeline.reader import Run
from memdiag.units import format_bytes

MIN_FREE_BYTES = 128 * 2**20
FREE_FRACTION_OF_FP32_MODEL = 0.25
"""Kept-free memory worth a finding: a quarter of an fp32 copy of the model (what loading
frees), and at least 128 MiB (below that it is the runtime's own churn)."""

FIX = """\
import ctypes, gc
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)   # give freed heap pages back to the OS
# after loading (memdiag: load.trim=true); or start the ranks with MALLOC_ARENA_MAX=2
# (fewer glibc arenas to strand memory in), or LD_PRELOAD=libjemalloc.so.2"""


def check(run: Run) -> list[Finding]:
    findings = []
    for rank, timeline in sorted(run.ranks.items()):
        load = rank_load(timeline)
        stats = next((e for e in timeline.events if e["kind"] == "malloc" and e.get("after") == "ds_initialize"), None)
        if load is None or stats is None:
            continue
        trimmed = next((e for e in timeline.events if e["kind"] == "malloc" and e.get("after") == "load_trim"), None)
        if trimmed is not None and "rss_before_trim_bytes" in trimmed:
            released = trimmed["rss_before_trim_bytes"] - trimmed["rss_bytes"]
            findings.append(
                Finding(
                    id="not_released",
                    severity="info",
                    message=f"rank {rank}: gc + malloc_trim after loading (load.trim) gave {format_bytes(released)} "
                    f"back to the OS (RSS {format_bytes(trimmed['rss_before_trim_bytes'])} -> "
                    f"{format_bytes(trimmed['rss_bytes'])}; glibc had {format_bytes(stats['free_bytes'])} in free chunks)",
                    evidence={"rank": rank, "released_bytes": released, "malloc_free_bytes": stats["free_bytes"]},
                    ranks=[rank],
                    moments=[{"t": trimmed["t"], "label": f"rank {rank}: malloc_trim"}],
                )
            )
            continue
        free = stats["free_bytes"]
        rise = load.model_bytes
        n = num_parameters(run) or 0
        if free < max(MIN_FREE_BYTES, FREE_FRACTION_OF_FP32_MODEL * 4 * n):
            continue
        # what loading allocated (and freed) is what glibc keeps: the load phase's lines
        lines, cited = cite_phase(run.path, ["load"], stacks_setting(run))
        findings.append(
            Finding(
                id="not_released",
                severity="warning",
                message=f"rank {rank}: after deepspeed.initialize glibc holds {format_bytes(free)} of freed memory "
                f"it has not returned to the OS (mallinfo2 fordblks; heap arenas {format_bytes(stats['arena_bytes'])}); "
                f"loading peaked {format_bytes(rise)} above the runtime, and that memory still counts in RSS" + lines,
                evidence={
                    "rank": rank,
                    "top_stacks": cited,
                    "malloc_free_bytes": free,
                    "malloc_arena_bytes": stats["arena_bytes"],
                    "malloc_in_use_bytes": stats["in_use_bytes"],
                    "load_rise_bytes": rise,
                },
                fix=FIX,
                ranks=[rank],
                moments=[{"t": stats["t"], "label": f"rank {rank}: memory not released"}],
            )
        )
    return findings
