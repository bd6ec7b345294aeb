"""The memory cgroup of a process: usage, peak and limit, for cgroup v1 and v2."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
_UNLIMITED_V1 = 2**62  # v1 reports "no limit" as a page-rounded LONG_MAX


@dataclass(frozen=True, slots=True)
class CgroupMem:
    """One read of a memory cgroup; ``None`` where the file is absent."""

    version: int
    usage_bytes: int | None
    peak_bytes: int | None
    limit_bytes: int | None
    """``None`` when unlimited."""


@dataclass(frozen=True, slots=True)
class CgroupFiles:
    version: int
    usage: Path
    peak: Path
    limit: Path


def parse_proc_cgroup(text: str) -> tuple[int, str] | None:
    """``/proc/<pid>/cgroup`` -> (version, path) of the memory controller, or None."""
    v2_path = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if "memory" in controllers.split(","):
            return 1, path
        if controllers == "":
            v2_path = path
    return (2, v2_path) if v2_path is not None else None


def locate(pid: int | str = "self", root: Path = CGROUP_ROOT) -> CgroupFiles | None:
    """Find the memory cgroup files of ``pid``; inside a container the cgroup path is often
    not visible under the mount, so fall back to the mount's root (the container's own)."""
    try:
        found = parse_proc_cgroup(Path(f"/proc/{pid}/cgroup").read_text())
    except OSError:
        return None
    if found is None:
        return None
    version, path = found
    if version == 1:
        bases = [root / "memory" / path.lstrip("/"), root / "memory"]
        names = ("memory.usage_in_bytes", "memory.max_usage_in_bytes", "memory.limit_in_bytes")
    else:
        bases = [root / path.lstrip("/"), root]
        names = ("memory.current", "memory.peak", "memory.max")
    for base in bases:
        if (base / names[0]).exists():
            return CgroupFiles(version, *(base / n for n in names))
    return None


def parse_limit(text: str) -> int | None:
    value = text.strip()
    if value == "max":
        return None
    number = int(value)
    return None if number >= _UNLIMITED_V1 else number


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def read(files: CgroupFiles) -> CgroupMem:
    try:
        limit = parse_limit(files.limit.read_text())
    except (OSError, ValueError):
        limit = None
    return CgroupMem(
        version=files.version,
        usage_bytes=_read_int(files.usage),
        peak_bytes=_read_int(files.peak),
        limit_bytes=limit,
    )
