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

import datetime as dt
import importlib
import json
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from memdiag import launch, lifetime
from memdiag.config import RunConfig
from memdiag.files import write_atomic
from memdiag.errors import UsageError
from memdiag.hostfile import Host, format_hostfile, nodes_for_layout, read_hostfile

NODES_DIR = "nodes"
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
    if config.hostfile:
        return nodes_for_layout(read_hostfile(config.hostfile), config.nnodes, config.nproc_per_node, f"hostfile {config.hostfile}")
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
    entry = importlib.import_module(f"cases.{config.case}").ENTRY_MODULE
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


def _prepare(run_dir: Path, spec: dict, hosts: list[Host]) -> None:
    (run_dir / NODES_DIR).mkdir(exist_ok=True)
    write_atomic(run_dir / HOSTFILE, format_hostfile(hosts))
    launch.write_run_json(run_dir, spec)


def _join(config: RunConfig, hosts: list[Host]) -> Path:
    """The run directory a node part writes into; node 0 makes it when nobody has (the nodes
    were started by a scheduler, not by memdiag), and then also finishes the run."""
    run_dir = Path(config.run_dir).resolve()
    if not (run_dir / launch.fmt.RUN_JSON).exists():
        if config.node_rank == 0:
            for sub in (launch.fmt.TIMELINE_DIR, "logs"):
                (run_dir / sub).mkdir(parents=True, exist_ok=True)
            spec = launch.initial_spec(config, run_dir)
            spec.update(hosts=[h.name for h in hosts], launcher=config.launcher, finished_by=FINISHER)
            _prepare(run_dir, spec, hosts)
        deadline = time.monotonic() + SPEC_WAIT_S
        while not (run_dir / launch.fmt.RUN_JSON).exists():
            if time.monotonic() > deadline:
                raise UsageError(f"run_dir={run_dir}: no run.json after {SPEC_WAIT_S:.0f} s; start node_rank=0 too, with the same run_dir")
            time.sleep(0.5)
    return run_dir


def run_node_part(config: RunConfig) -> tuple[int, tuple[Path, dict] | None]:
    """This node's part: watcher, ranks, and ``nodes/<node>.json``. Returns its exit code and,
    for the node that finishes a scheduler-started run, the run directory and its record."""
    hosts = node_hosts(config)
    me = hosts[config.node_rank]
    run_dir = _join(config, hosts)
    spec = json.loads((run_dir / launch.fmt.RUN_JSON).read_text())
    addr, port = rendezvous(config, hosts)
    started = time.monotonic()
    command = ranks_command(config, run_dir, config.node_rank, addr, port)
    ended = launch.run_node(config, run_dir, command, spec.get("host_limit_bytes"), node=me.name)
    record = {
        "node": me.name, "node_rank": config.node_rank, "exit_code": ended.code, "status": ended.status,
        "signal": ended.signal, "launcher": config.launcher, "duration_s": round(time.monotonic() - started, 3),
        "ended_at": dt.datetime.now(dt.timezone.utc).isoformat(),
    }
    write_atomic(run_dir / NODES_DIR / f"{me.name}.json", json.dumps(record, indent=2))
    if spec.get("finished_by") != FINISHER or config.node_rank != 0:
        return ended.code, None
    deadline = time.monotonic() + PEERS_WAIT_S
    while not all((run_dir / NODES_DIR / f"{h.name}.json").exists() for h in hosts) and time.monotonic() < deadline:
        time.sleep(1.0)
    spec = json.loads((run_dir / launch.fmt.RUN_JSON).read_text())
    return record_end(run_dir, spec, hosts, started, ended.signal, {me.name: ended.code}), (run_dir, spec)


def _part_overrides(overrides: list[str]) -> list[str]:
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in PART_KEYS]


def run_nodes(config: RunConfig, run_dir: Path, spec: dict) -> int:
    """Start every node's part, wait for all, collect their files, record the end in run.json.
    A stop signal goes to the node parts, which stop their own nodes within ``stop_grace_s``;
    whatever is left after that and a margin is killed."""
    hosts = node_hosts(config)
    spec["hosts"] = [h.name for h in hosts]
    spec["launcher"] = config.launcher
    _prepare(run_dir, spec, hosts)
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
    return record_end(run_dir, spec, hosts, started, ended.signal, ended.codes)


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


def record_end(
    run_dir: Path, spec: dict, hosts: list[Host], started: float, stop_signal: str | None, fallback_codes: dict[str, int]
) -> int:
    """The run's status from every node part's end record, written to run.json."""
    records = {h.name: _node_record(run_dir, h.name) for h in hosts}
    codes = [r.get("exit_code", fallback_codes.get(name, 1)) for name, r in records.items()]
    code = next((c for c in codes if c), 0)
    signal_name = stop_signal or next((r.get("signal") for r in records.values() if r.get("signal")), None)
    if signal_name or any(r.get("status") == "interrupted" for r in records.values()):
        status = "interrupted"
    elif launch.guard_event(run_dir) is not None:
        status = "stopped_by_guard"
    else:
        status = "completed" if code == 0 and all(records.values()) else "failed"
    missing = [name for name, r in records.items() if not r]
    if missing:
        spec.setdefault("warnings", []).append(f"no end record from node(s) {', '.join(missing)}: their part did not finish")
        code = code or 1
    if stop_signal:
        code = 128 + signal.Signals[stop_signal].value
    spec.update(
        status=status, exit_code=code, nodes=records,
        ended_at=dt.datetime.now(dt.timezone.utc).isoformat(), duration_s=round(time.monotonic() - started, 3),
    )
    if signal_name:
        spec["signal"] = signal_name
    launch.write_run_json(run_dir, spec)
    return code


def _node_record(run_dir: Path, name: str) -> dict:
    try:
        return json.loads((run_dir / NODES_DIR / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {}


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
