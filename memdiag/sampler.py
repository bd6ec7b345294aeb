"""The per-rank sampler: a daemon thread that takes one sample per tick and writes them in
batches (one ``samples`` record per flush interval)."""

from __future__ import annotations

import logging
import threading
import time

from memdiag.budget import SteadyClock, WindowBudget, device_roles, rank_roles
from memdiag.phases import PhaseTracker
from memdiag.probes.device import NVML_INTERVAL_S, DeviceProbe
from memdiag.probes.host import SelfStatusReader
from memdiag.timeline import format as fmt
from memdiag.timeline.writer import TimelineWriter

log = logging.getLogger(__name__)

class Sampler:
    """Samples host RSS/HWM and device memory at ``interval_s`` on deadlines (no drift).

    A failing read is logged once and the tick skipped: the sampler never raises into the
    process it watches.
    """

    def __init__(
        self,
        writer: TimelineWriter,
        tracker: PhaseTracker,
        device: DeviceProbe | None,
        interval_s: float = 0.01,
        *,
        full_rate_s: float = float("inf"),
        steady_interval_s: float = 0.0,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.interval_s = interval_s
        self._clock = SteadyClock(full_rate_s, steady_interval_s)
        self._budget = WindowBudget(steady_interval_s, rank_roles)
        self._writer = writer
        self._tracker = tracker
        self._device = device
        self._status = SelfStatusReader()
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._thread = threading.Thread(target=self._loop, name="memdiag-sampler", daemon=True)
        self._errors = 0
        self._next_nvml = 0.0
        self.samples_written = 0
        self._batch: dict[str, list] = {}
        self._batch_len = 0
        self._batch_started = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def stop(self) -> None:
        self._stop.set()
        self._running.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for sample in self._budget.close():
            self._append(sample)
        self._write_batch()
        self._writer.flush()

    def _take(self, record: dict, now: float | None = None) -> None:
        """One tick: written as is at full rate; in steady training, kept only if it bounds its window."""
        now = time.monotonic() if now is None else now
        steady = self._clock.steady(now, self._tracker.phase, self._tracker.step)
        for sample in self._budget.take(record, now, steady):
            self._append(sample)

    def _append(self, record: dict) -> None:
        """Add one tick to the open batch; write the batch once per flush interval."""
        batch = self._batch
        for key, value in record.items():
            if key == "kind":
                continue
            column = batch.setdefault(key, [None] * self._batch_len)
            column.append(value)
        self._batch_len += 1
        for key, column in batch.items():  # keys a tick lacked (module outside forward)
            if len(column) < self._batch_len:
                column.append(None)
        if time.monotonic() - self._batch_started >= fmt.FLUSH_INTERVAL_S:
            self._write_batch()

    def _write_batch(self) -> None:
        if self._batch_len:
            self._writer.write(fmt.sample_batch(**self._batch))
        self._batch, self._batch_len, self._batch_started = {}, 0, time.monotonic()

    def sample_once(self) -> dict:
        mem = self._status.read()
        record = {
            "kind": fmt.SAMPLE,
            "t": time.time_ns(),
            "phase": self._tracker.phase,
            "step": self._tracker.step,
            "rss_bytes": mem.rss_bytes,
            "hwm_bytes": mem.hwm_bytes,
        }
        if self._tracker.module:
            record["module"] = self._tracker.module
        if self._device is not None and self._device.is_host_memory:
            record["device_allocated_bytes"] = record["device_reserved_bytes"] = mem.rss_bytes
        elif self._device is not None:
            device = self._device.read(with_nvml=self._nvml_due())
            record["device_allocated_bytes"] = device.allocated_bytes
            record["device_reserved_bytes"] = device.reserved_bytes
            if device.nvml_used_bytes is not None:
                record["nvml_used_bytes"] = device.nvml_used_bytes
        return record

    def _nvml_due(self) -> bool:
        now = time.monotonic()
        if now >= self._next_nvml:
            self._next_nvml = now + NVML_INTERVAL_S
            return True
        return False

    def _loop(self) -> None:
        deadline = time.monotonic()
        while not self._stop.is_set():
            if not self._running.is_set():
                self._running.wait(0.1)
                deadline = time.monotonic()
                continue
            try:
                self._take(self.sample_once())
                self.samples_written += 1
            except Exception:  # never let a probe failure escape the thread
                self._errors += 1
                if self._errors == 1:
                    log.exception("memdiag sampler: a sample failed; further failures are counted")
            deadline += self.interval_s
            now = time.monotonic()
            if deadline < now:  # fell behind (e.g. a stalled /proc read): skip, don't burst
                deadline = now + self.interval_s
            self._stop.wait(deadline - now)


DEVICE_BATCH_S = 1.0
"""Device points are written at most once a second (a crash loses at most that): a layer's
boundary comes many times a second, and one record per boundary would outweigh the points."""


class DeviceSeries:
    """The device's figures where no thread samples the rank (``sampler=watcher`` on CUDA): the
    allocator's peaks since the previous boundary, read by the phase tracker at every phase and
    ZeRO-3 sub-module boundary (exact where a polled sample is not), under the sampling budget,
    written as ``device_samples`` batches. Never raises into the training loop. NVML is not read
    here: the node watcher reads it for every rank at once (``probes.device.ProcessNvml``)."""

    def __init__(self, writer: TimelineWriter, tracker: PhaseTracker, *, full_rate_s: float = float("inf"),
                 steady_interval_s: float = 0.0) -> None:
        self._writer = writer
        self._tracker = tracker
        self._clock = SteadyClock(full_rate_s, steady_interval_s)
        self._budget = WindowBudget(steady_interval_s, device_roles)
        self._batch: dict[str, list] = {"t": [], "device_allocated_bytes": [], "device_reserved_bytes": []}
        self._written = time.monotonic()
        self._errors = 0

    def add(self, allocated: int, reserved: int | None) -> None:
        try:
            now = time.monotonic()
            point = {"t": time.time_ns(), "device_allocated_bytes": allocated, "device_reserved_bytes": reserved}
            for kept in self._budget.take(point, now, self._clock.steady(now, self._tracker.phase, self._tracker.step)):
                for name, column in self._batch.items():
                    column.append(kept[name])
            if now - self._written >= DEVICE_BATCH_S:
                self._write()
        except Exception:  # never into the training loop
            self._errors += 1
            if self._errors == 1:
                log.exception("memdiag: a device point was not recorded; further failures are counted")

    def _write(self) -> None:
        if self._batch["t"]:
            self._writer.write({"kind": fmt.DEVICE_SAMPLES, **self._batch})
        self._batch = {name: [] for name in self._batch}
        self._written = time.monotonic()

    def close(self) -> None:
        for kept in self._budget.close():
            for name, column in self._batch.items():
                column.append(kept[name])
        self._write()
