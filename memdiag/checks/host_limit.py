"""host_limit: the node's host RAM peak against the limit, and a forecast for other layouts.

The forecast assumes what ZeRO-3 loading does: every local rank loads at the same time, so a
node with k ranks peaks at about k x the per-rank load-phase peak (runtime included).
"""

from __future__ import annotations

from memdiag.checks.finding import Finding
from memdiag.checks.loadphase import run_loads
from memdiag.summary import node_totals, node_watcher_figures, ranks_by_host
from memdiag.timeline.reader import Run
from memdiag.units import format_bytes

WARN_FRACTION = 0.9
FORECAST_RANKS = (1, 2, 4, 8, 16)


def limit_of(run: Run) -> tuple[int | None, str]:
    config = run.spec.get("config") or {}
    if config.get("host_ram_bytes"):
        return config["host_ram_bytes"], "host_ram override"
    return run.spec.get("host_limit_bytes"), run.spec.get("host_limit_source") or "unknown"


def check(run: Run) -> list[Finding]:
    limit, source = limit_of(run)
    if not limit:
        return []
    findings = []
    totals = node_totals(run)
    for host, ranks in ranks_by_host(run).items():
        peak = int(totals[host][1].max()) if len(totals[host][1]) else 0
        node = run.nodes.get(host)
        if node is not None:
            peak = max(peak, node_watcher_figures(node)["rss_sum_peak_bytes"] or 0)
        if peak > WARN_FRACTION * limit:
            findings.append(
                Finding(
                    id="host_limit",
                    severity="error" if peak > limit else "warning",
                    message=f"node {host} peaked at {format_bytes(peak)} of host RAM, "
                    f"{peak / limit:.0%} of the {format_bytes(limit)} limit ({source})",
                    evidence={"node": host, "node_peak_bytes": peak, "limit_bytes": limit, "limit_source": source},
                    fix="use fewer ranks per node (more nodes), or cut the load-phase peak: build the model "
                    "under deepspeed.zero.Init and load one checkpoint shard at a time (memdiag load=zero_init); "
                    "see the scaling_5290 finding for the per-rank cost",
                    ranks=[t.rank for t in ranks],
                )
            )
    findings += forecast(run, limit, source)
    return findings


def forecast(run: Run, limit: int, source: str) -> list[Finding]:
    loads = run_loads(run)
    if not loads:
        return []
    per_rank = max(max(l.load_peak_bytes, l.init_peak_bytes or 0) for l in loads)
    devices_per_node = ((run.spec.get("config") or {}).get("hardware") or {}).get("cards_per_node")
    counts = sorted(set(FORECAST_RANKS) | ({devices_per_node} if devices_per_node else set()))
    table = {k: k * per_rank for k in counts}
    over = {k: v - limit for k, v in table.items() if v > limit}
    first_over = min(over) if over else None
    message = (
        f"forecast: each rank peaks at {format_bytes(per_rank)} while loading, so a node of k ranks "
        f"needs about k x that; "
        + (
            f"{first_over}+ ranks per node exceed the {format_bytes(limit)} limit "
            f"({first_over} ranks: over by {format_bytes(over[first_over])})"
            if over
            else f"up to {max(counts)} ranks per node fit in {format_bytes(limit)}"
        )
    )
    return [
        Finding(
            id="host_limit_forecast",
            severity="warning" if over and first_over <= max(l.local_world_size for l in loads) * 2 else "info",
            message=message,
            evidence={
                "per_rank_load_peak_bytes": per_rank,
                "limit_bytes": limit,
                "limit_source": source,
                "node_peak_bytes_by_local_ranks": {str(k): v for k, v in table.items()},
                "over_limit_bytes_by_local_ranks": {str(k): v for k, v in over.items()},
            },
            fix="" if not over else "keep ranks per node below the first count that exceeds the limit, or apply the "
            "scaling_5290 fix so the per-rank load peak stops holding a whole model",
            ranks=[l.rank for l in loads],
            moments=[{"t": max(l.load_end_ns for l in loads), "label": "end of model load"}],
        )
    ]
