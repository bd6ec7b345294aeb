"""The run's summary in the benchmark's terms (token/p/s, loss, mem, MFU) plus host peaks.

Computed from the timeline reader only, so the summary, the checks and the report agree.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np

from memdiag.timeline.reader import NodeTimeline, RankTimeline, Run

MFU_FORMULA = "MFU = token/p/s x 6 x parameters / peak FLOP/s per device (PaLM, no attention FLOPs)"


@dataclass(frozen=True, kw_only=True)
class Summary:
    tokens_per_s_per_device: float | None
    """Mean over steady steps (the first step, which warms up, is left out when there are more)."""
    loss: float | None
    """Last step's loss, averaged over ranks."""
    steps: int
    device_peak_bytes: int | None
    device_total_bytes: int | None
    device_source: str | None
    mfu: float | None
    mfu_formula: str
    peak_flops: float | None
    num_parameters: int | None
    host_peak_bytes_per_rank: dict[str, int]
    host_peak_bytes_per_node: dict[str, int]
    """Highest sum of the node's ranks' RSS at one moment (samples aligned in time)."""
    node_watcher: dict[str, dict[str, int | None]]
    """Per host, from the node watcher: peak of the ranks' summed RSS (children included) and
    PSS, the lowest MemAvailable, and the cgroup's own peak."""
    host_limit_bytes: int | None
    problems: list[str]
    warnings: list[str]
    """Probe and hook failures the ranks and node watchers recorded (each once per source)."""

    def to_dict(self) -> dict:
        return asdict(self)


def node_total_series(ranks: list[RankTimeline], grid_ns: np.ndarray) -> np.ndarray:
    """Sum of the ranks' RSS on ``grid_ns``, each rank's last sample carried forward (zero
    before its first sample and after its last)."""
    total = np.zeros(len(grid_ns))
    for timeline in ranks:
        if not len(timeline.t_ns):
            continue
        index = np.searchsorted(timeline.t_ns, grid_ns, side="right") - 1
        valid = (index >= 0) & (grid_ns <= timeline.t_ns[-1])
        rss = timeline.columns["rss_bytes"]
        total[valid] += rss[index[valid]]
    return total


def ranks_by_host(run: Run) -> dict[str, list[RankTimeline]]:
    hosts: dict[str, list[RankTimeline]] = defaultdict(list)
    for rank in run.rank_ids:
        timeline = run.ranks[rank]
        hosts[timeline.header.get("host", "?")].append(timeline)
    return dict(hosts)


def node_totals(run: Run) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per host: (sample times, summed RSS of its ranks). Computed once per run and kept on
    it: the summary and the report both need it, and the merge is the costly part of a long run."""
    if run.node_totals_cache is None:
        run.node_totals_cache = {}
        for host, ranks in ranks_by_host(run).items():
            grid = np.unique(np.concatenate([t.t_ns for t in ranks]))
            run.node_totals_cache[host] = (grid, node_total_series(ranks, grid))
    return run.node_totals_cache


def _nanmax(values: np.ndarray) -> int | None:
    return None if not len(values) or np.all(np.isnan(values)) else int(np.nanmax(values))


def node_watcher_figures(node: NodeTimeline) -> dict[str, int | None]:
    rss_sum = np.nansum(np.vstack(list(node.rank_rss.values())), axis=0) if node.rank_rss else np.array([])
    available = node.columns["mem_available_bytes"]
    return {
        "rss_sum_peak_bytes": _nanmax(rss_sum),
        "pss_sum_peak_bytes": _nanmax(node.pss_total()),
        "min_available_bytes": None if not len(available) else int(np.nanmin(available)),
        "cgroup_peak_bytes": _nanmax(node.columns["cgroup_peak_bytes"]),
    }


def _throughput(steps: list[dict]) -> float | None:
    timed = [s for s in steps if s.get("step_time_s")]
    if len(timed) > 1:
        timed = timed[1:]
    seconds = sum(s["step_time_s"] for s in timed)
    return sum(s["tokens"] for s in timed) / seconds if seconds > 0 else None


def summarize(run: Run) -> Summary:
    config = run.spec.get("config", {})
    hardware = config.get("hardware", {})
    first = run.ranks[run.rank_ids[0]] if run.ranks else None
    rank0_steps = first.steps if first else []
    last_losses = [
        t.steps[-1]["loss"] for t in run.ranks.values() if t.steps and t.steps[-1].get("loss") is not None
    ]
    rate = _throughput(rank0_steps)
    device_peaks = [p for p in (t.device_peak_bytes() for t in run.ranks.values()) if p is not None]
    peak_flops = hardware.get("peak_flops")
    num_parameters = run.spec.get("num_parameters") or next(
        (e["num_parameters"] for t in run.ranks.values() for e in t.events if e["kind"] == "model"),
        None,
    )
    mfu = None
    if rate and peak_flops and num_parameters:
        mfu = rate * 6 * num_parameters / peak_flops
    host_peaks = {
        str(rank): peak
        for rank, t in sorted(run.ranks.items())
        if (peak := t.host_peak_bytes()) is not None
    }
    return Summary(
        tokens_per_s_per_device=rate,
        loss=float(np.mean(last_losses)) if last_losses else None,
        steps=first.step_count if first else 0,
        device_peak_bytes=max(device_peaks) if device_peaks else None,
        device_total_bytes=first.header.get("device_total_bytes") if first else None,
        device_source=first.header.get("device_source") if first else None,
        mfu=mfu,
        mfu_formula=MFU_FORMULA,
        peak_flops=peak_flops,
        num_parameters=num_parameters,
        host_peak_bytes_per_rank=host_peaks,
        host_peak_bytes_per_node={
            host: int(total.max()) if len(total) else 0 for host, (_, total) in node_totals(run).items()
        },
        node_watcher={host: node_watcher_figures(node) for host, node in run.nodes.items()},
        host_limit_bytes=run.spec.get("host_limit_bytes"),
        problems=list(run.problems),
        warnings=collect_warnings(run),
    )


def collect_warnings(run: Run) -> list[str]:
    by_message: dict[str, list[str]] = {}
    sources = [(f"rank {r}", t.events) for r, t in sorted(run.ranks.items())]
    sources += [(f"node {h}", n.events) for h, n in sorted(run.nodes.items())]
    for source, events in sources:
        for event in events:
            if event["kind"] == "warning":
                by_message.setdefault(event["message"], []).append(source)
    return [f"{', '.join(where)}: {message}" for message, where in by_message.items()]
