"""``memdiag report RUN_DIR``: (re)build summary.json and report.html from the timelines."""

from __future__ import annotations

import argparse
from pathlib import Path

from memdiag.report.build import build
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
