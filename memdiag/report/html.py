"""A self-contained report page: plotly.js inline (opens offline), summary as plain HTML."""

from __future__ import annotations

import html
import json
from pathlib import Path

import plotly.graph_objects as go

from memdiag.files import safe_name, write_atomic
from memdiag.report.figures import downsampling_note
from memdiag.summary import Summary
from memdiag.timeline.reader import Run
from memdiag.units import format_bytes

GIB = 2**30
NOT_HP = {"case", "reports_dir", "sample_hz"}


def benchmark_row(run: Run, summary: Summary) -> dict[str, str]:
    """The benchmark's table (配置 | fix_hp | token/p/s | loss | mem | MFU), headed in English."""
    config = run.spec.get("config", {})
    if run.spec.get("command"):  # memdiag run -- CMD: the command and the ranks it ran
        ranks = run.spec.get("world_size") or len(run.ranks)
        hardware, layout = " ".join(run.spec["command"]), f"({ranks} rank{'s' if ranks != 1 else ''} recorded)"
    else:
        hardware = config.get("hardware", {}).get("name", "?")
        layout = f"{config.get('nnodes', '?')}x{config.get('nproc_per_node', '?')}"
    mem = "/"
    if summary.device_peak_bytes is not None and summary.device_total_bytes:
        mem = f"{summary.device_peak_bytes / GIB:.2f}/{summary.device_total_bytes / GIB:.0f}"
    fix_hp = " ".join(o for o in config.get("overrides", []) if o.split("=")[0] not in NOT_HP) or "/"
    return {
        "config": f"{hardware} {layout}",
        "fix_hp": fix_hp,
        "token/p/s": "/" if summary.tokens_per_s_per_device is None else f"{summary.tokens_per_s_per_device:.1f}",
        "loss": "/" if summary.loss is None else f"{summary.loss:.2f}",
        "mem": mem,
        "MFU": "/" if summary.mfu is None else f"{summary.mfu * 100:.1f}%",
    }


def _table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row.values()) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _summary_html(run: Run, summary: Summary) -> str:
    notes = [
        "config: the hardware profile and nodes x ranks per node (or the command profiled); fix_hp: the settings "
        "fixed for this run on top of the case's defaults (the benchmark table's column for its fixed "
        "hyper-parameters); token/p/s: tokens per second per device, first step left out; loss: the last step's, "
        "over ranks; mem: device peak/total GiB; MFU: model FLOPs utilisation (formula below)"
    ]
    if summary.device_source:
        notes.append(f"mem: peak/total GiB from {summary.device_source}")
    notes.append(
        summary.mfu_formula
        + (f"; peak {summary.peak_flops:.3g} FLOP/s" if summary.peak_flops else "; no peak FLOP/s in the hardware profile, so no MFU")
    )
    host_rows = [
        {"rank": rank, "host RSS peak": format_bytes(peak)}
        for rank, peak in summary.host_peak_bytes_per_rank.items()
    ]
    node_rows = [
        {"node": host, "host RSS peak (sum of ranks at one moment)": format_bytes(peak)}
        for host, peak in summary.host_peak_bytes_per_node.items()
    ]
    problems = "".join(f"<li>{html.escape(p)}</li>" for p in summary.problems)
    warnings = "".join(f"<li>{html.escape(w)}</li>" for w in summary.warnings)
    return (
        "<h2>Summary</h2>"
        + _table([benchmark_row(run, summary)])
        + "".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes)
        + "<h3>Host RAM peaks</h3>"
        + _table(node_rows)
        + _table(host_rows)
        + (f"<h3>What is missing</h3><ul class='problems'>{problems}</ul>" if problems else "")
        + (f"<h3>Probe and hook warnings</h3><ul class='problems'>{warnings}</ul>" if warnings else "")
    )


def _status_html(run: Run) -> str:
    status = run.spec.get("status")
    if not status or status == "completed":
        return ""
    text = {
        "stopped_by_guard": "memdiag's guard stopped the run before the host ran out of memory; see the oom_guard finding",
        "failed": "the run failed; what was recorded up to then is shown",
        "interrupted": "the run was interrupted; what was recorded up to then is shown",
        "running": "run.json still says running: the run is live, or its memdiag was killed moments ago; what was recorded is shown",
        "abandoned": run.spec.get("abandoned_note", "memdiag did not finish this run") + "; what was recorded is shown",
    }.get(status, status)
    if run.spec.get("signal"):
        text += f" (stopped by {run.spec['signal']})"
    if status == "failed":
        from memdiag.checks import run_error
        from memdiag.failure import describe

        error = run_error(run)
        if error:
            text += f": {describe(error)}"
    return f"<p class='status'>Status: <b>{html.escape(status)}</b>: {html.escape(text)}</p>"


ERROR_CAPTURE = """<script>
window.addEventListener('error', function (e) {
  var box = document.getElementById('memdiag-errors');
  if (box) { box.dataset.errors += (e.message || 'error') + ';'; }
});
</script>"""

RENDER_CHECK = """<script>
// Phase and finding labels sit at the top of the timelines; short phases put them on top of
// each other. Once a plot has drawn, measure every label's box and move a label that overlaps
// an earlier one down a line, until none overlap. Then record, for the browser test, how many
// traces each plot shows and how many label pairs still overlap.
function memdiagOverlap(a, b) {
  return a.left < b.right - 0.5 && b.left < a.right - 0.5 && a.top < b.bottom - 0.5 && b.top < a.bottom - 0.5;
}
function memdiagLabels(plot) {
  return Array.from(plot.querySelectorAll('g.annotation')).filter(function (g) {
    var r = g.getBoundingClientRect(); return r.width > 0 && r.height > 0;
  });
}
function memdiagOverlaps(plot) {
  var boxes = memdiagLabels(plot).map(function (g) { return g.getBoundingClientRect(); });
  var count = 0;
  for (var i = 0; i < boxes.length; i++) for (var j = 0; j < i; j++) if (memdiagOverlap(boxes[i], boxes[j])) count++;
  return count;
}
async function memdiagUnclutter(plot) {
  for (var pass = 0; pass < 40 && memdiagOverlaps(plot) > 0; pass++) {
    var groups = memdiagLabels(plot), boxes = groups.map(function (g) { return g.getBoundingClientRect(); });
    var update = {};
    for (var i = 0; i < groups.length; i++) {
      for (var j = 0; j < i; j++) {
        if (memdiagOverlap(boxes[i], boxes[j])) {
          var index = +groups[i].getAttribute('data-index');
          var shift = (plot.layout.annotations[index].yshift || 0) - (boxes[i].height + 2);
          update['annotations[' + index + '].yshift'] = shift;
          break;
        }
      }
      if (Object.keys(update).length) break;  // one move a pass: the boxes change with it
    }
    await Plotly.relayout(plot, update);
  }
}
window.addEventListener('load', function () {
  setTimeout(async function () {
    for (var section of document.querySelectorAll('section.figure')) {
      var plot = section.querySelector('.js-plotly-plot');
      if (plot && plot.layout) { try { await memdiagUnclutter(plot); } catch (e) {} }
      var mark = document.createElement('div');
      mark.className = 'rendered';
      mark.setAttribute('data-rendered-figure', section.dataset.figure);
      mark.setAttribute('data-rendered-traces', plot && plot._fullData ? plot._fullData.length : -1);
      mark.setAttribute('data-label-count', plot ? memdiagLabels(plot).length : 0);
      mark.setAttribute('data-label-overlaps', plot ? memdiagOverlaps(plot) : 0);
      section.appendChild(mark);
    }
  }, 300);
});
</script>"""

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em}
th{background:#f4f4f4}.note{color:#555;font-size:.9em;margin:.2em 0}.problems{color:#a40}
.finding{margin:.4em 0}.finding.error b{color:#b00}.finding.warning b{color:#b60}
.fix{background:#f6f6f6;padding:.4em;font-size:.85em;white-space:pre-wrap}.status{background:#fee;padding:.5em}
"""


PLAN_GAP = 0.10
"""A planned term further than this from the measurement is marked as a gap in the report."""


def _plan_html(run: Run) -> str:
    """The planner's terms for this run's own settings beside what the run measured."""
    if not (run.spec.get("config") or {}).get("model"):
        return ""
    try:
        from memdiag.plan.calibrate import observe, predict
        from memdiag.plan.terms import Coefficients

        observation = observe(run)
        predicted = predict(observation, Coefficients())
    except Exception as exc:  # a partial run: say why the panel is missing, render the rest
        return f"<h2>Plan versus measured</h2><p class='note'>not available for this run: {html.escape(str(exc))}</p>"
    rows, gaps = [], []
    for term, measured in observation.measured.items():
        difference = (predicted[term] - measured) / measured if measured else None
        if difference is not None and abs(difference) > PLAN_GAP:
            gaps.append(f"{term} is {difference:+.0%} off")
        rows.append({
            "term": term,
            "planned": format_bytes(predicted[term]),
            "measured": format_bytes(measured),
            "difference": "n/a" if difference is None else f"{difference:+.1%}" + (" (gap)" if abs(difference) > PLAN_GAP else ""),
        })
    gap_note = (
        f"<p class='status'>The plan misses this run by more than {PLAN_GAP:.0%}: {html.escape('; '.join(gaps))}. "
        "<code>memdiag plan --calibrate RUN ...</code> fits the host coefficients to recorded runs like this one.</p>"
        if gaps else ""
    )
    return (
        "<h2>Plan versus measured</h2>"
        + gap_note
        + _table(rows)
        + "<p class='note'>planned: <code>memdiag plan</code>'s terms for this run's model, ranks and settings "
        "(default coefficients; <code>memdiag plan --calibrate</code> fits the empirical ones); measured: categorised "
        "memory of rank 0 (states after a step, saved activations after a forward), the allocator's peak (CUDA runs), "
        "RSS before the model build, "
        "the node's load-phase and whole-run host peaks</p>"
    )


def _findings_html(findings: list[dict]) -> str:
    if not findings:
        return "<h2>Findings</h2><p>No findings (run <code>memdiag check</code> to produce them).</p>"
    items = []
    for index, finding in enumerate(findings):
        fix = f"<pre class='fix'>{html.escape(finding['fix'])}</pre>" if finding.get("fix") else ""
        moments = ", ".join(m.get("label", "") for m in finding.get("moments", []))
        where = f"<div class='note'>marked on the timeline: {html.escape(moments)}</div>" if moments else ""
        items.append(
            f"<li class='finding {finding['severity']}' id='finding-{index}'><b>[{finding['severity']}] "
            f"{html.escape(finding['id'])}</b>: {html.escape(finding['message'])}{where}{fix}</li>"
        )
    return "<h2>Findings</h2><ul class='findings'>" + "".join(items) + "</ul>"


def _stacks_html(run: Run) -> str:
    """Which lines held the host memory at each captured phase's peak (memray, ``stacks=``)."""
    from memdiag.stacks import STACKS_DIR, lowest_rank_tables, phase_label, stack_rows

    parts = []
    for table in lowest_rank_tables(run.path):
        parts.append(
            f"<h3>{html.escape(phase_label(table))} phase: live at its host peak "
            f"({format_bytes(table.get('peak_bytes'))}, rank {table.get('rank')})</h3>" + _table(stack_rows(table))
            + f"<p class='note'>memray's capture: {html.escape(STACKS_DIR + '/' + str(table.get('capture')))} "
            "(<code>memray flamegraph</code>, <code>memray summary</code>); the other ranks' beside it</p>"
        )
    from memdiag.device_stacks import read_device_tables

    for table in read_device_tables(run.path)[:1]:
        parts.append(
            f"<h3>first {table.get('steps', '?')} training step(s): live at the device peak "
            f"({format_bytes(table.get('peak_bytes'))}, rank {table.get('rank')})</h3>" + _table(stack_rows(table))
            + f"<p class='note'>PyTorch's snapshot: {html.escape(STACKS_DIR + '/' + str(table.get('snapshot')))} "
            "(opens in https://pytorch.org/memory_viz); the other ranks' beside it</p>"
        )
    off = next((t.header["device_stacks"] for t in run.ranks.values() if t.header.get("device_stacks")), None)
    if off and parts:
        parts.append(f"<p class='note'>Device stacks: {html.escape(off)}.</p>")
    return "<h2>Allocation stacks</h2>" + "".join(parts) if parts else ""


PLOTLY_JS = "plotly.min.js"


def write_node_pages(run: Run, out_dir: Path, main_page: str = "report.html") -> list[Path]:
    """Past ``MAX_RANK_LINES`` ranks, where the main page draws node bands and standouts: one page
    per node with every one of its ranks (host and device), sharing one copy of plotly.js beside
    them so that they stay small and work offline."""
    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    from memdiag.report.figures import MAX_RANK_LINES, device_figure, host_figure, node_figures
    from memdiag.summary import ranks_by_host, summarize

    if len(run.ranks) <= MAX_RANK_LINES:
        return []
    write_atomic(out_dir / PLOTLY_JS, get_plotlyjs())
    pages = []
    for host, ranks in ranks_by_host(run).items():
        part = Run(path=run.path, spec=run.spec, ranks={t.rank: t for t in ranks},
                       nodes={host: run.nodes[host]} if host in run.nodes else {})
        part_summary = summarize(part)
        title = f"memdiag: node {host} of {run.path.name}, every rank ({len(ranks)})"
        body = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
                f"<style>{STYLE}</style><script src='{PLOTLY_JS}'></script></head><body>",
                f"<h1>{html.escape(title)}</h1><p><a href='{html.escape(main_page)}'>the run's report</a></p>"]
        stacked = list(node_figures(part, part_summary).values())
        for name, figure in (("host", host_figure(part, part_summary)), ("node", stacked[0] if stacked else None),
                             ("device", device_figure(part, part_summary))):
            if figure is None:
                continue
            if figure.data:
                body.append(f"<section class='figure' data-figure='{name}' data-expected-traces='{len(figure.data)}'>"
                            + pio.to_html(figure, full_html=False, include_plotlyjs=False, div_id=f"fig-{name}",
                                          config={"displaylogo": False}) + "</section>")
        body.append("</body></html>")
        page = out_dir / f"report-node-{safe_name(host)}.html"
        write_atomic(page, "".join(body))
        pages.append(page)
    return pages


def write_report(
    run: Run,
    summary: Summary,
    figures: dict[str, go.Figure],
    path: Path,
    findings: list[dict] | None = None,
    pictures: list[Path] | None = None,
    node_pages: list[Path] | None = None,
) -> Path:
    import plotly.io as pio

    config = run.spec.get("config", {})
    title = f"memdiag: {config.get('case', 'run')} {run.path.name}"
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{STYLE}</style>{ERROR_CAPTURE}</head><body>",
        "<div id='memdiag-errors' data-errors=''></div>",
        f"<h1>{html.escape(title)}</h1>",
        _status_html(run),
        _summary_html(run, summary),
        _findings_html(findings or []),
        _plan_html(run),
        _stacks_html(run),
    ]
    for index, (name, figure) in enumerate(figures.items()):
        parts.append(
            f"<section class='figure' data-figure='{html.escape(name)}' data-expected-traces='{len(figure.data)}'>"
            + pio.to_html(
                figure,
                full_html=False,
                include_plotlyjs=index == 0,
                div_id=f"fig-{name}",
                config={"displaylogo": False},
            )
            + "</section>"
        )
    if "device" not in figures:
        parts.append(
            "<p class='note' id='no-device-figure'>No device memory chart: this run recorded no device figure "
            "(no CUDA device in its ranks, and not DeepSpeed's CPU accelerator, whose RSS stands in for one).</p>"
        )
    parts.append(f"<p class='note'>Timelines: {html.escape(downsampling_note(run))}.</p>")
    if node_pages:
        links = ", ".join(f"<a href='{html.escape(p.name)}'>{html.escape(p.stem.removeprefix('report-node-'))}</a>"
                          for p in node_pages)
        parts.append(f"<p class='note' id='node-pages'>Every rank, node by node: {links}.</p>")
    if pictures:
        import os

        links = ", ".join(
            f"<a href='{html.escape(os.path.relpath(p, path.parent))}'>{html.escape(p.name)}</a>" for p in pictures
        )
        parts.append(f"<p class='note' id='pictures'>For an issue: report.md and the pictures {links}.</p>")
    parts.append(RENDER_CHECK)
    parts.append(
        "<script type='application/json' id='memdiag-summary'>"
        + html.escape(json.dumps(summary.to_dict()), quote=False)
        + "</script></body></html>"
    )
    write_atomic(path, "".join(parts))
    return path
