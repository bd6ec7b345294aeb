"""Host memory of a process and of the machine, read straight from /proc.

psutil's ``memory_full_info`` costs milliseconds in a process with torch loaded; these readers
parse the kernel's text directly and keep the file descriptor of the hot one open.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

_KB = 1024


@dataclass(frozen=True, slots=True)
class ProcMem:
    """Resident memory of one process (``/proc/<pid>/status``)."""

    rss_bytes: int
    hwm_bytes: int
    """Peak RSS since process start or the last ``clear_refs`` reset (VmHWM)."""


@dataclass(frozen=True, slots=True)
class SystemMem:
    """Machine-wide memory (``/proc/meminfo``)."""

    total_bytes: int
    available_bytes: int


def _kb_field(text: str, key: str) -> int | None:
    start = text.find(key)
    if start < 0:
        return None
    end = text.find("\n", start)
    fields = text[start + len(key) : end if end >= 0 else None].split()
    return int(fields[0]) * _KB if fields else None


def parse_proc_status(text: str) -> ProcMem:
    """Parse ``/proc/<pid>/status``; a kernel thread without VmRSS parses as zero."""
    return ProcMem(
        rss_bytes=_kb_field(text, "VmRSS:") or 0,
        hwm_bytes=_kb_field(text, "VmHWM:") or 0,
    )


def parse_meminfo(text: str) -> SystemMem:
    """Parse ``/proc/meminfo``."""
    total = _kb_field(text, "MemTotal:")
    available = _kb_field(text, "MemAvailable:")
    if total is None or available is None:
        raise ValueError("meminfo lacks MemTotal or MemAvailable")
    return SystemMem(total_bytes=total, available_bytes=available)


def parse_smaps_rollup_pss(text: str) -> int:
    """PSS in bytes from ``/proc/<pid>/smaps_rollup`` (shared pages split among sharers)."""
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * _KB
    raise ValueError("smaps_rollup lacks Pss")


def read_proc_status(pid: int | str = "self") -> ProcMem:
    with open(f"/proc/{pid}/status") as f:
        return parse_proc_status(f.read())


def read_meminfo() -> SystemMem:
    with open("/proc/meminfo") as f:
        return parse_meminfo(f.read())


def read_pss_bytes(pid: int | str = "self") -> int:
    """``/proc/<pid>/smaps_rollup``: costs ~0.4 ms, so callers read it at a low rate."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return parse_smaps_rollup_pss(f.read())


class SelfStatusReader:
    """Re-reads ``/proc/<pid>/status`` (this process's by default) through one open descriptor
    (no open/close per sample). Reading another process's raises ``OSError`` once it has exited."""

    def __init__(self, pid: int | str = "self") -> None:
        self._fd = os.open(f"/proc/{pid}/status", os.O_RDONLY)

    def read(self) -> ProcMem:
        return parse_proc_status(os.pread(self._fd, 8192, 0).decode("ascii", "replace"))

    def close(self) -> None:
        os.close(self._fd)


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0).

    Raises ``OSError`` where the kernel or a sandbox refuses; callers fall back to an
    un-reset VmHWM and say so once.
    """
    fd = os.open("/proc/self/clear_refs", os.O_WRONLY)
    try:
        os.write(fd, b"5")
    finally:
        os.close(fd)
