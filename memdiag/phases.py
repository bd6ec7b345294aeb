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
from dataclasses import dataclass
from typing import Callable, Iterator

from memdiag.probes.device import DeviceProbe
from memdiag.probes.host import SelfStatusReader, reset_peak_rss
from memdiag.timeline import format as fmt

log = logging.getLogger(__name__)


@dataclass
class _Frame:
    name: str
    host_peak_bytes: int = 0
    device_peak_bytes: int | None = None


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
        self._emit = emit
        self._device = device
        self._warn_once = warn_once or (lambda key, message: log.warning(message))
        self._status = SelfStatusReader()
        self._stack: list[_Frame] = []
        self.step = 0
        self.step_listeners: list[Callable[[StepRecord], None]] = []
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

    def _fold_peaks(self) -> tuple[int, int | None]:
        host = self._status.read().hwm_bytes
        self._reset()
        device = self._device.read_and_reset_peak() if self._device else None
        for frame in self._stack:
            frame.host_peak_bytes = max(frame.host_peak_bytes, host)
            if device is not None:
                frame.device_peak_bytes = max(frame.device_peak_bytes or 0, device)
        return host, device

    def begin(self, name: str) -> None:
        self._fold_peaks()
        self._stack.append(_Frame(name))
        self._emit({"kind": fmt.PHASE_BEGIN, "t": time.time_ns(), "phase": name, "step": self.step})

    def end(self, name: str) -> None:
        self._fold_peaks()
        if not self._stack or self._stack[-1].name != name:
            self._warn_once(f"unbalanced:{name}", f"phase {name!r} ended while not innermost")
            return
        frame = self._stack.pop()
        self._emit(
            {
                "kind": fmt.PHASE_END,
                "t": time.time_ns(),
                "phase": name,
                "step": self.step,
                "host_peak_bytes": frame.host_peak_bytes,
                "device_peak_bytes": frame.device_peak_bytes,
            }
        )

    @contextmanager
    def phase_scope(self, name: str) -> Iterator[None]:
        self.begin(name)
        try:
            yield
        finally:
            self.end(name)

    def record_step(self, record: StepRecord) -> None:
        self.step = record.step
        self._emit(
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
