"""The OOM guard inside the node watcher: stop the job cleanly, with evidence, before the
kernel's OOM killer does it without any.

It fires when the node's ranks together (RSS, children included) pass ``fraction`` of the host
limit, when MemAvailable falls below ``min_available_bytes``, or when the memory cgroup's usage
passes ``fraction`` of its limit. Then it takes a py-spy stack dump of every rank, writes a
``guard`` event, sends SIGTERM to every rank (their timelines flush on it) and SIGKILL to those
still alive after ``grace_s``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from memdiag.settings import BY_FIELD
from memdiag.units import format_bytes


@dataclass(frozen=True, kw_only=True)
class GuardConfig:
    limit_bytes: int | None
    """Host RAM the node's ranks may use together; ``None``: only MemAvailable/cgroup apply."""
    # defaults and docs: the settings guard.fraction, guard.min_available, guard.grace_s
    fraction: float = BY_FIELD["guard_fraction"].default
    min_available_bytes: int = BY_FIELD["guard_min_available_bytes"].default
    grace_s: float = BY_FIELD["guard_grace_s"].default

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"guard fraction={self.fraction} must be in (0, 1]")


def guard_reason(config: GuardConfig, sample: dict) -> str | None:
    """Why this node sample must stop the job, or None. Pure: tested on literal samples."""
    ranks_rss = sum(r["rss_bytes"] + r.get("children_rss_bytes", 0) for r in sample.get("ranks", {}).values())
    if config.limit_bytes and ranks_rss > config.fraction * config.limit_bytes:
        return (
            f"the ranks hold {format_bytes(ranks_rss)} of host RAM, past {config.fraction:.0%} of the "
            f"{format_bytes(config.limit_bytes)} limit"
        )
    available = sample.get("mem_available_bytes")
    if config.min_available_bytes and available is not None and available < config.min_available_bytes:
        return f"MemAvailable fell to {format_bytes(available)} (guard at {format_bytes(config.min_available_bytes)})"
    usage, limit = sample.get("cgroup_usage_bytes"), sample.get("cgroup_limit_bytes")
    if usage is not None and limit and usage > config.fraction * limit:
        return f"the memory cgroup uses {format_bytes(usage)} of its {format_bytes(limit)} limit"
    return None


def py_spy_dump(pid: int, out: Path, timeout_s: float = 15.0) -> str:
    """Stack of every thread of ``pid`` through ``py-spy dump``; the text also lands in ``out``."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    try:
        result = subprocess.run([exe, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=timeout_s)
        text = result.stdout or result.stderr
    except (OSError, subprocess.TimeoutExpired) as exc:
        text = f"py-spy dump failed: {exc!r}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text
