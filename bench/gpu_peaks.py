"""Exact device phase peaks on CUDA, two ways a sampler alone would get them wrong: a spike that
lives between two samples, and DeepSpeed's ``see_memory_usage(force=True)`` resetting the
device's peak counter in the middle of a phase. Part of bench/gpu_check.sh; prints one PASS or
FAIL line per check and exits 1 on a failure.

    python bench/gpu_peaks.py RUN_DIR
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GIB = 2**30


def main(run_dir: Path) -> int:
    import torch

    import memdiag
    from memdiag import instrument

    if not torch.cuda.is_available():
        print("SKIP gpu_peaks: no CUDA device")
        return 0
    torch.cuda.set_device(0)
    with memdiag.record(run_dir=str(run_dir), sample_hz=100, report=False):
        tracker = instrument._ACTIVE[0].tracker
        with tracker.phase_scope("spike"):
            time.sleep(0.05)
            spike = torch.empty(2 * GIB, dtype=torch.uint8, device="cuda")
            spike.fill_(1)
            del spike  # lives well under a sampling interval
            torch.cuda.synchronize()
            time.sleep(0.05)
        with tracker.phase_scope("foreign_reset"):
            held = torch.empty(GIB, dtype=torch.uint8, device="cuda")
            held.fill_(1)
            del held
            from deepspeed.runtime.utils import see_memory_usage

            see_memory_usage("gpu_check: a foreign reset mid-phase", force=True)  # resets the peak counter
            users_view = torch.cuda.max_memory_allocated()
            time.sleep(0.05)
        torch.cuda.reset_peak_memory_stats()
        user = torch.empty(GIB // 2, dtype=torch.uint8, device="cuda")
        del user
        with tracker.phase_scope("after"):  # memdiag's own reset at this boundary ...
            time.sleep(0.02)
        after_ours = torch.cuda.max_memory_allocated()  # ... leaves the user's reading as it was
    ends = {}
    for line in (run_dir / "timeline" / "rank-0.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "phase_end":
            ends[record["phase"]] = record
    checks = [
        ("a 2 GiB spike between samples is in its phase's exact peak", ends["spike"].get("device_peak_bytes", 0) >= 2 * GIB),
        ("the phase peak survives see_memory_usage(force=True)'s reset", ends["foreign_reset"].get("device_peak_bytes", 0) >= GIB),
        ("DeepSpeed's own reading right after its reset is as without memdiag", users_view < GIB),
        ("the user's max_memory_allocated survives memdiag's phase-boundary reset", after_ours >= GIB // 2),
    ]
    failed = 0
    for what, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'} {what}")
        failed += not ok
    print("phase peaks:", {k: v.get("device_peak_bytes") for k, v in ends.items()})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
