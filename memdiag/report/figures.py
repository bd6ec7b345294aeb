"""Plotly figures of one run, built from the reader's data only (tested on figure data)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from memdiag.summary import Summary, node_total_series, ranks_by_host
from memdiag.timeline.reader import Run

GIB = 2**30
TOP_PHASE_COLORS = {
    "init": "rgba(150,150,150,0.15)",
    "model_build": "rgba(255,127,14,0.15)",
    "ds_initialize": "rgba(44,160,44,0.15)",
    "train": "rgba(31,119,180,0.08)",
    "teardown": "rgba(148,103,189,0.15)",
}
TRAIN_PHASES = {"forward", "backward", "step"}


def run_start_ns(run: Run) -> int:
    starts = [t.header["t"] for t in run.ranks.values()]
    return min(starts) if starts else 0


def phase_bands(run: Run, t0_ns: int) -> list[tuple[str, float, float]]:
    """Top-level phases of the lowest rank in seconds; micro-step phases merge into ``train``."""
    if not run.ranks:
        return []
    timeline = run.ranks[run.rank_ids[0]]
    last_t = max([timeline.t_ns[-1]] if len(timeline.t_ns) else [t0_ns])
    bands: list[tuple[str, float, float]] = []
    for phase in timeline.phases:
        if phase.depth != 0:
            continue
        name = "train" if phase.name in TRAIN_PHASES else phase.name
        begin = (phase.begin_ns - t0_ns) / 1e9
        end = ((phase.end_ns if phase.end_ns is not None else last_t) - t0_ns) / 1e9
        if bands and bands[-1][0] == name == "train":
            bands[-1] = (name, bands[-1][1], end)
        else:
            bands.append((name, begin, end))
    return bands


def _add_bands(fig: go.Figure, bands: list[tuple[str, float, float]]) -> None:
    for name, begin, end in bands:
        fig.add_vrect(
            x0=begin,
            x1=end,
            fillcolor=TOP_PHASE_COLORS.get(name, "rgba(200,200,200,0.1)"),
            line_width=0,
            layer="below",
            annotation_text=name,
            annotation_position="top left",
            annotation_font_size=10,
        )


def _add_limit(fig: go.Figure, limit_bytes: int | None, data_max_bytes: float, label: str) -> str:
    """Draw the limit when it is near the data; a far-off limit would flatten every curve, so
    it is named in the subtitle instead."""
    if not limit_bytes:
        return ""
    if data_max_bytes and limit_bytes > 3 * data_max_bytes:
        return f"{label} {limit_bytes / GIB:.1f} GiB (off scale: peak is {data_max_bytes / limit_bytes:.1%} of it)"
    fig.add_hline(
        y=limit_bytes / GIB,
        line={"color": "red", "dash": "dash"},
        annotation_text=f"{label} {limit_bytes / GIB:.1f} GiB",
        annotation_position="bottom right",
    )
    return ""


def _add_steps(fig: go.Figure, run: Run, t0_ns: int, max_markers: int = 200) -> None:
    if not run.ranks:
        return
    steps = run.ranks[run.rank_ids[0]].steps
    if not steps or len(steps) > max_markers:
        return
    fig.add_trace(
        go.Scatter(
            x=[(s["t"] - t0_ns) / 1e9 for s in steps],
            y=[0] * len(steps),
            mode="markers",
            marker={"symbol": "line-ns-open", "size": 10, "color": "#555"},
            name="optimizer steps",
            text=[f"step {s['step']} loss {s.get('loss')}" for s in steps],
            hoverinfo="text",
        )
    )


def host_figure(run: Run, summary: Summary) -> go.Figure:
    t0 = run_start_ns(run)
    fig = go.Figure()
    for rank in run.rank_ids:
        timeline = run.ranks[rank]
        fig.add_trace(
            go.Scatter(
                x=(timeline.t_ns - t0) / 1e9,
                y=timeline.columns["rss_bytes"] / GIB,
                mode="lines",
                name=f"rank {rank} RSS",
                customdata=np.array(timeline.sample_phase, dtype=object),
                hovertemplate="%{y:.3f} GiB<br>%{customdata}<extra>rank " + str(rank) + "</extra>",
            )
        )
    for host, ranks in ranks_by_host(run).items():
        grid = np.unique(np.concatenate([t.t_ns for t in ranks]))
        fig.add_trace(
            go.Scatter(
                x=(grid - t0) / 1e9,
                y=node_total_series(ranks, grid) / GIB,
                mode="lines",
                line={"width": 3, "dash": "dot"},
                name=f"node {host} total",
            )
        )
    node_max = max(summary.host_peak_bytes_per_node.values(), default=0)
    note = _add_limit(fig, summary.host_limit_bytes, node_max, "host RAM limit")
    _add_bands(fig, phase_bands(run, t0))
    _add_steps(fig, run, t0)
    fig.update_layout(
        title="Host RAM (RSS) per rank and per node" + (f"<br><sup>{note}</sup>" if note else ""),
        xaxis_title="time since start (s)",
        yaxis_title="GiB",
        hovermode="x unified",
        height=480,
    )
    return fig


def device_figure(run: Run, summary: Summary) -> go.Figure:
    t0 = run_start_ns(run)
    fig = go.Figure()
    series = (
        ("device_allocated_bytes", "allocated", "solid"),
        ("device_reserved_bytes", "reserved", "dash"),
        ("nvml_used_bytes", "NVML used", "dot"),
    )
    for rank in run.rank_ids:
        timeline = run.ranks[rank]
        for column, label, dash in series:
            values = timeline.columns[column]
            if not len(values) or np.all(np.isnan(values)):
                continue
            if column == "device_reserved_bytes" and np.array_equal(
                values, timeline.columns["device_allocated_bytes"], equal_nan=True
            ):
                continue  # the CPU accelerator reports RSS for both
            fig.add_trace(
                go.Scatter(
                    x=(timeline.t_ns - t0) / 1e9,
                    y=values / GIB,
                    mode="lines",
                    line={"dash": dash},
                    name=f"rank {rank} {label}",
                )
            )
    note = _add_limit(
        fig, summary.device_total_bytes, summary.device_peak_bytes or 0, "device capacity"
    )
    _add_bands(fig, phase_bands(run, t0))
    source = summary.device_source or "no device probe"
    fig.update_layout(
        title=f"Device memory per rank<br><sup>source: {source}" + (f"; {note}" if note else "") + "</sup>",
        xaxis_title="time since start (s)",
        yaxis_title="GiB",
        hovermode="x unified",
        height=480,
    )
    return fig


def build_figures(run: Run, summary: Summary) -> dict[str, go.Figure]:
    return {"host": host_figure(run, summary), "device": device_figure(run, summary)}
