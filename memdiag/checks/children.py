"""children: a rank whose child processes (DataLoader workers, compile workers, op builds) hold a
large share of the rank's host memory. The node watcher follows each rank's descendants; PSS
splits the pages a forked worker still shares with its rank, so a worker is charged only for what
it copied (a dataset held as Python objects is copied page by page as reference counts change)."""

from __future__ import annotations

import numpy as np

from memdiag.checks.finding import Finding
from memdiag.timeline.reader import Run
from memdiag.units import format_bytes

SHARE = 0.25
"""Children holding more than this share of a rank's memory (PSS, else RSS) are named."""
MIN_BYTES = 256 * 2**20
"""... and at least this much: a few small helpers are not worth a finding."""

FIX = (
    "fewer DataLoader workers (num_workers, --dataloader_num_workers), persistent_workers=True so they are not "
    "re-forked every epoch, a smaller prefetch_factor, and a dataset that maps its file (numpy.memmap, Arrow, "
    "datasets' memory-mapped tables) instead of holding Python objects each forked worker slowly copies"
)


def _peak(values: np.ndarray | None) -> float:
    if values is None or not len(values) or np.all(np.isnan(values)):
        return float("nan")
    return float(np.nanmax(values))


def check(run: Run) -> list[Finding]:
    findings = []
    for host, node in sorted(run.nodes.items()):
        for rank in sorted(node.rank_rss):
            children_pss, total_pss = _peak(node.rank_children_pss.get(rank)), _peak(node.rank_pss.get(rank))
            measure = "PSS"
            children, total = children_pss, total_pss
            if np.isnan(children) or np.isnan(total) or not total:
                measure, children, total = "RSS", _peak(node.rank_children_rss.get(rank)), _peak(node.rank_rss.get(rank))
            if np.isnan(children) or not total or children < MIN_BYTES or children / total < SHARE:
                continue
            roles = node.rank_children_roles.get(rank) or {}
            described = ", ".join(f"{count} {role}{'s' if count > 1 else ''}" for role, count in sorted(roles.items())) or "children"
            findings.append(Finding(
                id="children_memory",
                severity="warning",
                message=f"rank {rank} on {host}: its child processes ({described}) held up to {format_bytes(children)} "
                        f"({measure}), {children / total:.0%} of the rank's memory with them",
                evidence={"rank": rank, "host": host, "children_peak_bytes": int(children), "rank_with_children_peak_bytes": int(total),
                          "measure": measure, "roles": roles},
                fix=FIX,
                ranks=[rank],
            ))
    return findings
