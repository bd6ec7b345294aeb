"""The one reader of run directories: checks, planner calibration and reports all use it.

Tolerant by design: a torn last line (the writer was killed mid-write), a missing or empty
rank file, or a missing run.json are recorded in ``Run.problems`` and reading goes on.

Two modes share one set of line checks (``_LineParser``): ``read_run`` reads whole files once;
``Follower`` reads what a live file gained since the last call, for ``memdiag top``.
"""

from __future__ import annotations

import gc
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from memdiag.errors import UsageError
from memdiag.timeline import columnar
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
    device_reserved_peak_bytes: int | None = None
    """The caching allocator's exact reserved peak in the phase (CUDA runs from format 1.3)."""
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
    sample_level_s: float | None = None
    """A compacted file read at a coarse level: the window whose bounding samples were read
    (``timeline/columnar.py``); None when every sample was."""
    _phases: tuple[int, list[Phase]] | None = field(default=None, repr=False, compare=False)

    @property
    def sample_phase(self) -> np.ndarray:
        """The innermost phase of every sample, as strings."""
        return np.array(self.phase_names, dtype=object)[self.sample_phase_codes] if self.phase_names else np.array([], dtype=object)

    @property
    def phases(self) -> list[Phase]:
        """Paired once per events list (a day's run has hundreds of thousands)."""
        if self._phases is None or self._phases[0] != len(self.events):
            self._phases = (len(self.events), phases_from_events(self.events))
        return self._phases[1]

    @property
    def steps(self) -> list[dict]:
        """The step records read: every one, or a compacted file's level of them (``step_count``
        says how many there were)."""
        return [e for e in self.events if e["kind"] == fmt.STEP]

    @property
    def step_count(self) -> int:
        """Step records the rank wrote, whatever level was read."""
        compacted = next((e for e in self.events[:1] if e["kind"] == fmt.COLUMNAR), None)
        if compacted is not None and isinstance(compacted.get("steps"), int):
            return compacted["steps"]
        return len(self.steps)

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
    rank_children_rss: dict[int, np.ndarray] = field(default_factory=dict)
    """Rank -> RSS of its children alone (DataLoader workers, compilers); included in ``rank_rss``."""
    rank_children_pss: dict[int, np.ndarray] = field(default_factory=dict)
    """Rank -> PSS of its children alone; included in ``rank_pss``."""
    rank_children_roles: dict[int, dict[str, int]] = field(default_factory=dict)
    """Rank -> the most children of each role seen at once (``memdiag.procs.child_role``)."""
    rank_samples: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    """Rank -> its host figures the watcher took at ``sample_hz`` (``sampler=watcher``): t, rss_bytes, hwm_bytes."""
    sample_level_s: float | None = None
    """A compacted file read at a coarse level: its windows' width (None: every sample)."""

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
    dropped: list[dict] = field(default_factory=list)
    """``dropped`` records: samples a writer could not keep while the disk was full."""
    spec_problem: str | None = None
    """Why run.json could not be read (missing, not JSON, not an object): the run's settings,
    its host limit among them, are unknown, so ``check`` cannot judge it."""
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
            phase.device_reserved_peak_bytes = event.get("device_reserved_peak_bytes")
            phase.end_event = event
            done.append(phase)
    done.extend(stack)
    return sorted(done, key=lambda p: (p.begin_ns, p.depth))


def _version_problem(header: dict, path: Path) -> str | None:
    """Why this memdiag cannot read a file with this header, or None (any minor version reads)."""
    version = str(header.get("format_version", "0"))
    major = version.split(".")[0]
    if major != fmt.FORMAT_VERSION.split(".")[0]:
        return (
            f"{path} has timeline format {version}; this memdiag reads "
            f"{fmt.FORMAT_VERSION.split('.')[0]}.x: use the memdiag version that wrote it"
        )
    return None


def _check_version(header: dict, path: Path) -> None:
    problem = _version_problem(header, path)
    if problem is not None:
        raise UsageError(problem)


def read_rank_file(path: Path, rank: int, max_samples: int | None = None, max_events: int | None = None) -> tuple[RankTimeline | None, list[str]]:
    """One rank's timeline. ``max_samples``, ``max_events``: a compacted file's samples and
    events are read at the finest level within them (a JSONL file is read whole whatever they say)."""
    records, problems = _read_records(path)
    torn = sum(1 for p in problems if "torn" in p)
    if not records or records[0].get("kind") != fmt.HEADER:
        problems.append(f"{path.name}: empty or without a header line; rank {rank} has no data")
        return None, problems
    header = records[0]
    _check_version(header, path)
    events = [r for r in records[1:] if r.get("kind") not in (fmt.SAMPLE, fmt.SAMPLES)]
    compacted = next((r for r in events if r["kind"] == fmt.COLUMNAR), None)
    level_s = None
    if compacted is None:
        t_ns, columns, (phase_codes, phase_names), sample_step = _sample_columns(records)
    else:
        t_ns, columns, (phase_codes, phase_names), sample_step = _sample_columns([])
        if "samples_file" in compacted:
            level = columnar.level_for(compacted, max_samples)
            level_s = compacted["level_windows_s"][level - 1] if level else None
            try:
                t_ns, read, (phase_codes, phase_names), sample_step = columnar.read_samples(path.parent / compacted["samples_file"], level)
                columns = {name: read.get(name, np.full(len(t_ns), np.nan)) for name in SAMPLE_COLUMNS}
            except (OSError, ValueError) as exc:  # pyarrow's errors are both: a missing or garbled file
                problems.append(f"{path.name}: its samples ({compacted['samples_file']}) cannot be read ({exc})")
        if "events_file" in compacted:
            level = columnar.level_for({"level_rows": compacted.get("event_level_rows")}, max_events)
            try:
                events = [compacted, *map(_loads, columnar.read_event_lines(path.parent / compacted["events_file"], level))]
            except (OSError, ValueError) as exc:
                problems.append(f"{path.name}: its events ({compacted['events_file']}) cannot be read ({exc})")
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
        sample_level_s=level_s,
    )
    return timeline, problems


NODE_COLUMNS = (
    "mem_total_bytes",
    "mem_available_bytes",
    "cgroup_usage_bytes",
    "cgroup_peak_bytes",
    "cgroup_limit_bytes",
)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number_or_none(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _converts(values: list, dtype) -> bool:
    """Whether a column converts as the reader will convert it (in C: columns are long)."""
    try:
        return np.asarray(values, dtype=dtype).ndim == 1
    except (TypeError, ValueError, OverflowError):
        return False


def record_shape_problem(record) -> str | None:
    """Why a parsed line cannot be used, or None. The writer never produces these; a file
    edited, concatenated or written by another tool can."""
    if not isinstance(record, dict):
        return "not an object"
    kind = record.get("kind")
    if not isinstance(kind, str):
        return "no kind"
    t = record.get("t")
    if kind == fmt.RANK_SAMPLES:
        if not isinstance(t, list) or not _converts(t, np.int64) or not _is_int(record.get("rank")):
            return "t is not a list of integers, or rank not an integer"
        for name in ("rss_bytes", "hwm_bytes"):
            column = record.get(name)
            if not isinstance(column, list) or len(column) != len(t) or not _converts(column, np.float64):
                return f"column {name} does not match t"
        return None
    if kind == fmt.DEVICE_SAMPLES:
        if not isinstance(t, list) or not _converts(t, np.int64):
            return "t is not a list of integers"
        for name in ("device_allocated_bytes", "device_reserved_bytes", "nvml_used_bytes"):
            column = record.get(name)
            if name == "nvml_used_bytes" and column is None:
                continue
            if not isinstance(column, list) or len(column) != len(t) or not all(_is_number_or_none(v) for v in column):
                return f"column {name} does not match t"
        return None
    if kind == fmt.SAMPLES:
        if not isinstance(t, list) or not _converts(t, np.int64):
            return "t is not a list of integers"
        for name in (*SAMPLE_COLUMNS, "phase", "step"):
            column = record.get(name)
            if column is None:
                continue
            if not isinstance(column, list) or len(column) != len(t):
                return f"column {name} does not match t in length"
            if name == "phase":
                if not all(isinstance(v, str) or v is None for v in column):
                    return "phase holds a non-string"
            elif not _converts(column, np.float64):
                return f"column {name} holds a non-number"
        return None
    if not _is_int(t):
        return "t is not an integer"
    if kind == fmt.SAMPLE:
        if not all(_is_number_or_none(record.get(name)) for name in (*SAMPLE_COLUMNS, *NODE_COLUMNS)):
            return "a figure is not a number"
        ranks = record.get("ranks")
        if ranks is not None and not (
            isinstance(ranks, dict)
            and all(
                isinstance(e, dict) and _is_int(e.get("rss_bytes")) and str(k).isdigit()
                and all(_is_number_or_none(v) if name != "children_roles" else _is_roles(v) for name, v in e.items())
                for k, e in ranks.items()
            )
        ):
            return "ranks is not a map of rank -> {rss_bytes}"
    elif kind in (fmt.PHASE_BEGIN, fmt.PHASE_END) and not isinstance(record.get("phase"), str):
        return "phase is not a string"
    elif kind == fmt.COLUMNAR:
        windows = record.get("level_windows_s")
        for file, rows in (("samples_file", "level_rows"), ("events_file", "event_level_rows")):
            if file not in record:
                continue
            name, counts = record[file], record.get(rows)
            if not (isinstance(name, str) and "/" not in name and isinstance(counts, list) and all(_is_int(c) for c in counts)
                    and isinstance(windows, list) and len(windows) == len(counts) - 1):
                return f"{file}, {rows} or level_windows_s is not what a compaction writes"
    return None


def _is_roles(value) -> bool:
    """A node sample's ``children_roles``: role -> {count, pss_bytes}."""
    return isinstance(value, dict) and all(
        isinstance(role, str) and isinstance(seen, dict) and all(_is_number_or_none(v) for v in seen.values())
        for role, seen in value.items()
    )


def _summarise(path: Path, causes: dict[str, int]) -> list[str]:
    """One line per file: how many lines were skipped, by cause."""
    if not causes:
        return []
    parts = []
    for cause, count in sorted(causes.items(), key=lambda kv: -kv[1]):
        noun = "line" if count == 1 else "lines"
        parts.append(f"{count:,} {cause}" if cause.startswith("torn") else f"{count:,} {noun} {cause}")
    return [f"{path.name}: skipped " + ", ".join(parts)]


_TORN_LAST_LINE = "torn last line (the writer was cut off)"


class _LineParser:
    """Lines to usable records, the others counted by cause, never raised. State carries from
    one batch of lines to the next, so a followed file is judged as if read whole."""

    def __init__(self) -> None:
        self.causes: dict[str, int] = {}
        self.started = False
        """Whether the header has been taken: every record before it is skipped."""

    def _skip(self, cause: str) -> None:
        self.causes[cause] = self.causes.get(cause, 0) + 1

    def parse(self, lines: list[bytes], torn_tail: bool = False) -> list[dict]:
        """``torn_tail``: the last item is the piece after the final newline, so bad JSON there
        is a cut-off write, not garbage."""
        last = len(lines) - 1 if torn_tail else -1
        records: list[dict] = []
        collecting = gc.isenabled()
        gc.disable()  # millions of small dicts: the cyclic collector would rescan them all
        try:
            for number, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    record = _loads(line)
                except ValueError:
                    self._skip(_TORN_LAST_LINE if number == last else "not JSON")
                    continue
                problem = record_shape_problem(record)
                if problem is not None:
                    self._skip(f"of the wrong shape ({problem})")
                elif not self.started and record.get("kind") != fmt.HEADER:
                    self._skip("before the header")
                else:
                    self.started = True
                    records.append(record)
        finally:
            if collecting:
                gc.enable()
        return records


def _read_records(path: Path) -> tuple[list[dict], list[str]]:
    """Every usable record of a file (the first, if any, is its header) and one line of
    problems per file; never raises."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return [], [f"{path.name}: cannot be read ({exc.strerror or exc})"]
    parser = _LineParser()
    records = parser.parse(data.split(b"\n"), torn_tail=True)
    return records, _summarise(path, parser.causes)


class Follower:
    """The reader's incremental mode: each ``new_records()`` returns the whole records the file
    gained since the last call, with ``read_run``'s checks. A line without its newline yet is
    held until its end is written.

    A file of an unknown major format version is not raised into a live view's loop: it sets
    ``refused`` (the message ``read_run`` would raise) and yields nothing from then on.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.offset_bytes = 0
        self.refused: str | None = None
        self._pending = b""  # the start of a line whose end is not written yet
        self._parser = _LineParser()

    def new_records(self) -> list[dict]:
        if self.refused is not None:
            return []
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset_bytes)
                data = f.read()
        except OSError:  # not there yet, or gone: the next call tries again
            return []
        self.offset_bytes += len(data)
        lines = (self._pending + data).split(b"\n")
        self._pending = lines.pop()
        had_header = self._parser.started
        records = self._parser.parse(lines)
        if not had_header and records:  # the parser puts the header first
            self.refused = _version_problem(records[0], self.path)
            if self.refused is not None:
                return []
        return records

    @property
    def problems(self) -> list[str]:
        """Like ``Run.problems`` for this file so far: the refusal, or the skipped lines by cause."""
        if self.refused is not None:
            return [self.refused]
        return _summarise(self.path, self._parser.causes)


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


def read_node_file(path: Path, max_samples: int | None = None) -> tuple[NodeTimeline | None, list[str]]:
    """One node watcher's timeline. ``max_samples``: a compacted file's samples are read at the
    finest level within it (every level keeps each window's extremes and its last sample)."""
    records, problems = _read_records(path)
    if not records or records[0].get("kind") != fmt.HEADER:
        problems.append(f"{path.name}: empty or without a header line; no node data")
        return None, problems
    header = records[0]
    _check_version(header, path)
    compacted = next((r for r in records if r.get("kind") == fmt.COLUMNAR), None)
    if compacted is not None and "samples_file" in compacted:
        return _read_compacted_node(path, header, records, compacted, max_samples, problems)
    samples = [r for r in records if r.get("kind") == fmt.SAMPLE]
    ranks = sorted({int(k) for s in samples for k in s.get("ranks", {})})
    def rank_column(rank: int, key: str) -> np.ndarray:
        values = []
        for sample in samples:
            entry = sample.get("ranks", {}).get(str(rank))
            if entry is None or (key not in entry and not _no_children_figure(entry, key)):
                values.append(np.nan)
            elif key not in entry:
                values.append(0.0)
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
        events=[r for r in records[1:] if r.get("kind") not in (fmt.SAMPLE, fmt.RANK_SAMPLES)],
        rank_children_rss={rank: rank_column(rank, "children_rss_bytes") for rank in ranks},
        rank_children_pss={rank: rank_column(rank, "children_pss_bytes") for rank in ranks},
        rank_children_roles={rank: _roles(samples, rank) for rank in ranks},
        rank_samples=_rank_samples(records),
    )
    return timeline, problems


def _read_compacted_node(path: Path, header: dict, records: list[dict], compacted: dict, max_samples: int | None,
                         problems: list[str]) -> tuple[NodeTimeline | None, list[str]]:
    level = columnar.level_for(compacted, max_samples)
    try:
        t_ns, system, per_rank = columnar.read_node_samples(path.parent / compacted["samples_file"], level)
    except (OSError, ValueError) as exc:  # pyarrow's errors are both: a missing or garbled file
        problems.append(f"{path.name}: its samples ({compacted['samples_file']}) cannot be read ({exc})")
        t_ns, system, per_rank = np.zeros(0, dtype=np.int64), {}, {}
    n = len(t_ns)
    roles = compacted.get("rank_children_roles") if isinstance(compacted.get("rank_children_roles"), dict) else {}
    timeline = NodeTimeline(
        host=header.get("host", path.stem.split("-", 1)[1]),
        path=path,
        header=header,
        t_ns=t_ns,
        columns={name: system.get(name, np.full(n, np.nan)) for name in NODE_COLUMNS},
        rank_rss=per_rank.get("rss_bytes", {}),
        rank_pss=per_rank.get("pss_bytes", {}),
        events=[r for r in records[1:] if r.get("kind") not in (fmt.SAMPLE, fmt.RANK_SAMPLES)],
        rank_children_rss=per_rank.get("children_rss_bytes", {}),
        rank_children_pss=per_rank.get("children_pss_bytes", {}),
        rank_children_roles={int(rank): dict(seen) for rank, seen in roles.items() if isinstance(seen, dict)},
        rank_samples=_rank_samples(records),
        sample_level_s=compacted["level_windows_s"][level - 1] if level else None,
    )
    return timeline, problems


def _rank_samples(records: list[dict]) -> dict[int, dict[str, np.ndarray]]:
    """The watcher's ``rank_samples`` batches joined per rank, in time order."""
    parts: dict[int, dict[str, list]] = {}
    for record in records:
        if record.get("kind") == fmt.RANK_SAMPLES:
            into = parts.setdefault(int(record["rank"]), {name: [] for name in ("t", *WATCHER_FIGURES)})
            n = len(record["t"])
            for name, column in into.items():
                values = record.get(name)  # nvml_used_bytes only where the watcher reads NVML (1.7)
                column.extend(values if isinstance(values, list) and len(values) == n else [None] * n)
    joined = {}
    for rank, columns in parts.items():
        t = np.array(columns["t"], dtype=np.int64)
        order = np.argsort(t, kind="stable")
        joined[rank] = {"t": t[order], **{name: _as_float(columns[name])[order] for name in WATCHER_FIGURES}}
    return joined


WATCHER_FIGURES = ("rss_bytes", "hwm_bytes", "nvml_used_bytes")
"""What the node watcher reads of each rank (``rank_samples``): its /proc figures and, where a GPU
is, NVML's figure for its process."""


def join_watcher_samples(timeline: RankTimeline, samples: dict[str, np.ndarray]) -> None:
    """A rank sampled from outside (``sampler=watcher``) gets the watcher's figures as its
    samples, each with the phase and step the rank's own events say it was in at that time."""
    from memdiag.probes.device import SOURCE_CPU_ACCEL

    t = samples["t"]
    n = len(t)
    columns = {name: np.full(n, np.nan) for name in SAMPLE_COLUMNS}
    columns["rss_bytes"], columns["hwm_bytes"] = samples["rss_bytes"], samples["hwm_bytes"]
    if timeline.header.get("device_source") == SOURCE_CPU_ACCEL:  # the accelerator's "device" is the RSS
        columns["device_allocated_bytes"] = columns["device_reserved_bytes"] = samples["rss_bytes"]
    else:
        _join_device_points(t, columns, timeline.events)
        nvml = samples.get("nvml_used_bytes")
        if nvml is not None and np.isfinite(nvml).any():  # 1.7: NVML read by the watcher, at these very times
            columns["nvml_used_bytes"] = nvml
    names = [""]
    codes = np.zeros(n, dtype=np.int16)
    for phase in sorted(timeline.phases, key=lambda p: (p.depth, p.begin_ns)):  # inner phases overwrite outer
        if phase.name not in names:
            names.append(phase.name)
        first = int(np.searchsorted(t, phase.begin_ns, side="left"))
        last = n if phase.end_ns is None else int(np.searchsorted(t, phase.end_ns, side="right"))
        codes[first:last] = names.index(phase.name)
    steps = [(s["t"], int(s["step"])) for s in timeline.steps if _is_int(s.get("t")) and _is_int(s.get("step"))]
    step_t = np.array([st for st, _ in steps], dtype=np.int64)
    step_n = np.array([0] + [sn for _, sn in steps], dtype=np.int64)
    timeline.t_ns, timeline.columns = t, columns
    timeline.sample_phase_codes, timeline.phase_names = codes, names
    timeline.sample_step = step_n[np.searchsorted(step_t, t, side="right")]


def _join_device_points(t: np.ndarray, columns: dict[str, np.ndarray], events: list[dict]) -> None:
    """The rank's device points (``device_samples``: the allocator's peaks read at its hook
    events) onto the watcher's sample times: each sample gets the highest point since the
    sample before it; a sample with none stays NaN (the report joins the line across)."""
    points: dict[str, list] = {"t": [], "device_allocated_bytes": [], "device_reserved_bytes": [], "nvml_used_bytes": []}
    for event in events:
        if event.get("kind") == fmt.DEVICE_SAMPLES and isinstance(event.get("t"), list):
            n = len(event["t"])
            for name, column in points.items():
                values = event.get(name)
                column.extend(values if isinstance(values, list) and len(values) == n else [None] * n)
    if not points["t"] or not len(t):
        return
    at = np.minimum(np.searchsorted(t, np.asarray(points["t"], dtype=np.int64), side="left"), len(t) - 1)
    for name in ("device_allocated_bytes", "device_reserved_bytes", "nvml_used_bytes"):
        values = _as_float(points[name])
        column = np.full(len(t), -np.inf)
        np.maximum.at(column, at, np.where(np.isnan(values), -np.inf, values))
        columns[name] = np.where(np.isinf(column), np.nan, column)


def _no_children_figure(entry: dict, key: str) -> bool:
    """A rank entry leaves its children's figures out while it has none (1.7): RSS every
    sample, PSS with the rank's own."""
    return key == "children_rss_bytes" or (key == "children_pss_bytes" and "pss_bytes" in entry)


def _roles(samples: list[dict], rank: int) -> dict[str, int]:
    most: dict[str, int] = {}
    for sample in samples:
        entry = sample.get("ranks", {}).get(str(rank))
        roles = entry.get("children_roles") if isinstance(entry, dict) else None
        if isinstance(roles, dict):
            for role, seen in roles.items():
                count = seen.get("count", 0) if isinstance(seen, dict) else 0
                most[role] = max(most.get(role, 0), int(count))
    return most


NODE_SAMPLE_WEIGHT = 8
"""A node sample holds every rank's figures: in a sample budget it counts as this many."""

PARALLEL_MIN_BYTES = 64 * 2**20
"""Below this much timeline data, worker processes cost more than they save."""


def _read_rank_files(files: list[tuple[Path, int]], max_samples: int | None, max_events: int | None) -> list[tuple[RankTimeline | None, list[str]]]:
    size = sum(path.stat().st_size for path, _ in files)
    workers = min(len(files), os.cpu_count() or 1)
    share = lambda total: total // max(len(files), 1) if total is not None else None  # noqa: E731
    jobs = [(path, rank, share(max_samples), share(max_events)) for path, rank in files]
    if size < PARALLEL_MIN_BYTES or workers < 2:
        return [read_rank_file(*job) for job in jobs]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_read_rank_file_args, jobs))


def _read_rank_file_args(args: tuple) -> tuple[RankTimeline | None, list[str]]:
    return read_rank_file(*args)


READ_MAX_SAMPLES = 4_000_000
"""What ``memdiag report`` and ``check`` read of compacted runs' samples, over all ranks: 512
ranks of a day at the 60 s level, 16 ranks of an hour at full resolution."""
READ_MAX_EVENTS = 400_000
"""... and of their events: the training loop writes about a dozen a step, each a Python dict
once read; 16 ranks of an hour at 10 s a step whole, longer runs at the level that fits."""


def read_run(path: str | Path, max_samples: int | None = None, max_events: int | None = None) -> Run:
    """The run directory, every file of it. ``max_samples``, ``max_events``: compacted rank files
    are read at the finest levels that keep the run within them (``timeline/columnar.py``); None
    reads every sample and event."""
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir} is not a run directory; pass a directory under reports/")
    if not (run_dir / fmt.RUN_JSON).exists() and not (run_dir / fmt.TIMELINE_DIR).is_dir():
        raise UsageError(
            f"{run_dir} is not a run directory (no {fmt.RUN_JSON}, no {fmt.TIMELINE_DIR}/); "
            "pass one that `memdiag run` made, e.g. reports/<case>/<time>-<layout>"
        )
    problems: list[str] = []
    spec: dict = {}
    spec_problem = None
    run_json = run_dir / fmt.RUN_JSON
    try:
        spec = json.loads(run_json.read_text())
    except FileNotFoundError:
        spec_problem = "run.json is missing"
    except (ValueError, OSError) as exc:
        spec_problem = f"run.json is not valid JSON ({exc})"
    if not isinstance(spec, dict):  # valid JSON of the wrong shape reads as a broken run.json
        spec_problem = f"run.json holds a JSON {type(spec).__name__}, not an object"
        spec = {}
    if spec_problem:
        problems.append(f"{spec_problem}: the run's settings are unknown")
    ranks: dict[int, RankTimeline] = {}
    timeline_dir = run_dir / fmt.TIMELINE_DIR
    files: list[tuple[Path, int]] = []
    for file in sorted(timeline_dir.glob("rank-*.jsonl")):
        try:
            files.append((file, int(file.stem.split("-", 1)[1])))
        except ValueError:
            problems.append(f"{file.name}: not a rank file name; ignored")
    for timeline, file_problems in _read_rank_files(files, max_samples, max_events):
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
    node_files = sorted(timeline_dir.glob("node-*.jsonl"))
    node_budget = None if max_samples is None else max(1, max_samples // NODE_SAMPLE_WEIGHT // max(1, len(node_files)))
    for file in node_files:
        node, file_problems = read_node_file(file, node_budget)
        problems += file_problems
        if node is not None:
            nodes[node.host] = node
    for node in nodes.values():  # ranks sampled from outside (sampler=watcher)
        for rank, samples in node.rank_samples.items():
            if rank in ranks and not len(ranks[rank].t_ns) and len(samples["t"]):
                join_watcher_samples(ranks[rank], samples)
    if not nodes and ranks:
        problems.append("no node watcher timeline: node totals are summed from the rank files")
    dropped = [
        {"file": t.path.name, **{k: e.get(k) for k in ("samples", "records", "first_t", "last_t")}}
        for t in [*ranks.values(), *nodes.values()]
        for e in t.events
        if e.get("kind") == fmt.DROPPED
    ]
    if dropped:
        problems.append(incomplete_text(dropped))
    return Run(path=run_dir, spec=spec, ranks=ranks, problems=problems, nodes=nodes, dropped=dropped,
               spec_problem=spec_problem)


def incomplete_text(dropped: list[dict]) -> str:
    """``incomplete: N samples dropped between T1 and T2`` (UTC) over every file."""
    import datetime as dt

    samples = sum(int(d.get("samples") or 0) for d in dropped)
    times = [d[k] for d in dropped for k in ("first_t", "last_t") if isinstance(d.get(k), int)]
    when = lambda ns: dt.datetime.fromtimestamp(ns / 1e9, dt.timezone.utc).strftime("%H:%M:%S")  # noqa: E731
    span = f" between {when(min(times))} and {when(max(times))} UTC" if times else ""
    files = sorted({d["file"] for d in dropped})
    return f"incomplete: {samples:,} samples dropped{span} (the disk was full; {', '.join(files)})"


def guard_event(run_dir: str | Path) -> dict | None:
    """The node watcher's guard event (``kind: guard``), if the guard stopped this run; None
    otherwise. Records come through the reader's own line checks, so garbage that merely
    contains ``"kind":"guard"`` never counts. A node file of an unknown format version is passed
    over, not raised: callers ask at the end of a run, and ``read_run`` refuses that file anyway."""
    for path in sorted((Path(run_dir) / fmt.TIMELINE_DIR).glob("node-*.jsonl")):
        records, _ = _read_records(path)
        if not records or _version_problem(records[0], path) is not None:
            continue
        event = next((r for r in records if r["kind"] == fmt.GUARD), None)
        if event is not None:
            return event
    return None
