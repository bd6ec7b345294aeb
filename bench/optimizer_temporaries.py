"""Adam's temporaries while it steps, on this machine's device: the bytes above the states that
torch's AdamW allocates during ``step()`` on one flat fp32 partition (what DeepSpeed's ZeRO
optimizers hand it: one sub-group, or the rank's partition), for each way it can step,
beside memdiag's ``OPTIMIZER_STEP_TEMPORARIES``.

CUDA: ``torch.cuda.max_memory_allocated`` over the step. CPU: the process's peak RSS (VmHWM,
reset through /proc/self/clear_refs), which glibc returns for allocations this large (mmap).

    python bench/optimizer_temporaries.py [--elements 50e6] [--device cuda|cpu]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memdiag.plan.terms import OPTIMIZER_STEP_TEMPORARIES  # noqa: E402
from memdiag.probes.host import read_proc_status, reset_peak_rss  # noqa: E402

KWARGS = {"fused": {"fused": True}, "torch_foreach": {"foreach": True}, "torch_for_loop": {"foreach": False}}



def step_temporaries(kind: str, elements: int, device: str) -> float:
    """Bytes above the states at the step's peak, in units of the partition's fp32 size."""
    param = torch.nn.Parameter(torch.zeros(elements, dtype=torch.float32, device=device))
    param.grad = torch.full_like(param, 1e-3)
    optimizer = torch.optim.AdamW([param], lr=1e-4, weight_decay=0.1, **KWARGS[kind])
    optimizer.step()  # the states exist from here on: what a measured step adds is temporaries
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        optimizer.step()
        torch.cuda.synchronize()
        above = torch.cuda.max_memory_allocated() - before
    else:
        before = read_proc_status().rss_bytes
        reset_peak_rss()  # VmHWM := VmRSS
        optimizer.step()
        above = read_proc_status().hwm_bytes - before
    del optimizer, param
    return above / (4 * elements)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=float, default=50e6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {args.device}, a partition of {int(args.elements):,} fp32 elements")
    print(f"{'optimizer':16} {'measured':>9} {'memdiag':>8}  (temporaries in partitions)")
    worst = 0.0
    for kind in KWARGS:
        measured = step_temporaries(kind, int(args.elements), args.device)
        worst = max(worst, abs(measured - OPTIMIZER_STEP_TEMPORARIES[kind]))
        print(f"{kind:16} {measured:9.2f} {OPTIMIZER_STEP_TEMPORARIES[kind]:8d}")
    print(f"largest difference: {worst:.2f} partitions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
