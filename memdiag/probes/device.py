"""Device memory of this rank: the torch CUDA allocator, NVML, or DeepSpeed's CPU accelerator.

Which one answers is decided once (``DeviceProbe.detect``) and written into the timeline
header as ``device_source``, so every figure says where it came from.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterable

log = logging.getLogger(__name__)

SOURCE_CUDA = "torch.cuda allocator (memory_allocated/memory_reserved)"
SOURCE_CPU_ACCEL = "deepspeed cpu accelerator memory_allocated() (= process RSS, not a device)"


@dataclass(frozen=True, slots=True)
class DeviceMem:
    allocated_bytes: int
    reserved_bytes: int
    nvml_used_bytes: int | None = None
    """This process's memory on the device as NVML sees it (driver context included)."""
    alloc_retries: int | None = None
    """cudaMalloc failures the caching allocator recovered from by freeing its cache (CUDA)."""
    ooms: int | None = None
    """Out-of-memory errors the allocator raised (CUDA)."""


class DeviceProbe:
    """Reads device memory of one local device; never raises from ``read``."""

    def __init__(self, source: str, total_bytes: int | None, index: int | None = None):
        self.source = source
        self.total_bytes = total_bytes
        self.index = index
        self._nvml_handle = None
        self._status_reader = None
        self.nvml_error: str | None = None
        self.nvml_scope = "process"
        """``process`` (NVML's figure for this PID) or ``device`` (the device's used memory, when
        NVML cannot show this process: said once in a warning)."""
        self.warn: Callable[[str, str], None] = lambda key, message: log.warning(message)
        """Set by the instrumentation to its warn-once (recorded in the timeline)."""
        self._ledger: PeakLedger | None = None

    @classmethod
    def detect(cls, local_rank: int = 0) -> DeviceProbe | None:
        """DeepSpeed's CPU accelerator when selected (``DS_ACCELERATOR=cpu``, honoured first: a
        CPU run on a GPU machine starts no CUDA or NVML), else CUDA when torch sees a device, else None."""
        if os.environ.get("DS_ACCELERATOR") == "cpu":
            from memdiag.probes.host import read_meminfo

            return cls(SOURCE_CPU_ACCEL, read_meminfo().total_bytes)
        import torch

        if torch.cuda.is_available():
            index = local_rank % torch.cuda.device_count()
            total = torch.cuda.get_device_properties(index).total_memory
            probe = cls(SOURCE_CUDA, total, index)
            probe._init_nvml()
            return probe
        return None

    def _init_nvml(self) -> None:
        """The NVML handle of this rank's device, by PCI bus id or UUID: never by the logical
        CUDA index, which CUDA_VISIBLE_DEVICES renumbers."""
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # NVML missing or refusing: one warning per run
            self.nvml_error = f"NVML unavailable ({exc}); NVML's per-process figure is not recorded"
            return
        self._nvml_handle, self.nvml_error = None, None
        for how, key in (("PCI bus id", _cuda_pci_bus_id(self.index)), ("UUID", _cuda_uuid(self.index))):
            if not key:
                continue
            try:
                getter = pynvml.nvmlDeviceGetHandleByPciBusId if how == "PCI bus id" else pynvml.nvmlDeviceGetHandleByUUID
                self._nvml_handle = getter(key)
                return
            except Exception as exc:
                self.nvml_error = f"NVML has no device with this rank's {how} {key} ({exc})"
        self.nvml_error = (self.nvml_error or "torch gives neither a PCI bus id nor a UUID for this device") + \
            "; NVML's per-process figure is not recorded"

    def bind(self, index: int | None) -> None:
        """The device the training process chose (the engine's, once it exists): the probe
        follows it when it differs from the one guessed from the local rank."""
        if self.source != SOURCE_CUDA or index is None or index == self.index:
            return
        import torch

        self.index = index
        self.total_bytes = torch.cuda.get_device_properties(index).total_memory
        self._init_nvml()
        if self.nvml_error:
            self.warn("nvml", self.nvml_error)

    def read(self, *, with_nvml: bool = True) -> DeviceMem:
        if self.source == SOURCE_CUDA:
            import torch

            # one call of the nested stats: memory_allocated() and memory_reserved() each build,
            # flatten and sort the whole dictionary under the allocator's lock
            allocated, reserved, retries, ooms = allocator_figures(torch.cuda.memory_stats_as_nested_dict(self.index))
            nvml = self._nvml_process_used() if with_nvml else None
            return DeviceMem(allocated, reserved, nvml, retries, ooms)
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

    def read_and_reset_peaks(self) -> tuple[int, int] | None:
        """(allocated, reserved) peaks since the last call (exact on CUDA), through a ledger that
        keeps them across anyone else's reset and keeps theirs across this one."""
        if self.source != SOURCE_CUDA:
            return None
        if self._ledger is None:
            import torch

            self._ledger = PeakLedger.over_torch_cuda(torch, self.index, self.warn)
        return self._ledger.take()

    def inactive_split_bytes(self) -> int | None:
        """Bytes of the allocator's cache in blocks split and partly free now (fragmentation); CUDA only."""
        if self.source != SOURCE_CUDA:
            return None
        import torch

        return inactive_split(torch.cuda.memory_stats_as_nested_dict(self.index))

    def nvml_used(self) -> int | None:
        """This process's memory on the device as NVML counts it (~100 us); None where NVML is off."""
        return self._nvml_process_used()

    def _nvml_process_used(self) -> int | None:
        if self._nvml_handle is None:
            return None
        try:
            import pynvml

            if self.nvml_scope == "device":
                return int(pynvml.nvmlDeviceGetMemoryInfo(self._nvml_handle).used)
            used, why = process_used(_running_processes(pynvml, self._nvml_handle), os.getpid())
            if why is None:
                return used
            if why == NO_PROCESS:
                return None  # this process has not touched the device yet
            # the device's own figure stands in, labelled: with one rank per device it is this
            # rank's plus whatever else runs there
            self.nvml_scope = "device"
            self.warn("nvml_scope", why + "; recording the device's used memory (nvmlDeviceGetMemoryInfo) instead, "
                      "which counts every process on this device")
            return int(pynvml.nvmlDeviceGetMemoryInfo(self._nvml_handle).used)
        except Exception as exc:
            self.warn("nvml_failed", f"NVML stopped answering ({exc}); NVML's figure is not recorded from here on")
            self._nvml_handle = None
        return None


def inactive_split(nested: dict) -> int:
    """``inactive_split_bytes`` now, from ``torch.cuda.memory_stats_as_nested_dict``."""
    return int(nested.get("inactive_split_bytes", {}).get("all", {}).get("current", 0))


def allocator_figures(nested: dict) -> tuple[int, int, int, int]:
    """(allocated, reserved, alloc retries, OOMs) from ``torch.cuda.memory_stats_as_nested_dict``."""
    def current(name: str) -> int:
        return int(((nested.get(name) or {}).get("all") or {}).get("current", 0))

    return current("allocated_bytes"), current("reserved_bytes"), int(nested.get("num_alloc_retries", 0)), \
        int(nested.get("num_ooms", 0))


def _running_processes(pynvml, handle) -> list:
    """The compute processes on a device: the newest query the driver has (nvidia-ml-py's
    unversioned call is the newest, _v3), then the older ones."""
    for name in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetComputeRunningProcesses_v2"):
        query = getattr(pynvml, name, None)
        if query is None:
            continue
        try:
            return list(query(handle))
        except pynvml.NVMLError_FunctionNotFound:
            continue
    raise RuntimeError("this driver answers no compute-process query")


def nvml_module() -> str | None:
    """Which pynvml answers, and its version: an old ``pynvml`` package shadows nvidia-ml-py's
    module of the same name, and releases before 12.535.77 misread current drivers' process lists."""
    try:
        import importlib.metadata

        import pynvml

        try:
            version = importlib.metadata.version("nvidia-ml-py")
        except importlib.metadata.PackageNotFoundError:
            version = "not nvidia-ml-py"
        return f"{pynvml.__file__} ({version})"
    except Exception as exc:
        return f"unavailable ({exc})"


NVML_INTERVAL_S = 0.1
"""NVML's per-process query costs ~100 us; 10 Hz is plenty for a figure that moves slowly."""


class ProcessNvml:
    """NVML's device memory per process, read by the node watcher for its ranks (``sampler=watcher``:
    out of the ranks, which keep only their allocator reads). One compute-process query per
    device per read; a PID's figure is summed over the devices (a rank's stray context on
    another device is its own memory too). A machine without NVML answers nothing, quietly."""

    def __init__(self, warn: Callable[[str, str], None], nvml=None) -> None:
        self.warn = warn
        self._nvml = nvml
        """The pynvml module (tests give a scripted one: no GPU here)."""
        self._handles: list | None = None
        self.off: str | None = None
        """Why nothing is read (NVML missing, no device, NVML stopped answering), or None."""
        self._said: set[str] = set()

    def started(self) -> bool:
        if self._handles is None and self.off is None:
            try:
                if self._nvml is None:
                    import pynvml

                    self._nvml = pynvml
                self._nvml.nvmlInit()
                self._handles = [self._nvml.nvmlDeviceGetHandleByIndex(i) for i in range(self._nvml.nvmlDeviceGetCount())]
            except Exception as exc:  # no driver here: a CPU machine, nothing to say
                self.off = f"NVML unavailable ({exc})"
            else:
                self.off = None if self._handles else "NVML lists no device"
        return self.off is None

    def used(self, pids: dict[int, int], on_device: set[int] = frozenset()) -> dict[int, int | None]:
        """Each rank's PID's device memory as NVML counts it, None where NVML lists it on no
        device. ``on_device``: the ranks whose allocator already holds memory; one of them
        missing from NVML's lists while others are listed says why, once."""
        if not pids or not self.started():
            return {}
        by_pid: dict[int, int] = {}
        listed: set[int] = set()
        try:
            for handle in self._handles:
                for proc in _running_processes(self._nvml, handle):
                    listed.add(proc.pid)
                    used = getattr(proc, "usedGpuMemory", None)
                    if used is not None:
                        by_pid[proc.pid] = by_pid.get(proc.pid, 0) + int(used)
        except Exception as exc:
            self.off = f"NVML stopped answering ({exc})"
            self.warn("nvml_failed", self.off + "; NVML's figure is not recorded from here on")
            return {}
        figures = {rank: by_pid.get(pid) for rank, pid in pids.items()}
        missing = sorted(rank for rank in on_device if rank in pids and pids[rank] not in listed)
        if missing and listed:
            self._once("nvml_pid_namespace", (
                f"NVML lists {len(listed)} process(es) ({', '.join(str(p) for p in sorted(listed)[:4])}) but not rank(s) "
                f"{', '.join(map(str, missing[:8]))} (PID(s) {', '.join(str(pids[r]) for r in missing[:8])}) that hold device "
                "memory: a container without the host's PID namespace shows host PIDs; run the job with the host's PID "
                "namespace (docker --pid=host, Kubernetes hostPID: true) to record NVML's per-process figure"))
        hidden = sorted(rank for rank, pid in pids.items() if pid in listed and pid not in by_pid)
        if hidden:
            self._once("nvml_hidden", f"NVML lists rank(s) {', '.join(map(str, hidden[:8]))} without a memory figure (a MIG "
                       "device, or a driver that hides it from unprivileged users): NVML's figure is not recorded for them")
        return figures

    def _once(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            self.warn(key, message)


NO_PROCESS = "NVML lists no process on this device"
"""``process_used``'s answer before this process has touched the device: not a reason to fall back."""


def process_used(processes: Iterable, pid: int) -> tuple[int | None, str | None]:
    """This PID's device memory from NVML's process list: (bytes, None), or (None, why)."""
    listed = list(processes)
    for proc in listed:
        if proc.pid == pid:
            used = getattr(proc, "usedGpuMemory", None)
            if used is None:
                return None, (f"NVML lists this process (PID {pid}) without a memory figure (a MIG device, or a "
                              "driver that hides it from unprivileged users)")
            return int(used), None
    if listed:
        pids = ", ".join(str(p.pid) for p in listed[:4])
        return None, (f"NVML lists {len(listed)} process(es) on this device ({pids}) but not this one (PID {pid}): a "
                      "container without the host's PID namespace shows host PIDs")
    return None, NO_PROCESS


def _cuda_uuid(index: int | None) -> str | None:
    try:
        import torch

        uuid = str(torch.cuda.get_device_properties(index).uuid)
        return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
    except Exception:
        return None


def _cuda_pci_bus_id(index: int | None) -> str | None:
    try:
        import torch

        props = torch.cuda.get_device_properties(index)
        return f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
    except Exception:
        return None


class PeakLedger:
    """Per-phase allocator peaks over one global counter that others reset too.

    torch keeps one peak counter per device; DeepSpeed's ``see_memory_usage(force=True)`` and
    ``runtime.utils.empty_cache`` reset it (ZeRO-3's optimizer calls them during
    ``deepspeed.initialize``), and a user may. memdiag wraps the reset and the two readers:
    a foreign reset first folds the counter into memdiag's pending phase peak (and is counted,
    ``foreign_resets``); memdiag's own reset at a phase boundary first folds the counter into what
    the user's readers answer, so ``max_memory_allocated``/``max_memory_reserved`` give what they
    would have without memdiag. ``read_peaks()`` gives (allocated, reserved) peaks of the counter;
    ``reset()`` resets it.
    """

    def __init__(self, read_peaks: Callable[[], tuple[int, int]], reset: Callable[[], None]) -> None:
        self._read_peaks = read_peaks
        self._reset = reset
        self._pending = (0, 0)
        """The highest (allocated, reserved) peaks of the counter's periods that others ended, since memdiag's last take."""
        self._user = (0, 0)
        """The highest (allocated, reserved) of the periods memdiag ended, since the user's last reset."""
        self.foreign_resets = 0

    def take(self) -> tuple[int, int]:
        """memdiag's phase boundary: the (allocated, reserved) peaks since the last one, then reset."""
        allocated, reserved = self._read_peaks()
        peaks = (max(self._pending[0], allocated), max(self._pending[1], reserved))
        self._user = (max(self._user[0], allocated), max(self._user[1], reserved))
        self._pending = (0, 0)
        self._reset()
        return peaks

    def foreign_reset(self) -> None:
        """Someone else resets the counter: keep its peaks for memdiag, and their view restarts."""
        allocated, reserved = self._read_peaks()
        self._pending = (max(self._pending[0], allocated), max(self._pending[1], reserved))
        self._user = (0, 0)
        self.foreign_resets += 1

    def users_max_allocated(self, counter: int) -> int:
        return max(self._user[0], counter)

    def users_max_reserved(self, counter: int) -> int:
        return max(self._user[1], counter)

    @classmethod
    def over_torch_cuda(cls, torch, index: int, warn: Callable[[str, str], None]) -> PeakLedger:
        """The ledger of CUDA device ``index``, its wrappers installed on ``torch.cuda`` and
        ``torch.cuda.memory`` (DeepSpeed's accelerator calls through them). Calls for another
        device pass through untouched."""
        memory = torch.cuda.memory
        original_reset = memory.reset_peak_memory_stats
        original_allocated = memory.max_memory_allocated
        original_reserved = memory.max_memory_reserved
        ledger = cls(lambda: (original_allocated(index), original_reserved(index)), lambda: original_reset(index))

        def ours(device) -> bool:
            try:
                return torch.cuda._utils._get_device_index(device, optional=True) == index
            except Exception:
                return False

        def reset_peak_memory_stats(device=None):
            if ours(device):
                ledger.foreign_reset()
                if ledger.foreign_resets == 1:
                    warn("foreign_peak_reset", "something reset the device's peak counter (DeepSpeed's see_memory_usage or "
                         "empty_cache, or the script): memdiag kept its phase peaks across it")
            return original_reset(device)

        def max_memory_allocated(device=None):
            value = original_allocated(device)
            return ledger.users_max_allocated(value) if ours(device) else value

        def max_memory_reserved(device=None):
            value = original_reserved(device)
            return ledger.users_max_reserved(value) if ours(device) else value

        for module in (torch.cuda, memory):
            module.reset_peak_memory_stats = reset_peak_memory_stats
            module.max_memory_allocated = max_memory_allocated
            module.max_memory_reserved = max_memory_reserved
        return ledger
