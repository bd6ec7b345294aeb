"""The per-rank sampler: a daemon thread that takes one sample per tick and writes them in
batches (one ``samples`` record per flush interval)."""

from __future__ import annotations

import logging
import threading
import time

from memdiag.phases import PhaseTracker
from memdiag.probes.device import DeviceProbe
from memdiag.probes.host import SelfStatusReader
from memdiag.timeline import format as fmt
from memdiag.timeline.writer import TimelineWriter

log = logging.getLogger(__name__)

TRAINING_PHASES = frozenset({"", "forward", "backward", "step", "optimizer_step"})
"""The training loop's phases ("" between steps): where, after ``full_rate_s``, a window's
bounding samples stand for it. Loading, initialisation, saving and resuming stay at full rate."""
NVML_INTERVAL_S = 0.1
"""NVML's per-process query costs ~100 us; 10 Hz is plenty for a figure that moves slowly."""


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
        self.full_rate_s = full_rate_s
        self.steady_interval_s = steady_interval_s
        self._training_since: float | None = None
        self._envelope: dict[str, tuple[float, dict]] = {}
        """The open steady window's bounding samples: role -> (value, sample)."""
        self._envelope_started = 0.0
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
        self._close_envelope()
        self._write_batch()
        self._writer.flush()

    def _steady(self, now: float) -> bool:
        """In the training loop (its first step done: initialisation is behind) for longer than
        ``full_rate_s``: from then on a window's bounding samples stand for it."""
        if not self.steady_interval_s or self._tracker.step < 1 or self._tracker.phase not in TRAINING_PHASES:
            return False
        if self._training_since is None:
            self._training_since = now
        return now - self._training_since >= self.full_rate_s

    def _take(self, record: dict, now: float | None = None) -> None:
        """One tick: written as is at full rate; in steady training, kept only if it bounds its window."""
        now = time.monotonic() if now is None else now
        if not self._steady(now):
            self._close_envelope()
            self._append(record)
            return
        if not self._envelope:
            self._envelope_started = now
        device = record.get("device_allocated_bytes")
        for role, value in (("rss_max", record["rss_bytes"]), ("rss_min", -record["rss_bytes"]),
                            ("device_max", device if device is not None else None)):
            if value is not None and (role not in self._envelope or value > self._envelope[role][0]):
                self._envelope[role] = (value, record)
        if now - self._envelope_started >= self.steady_interval_s:
            self._close_envelope()

    def _close_envelope(self) -> None:
        kept = {id(sample): sample for _, sample in self._envelope.values()}
        for sample in sorted(kept.values(), key=lambda r: r["t"]):
            self._append(sample)
        self._envelope = {}

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
