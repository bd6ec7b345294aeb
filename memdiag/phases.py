"""Phase markers with exact per-phase peaks.

Phases nest (``zero_init`` inside ``model_build``). At every boundary the tracker reads the
peak counters (VmHWM, the CUDA allocator's max) and resets them; the value read is folded into
every open phase, so each phase's peak is the exact maximum over its whole span, even a spike
that lived between two samples.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from memdiag.probes.device import DeviceProbe
from memdiag.probes.host import SelfStatusReader, reset_peak_rss
from memdiag.timeline import format as fmt

log = logging.getLogger(__name__)


ATTRIBUTED_PHASES = frozenset({"forward", "backward"})
OUTSIDE_LAYERS = "(outside layers)"
"""Where a peak lands when no ZeRO-3 sub-module was being fetched (loss, engine bookkeeping)."""
"""Phases whose peaks are broken down by layer (the ZeRO-3 sub-module being computed)."""


@dataclass
class _Frame:
    name: str
    host_peak_bytes: int = 0
    device_peak_bytes: int | None = None
    device_reserved_peak_bytes: int | None = None
    module_host_peaks: dict[str, int] = field(default_factory=dict)
    module_device_peaks: dict[str, int] = field(default_factory=dict)

    def fold(self, module: str | None, host: int, device: int | None, reserved: int | None = None) -> None:
        self.host_peak_bytes = max(self.host_peak_bytes, host)
        if device is not None:
            self.device_peak_bytes = max(self.device_peak_bytes or 0, device)
        if reserved is not None:
            self.device_reserved_peak_bytes = max(self.device_reserved_peak_bytes or 0, reserved)
        if self.name not in ATTRIBUTED_PHASES:
            return
        module = module or OUTSIDE_LAYERS
        self.module_host_peaks[module] = max(self.module_host_peaks.get(module, 0), host)
        if device is not None:
            self.module_device_peaks[module] = max(self.module_device_peaks.get(module, 0), device)

    def end_fields(self) -> dict:
        fields: dict = {
            "host_peak_bytes": self.host_peak_bytes,
            "device_peak_bytes": self.device_peak_bytes,
        }
        if self.device_reserved_peak_bytes is not None:
            fields["device_reserved_peak_bytes"] = self.device_reserved_peak_bytes
        if self.module_host_peaks:
            fields["host_peak_module"] = max(self.module_host_peaks, key=self.module_host_peaks.get)
            fields["module_host_peaks"] = self.module_host_peaks
        if self.module_device_peaks:
            peaks = self.module_device_peaks
            fields["device_peak_module"] = max(peaks, key=peaks.get)
            fields["module_device_peaks"] = peaks
        return fields


@dataclass(frozen=True, slots=True)
class StepRecord:
    step: int
    loss: float | None
    tokens: int
    step_time_s: float


class PhaseTracker:
    """Current phase and step for the sampler, plus exact peaks for every phase."""

    def __init__(
        self,
        emit: Callable[[dict], None],
        device: DeviceProbe | None = None,
        warn_once: Callable[[str, str], None] | None = None,
    ) -> None:
        self.emit = emit
        self.device = device
        self.module: str | None = None
        self._warn_once = warn_once or (lambda key, message: log.warning(message))
        self._status = SelfStatusReader()
        self._stack: list[_Frame] = []
        self.step = 0
        self.step_listeners: list[Callable[[StepRecord], None]] = []
        self.phase_listeners: list[Callable[[str, str], None]] = []
        """Called with ("begin" | "end", phase) after the phase's record is written."""
        self.device_listener: Callable[[int, int | None], None] | None = None
        """Called with the device's (allocated, reserved) peaks since the previous boundary, at
        every boundary where they were read (CUDA): the device series where no thread samples."""
        self.peak_resets = True
        self._reset()

    @property
    def phase(self) -> str:
        return self._stack[-1].name if self._stack else ""

    def _reset(self) -> None:
        if self.peak_resets:
            try:
                reset_peak_rss()
            except OSError as exc:
                self.peak_resets = False
                self._warn_once(
                    "clear_refs",
                    f"cannot reset VmHWM through /proc/self/clear_refs ({exc}); per-phase host "
                    "peaks are peaks since process start",
                )

    def read_rss(self) -> int:
        return self._status.read().rss_bytes

    def _fold_peaks(self) -> None:
        host = self._status.read().hwm_bytes
        self._reset()
        peaks = self.device.read_and_reset_peaks() if self.device else None
        device, reserved = peaks if peaks is not None else (None, None)
        if device is not None and self.device_listener is not None:
            self.device_listener(device, reserved)
        for frame in self._stack:
            frame.fold(self.module, host, device, reserved)

    def set_module(self, name: str | None) -> None:
        """The layer now computing; the peak since the last change is charged to the previous."""
        if name == self.module:
            return
        if self._stack:
            self._fold_peaks()
        self.module = name

    def begin(self, name: str) -> None:
        self._fold_peaks()
        self._stack.append(_Frame(name))
        begin = {"kind": fmt.PHASE_BEGIN, "t": time.time_ns(), "phase": name, "step": self.step}
        begin["rss_bytes"] = self.read_rss()
        if self.device is not None:
            begin["device_allocated_bytes"] = (
                begin["rss_bytes"] if self.device.is_host_memory else self.device.read(with_nvml=False).allocated_bytes
            )
        self.emit(begin)
        for listener in self.phase_listeners:
            listener("begin", name)

    def end(self, name: str) -> None:
        self._fold_peaks()
        if not self._stack or self._stack[-1].name != name:
            self._warn_once(f"unbalanced:{name}", f"phase {name!r} ended while not innermost")
            return
        frame = self._stack.pop()
        record = {"kind": fmt.PHASE_END, "t": time.time_ns(), "phase": name, "step": self.step}
        record.update(frame.end_fields())
        if frame.device_reserved_peak_bytes is not None:
            try:  # the cache's fragmented part, for the phase's reconciliation
                record["device_inactive_split_bytes"] = self.device.inactive_split_bytes()
            except Exception as exc:  # never into the training loop
                self._warn_once("inactive_split", f"inactive split bytes not read: {exc!r}")
        self.emit(record)
        for listener in self.phase_listeners:
            listener("end", name)

    def end_if_innermost(self, name: str) -> bool:
        """End ``name`` when it is the innermost open phase (a phase that may or may not be
        open, like the load phase when deepspeed.initialize is called a second time)."""
        if self._stack and self._stack[-1].name == name:
            self.end(name)
            return True
        return False

    @contextmanager
    def phase_scope(self, name: str) -> Iterator[None]:
        self.begin(name)
        try:
            yield
        finally:
            self.end(name)

    def record_step(self, record: StepRecord) -> None:
        self.step = record.step
        self.emit(
            {
                "kind": fmt.STEP,
                "t": time.time_ns(),
                "step": record.step,
                "loss": record.loss,
                "tokens": record.tokens,
                "step_time_s": record.step_time_s,
            }
        )
        for listener in self.step_listeners:
            listener(record)
