"""Byte sizes: one documented meaning for every suffix.

``K``/``M``/``G``/``T`` and ``KiB``/``MiB``/``GiB``/``TiB`` are binary (powers of 1024), as
memory is sold and reported by ``free -g`` and ``/proc/meminfo``; ``KB``/``MB``/``GB``/``TB``
are decimal (powers of 1000), as disks are. A bare number is bytes.
"""

from __future__ import annotations

import re

from memdiag.errors import UsageError

_BINARY = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_DECIMAL = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")
ACCEPTED_FORMS = "a number with K, M, G, T (or KiB, MiB, GiB, TiB; binary) or KB, MB, GB, TB (decimal), e.g. 500G"


def parse_size(text: str | int | float, *, name: str = "size") -> int:
    """``"500G"`` -> 536870912000. Raises ``UsageError`` naming ``name`` and the bad token."""
    if isinstance(text, bool):
        raise UsageError(f"{name}={text!r} is not a size; use {ACCEPTED_FORMS}")
    if isinstance(text, (int, float)):
        if text < 0:
            raise UsageError(f"{name}={text} is negative; use {ACCEPTED_FORMS}")
        return int(text)
    if str(text).strip().startswith("-"):
        raise UsageError(f"{name}={text!r} is negative; use {ACCEPTED_FORMS}")
    match = _SIZE_RE.match(str(text))
    if not match:
        raise UsageError(f"{name}={text!r} is not a size; use {ACCEPTED_FORMS}")
    number, suffix = float(match.group(1)), match.group(2).upper()
    if suffix.endswith("IB"):
        suffix = suffix[:-2]
    elif suffix == "B":
        suffix = ""
    factor = _BINARY.get(suffix) or _DECIMAL.get(suffix)
    if factor is None:
        raise UsageError(
            f"{name}={text!r} has an unknown unit {match.group(2)!r}; use {ACCEPTED_FORMS}"
        )
    return int(number * factor)


def format_bytes(num_bytes: float | None, *, digits: int = 2) -> str:
    """Binary units for display: ``format_bytes(3 * 2**30) == "3.00 GiB"``."""
    if num_bytes is None:
        return "n/a"
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{int(value)} B" if unit == "B" else f"{value:.{digits}f} {unit}"


def gib(num_bytes: float) -> float:
    return num_bytes / 2**30
