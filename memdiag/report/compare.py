"""A comparison page for several runs (load=reference against zero_init, 1x8 against 2x4),
aligned by phase: each run's time axis is mapped phase by phase onto a common one."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import plotly.graph_objects as go

from memdiag.files import write_atomic
from memdiag.report.figures import phase_bands, run_start_ns
from memdiag.summary import node_totals
from memdiag.timeline.reader import Run
from memdiag.units import format_bytes

GIB = 2**30


def phase_peaks(run: Run) -> dict[str, int]:
    """Top-level phase -> the highest sum of a node's ranks' RSS at one moment within it."""
    t0 = run_start_ns(run)
    peaks: dict[str, int] = {}
    for name, begin, end in phase_bands(run, t0):
        for grid, total in node_totals(run).values():
            inside = (grid >= t0 + begin * 1e9) & (grid <= t0 + end * 1e9)
            if inside.any():
                peaks[name] = max(peaks.get(name, 0), int(total[inside].max()))
    return peaks


def aligned_x(run: Run, t_ns: np.ndarray, order: list[str]) -> np.ndarray:
    """Phase index + fraction of the phase elapsed; NaN outside the named phases."""
    t0 = run_start_ns(run)
    x = np.full(len(t_ns), np.nan)
    seconds = (t_ns - t0) / 1e9
    for name, begin, end in phase_bands(run, t0):
        if name not in order or end <= begin:
            continue
        inside = (seconds >= begin) & (seconds <= end)
        x[inside] = order.index(name) + (seconds[inside] - begin) / (end - begin)
    return x


def comparison_figure(runs: list[Run], labels: list[str], order: list[str]) -> go.Figure:
    fig = go.Figure()
    for run, label in zip(runs, labels):
        for host, (grid, total) in node_totals(run).items():
            x = aligned_x(run, grid, order)
            keep = ~np.isnan(x)
            fig.add_trace(go.Scatter(x=x[keep], y=total[keep] / GIB, mode="lines", name=f"{label}: node {host}"))
    for index, name in enumerate(order):
        fig.add_vrect(x0=index, x1=index + 1, line_width=0, fillcolor="rgba(0,0,0,0.04)" if index % 2 else "rgba(0,0,0,0)",
                      annotation_text=name, annotation_position="top left", annotation_font_size=10)
    fig.update_layout(
        title="Node host RAM, runs aligned phase by phase",
        xaxis={"title": "phase (each phase stretched to one unit)", "tickvals": [i + 0.5 for i in range(len(order))], "ticktext": order},
        yaxis_title="GiB",
        height=480,
    )
    return fig


def comparison_table(runs: list[Run], labels: list[str], order: list[str]) -> str:
    peaks = [phase_peaks(run) for run in runs]
    head = "<tr><th>phase</th>" + "".join(f"<th>{html.escape(l)} node peak</th>" for l in labels)
    head += "".join(f"<th>{html.escape(l)} - {html.escape(labels[0])}</th>" for l in labels[1:]) + "</tr>"
    rows = []
    for name in order:
        values = [p.get(name) for p in peaks]
        cells = "".join(f"<td>{format_bytes(v)}</td>" for v in values)
        diffs = "".join(
            f"<td>{'n/a' if v is None or values[0] is None else ('+' if v >= values[0] else '-') + format_bytes(abs(v - values[0]))}</td>"
            for v in values[1:]
        )
        rows.append(f"<tr><td>{html.escape(name)}</td>{cells}{diffs}</tr>")
    return f"<table class='compare'><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def merge_orders(sequences: list[list[str]]) -> list[str]:
    """One order of phase names that keeps every run's own order: a name new to the merged
    order goes right after the name that precedes it in its run (or first)."""
    order: list[str] = []
    for sequence in sequences:
        previous = None
        for name in sequence:
            if name not in order:
                order.insert(order.index(previous) + 1 if previous in order else 0, name)
            previous = name
    return order


def phase_order(runs: list[Run]) -> list[str]:
    return merge_orders([[name for name, _, _ in phase_bands(run, run_start_ns(run))] for run in runs])


def run_label(run: Run) -> str:
    config = run.spec.get("config") or {}
    if run.spec.get("command"):  # memdiag run -- CMD
        parts = [f"{len(run.ranks)} rank(s)", " ".join(run.spec["command"][:3])]
    else:
        parts = [run.spec.get("layout") or "?", f"load={config.get('load', '?')}"]
    return f"{run.path.name} ({', '.join(parts)})"


def write_comparison(runs: list[Run], path: Path) -> Path:
    import plotly.io as pio

    from memdiag.report.html import RENDER_CHECK, STYLE

    labels = [run_label(run) for run in runs]
    order = phase_order(runs)
    figure = comparison_figure(runs, labels, order)
    body = (
        "<h1>memdiag: comparison</h1><h2>Node host RAM peak per phase</h2>"
        + comparison_table(runs, labels, order)
        + "<p class='note'>node peak: the highest sum of the node's ranks' RSS at one moment within the phase "
        "(the busiest node); differences against the first run</p>"
        + "<section class='figure' data-figure='compare'>"
        + pio.to_html(figure, full_html=False, include_plotlyjs=True, div_id="fig-compare", config={"displaylogo": False})
        + "</section>"
        + RENDER_CHECK
    )
    write_atomic(path, f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>memdiag comparison</title><style>{STYLE}</style></head><body>{body}</body></html>")
    return path
