"""``memdiag run [key=value ...] -- CMD ARGS...``: profile any DeepSpeed job, unchanged.

memdiag starts CMD with its ``inject`` directory first on PYTHONPATH (the user's PYTHONPATH
kept after it), so every training process starts the sampler and the DeepSpeed hooks before
the script runs; a node watcher follows the whole process tree.
"""

from __future__ import annotations

import datetime as dt
import difflib
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from memdiag import launch, lifetime
from memdiag.errors import UsageError
from memdiag.units import parse_size

INJECT_DIR = Path(__file__).resolve().parent.parent / "inject"
KEYS = {"reports_dir": "reports", "sample_hz": "100", "host_ram": None, "name": "custom", "stop_grace_s": "30"}
LAUNCHERS = ("torchrun", "deepspeed", "torch.distributed.run", "deepspeed.launcher.runner", "accelerate", "accelerate.commands.launch")


def parse_overrides(tokens: list[str]) -> dict:
    values = dict(KEYS)
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise UsageError(f"malformed override {token!r}: write key=value, e.g. sample_hz=200")
        if key not in KEYS:
            close = difflib.get_close_matches(key, list(KEYS), n=3)
            hint = f"; closest valid keys: {', '.join(close)}" if close else f"; valid: {', '.join(KEYS)}"
            raise UsageError(f"unknown key {key!r} for `memdiag run -- CMD`{hint}")
        values[key] = value
    try:
        values["sample_hz"] = float(values["sample_hz"])
    except ValueError:
        raise UsageError(f"sample_hz={values['sample_hz']!r} must be a number") from None
    if values["sample_hz"] <= 0:
        raise UsageError(f"sample_hz={values['sample_hz']} must be positive")
    try:
        values["stop_grace_s"] = float(values["stop_grace_s"])
    except ValueError:
        raise UsageError(f"stop_grace_s={values['stop_grace_s']!r} must be a number of seconds") from None
    if values["host_ram"] is not None:
        values["host_ram"] = parse_size(values["host_ram"], name="host_ram")
    return values


def is_launcher(command: list[str]) -> bool:
    return any(Path(part).name in LAUNCHERS or part in LAUNCHERS for part in command[:3])


def main(overrides: list[str], command: list[str]) -> int:
    if not command:
        raise UsageError("nothing to run after `--`: memdiag run -- torchrun --nproc_per_node 2 train.py")
    if shutil.which(command[0]) is None and not Path(command[0]).exists():
        raise UsageError(f"command {command[0]!r} not found on PATH")
    values = parse_overrides(overrides)
    from memdiag import preflight

    preflight.writable_dir(values["reports_dir"], "reports_dir")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    run_dir = Path(values["reports_dir"]) / values["name"] / f"{stamp}-cmd"
    (run_dir / "timeline").mkdir(parents=True)
    (run_dir / "logs").mkdir()
    limit = values["host_ram"]
    spec = {
        "case": None,
        "command": command,
        "layout": "cmd",
        "hosts": [os.uname().nodename],
        "host_limit_bytes": limit,
        "host_limit_source": "host_ram override" if limit else None,
        "versions": launch._versions(),
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "status": "running",
        "sample_hz": values["sample_hz"],
    }
    if limit is None:
        from memdiag.probes.host import read_meminfo

        spec["host_limit_bytes"] = read_meminfo().total_bytes
        spec["host_limit_source"] = "MemTotal of this machine"
    spec["owner"] = launch.owner()
    launch.write_run_json(run_dir, spec)

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(INJECT_DIR), str(launch.REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env["MEMDIAG_RUN_DIR"] = str(run_dir.resolve())
    env["MEMDIAG_SAMPLE_HZ"] = str(values["sample_hz"])
    env["PYTHONUNBUFFERED"] = "1"  # its output goes through memdiag's pipe: keep it live
    if not is_launcher(command):
        env["MEMDIAG_SINGLE_PROCESS"] = "1"
    print(f"memdiag: profiling {' '.join(command)}; run directory {run_dir}", flush=True)
    started = time.monotonic()
    watcher_env = {k: v for k, v in env.items() if not k.startswith("MEMDIAG_")} | {"PYTHONPATH": str(launch.REPO_ROOT)}
    disk = launch.DiskWatch(run_dir)
    with lifetime.Job(values["stop_grace_s"]) as job:
        process = job.start("command", command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        tees = [
            Tee(process.stdout, sys.stdout.buffer, run_dir / "logs" / "stdout.log", job),
            Tee(process.stderr, sys.stderr.buffer, run_dir / "logs" / "stderr.log", job),
        ]
        job.start_helper(
            launch.watcher_command(GUARD_DEFAULTS, run_dir, process.pid, spec["host_limit_bytes"], None),
            env=watcher_env, cwd=launch.REPO_ROOT,
        )
        ended = job.wait(tick=disk)
        job.stop_helpers()
        for tee in tees:
            tee.join()
    ended.disk_full = disk.episodes
    code = launch.record_end(run_dir, spec, ended, started)
    from memdiag.timeline import read_run

    spec["world_size"] = max((t.header.get("world_size", 1) for t in read_run(run_dir).ranks.values()), default=None)
    launch.write_run_json(run_dir, spec)
    from memdiag.commands.run import build_report

    built = build_report(run_dir, spec)
    where = f"; report {built[1]}" if built else ""
    if ended.signal:
        print(f"memdiag: the command was stopped ({ended.signal}){where}")
    else:
        print(f"memdiag: {'done' if code == 0 else f'the command failed (exit code {code})'}{where}")
    return code


@dataclass(frozen=True)
class _Guard:
    guard_fraction: float = 0.95
    guard_min_available_bytes: int = 0
    guard_grace_s: float = 10.0


GUARD_DEFAULTS = _Guard()


class Tee(threading.Thread):
    """Copies one of the command's streams to the console and to ``logs/``, live. Once a stop
    is under way the console gets no more of stderr: the tracebacks of a stop the user asked
    for stay in the log."""

    def __init__(self, source, console, log_path: Path, job: lifetime.Job) -> None:
        super().__init__(daemon=True)
        self.source, self.console, self.job = source, console, job
        self.log = open(log_path, "ab")
        self.quiet_on_stop = console is sys.stderr.buffer
        self.start()

    def run(self) -> None:
        try:
            for chunk in iter(lambda: self.source.read1(65536), b""):
                for out in (self.log, self.console):
                    if out is self.console and self.quiet_on_stop and self.job.signals:
                        continue
                    try:
                        out.write(chunk)
                        out.flush()
                    except (OSError, ValueError):  # a full disk or a closed console: keep the other
                        pass
        finally:
            self.log.close()
