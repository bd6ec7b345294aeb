"""``memdiag top [RUN_DIR]``: a live terminal view of a run, in the style of nvitop.

It reads the run directory (so it works on any node that sees it, and never touches the job):
each timeline file is followed from where the last refresh stopped, so a refresh costs what was
written since, not the whole run. Per node and per rank: host RSS and device memory now and at
their peak, the current phase, step and loss; the node's available memory against the host
limit, the load-phase forecast, and the findings once the run has them.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from memdiag.errors import UsageError
from memdiag.timeline import format as fmt
from memdiag.timeline.reader import Follower
from memdiag.units import format_bytes

FORECAST_RANKS = (8, 16)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("top", help="watch a run live: per rank and node memory, phase, step, forecast")
    parser.add_argument("run_dir", nargs="?", type=Path, metavar="RUN_DIR", help="default: the newest run under --reports-dir")
    parser.add_argument("--reports-dir", type=Path, default=Path("reports"))
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    parser.add_argument("--once", action="store_true", help="print one view and exit")


def newest_run(reports: Path) -> Path:
    runs = [p.parent for p in reports.glob("*/*/run.json")]
    if not runs:
        raise UsageError(f"no runs under {reports}: give RUN_DIR, or --reports-dir where `memdiag run` writes")
    return max(runs, key=lambda p: (p / "run.json").stat().st_mtime)


@dataclass
class RankView:
    rank: int
    host: str = "?"
    phases: list[str] = field(default_factory=list)
    step: int = 0
    loss: float | None = None
    rss_now: float | None = None
    rss_peak: float = 0.0
    device_now: float | None = None
    device_peak: float = 0.0
    load_peak: int | None = None


@dataclass
class NodeView:
    host: str
    available: int | None = None
    total: int | None = None
    ranks_rss: dict[str, int] = field(default_factory=dict)
    peak_sum: int = 0
    metrics_url: str | None = None


class RunWatch:
    def __init__(self, run_dir: Path) -> None:
        if not (run_dir / fmt.RUN_JSON).exists() and not (run_dir / fmt.TIMELINE_DIR).is_dir():
            raise UsageError(f"{run_dir} is not a run directory (no run.json, no timeline/); give one `memdiag run` made")
        self.run_dir = run_dir
        self.followers: dict[Path, Follower] = {}
        self.ranks: dict[int, RankView] = {}
        self.nodes: dict[str, NodeView] = {}
        self.spec: dict = {}

    def refresh(self) -> None:
        try:
            self.spec = json.loads((self.run_dir / fmt.RUN_JSON).read_text())
        except (OSError, ValueError):
            pass
        for path in sorted((self.run_dir / fmt.TIMELINE_DIR).glob("*.jsonl")):
            follower = self.followers.setdefault(path, Follower(path))
            records = follower.new_records()
            if follower.refused is not None:  # shown by unreadable(); an empty row would only mislead
                continue
            if path.name.startswith("rank-"):
                try:
                    rank = int(path.stem.split("-", 1)[1])
                except ValueError:
                    continue
                self._rank(self.ranks.setdefault(rank, RankView(rank)), records)
            elif path.name.startswith("node-"):
                host = path.stem.split("-", 1)[1]
                self._node(self.nodes.setdefault(host, NodeView(host)), records)
                for r in records:  # sampler=watcher: the ranks' host figures are in the node file
                    if r.get("kind") == fmt.RANK_SAMPLES and r["rank"] in self.ranks and r["rss_bytes"]:
                        view = self.ranks[r["rank"]]
                        view.rss_now = r["rss_bytes"][-1]
                        view.rss_peak = max(view.rss_peak, max(r["rss_bytes"]))

    @staticmethod
    def _rank(view: RankView, records: list[dict]) -> None:
        for r in records:
            kind = r.get("kind")
            if kind == fmt.HEADER:
                view.host = str(r.get("host", "?"))
            elif kind == fmt.PHASE_BEGIN:
                view.phases.append(str(r.get("phase")))
            elif kind == fmt.PHASE_END:
                if view.phases and view.phases[-1] == r.get("phase"):
                    view.phases.pop()
                if r.get("phase") == "load" and isinstance(r.get("host_peak_bytes"), int):
                    view.load_peak = r["host_peak_bytes"]
                if isinstance(r.get("host_peak_bytes"), int):
                    view.rss_peak = max(view.rss_peak, r["host_peak_bytes"])
            elif kind == fmt.STEP:
                view.step = int(r.get("step") or view.step)
                view.loss = r.get("loss", view.loss)
            elif kind in (fmt.SAMPLES, fmt.SAMPLE):
                rss = [v for v in fmt.record_values(r, "rss_bytes") if isinstance(v, int | float)]
                if rss:
                    view.rss_now = rss[-1]
                    view.rss_peak = max(view.rss_peak, max(rss))
                device = [v for v in fmt.record_values(r, "device_allocated_bytes") if isinstance(v, int | float)]
                if device:
                    view.device_now = device[-1]
                    view.device_peak = max(view.device_peak, max(device))

    @staticmethod
    def _node(view: NodeView, records: list[dict]) -> None:
        for r in records:
            if r.get("kind") == "header" and r.get("metrics_url"):
                view.metrics_url = r["metrics_url"]
            if r.get("kind") != fmt.SAMPLE:
                continue
            view.available = r.get("mem_available_bytes", view.available)
            view.total = r.get("mem_total_bytes", view.total)
            ranks = r.get("ranks") or {}
            view.ranks_rss = {k: e.get("rss_bytes", 0) + e.get("children_rss_bytes", 0) for k, e in ranks.items() if isinstance(e, dict)}
            view.peak_sum = max(view.peak_sum, sum(view.ranks_rss.values()))

    def unreadable(self) -> list[str]:
        """Files the reader refused (an unknown format version): said on screen, not raised,
        so the view of the other files goes on."""
        return [f.refused for f in self.followers.values() if f.refused is not None]

    def forecast(self) -> str | None:
        peaks = [v.load_peak for v in self.ranks.values() if v.load_peak]
        limit = self.spec.get("host_limit_bytes")
        if not peaks or not limit:
            return None
        per_rank = max(peaks)
        parts = [f"{k} ranks ~{format_bytes(k * per_rank)}{' OVER' if k * per_rank > limit else ''}" for k in FORECAST_RANKS]
        return f"load peak {format_bytes(per_rank)} a rank: a node of " + ", ".join(parts) + f" (limit {format_bytes(limit)})"

    def findings(self) -> list[str]:
        try:
            found = json.loads((self.run_dir / "findings.json").read_text())
        except (OSError, ValueError):
            return []
        return [f"[{f.get('severity')}] {f.get('id')}: {f.get('message')}" for f in found if f.get("severity") in ("error", "warning")]


def _figure(value, ended: bool) -> str:
    if value is None:
        return "-" if ended else "waiting"
    return format_bytes(value)


def render(watch: RunWatch):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    spec = watch.spec
    what = " ".join(spec["command"]) if spec.get("command") else f"{spec.get('case', '?')} {spec.get('layout', '')}"
    header = Text(f"memdiag top  {watch.run_dir}  [{spec.get('status', '?')}]  {what}", style="bold")
    parts = [header]
    limit = spec.get("host_limit_bytes")
    ended = spec.get("status") not in (None, "running")
    hosts = sorted({v.host for v in watch.ranks.values()} | set(watch.nodes))
    if not hosts:
        parts.append(Text("the run has ended without a sample" if ended else "waiting for the first sample ..."))
    for host in hosts:
        node = watch.nodes.get(host)
        if node is None:
            line = f"node {host}"
        elif ended:  # the processes are gone: what they held last is not "now"
            line = f"node {host}: ended; ranks peaked at {format_bytes(node.peak_sum)}"
        else:
            line = f"node {host}: ranks now {format_bytes(sum(node.ranks_rss.values()))}, peak {format_bytes(node.peak_sum)}"
        if node and node.available is not None and not ended:
            line += f"; MemAvailable {format_bytes(node.available)} of {format_bytes(node.total)}"
        if limit:
            line += f"; host limit {format_bytes(limit)}"
        if node and node.metrics_url and not ended:
            line += f"; metrics {node.metrics_url}"
        parts.append(Text(line))
        table = Table(expand=False)
        for column in ("rank", "phase", "step", "loss", "host last" if ended else "host now", "host peak",
                       "device last" if ended else "device now", "device peak"):
            table.add_column(column, justify="right" if column not in ("phase",) else "left", no_wrap=True)
        for view in sorted((v for v in watch.ranks.values() if v.host == host), key=lambda v: v.rank):
            table.add_row(
                str(view.rank), "/".join(view.phases[-2:]) or "-", str(view.step),
                "-" if view.loss is None else f"{view.loss:.4f}",
                _figure(view.rss_now, ended), format_bytes(view.rss_peak or None),
                _figure(view.device_now, ended), format_bytes(view.device_peak or None),
            )
        parts.append(table)
    forecast = watch.forecast()
    if forecast:
        parts.append(Text("forecast: " + forecast))
    for line in watch.unreadable():
        parts.append(Text(line, style="red"))
    for line in watch.findings():
        parts.append(Text(line, style="red" if line.startswith("[error]") else "yellow"))
    return Group(*parts)


def main(args: argparse.Namespace) -> int:
    run_dir = args.run_dir if args.run_dir else newest_run(args.reports_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir} is not a run directory; give one `memdiag run` made")
    watch = RunWatch(run_dir)
    watch.refresh()
    from rich.console import Console

    console = Console()
    if args.once:
        console.print(render(watch))
        return 0
    from rich.live import Live

    try:
        with Live(render(watch), console=console, refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(max(0.2, args.interval))
                watch.refresh()
                live.update(render(watch))
                if watch.spec.get("status") not in (None, "running"):
                    break
    except KeyboardInterrupt:
        pass
    return 0
