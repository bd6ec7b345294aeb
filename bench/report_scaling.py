"""Report size and build time for a long, wide run: 16 ranks x 1 hour x 100 Hz.

Writes a synthetic run directory in the real format: every tick goes through memdiag's own
sampler logic (its sampling budget: full rate for the training loop's first
``sample.full_rate_s``, then each window's bounding samples) into its TimelineWriter, steps as
the hooks write them, with a spike on rank 7 that must survive the budget and the report's
downsampling; then times `memdiag report` on it. Bytes per rank-hour are printed side by side
without and with the budget.

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
from memdiag.settings import BY_FIELD  # noqa: E402
from memdiag.timeline import format as fmt  # noqa: E402

SPIKE_RANK, SPIKE_BYTES = 7, 40 * 2**30
FULL_RATE_S = BY_FIELD["sample_full_rate_s"].default
STEADY_INTERVAL_S = BY_FIELD["sample_steady_interval_s"].default


def write_rank(run_dir: Path, rank: int, ranks: int, seconds: float, hz: float, budget: bool = True) -> None:
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
    header = {"rank": rank, "local_rank": rank % 8, "world_size": ranks, "local_world_size": 8, "host": f"node{rank // 8}",
              "sample_hz": hz, "device_source": fmt.SOURCE_SYNTHETIC, "device_total_bytes": 64 * 2**30}
    steps_at = [(int(t0 + k * step_s * 1e9), k) for k in range(1, int(steps[-1]) + 1)]
    if budget:
        header |= {"sample_full_rate_s": FULL_RATE_S, "sample_steady_interval_s": STEADY_INTERVAL_S}
    writer = TimelineWriter(rank_path(run_dir, rank), header)
    if budget:  # what memdiag's sampler keeps of these ticks, through its own code
        from types import SimpleNamespace

        from memdiag.sampler import Sampler

        tracker = SimpleNamespace(step=0, phase="")
        sampler = Sampler(writer, tracker, None, 1 / hz, full_rate_s=FULL_RATE_S, steady_interval_s=STEADY_INTERVAL_S)
        phases, step_list = phase.tolist(), steps.tolist()
        rss_list, device_list, t_list = rss.tolist(), (rss // 2).tolist(), t.tolist()
        next_step = 0
        for i in range(n):
            while next_step < len(steps_at) and steps_at[next_step][0] <= t_list[i]:
                writer.write({"kind": fmt.STEP, "t": steps_at[next_step][0], "step": steps_at[next_step][1], "loss": 2.0,
                              "tokens": 2048, "step_time_s": step_s})
                next_step += 1
            tracker.step, tracker.phase = step_list[i], phases[i]
            sampler._take({"kind": fmt.SAMPLE, "t": t_list[i], "phase": phases[i], "step": step_list[i],
                           "rss_bytes": rss_list[i], "hwm_bytes": rss_list[i], "device_allocated_bytes": device_list[i],
                           "device_reserved_bytes": device_list[i] + 2**28}, now=i / hz)
        sampler._close_envelope()
        sampler._write_batch()
        writer.close()
        return
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
    seconds = args.hours * 3600
    with tempfile.TemporaryDirectory() as tmp:
        # bytes per rank-hour, side by side: every sample (before the budget) and what the sampler keeps
        sizes = {}
        for budget in (False, True):
            one = Path(tmp) / f"one-{budget}"
            (one / "timeline").mkdir(parents=True)
            write_rank(one, 0, 1, seconds, args.hz, budget=budget)
            sizes[budget] = (one / "timeline" / "rank-0.jsonl").stat().st_size / args.hours
        run_dir = Path(tmp) / "run"
        (run_dir / "timeline").mkdir(parents=True)
        (run_dir / "run.json").write_text(json.dumps({"world_size": args.ranks, "status": "completed", "host_limit_bytes": 500 * 2**30,
                                                      "timeline_columnar": "always"}))
        started = time.perf_counter()
        for rank in range(args.ranks):
            write_rank(run_dir, rank, args.ranks, seconds, args.hz)
        written = time.perf_counter() - started
        size_in = sum(p.stat().st_size for p in (run_dir / "timeline").iterdir())
        took = {}
        for when in ("first", "again"):  # the first report reads the JSONL and compacts it; the next reads Parquet
            started = time.perf_counter()
            result = subprocess.run([sys.executable, "-m", "memdiag", "report", str(run_dir)], cwd=REPO, capture_output=True, text=True)
            took[when] = time.perf_counter() - started
            if result.returncode != 0:
                print(result.stderr)
                return 1
            html = (run_dir / "report.html").read_text()
            summary = json.loads((run_dir / "summary.json").read_text())
            spike_kept = summary["host_peak_bytes_per_rank"][str(SPIKE_RANK)] >= SPIKE_BYTES
            if not spike_kept:
                break
        parquet = sum(p.stat().st_size for p in (run_dir / "timeline").glob("*.parquet"))
        events = sum(p.stat().st_size for p in (run_dir / "timeline").glob("*.jsonl"))
    ticks = int(args.ranks * seconds * args.hz)
    print(f"synthetic run: {args.ranks} ranks x {args.hours:g} h x {args.hz:g} Hz = {ticks:,} sampler ticks, "
          f"{size_in / 2**20:,.1f} MiB of timelines as the sampler writes them (written in {written:.1f} s)")
    print(f"{'bytes per rank-hour':24} {sizes[False] / 2**20:8.2f} MiB every sample, {sizes[True] / 2**20:.2f} MiB with the "
          f"budget (full rate for {FULL_RATE_S:g} s of training, then {STEADY_INTERVAL_S:g} s windows' bounds): "
          f"{sizes[False] / sizes[True]:.1f}x smaller   (target <= 2 MiB)")
    rank_hours = args.ranks * args.hours
    print(f"{'compacted, per rank-hour':24} {parquet / rank_hours / 2**20:8.2f} MiB of Parquet (zstd, every kept sample and its levels) + "
          f"{events / rank_hours / 2**20:.2f} MiB of events JSONL: {size_in / (parquet + events):.1f}x smaller than the JSONL it replaces, "
          f"{sizes[False] * rank_hours / (parquet + events):.0f}x smaller than every sample as JSONL   (target >= 15x)")
    print(f"{'report.html size':24} {len(html.encode()) / 2**20:8.2f} MiB   (target <= 10 MiB)")
    print(f"{'memdiag report time':24} {took['first']:8.2f} s     first (reads the JSONL, compacts it); "
          f"{took.get('again', float('nan')):.2f} s again (reads the Parquet)   (target <= 3 s for 16 x 1 h, reading included)")
    print(f"{'one-sample spike kept':24} {'yes' if spike_kept else 'NO':>8}     (rank {SPIKE_RANK}, +{SPIKE_BYTES / 2**30:.0f} GiB for 10 ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
