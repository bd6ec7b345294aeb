"""Runs across nodes: one memdiag per node, every node's timelines in one run directory.

The coordinator (``memdiag run layout=2x4 hostfile=FILE``) makes the run directory, then starts
``memdiag run ... node_rank=I run_dir=DIR`` once per node: over ssh, or on this machine with
``nodes_here=true`` (simulated nodes, as the tests do). Each node part starts its node watcher
and its node's ranks through torchrun (static rendezvous) or the ``deepspeed`` launcher
(``--no_ssh --node_rank``), and writes ``nodes/<node>.json`` with how its part ended. Ranks
and watchers name their node with ``MEMDIAG_NODE``, so simulated nodes stay apart. A node part
can also be started by the cluster's own tool (srun, pdsh) on every node with the same
``run_dir=``: node 0 creates the directory when nobody has.
"""

from __future__ import annotations

import json
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from memdiag import launch, lifetime
from memdiag.config import RunConfig
from memdiag.errors import UsageError
from memdiag.files import write_atomic
from memdiag.hostfile import Host, format_hostfile, nodes_for_layout, read_hostfile
from memdiag.registry import get_case
from memdiag.rundir import NODES_DIR, RunDir
from memdiag.timeline.reader import guard_event

HOSTFILE = "hostfile"
PART_KEYS = ("node_rank", "run_dir", "master_addr", "master_port", "nodes_here")
"""Overrides the coordinator sets itself for each node part."""
FAILED_PART_GRACE_S = 15.0
"""After one node part fails, how long the others get to fail on their own (collectives time out)."""
SPEC_WAIT_S = 120.0
PEERS_WAIT_S = 600.0
"""How long the finishing node waits for the other nodes' end records after its own."""
FINISHER = "node_rank 0"


def node_hosts(config: RunConfig) -> list[Host]:
    """The nodes of the run; one node is named after this machine."""
    if config.hostfile:
        return nodes_for_layout(read_hostfile(config.hostfile), config.nnodes, config.nproc_per_node, f"hostfile {config.hostfile}")
    if config.nnodes == 1:
        import platform

        return [Host(platform.node(), config.nproc_per_node)]
    return [Host(f"node{i}", config.nproc_per_node) for i in range(config.nnodes)]


def rendezvous(config: RunConfig, hosts: list[Host]) -> tuple[str, int]:
    addr = config.master_addr or ("127.0.0.1" if config.nodes_here else hosts[0].name)
    if config.master_port:
        return addr, config.master_port
    if config.nodes_here:
        with socket.socket() as s:  # a free port, so simulated runs side by side do not collide
            s.bind(("127.0.0.1", 0))
            return addr, s.getsockname()[1]
    return addr, 29500


def ranks_command(config: RunConfig, run_dir: Path, node_rank: int, addr: str, port: int) -> list[str]:
    """What starts one node's ranks."""
    entry = get_case(config.case).entry_module
    if config.launcher == "deepspeed":
        return [
            sys.executable, "-u", "-m", "deepspeed.launcher.runner", f"--hostfile={run_dir / HOSTFILE}",
            "--no_ssh", f"--node_rank={node_rank}", f"--master_addr={addr}", f"--master_port={port}",
            "--module", entry, str(run_dir),
        ]
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nnodes={config.nnodes}", f"--node_rank={node_rank}",
        f"--nproc_per_node={config.nproc_per_node}", "--rdzv_backend=static", f"--master_addr={addr}",
        f"--master_port={port}", "-m", entry, str(run_dir),
    ]


def prepare(rundir: RunDir, hosts: list[Host]) -> None:
    (rundir.path / NODES_DIR).mkdir(exist_ok=True)
    write_atomic(rundir.path / HOSTFILE, format_hostfile(hosts))


def _join(config: RunConfig, hosts: list[Host], start) -> RunDir:
    """The run directory a node part writes into; node 0 starts it when nobody has (the nodes
    were started by a scheduler, not by memdiag), and then also finishes the run."""
    rundir = RunDir.at(config.run_dir)
    if not rundir.started:
        if config.node_rank == 0:
            prepare(rundir, hosts)
            start(rundir, hosts, finished_by=FINISHER)
        deadline = time.monotonic() + SPEC_WAIT_S
        while not rundir.started:
            if time.monotonic() > deadline:
                raise UsageError(f"run_dir={rundir.path}: no run.json after {SPEC_WAIT_S:.0f} s; start node_rank=0 too, with the same run_dir")
            time.sleep(0.5)
    rundir.read()
    return rundir


def part_config(node: RunConfig | dict, spec: dict) -> RunConfig | None:
    """A node part runs the spec the run was started with, with its node's own keys (``node``:
    a composed config, or the parsed settings), not a second composition of the overrides."""
    if not spec.get("config"):
        return node if isinstance(node, RunConfig) else None
    get = (lambda key: getattr(node, key)) if isinstance(node, RunConfig) else (lambda key: node.get(key))
    return replace(RunConfig.from_dict(spec["config"]), **{key: get(key) for key in PART_KEYS if key != "nodes_here"},
                   nodes_here=bool(get("nodes_here")))


def started_part(tokens_values: dict) -> RunConfig | None:
    """The config of a node part the coordinator started (``node_rank=`` and ``run_dir=``
    given, run.json already there): read, not composed again. None: compose it."""
    run_json = Path(tokens_values["run_dir"]) / "run.json" if tokens_values.get("run_dir") else None
    if tokens_values.get("node_rank") is None or run_json is None or not run_json.is_file():
        return None
    try:
        spec = json.loads(run_json.read_text())
    except (OSError, ValueError):
        return None
    return part_config(tokens_values, spec)


def run_node_part(config: RunConfig, start) -> tuple[int, RunDir | None]:
    """This node's part: watcher, ranks, and ``nodes/<node>.json``. ``start(rundir, hosts,
    **fields)`` writes the start record when this node must. Returns its exit code and, for
    the node that finishes a scheduler-started run, the run directory to finish."""
    hosts = node_hosts(config)
    me = hosts[config.node_rank]
    rundir = _join(config, hosts, start)
    config = part_config(config, rundir.spec)
    addr, port = rendezvous(config, hosts)
    started = time.monotonic()
    command = ranks_command(config, rundir.path, config.node_rank, addr, port)
    ended = launch.run_node(config, rundir.path, command, rundir.spec.get("host_limit_bytes"), node=me.name)
    rundir.node_ended(me.name, {
        "node": me.name, "node_rank": config.node_rank, "exit_code": ended.code, "status": ended.status,
        "signal": ended.signal, "launcher": config.launcher, "duration_s": round(time.monotonic() - started, 3),
    })
    if rundir.spec.get("finished_by") != FINISHER or config.node_rank != 0:
        return ended.code, None
    deadline = time.monotonic() + PEERS_WAIT_S
    while not all(rundir.node_record(h.name) for h in hosts) and time.monotonic() < deadline:
        time.sleep(1.0)
    rundir.read()
    return record_end(rundir, hosts, started, ended.signal, {me.name: ended.code}), rundir


def _part_overrides(overrides: list[str]) -> list[str]:
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in PART_KEYS]


def run_nodes(config: RunConfig, rundir: RunDir, hosts: list[Host]) -> int:
    """Start every node's part, wait for all, collect their files, record the end in run.json.
    A stop signal goes to the node parts, which stop their own nodes within ``stop_grace_s``;
    whatever is left after that and a margin is killed."""
    run_dir = rundir.path
    prepare(rundir, hosts)
    addr, port = rendezvous(config, hosts)
    started = time.monotonic()
    with lifetime.Job(config.stop_grace_s + FAILED_PART_GRACE_S, signal_tree=False) as job:
        for rank, host in enumerate(hosts):
            command = [
                sys.executable, "-m", "memdiag", "run", *_part_overrides(config.overrides), f"node_rank={rank}",
                f"run_dir={run_dir.resolve()}", f"master_addr={addr}", f"master_port={port}",
            ]
            if not config.nodes_here:
                command = ["ssh", host.name, f"cd {shlex.quote(str(launch.REPO_ROOT))} && {shlex.join(command)}"]
            job.start(host.name, command, cwd=launch.REPO_ROOT)
        ended = job.wait(tick=_FailedPartWatch(job))
    if not config.nodes_here:
        _collect(run_dir, hosts)
    return record_end(rundir, hosts, started, ended.signal, ended.codes)


class _FailedPartWatch:
    """One node part failing stops the rest after a grace period (their collectives would
    otherwise wait for the dead node until a long timeout)."""

    def __init__(self, job: lifetime.Job) -> None:
        self.job = job
        self.failed_at: float | None = None

    def __call__(self) -> None:
        failed = [name for name, p in self.job.mains.items() if p.poll() not in (None, 0)]
        if not failed:
            return
        if self.failed_at is None:
            self.failed_at = time.monotonic()
        elif time.monotonic() - self.failed_at > FAILED_PART_GRACE_S:
            self.job.request_stop(f"node part {failed[0]} failed; stopping the other nodes")


def record_end(rundir: RunDir, hosts: list[Host], started: float, stop_signal: str | None, fallback_codes: dict[str, int]) -> int:
    """The run's status from every node part's end record, written to run.json."""
    records = {h.name: rundir.node_record(h.name) for h in hosts}
    codes = [r.get("exit_code", fallback_codes.get(name, 1)) for name, r in records.items()]
    code = next((c for c in codes if c), 0)
    signal_name = stop_signal or next((r.get("signal") for r in records.values() if r.get("signal")), None)
    if signal_name or any(r.get("status") == "interrupted" for r in records.values()):
        status = "interrupted"
    elif guard_event(rundir.path) is not None:
        status = "stopped_by_guard"
    else:
        status = "completed" if code == 0 and all(records.values()) else "failed"
    missing = [name for name, r in records.items() if not r]
    if missing:
        rundir.spec.setdefault("warnings", []).append(f"no end record from node(s) {', '.join(missing)}: their part did not finish")
        code = code or 1
    if stop_signal:
        code = 128 + signal.Signals[stop_signal].value
    rundir.end(status=status, exit_code=code, duration_s=time.monotonic() - started, nodes=records, signal=signal_name)
    return code


def _collect(run_dir: Path, hosts: list[Host]) -> None:
    """Pull a remote node's files when the run directory is not on a shared filesystem."""
    for host in hosts:
        if (run_dir / NODES_DIR / f"{host.name}.json").exists():
            continue  # shared filesystem: already here
        result = subprocess.run(
            ["rsync", "-a", f"{host.name}:{run_dir.resolve()}/", f"{run_dir.resolve()}/"],
            capture_output=True, text=True, check=False,
        )
        if result.returncode != 0:
            print(f"memdiag: warning: could not collect {host.name}'s files: {result.stderr.strip()[:200]}", flush=True)
