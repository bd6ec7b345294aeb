"""Whole-file writes that a reader never sees half done, and that fail in one clear line."""

from __future__ import annotations

import os
from pathlib import Path

from memdiag.errors import MemdiagError
from memdiag.units import format_bytes


class WriteFailed(MemdiagError):
    """A file memdiag writes at the end of a run could not be written (full disk, quota, EIO)."""

    def __init__(self, path: Path, exc: OSError, size: int) -> None:
        free = free_bytes(path.parent)
        room = f"; {format_bytes(free)} free there" if free is not None else ""
        super().__init__(
            f"cannot write {path} ({exc.strerror or exc}): it needs {format_bytes(size)}{room}; "
            f"free some space and run `memdiag report {run_dir_of(path)}` to write it again"
        )
        self.path = path
        self.size = size


def run_dir_of(path: Path) -> Path:
    return path.parent.parent if path.parent.name == "nodes" else path.parent


def safe_name(text: str) -> str:
    """``text`` as a piece of a file name: letters, digits and ``-_.`` kept, the rest ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def free_bytes(directory: Path) -> int | None:
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write to ``path.tmp`` in the same directory, fsync, rename over ``path``."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise WriteFailed(path, exc, len(raw)) from None
