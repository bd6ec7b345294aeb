"""``memdiag report RUN_DIR``: (re)build summary.json and report.html from the timelines."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from memdiag.checks import read_findings, run_checks, write_findings
from memdiag.files import write_atomic
from memdiag.report import build_figures, write_report
from memdiag.runstate import settle
from memdiag.summary import summarize
from memdiag.timeline import format as fmt
from memdiag.timeline import read_run


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report", help="rebuild a run's report.html and summary.json; several runs: also a comparison page"
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--markdown", action="store_true", help="also write report.md and PNGs of the key figures, "
                        "to paste into a GitHub issue")
    parser.add_argument("--out", type=Path, help="one run: where its report goes (default RUN_DIR/report.html); "
                        "several: the comparison page (default: reports/compare-<time>.html)")


def build(run_dir: Path, *, with_checks: bool = False, html_out: Path | None = None, markdown: bool = False):
    """summary.json and report.html (and, with checks, findings.json first) for one run;
    ``html_out``: write the page there instead of into the run directory; ``markdown``: also
    report.md and PNGs of the key figures (``figures/``), which the page links."""
    say = _progress(run_dir)
    say("reading the timelines")
    run = read_run(run_dir)
    settle(run)
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
    path = write_report(run, summary, figures, html_path, stored, pictures=pngs)
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


def main(args: argparse.Namespace) -> int:
    from memdiag import preflight

    if args.out:
        preflight.writable_file(args.out, "--out")
    single = len(args.run_dirs) == 1
    for run_dir in args.run_dirs:
        if single and args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
        _, path = build(run_dir, html_out=args.out if single else None, markdown=args.markdown)
        print(f"memdiag: wrote {path}")
    if len(args.run_dirs) > 1:
        import datetime as dt

        from memdiag.report.compare import write_comparison

        out = args.out or Path("reports") / f"compare-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}.html"
        out.parent.mkdir(parents=True, exist_ok=True)
        write_comparison([read_run(d) for d in args.run_dirs], out)
        print(f"memdiag: wrote {out}")
    return 0
