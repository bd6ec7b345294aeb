"""``memdiag check RUN_DIR [RUN_DIR ...]``: findings with evidence and fixes; exit 1 on an error."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from memdiag.checks import MULTI_RUN_CHECKS, run_checks, with_host_limit, write_findings
from memdiag.checks.finding import Finding
from memdiag.report.build import format_finding
from memdiag.runstate import settle
from memdiag.timeline import read_run
from memdiag.timeline.reader import READ_MAX_EVENTS, READ_MAX_SAMPLES
from memdiag.units import parse_size

def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check", help="read recorded runs and say what is wrong, with evidence and the fix"
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    parser.add_argument(
        "--host-ram", metavar="SIZE", help="judge against this host RAM per node instead of the run's (e.g. 500G)"
    )


def cannot_judge(run) -> str | None:
    """What a run lacks for any judgement: a readable run.json (its settings and host limit),
    rank timelines, or samples in them."""
    if run.spec_problem:
        return f"{run.spec_problem} (the run's settings and host limit are unknown)"
    if not run.ranks:
        return "no rank timeline with data"
    if not any(len(t.t_ns) for t in run.ranks.values()):
        return "no samples in any rank timeline"
    return None


def main(args: argparse.Namespace) -> int:
    """Exit 0: judged, no error; 1: an error finding; 2: a run could not be judged."""
    runs = [read_run(path, max_samples=READ_MAX_SAMPLES, max_events=READ_MAX_EVENTS) for path in args.run_dirs]
    for run in runs:  # how the run ended, made truthful before any what-if
        settle(run)
    what_if = bool(args.host_ram)
    if what_if:
        limit = parse_size(args.host_ram, name="--host-ram")
        runs = [with_host_limit(run, limit, f"--host-ram {args.host_ram}") for run in runs]
    everything: list[dict] = []
    failed = unjudged = False
    for run in runs:
        findings = run_checks(run)
        missing = cannot_judge(run)
        if missing:
            unjudged = True
            findings.insert(0, Finding(id="cannot_judge", severity="warning", message=f"{missing}: the checks could not judge this run"))
        if not what_if:  # a what-if never changes what the run recorded
            write_findings(run.path, findings)
        failed |= any(f.severity == "error" for f in findings)
        everything += [{"run": str(run.path)} | f.to_dict() for f in findings]
        if not args.json:
            print(f"{run.path}:" + (f" (what if the host limit were {args.host_ram}; findings.json unchanged)" if what_if else ""))
            print("\n".join(format_finding(f) for f in findings) if findings else "  no findings")
    if len(runs) > 1:
        for check in MULTI_RUN_CHECKS.values():
            for finding in check(runs):
                failed |= finding.severity == "error"
                everything.append({"run": "all"} | finding.to_dict())
                if not args.json:
                    print("across runs:\n" + format_finding(finding))
    if args.json:
        print(json.dumps(everything, indent=2))
    if failed:
        return 1
    return 2 if unjudged else 0
