"""Start memdiag inside one rank: timeline writer, device probe, phase tracker, sampler, hooks.

Used by the case's training entry and (for ``memdiag run -- CMD``) by the injected
sitecustomize. Everything it starts is stopped and flushed at exit, also on SIGTERM.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import memdiag
from memdiag import hooks
from memdiag.failure import exception_record
from memdiag.phases import PhaseTracker
from memdiag.device_stacks import DeviceStacks
from memdiag.probes.device import SOURCE_CUDA, DeviceProbe, nvml_module
from memdiag.sampler import DeviceSeries, Sampler
from memdiag.settings import RunSettings, parse_stacks_device, recorder_from_env
from memdiag.stacks import HostStacks, parse_phases
from memdiag.timeline import format as fmt
from memdiag.timeline.writer import TimelineWriter

log = logging.getLogger(__name__)

NODE_ENV = "MEMDIAG_NODE"
RANK_PID_ENV = "MEMDIAG_RANK_PID"
"""Set by the instrumented rank for everything it starts: a child, grandchild or re-exec that
inherits the rank's ``RANK`` and run directory is not the rank (memdiag.inject.sitecustomize)."""


@dataclass(frozen=True, kw_only=True)
class RankIdentity:
    """Where this process sits in the job, from the launcher's environment variables."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    host: str = field(default_factory=socket.gethostname)
    """The node's name: ``MEMDIAG_NODE`` (set by memdiag for each node it starts, so nodes
    simulated on one machine stay apart), else the hostname."""

    @classmethod
    def from_env(cls) -> RankIdentity:
        env = os.environ
        world_size = int(env.get("WORLD_SIZE", "1"))
        # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE
        local_world_size = env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or str(world_size)
        return cls(
            rank=int(env.get("RANK", "0")),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            world_size=world_size,
            local_world_size=int(local_world_size),
            host=env.get(NODE_ENV) or socket.gethostname(),
        )


class Instrumentation:
    """Everything memdiag runs inside one rank; ``stop`` is idempotent."""

    def __init__(self, run_dir: Path, identity: RankIdentity, settings: RunSettings) -> None:
        sample_hz, stacks, stacks_device = settings.sample_hz, settings.stacks, settings.stacks_device
        self.identity = identity
        self._warned: set[str] = set()
        self.device = DeviceProbe.detect(identity.local_rank)
        header = {
            "tool_version": memdiag.__version__,
            "rank": identity.rank,
            "local_rank": identity.local_rank,
            "world_size": identity.world_size,
            "local_world_size": identity.local_world_size,
            "host": identity.host,
            "pid": os.getpid(),
            "sample_hz": sample_hz,
            "sampler": settings.sampler,
            "sample_full_rate_s": settings.sample_full_rate_s,
            "sample_steady_interval_s": settings.sample_steady_interval_s,
            "device_source": self.device.source if self.device else None,
            "device_total_bytes": self.device.total_bytes if self.device else None,
        }
        if self.device is not None and not self.device.is_host_memory:
            header["nvml_module"] = nvml_module()
        device_steps = parse_stacks_device(stacks_device)
        cuda = self.device is not None and self.device.source == SOURCE_CUDA
        if device_steps and not cuda:
            header["device_stacks"] = "off: device allocation stacks need CUDA's allocator (this rank has none)"
        self.samples_here = settings.sampler == "rank"
        """False: the node watcher samples this rank from outside (``sampler=watcher``); no thread here."""
        # no sampler thread flushes for the rank: its events (a few a step) go out as written,
        # so a SIGKILL loses none and the watcher's budget sees each phase as it begins
        self.writer = TimelineWriter(fmt.rank_path(run_dir, identity.rank), header,
                                     flush_interval_s=fmt.FLUSH_INTERVAL_S if self.samples_here else 0.0)
        self.tracker = PhaseTracker(self.writer.write, self.device, self.warn_once)
        if self.device is not None:
            self.device.warn = self.warn_once
            if self.device.nvml_error:
                self.warn_once("nvml", self.device.nvml_error)
        self.sampler = Sampler(self.writer, self.tracker, self.device, 1.0 / sample_hz,
                               full_rate_s=settings.sample_full_rate_s, steady_interval_s=settings.sample_steady_interval_s)
        self.device_series: DeviceSeries | None = None
        if cuda and not self.samples_here:  # the allocator read at the tracker's boundaries, not polled
            self.device_series = DeviceSeries(self.writer, self.tracker, full_rate_s=settings.sample_full_rate_s,
                                              steady_interval_s=settings.sample_steady_interval_s)
            self.tracker.device_listener = self.device_series.add
        self.stacks = HostStacks(run_dir, identity.rank, parse_phases(stacks), self.warn_once)
        if not self.stacks.off:
            self.tracker.phase_listeners.append(
                lambda event, phase: self.stacks.begin(phase) if event == "begin" else self.stacks.end(phase))
        self.device_stacks = DeviceStacks(run_dir, identity.rank, self.device.index if cuda else None,
                                          device_steps if cuda else 0, self.warn_once)
        if not self.device_stacks.done:
            self.tracker.phase_listeners.append(
                lambda event, phase: self.device_stacks.begin(self.device.index) if (event, phase) == ("end", "ds_initialize") else None)
            self.tracker.step_listeners.append(self.device_stacks.step_done)
        self._stopped = False

    def warn_once(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        log.warning(message)
        self.writer.write({"kind": fmt.WARNING, "t": time.time_ns(), "key": key, "message": message})

    def start(self) -> Instrumentation:
        hooks.install(self.tracker, self.warn_once)
        self.tracker.begin(hooks.LOAD_PHASE)  # until deepspeed.initialize: the model's load, exactly
        if self.samples_here:
            self.sampler.start()
        atexit.register(self.stop)
        _chain_sigterm(self.stop)
        _chain_excepthook(self.record_exception)
        return self

    def record_exception(self, exc_type, exc, tb) -> None:
        """The uncaught exception that ends this rank, for the findings and the report."""
        if self._stopped or issubclass(exc_type, KeyboardInterrupt):
            return
        try:
            self.writer.write({"kind": fmt.EXCEPTION, "t": time.time_ns(), **exception_record(exc_type, exc, tb)})
            self.writer.flush()
        except Exception:  # never in the way of the user's own traceback
            log.debug("could not record the exception", exc_info=True)

    def record_malloc(self, after: str, **extra) -> None:
        """glibc's heap figures now (e.g. after a malloc_trim, to show its effect)."""
        hooks.record_malloc(after, **extra)

    def set_active(self, active: bool) -> None:
        """Pause or resume sampling and hooks in place (bench/overhead's in-run A/B)."""
        hooks.set_active(active)
        if active:
            self.sampler.resume()
        else:
            self.sampler.pause()

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.stacks.close()  # a captured phase still open at exit (a failed or short run)
        self.device_stacks.finish()
        self.sampler.stop()
        if self.device_series is not None:
            self.device_series.close()
        self.writer.close()


def _chain_excepthook(record) -> None:
    """Record an uncaught exception, then print it as the previous hook would."""
    import sys

    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        record(exc_type, exc, tb)
        previous(exc_type, exc, tb)

    sys.excepthook = hook


def _chain_sigterm(stop) -> None:
    """On SIGTERM flush the timeline, then behave as the previous handler would."""
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        stop()
        if callable(previous):
            previous(signum, frame)
        else:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread; atexit still flushes on a normal exit
        pass


_ACTIVE: list[Instrumentation] = []


def start(run_dir: str | Path, settings: RunSettings | None = None) -> Instrumentation:
    """Start memdiag in this process (once; a second call returns the running one), recording as
    ``settings`` say (its ``RECORDER_FIELDS``; None: what the launching memdiag put in
    ``MEMDIAG_RECORDER``, else the defaults)."""
    if not _ACTIVE:
        os.environ[RANK_PID_ENV] = str(os.getpid())
        settings = settings if settings is not None else recorder_from_env(os.environ)
        _ACTIVE.append(Instrumentation(Path(run_dir), RankIdentity.from_env(), settings).start())
    return _ACTIVE[0]


def _after_fork_in_child() -> None:
    """A forked child (a DataLoader worker, a pool) shares the rank's memory but is not the
    rank: its copy of memdiag writes nothing, and its exit flushes nothing of the parent's. The
    node watcher counts it among the rank's children."""
    for active in _ACTIVE:
        active._stopped = True
        active.writer.abandon_in_child()
    hooks.set_active(False)


os.register_at_fork(after_in_child=_after_fork_in_child)


def stop_all() -> None:
    for active in _ACTIVE:
        active.stop()


