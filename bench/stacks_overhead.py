"""What recording host allocation stacks (memray, ``stacks=``) costs, side by side in one
benchmark: the case at one rank, alternating stacks=off, stacks=load, stacks=auto (the default:
each phase's first occurrence) and stacks=all (every phase, the training steps too), REPEATS
times each. Printed: the load phase's and deepspeed.initialize's wall times, the first step's
and the median later step's time, each as a ratio to stacks=off.

    python bench/stacks_overhead.py [--repeats 2] [--scale tiny]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = ("off", "load", "auto", "all")


def one_run(mode: str, scale: str, reports: Path) -> tuple[float, float, float, float]:
    """(load phase seconds, ds_initialize seconds, first step seconds, median later step seconds)."""
    before = set((reports / "baichuan2_13b").glob("*"))
    subprocess.run([sys.executable, "-m", "memdiag", "run", f"model.scale={scale}", "nproc_per_node=1", "steps=12",
                    "seq_len=256", "load=reference", f"stacks={mode}", f"reports_dir={reports}"],
                   cwd=REPO, check=True, capture_output=True, timeout=900)
    (run,) = set((reports / "baichuan2_13b").glob("*")) - before
    records = [json.loads(line) for line in (run / "timeline" / "rank-0.jsonl").read_text().splitlines()]

    def seconds(phase: str) -> float:
        begin = next(r["t"] for r in records if r["kind"] == "phase_begin" and r["phase"] == phase)
        end = next(r["t"] for r in records if r["kind"] == "phase_end" and r["phase"] == phase)
        return (end - begin) / 1e9

    steps = [r["step_time_s"] for r in records if r["kind"] == "step"]
    return seconds("load"), seconds("ds_initialize"), steps[0], statistics.median(steps[2:])  # past the warm-up


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--scale", default="tiny")
    args = parser.parse_args()
    measured: dict[str, list[tuple[float, float, float, float]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for mode in MODES:  # alternating, so drift hits every mode alike
                measured[mode].append(one_run(mode, args.scale, Path(tmp)))
    base = [statistics.median(run[i] for run in measured["off"]) for i in range(4)]
    print(f"host allocation stacks (memray), model.scale={args.scale}, 1 rank, {args.repeats} runs per mode, medians")
    print(f"  {'stacks=':8} {'load phase':>11} {'ratio':>6} {'ds_initialize':>14} {'ratio':>6} {'first step':>11} "
          f"{'ratio':>6} {'later steps':>12} {'ratio':>6}")
    for mode in MODES:
        load, init, first, step = (statistics.median(run[i] for run in measured[mode]) for i in range(4))
        print(f"  {mode:8} {load:9.2f} s {load / base[0]:6.3f} {init:12.2f} s {init / base[1]:6.3f} "
              f"{first * 1e3:8.1f} ms {first / base[2]:6.3f} {step * 1e3:9.1f} ms {step / base[3]:6.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
