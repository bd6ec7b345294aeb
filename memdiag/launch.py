"""Start runs: the run directory, run.json, and one node's ranks with its node watcher.

A single-node run is the one-node case of a node part (``run_node``): the launcher (torchrun,
the deepspeed launcher, or the user's command) and the node watcher are started and ended by
``lifetime.Job``, which owns every process of the run. Files the launch causes outside the run
directory (torchelastic's TMPDIR files) are kept inside it and removed afterwards.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from memdiag import lifetime
from memdiag.config import RunConfig
from memdiag.files import free_bytes, write_atomic
from memdiag.instrument import NODE_ENV
from memdiag.probes import cgroup
from memdiag.probes.host import read_meminfo
from memdiag.timeline import format as fmt

REPO_ROOT = Path(__file__).resolve().parent.parent


def make_run_dir(config: RunConfig) -> Path:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    run_dir = Path(config.reports_dir) / config.case / f"{stamp}-{config.layout}"
    (run_dir / fmt.TIMELINE_DIR).mkdir(parents=True, exist_ok=False)
    (run_dir / "logs").mkdir()
    return run_dir


def host_limit(config: RunConfig) -> tuple[int, str]:
    """The host RAM a node may use, and where that figure came from."""
    if config.host_ram_bytes is not None:
        return config.host_ram_bytes, "host_ram override"
    if config.hardware.host_ram_bytes is not None:
        return config.hardware.host_ram_bytes, f"hardware profile {config.hardware.name}"
    total = read_meminfo().total_bytes
    files = cgroup.locate()
    limit = cgroup.read(files).limit_bytes if files else None
    if limit is not None and limit < total:
        return limit, f"memory cgroup v{files.version} limit"
    return total, "MemTotal of this machine"


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "deepspeed", "transformers"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_run_json(run_dir: Path, data: dict) -> None:
    write_atomic(run_dir / fmt.RUN_JSON, json.dumps(data, indent=2, default=str))


def initial_spec(config: RunConfig, run_dir: Path) -> dict:
    case = importlib.import_module(f"cases.{config.case}")
    limit, limit_source = host_limit(config)
    return {
        "case": config.case,
        "layout": config.layout,
        "world_size": config.world_size,
        "hosts": [platform.node()],
        "config": config.to_dict(),
        "num_parameters": case.num_parameters(config.model),
        "host_limit_bytes": limit,
        "host_limit_source": limit_source,
        "versions": _versions(),
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "status": "running",
        "run_dir": str(run_dir),
        "owner": owner(),
    }


def owner() -> dict:
    """Who is running the run: ``report``/``check`` tell a live run from an abandoned one."""
    return {"host": platform.node(), "pid": os.getpid(), "start_ticks": lifetime.procs.start_ticks(os.getpid())}


def rank_env(config: RunConfig, run_dir: Path, tmp_name: str = "tmp") -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["TMPDIR"] = str(run_dir / tmp_name)
    (run_dir / tmp_name).mkdir(exist_ok=True)
    paths = [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if config.hardware.accelerator == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // config.nproc_per_node)))
    return env


def torchrun_command(config: RunConfig, run_dir: Path) -> list[str]:
    case = importlib.import_module(f"cases.{config.case}")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        f"--nproc_per_node={config.nproc_per_node}",
        "-m",
        case.ENTRY_MODULE,
        str(run_dir),
    ]


def run_local(config: RunConfig, run_dir: Path, spec: dict) -> int:
    """Run the ranks on this node; returns the run's exit code and records the end in run.json."""
    write_run_json(run_dir, spec)
    started = time.monotonic()
    ended = run_node(config, run_dir, torchrun_command(config, run_dir), spec["host_limit_bytes"])
    return record_end(run_dir, spec, ended, started)


class DiskWatch:
    """Says on the console when the run directory's filesystem fills up and when it has room
    again (the ranks' writers hold their samples in memory meanwhile; their own messages go
    to their logs, on that same full disk)."""

    FULL_BELOW_BYTES = 256 * 2**10
    ROOM_ABOVE_BYTES = 4 * 2**20
    INTERVAL_S = 1.0

    def __init__(self, run_dir: Path, say=None) -> None:
        self.run_dir = run_dir
        self.say = say or (lambda text: print(f"memdiag: {text}", flush=True))
        self.full_since: float | None = None
        self.episodes: list[tuple[str, str | None]] = []
        self._next = 0.0

    def __call__(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.INTERVAL_S
        free = free_bytes(self.run_dir)
        if free is None:
            return
        stamp = dt.datetime.now(dt.timezone.utc).isoformat()
        if self.full_since is None and free < self.FULL_BELOW_BYTES:
            self.full_since = now
            self.episodes.append((stamp, None))
            self.say(
                f"warning: the filesystem of {self.run_dir} is full ({free / 2**10:.0f} KiB free): training goes on; "
                "each rank keeps its newest samples in memory (up to 64 MiB) until there is room"
            )
        elif self.full_since is not None and free > self.ROOM_ABOVE_BYTES:
            self.full_since = None
            self.episodes[-1] = (self.episodes[-1][0], stamp)
            self.say(f"the filesystem of {self.run_dir} has room again ({free / 2**20:.0f} MiB free): writing the held samples")


def watcher_command(config: RunConfig, run_dir: Path, root_pid: int, limit_bytes: int | None, node: str | None) -> list[str]:
    command = [sys.executable, "-m", "memdiag.node", str(run_dir), f"--root-pid={root_pid}", f"--owner-pid={os.getpid()}"]
    if node:
        command.append(f"--host={node}")
    if limit_bytes:
        command.append(f"--guard-limit-bytes={limit_bytes}")
    command += [
        f"--guard-fraction={config.guard_fraction}",
        f"--guard-min-available-bytes={config.guard_min_available_bytes}",
        f"--guard-grace-s={config.guard_grace_s}",
    ]
    return command


def run_node(
    config: RunConfig, run_dir: Path, command: list[str], limit_bytes: int | None, node: str | None = None
) -> lifetime.Ended:
    """One node's ranks through ``command`` with the node watcher over them, until nothing of
    them is left. ``node``: the node's name for ranks and watcher (``MEMDIAG_NODE``); its own
    log and TMPDIR."""
    suffix = f"-{node}" if node else ""
    env = rank_env(config, run_dir, tmp_name=f"tmp{suffix}")
    if node:
        env[NODE_ENV] = node
    disk = DiskWatch(run_dir)
    try:
        with open(run_dir / "logs" / f"launcher{suffix}.log", "w") as log, lifetime.Job(config.stop_grace_s) as job:
            process = job.start("ranks", command, env=env, cwd=REPO_ROOT, stderr=log)
            if config.instrument:
                job.start_helper(
                    watcher_command(config, run_dir, process.pid, limit_bytes, node), env=env, cwd=REPO_ROOT, stderr=log
                )
            ended = job.wait(tick=disk)
            job.stop_helpers()
    finally:
        shutil.rmtree(run_dir / f"tmp{suffix}", ignore_errors=True)
    ended.disk_full = disk.episodes
    return ended


def record_end(run_dir: Path, spec: dict, ended: lifetime.Ended, started: float) -> int:
    """How a single-node run ended, in run.json (the guard's stop overrides the exit status)."""
    status = ended.status
    if guard_event(run_dir) is not None and status != "interrupted":
        status = "stopped_by_guard"
    spec.update(
        status=status,
        exit_code=ended.code,
        ended_at=dt.datetime.now(dt.timezone.utc).isoformat(),
        duration_s=round(time.monotonic() - started, 3),
    )
    if ended.signal:
        spec["signal"] = ended.signal
    if ended.killed:
        spec["killed_after_grace"] = ended.killed
    if ended.disk_full:
        spec["disk_full"] = [{"from": a, "to": b} for a, b in ended.disk_full]
    write_run_json(run_dir, spec)
    return ended.code


def guard_event(run_dir: Path) -> dict | None:
    """The node watcher's guard event, if it stopped this run."""
    for path in (run_dir / fmt.TIMELINE_DIR).glob("node-*.jsonl"):
        for line in path.read_text(errors="replace").splitlines():
            if '"kind":"guard"' in line.replace(" ", ""):
                try:
                    return json.loads(line)
                except ValueError:
                    continue
    return None


def failure_excerpt(run_dir: Path, lines: int = 15) -> str:
    """The end of the first rank log that holds a traceback (or of the launcher's log)."""
    logs = sorted((run_dir / "logs").glob("rank-*.log")) + [run_dir / "logs" / "launcher.log"]
    logs += sorted((run_dir / "logs").glob("launcher-*.log")) + [run_dir / "logs" / "stderr.log"]
    for log_file in logs:
        try:
            text = log_file.read_text(errors="replace")
        except OSError:
            continue
        if "Traceback" in text or log_file.name.startswith("launcher") or log_file.name == "stderr.log":
            tail = [line for line in text.splitlines() if line.strip()][-lines:]
            return f"{log_file}:\n" + "\n".join(tail)
    return ""
