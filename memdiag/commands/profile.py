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
import signal
import subprocess
import time
from pathlib import Path

from memdiag import launch
from memdiag.errors import UsageError
from memdiag.units import parse_size

INJECT_DIR = Path(__file__).resolve().parent.parent / "inject"
KEYS = {"reports_dir": "reports", "sample_hz": "100", "host_ram": None, "name": "custom"}
LAUNCHERS = ("torchrun", "deepspeed", "torch.distributed.run", "deepspeed.launcher.runner")


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
    launch.write_run_json(run_dir, spec)

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(INJECT_DIR), str(launch.REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env["MEMDIAG_RUN_DIR"] = str(run_dir.resolve())
    env["MEMDIAG_SAMPLE_HZ"] = str(values["sample_hz"])
    if not is_launcher(command):
        env["MEMDIAG_SINGLE_PROCESS"] = "1"
    print(f"memdiag: profiling {' '.join(command)}; run directory {run_dir}", flush=True)
    started = time.monotonic()
    process = subprocess.Popen(command, env=env)
    watcher = launch.start_watcher(
        run_dir,
        process.pid,
        {k: v for k, v in env.items() if not k.startswith("MEMDIAG_")} | {"PYTHONPATH": str(launch.REPO_ROOT)},
        limit_bytes=spec["host_limit_bytes"],
    )
    code = launch.wait_and_record(process, watcher, run_dir, spec, started, interrupt=signal.SIGINT)
    from memdiag.timeline import read_run

    spec["world_size"] = max((t.header.get("world_size", 1) for t in read_run(run_dir).ranks.values()), default=None)
    launch.write_run_json(run_dir, spec)
    from memdiag.commands import report

    _, html_path, _ = report.build(run_dir, with_checks=True)
    print(f"memdiag: {'done' if code == 0 else f'the command failed (exit code {code})'}; report {html_path}")
    return 0 if code == 0 else 1
