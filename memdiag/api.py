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
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

from memdiag.errors import UsageError
from memdiag.settings import RunSettings


class Recording:
    """What ``record`` started in this process; ``stop`` ends it (idempotent)."""

    def __init__(self, run_dir: Path, settings: RunSettings) -> None:
        from memdiag import instrument
        from memdiag.rundir import RunDir, resolve_host_limit

        self.rundir = RunDir.at(run_dir)
        self.run_dir = self.rundir.path
        self.settings = settings
        self.identity = instrument.RankIdentity.from_env()
        self.watcher: subprocess.Popen | None = None
        self.stopped = False
        self.writes_spec = self.identity.rank == 0
        self.limit = resolve_host_limit(settings.host_ram_bytes, override_source="host_ram argument")
        if self.writes_spec:
            self.rundir.start(
                host_limit=self.limit, case=None, command=[os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]],
                layout="api", world_size=self.identity.world_size, hosts=[self.identity.host], recorded_by="memdiag.record",
                stacks=settings.stacks, timeline_columnar=settings.timeline_columnar,
            )
        self.instrumentation = instrument.start(self.run_dir, settings)
        if self.identity.local_rank == 0:
            self.watcher = self._start_watcher()

    @property
    def spec(self) -> dict | None:
        return self.rundir.spec if self.writes_spec else None

    def _start_watcher(self) -> subprocess.Popen | None:
        """Over this node's ranks: the launcher that started them (torchrun's agent, Ray's
        raylet) is their common parent; a process started by hand watches itself."""
        from memdiag.launch import REPO_ROOT, python_path, watcher_command

        parent = os.getppid()
        single = self.identity.world_size == 1 and self.identity.local_world_size == 1
        root = os.getpid() if single or parent == 1 else parent
        command = watcher_command(self.settings, self.run_dir, root, self.limit[0], self.identity.host)
        env = dict(os.environ) | {"PYTHONPATH": python_path(REPO_ROOT)}
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
        if self.writes_spec:
            self.rundir.update(status="failed" if failed else "completed", ended_at=_now())
            if self.settings.report:
                from memdiag.report.build import build
                from memdiag.report.ending import ending
                from memdiag.timeline.reader import guard_event

                try:
                    summary, html_path, findings = build(self.run_dir, with_checks=True)
                except Exception as exc:  # the training is over; say why the report is missing
                    print(f"memdiag: report not written: {exc}", file=sys.stderr)
                    return
                # the recording ends on the console as `memdiag run` ends a run
                # no process exit to report: a failed block reads "failed" in run.json (an uncaught exception)
                lines, _ = ending(self.run_dir, self.rundir.read(), summary, findings, 0, html=html_path,
                                  guard=guard_event(self.run_dir), what="the recording", echoed_stderr=True)
                print("\n".join(lines), flush=True)


def _now() -> str:
    from memdiag.rundir import utc_now

    return utc_now()


def _barrier() -> None:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    except Exception:
        pass


def _resolve(settings: RunSettings) -> Path:
    if settings.run_dir:
        return Path(settings.run_dir)
    if os.environ.get("MEMDIAG_RUN_DIR"):
        return Path(os.environ["MEMDIAG_RUN_DIR"])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("memdiag.record: give run_dir= (a directory every rank sees): ranks of one job must share it")
    from memdiag.rundir import stamp

    return Path("reports") / (settings.name or "api") / f"{stamp()}-api"


@contextlib.contextmanager
def record(run_dir: str | Path | None = None, **settings) -> Iterator[Recording]:
    """Record this process as one rank of a run directory for the duration of the block.
    Keyword settings are ``memdiag.settings``'s (those ``memdiag.record`` takes: ``name``,
    ``sample_hz``, ``host_ram``, ``guard_fraction``, ``report`` ...), dots as underscores."""
    from memdiag.settings import API, resolve

    resolved = resolve(API, run_dir=str(run_dir) if run_dir else None, **settings)
    recording = Recording(_resolve(resolved), resolved)
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
