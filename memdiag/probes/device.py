"""Device memory of this rank: the torch CUDA allocator, NVML, or DeepSpeed's CPU accelerator.

Which one answers is decided once (``DeviceProbe.detect``) and written into the timeline
header as ``device_source``, so every figure says where it came from.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

SOURCE_CUDA = "torch.cuda allocator (memory_allocated/memory_reserved)"
SOURCE_CPU_ACCEL = "deepspeed cpu accelerator memory_allocated() (= process RSS, not a device)"


@dataclass(frozen=True, slots=True)
class DeviceMem:
    allocated_bytes: int
    reserved_bytes: int
    nvml_used_bytes: int | None = None
    """This process's memory on the device as NVML sees it (driver context included)."""


class DeviceProbe:
    """Reads device memory of one local device; never raises from ``read``."""

    def __init__(self, source: str, total_bytes: int | None, index: int | None = None):
        self.source = source
        self.total_bytes = total_bytes
        self.index = index
        self._nvml_handle = None
        self._status_reader = None
        self.nvml_error: str | None = None

    @classmethod
    def detect(cls, local_rank: int = 0) -> DeviceProbe | None:
        """CUDA when torch sees a device, DeepSpeed's CPU accelerator when selected, else None."""
        import torch

        if torch.cuda.is_available():
            index = local_rank % torch.cuda.device_count()
            total = torch.cuda.get_device_properties(index).total_memory
            probe = cls(SOURCE_CUDA, total, index)
            probe._init_nvml()
            return probe
        if os.environ.get("DS_ACCELERATOR") == "cpu":
            from memdiag.probes.host import read_meminfo

            return cls(SOURCE_CPU_ACCEL, read_meminfo().total_bytes)
        return None

    def _init_nvml(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            bus_id = _cuda_pci_bus_id(self.index)
            self._nvml_handle = (
                pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)
                if bus_id
                else pynvml.nvmlDeviceGetHandleByIndex(self.index)
            )
        except Exception as exc:  # NVML missing or refusing: one warning per run
            self.nvml_error = f"NVML unavailable: {exc}"

    def read(self, *, with_nvml: bool = True) -> DeviceMem:
        if self.source == SOURCE_CUDA:
            import torch

            allocated = torch.cuda.memory_allocated(self.index)
            reserved = torch.cuda.memory_reserved(self.index)
            nvml = self._nvml_process_used() if with_nvml else None
            return DeviceMem(allocated, reserved, nvml)
        # DeepSpeed's CPU accelerator answers memory_allocated() with psutil's RSS (~40 us with
        # psutil.Process() built per call); the same figure from /proc/self/status costs ~9 us
        used = self._status().read().rss_bytes
        return DeviceMem(used, used)

    def _status(self):
        if self._status_reader is None:
            from memdiag.probes.host import SelfStatusReader

            self._status_reader = SelfStatusReader()
        return self._status_reader

    @property
    def is_host_memory(self) -> bool:
        """The CPU accelerator: "device" memory is this process's RSS."""
        return self.source == SOURCE_CPU_ACCEL

    def read_and_reset_peak(self) -> int | None:
        """Peak allocated bytes since the last reset, then reset (exact on CUDA)."""
        if self.source != SOURCE_CUDA:
            return None
        import torch

        peak = torch.cuda.max_memory_allocated(self.index)
        torch.cuda.reset_peak_memory_stats(self.index)
        return peak

    def _nvml_process_used(self) -> int | None:
        if self._nvml_handle is None:
            return None
        try:
            import pynvml

            pid = os.getpid()
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(self._nvml_handle):
                if proc.pid == pid:
                    return proc.usedGpuMemory
        except Exception as exc:
            if self.nvml_error is None:
                self.nvml_error = f"NVML read failed: {exc}"
            self._nvml_handle = None
        return None


def _cuda_pci_bus_id(index: int | None) -> str | None:
    try:
        import torch

        props = torch.cuda.get_device_properties(index)
        return f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
    except Exception:
        return None
