"""host_limit: the node's host RAM peak against the limit, and a forecast for other layouts.

The forecast assumes what ZeRO-3 loading does: every local rank loads at the same time, so a
node with k ranks peaks at about k x the per-rank load-phase peak (runtime included).
"""

from __future__ import annotations

from memdiag.checks.finding import Finding
from memdiag.checks.loadphase import limit_of, ranks_forecast, run_loads, stacks_setting
from memdiag.stacks import cite_phase
from memdiag.summary import node_totals, node_watcher_figures, ranks_by_host
from memdiag.timeline.reader import Run
from memdiag.units import format_bytes

WARN_FRACTION = 0.9


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
            phase = phase_at_peak(ranks, totals[host])
            lines, cited = cite_phase(run.path, binding_phases(phase), stacks_setting(run))
            findings.append(
                Finding(
                    id="host_limit",
                    severity="error" if peak > limit else "warning",
                    message=f"node {host} peaked at {format_bytes(peak)} of host RAM, "
                    f"{peak / limit:.0%} of the {format_bytes(limit)} limit ({source})" + lines,
                    evidence={"node": host, "node_peak_bytes": peak, "limit_bytes": limit, "limit_source": source,
                              "phase": phase, "top_stacks": cited},
                    fix=fix_for(run, phase),
                    ranks=[t.rank for t in ranks],
                )
            )
    findings += forecast(run, limit, source)
    return findings


LOAD_PHASE_NAMES = ("load", "init", "model_build", "zero_init", "checkpoint_load")


ENCLOSING_PHASES = {"optimizer_step": "step"}
"""Phases that run inside another one the rank records (the load family aside): ZeRO-3's
optimizer step runs inside the engine's step, whose capture holds it."""


def binding_phases(phase: str | None) -> list[str]:
    """The phase that held the peak, then the captured phase that encloses it (innermost first)."""
    if not phase:
        return []
    if phase in LOAD_PHASE_NAMES and phase != "load":
        return [phase, "load"]
    return [phase, ENCLOSING_PHASES[phase]] if phase in ENCLOSING_PHASES else [phase]


def phase_at_peak(ranks, series) -> str | None:
    """The innermost phase of the node's first rank when the node's total peaked."""
    import numpy as np

    grid, values = series
    if not len(values) or not ranks:
        return None
    when = grid[int(np.argmax(values))]
    first = min(ranks, key=lambda t: t.rank)
    if not len(first.t_ns):
        return None
    index = min(int(np.searchsorted(first.t_ns, when)), len(first.t_ns) - 1)
    return str(first.sample_phase[index]) or None


def fix_for(run: Run, phase: str | None) -> str:
    """The fix for what the run shows: only causes it recorded."""
    from memdiag.checks.scaling_5290 import check_model_input

    if phase in LOAD_PHASE_NAMES:
        if not any(p.name == "ds_initialize" for t in run.ranks.values() for p in t.phases):
            # memdiag's load phase runs from the start to deepspeed.initialize, which this run never called
            return ("the peak is in the script's own code before any deepspeed.initialize (this run never called it): "
                    "the top stacks name the lines; hold less there, or use fewer ranks per node")
        if check_model_input(run):
            return ("the peak is in loading, where every rank holds the whole model: build it partitioned "
                    "(see the scaling_5290 finding for the code), or use fewer ranks per node")
        fewer = "load.concurrency=N" if run.spec.get("case") or (run.spec.get("config") or {}).get("case") else \
            "e.g. a barrier so that at most N local ranks read at once"
        return (f"the peak is in loading, already partitioned: read the checkpoint with fewer ranks at a time "
                f"({fewer}), or use fewer ranks per node")
    where = f"in {phase}" if phase else "while training"
    return (f"the peak is {where}: spread the ranks over more nodes (fewer per node), or cut what each holds "
            "(activation checkpointing, a smaller micro_batch; on the CPU accelerator the training states are in host RAM)")


def forecast(run: Run, limit: int, source: str) -> list[Finding]:
    loads = run_loads(run)
    ranks = ranks_forecast(run, limit)
    if not loads or ranks is None:
        return []
    node, table, over, first_over = ranks.node, ranks.table, ranks.over, ranks.first_over
    message = (
        f"forecast: loading peaks at {format_bytes(node.load_per_rank_bytes)} a rank (a node of k ranks: k x that); "
        f"training holds {format_bytes(node.train_fixed_per_rank_bytes)} a rank"
        + (f" beside the model's {format_bytes(node.states_per_node_bytes)} of states, shared by the node's ranks"
           if node.states_per_node_bytes else "")
        + "; " + ranks.sentence()
    )
    return [
        Finding(
            id="host_limit_forecast",
            severity="warning" if over and first_over <= max(l.local_world_size for l in loads) * 2 else "info",
            message=message,
            evidence={
                "per_rank_load_peak_bytes": node.load_per_rank_bytes,
                "per_rank_training_fixed_bytes": node.train_fixed_per_rank_bytes,
                "states_per_node_bytes": node.states_per_node_bytes,
                "limit_bytes": limit,
                "limit_source": source,
                "node_peak_bytes_by_local_ranks": {str(k): v for k, v in table.items()},
                "over_limit_bytes_by_local_ranks": {str(k): v for k, v in over.items()},
            },
            fix="" if not over else "keep ranks per node below the first count that exceeds the limit"
            + ("; the load phase binds: see the scaling_5290 finding for the per-rank copy" if
               table[first_over] == first_over * node.load_per_rank_bytes else
               "; training binds: spread the ranks over more nodes"),
            ranks=[l.rank for l in loads],
            moments=[{"t": max(l.load_end_ns for l in loads), "label": "end of model load"}],
        )
    ]
