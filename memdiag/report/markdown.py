"""A diagnosis to paste into a GitHub issue: ``report.md`` (layout, versions, host peaks per
phase per node, findings with their fixes, plan versus measured) and PNGs of the key figures,
exported with plotly's static export (kaleido) driving the system's Chromium."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

import plotly.graph_objects as go

from memdiag.files import write_atomic
from memdiag.reconcile import reconcile
from memdiag.summary import Summary, node_totals
from memdiag.timeline.reader import Run
from memdiag.units import format_bytes

FIGURES_DIR = "figures"
KEY_FIGURES = ("host", "device")
"""The figures worth a picture in an issue, plus the first node watcher's."""


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def export_pngs(figures: dict[str, go.Figure], out_dir: Path) -> tuple[list[Path], str | None]:
    """PNGs of the key figures in ``out_dir``; (written, why none were) - never raises."""
    wanted = [name for name in figures if name in KEY_FIGURES] + [name for name in figures if name.startswith("node-")][:1]
    browser = os.environ.get("BROWSER_PATH") or _chromium()
    if browser is None:
        return [], "no Chromium found for plotly's static export (install chromium, or set BROWSER_PATH)"
    os.environ.setdefault("BROWSER_PATH", browser)
    try:
        import kaleido  # noqa: F401  (plotly's exporter; imported here to say so when it is missing)
    except ImportError:
        return [], "kaleido is not installed (pip install kaleido)"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        with quiet_exporter_logs():
            for name in wanted:
                path = out_dir / f"{name}.png"
                staggered(figures[name], PNG_WIDTH_PX).write_image(str(path), width=PNG_WIDTH_PX, height=520, scale=1)
                written.append(path)
    except Exception as exc:  # a browser that will not start: the Markdown still says everything
        return written, f"static export failed: {exc}"
    return written, None


EXPORTER_LOGGERS = ("choreographer", "kaleido", "logistro")
"""Loggers of plotly's static exporter: they log, with a traceback, DevTools messages from Chromium
they could not decode and then ignore; a failed export still reaches ``export_pngs`` as an error."""


@contextlib.contextmanager
def quiet_exporter_logs():
    loggers = [logging.getLogger(name) for name in EXPORTER_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


PNG_WIDTH_PX = 1100
PLOT_SHARE = 0.72
"""Of the picture's width, what the plot area gets (the legend and margins take the rest)."""
CHAR_PX = 6.2
"""A 10 px label character, on average."""


def staggered(fig: go.Figure, width_px: int) -> go.Figure:
    """A copy whose top labels sit on as many lines as they need not to overlap: a picture
    has no script to move them (the HTML's does it in the browser, measured)."""
    import numpy as np

    copy = go.Figure(fig)
    xs = [np.asarray(t.x, dtype=float) for t in copy.data if t.x is not None and len(t.x)]
    xs = [x[~np.isnan(x)] for x in xs if np.issubdtype(x.dtype, np.number)]
    xs = [x for x in xs if len(x)]
    annotations = list(copy.layout.annotations or [])
    if not xs or not annotations:
        return copy
    low, high = min(float(x.min()) for x in xs), max(float(x.max()) for x in xs)
    per_px = (high - low) / (width_px * PLOT_SHARE) if high > low else 1.0
    levels: list[float] = []  # the right edge of the last label on each line
    for annotation in sorted(annotations, key=lambda a: float(a.x) if isinstance(a.x, (int, float)) else 0.0):
        if not isinstance(annotation.x, (int, float)):
            continue
        left = float(annotation.x)
        right = left + (len(str(annotation.text or "")) * CHAR_PX + 8) * per_px
        level = next((i for i, edge in enumerate(levels) if edge <= left), len(levels))
        if level == len(levels):
            levels.append(right)
        else:
            levels[level] = right
        annotation.yshift = -14 * level
    copy.layout.annotations = annotations
    return copy


def _phase_peaks_by_node(run: Run) -> dict[str, dict[str, int]]:
    from memdiag.report.figures import phase_bands, run_start_ns

    t0 = run_start_ns(run)
    bands = phase_bands(run, t0)
    peaks: dict[str, dict[str, int]] = {}
    for host, (grid, total) in node_totals(run).items():
        for name, begin, end in bands:
            inside = (grid >= t0 + begin * 1e9) & (grid <= t0 + end * 1e9)
            if inside.any():
                peaks.setdefault(name, {})[host] = max(peaks.get(name, {}).get(host, 0), int(total[inside].max()))
    return peaks


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]


def write_markdown(run: Run, summary: Summary, findings: list[dict], pngs: list[Path], note: str | None, path: Path) -> Path:
    spec = run.spec
    config = spec.get("config") or {}
    versions = spec.get("versions") or {}
    what = " ".join(spec["command"]) if spec.get("command") else f"{config.get('case', '?')} model.scale={(config.get('model') or {}).get('scale', '?')}"
    lines = [
        f"### memdiag: {what}",
        "",
        f"- layout: {spec.get('layout', '?')} ({spec.get('world_size') or len(run.ranks)} ranks), status **{spec.get('status', '?')}**"
        + (f" ({spec['signal']})" if spec.get("signal") else ""),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v),
        f"- host limit: {format_bytes(spec.get('host_limit_bytes'))} ({spec.get('host_limit_source', '?')})",
        "- host RAM peak per node: " + ", ".join(f"{format_bytes(b)} (node {h})" for h, b in summary.host_peak_bytes_per_node.items()),
    ]
    if summary.device_peak_bytes is not None:
        lines.append(f"- device peak: {format_bytes(summary.device_peak_bytes)} of {format_bytes(summary.device_total_bytes)} ({summary.device_source})")
    if summary.loss is not None:
        lines.append(f"- last loss {summary.loss:.4f}, {summary.tokens_per_s_per_device or 0:,.1f} tokens/s per device")
    peaks = _phase_peaks_by_node(run)
    hosts = sorted({h for per in peaks.values() for h in per})
    if peaks:
        lines += ["", "**Host RAM peak per phase, per node** (sum of the node's ranks at one moment)", ""]
        lines += _table(["phase", *hosts], [[phase, *(format_bytes(per.get(h)) for h in hosts)] for phase, per in peaks.items()])
    reconciled = reconcile(run)
    if reconciled is not None and reconciled[1]:
        rank, rows = reconciled
        lines += ["", f"**Device memory per phase, rank {rank}** (exact allocated and reserved peaks; NVML: the phase's "
                  "highest sample)", ""]
        lines += _table(["phase", "allocated peak", "allocator cache", "of it inactive split", "outside torch", "NVML used"],
                        [[r.phase, format_bytes(r.allocated_peak_bytes), format_bytes(r.cache_bytes),
                          format_bytes(r.inactive_split_bytes), format_bytes(r.outside_torch_bytes),
                          format_bytes(r.nvml_used_peak_bytes)] for r in rows])
    # every finding the HTML page shows, counted the same way
    counts = {severity: sum(f.get("severity") == severity for f in findings) for severity in ("error", "warning", "info")}
    counted = ", ".join(f"{n} {severity}{'s' if n != 1 and severity != 'info' else ''}" for severity, n in counts.items())
    lines += ["", f"**Findings** ({counted})", ""]
    for finding in findings or [{"severity": "info", "id": "none", "message": "no findings"}]:
        lines.append(f"- **[{finding['severity']}] {finding['id']}**: {finding['message']}")
        if finding.get("fix"):
            lines += ["  ```python", *("  " + line for line in finding["fix"].splitlines()), "  ```"]
    from memdiag.stacks import lowest_rank_tables, phase_label, stack_rows

    from memdiag.device_stacks import read_device_tables

    for table in [*lowest_rank_tables(run.path), *read_device_tables(run.path)[:1]]:
        rows = stack_rows(table, top=5)
        where = "device peak" if table.get("kind") == "device" else "host peak"
        tool = "PyTorch's memory snapshot" if table.get("kind") == "device" else "memray"
        lines += ["", f"**Live at the {phase_label(table)} phase's {where}** (rank {table.get('rank')}, "
                  f"{format_bytes(table.get('peak_bytes'))}; {tool})", ""]
        lines += _table(list(rows[0]), [list(r.values()) for r in rows]) if rows else []
    plan = _plan_rows(run)
    if plan:
        lines += ["", "**Plan versus measured** (memdiag plan's terms for this run)", ""]
        lines += _table(["term", "planned", "measured", "difference"], plan)
    lines.append("")
    for png in pngs:
        lines.append(f"![{png.stem}]({os.path.relpath(png, path.parent)})")
    if note:
        lines.append(f"_figures not exported: {note}_")
    lines += ["", f"_made by memdiag from {run.path.name}; the interactive report is report.html in the run directory_", ""]
    write_atomic(path, "\n".join(lines))
    return path


def _plan_rows(run: Run) -> list[list[str]]:
    if not (run.spec.get("config") or {}).get("model"):
        return []
    try:
        from memdiag.plan.calibrate import observe, predict
        from memdiag.plan.terms import Coefficients

        observation = observe(run)
        predicted = predict(observation, Coefficients())
    except Exception:
        return []
    return [
        [term, format_bytes(predicted[term]), format_bytes(measured),
         f"{(predicted[term] - measured) / measured:+.1%}" if measured else "n/a"]
        for term, measured in observation.measured.items()
    ]
