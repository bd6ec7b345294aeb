"""Start one node's processes: the launcher (torchrun, the deepspeed launcher, or the user's
command) with the ranks, and the node watcher over them, owned by ``lifetime.Job`` until
nothing of them is left. Files the launch causes outside the run directory (torchelastic's
TMPDIR files) are kept inside it and removed afterwards. What a run is and how it ended is
``memdiag.rundir``'s; which nodes run where is ``memdiag.multinode``'s; ``memdiag.runs``
decides between them once.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import sys
import threading
import time
from pathlib import Path

from memdiag import lifetime
from memdiag.files import free_bytes
from memdiag.instrument import NODE_ENV
from memdiag.settings import RECORDER_ENV, RunSettings, recorder_env
from memdiag.timeline import format as fmt

REPO_ROOT = Path(__file__).resolve().parent.parent
INJECT_DIR = Path(__file__).resolve().parent / "inject"
LAUNCHERS = ("torchrun", "deepspeed", "torch.distributed.run", "deepspeed.launcher.runner", "accelerate", "accelerate.commands.launch")


def rank_env(config, run_dir: Path, tmp_name: str = "tmp") -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["TMPDIR"] = str(run_dir / tmp_name)
    (run_dir / tmp_name).mkdir(exist_ok=True)
    env["PYTHONPATH"] = python_path(REPO_ROOT)
    if config.hardware.accelerator == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // config.nproc_per_node)))
    return env


def standalone_command(entry_module: str, nproc_per_node: int, run_dir: Path) -> list[str]:
    """torchrun for one node on its own."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
            f"--nproc_per_node={nproc_per_node}", "-m", entry_module, str(run_dir)]


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


def watcher_command(settings: RunSettings, run_dir: Path, root_pid: int, limit_bytes: int | None, node: str | None) -> list[str]:
    """The node watcher over ``root_pid``'s process tree, with the guard's settings."""
    command = [sys.executable, "-m", "memdiag.node", str(run_dir), f"--root-pid={root_pid}", f"--owner-pid={os.getpid()}"]
    if node:
        command.append(f"--host={node}")
    if limit_bytes:
        command.append(f"--guard-limit-bytes={limit_bytes}")
    command += [
        f"--guard-fraction={settings.guard_fraction}",
        f"--guard-min-available-bytes={settings.guard_min_available_bytes}",
        f"--guard-grace-s={settings.guard_grace_s}",
    ]
    if settings.sampler == "watcher":
        command.append(f"--rank-interval-s={1.0 / settings.sample_hz}")
    command += [f"--full-rate-s={settings.sample_full_rate_s}", f"--steady-interval-s={settings.sample_steady_interval_s}"]
    if settings.metrics_port >= 0:
        command.append(f"--metrics-port={settings.metrics_port}")
    if settings.metrics_textfile:
        command.append(f"--metrics-textfile={Path(settings.metrics_textfile).resolve()}")
    command.append(f"--columnar={settings.timeline_columnar}")
    return command


COMPACTION_BYTES_PER_S = 8 * 2**20
"""A slow core's pace reading a rank file and writing its Parquet (bench/report_scaling: ~26 MiB
of JSONL read and compacted in about 2 s on this machine's 2 cores)."""


def watcher_wait_s(settings: RunSettings, run_dir: Path) -> float:
    """How long the node watcher may take to end once the job has: its last sample, and the
    compaction of the rank files (``timeline.columnar``); past it the watcher is stopped and the
    report compacts what is left."""
    if settings.timeline_columnar == "never":
        return 10.0
    try:
        size = sum(p.stat().st_size for p in (run_dir / fmt.TIMELINE_DIR).glob("rank-*.jsonl"))
    except OSError:
        size = 0
    return 10.0 + size / COMPACTION_BYTES_PER_S


def python_path(*first: Path) -> str:
    """PYTHONPATH with ``first`` ahead of the user's own."""
    rest = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
    return os.pathsep.join([*(str(p) for p in first), *rest])


def run_node(
    config, run_dir: Path, command: list[str], limit_bytes: int | None, node: str | None = None
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
            job.stop_helpers(watcher_wait_s(config, run_dir))
    finally:
        shutil.rmtree(run_dir / f"tmp{suffix}", ignore_errors=True)
    ended.disk_full = disk.episodes
    return ended


def is_launcher(command: list[str]) -> bool:
    return any(Path(part).name in LAUNCHERS or part in LAUNCHERS for part in command[:3])


def run_command(settings: RunSettings, run_dir: Path, command: list[str], limit_bytes: int) -> lifetime.Ended:
    """The user's command with memdiag injected into every Python process it starts (the
    ``inject`` directory first on PYTHONPATH), its output streamed and kept in ``logs/``, and
    the node watcher over its whole process tree."""
    import subprocess

    env = dict(os.environ)
    env.pop("MEMDIAG_RANK_PID", None)  # a new job: its ranks are to be instrumented, whoever started memdiag
    env["PYTHONPATH"] = python_path(INJECT_DIR, REPO_ROOT)
    env["MEMDIAG_RUN_DIR"] = str(run_dir.resolve())
    env[RECORDER_ENV] = recorder_env(settings)
    env["PYTHONUNBUFFERED"] = "1"  # its output goes through memdiag's pipe: keep it live
    if not is_launcher(command):
        env["MEMDIAG_SINGLE_PROCESS"] = "1"
    watcher_env = {k: v for k, v in env.items() if not k.startswith("MEMDIAG_")} | {"PYTHONPATH": str(REPO_ROOT)}
    disk = DiskWatch(run_dir)
    with lifetime.Job(settings.stop_grace_s) as job:
        process = job.start("command", command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        tees = [
            Tee(process.stdout, sys.stdout.buffer, run_dir / "logs" / "stdout.log", job),
            Tee(process.stderr, sys.stderr.buffer, run_dir / "logs" / "stderr.log", job),
        ]
        job.start_helper(watcher_command(settings, run_dir, process.pid, limit_bytes, None), env=watcher_env, cwd=REPO_ROOT)
        ended = job.wait(tick=disk)
        job.stop_helpers(watcher_wait_s(settings, run_dir))
        for tee in tees:
            tee.join()
    ended.disk_full = disk.episodes
    return ended


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
