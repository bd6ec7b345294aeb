"""Live metrics of one node for a cluster's Prometheus, served by the node watcher.

Named the way the node exporter and the DCGM exporter name theirs (``_bytes`` units, gauges,
one series per rank) and labelled ``job`` (the run), ``node`` and ``rank``, so a Grafana
dashboard can put them beside ``node_memory_MemAvailable_bytes`` and ``DCGM_FI_DEV_FB_USED``.
Host figures are the node watcher's own samples (the values it writes into the node timeline,
set from the same record); phase, step and device figures are the ranks' latest records, read
incrementally from their timeline files once a second. Where a cluster runs node_exporter, its
textfile collector directory is the other sink (``metrics_textfile=DIR``).

Metrics are never a reason to stop training: a port that cannot be bound or a textfile that
cannot be written is one warning in the node timeline, and the run goes on.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server, write_to_textfile
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

from memdiag.files import safe_name
from memdiag.rankstate import DEVICE_FIGURES, RankFollowers

FOLLOW_INTERVAL_S = 1.0
FORECAST_WINDOW_S = 60.0
"""The host-limit forecast extrapolates the node's rank memory over this last window."""


RANK_GAUGES = (
    ("memdiag_host_rss_bytes", "Resident set size of the rank's process (VmRSS)", "rss_bytes"),
    ("memdiag_host_rss_peak_bytes", "Highest VmRSS of the rank the node watcher has seen", "rss_peak_bytes"),
    ("memdiag_host_children_rss_bytes", "RSS of the rank's child processes (DataLoader workers, compilers)",
     "children_rss_bytes"),
    ("memdiag_host_pss_bytes", "Proportional set size of the rank with its children (read once a second)", "pss_bytes"),
    ("memdiag_device_allocated_bytes", "Device memory the rank's allocator has handed out", "device_allocated_bytes"),
    ("memdiag_device_reserved_bytes", "Device memory the rank's caching allocator holds", "device_reserved_bytes"),
    ("memdiag_device_nvml_used_bytes", "Device memory NVML counts for the rank's process", "nvml_used_bytes"),
    ("memdiag_step", "The rank's current optimizer step", "step"),
)
NODE_GAUGES = (
    ("memdiag_node_ranks_rss_bytes", "The node's ranks with their children, summed (what the guard watches)", "ranks_rss_bytes"),
    ("memdiag_node_memory_available_bytes", "MemAvailable of the node", "mem_available_bytes"),
    ("memdiag_node_host_limit_bytes", "The run's host RAM limit per node", "limit_bytes"),
    ("memdiag_guard_line_bytes", "Where memdiag's guard stops the job (guard.fraction of the limit)", "guard_line_bytes"),
    ("memdiag_guard_fired", "1 once the guard has stopped the job", "guard_fired"),
    ("memdiag_node_seconds_to_host_limit", f"Seconds until the ranks reach the host limit at their growth over the last "
     f"{FORECAST_WINDOW_S:g} s (+Inf when not growing)", "seconds_to_limit"),
    ("memdiag_sample_timestamp_seconds", "When the node watcher took the sample these figures come from", "t_s"),
)


class NodeMetrics:
    """The node's metrics as one snapshot, replaced whole by ``update(sample)`` after each watcher
    sample, so a scrape never mixes two samples; ranks that have ended drop out with the sample."""

    def __init__(self, run_dir: Path, job: str, node: str, *, port: int | None, textfile_dir: Path | None,
                 limit_bytes: int | None, guard_fraction: float | None, warn: Callable[[str, str], None],
                 followers: RankFollowers | None = None) -> None:
        self.run_dir, self.job, self.node, self.warn = Path(run_dir), job, node, warn
        self.limit_bytes, self.guard_fraction = limit_bytes, guard_fraction
        self.registry = CollectorRegistry()
        self.registry.register(self)
        self._snapshot: tuple[dict, dict[str, dict]] = ({}, {})
        self._peaks: dict[str, int] = {}
        self._history: deque[tuple[float, int]] = deque()
        self.followers = followers or RankFollowers(run_dir)
        self._ranks_state: dict[str, dict] = {}
        self._next_follow = 0.0
        self._next_textfile = 0.0
        self.url: str | None = None
        self.port: int | None = None
        if port is not None:
            try:
                server, _ = start_http_server(port, registry=self.registry)
                self.port = server.server_port
                self.url = f"http://{node}:{self.port}/metrics"
            except OSError as exc:
                warn("metrics_port", f"metrics endpoint not served: port {port} cannot be bound ({exc}); the run goes on")
        self.textfile = Path(textfile_dir) / f"memdiag_{safe_name(job) or 'run'}_{safe_name(node)}.prom" if textfile_dir else None

    def collect(self):
        """prometheus_client's collector protocol: the families of the current snapshot."""
        node, ranks = self._snapshot
        for name, doc, key in NODE_GAUGES:
            family = GaugeMetricFamily(name, doc, labels=("job", "node"))
            if node.get(key) is not None:
                family.add_metric((self.job, self.node), node[key])
            yield family
        for name, doc, key in RANK_GAUGES:
            family = GaugeMetricFamily(name, doc, labels=("job", "node", "rank"))
            for rank, figures in ranks.items():
                if figures.get(key) is not None:
                    family.add_metric((self.job, self.node, rank), figures[key])
            yield family
        phase = InfoMetricFamily("memdiag_phase", "The rank's current phase", labels=("job", "node", "rank"))
        for rank, figures in ranks.items():
            if figures.get("phase"):
                phase.add_metric((self.job, self.node, rank), {"phase": str(figures["phase"])})
        yield phase

    def update(self, sample: dict, guard_fired: bool) -> None:
        now = time.monotonic()
        if now >= self._next_follow:
            self._next_follow = now + FOLLOW_INTERVAL_S
            self._follow(sample.get("ranks", {}))
        t_s = sample["t"] / 1e9
        ranks: dict[str, dict] = {}
        total = 0
        for rank, entry in sample.get("ranks", {}).items():
            rss = entry["rss_bytes"]
            self._peaks[rank] = max(self._peaks.get(rank, 0), rss)
            ranks[rank] = {**self._ranks_state.get(rank, {}), "rss_bytes": rss, "rss_peak_bytes": self._peaks[rank],
                           "children_rss_bytes": entry.get("children_rss_bytes", 0)}
            if "pss_bytes" in entry:
                self._ranks_state.setdefault(rank, {})["pss_bytes"] = entry["pss_bytes"]
                ranks[rank]["pss_bytes"] = entry["pss_bytes"]
            total += rss + entry.get("children_rss_bytes", 0)
        node = {
            "ranks_rss_bytes": total, "mem_available_bytes": sample.get("mem_available_bytes"),
            "limit_bytes": self.limit_bytes,
            "guard_line_bytes": self.guard_fraction * self.limit_bytes if self.limit_bytes and self.guard_fraction else None,
            "guard_fired": 1 if guard_fired else 0, "seconds_to_limit": self._seconds_to_limit(t_s, total), "t_s": t_s,
        }
        self._snapshot = (node, ranks)  # one assignment: a scrape sees this sample or the last, never a mix
        if self.textfile is not None and now >= self._next_textfile:
            self._next_textfile = now + FOLLOW_INTERVAL_S
            self.write_textfile()

    def _seconds_to_limit(self, t_s: float, total: int) -> float:
        self._history.append((t_s, total))
        while self._history and self._history[0][0] < t_s - FORECAST_WINDOW_S:
            self._history.popleft()
        if not self.limit_bytes:
            return float("inf")
        if total >= self.limit_bytes:
            return 0.0
        (t0, m0), (t1, m1) = self._history[0], self._history[-1]
        if t1 <= t0 or m1 <= m0:
            return float("inf")
        return (self.limit_bytes - total) / ((m1 - m0) / (t1 - t0))

    def _follow(self, ranks: dict) -> None:
        """The latest phase, step and device figures of each local rank, from its timeline file."""
        states = self.followers.refresh(ranks)
        for rank in ranks:
            state = states[int(rank)]
            figures = {name: state.figures[name] for name in DEVICE_FIGURES if name in state.figures}
            self._ranks_state.setdefault(rank, {}).update(figures, phase=state.phase, step=state.step)

    def write_textfile(self) -> None:
        """The node exporter's textfile collector reads whole files: written to .tmp, then renamed."""
        if self.textfile is None:
            return
        try:
            write_to_textfile(str(self.textfile), self.registry)
        except OSError as exc:
            self.warn("metrics_textfile", f"metrics not written to {self.textfile} ({exc}); the run goes on")
            self.textfile = None

    def close(self) -> None:
        self.write_textfile()


def job_name(run_dir: Path) -> str:
    """The ``job`` label: the run directory's name under its case (``baichuan2_13b/<time>-1x2``)."""
    run_dir = Path(run_dir).resolve()
    return f"{run_dir.parent.name}/{run_dir.name}"


