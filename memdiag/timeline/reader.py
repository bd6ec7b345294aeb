"""The one reader of run directories: checks, planner calibration and reports all use it.

Tolerant by design: a torn last line (the writer was killed mid-write), a missing or empty
rank file, or a missing run.json are recorded in ``Run.problems`` and reading goes on.
"""

from __future__ import annotations

import gc
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from memdiag.errors import UsageError
from memdiag.timeline import format as fmt

try:  # orjson parses our lines ~4x faster than json; the format does not depend on it
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    _loads = json.loads

SAMPLE_COLUMNS = (
    "rss_bytes",
    "hwm_bytes",
    "device_allocated_bytes",
    "device_reserved_bytes",
    "nvml_used_bytes",
)


@dataclass
class Phase:
    """One closed (or, in a killed run, still open) phase of one rank."""

    name: str
    begin_ns: int
    end_ns: int | None
    step: int | None
    depth: int
    host_peak_bytes: int | None = None
    device_peak_bytes: int | None = None
    begin_rss_bytes: int | None = None
    begin_device_bytes: int | None = None
    end_event: dict | None = None


@dataclass
class RankTimeline:
    rank: int
    path: Path
    header: dict
    t_ns: np.ndarray
    columns: dict[str, np.ndarray]
    """Sample columns by name; NaN where a sample lacks the figure."""
    sample_phase_codes: np.ndarray
    """Per sample, an index into ``phase_names`` (phases are few, samples many)."""
    phase_names: list[str]
    sample_step: np.ndarray
    events: list[dict]
    torn_lines: int = 0

    @property
    def sample_phase(self) -> np.ndarray:
        """The innermost phase of every sample, as strings."""
        return np.array(self.phase_names, dtype=object)[self.sample_phase_codes] if self.phase_names else np.array([], dtype=object)

    @property
    def phases(self) -> list[Phase]:
        return phases_from_events(self.events)

    @property
    def steps(self) -> list[dict]:
        return [e for e in self.events if e["kind"] == fmt.STEP]

    def host_peak_bytes(self) -> int | None:
        """Highest RSS this rank reached: samples and exact per-phase peaks together."""
        candidates = [int(np.nanmax(self.columns["rss_bytes"]))] if len(self.t_ns) else []
        candidates += [p.host_peak_bytes for p in self.phases if p.host_peak_bytes is not None]
        return max(candidates) if candidates else None

    def device_peak_bytes(self) -> int | None:
        candidates = []
        if len(self.t_ns) and not np.all(np.isnan(self.columns["device_allocated_bytes"])):
            candidates.append(int(np.nanmax(self.columns["device_allocated_bytes"])))
        candidates += [p.device_peak_bytes for p in self.phases if p.device_peak_bytes is not None]
        return max(candidates) if candidates else None


@dataclass
class NodeTimeline:
    """The node watcher's view: system figures and every local rank's RSS/PSS over time."""

    host: str
    path: Path
    header: dict
    t_ns: np.ndarray
    columns: dict[str, np.ndarray]
    """System columns (``mem_total_bytes`` ...); NaN where absent."""
    rank_rss: dict[int, np.ndarray]
    """Rank -> RSS of the rank and its children per sample (NaN before it started / after it ended)."""
    rank_pss: dict[int, np.ndarray]
    """Rank -> PSS of the rank and its children; NaN on samples without a PSS read."""
    events: list[dict]

    def pss_total(self) -> np.ndarray:
        """Sum of the ranks' PSS on the samples where every live rank had a PSS read."""
        if not self.rank_pss:
            return np.full(len(self.t_ns), np.nan)
        stacked = np.vstack(list(self.rank_pss.values()))
        rss = np.vstack(list(self.rank_rss.values()))
        complete = ~np.any(np.isnan(stacked) & ~np.isnan(rss), axis=0) & np.any(~np.isnan(stacked), axis=0)
        total = np.nansum(stacked, axis=0)
        return np.where(complete, total, np.nan)


@dataclass
class Run:
    path: Path
    spec: dict
    ranks: dict[int, RankTimeline]
    problems: list[str] = field(default_factory=list)
    nodes: dict[str, NodeTimeline] = field(default_factory=dict)
    node_totals_cache: dict | None = field(default=None, repr=False, compare=False)
    """Filled by ``summary.node_totals``; derived data, never read from disk."""

    @property
    def rank_ids(self) -> list[int]:
        return sorted(self.ranks)


def phases_from_events(events: list[dict]) -> list[Phase]:
    """Pair phase_begin/phase_end events (they nest); unclosed phases keep ``end_ns=None``."""
    stack: list[Phase] = []
    done: list[Phase] = []
    for event in events:
        kind = event["kind"]
        if kind == fmt.PHASE_BEGIN:
            stack.append(
                Phase(
                    event["phase"],
                    event["t"],
                    None,
                    event.get("step"),
                    len(stack),
                    begin_rss_bytes=event.get("rss_bytes"),
                    begin_device_bytes=event.get("device_allocated_bytes"),
                )
            )
        elif kind == fmt.PHASE_END and stack and stack[-1].name == event["phase"]:
            phase = stack.pop()
            phase.end_ns = event["t"]
            phase.host_peak_bytes = event.get("host_peak_bytes")
            phase.device_peak_bytes = event.get("device_peak_bytes")
            phase.end_event = event
            done.append(phase)
    done.extend(stack)
    return sorted(done, key=lambda p: (p.begin_ns, p.depth))


def _check_version(header: dict, path: Path) -> None:
    version = str(header.get("format_version", "0"))
    major = version.split(".")[0]
    if major != fmt.FORMAT_VERSION.split(".")[0]:
        raise UsageError(
            f"{path} has timeline format {version}; this memdiag reads "
            f"{fmt.FORMAT_VERSION.split('.')[0]}.x: use the memdiag version that wrote it"
        )


def read_rank_file(path: Path, rank: int) -> tuple[RankTimeline | None, list[str]]:
    records, problems = _read_records(path)
    torn = len(problems)
    if not records or records[0].get("kind") != fmt.HEADER:
        problems.append(f"{path.name}: empty or without a header line; rank {rank} has no data")
        return None, problems
    header = records[0]
    _check_version(header, path)
    t_ns, columns, (phase_codes, phase_names), sample_step = _sample_columns(records)
    events = [r for r in records[1:] if r.get("kind") not in (fmt.SAMPLE, fmt.SAMPLES)]
    timeline = RankTimeline(
        rank=rank,
        path=path,
        header=header,
        t_ns=t_ns,
        columns=columns,
        sample_phase_codes=phase_codes,
        phase_names=phase_names,
        sample_step=sample_step,
        events=events,
        torn_lines=torn,
    )
    return timeline, problems


NODE_COLUMNS = (
    "mem_total_bytes",
    "mem_available_bytes",
    "cgroup_usage_bytes",
    "cgroup_peak_bytes",
    "cgroup_limit_bytes",
)


def _read_records(path: Path) -> tuple[list[dict], list[str]]:
    problems: list[str] = []
    lines = path.read_bytes().split(b"\n")
    records: list[dict] = []
    collecting = gc.isenabled()
    gc.disable()  # millions of small dicts: the cyclic collector would rescan them all
    try:
        for number, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                records.append(_loads(line))
            except ValueError:
                where = "last line" if number >= len(lines) - 2 else f"line {number + 1}"
                problems.append(f"{path.name}: skipped a torn {where} (the writer was cut off)")
    finally:
        if collecting:
            gc.enable()
    return records, problems


def _as_float(values: list) -> np.ndarray:
    try:
        return np.array(values, dtype=np.float64)
    except TypeError:  # a None among the numbers: a figure missing on some ticks
        return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _sample_columns(records: list[dict]) -> tuple[np.ndarray, dict[str, np.ndarray], tuple[np.ndarray, list[str]], np.ndarray]:
    """Samples from single ``sample`` records and ``samples`` batches, in file order."""
    t: list[int] = []
    phases: list[str] = []
    steps: list[int] = []
    values: dict[str, list] = {name: [] for name in SAMPLE_COLUMNS}
    nan = float("nan")
    for record in records:
        kind = record.get("kind")
        if kind == fmt.SAMPLES:
            n = len(record["t"])
            t.extend(record["t"])
            phases.extend(record.get("phase") or [""] * n)
            steps.extend(record.get("step") or [-1] * n)
            for name, column in values.items():
                column.extend(record.get(name) or [nan] * n)
        elif kind == fmt.SAMPLE:
            t.append(record["t"])
            phases.append(record.get("phase", ""))
            steps.append(record.get("step", -1))
            for name, column in values.items():
                value = record.get(name)
                column.append(nan if value is None else value)
    columns = {name: _as_float(column) for name, column in values.items()}
    step = np.array([-1 if v is None else v for v in steps] if None in steps else steps, dtype=np.int64)
    index: dict[str, int] = {}
    codes = np.array([index.setdefault(p or "", len(index)) for p in phases], dtype=np.int16)
    return np.array(t, dtype=np.int64), columns, (codes, list(index)), step


def read_node_file(path: Path) -> tuple[NodeTimeline | None, list[str]]:
    records, problems = _read_records(path)
    if not records or records[0].get("kind") != fmt.HEADER:
        problems.append(f"{path.name}: empty or without a header line; no node data")
        return None, problems
    header = records[0]
    _check_version(header, path)
    samples = [r for r in records if r.get("kind") == fmt.SAMPLE]
    ranks = sorted({int(k) for s in samples for k in s.get("ranks", {})})
    def rank_column(rank: int, key: str) -> np.ndarray:
        values = []
        for sample in samples:
            entry = sample.get("ranks", {}).get(str(rank))
            if entry is None or key not in entry:
                values.append(np.nan)
            elif key == "rss_bytes":
                values.append(entry["rss_bytes"] + entry.get("children_rss_bytes", 0))
            else:
                values.append(entry[key])
        return np.array(values, dtype=np.float64)

    timeline = NodeTimeline(
        host=header.get("host", path.stem.split("-", 1)[1]),
        path=path,
        header=header,
        t_ns=np.array([s["t"] for s in samples], dtype=np.int64),
        columns={
            name: np.array([s.get(name) for s in samples], dtype=np.float64)
            for name in NODE_COLUMNS
        },
        rank_rss={rank: rank_column(rank, "rss_bytes") for rank in ranks},
        rank_pss={rank: rank_column(rank, "pss_bytes") for rank in ranks},
        events=[r for r in records[1:] if r.get("kind") != fmt.SAMPLE],
    )
    return timeline, problems


PARALLEL_MIN_BYTES = 64 * 2**20
"""Below this much timeline data, worker processes cost more than they save."""


def _read_rank_files(files: list[tuple[Path, int]]) -> list[tuple[RankTimeline | None, list[str]]]:
    size = sum(path.stat().st_size for path, _ in files)
    workers = min(len(files), os.cpu_count() or 1)
    if size < PARALLEL_MIN_BYTES or workers < 2:
        return [read_rank_file(path, rank) for path, rank in files]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_read_rank_file_args, files))


def _read_rank_file_args(args: tuple[Path, int]) -> tuple[RankTimeline | None, list[str]]:
    return read_rank_file(*args)


def read_run(path: str | Path) -> Run:
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir} is not a run directory; pass a directory under reports/")
    problems: list[str] = []
    spec: dict = {}
    run_json = run_dir / fmt.RUN_JSON
    try:
        spec = json.loads(run_json.read_text())
    except FileNotFoundError:
        problems.append("run.json is missing: the run's settings are unknown")
    except ValueError:
        problems.append("run.json is not valid JSON: the run's settings are unknown")
    ranks: dict[int, RankTimeline] = {}
    timeline_dir = run_dir / fmt.TIMELINE_DIR
    files: list[tuple[Path, int]] = []
    for file in sorted(timeline_dir.glob("rank-*.jsonl")):
        try:
            files.append((file, int(file.stem.split("-", 1)[1])))
        except ValueError:
            problems.append(f"{file.name}: not a rank file name; ignored")
    for timeline, file_problems in _read_rank_files(files):
        problems += file_problems
        if timeline is not None:
            ranks[timeline.rank] = timeline
    world_size = spec.get("world_size")
    if world_size:
        missing = [r for r in range(world_size) if not (timeline_dir / f"rank-{r}.jsonl").exists()]
        if missing:
            problems.append(f"no timeline for rank(s) {missing} of {world_size}")
    if not ranks:
        problems.append("no rank timelines with data")
    nodes: dict[str, NodeTimeline] = {}
    for file in sorted(timeline_dir.glob("node-*.jsonl")):
        node, file_problems = read_node_file(file)
        problems += file_problems
        if node is not None:
            nodes[node.host] = node
    if not nodes and ranks:
        problems.append("no node watcher timeline: node totals are summed from the rank files")
    return Run(path=run_dir, spec=spec, ranks=ranks, problems=problems, nodes=nodes)
