"""The report pipeline of one run, as a library function: ``memdiag report``, ``memdiag run``
and ``memdiag.record`` all call ``build``."""

from __future__ import annotations

import json
from pathlib import Path

from memdiag.checks import read_findings, run_checks, write_findings
from memdiag.checks.finding import Finding
from memdiag.files import write_atomic
from memdiag.report.figures import build_figures
from memdiag.report.html import write_node_pages, write_report
from memdiag.runstate import settle
from memdiag.summary import summarize
from memdiag.timeline import format as fmt
from memdiag.timeline import read_run
from memdiag.timeline.compact import compact_run
from memdiag.timeline.reader import READ_MAX_EVENTS, READ_MAX_SAMPLES

MARK = {"error": "ERROR", "warning": "WARN ", "info": "info "}


def format_finding(finding: Finding) -> str:
    """A finding as the console shows it: the mark, the message, the fix indented below."""
    lines = [f"[{MARK[finding.severity]}] {finding.id}: {finding.message}"]
    if finding.fix:
        lines += ["    fix: " + line if i == 0 else "         " + line for i, line in enumerate(finding.fix.splitlines())]
    return "\n".join(lines)


def build(run_dir: Path, *, with_checks: bool = False, html_out: Path | None = None, markdown: bool = False):
    """summary.json and report.html (and, with checks, findings.json first) for one run;
    ``html_out``: write the page there instead of into the run directory; ``markdown``: also
    report.md and PNGs of the key figures (``figures/``), which the page links."""
    say = _progress(run_dir)
    say("reading the timelines")
    run = read_run(run_dir, max_samples=READ_MAX_SAMPLES, max_events=READ_MAX_EVENTS)
    settle(run)
    for line in compact_run(run):  # an ended run's large rank files: samples to Parquet
        print(f"memdiag: {line}")
    say("summarising and checking")
    summary = summarize(run)
    write_atomic(run_dir / fmt.SUMMARY_JSON, json.dumps(summary.to_dict(), indent=2))
    findings = None
    if with_checks:
        findings = run_checks(run)
        write_findings(run_dir, findings)
    stored = read_findings(run_dir)
    say("drawing the figures")
    figures = build_figures(run, summary, stored)
    html_path = html_out or run_dir / fmt.REPORT_HTML
    pngs: list[Path] = []
    if markdown:
        from memdiag.report.markdown import FIGURES_DIR, export_pngs, write_markdown

        pngs, note = export_pngs(figures, html_path.parent / FIGURES_DIR)
        md = write_markdown(run, summary, stored, pngs, note, html_path.parent / "report.md")
        print(f"memdiag: wrote {md}" + (f" and {len(pngs)} PNG(s)" if pngs else f" ({note})"))
    node_pages = write_node_pages(run, html_path.parent, html_path.name)  # many ranks: every rank, a page per node
    path = write_report(run, summary, figures, html_path, stored, pictures=pngs, node_pages=node_pages)
    if with_checks:
        return summary, path, findings
    return summary, path


PROGRESS_BYTES = 64 * 2**20
"""Runs with more timeline data than this say what the report is doing (seconds, not instant)."""


def _progress(run_dir: Path):
    """A step printer for long reports; silent for small runs."""
    import sys
    import time

    try:
        size = sum(p.stat().st_size for p in (run_dir / fmt.TIMELINE_DIR).glob("*.jsonl"))
    except OSError:
        size = 0
    started = time.monotonic()

    def say(step: str) -> None:
        if size > PROGRESS_BYTES:
            print(f"memdiag: report {run_dir.name}: {step} ({size / 2**20:,.0f} MiB of timelines, {time.monotonic() - started:.1f} s)",
                  file=sys.stderr, flush=True)

    return say


