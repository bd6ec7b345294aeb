"""The sampling budget: every sample where memory moves (loading, initialisation, saving, the
training loop's first ``sample.full_rate_s``), and after that, per ``sample.steady_interval_s``
window, only the samples that bound it. A spike inside a window survives as its window's
highest sample; every phase peak stays exact from the boundaries (VmHWM, the CUDA ledger).

One budget serves every writer of samples: a rank's own sampler thread, and the node watcher
for the ranks it samples from outside (``sampler=watcher``) and for its node samples."""

from __future__ import annotations

from collections.abc import Callable, Iterable

TRAINING_PHASES = frozenset({"", "forward", "backward", "step", "optimizer_step"})
"""The training loop's phases ("" between steps): where, after ``full_rate_s``, a window's
bounding samples stand for it. Loading, initialisation, saving and resuming stay at full rate."""

Roles = Callable[[dict], Iterable[tuple[str, float | None]]]
"""What a sample can bound: (role, value) pairs; the window keeps the sample with the highest
value of each role (a lowest is a role of the negated value). None: the sample has no such value."""


class SteadyClock:
    """When a rank's training loop has run for ``full_rate_s`` (its first step done, so the
    initialisation is behind): from then on, while it stays in the loop, it is steady."""

    def __init__(self, full_rate_s: float, steady_interval_s: float) -> None:
        self.full_rate_s = full_rate_s
        self.steady_interval_s = steady_interval_s
        self._training_since: float | None = None

    def steady(self, now: float, phase: str, step: int) -> bool:
        if not self.steady_interval_s or step < 1 or phase not in TRAINING_PHASES:
            return False
        if self._training_since is None:
            self._training_since = now
        return now - self._training_since >= self.full_rate_s


class WindowBudget:
    """Samples in, the samples to write out: each as it comes while not steady; while steady,
    per window of ``interval_s`` only the samples holding a role's extreme, in time order."""

    def __init__(self, interval_s: float, roles: Roles) -> None:
        self.interval_s = interval_s
        self.roles = roles
        self._envelope: dict[str, tuple[float, dict]] = {}
        self._started = 0.0

    def take(self, sample: dict, now: float, steady: bool) -> list[dict]:
        if not steady:
            return [*self.close(), sample]
        if not self._envelope:
            self._started = now
        for role, value in self.roles(sample):
            if value is not None and (role not in self._envelope or value > self._envelope[role][0]):
                self._envelope[role] = (value, sample)
        if not self._envelope:  # a sample with no figure to bound: nothing else stands for it
            return [*self.close(), sample]
        if now - self._started >= self.interval_s:
            return self.close()
        return []

    def close(self) -> list[dict]:
        """The open window's bounding samples (each once), in time order."""
        kept = {id(sample): sample for _, sample in self._envelope.values()}
        self._envelope = {}
        return sorted(kept.values(), key=lambda s: s["t"])


def rank_roles(sample: dict) -> Iterable[tuple[str, float | None]]:
    """A rank's sample bounds its RSS from above and below, and its device figures (the
    allocator's, NVML's) from above."""
    rss = sample.get("rss_bytes")
    yield "rss_max", rss
    yield "rss_min", None if rss is None else -rss
    yield "device_max", sample.get("device_allocated_bytes")
    yield "nvml_max", sample.get("nvml_used_bytes")


def device_roles(point: dict) -> Iterable[tuple[str, float | None]]:
    """A device point (a peak since the previous boundary) bounds the device figure from above
    and below (the window's highest peak and the trough between steps)."""
    allocated = point.get("device_allocated_bytes")
    yield "device_max", allocated
    yield "device_min", None if allocated is None else -allocated


def node_roles(sample: dict) -> Iterable[tuple[str, float | None]]:
    """A node sample bounds the ranks' total (what the guard and the forecast read) from above
    and below, MemAvailable from below, cgroup usage from above, and keeps the highest of the
    once-a-second PSS readings (the children's memory)."""
    ranks = sample.get("ranks") or {}
    total = sum(e.get("rss_bytes", 0) + e.get("children_rss_bytes", 0) for e in ranks.values()) if ranks else None
    yield "ranks_max", total
    yield "ranks_min", None if total is None else -total
    available = sample.get("mem_available_bytes")
    yield "available_min", None if available is None else -available
    yield "cgroup_max", sample.get("cgroup_usage_bytes")
    pss = [e["pss_bytes"] for e in ranks.values() if "pss_bytes" in e]
    yield "pss_max", sum(pss) if pss else None
