"""Long runs' samples and events as Parquet, with the coarse levels a report reads instead of
every row: the files' layout, their levels, their writer and their reader (``compact.py`` moves
an ended run's JSONL into them; ``reader.py`` reads both).

While a run goes, each rank appends JSONL (``writer.py``): a SIGKILL loses at most the last
flush and a torn tail reads up to the last whole line, which a Parquet file, whole only once its
footer is written, cannot promise. Once the run has ended, a rank's samples go to
``rank-R.samples.parquet`` (zstd; pandas, polars, DuckDB and pyarrow read it as it is) and its
events to ``rank-R.events.parquet``, and ``rank-R.jsonl`` keeps its header and a ``columnar``
record that names them (format 1.5).

Levels: every row carries ``keep``, the coarsest level that keeps it. Level k
(``LEVEL_WINDOWS_S[k-1]`` wide windows from the first sample) keeps, per window, the samples
holding each figure's lowest and highest value and the window's last sample, so a one-sample
spike survives every level and a level is a plain subset of the rows: every reader of samples
(checks, report, calibration) reads a level as it reads all of them. ``read_run(max_samples=)``
picks the finest level within its budget.

Events go the same way, into ``rank-R.events.parquet``: each row holds the event's JSON line as
written (``json``) beside the fields its level is chosen by, so reading every level back gives
the very records the JSONL held. The training loop writes about a dozen events a step
(forward, backward, step and optimizer_step phases, categorised memory, the step itself), which
in a day's run outweigh the samples; a level keeps, per window and phase, the phase with the
highest host peak, the one with the highest device peak and the last one (begin and end
together), likewise the memory record with the highest allocator figure and the last, the
window's last step, and every event outside the loop, so each phase's exact peak survives
every level.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from memdiag.files import WriteFailed
from memdiag.timeline import format as fmt

LEVEL_WINDOWS_S = (1.0, 10.0, 60.0, 600.0, 3600.0)
"""An hour is the coarsest (1.7): 512 ranks of a day at the 600 s level still held about 2,900
events a rank (each window keeps every loop phase's peaks), 1.5 GiB once read; at an hour, 500."""
LEVEL_FIGURES = ("rss_bytes", "hwm_bytes", "device_allocated_bytes", "device_reserved_bytes", "nvml_used_bytes")
METADATA_KEY = b"memdiag"


def samples_path(jsonl: Path) -> Path:
    return jsonl.with_name(jsonl.name.removesuffix(".jsonl") + ".samples.parquet")


def events_path(jsonl: Path) -> Path:
    return jsonl.with_name(jsonl.name.removesuffix(".jsonl") + ".events.parquet")


def sample_levels(t_ns: np.ndarray, columns: dict[str, np.ndarray], figures: tuple[str, ...] = LEVEL_FIGURES) -> np.ndarray:
    """Per sample, the coarsest level that keeps it (0: only the full resolution): each window's
    last sample and those holding the lowest and highest of each of ``figures``."""
    n = len(t_ns)
    keep = np.zeros(n, dtype=np.uint8)
    if n == 0:
        return keep
    keep[[0, -1]] = len(LEVEL_WINDOWS_S)
    offset = t_ns - t_ns.min()
    for level, window_s in enumerate(LEVEL_WINDOWS_S, start=1):
        window = offset // int(window_s * 1e9)
        chosen = [np.flatnonzero(np.append(window[1:] != window[:-1], True))]  # each window's last sample
        for name in figures:
            values = columns.get(name)
            if values is None or np.all(np.isnan(values)):
                continue
            for filler in (np.inf, -np.inf):  # lowest, then highest, of each window
                order = np.lexsort((np.where(np.isnan(values), filler, values), window))
                w = window[order]
                ends = np.append(w[1:] != w[:-1], True)
                chosen.append(order[ends] if filler == -np.inf else order[np.append(True, ends[:-1])])
        selected = np.concatenate(chosen)
        keep[selected] = np.maximum(keep[selected], level)
    return keep


LOOP_PHASES = frozenset({"forward", "backward", "step", "optimizer_step"})
"""The phases the hooks open every micro-step or step; other phases (load, initialize, save)
happen a few times a run and are kept at every level."""


def _window_maxima(window: np.ndarray, group: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Indices of the highest value of each (window, group) block (NaN never wins over a number)."""
    order = np.lexsort((np.where(np.isnan(values), -np.inf, values), group, window))
    w, g = window[order], group[order]
    ends = np.append((w[1:] != w[:-1]) | (g[1:] != g[:-1]), True)
    return order[ends]


def event_levels(events: list[dict]) -> np.ndarray:
    """Per event, the coarsest level that keeps it (see the module's docstring)."""
    top = len(LEVEL_WINDOWS_S)
    keep = np.full(len(events), top, dtype=np.uint8)
    units: list[tuple[int, ...]] = []  # rows that stand or fall together
    unit_t, unit_group, unit_scores = [], [], []
    open_phases: list[tuple[str, int]] = []
    groups: dict[str, int] = {}
    for i, event in enumerate(events):
        kind, t = event.get("kind"), event.get("t")
        if kind == fmt.PHASE_BEGIN and event.get("phase") in LOOP_PHASES:
            open_phases.append((event["phase"], i))
        elif kind == fmt.PHASE_END and open_phases and open_phases[-1][0] == event.get("phase"):
            name, begin = open_phases.pop()
            units.append((begin, i))
            unit_t.append(events[begin]["t"])
            unit_group.append(groups.setdefault("phase:" + name, len(groups)))
            unit_scores.append((event.get("host_peak_bytes"), event.get("device_peak_bytes")))
        elif kind in (fmt.STEP, fmt.MEMORY) and isinstance(t, int):
            units.append((i,))
            unit_t.append(t)
            unit_group.append(groups.setdefault(f"{kind}:{event.get('phase', '')}", len(groups)))
            unit_scores.append((event.get("allocator_bytes"), None) if kind == fmt.MEMORY else (None, None))
    if not units:
        return keep
    for unit in units:
        keep[list(unit)] = 0
    t = np.array(unit_t, dtype=np.int64)
    group = np.array(unit_group, dtype=np.int64)
    scores = np.array([[np.nan if v is None else float(v) for v in pair] for pair in unit_scores], dtype=np.float64).reshape(len(units), 2)
    unit_keep = np.zeros(len(units), dtype=np.uint8)
    firsts = np.unique(group, return_index=True)[1]
    unit_keep[firsts] = top  # each kind of loop event's first and last
    unit_keep[len(group) - 1 - np.unique(group[::-1], return_index=True)[1]] = top
    sequence = np.arange(len(units), dtype=np.float64)
    for level, window_s in enumerate(LEVEL_WINDOWS_S, start=1):
        window = (t - t.min()) // int(window_s * 1e9)
        chosen = [_window_maxima(window, group, sequence)]  # the last of each block
        for column in range(2):
            if not np.all(np.isnan(scores[:, column])):
                chosen.append(_window_maxima(window, group, scores[:, column]))
        selected = np.concatenate(chosen)
        unit_keep[selected] = np.maximum(unit_keep[selected], level)
    for unit, level in zip(units, unit_keep.tolist()):
        keep[list(unit)] = level
    return keep


def write_events(path: Path, lines: list[bytes], events: list[dict], keep: np.ndarray) -> list[int]:
    """The events as Parquet, in file order: the JSON line as written and its level."""
    import pyarrow as pa

    table = pa.table({
        "kind": pa.array([e.get("kind") for e in events], type=pa.string()).dictionary_encode(),
        "t": pa.array([e.get("t") if isinstance(e.get("t"), int) else None for e in events], type=pa.int64()),
        "phase": pa.array([e.get("phase") if isinstance(e.get("phase"), str) else None for e in events], type=pa.string()).dictionary_encode(),
        "json": pa.array([line.decode() for line in lines], type=pa.string()),
        "keep": pa.array(keep, type=pa.uint8()),
    })
    return _write_table(path, table, keep, {"rank_events": len(events)})


def read_event_lines(path: Path, level: int = 0) -> list[str]:
    """The events of an events file at ``level``, each the JSON line the writer wrote, in order."""
    import pyarrow.parquet as pq

    table = _in_order(pq.read_table(path, columns=["json", "seq"], filters=[("keep", ">=", level)] if level else None))
    return table.column("json").to_pylist()


def _in_order(table):
    import pyarrow as pa

    return table.take(pa.array(np.argsort(table.column("seq").to_numpy(), kind="stable")))


ROW_GROUP_ROWS = 16_384


def _write_table(path: Path, table, keep: np.ndarray, meta: dict) -> list[int]:
    """Rows stored coarsest level first (``seq`` holds the original order), in row groups of
    ``ROW_GROUP_ROWS``: a coarse read skips the other groups by their ``keep`` statistics."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [int(np.count_nonzero(keep >= level)) for level in range(len(LEVEL_WINDOWS_S) + 1)]
    meta = {"format_version": fmt.FORMAT_VERSION, "level_windows_s": list(LEVEL_WINDOWS_S), "level_rows": rows,
            "order": "coarsest level first; seq is the order written (ORDER BY seq)", **meta}
    seq = np.arange(len(keep), dtype=np.int64)
    order = np.lexsort((seq, -keep.astype(np.int16)))
    table = table.append_column("seq", pa.array(seq)).take(pa.array(order))
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # a node watcher and a report may both compact
    try:
        # integers that move a little from row to row (times, bytes, steps, seq) shrink to half
        # with delta encoding; strings go through dictionaries, the events' JSON through zstd
        integers = [f.name for f in table.schema if pa.types.is_integer(f.type) and f.name != "keep"]
        strings = [f.name for f in table.schema if pa.types.is_dictionary(f.type)]
        pq.write_table(table, tmp, compression="zstd", row_group_size=ROW_GROUP_ROWS, use_dictionary=strings,
                       column_encoding={name: "DELTA_BINARY_PACKED" for name in integers})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise WriteFailed(path, exc, int(table.nbytes)) from None
    return rows


def write_samples(path: Path, timeline, keep: np.ndarray) -> list[int]:
    """The rank's samples as Parquet; returns the rows each level holds (level 0 first)."""
    import pyarrow as pa

    names = timeline.phase_names or [""]
    arrays = {
        "t_ns": pa.array(timeline.t_ns, type=pa.int64()),
        "phase": pa.DictionaryArray.from_arrays(pa.array(timeline.sample_phase_codes.astype(np.int32)), pa.array(names, type=pa.string())),
        "step": pa.array(timeline.sample_step, type=pa.int64()),
    }
    for name, values in timeline.columns.items():
        missing = np.isnan(values)
        arrays[name] = pa.array(np.where(missing, 0, values).astype(np.int64), mask=missing, type=pa.int64())
    arrays["keep"] = pa.array(keep, type=pa.uint8())
    return _write_table(path, pa.table(arrays), keep, {"rank": timeline.rank})


def level_for(record: dict, max_rows: int | None) -> int:
    """The finest level of a ``columnar`` record with at most ``max_rows`` rows (the coarsest
    when none is that small; 0, every sample, without a budget)."""
    rows = record.get("level_rows") or []
    if max_rows is None or not rows:
        return 0
    return next((level for level, count in enumerate(rows) if count <= max_rows), len(rows) - 1)


def read_samples(path: Path, level: int = 0):
    """(t_ns, columns, (phase codes, phase names), step) of a samples file at ``level``; a
    figure's column is NaN where a sample lacked it."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = _in_order(pq.read_table(path, filters=[("keep", ">=", level)] if level else None)).unify_dictionaries()
    phase = table.column("phase").combine_chunks()
    names = [str(v) for v in phase.dictionary.to_pylist()]
    columns = {
        name: pc.cast(table.column(name), "float64").to_numpy(zero_copy_only=False)
        for name in table.column_names if name not in ("t_ns", "phase", "step", "keep", "seq")
    }
    codes = phase.indices.to_numpy(zero_copy_only=False).astype(np.int16)
    return table.column("t_ns").to_numpy(), columns, (codes, names), table.column("step").to_numpy()


def write_columnar(jsonl: Path, header_line: bytes, samples, events: list[dict], event_lines: list[bytes],
                   event_keep: np.ndarray | None = None) -> bytes:
    """Write a rank's samples (a timeline's columns, or None) and events into their Parquet files
    beside ``jsonl``; returns what ``jsonl`` then holds: its header line and the ``columnar``
    record. Compaction and the scaling benchmark write runs through this one function."""
    times = [e["t"] for e in events if isinstance(e.get("t"), int)] + ([int(samples.t_ns[-1])] if samples is not None and len(samples.t_ns) else [])
    record: dict = {"kind": fmt.COLUMNAR, "t": max(times, default=0), "level_windows_s": list(LEVEL_WINDOWS_S)}
    if samples is not None:
        rows = write_samples(samples_path(jsonl), samples, sample_levels(samples.t_ns, samples.columns))
        record |= {"samples_file": samples_path(jsonl).name, "samples": rows[0], "level_rows": rows}
    if event_lines:
        keep = event_levels(events) if event_keep is None else event_keep
        rows = write_events(events_path(jsonl), event_lines, events, keep)
        record |= {"events_file": events_path(jsonl).name, "events": rows[0], "event_level_rows": rows,
                   "steps": sum(1 for e in events if e.get("kind") == fmt.STEP)}
    return b"\n".join([header_line, json.dumps(record, separators=(",", ":")).encode()]) + b"\n"


NODE_RANK_FIGURES = ("rss_bytes", "pss_bytes", "children_rss_bytes", "children_pss_bytes")
"""A node file's per-rank columns, ``rank_<R>_<figure>`` in its Parquet (RSS and PSS with the
rank's children included, as ``NodeTimeline`` holds them)."""
NODE_LEVEL_FIGURES = ("ranks_total_bytes", "mem_available_bytes", "cgroup_usage_bytes", "pss_total_bytes")


def node_columns(node) -> dict[str, np.ndarray]:
    """A ``NodeTimeline``'s arrays as the Parquet's columns (wide: one column per rank and figure)."""
    columns = dict(node.columns)
    by_figure = {"rss_bytes": node.rank_rss, "pss_bytes": node.rank_pss,
                 "children_rss_bytes": node.rank_children_rss, "children_pss_bytes": node.rank_children_pss}
    for figure, per_rank in by_figure.items():
        for rank, values in per_rank.items():
            columns[f"rank_{rank}_{figure}"] = values
    return columns


def node_levels(node) -> np.ndarray:
    """The node samples' levels: per window the ranks' highest and lowest total, the lowest
    MemAvailable, the highest cgroup usage and PSS total, and the last (what the guard, the
    forecast and the checks read of a node)."""
    n = len(node.t_ns)
    ranks_total = np.full(n, np.nan)
    if node.rank_rss:
        stacked = np.vstack(list(node.rank_rss.values()))
        ranks_total = np.where(np.all(np.isnan(stacked), axis=0), np.nan, np.nansum(stacked, axis=0))
    figures = {"ranks_total_bytes": ranks_total, "mem_available_bytes": node.columns.get("mem_available_bytes"),
               "cgroup_usage_bytes": node.columns.get("cgroup_usage_bytes"), "pss_total_bytes": node.pss_total()}
    return sample_levels(node.t_ns, figures, NODE_LEVEL_FIGURES)


def write_node_samples(path: Path, node, keep: np.ndarray) -> list[int]:
    """A node's samples as Parquet; returns the rows each level holds (level 0 first)."""
    import pyarrow as pa

    arrays = {"t_ns": pa.array(node.t_ns, type=pa.int64())}
    for name, values in node_columns(node).items():
        values = np.asarray(values, dtype=np.float64)
        missing = np.isnan(values)
        arrays[name] = pa.array(np.where(missing, 0, values).astype(np.int64), mask=missing, type=pa.int64())
    arrays["keep"] = pa.array(keep, type=pa.uint8())
    return _write_table(path, pa.table(arrays), keep, {"host": node.host})


def read_node_samples(path: Path, level: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, dict[int, np.ndarray]]]:
    """(t_ns, system columns, {figure: {rank: values}}) of a node's samples file at ``level``."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = _in_order(pq.read_table(path, filters=[("keep", ">=", level)] if level else None))
    system: dict[str, np.ndarray] = {}
    per_rank: dict[str, dict[int, np.ndarray]] = {figure: {} for figure in NODE_RANK_FIGURES}
    for name in table.column_names:
        if name in ("t_ns", "keep", "seq"):
            continue
        values = pc.cast(table.column(name), "float64").to_numpy(zero_copy_only=False)
        if name.startswith("rank_"):
            rank, figure = name[len("rank_"):].split("_", 1)
            per_rank.setdefault(figure, {})[int(rank)] = values
        else:
            system[name] = values
    return table.column("t_ns").to_numpy(), system, per_rank
