"""What memdiag costs the training it watches.

1. The CPU case (2 ranks, ZeRO-3, tiny scale) with memdiag off, sampling at 100 Hz and at
   1 kHz, interleaved round by round so machine noise hits every mode alike. Step times come
   from the case's own clock (logs/step_times-rank-R.json), the same code path in every mode;
   the first steps (warm-up) are dropped. Prints median step time per mode and the ratio to off.
2. The cost per call of each probe, against psutil's ``memory_full_info`` (which the sampler
   must never call on the hot path).

    python bench/overhead.py [--rounds 3] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import timeit
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODES = {"off": ["instrument=false"], "100 Hz": ["sample_hz=100"], "1 kHz": ["sample_hz=1000"]}
WARMUP_STEPS = 5


def run_case(reports: Path, extra: list[str], steps: int) -> list[float]:
    before = set(reports.glob("baichuan2_13b/*"))
    subprocess.run(
        [sys.executable, "-m", "memdiag", "run", f"steps={steps}", f"reports_dir={reports}", *extra],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    (run_dir,) = set(reports.glob("baichuan2_13b/*")) - before
    times = []
    for path in sorted((run_dir / "logs").glob("step_times-rank-*.json")):
        times += json.loads(path.read_text())[WARMUP_STEPS:]
    return times


def probe_costs() -> list[tuple[str, float]]:
    import psutil
    import torch  # noqa: F401  (psutil's cost depends on the mappings torch brings)

    from memdiag.probes import cgroup, host

    reader = host.SelfStatusReader()
    files = cgroup.locate()
    process = psutil.Process()
    probes = [
        ("/proc/self/status via open fd (sampler)", reader.read),
        ("/proc/self/status open+read", host.read_proc_status),
        ("clear_refs reset (phase boundary)", host.reset_peak_rss),
        ("/proc/meminfo (node watcher)", host.read_meminfo),
        ("smaps_rollup PSS (node watcher, 1 Hz)", host.read_pss_bytes),
        ("psutil memory_info", process.memory_info),
        ("psutil memory_full_info (never on the hot path)", process.memory_full_info),
    ]
    if files is not None:
        probes.append((f"cgroup v{files.version} usage/peak/limit", lambda: cgroup.read(files)))
    results = []
    for name, fn in probes:
        number = 20 if "full_info" in name else 500
        best = min(timeit.repeat(fn, number=number, repeat=5)) / number
        results.append((name, best))
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    samples: dict[str, list[float]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for mode, extra in MODES.items():
                samples[mode] += run_case(Path(tmp), extra, args.steps)
                print(f"round {round_index + 1}: {mode} done", file=sys.stderr)
    base = statistics.median(samples["off"])
    print(f"CPU case, 2 ranks, {args.rounds} interleaved rounds x {args.steps} steps (first {WARMUP_STEPS} dropped)")
    print(f"{'mode':8} {'median step (ms)':>17} {'ratio to off':>13} {'steps':>6}")
    for mode, times in samples.items():
        median = statistics.median(times)
        print(f"{mode:8} {median * 1e3:>17.1f} {median / base:>13.3f} {len(times):>6}")
    print()
    print(f"{'probe':50} {'cost per call (us)':>18}")
    for name, seconds in probe_costs():
        print(f"{name:50} {seconds * 1e6:>18.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
