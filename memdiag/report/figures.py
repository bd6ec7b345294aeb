"""Plotly figures of one run, built from the reader's data only (tested on figure data)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from memdiag.reconcile import reconcile
from memdiag.report.downsample import describe, minmax_indices
from memdiag.summary import Summary, node_totals
from memdiag.timeline.reader import Run
from memdiag.units import format_bytes

GIB = 2**30
TOP_PHASE_COLORS = {
    "init": "rgba(150,150,150,0.15)",
    "model_build": "rgba(255,127,14,0.15)",
    "ds_initialize": "rgba(44,160,44,0.15)",
    "train": "rgba(31,119,180,0.08)",
    "teardown": "rgba(148,103,189,0.15)",
}
TRAIN_PHASES = {"forward", "backward", "step"}


def seconds(t_ns: np.ndarray, t0_ns: int) -> np.ndarray:
    """Seconds since the run's start as float32: plotly ships numpy arrays as typed binary."""
    return ((t_ns - t0_ns) / 1e9).astype(np.float32)


def gib(values: np.ndarray) -> np.ndarray:
    return (np.asarray(values, dtype=np.float64) / GIB).astype(np.float32)


def downsampling_note(run: Run) -> str:
    total = sum(len(t.t_ns) for t in run.ranks.values())
    kept = sum(len(minmax_indices(t.columns["rss_bytes"])) for t in run.ranks.values())
    note = describe(total, kept)
    header = run.ranks[run.rank_ids[0]].header if run.ranks else {}
    full, window = header.get("sample_full_rate_s"), header.get("sample_steady_interval_s")
    if full is not None and window:
        note += (f"; recorded at {header.get('sample_hz', '?'):g} Hz except in the training loop after its first "
                 f"{full:g} s, where each {window:g} s window kept its lowest and highest samples")
    return note


def step_axis(run: Run) -> tuple[np.ndarray, np.ndarray] | None:
    """(times, step numbers) at which optimizer steps began and ended, from the lowest rank:
    a time maps onto the step axis by linear interpolation between them."""
    if not run.ranks:
        return None
    timeline = run.ranks[run.rank_ids[0]]
    first = next((p.begin_ns for p in timeline.phases if p.name == "forward"), None)
    steps = timeline.steps
    if first is None or not steps:
        return None
    times = np.array([first] + [s["t"] for s in steps], dtype=np.float64)
    numbers = np.array([0] + [s["step"] for s in steps], dtype=np.float64)
    return times, numbers


def to_steps(t_ns: np.ndarray, axis: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    times, numbers = axis
    x = np.interp(t_ns.astype(np.float64), times, numbers)
    x[(t_ns < times[0]) | (t_ns > times[-1])] = np.nan  # before training or after it
    return x.astype(np.float32)


def add_axis_switch(fig: go.Figure, run: Run, step_x: list) -> None:
    """Buttons that move every time-based trace between a time axis and an optimizer-step axis."""
    if step_x is None or not any(x is not None for x in step_x):
        return
    time_x = [trace.x for trace in fig.data]
    steps_x = [time_x[i] if x is None else x for i, x in enumerate(step_x)]
    shapes = fig.layout.shapes
    annotations = fig.layout.annotations
    fig.update_layout(
        updatemenus=[
            {
                "type": "buttons",
                "direction": "right",
                "x": 1.0,
                "xanchor": "right",
                "y": 1.12,
                "buttons": [
                    {"label": "time", "method": "update", "args": [{"x": time_x}, {"xaxis.title.text": "time since start (s)", "shapes": shapes, "annotations": annotations}]},
                    {"label": "step", "method": "update", "args": [{"x": steps_x}, {"xaxis.title.text": "optimizer step", "shapes": [], "annotations": []}]},
                ],
            }
        ]
    )


def run_start_ns(run: Run) -> int:
    starts = [t.header["t"] for t in run.ranks.values()] + [n.header["t"] for n in run.nodes.values()]
    return min(starts) if starts else 0


def top_phases(phases: list) -> list:
    """Depth-0 phases, except that memdiag's own ``load`` phase (process start to
    deepspeed.initialize) gives way to the phases a case marks inside it (init, model_build)."""
    top = []
    for phase in phases:
        if phase.depth == 0 and phase.name == "load" and phase.end_ns is not None:
            inside = [p for p in phases if p.depth == 1 and phase.begin_ns <= p.begin_ns and (p.end_ns or 0) <= phase.end_ns]
            if any(p.name == "model_build" for p in inside):
                top += inside
                continue
        if phase.depth == 0:
            top.append(phase)
    return sorted(top, key=lambda p: p.begin_ns)


def phase_bands(run: Run, t0_ns: int) -> list[tuple[str, float, float]]:
    """Top-level phases of the lowest rank in seconds; micro-step phases merge into ``train``."""
    if not run.ranks:
        return []
    timeline = run.ranks[run.rank_ids[0]]
    last_t = max([timeline.t_ns[-1]] if len(timeline.t_ns) else [t0_ns])
    bands: list[tuple[str, float, float]] = []
    for phase in top_phases(timeline.phases):
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


def _add_peak_markers(fig: go.Figure, run: Run, t0_ns: int) -> None:
    """One marker per rank at its highest exact phase peak, naming the phase and the layer."""
    xs, ys, texts = [], [], []
    for rank in run.rank_ids:
        ends = [e for e in run.ranks[rank].events if e["kind"] == "phase_end" and e.get("host_peak_bytes")]
        if not ends:
            continue
        top = max(ends, key=lambda e: (e["host_peak_bytes"], -e.get("depth", 0)))
        where = f" in {top['host_peak_module']}" if top.get("host_peak_module") else ""
        xs.append((top["t"] - t0_ns) / 1e9)
        ys.append(top["host_peak_bytes"] / GIB)
        texts.append(f"rank {rank} peak {top['host_peak_bytes'] / GIB:.3f} GiB: {top['phase']}{where} (step {top.get('step')})")
    if xs:
        fig.add_trace(
            go.Scatter(
                x=xs, y=ys, mode="markers", marker={"symbol": "triangle-down", "size": 12, "color": "crimson"},
                name="exact phase peaks", text=texts, hoverinfo="text",
            )
        )


def _add_steps(fig: go.Figure, run: Run, t0_ns: int, max_markers: int = 200) -> None:
    if not run.ranks:
        return
    timeline = run.ranks[run.rank_ids[0]]
    steps = timeline.steps
    if not steps or timeline.step_count > max_markers:
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


MAX_RANK_LINES = 16
"""Above this many ranks, a node is drawn as the band its ranks span, with the ranks that stand out."""
ENVELOPE_POINTS = 1500


def node_points(run: Run) -> int:
    """Grid points (or min/max buckets) per node trace: 1500 up to 8 nodes, then fewer, so that
    the page stays about the same size however many nodes (never under 300: one point per 5
    minutes of a day)."""
    return max(300, ENVELOPE_POINTS * 8 // max(8, len({t.header.get("host") for t in run.ranks.values()})))


def standout_ranks(run: Run, limit: int = MAX_RANK_LINES) -> tuple[list[int], str | None]:
    """Every rank when there are few; else per node the rank with the highest peak and the one
    that grew fastest, then the ranks whose peak is furthest above their node's median, up to
    ``limit``; with a sentence saying what the page shows."""
    if len(run.ranks) <= limit:
        return run.rank_ids, None
    from memdiag.summary import ranks_by_host

    chosen: list[int] = []
    above: list[tuple[float, int]] = []
    for ranks in ranks_by_host(run).values():
        peaks = {t.rank: float(np.nanmax(t.columns["rss_bytes"])) for t in ranks if len(t.t_ns)}
        if not peaks:
            continue
        growth = {t.rank: _growth(t) for t in ranks if len(t.t_ns) > 1}
        for pick in (max(peaks, key=peaks.get), max(growth, key=growth.get) if growth else None):
            if pick is not None and pick not in chosen:
                chosen.append(pick)
        median = float(np.median(list(peaks.values())))
        above += [((peak - median) / max(median, 1.0), rank) for rank, peak in peaks.items()]
    for _, rank in sorted(above, reverse=True):
        if len(chosen) >= limit:
            break
        if rank not in chosen:
            chosen.append(rank)
    chosen = sorted(chosen[:limit])
    return chosen, (f"{len(run.ranks)} ranks: each node drawn as the band its ranks span, with the {len(chosen)} ranks "
                    "that stand out (each node's highest peak and fastest growth, then the furthest above their "
                    "node's median); every rank's data is in the run's timeline files")


def _growth(timeline) -> float:
    """RSS growth over the rank's second half against its first: bytes per second, medians."""
    t, rss = timeline.t_ns, timeline.columns["rss_bytes"]
    half = len(t) // 2
    span = (t[-1] - t[0]) / 2e9
    if not half or span <= 0:
        return 0.0
    return float((np.nanmedian(rss[half:]) - np.nanmedian(rss[:half])) / span)


def _add_node_bands(fig: go.Figure, run: Run, t0: int, step_x: list, axis) -> None:
    """Per node, the lowest and highest RSS of its ranks on one time grid, drawn as a band."""
    from memdiag.summary import ranks_by_host

    for host, ranks in ranks_by_host(run).items():
        ranks = [t for t in ranks if len(t.t_ns)]
        if not ranks:
            continue
        start, end = min(t.t_ns[0] for t in ranks), max(t.t_ns[-1] for t in ranks)
        grid = np.linspace(start, end, node_points(run))
        series = []
        for t in ranks:
            keep = minmax_indices(t.columns["rss_bytes"])
            values = np.interp(grid, t.t_ns[keep].astype(np.float64), t.columns["rss_bytes"][keep].astype(np.float64),
                               left=np.nan, right=np.nan)
            series.append(values)
        stacked = np.vstack(series)
        low, high = np.nanmin(stacked, axis=0), np.nanmax(stacked, axis=0)
        x = seconds(grid.astype(np.int64), t0)
        for name, values, fill in ((f"node {host} ranks' lowest", low, None), (f"node {host} ranks' highest", high, "tonexty")):
            step_x.append(to_steps(grid.astype(np.int64), axis) if axis else None)
            fig.add_trace(go.Scatter(x=x, y=gib(values), mode="lines", line={"width": 0.5}, fill=fill,
                                     name=name, legendgroup=f"band-{host}", hovertemplate="%{y:.3f} GiB"))


def host_figure(run: Run, summary: Summary) -> go.Figure:
    t0 = run_start_ns(run)
    axis = step_axis(run)
    step_x: list = []
    fig = go.Figure()
    drawn, many = standout_ranks(run)
    if many:
        _add_node_bands(fig, run, t0, step_x, axis)
    for rank in drawn:
        timeline = run.ranks[rank]
        keep = minmax_indices(timeline.columns["rss_bytes"])
        step_x.append(to_steps(timeline.t_ns[keep], axis) if axis else None)
        fig.add_trace(
            go.Scatter(
                x=seconds(timeline.t_ns[keep], t0),
                y=gib(timeline.columns["rss_bytes"][keep]),
                mode="lines",
                name=f"rank {rank} RSS",
                customdata=np.array(timeline.phase_names, dtype=object)[timeline.sample_phase_codes[keep]] if timeline.phase_names else None,
                hovertemplate="%{y:.3f} GiB<br>%{customdata}<extra>rank " + str(rank) + "</extra>",
            )
        )
    for host, (grid, total) in node_totals(run).items():
        keep = minmax_indices(total, node_points(run))
        step_x.append(to_steps(grid[keep], axis) if axis else None)
        fig.add_trace(
            go.Scatter(
                x=seconds(grid[keep], t0),
                y=gib(total[keep]),
                mode="lines",
                line={"width": 3, "dash": "dot"},
                name=f"node {host} total",
            )
        )
    _add_peak_markers(fig, run, t0)
    node_max = max(summary.host_peak_bytes_per_node.values(), default=0)
    note = _add_limit(fig, summary.host_limit_bytes, node_max, "host RAM limit")
    _add_bands(fig, phase_bands(run, t0))
    _add_steps(fig, run, t0)
    step_x += [None] * (len(fig.data) - len(step_x))  # markers keep their time positions
    add_axis_switch(fig, run, step_x if axis else None)
    subtitle = "; ".join(x for x in (many, note) if x)
    fig.update_layout(
        title="Host RAM (RSS) per rank and per node" + (f"<br><sup>{subtitle}</sup>" if subtitle else ""),
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
    drawn, many = standout_ranks(run)
    for rank in drawn:
        timeline = run.ranks[rank]
        for column, label, dash in series:
            values = timeline.columns[column]
            if not len(values) or np.all(np.isnan(values)):
                continue
            if column == "device_reserved_bytes" and np.array_equal(
                values, timeline.columns["device_allocated_bytes"], equal_nan=True
            ):
                continue  # the CPU accelerator reports RSS for both
            keep = minmax_indices(values)
            fig.add_trace(
                go.Scatter(
                    x=seconds(timeline.t_ns[keep], t0),
                    y=gib(values[keep]),
                    mode="lines",
                    line={"dash": dash},
                    connectgaps=True,  # device points read at hook events fall on some samples only
                    name=f"rank {rank} {label}",
                )
            )
    note = _add_limit(
        fig, summary.device_total_bytes, summary.device_peak_bytes or 0, "device capacity"
    )
    _add_bands(fig, phase_bands(run, t0))
    source = summary.device_source or "no device probe"
    shown = f"; the {len(drawn)} ranks that stand out of {len(run.ranks)} (see the host chart)" if many else ""
    fig.update_layout(
        title=f"Device memory per rank<br><sup>source: {source}{shown}" + (f"; {note}" if note else "") + "</sup>",
        xaxis_title="time since start (s)",
        yaxis_title="GiB",
        hovermode="x unified",
        height=480,
    )
    return fig


CATEGORY_STACK = (
    ("parameters", ("parameters_bytes",)),
    ("gathered parameters", ("gathered_parameters_bytes",)),
    ("gradients", ("gradients_bytes",)),
    (
        "optimizer states",
        ("optimizer_master_bytes", "optimizer_exp_avg_bytes", "optimizer_exp_avg_sq_bytes", "optimizer_other_bytes"),
    ),
    ("activations", ("activations_bytes",)),
    ("other", ("other_bytes",)),
)


def memory_records(run: Run, rank: int) -> list[dict]:
    return [e for e in run.ranks[rank].events if e["kind"] == "memory"]


def categories_figure(run: Run) -> go.Figure | None:
    """Stacked categorised memory of the lowest rank, one point per micro-step phase end."""
    if not run.ranks:
        return None
    rank = run.rank_ids[0]
    records = memory_records(run, rank)
    if not records:
        return None
    t0 = run_start_ns(run)
    x = [(r["t"] - t0) / 1e9 for r in records]
    labels = [f"step {r['step']} after {r['phase']}" for r in records]
    fig = go.Figure()
    for name, keys in CATEGORY_STACK:
        fig.add_trace(
            go.Scatter(
                x=x,
                y=[sum(r.get(k, 0) for k in keys) / GIB for r in records],
                mode="lines",
                stackgroup="memory",
                name=name,
                text=labels,
                hovertemplate="%{y:.4f} GiB<br>%{text}",
            )
        )
    # on CUDA, what nvidia-smi shows above torch's tensors: the caching allocator's reserve and
    # the memory outside torch (CUDA context, NCCL, cuBLAS workspaces)
    beyond = (
        ("allocator cache (reserved - allocated)", lambda r: r.get("reserved_bytes"), lambda r: r["allocator_bytes"]),
        ("outside torch (NVML used - reserved)", lambda r: r.get("nvml_used_bytes"), lambda r: r.get("reserved_bytes")),
    )
    reconciled = False
    for name, top, below in beyond:
        values = [(top(r) - below(r)) / GIB if top(r) is not None and below(r) is not None else None for r in records]
        if any(v is not None for v in values):
            reconciled = True
            fig.add_trace(go.Scatter(x=x, y=[v or 0.0 for v in values], mode="lines", stackgroup="memory", name=name,
                                     line={"dash": "dot"}, text=labels, hovertemplate="%{y:.4f} GiB<br>%{text}"))
    source = records[0].get("allocator_source", "")
    fig.update_layout(
        title=f"Categorised memory, rank {rank}<br><sup>stack sums to the allocator total ({source}); "
        "other = total minus counted tensors" + ("; above it the allocator's cache and memory outside torch, up to "
                                                 "NVML's figure for this process" if reconciled else "") + "</sup>",
        xaxis_title="time since start (s)",
        yaxis_title="GiB",
        hovermode="x unified",
        height=440,
    )
    return fig


def layer_peaks(run: Run) -> tuple[dict[str, dict[str, float]], bool]:
    """Phase -> layer -> highest rise above the phase's starting level (bytes), over all steps
    and ranks; device figures when the run has them, else host. Also says which it used."""
    device = any(
        p.end_event and p.end_event.get("module_device_peaks")
        for t in run.ranks.values()
        for p in t.phases
    )
    peaks: dict[str, dict[str, float]] = {}
    for timeline in run.ranks.values():
        for phase in timeline.phases:
            event = phase.end_event or {}
            by_layer = event.get("module_device_peaks" if device else "module_host_peaks")
            begin = phase.begin_device_bytes if device else phase.begin_rss_bytes
            if not by_layer or begin is None:
                continue
            target = peaks.setdefault(phase.name, {})
            for layer, value in by_layer.items():
                target[layer] = max(target.get(layer, 0), value - begin)
    return peaks, device


def layers_figure(run: Run) -> go.Figure | None:
    peaks, device = layer_peaks(run)
    if not peaks:
        return None
    fig = go.Figure()
    for phase, by_layer in peaks.items():
        top = max(by_layer, key=by_layer.get)
        fig.add_trace(
            go.Bar(
                x=list(by_layer),
                y=[v / 2**20 for v in by_layer.values()],
                name=f"{phase} (peak in {top})",
            )
        )
    fig.update_layout(
        title=f"Peak {'device' if device else 'host'} memory by layer, above the phase's starting level"
        "<br><sup>highest over all steps and ranks; the layer is the ZeRO-3 sub-module being fetched</sup>",
        barmode="group",
        yaxis_title="MiB above phase start",
        height=420,
    )
    return fig


def node_figures(run: Run, summary: Summary) -> dict[str, go.Figure]:
    figures = {}
    t0 = run_start_ns(run)
    for host, node in run.nodes.items():
        if not len(node.t_ns):
            continue
        # stacked areas share one x: downsample on the node total so every rank keeps the same points
        rss_sum = np.nansum(np.vstack(list(node.rank_rss.values())), axis=0) if node.rank_rss else np.zeros(len(node.t_ns))
        keep = minmax_indices(rss_sum)
        x = seconds(node.t_ns[keep], t0)
        fig = go.Figure()
        for rank, rss in sorted(node.rank_rss.items()):
            children = node.rank_children_rss.get(rank)
            has_children = children is not None and np.nansum(children) > 0
            own = rss - np.nan_to_num(children) if has_children else rss
            fig.add_trace(
                go.Scatter(x=x, y=gib(np.nan_to_num(own[keep])), mode="lines", stackgroup="ranks", name=f"rank {rank} RSS")
            )
            if has_children:  # DataLoader workers, compilers: the rank's too, stacked on it
                roles = ", ".join(sorted(node.rank_children_roles.get(rank) or {})) or "children"
                fig.add_trace(go.Scatter(x=x, y=gib(np.nan_to_num(children[keep])), mode="lines", stackgroup="ranks",
                                         line={"dash": "dot"}, name=f"rank {rank} children RSS ({roles})"))
        pss = node.pss_total()
        has_pss = np.flatnonzero(~np.isnan(pss))
        has_pss = has_pss[minmax_indices(pss[has_pss])]  # read once a second: a day's run has 86,400
        fig.add_trace(
            go.Scatter(x=seconds(node.t_ns[has_pss], t0), y=gib(pss[has_pss]), mode="lines+markers",
                       line={"dash": "dot", "width": 2}, name="sum of PSS (shared pages once)")
        )
        used = (node.columns["mem_total_bytes"] - node.columns["mem_available_bytes"])[keep]
        fig.add_trace(go.Scatter(x=x, y=gib(used), mode="lines", line={"color": "black", "width": 1}, name="node used (MemTotal - MemAvailable)"))
        cgroup_usage = node.columns["cgroup_usage_bytes"][keep]
        if not np.all(np.isnan(cgroup_usage)):
            fig.add_trace(go.Scatter(x=x, y=gib(cgroup_usage), mode="lines", line={"color": "gray", "dash": "dash", "width": 1}, name="cgroup usage"))
        top = max(float(np.nanmax(used)) if len(used) else 0.0, 1.0)
        note = _add_limit(fig, summary.host_limit_bytes, top, "host RAM limit")
        _add_bands(fig, phase_bands(run, t0))
        fig.update_layout(
            title=f"Node {host}: host RAM stacked by rank (node watcher)" + (f"<br><sup>{note}</sup>" if note else ""),
            xaxis_title="time since start (s)",
            yaxis_title="GiB",
            hovermode="x unified",
            height=460,
        )
        figures[f"node-{host}"] = fig
    return figures


def add_finding_marks(fig: go.Figure, run: Run, findings: list[dict]) -> None:
    """A dotted line at every moment a finding refers to, labelled with its id."""
    t0 = run_start_ns(run)
    for finding in findings:
        for moment in finding.get("moments", []):
            fig.add_vline(
                x=(moment["t"] - t0) / 1e9,
                line={"color": "crimson" if finding["severity"] == "error" else "darkorange", "dash": "dot"},
                annotation_text=f"{finding['id']}: {moment.get('label', '')}",
                annotation_position="top right",
                annotation_font_size=10,
            )


def reconciliation_figure(run: Run) -> go.Figure | None:
    """One stacked bar per phase (CUDA runs): the allocated peak, the allocator's cache above it
    and memory outside torch, up to NVML's figure for the process."""
    reconciled = reconcile(run)
    if reconciled is None or not reconciled[1]:
        return None
    rank, rows = reconciled
    names = [r.phase for r in rows]
    cache_text = [f"of which inactive split (fragmented): {format_bytes(r.inactive_split_bytes)}"
                  if r.inactive_split_bytes is not None else "" for r in rows]
    fig = go.Figure()
    for label, values, text in (
        ("allocated peak (tensors)", [r.allocated_peak_bytes for r in rows], None),
        ("allocator cache (reserved peak - allocated peak)", [r.cache_bytes for r in rows], cache_text),
        ("outside torch (NVML used - reserved: context, NCCL, workspaces)", [r.outside_torch_bytes for r in rows], None),
    ):
        fig.add_trace(go.Bar(x=names, y=[(v or 0) / GIB for v in values], name=label, text=text,
                             hovertemplate="%{x}: %{y:.3f} GiB" + ("<br>%{text}" if text else "") + "<extra></extra>"))
    fig.update_layout(
        barmode="stack", height=420, yaxis_title="GiB",
        title=f"Device memory per phase, rank {rank}<br><sup>exact allocated and reserved peaks of the phase (torch's "
              "allocator counters); NVML's figure is the phase's highest sample</sup>",
    )
    return fig


ICICLE_FRAMES = 8
"""Frames drawn per stack in the icicle, outermost first (deeper ones fold into their parent)."""


def stacks_figure(table: dict) -> go.Figure | None:
    """An icicle of the allocations live at a phase's peak: the root is the peak, each level a
    frame (outermost first), each box's width its bytes."""
    stacks = table.get("stacks") or []
    if not stacks:
        return None
    from memdiag.stacks import phase_label

    root = f"{phase_label(table)} peak"
    ids, labels, parents, values = [root], [root], [""], [float(sum(s["bytes"] for s in stacks))]
    index = {root: 0}
    for stack in stacks:
        parent = root
        for function, filename, line in list(reversed(stack["frames"]))[:ICICLE_FRAMES]:
            node = f"{parent}|{function}|{filename}|{line}"
            if node not in index:
                index[node] = len(ids)
                name = f"{function} ({filename.rsplit('/', 1)[-1]}:{line})" if filename else str(function)
                ids.append(node), labels.append(name), parents.append(parent), values.append(0.0)
            values[index[node]] += stack["bytes"]
            parent = node
    kind = "device" if table.get("kind") == "device" else "host"
    fig = go.Figure(go.Icicle(ids=ids, labels=labels, parents=parents, values=values, branchvalues="total",
                              hovertemplate="%{label}<br>%{value:,.0f} bytes<extra></extra>", maxdepth=5))
    fig.update_layout(
        height=420, margin={"t": 60, "l": 10, "r": 10, "b": 10},
        title=f"What was live at the {root[:-len(' peak')]} phase's {kind} peak, rank {table.get('rank')} "
              f"({format_bytes(table.get('peak_bytes'))}), by stack<br><sup>outermost frame first; click a box to "
              "zoom in</sup>",
    )
    return fig


def build_figures(run: Run, summary: Summary, findings: list[dict] | None = None) -> dict[str, go.Figure]:
    figures = {"host": host_figure(run, summary)}
    if findings:
        add_finding_marks(figures["host"], run, findings)
    if len(run.ranks) <= MAX_RANK_LINES:  # past it each node's stacked view is on its own page
        figures.update(node_figures(run, summary))
    device = device_figure(run, summary)
    if device.data:  # a run with no device figures (no CUDA, no CPU accelerator) gets a note instead
        figures["device"] = device
    reconciliation = reconciliation_figure(run)
    if reconciliation is not None:
        figures["reconciliation"] = reconciliation
    for name, builder in (("categories", categories_figure), ("layers", layers_figure)):
        figure = builder(run)
        if figure is not None:
            figures[name] = figure
    from memdiag.device_stacks import read_device_tables
    from memdiag.stacks import lowest_rank_tables

    for table in [*lowest_rank_tables(run.path), *read_device_tables(run.path)[:1]]:
        figure = stacks_figure(table)
        if figure is not None:
            figures[f"stacks-{table.get('kind', 'host')}-{table.get('phase')}"] = figure
    return figures
