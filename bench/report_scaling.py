"""Report size and build time for a long, wide run: 16 ranks x 1 hour x 100 Hz.

Writes a synthetic run directory in the real format as the default recorder writes it
(``sampler=watcher``): every tick of every rank goes through the node watcher's budget code
(full rate for the training loop's first ``sample.full_rate_s``, then each window's bounding
samples) into the node's TimelineWriter, with the node's own 10 Hz samples under the same
budget, steps in the rank files, and a spike on rank 7 that must survive the budget and the
report's downsampling; then times `memdiag report` on it. Bytes per rank-hour (rank files and
the node file, per rank) are printed side by side without and with the budget.

    python bench/report_scaling.py [--ranks 16] [--hours 1] [--hz 100]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


def rank_ticks(rank: int, seconds: float, hz: float, step_s: float = 2.0):
    """A rank's RSS at every tick (a step every ``step_s``, a one-tick spike on SPIKE_RANK), its phase and step."""
    n = int(seconds * hz)
    rng = np.random.default_rng(rank)
    steps = (np.arange(n) / hz // step_s).astype(np.int64)
    within = (np.arange(n) / hz) % step_s
    rss = (30 * 2**30 + steps * 1e5 + 2**30 * np.sin(within / step_s * np.pi) + rng.normal(0, 2**24, n)).astype(np.int64)
    if rank == SPIKE_RANK:
        rss[n // 2] += SPIKE_BYTES  # one sample: the budget and the downsampling must keep it
    phase = np.where(within < 0.8, "forward", np.where(within < 1.7, "backward", "step"))
    return rss, phase, steps


def write_node(run_dir: Path, node: int, rank_ids: list[int], ranks: int, seconds: float, hz: float, budget: bool = True) -> None:
    """One node as the default recorder writes it (``sampler=watcher``): each rank's file holds
    its events (here its steps), and the node watcher's file the ranks' samples at ``hz``
    (``rank_samples``) and its own node samples at 10 Hz; with ``budget``, both through the
    watcher's own budget code (memdiag/budget.py): full rate for the loop's first
    ``sample.full_rate_s``, then each window's bounds."""
    from memdiag.budget import SteadyClock, WindowBudget, node_roles, rank_roles
    from memdiag.node import as_written

    t0 = 1_800_000_000 * 10**9
    step_s = 2.0
    n = int(seconds * hz)
    t = (t0 + (np.arange(n) * (1e9 / hz)).astype(np.int64)).tolist()
    ticks = {rank: rank_ticks(rank, seconds, hz, step_s) for rank in rank_ids}
    for rank in rank_ids:
        header = {"rank": rank, "local_rank": rank % 8, "world_size": ranks, "local_world_size": 8, "host": f"node{node}",
                  "sample_hz": hz, "sampler": "watcher", "device_source": fmt.SOURCE_SYNTHETIC, "device_total_bytes": 64 * 2**30,
                  "sample_full_rate_s": FULL_RATE_S, "sample_steady_interval_s": STEADY_INTERVAL_S if budget else 0.0}
        writer = TimelineWriter(rank_path(run_dir, rank), header)
        for k in range(1, int(seconds // step_s) + 1):
            writer.write({"kind": fmt.STEP, "t": int(t0 + k * step_s * 1e9), "step": k, "loss": 2.0, "tokens": 2048, "step_time_s": step_s})
        writer.close()
    window = STEADY_INTERVAL_S if budget else 0.0
    clocks = {rank: SteadyClock(FULL_RATE_S, window) for rank in rank_ids}
    budgets = {rank: WindowBudget(window, rank_roles) for rank in rank_ids}
    node_budget = WindowBudget(window, node_roles)
    lists = {rank: (rss.tolist(), phase.tolist(), steps.tolist()) for rank, (rss, phase, steps) in ticks.items()}
    writer = TimelineWriter(fmt.node_path(run_dir, f"node{node}"), {"host": f"node{node}", "interval_s": 0.1, "pss_interval_s": 1.0})
    every = max(1, round(hz * fmt.FLUSH_INTERVAL_S))  # the watcher's 10 Hz node tick and its flush
    batches: dict[int, dict[str, list]] = {}
    for i in range(n):
        now = i / hz
        steady = {}
        for rank, (rss, phase, steps) in lists.items():
            steady[rank] = clocks[rank].steady(now, phase[i], steps[i])
            for kept in budgets[rank].take({"t": t[i], "rss_bytes": rss[i], "hwm_bytes": rss[i]}, now, steady[rank]):
                batch = batches.setdefault(rank, {"t": [], "rss_bytes": [], "hwm_bytes": []})
                for name, column in batch.items():
                    column.append(kept[name])
        if i % every == 0:
            entries = {str(rank): {"pid": 1000 + rank, "rss_bytes": lists[rank][0][i], "children_rss_bytes": 0, "children": 0}
                       for rank in rank_ids}
            if i % (every * 10) == 0:  # PSS once a second, with the pid and the children count (node.as_written)
                for rank, entry in entries.items():
                    entry |= {"pss_bytes": entry["rss_bytes"] - 2**28, "children_pss_bytes": 0}
            sample = {"kind": fmt.SAMPLE, "t": t[i], "mem_total_bytes": 2 * 2**40, "mem_available_bytes": 2**40 - i,
                      "cgroup_usage_bytes": None, "cgroup_peak_bytes": None, "cgroup_limit_bytes": None, "ranks": entries}
            for kept in node_budget.take(as_written(sample), now, all(steady.values())):
                writer.write(kept)
            # the watcher's flush: every 0.1 s, or once a window while every rank is steady
            if not all(steady.values()) or i % max(1, round(hz * window)) == 0:
                for rank, batch in batches.items():
                    if batch["t"]:
                        writer.write({"kind": fmt.RANK_SAMPLES, "rank": rank, **batch})
                batches = {}
    for rank, budget_ in budgets.items():
        for kept in budget_.close():
            batches.setdefault(rank, {"t": [], "rss_bytes": [], "hwm_bytes": []})
            for name in ("t", "rss_bytes", "hwm_bytes"):
                batches[rank][name].append(kept[name])
    for rank, batch in batches.items():
        writer.write({"kind": fmt.RANK_SAMPLES, "rank": rank, **batch})
    for kept in node_budget.close():
        writer.write(kept)
    writer.write({"kind": fmt.ENDED, "t": t[-1], "reason": "the job ended"})
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


def write_compacted_node(run_dir: Path, node: int, rank_ids: list[int], seconds: float) -> None:
    """A node file as compaction leaves it, written through compaction's own
    ``columnar.write_node_samples``: the node samples the budget keeps (10 Hz for the first
    ``sample.full_rate_s``, then about three a window: the ranks' highest and lowest total and the
    PSS read), every rank's figures in them."""
    from memdiag.timeline import columnar
    from memdiag.timeline.reader import NODE_COLUMNS, NodeTimeline

    t0 = 1_800_000_000 * 10**9
    full = np.arange(int(FULL_RATE_S * 10)) / 10
    later = FULL_RATE_S + np.repeat(np.arange(int(seconds - FULL_RATE_S)), 3) + np.tile([0.0, 0.3, 0.8], int(seconds - FULL_RATE_S))
    at_s = np.concatenate([full, later])
    n = len(at_s)
    rng = np.random.default_rng(node)
    within = (at_s % 10.0) / 10.0
    rss = {rank: ((30 * 2**30 + 2**30 * np.sin(within * np.pi) + rng.normal(0, 2**24, n)) // 4096 * 4096) for rank in rank_ids}
    pss_at = np.isclose(at_s % 1.0, 0.0)
    host = f"node{node}"
    timeline = NodeTimeline(
        host=host, path=fmt.node_path(run_dir, host), header={}, t_ns=t0 + (at_s * 1e9).astype(np.int64),
        columns={name: np.full(n, np.nan) for name in NODE_COLUMNS} | {"mem_total_bytes": np.full(n, 2.0 * 2**40),
                                                                        "mem_available_bytes": 2.0**40 - at_s},
        rank_rss=rss, rank_pss={rank: np.where(pss_at, values - 2**28, np.nan) for rank, values in rss.items()},
        events=[], rank_children_rss={rank: np.zeros(n) for rank in rank_ids},
        rank_children_pss={rank: np.where(pss_at, 0.0, np.nan) for rank in rank_ids},
    )
    samples_file = columnar.samples_path(timeline.path)
    rows = columnar.write_node_samples(samples_file, timeline, columnar.node_levels(timeline))
    header = {"kind": fmt.HEADER, "t": t0, "format_version": fmt.FORMAT_VERSION, "host": host, "interval_s": 0.1}
    record = {"kind": fmt.COLUMNAR, "t": int(timeline.t_ns[-1]), "samples_file": samples_file.name, "samples": rows[0],
              "level_rows": rows, "level_windows_s": list(columnar.LEVEL_WINDOWS_S), "rank_children_roles": {}}
    ended = {"kind": fmt.ENDED, "t": int(timeline.t_ns[-1]), "reason": "the job ended"}
    timeline.path.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in (header, record, ended)))


def timed_report(run_dir: Path) -> tuple[float, int, subprocess.CompletedProcess]:
    """`memdiag report` in its own process: (seconds, its peak RSS in bytes, the result). The peak
    is that child's own, from ``wait4``'s rusage (``RUSAGE_CHILDREN`` would be the highest of every
    child this bench has had)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "memdiag", "report", str(run_dir)], cwd=REPO, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        took = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        return took, usage.ru_maxrss * 1024, subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())


def long_run(ranks: int, hours: float, hz: float, step_s: float, micro_steps: int, keep_dir: Path | None) -> int:
    seconds = hours * 3600
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = keep_dir or Path(tmp) / "run"
        from memdiag.timeline import columnar

        started = time.perf_counter()
        events = loop_events(seconds, step_s, micro_steps)
        lines = [json.dumps(e, separators=(",", ":")).encode() for e in events]
        jsonl_bytes = sum(len(line) + 1 for line in lines) / hours  # what one rank's events take as JSONL
        if not (run_dir / "run.json").exists():  # --run-dir: written once, reported as often as asked
            (run_dir / "timeline").mkdir(parents=True)
            keep = columnar.event_levels(events)
            for rank in range(ranks):
                write_compacted_rank(run_dir, rank, ranks, seconds, hz, step_s, events, lines, keep)
            for node in range((ranks + 7) // 8):
                write_compacted_node(run_dir, node, list(range(node * 8, min(ranks, node * 8 + 8))), seconds)
            (run_dir / "run.json").write_text(json.dumps({"world_size": ranks, "status": "completed",
                                                          "host_limit_bytes": 500 * 2**30}))
        written = time.perf_counter() - started
        node_size = sum(p.stat().st_size for p in (run_dir / "timeline").glob("node-*.samples.parquet"))
        samples_size = sum(p.stat().st_size for p in (run_dir / "timeline").glob("rank-*.samples.parquet"))
        events_size = sum(p.stat().st_size for p in (run_dir / "timeline").glob("*.events.parquet"))
        took, peak_rss, result = timed_report(run_dir)
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
    print(f"{'node samples (Parquet)':24} {node_size / 2**20:8.1f} MiB   ({node_size / ranks / hours / 2**20:.2f} MiB per rank-hour)")
    total = samples_size + events_size + node_size
    print(f"{'all of it':24} {total / 2**20:8.1f} MiB   ({total / ranks / hours / 2**20:.2f} MiB per rank-hour)")
    print(f"{'memdiag report time':24} {took:8.1f} s     (target <= 60 s for 512 x 24 h)")
    print(f"{'memdiag report peak RSS':24} {peak_rss / 2**30:8.2f} GiB   (target <= 2 GiB)")
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
    parser.add_argument("--run-dir", type=Path, help="--compacted: write the run here and keep it (a run already "
                        "there is reported again, not rewritten)")
    parser.add_argument("--micro-steps", type=int, default=1, help="--compacted: micro-steps (forward and backward) per step")
    args = parser.parse_args()
    if args.compacted:
        return long_run(args.ranks, args.hours, args.hz, args.step_s, args.micro_steps, args.run_dir)
    seconds = args.hours * 3600
    with tempfile.TemporaryDirectory() as tmp:
        # bytes per rank-hour, side by side: every sample (before the budget) and what the sampler keeps
        # one node of 8 ranks: its rank files and its watcher's file, per rank-hour
        sizes = {}
        per_node = min(8, args.ranks)
        for budget in (False, True):
            one = Path(tmp) / f"one-{budget}"
            (one / "timeline").mkdir(parents=True)
            write_node(one, 0, list(range(per_node)), per_node, seconds, args.hz, budget=budget)
            sizes[budget] = sum(p.stat().st_size for p in (one / "timeline").iterdir()) / args.hours / per_node
            if budget:  # the hours after the first: what a day's run costs per hour
                later, since = 0, 1_800_000_000 * 10**9 + int(FULL_RATE_S + 60) * 10**9
                for path in (one / "timeline").iterdir():
                    for line in path.read_bytes().split(b"\n"):
                        if line:
                            t = json.loads(line).get("t")
                            later += len(line) + 1 if (t[0] if isinstance(t, list) else t or 0) >= since else 0
                steady = later / ((seconds - FULL_RATE_S - 60) / 3600) / per_node
        run_dir = Path(tmp) / "run"
        (run_dir / "timeline").mkdir(parents=True)
        (run_dir / "run.json").write_text(json.dumps({"world_size": args.ranks, "status": "completed", "host_limit_bytes": 500 * 2**30,
                                                      "timeline_columnar": "always"}))
        started = time.perf_counter()
        for node in range((args.ranks + 7) // 8):
            write_node(run_dir, node, list(range(node * 8, min(args.ranks, node * 8 + 8))), args.ranks, seconds, args.hz)
        written = time.perf_counter() - started
        size_in = sum(p.stat().st_size for p in (run_dir / "timeline").iterdir())
        # a run its watchers did not compact (stopped, killed): its first report compacts it
        uncompacted = Path(tmp) / "uncompacted"
        shutil.copytree(run_dir, uncompacted)
        # the recorder's own flow: each node's watcher compacts its ranks once they exit (every
        # node on its own machine, at once), then the report reads Parquet
        from memdiag.timeline.compact import compact_node

        compaction_s = []
        for node in range((args.ranks + 7) // 8):
            started = time.perf_counter()
            compact_node(run_dir, f"node{node}", "always")  # as run.json says
            compaction_s.append(time.perf_counter() - started)
        took, peaks = {}, {}
        for when, where in (("after", run_dir), ("again", run_dir), ("first", uncompacted)):
            took[when], peaks[when], result = timed_report(where)
            if result.returncode != 0:
                print(result.stderr)
                return 1
            summary = json.loads((where / "summary.json").read_text())
            if summary["host_peak_bytes_per_rank"][str(SPIKE_RANK)] < SPIKE_BYTES:
                print(f"the one-sample spike on rank {SPIKE_RANK} is lost in the {when} report")
                return 1
        html = (run_dir / "report.html").read_text()
        spike_kept = True
        parquet = sum(p.stat().st_size for p in (run_dir / "timeline").glob("*.parquet"))
        events = sum(p.stat().st_size for p in (run_dir / "timeline").glob("*.jsonl"))
    ticks = int(args.ranks * seconds * args.hz)
    print(f"synthetic run: {args.ranks} ranks x {args.hours:g} h x {args.hz:g} Hz = {ticks:,} sampler ticks, "
          f"{size_in / 2**20:,.1f} MiB of timelines as the sampler writes them (written in {written:.1f} s)")
    print(f"{'bytes per rank-hour':24} {sizes[False] / 2**20:8.2f} MiB every sample, {sizes[True] / 2**20:.2f} MiB with the "
          f"budget (full rate for {FULL_RATE_S:g} s of training, then {STEADY_INTERVAL_S:g} s windows' bounds): "
          f"{sizes[False] / sizes[True]:.1f}x smaller   (target <= 2 MiB)")
    print(f"{'  once steady':24} {steady / 2**20:8.2f} MiB per rank-hour after the loop's first {FULL_RATE_S:g} s at full rate "
          f"(their {sizes[True] / 2**20 - steady / 2**20:.2f} MiB of this {args.hours:g} h run are spread over a day's in a long run)")
    rank_hours = args.ranks * args.hours
    print(f"{'compacted, per rank-hour':24} {(parquet + events) / rank_hours / 2**20:8.2f} MiB (Parquet: every kept sample and event, "
          f"with their levels; JSONL: the headers): {size_in / (parquet + events):.1f}x smaller than the JSONL it replaces, "
          f"{sizes[False] * rank_hours / (parquet + events):.0f}x smaller than every sample as JSONL   (target >= 15x)")
    print(f"{'report.html size':24} {len(html.encode()) / 2**20:8.2f} MiB   (target <= 10 MiB)")
    print(f"{'watchers compact':24} {max(compaction_s):8.2f} s     per node at the run's end (each node's watcher its own ranks, "
          f"on its own machine: {sum(compaction_s):.2f} s for all {len(compaction_s)} here)")
    print(f"{'memdiag report time':24} {took['after']:8.2f} s     after the watchers compacted (reads the Parquet); {took['again']:.2f} s "
          f"again; {took['first']:.2f} s for a run no watcher compacted (it compacts it)   (target <= 3 s for 16 x 1 h, reading included)")
    print(f"{'memdiag report peak RSS':24} {peaks['after'] / 2**30:8.2f} GiB   after the watchers compacted; "
          f"{peaks['first'] / 2**30:.2f} GiB compacting it itself")
    print(f"{'one-sample spike kept':24} {'yes' if spike_kept else 'NO':>8}     (rank {SPIKE_RANK}, +{SPIKE_BYTES / 2**30:.0f} GiB for 10 ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
