"""glibc's own accounting of the heap: what it holds freed but has not returned to the OS.

``mallinfo2()`` (glibc >= 2.33; ``mallinfo()`` before, which wraps at 2 GiB) walks the arenas,
so it costs more than a /proc read: memdiag calls it at phase ends that matter (after
``deepspeed.initialize``), not per sample. ``None`` where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MallocStats:
    arena_bytes: int
    """Non-mmapped heap obtained from the OS (all arenas)."""
    mmap_bytes: int
    """Chunks served by mmap (returned to the OS as soon as they are freed)."""
    in_use_bytes: int
    free_bytes: int
    """Freed chunks glibc keeps in its arenas: resident, counted in RSS, used by nothing."""
    top_releasable_bytes: int


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"
    )]


class _MallInfo(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name, _ in _MallInfo2._fields_]


def _libc():
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


_LIBC = _libc()


def read_malloc_stats() -> MallocStats | None:
    if _LIBC is None:
        return None
    if hasattr(_LIBC, "mallinfo2"):
        _LIBC.mallinfo2.restype = _MallInfo2
        info = _LIBC.mallinfo2()
    elif hasattr(_LIBC, "mallinfo"):
        _LIBC.mallinfo.restype = _MallInfo
        info = _LIBC.mallinfo()
    else:
        return None
    return MallocStats(
        arena_bytes=int(info.arena),
        mmap_bytes=int(info.hblkhd),
        in_use_bytes=int(info.uordblks),
        free_bytes=int(info.fordblks),
        top_releasable_bytes=int(info.keepcost),
    )


def malloc_trim() -> bool:
    """Return freed heap pages to the OS (``malloc_trim(0)``); False where unavailable."""
    if _LIBC is None or not hasattr(_LIBC, "malloc_trim"):
        return False
    return bool(_LIBC.malloc_trim(0))


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def set_mmap_threshold(num_bytes: int) -> bool:
    """Serve allocations of at least ``num_bytes`` with mmap, so freeing them returns the
    memory at once (this also turns off glibc's dynamic threshold, which otherwise climbs to
    32 MiB after the first large free and keeps later large buffers in the heap)."""
    if _LIBC is None or not hasattr(_LIBC, "mallopt"):
        return False
    return bool(_LIBC.mallopt(M_MMAP_THRESHOLD, int(num_bytes)))
