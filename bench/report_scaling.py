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
        sampler.stop()  # the open window and batch written, as at a rank's exit
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


def loop_events(seconds: float, step_s: float, micro_steps: int, layers: int = 40) -> list[dict]:
    """The events memdiag's hooks write in a training loop, step by step: forward and backward
    phases per micro-step (their ends with each layer's peak), a categorised memory record at
    the end of forward, backward and step, the step phase with the optimizer's inside it, and
    the step record."""
    t0 = 1_800_000_000 * 10**9
    peak = 31 * 2**30
    modules = {f"model.layers.{i}": peak - (layers - i) * 2**22 for i in range(layers)}
    memory = {"allocator_bytes": peak, "allocator_source": "synthetic", "parameters_bytes": 2**30, "gathered_parameters_bytes": 2**27,
              "gradients_bytes": 2**30, "optimizer_master_bytes": 2**31, "optimizer_exp_avg_bytes": 2**31,
              "optimizer_exp_avg_sq_bytes": 2**31, "optimizer_other_bytes": 0, "activations_bytes": 2**29, "other_bytes": 2**28}
    events: list[dict] = []
    ns = lambda k, f: t0 + int((k + f) * step_s * 1e9)  # noqa: E731
    for k in range(int(seconds // step_s)):
        wobble = (k * 7919) % 97 * 2**20  # peaks that differ step to step
        for m in range(micro_steps):
            a = m / micro_steps * 0.85
            span = 0.85 / micro_steps
            for name, lo, hi in (("forward", 0.0, 0.45), ("backward", 0.45, 1.0)):
                events.append({"kind": fmt.PHASE_BEGIN, "t": ns(k, a + lo * span), "phase": name, "step": k,
                               "rss_bytes": peak - 2**30, "device_allocated_bytes": peak // 2})
                events.append({"kind": fmt.MEMORY, "t": ns(k, a + hi * span) - 2, "phase": name, "step": k, **memory})
                events.append({"kind": fmt.PHASE_END, "t": ns(k, a + hi * span) - 1, "phase": name, "host_peak_bytes": peak + wobble,
                               "device_peak_bytes": peak // 2 + wobble, "host_peak_module": "model.layers.39",
                               "module_host_peaks": modules})
        events.append({"kind": fmt.PHASE_BEGIN, "t": ns(k, 0.85), "phase": "step", "step": k, "rss_bytes": peak, "device_allocated_bytes": peak // 2})
        events.append({"kind": fmt.PHASE_BEGIN, "t": ns(k, 0.86), "phase": "optimizer_step", "step": k, "rss_bytes": peak,
                       "device_allocated_bytes": peak // 2})
        events.append({"kind": fmt.PHASE_END, "t": ns(k, 0.98), "phase": "optimizer_step", "host_peak_bytes": peak + wobble,
                       "device_peak_bytes": peak // 2 + wobble})
        events.append({"kind": fmt.MEMORY, "t": ns(k, 0.99), "phase": "step", "step": k, **memory})
        events.append({"kind": fmt.PHASE_END, "t": ns(k, 1.0) - 2, "phase": "step", "host_peak_bytes": peak + wobble,
                       "device_peak_bytes": peak // 2 + wobble})
        events.append({"kind": fmt.STEP, "t": ns(k, 1.0) - 1, "step": k + 1, "loss": 2.0, "tokens": 4096, "step_time_s": step_s})
    return events


def write_compacted_rank(run_dir: Path, rank: int, ranks: int, seconds: float, hz: float, step_s: float,
                         events: list[dict], lines: list[bytes], keep: np.ndarray) -> None:
    """A rank of a long run as compaction leaves it, written through compaction's own
    ``columnar.write_columnar``: the samples the budget keeps (full rate for the first
    ``sample.full_rate_s``, then each window's bounds; numpy builds them, a day of ticks through
    the sampler's Python would take hours) and the loop's events (the same for every rank)."""
    from types import SimpleNamespace

    from memdiag.timeline import columnar

    t0 = 1_800_000_000 * 10**9
    full = np.arange(int(FULL_RATE_S * hz)) / hz
    later = FULL_RATE_S + np.repeat(np.arange(int(seconds - FULL_RATE_S)), 2) + np.tile([0.1, 0.7], int(seconds - FULL_RATE_S))
    at_s = np.concatenate([full, later])
    n = len(at_s)
    rng = np.random.default_rng(rank)
    steps = (at_s // step_s).astype(np.int64)
    within = (at_s % step_s) / step_s
    # RSS moves in pages
    rss = ((30 * 2**30 + steps * 1e5 + 2**30 * np.sin(within * np.pi) + rng.normal(0, 2**24, n)) // 4096 * 4096).astype(np.int64)
    if rank == SPIKE_RANK:
        rss[n // 2] += SPIKE_BYTES
    codes = np.where(within < 0.4, 0, np.where(within < 0.85, 1, 2)).astype(np.int16)
    t = t0 + (at_s * 1e9).astype(np.int64)
    columns = {"rss_bytes": rss.astype(np.float64), "hwm_bytes": rss.astype(np.float64),
               "device_allocated_bytes": (rss // 2).astype(np.float64), "device_reserved_bytes": (rss // 2 + 2**28).astype(np.float64),
               "nvml_used_bytes": np.full(n, np.nan)}
    samples = SimpleNamespace(rank=rank, t_ns=t, phase_names=["forward", "backward", "step"], sample_phase_codes=codes,
                              sample_step=steps, columns=columns)
    header = {"kind": fmt.HEADER, "t": t0, "format_version": fmt.FORMAT_VERSION, "rank": rank, "local_rank": rank % 8,
              "world_size": ranks, "local_world_size": 8, "host": f"node{rank // 8}", "sample_hz": hz,
              "device_source": fmt.SOURCE_SYNTHETIC, "device_total_bytes": 64 * 2**30,
              "sample_full_rate_s": FULL_RATE_S, "sample_steady_interval_s": STEADY_INTERVAL_S}
    path = rank_path(run_dir, rank)
    path.write_bytes(columnar.write_columnar(path, json.dumps(header, separators=(",", ":")).encode(), samples, events, lines, keep))


def long_run(ranks: int, hours: float, hz: float, step_s: float, micro_steps: int) -> int:
    seconds = hours * 3600
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        (run_dir / "timeline").mkdir(parents=True)
        (run_dir / "run.json").write_text(json.dumps({"world_size": ranks, "status": "completed", "host_limit_bytes": 500 * 2**30}))
        from memdiag.timeline import columnar

        started = time.perf_counter()
        events = loop_events(seconds, step_s, micro_steps)
        lines = [json.dumps(e, separators=(",", ":")).encode() for e in events]
        keep = columnar.event_levels(events)
        jsonl_bytes = sum(len(line) + 1 for line in lines) / hours  # what one rank's events take as JSONL
        for rank in range(ranks):
            write_compacted_rank(run_dir, rank, ranks, seconds, hz, step_s, events, lines, keep)
        written = time.perf_counter() - started
        samples_size = sum(p.stat().st_size for p in (run_dir / "timeline").glob("*.samples.parquet"))
        events_size = sum(p.stat().st_size for p in (run_dir / "timeline").glob("*.events.parquet"))
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "memdiag", "report", str(run_dir)], cwd=REPO, capture_output=True, text=True)
        took = time.perf_counter() - started
        if result.returncode != 0:
            print(result.stderr)
            return 1
        html = (run_dir / "report.html").stat().st_size
        summary = json.loads((run_dir / "summary.json").read_text())
        spike_kept = summary["host_peak_bytes_per_rank"][str(SPIKE_RANK)] >= SPIKE_BYTES
    per_step = len(events) / max(int(seconds // step_s), 1)
    print(f"compacted run: {ranks} ranks x {hours:g} h, a step every {step_s:g} s ({micro_steps} micro-step(s), {per_step:.0f} events a step "
          f"as the hooks write them), written in {written:.0f} s")
    print(f"{'samples (Parquet)':24} {samples_size / 2**20:8.1f} MiB   ({samples_size / ranks / hours / 2**20:.2f} MiB per rank-hour)")
    print(f"{'events (Parquet)':24} {events_size / 2**20:8.1f} MiB   ({events_size / ranks / hours / 2**20:.2f} MiB per rank-hour; "
          f"{jsonl_bytes / 2**20:.2f} MiB as JSONL)")
    print(f"{'memdiag report time':24} {took:8.1f} s     (target <= 60 s for 512 x 24 h)")
    print(f"{'report.html size':24} {html / 2**20:8.2f} MiB")
    print(f"{'one-sample spike kept':24} {'yes' if spike_kept else 'NO':>8}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, default=16)
    parser.add_argument("--hours", type=float, default=1.0)
    parser.add_argument("--hz", type=float, default=100.0)
    parser.add_argument("--compacted", action="store_true",
                        help="write the run as compaction leaves it (Parquet samples, JSONL events) and time its report")
    parser.add_argument("--step-s", type=float, default=10.0, help="--compacted: seconds per optimizer step")
    parser.add_argument("--micro-steps", type=int, default=1, help="--compacted: micro-steps (forward and backward) per step")
    args = parser.parse_args()
    if args.compacted:
        return long_run(args.ranks, args.hours, args.hz, args.step_s, args.micro_steps)
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
    print(f"{'compacted, per rank-hour':24} {(parquet + events) / rank_hours / 2**20:8.2f} MiB (Parquet: every kept sample and event, "
          f"with their levels; JSONL: the headers): {size_in / (parquet + events):.1f}x smaller than the JSONL it replaces, "
          f"{sizes[False] * rank_hours / (parquet + events):.0f}x smaller than every sample as JSONL   (target >= 15x)")
    print(f"{'report.html size':24} {len(html.encode()) / 2**20:8.2f} MiB   (target <= 10 MiB)")
    print(f"{'memdiag report time':24} {took['first']:8.2f} s     first (reads the JSONL, compacts it); "
          f"{took.get('again', float('nan')):.2f} s again (reads the Parquet)   (target <= 3 s for 16 x 1 h, reading included)")
    print(f"{'one-sample spike kept':24} {'yes' if spike_kept else 'NO':>8}     (rank {SPIKE_RANK}, +{SPIKE_BYTES / 2**30:.0f} GiB for 10 ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
