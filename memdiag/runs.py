"""``memdiag run``: where a run goes is decided once, here. A case runs as one node part (this
machine), as node parts started over ssh or here (``multinode``), or as one node's part of a
run a scheduler started (``node_rank=``); a user's command (``-- CMD``) runs on this node. Each
makes its run directory through ``RunDir``, and each ends with ``finish``: the summary,
findings and report, and what the user sees last.
"""

from __future__ import annotations

import time

from memdiag import launch, lifetime, multinode
from memdiag.config import RunConfig
from memdiag.errors import UsageError
from memdiag.files import WriteFailed
from memdiag.registry import get_case
from memdiag.rundir import RunDir, resolve_host_limit
from memdiag.settings import RunSettings
from memdiag.timeline.reader import guard_event
from memdiag.units import format_bytes


def consult(config: RunConfig, host_limit_bytes: int):
    """The plan's verdict on the layout about to launch, and the nearest layout that fits."""
    from memdiag.plan.search import check_run_layout
    from memdiag.probes.host import read_meminfo

    capacity = config.hardware.device_memory_bytes or read_meminfo().total_bytes
    return check_run_layout(config, host_limit_bytes, capacity)


def consult_plan(config: RunConfig, host_limit_bytes: int) -> None:
    """Refuse a layout the plan predicts will not fit, naming why and the nearest that fits."""
    chosen, nearest = consult(config, host_limit_bytes)
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


def start_case(rundir: RunDir, config: RunConfig, hosts, **fields) -> dict:
    return rundir.start(
        host_limit=resolve_host_limit(config.host_ram_bytes, config.hardware),
        case=config.case, layout=config.layout, world_size=config.world_size, hosts=[h.name for h in hosts],
        launcher=config.launcher, config=config.to_dict(),
        num_parameters=get_case(config.case).num_parameters(config.model), **fields,
    )


def run_case(config: RunConfig) -> int:
    from memdiag import preflight

    config.check_launchable()
    preflight.check_run(config)
    if config.node_rank is not None:  # one node's part of a multi-node run
        code, rundir = multinode.run_node_part(config, lambda rd, hosts, **f: start_case(rd, config, hosts, **f))
        return code if rundir is None else finish(rundir, code, config.launcher)
    if config.selection_note:
        print(f"memdiag: {config.selection_note}", flush=True)
    hosts = multinode.node_hosts(config)  # a bad hostfile stops here, before any directory exists
    if config.nnodes > 1 and not config.nodes_here:
        preflight.remote_nodes([h.name for h in hosts])
    limit = resolve_host_limit(config.host_ram_bytes, config.hardware)
    consult_plan(config, limit[0])
    rundir = RunDir.at(config.run_dir) if config.run_dir else RunDir.create(config.reports_dir, config.case, config.layout)
    spec = start_case(rundir, config, hosts)
    print(
        f"memdiag: {config.case} model.scale={config.model.get('scale')} "
        f"({spec['num_parameters'] / 1e6:,.1f}M parameters), layout {config.layout}, "
        f"load={config.load}, {config.steps} steps of seq_len {config.seq_len}; "
        f"host limit {format_bytes(spec['host_limit_bytes'])} ({spec['host_limit_source']})",
        flush=True,
    )
    print(f"memdiag: run directory {rundir.path}", flush=True)
    if config.nnodes > 1:
        code = multinode.run_nodes(config, rundir, hosts)
    else:
        started = time.monotonic()
        command = launch.standalone_command(get_case(config.case).entry_module, config.nproc_per_node, rundir.path)
        ended = launch.run_node(config, rundir.path, command, spec["host_limit_bytes"])
        code = record_end(rundir, ended, started)
    return finish(rundir, code, config.launcher)


def run_command(settings: RunSettings, command: list[str]) -> int:
    """``memdiag run [key=value ...] -- CMD``: the user's command, profiled on this node."""
    import shutil
    from pathlib import Path

    from memdiag import preflight

    if shutil.which(command[0]) is None and not Path(command[0]).exists():
        raise UsageError(f"command {command[0]!r} not found on PATH")
    if settings.run_dir is None:
        preflight.writable_dir(settings.reports_dir, "reports_dir")
    rundir = RunDir.at(settings.run_dir) if settings.run_dir else RunDir.create(settings.reports_dir, settings.name or "custom", "cmd")
    limit = resolve_host_limit(settings.host_ram_bytes)
    import os

    rundir.start(host_limit=limit, case=None, command=command, layout="cmd", hosts=[os.uname().nodename],
                 sample_hz=settings.sample_hz, stacks=settings.stacks,
                 timeline_columnar=settings.timeline_columnar)
    print(f"memdiag: profiling {' '.join(command)}; run directory {rundir.path}", flush=True)
    started = time.monotonic()
    ended = launch.run_command(settings, rundir.path, command, limit[0])
    code = record_end(rundir, ended, started)
    from memdiag.timeline import read_run

    rundir.update(world_size=max((t.header.get("world_size", 1) for t in read_run(rundir.path).ranks.values()), default=None))
    return finish(rundir, code, "command")


def record_end(rundir: RunDir, ended: lifetime.Ended, started: float) -> int:
    """How a one-node run ended (the guard's stop overrides the exit status)."""
    status = ended.status
    if guard_event(rundir.path) is not None and status != "interrupted":
        status = "stopped_by_guard"
    rundir.end(
        status=status, exit_code=ended.code, duration_s=time.monotonic() - started, signal=ended.signal,
        killed_after_grace=ended.killed, disk_full=[{"from": a, "to": b} for a, b in ended.disk_full or []],
    )
    return ended.code


def finish(rundir: RunDir, code: int, launcher: str) -> int:
    """Summary, checks and report for a run that has ended; what the user sees last."""
    from memdiag.report.ending import ending

    built = build_report(rundir)
    if built is None:
        return code or 1
    summary, html_path, findings = built
    lines, code = ending(rundir.path, rundir.spec, summary, findings, code, html=html_path, guard=guard_event(rundir.path),
                         what="the command" if launcher == "command" else "the run", echoed_stderr=launcher == "command")
    print("\n".join(lines), flush=True)
    return code


def build_report(rundir: RunDir):
    """Summary, findings and report of an ended run; None (said in one line) when the disk
    cannot take them. run.json gains the readers' warnings."""
    from memdiag.report.build import build

    try:
        summary, html_path, findings = build(rundir.path, with_checks=True)
        settled = rundir.read()
        status = next((f for f in findings if f.id == "run_status"), None)
        if status is not None and status.evidence.get("error"):
            rundir.update(error=status.evidence["error"])  # what the failing rank raised, where
        if settled.get("incomplete"):  # a full disk cost samples (runstate.settle said so)
            print(f"memdiag: warning: {settled['incomplete']}")
        if summary.warnings:
            rundir.update(warnings=rundir.spec.get("warnings", []) + summary.warnings)
            for warning in summary.warnings:
                print(f"memdiag: warning: {warning}")
    except WriteFailed as exc:
        print(f"memdiag: error: {exc}", flush=True)
        if rundir.spec.get("incomplete"):
            print(f"memdiag: warning: {rundir.spec['incomplete']}", flush=True)
        return None
    return summary, html_path, findings
