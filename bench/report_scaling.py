"""Report size and build time for a long, wide run: 16 ranks x 1 hour x 100 Hz.

Writes a synthetic run directory in the real format (through memdiag's TimelineWriter, sample
batches as the sampler writes them, phases and steps as the hooks write them, with a spike
on rank 7 that must survive downsampling), then times `memdiag report` on it.

    python bench/report_scaling.py [--ranks 16] [--hours 1] [--hz 100]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from memdiag.timeline import TimelineWriter, rank_path  # noqa: E402
from memdiag.timeline import format as fmt  # noqa: E402

SPIKE_RANK, SPIKE_BYTES = 7, 40 * 2**30


def write_rank(run_dir: Path, rank: int, ranks: int, seconds: float, hz: float) -> None:
    t0 = 1_800_000_000 * 10**9
    n = int(seconds * hz)
    t = t0 + (np.arange(n) * (1e9 / hz)).astype(np.int64)
    rng = np.random.default_rng(rank)
    step_s = 2.0
    steps = (np.arange(n) / hz // step_s).astype(np.int64)
    within = (np.arange(n) / hz) % step_s
    rss = (30 * 2**30 + steps * 1e5 + 2**30 * np.sin(within / step_s * np.pi) + rng.normal(0, 2**24, n)).astype(np.int64)
    if rank == SPIKE_RANK:
        rss[n // 2] += SPIKE_BYTES  # one sample: downsampling must keep it
    phase = np.where(within < 0.8, "forward", np.where(within < 1.7, "backward", "step"))
    writer = TimelineWriter(
        rank_path(run_dir, rank),
        {"rank": rank, "local_rank": rank % 8, "world_size": ranks, "local_world_size": 8, "host": f"node{rank // 8}",
         "sample_hz": hz, "device_source": fmt.SOURCE_SYNTHETIC, "device_total_bytes": 64 * 2**30},
    )
    batch = int(hz * fmt.FLUSH_INTERVAL_S) or 1
    step_done = 0
    for start in range(0, n, batch):
        end = min(start + batch, n)
        writer.write(fmt.sample_batch(
            t=t[start:end].tolist(), phase=phase[start:end].tolist(), step=steps[start:end].tolist(),
            rss_bytes=rss[start:end].tolist(), hwm_bytes=rss[start:end].tolist(),
            device_allocated_bytes=(rss[start:end] // 2).tolist(), device_reserved_bytes=(rss[start:end] // 2 + 2**28).tolist(),
        ))
        while step_done < steps[end - 1]:
            step_done += 1
            writer.write({"kind": fmt.STEP, "t": int(t0 + step_done * step_s * 1e9), "step": step_done, "loss": 2.0, "tokens": 2048, "step_time_s": step_s})
    writer.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, default=16)
    parser.add_argument("--hours", type=float, default=1.0)
    parser.add_argument("--hz", type=float, default=100.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        (run_dir / "timeline").mkdir(parents=True)
        (run_dir / "run.json").write_text(json.dumps({"world_size": args.ranks, "status": "completed", "host_limit_bytes": 500 * 2**30}))
        started = time.perf_counter()
        for rank in range(args.ranks):
            write_rank(run_dir, rank, args.ranks, args.hours * 3600, args.hz)
        written = time.perf_counter() - started
        size_in = sum(p.stat().st_size for p in (run_dir / "timeline").iterdir())
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "memdiag", "report", str(run_dir)], cwd=REPO, capture_output=True, text=True)
        took = time.perf_counter() - started
        if result.returncode != 0:
            print(result.stderr)
            return 1
        html = (run_dir / "report.html").read_text()
        summary = json.loads((run_dir / "summary.json").read_text())
        spike_kept = summary["host_peak_bytes_per_rank"][str(SPIKE_RANK)] >= SPIKE_BYTES
    samples = int(args.ranks * args.hours * 3600 * args.hz)
    print(f"synthetic run: {args.ranks} ranks x {args.hours:g} h x {args.hz:g} Hz = {samples:,} samples, "
          f"{size_in / 2**20:,.0f} MiB of timelines (written in {written:.1f} s)")
    print(f"{'report.html size':24} {len(html.encode()) / 2**20:8.2f} MiB   (target <= 10 MiB)")
    print(f"{'memdiag report time':24} {took:8.2f} s     (target <= 10 s, reading included)")
    print(f"{'one-sample spike kept':24} {'yes' if spike_kept else 'NO':>8}     (rank {SPIKE_RANK}, +{SPIKE_BYTES / 2**30:.0f} GiB for 10 ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
