"""Recording from inside the training code, where wrapping the command is impossible (Ray Train
workers, notebooks, a custom launcher):

    import memdiag
    with memdiag.record(run_dir="/shared/runs/r1"):      # every rank, the same directory
        model = ...; engine, *_ = deepspeed.initialize(...); train(engine)

or, with a Hugging Face Trainer, ``Trainer(..., callbacks=[memdiag.MemdiagCallback("/shared/runs/r1")])``.

Each rank records its own timeline (the same sampler and DeepSpeed hooks as ``memdiag run``);
local rank 0 starts the node watcher over its launcher's process tree; global rank 0 writes
run.json and, at the end, the summary, findings and report: the same run directory.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

from memdiag.errors import UsageError

REPO_ROOT = Path(__file__).resolve().parent.parent


class Recording:
    """What ``record`` started in this process; ``stop`` ends it (idempotent)."""

    def __init__(self, run_dir: Path, sample_hz: float, host_ram_bytes: int | None, report: bool) -> None:
        from memdiag import instrument

        self.run_dir = run_dir
        self.identity = instrument.RankIdentity.from_env()
        self.report = report
        self.watcher: subprocess.Popen | None = None
        self.stopped = False
        self.spec: dict | None = None
        (run_dir / "timeline").mkdir(parents=True, exist_ok=True)
        (run_dir / "logs").mkdir(exist_ok=True)
        if self.identity.rank == 0:
            self.spec = self._spec(host_ram_bytes)
            self._write_spec()
        self.instrumentation = instrument.start(run_dir, sample_hz)
        if self.identity.local_rank == 0:
            self.watcher = self._start_watcher()

    def _spec(self, host_ram_bytes: int | None) -> dict:
        from memdiag import launch
        from memdiag.probes.host import read_meminfo

        limit = host_ram_bytes or read_meminfo().total_bytes
        return {
            "case": None,
            "command": [os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]],
            "layout": "api",
            "world_size": self.identity.world_size,
            "hosts": [self.identity.host],
            "host_limit_bytes": limit,
            "host_limit_source": "host_ram argument" if host_ram_bytes else "MemTotal of this machine",
            "versions": launch._versions(),
            "started_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            "status": "running",
            "recorded_by": "memdiag.record",
            "owner": launch.owner(),
        }

    def _write_spec(self) -> None:
        from memdiag import launch

        launch.write_run_json(self.run_dir, self.spec)

    def _start_watcher(self) -> subprocess.Popen | None:
        """Over this node's ranks: the launcher that started them (torchrun's agent, Ray's
        raylet) is their common parent; a process started by hand watches itself."""
        parent = os.getppid()
        single = self.identity.world_size == 1 and self.identity.local_world_size == 1
        root = os.getpid() if single or parent == 1 else parent
        command = [sys.executable, "-m", "memdiag.node", str(self.run_dir), f"--root-pid={root}",
                   f"--owner-pid={os.getpid()}", f"--host={self.identity.host}"]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        try:
            log = open(self.run_dir / "logs" / f"watcher-{self.identity.host}.log", "ab")
            return subprocess.Popen(command, env=env, stdout=log, stderr=log, start_new_session=True)
        except OSError as exc:  # recording goes on without the node's view
            self.instrumentation.warn_once("watcher", f"node watcher not started: {exc!r}")
            return None

    def stop(self, failed: bool = False) -> None:
        if self.stopped:
            return
        self.stopped = True
        from memdiag import instrument

        instrument.stop_all()
        _barrier()  # every rank's timeline is closed before rank 0 reads them
        if self.watcher is not None:
            self.watcher.terminate()
            try:
                self.watcher.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.watcher.kill()
        if self.spec is not None:
            self.spec.update(status="failed" if failed else "completed", ended_at=dt.datetime.now(dt.timezone.utc).isoformat())
            self._write_spec()
            if self.report:
                from memdiag.commands import report

                try:
                    report.build(self.run_dir, with_checks=True)
                except Exception as exc:  # the training is over; say why the report is missing
                    print(f"memdiag: report not written: {exc}", file=sys.stderr)


def _barrier() -> None:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    except Exception:
        pass


def _resolve(run_dir: str | Path | None, name: str) -> Path:
    if run_dir:
        return Path(run_dir)
    if os.environ.get("MEMDIAG_RUN_DIR"):
        return Path(os.environ["MEMDIAG_RUN_DIR"])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("memdiag.record: give run_dir= (a directory every rank sees): ranks of one job must share it")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    return Path("reports") / name / f"{stamp}-api"


@contextlib.contextmanager
def record(run_dir: str | Path | None = None, *, name: str = "api", sample_hz: float = 100.0,
           host_ram: str | None = None, report: bool = True) -> Iterator[Recording]:
    """Record this process as one rank of a run directory for the duration of the block."""
    from memdiag.units import parse_size

    recording = Recording(_resolve(run_dir, name), sample_hz, parse_size(host_ram, name="host_ram") if host_ram else None, report)
    try:
        yield recording
    except BaseException:
        recording.stop(failed=True)
        raise
    recording.stop()


def _trainer_callback_base():
    try:
        from transformers import TrainerCallback
    except ImportError:  # pragma: no cover - transformers is a dependency
        return object
    return TrainerCallback


class MemdiagCallback(_trainer_callback_base()):
    """A ``transformers.TrainerCallback`` that records the Trainer's run (from the Trainer's
    creation: build the model inside ``memdiag.record`` instead to see its load too)."""

    def __init__(self, run_dir: str | Path | None = None, **options) -> None:
        self.run_dir, self.options = run_dir, options
        self._context = None

    def on_init_end(self, args, state, control, **kwargs):
        if self._context is None:
            self._context = record(self.run_dir, **self.options)
            self._context.__enter__()

    def on_train_end(self, args, state, control, **kwargs):
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = None
