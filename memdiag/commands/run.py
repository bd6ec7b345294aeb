"""``memdiag run case=NAME [key=value ...]``: run a case instrumented, then summarise and draw."""

from __future__ import annotations

import argparse
import json

from memdiag import launch, lifetime
from memdiag.commands import report
from memdiag.commands.check import format_finding
from memdiag.config import compose
from memdiag.errors import UsageError
from memdiag.files import WriteFailed
from memdiag.units import format_bytes


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run a case with memory instrumentation and write a report",
        description="Overrides use Hydra's key=value form: case=baichuan2_13b model.scale=tiny "
        "steps=20 nproc_per_node=2 seq_len=256 load=reference reports_dir=PATH",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.set_defaults(command=[])


def consult_plan(config) -> None:
    """Refuse a layout the plan predicts will not fit, naming why and the nearest that fits."""
    from memdiag.plan.search import check_run_layout
    from memdiag.probes.host import read_meminfo

    limit, _ = launch.host_limit(config)
    capacity = config.hardware.device_memory_bytes or read_meminfo().total_bytes
    chosen, nearest = check_run_layout(config, limit, capacity)
    if chosen.fits:
        return
    if config.force:
        print(f"memdiag: the plan predicts {config.layout} does not fit ({chosen.verdict}); force=true: running it anyway")
        return
    hint = f"nearest layout that fits: {nearest.name}" if nearest else "no layout up to 8 nodes fits"
    raise UsageError(
        f"layout {config.layout} is predicted not to fit ({chosen.verdict}); {hint}; "
        "see `memdiag plan` for the terms, or add force=true to run it anyway"
    )


def main(args: argparse.Namespace) -> int:
    # from here to the report, a stop signal stops the job and is recorded; it never kills memdiag
    from memdiag.versions import check_supported

    check_supported()
    with lifetime.handling_stops():
        if args.command:
            from memdiag.commands import profile

            return profile.main(args.overrides, args.command)
        return _run_case(args)


def _run_case(args: argparse.Namespace) -> int:
    from memdiag import preflight

    config = compose(args.overrides)
    preflight.check_run(config)
    if config.node_rank is not None:  # one node's part of a multi-node run
        from memdiag import multinode

        code, finished = multinode.run_node_part(config)
        return code if finished is None else finish(config, *finished, code)
    if config.selection_note:
        print(f"memdiag: {config.selection_note}", flush=True)
    if config.nnodes > 1:
        from memdiag import multinode

        hosts = multinode.node_hosts(config)  # a bad hostfile stops here, before any directory exists
        if not config.nodes_here:
            preflight.remote_nodes([h.name for h in hosts])
    consult_plan(config)
    run_dir = launch.make_run_dir(config)
    spec = launch.initial_spec(config, run_dir)
    print(
        f"memdiag: {config.case} model.scale={config.model.get('scale')} "
        f"({spec['num_parameters'] / 1e6:,.1f}M parameters), layout {config.layout}, "
        f"load={config.load}, {config.steps} steps of seq_len {config.seq_len}; "
        f"host limit {format_bytes(spec['host_limit_bytes'])} ({spec['host_limit_source']})",
        flush=True,
    )
    print(f"memdiag: run directory {run_dir}", flush=True)
    if config.nnodes > 1:
        from memdiag import multinode

        code = multinode.run_nodes(config, run_dir, spec)
    else:
        code = launch.run_local(config, run_dir, spec)
    return finish(config, run_dir, spec, code)


def finish(config, run_dir, spec: dict, code: int) -> int:
    """Summary, checks and report for a run that has ended; what the user sees last."""
    built = build_report(run_dir, spec)
    if built is None:
        return code or 1
    summary, html_path, findings = built
    for finding in findings:
        if finding.severity != "info":
            print(format_finding(finding))
    if spec.get("status") == "interrupted":
        print(f"memdiag: the run was stopped ({spec.get('signal', 'a stop signal')}); report of what was recorded: {html_path}")
        return code
    guard = launch.guard_event(run_dir)
    if guard is not None:
        print(f"memdiag: the guard stopped the run: {guard['reason']}; stacks in {run_dir / 'stacks'}")
        print(f"memdiag: report {html_path}")
        return 1
    if code != 0:
        print(f"memdiag: the run failed ({config.launcher} exit code {code}); partial report: {html_path}")
        excerpt = launch.failure_excerpt(run_dir)
        if excerpt:
            print(excerpt)
        return code
    rate = summary.tokens_per_s_per_device
    loss = "n/a" if summary.loss is None else f"{summary.loss:.4f}"
    print(
        f"memdiag: done. loss {loss}, "
        f"{'n/a' if rate is None else f'{rate:,.1f}'} token/p/s, host peak per node "
        + ", ".join(f"{h} {format_bytes(b)}" for h, b in summary.host_peak_bytes_per_node.items())
    )
    print(f"memdiag: report {html_path}")
    return 1 if any(f.severity == "error" for f in findings) else 0


def build_report(run_dir, spec: dict):
    """Summary, findings and report of an ended run; None (said in one line) when the disk
    cannot take them. run.json gains the readers' warnings."""
    try:
        summary, html_path, findings = report.build(run_dir, with_checks=True)
        settled = json.loads((run_dir / "run.json").read_text())
        if settled.get("incomplete"):  # a full disk cost samples (runstate.settle said so)
            spec["incomplete"] = settled["incomplete"]
            print(f"memdiag: warning: {spec['incomplete']}")
        if summary.warnings:
            spec["warnings"] = spec.get("warnings", []) + summary.warnings
            launch.write_run_json(run_dir, spec)
            for warning in summary.warnings:
                print(f"memdiag: warning: {warning}")
    except WriteFailed as exc:
        print(f"memdiag: error: {exc}", flush=True)
        return None
    return summary, html_path, findings
