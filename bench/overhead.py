"""What memdiag costs the training it watches, measured side by side in one run.

Separate processes differ by +-10% in step time on a shared 2-core machine (placement, memory
layout), far more than the 1% we care about. So each run alternates memdiag off and on in
blocks of steps inside the same two ranks (``overhead_ab=BLOCK``: the sampler paused and every
hook passed through while off), and the ratio is taken between neighbouring blocks. One run at
100 Hz, one at 1 kHz, each with the sampler in the ranks (``sampler=rank``) and in the node
watcher (``sampler=watcher``: no thread in the ranks; the watcher's reads run in both halves, so
the ratio is what stays in the ranks). The node watcher (a separate process, 10 Hz RSS, 1 Hz PSS,
and with sampler=watcher every rank at sample_hz) runs in both halves; its cost is in the probe
table below, per call.

Then the cost per call of each probe, against psutil's ``memory_full_info`` (which the sampler
must never call on the hot path).

    python bench/overhead.py [--steps 120] [--block 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import timeit
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

WARMUP_STEPS = 10


def run_case(reports: Path, sample_hz: int, steps: int, block: int, sampler: str = "rank") -> list[float]:
    """Ratios on/off of neighbouring blocks (medians of each block), over both ranks."""
    before = set(reports.glob("baichuan2_13b/*"))
    subprocess.run(
        [
            sys.executable, "-m", "memdiag", "run", f"steps={steps}", f"reports_dir={reports}",
            f"sample_hz={sample_hz}", f"overhead_ab={block}", f"sampler={sampler}",
        ],
        cwd=REPO,
        check=False,
        capture_output=True,
    )
    (run_dir,) = set(reports.glob("baichuan2_13b/*")) - before
    ratios = []
    for path in sorted((run_dir / "logs").glob("step_times-rank-*.json")):
        data = json.loads(path.read_text())
        times, modes = data["step_time_s"], data["memdiag"]
        blocks: list[tuple[str, float]] = []
        for start in range(WARMUP_STEPS - WARMUP_STEPS % block, len(times), block):
            chunk = times[start : start + block]
            if len(chunk) == block and start >= WARMUP_STEPS:
                blocks.append((modes[start], statistics.median(chunk)))
        for (mode_a, a), (mode_b, b) in zip(blocks, blocks[1:]):
            if mode_a == "off" and mode_b == "on":
                ratios.append(b / a)
            elif mode_a == "on" and mode_b == "off":
                ratios.append(a / b)
    return ratios


def probe_costs() -> list[tuple[str, float]]:
    import psutil
    import torch  # noqa: F401  (psutil's cost depends on the mappings torch brings)

    from memdiag.probes import cgroup, host
    from memdiag.probes.malloc import read_malloc_stats

    reader = host.SelfStatusReader()
    files = cgroup.locate()
    process = psutil.Process()
    probes = [
        ("/proc/self/status via open fd (sampler, per tick)", reader.read),
        ("/proc/<pid>/status via open fd (watcher, per rank)", host.SelfStatusReader(os.getpid()).read),
        ("/proc/self/status open+read", host.read_proc_status),
        ("clear_refs reset (per phase boundary)", host.reset_peak_rss),
        ("/proc/meminfo (node watcher, 10 Hz)", host.read_meminfo),
        ("smaps_rollup PSS (node watcher, 1 Hz per rank)", host.read_pss_bytes),
        ("mallinfo2 (once, after deepspeed.initialize)", read_malloc_stats),
        ("psutil memory_info (DeepSpeed's CPU accelerator)", process.memory_info),
        ("psutil memory_full_info (never on the hot path)", process.memory_full_info),
    ]
    if files is not None:
        probes.append((f"cgroup v{files.version} usage/peak/limit (node watcher)", lambda: cgroup.read(files)))
    results = []
    for name, fn in probes:
        number = 20 if "full_info" in name or "PSS" in name else 500
        best = min(timeit.repeat(fn, number=number, repeat=5)) / number
        results.append((name, best))
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--block", type=int, default=5)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sampler in ("rank", "watcher"):
            for hz in (100, 1000):
                rows.append((sampler, hz, run_case(Path(tmp), hz, args.steps, args.block, sampler)))
    print(
        f"CPU case, 2 ranks, {args.steps} steps, memdiag off/on alternating every {args.block} steps "
        f"in one run (first {WARMUP_STEPS} steps dropped); ratio = on / off of neighbouring blocks"
    )
    print("(sampler=watcher: the node watcher reads every rank's /proc/<pid>/status from outside, in both halves;\n"
          " the ratio is what stays in the ranks: the hooks and the phase boundaries' exact peaks)")
    print(f"{'sampler':>16} {'median ratio':>13} {'quartiles':>17} {'pairs':>6}")
    for sampler, hz, ratios in rows:
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [float("nan")] * 3
        print(f"{sampler:>8} {hz:>4} Hz {statistics.median(ratios):>13.3f} {q[0]:>8.3f}..{q[2]:<7.3f} {len(ratios):>6}")
    print()
    print(f"{'probe':55} {'cost per call (us)':>18}")
    for name, seconds in probe_costs():
        print(f"{name:55} {seconds * 1e6:>18.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
