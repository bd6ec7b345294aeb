"""Start runs: the run directory, run.json, and the ranks through torchrun.

torchrun (``torch.distributed.run``) starts the ranks as real processes; memdiag waits for it,
then records how it ended. Files the launch causes outside the run directory (torchelastic's
TMPDIR files) are kept inside it and removed afterwards.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from memdiag.config import RunConfig
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
    tmp = run_dir / (fmt.RUN_JSON + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(run_dir / fmt.RUN_JSON)


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
    }


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
    """Run the ranks on this node; returns torchrun's exit code and records the end in run.json."""
    write_run_json(run_dir, spec)
    started = time.monotonic()
    code, status = run_ranks(config, run_dir, torchrun_command(config, run_dir), spec["host_limit_bytes"])
    return record_end(run_dir, spec, code, status, started)


def run_ranks(
    config: RunConfig, run_dir: Path, command: list[str], limit_bytes: int | None, node: str | None = None
) -> tuple[int, str]:
    """One node's ranks through ``command`` with the node watcher over them, until they end.
    ``node``: the node's name for ranks and watcher (``MEMDIAG_NODE``); its own log and TMPDIR."""
    suffix = f"-{node}" if node else ""
    env = rank_env(config, run_dir, tmp_name=f"tmp{suffix}")
    if node:
        env[NODE_ENV] = node
    log = open(run_dir / "logs" / f"launcher{suffix}.log", "w")
    try:
        process = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stderr=log)
        watcher = None
        if config.instrument:
            watcher = start_watcher(
                run_dir, process.pid, env, host=node, limit_bytes=limit_bytes, fraction=config.guard_fraction,
                min_available_bytes=config.guard_min_available_bytes, grace_s=config.guard_grace_s, stderr=log,
            )
        return wait_for_job(process, watcher)
    finally:
        log.close()
        shutil.rmtree(run_dir / f"tmp{suffix}", ignore_errors=True)


def start_watcher(
    run_dir: Path,
    root_pid: int,
    env: dict[str, str],
    *,
    limit_bytes: int | None,
    fraction: float = 0.95,
    min_available_bytes: int = 0,
    grace_s: float = 10.0,
    stderr=None,
    host: str | None = None,
) -> subprocess.Popen:
    """The node watcher (and its OOM guard) over the process tree below ``root_pid``."""
    command = [sys.executable, "-m", "memdiag.node", str(run_dir), f"--root-pid={root_pid}"]
    if host:
        command.append(f"--host={host}")
    if limit_bytes:
        command.append(f"--guard-limit-bytes={limit_bytes}")
    command += [
        f"--guard-fraction={fraction}",
        f"--guard-min-available-bytes={min_available_bytes}",
        f"--guard-grace-s={grace_s}",
    ]
    return subprocess.Popen(command, env=env, cwd=REPO_ROOT, stderr=stderr)


def wait_for_job(
    process: subprocess.Popen, watcher: subprocess.Popen | None, interrupt: int = signal.SIGTERM
) -> tuple[int, str]:
    """Wait for the job (Ctrl-C: pass ``interrupt`` on, then kill after 30 s), then stop the
    watcher; returns the exit code and ``completed``/``failed``/``interrupted``."""
    code, status = 1, "failed"
    try:
        code = process.wait()
        status = "completed" if code == 0 else "failed"
    except KeyboardInterrupt:
        process.send_signal(interrupt)
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        status = "interrupted"
    finally:
        if watcher is not None:
            watcher.terminate()
            try:
                watcher.wait(timeout=10)
            except subprocess.TimeoutExpired:
                watcher.kill()
    return code, status


def wait_and_record(
    process: subprocess.Popen,
    watcher: subprocess.Popen | None,
    run_dir: Path,
    spec: dict,
    started: float,
    interrupt: int = signal.SIGTERM,
) -> int:
    """Wait for the job and its watcher, and record how the run ended in run.json."""
    code, status = wait_for_job(process, watcher, interrupt)
    return record_end(run_dir, spec, code, status, started)


def record_end(run_dir: Path, spec: dict, code: int, status: str, started: float) -> int:
    """How a single-node run ended, in run.json (the guard's stop overrides the exit status)."""
    if guard_event(run_dir) is not None:
        status = "stopped_by_guard"
    spec.update(
        status=status,
        exit_code=code,
        ended_at=dt.datetime.now(dt.timezone.utc).isoformat(),
        duration_s=round(time.monotonic() - started, 3),
    )
    write_run_json(run_dir, spec)
    return code


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
    logs += sorted((run_dir / "logs").glob("launcher-*.log"))
    for log_file in logs:
        try:
            text = log_file.read_text(errors="replace")
        except OSError:
            continue
        if "Traceback" in text or log_file.name.startswith("launcher"):
            tail = [line for line in text.splitlines() if line.strip()][-lines:]
            return f"{log_file}:\n" + "\n".join(tail)
    return ""
