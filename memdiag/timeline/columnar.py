"""Long runs' samples as Parquet, with the coarse levels a report reads instead of every sample.

While a run goes, each rank appends JSONL (``writer.py``): a SIGKILL loses at most the last
flush and a torn tail reads up to the last whole line, which a Parquet file, whole only once its
footer is written, cannot promise. Once the run has ended, ``compact_run`` moves each large rank
file's sample batches into ``rank-R.samples.parquet`` (zstd; pandas, polars, DuckDB and pyarrow
read it as it is) and rewrites ``rank-R.jsonl`` with its events alone behind a ``columnar``
record that names the Parquet file (format 1.5). A file the reader had to skip lines of is left
as it is: the problems it reports stay true.

Levels: every row carries ``keep``, the coarsest level that keeps it. Level k
(``LEVEL_WINDOWS_S[k-1]`` wide windows from the first sample) keeps, per window, the samples
holding each figure's lowest and highest value and the window's last sample, so a one-sample
spike survives every level and a level is a plain subset of the rows: every reader of samples
(checks, report, calibration) reads a level as it reads all of them. ``read_run(max_samples=)``
picks the finest level within its budget.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from memdiag.files import WriteFailed
from memdiag.timeline import format as fmt

LEVEL_WINDOWS_S = (1.0, 10.0, 60.0, 600.0)
LEVEL_FIGURES = ("rss_bytes", "hwm_bytes", "device_allocated_bytes", "device_reserved_bytes", "nvml_used_bytes")
AUTO_MIN_BYTES = 8 * 2**20
"""``timeline.columnar=auto`` compacts rank files from this size (about ten minutes of a rank at
100 Hz): shorter runs stay one JSONL file each, readable with grep and jq."""
METADATA_KEY = b"memdiag"
CHOICES = ("auto", "always", "never")


def samples_path(jsonl: Path) -> Path:
    return jsonl.with_name(jsonl.name.removesuffix(".jsonl") + ".samples.parquet")


def sample_levels(t_ns: np.ndarray, columns: dict[str, np.ndarray]) -> np.ndarray:
    """Per sample, the coarsest level that keeps it (0: only the full resolution)."""
    n = len(t_ns)
    keep = np.zeros(n, dtype=np.uint8)
    if n == 0:
        return keep
    keep[[0, -1]] = len(LEVEL_WINDOWS_S)
    offset = t_ns - t_ns.min()
    for level, window_s in enumerate(LEVEL_WINDOWS_S, start=1):
        window = offset // int(window_s * 1e9)
        chosen = [np.flatnonzero(np.append(window[1:] != window[:-1], True))]  # each window's last sample
        for name in LEVEL_FIGURES:
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


def write_samples(path: Path, timeline, keep: np.ndarray) -> list[int]:
    """The rank's samples as Parquet; returns the rows each level holds (level 0 first)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

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
    rows = [int(np.count_nonzero(keep >= level)) for level in range(len(LEVEL_WINDOWS_S) + 1)]
    meta = {"format_version": fmt.FORMAT_VERSION, "rank": timeline.rank, "level_windows_s": list(LEVEL_WINDOWS_S), "level_rows": rows}
    table = pa.table(arrays).replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})
    tmp = path.with_name(path.name + ".tmp")
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise WriteFailed(path, exc, int(table.nbytes)) from None
    return rows


def level_for(record: dict, max_rows: int | None) -> int:
    """The finest level of a ``columnar`` record with at most ``max_rows`` rows (the coarsest
    when none is that small; 0, every sample, without a budget)."""
    rows = record.get("level_rows") or []
    if max_rows is None or not rows:
        return 0
    return next((level for level, count in enumerate(rows) if count <= max_rows), len(rows) - 1)


def read_samples(path: Path, level: int = 0):
    """(t_ns, columns, (phase codes, phase names), step) of a samples file at ``level``, as the
    JSONL reader returns them; columns NaN where a figure is missing."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from memdiag.timeline.reader import SAMPLE_COLUMNS

    table = pq.read_table(path, filters=[("keep", ">=", level)] if level else None).unify_dictionaries()
    phase = table.column("phase").combine_chunks()
    names = [str(v) for v in phase.dictionary.to_pylist()]
    columns = {}
    for name in SAMPLE_COLUMNS:
        if name in table.column_names:
            columns[name] = pc.cast(table.column(name), "float64").to_numpy(zero_copy_only=False)
        else:
            columns[name] = np.full(table.num_rows, np.nan)
    codes = phase.indices.to_numpy(zero_copy_only=False).astype(np.int16)
    return table.column("t_ns").to_numpy(), columns, (codes, names), table.column("step").to_numpy()


def wanted(mode: str, size_bytes: int) -> bool:
    return mode == "always" or (mode == "auto" and size_bytes >= AUTO_MIN_BYTES)


_SAMPLE_PREFIXES = (b'{"kind":"' + fmt.SAMPLES.encode() + b'"', b'{"kind":"' + fmt.SAMPLE.encode() + b'"')


def compact_rank(timeline, problems: list[str]) -> str | None:
    """Move one rank file's samples into Parquet. ``timeline`` is the file as the reader read it
    whole; returns why it was left as it is, or None when it was compacted."""
    from memdiag.timeline.reader import read_rank_file

    jsonl = timeline.path
    if problems:
        return "the reader skipped lines of it"
    if any(e.get("kind") == fmt.COLUMNAR for e in timeline.events):
        return "already columnar"
    if not len(timeline.t_ns):
        return "no samples"
    lines = jsonl.read_bytes().split(b"\n")
    # the writer's own lines (json.dumps with "kind" first); the events keep their bytes and order
    events = [line for line in lines[1:] if line.strip() and not line.startswith(_SAMPLE_PREFIXES)]
    if len(events) == sum(1 for line in lines[1:] if line.strip()):
        return "its samples are in another file (sampler=watcher)"
    target = samples_path(jsonl)
    rows = write_samples(target, timeline, sample_levels(timeline.t_ns, timeline.columns))
    record = {"kind": fmt.COLUMNAR, "t": int(timeline.t_ns[-1]), "samples_file": target.name, "samples": rows[0],
              "level_windows_s": list(LEVEL_WINDOWS_S), "level_rows": rows}
    body = b"\n".join([lines[0], json.dumps(record, separators=(",", ":")).encode(), *events]) + b"\n"
    tmp = jsonl.with_name(jsonl.name + ".compact")
    try:
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        after, after_problems = read_rank_file(tmp, timeline.rank)
        same = (
            after is not None and not after_problems
            and np.array_equal(after.t_ns, timeline.t_ns) and len(after.events) == len(timeline.events) + 1
        )
        if not same:  # never trade the journal for something that does not read back whole
            tmp.unlink(missing_ok=True)
            target.unlink(missing_ok=True)
            return "it did not read back the same"
        os.replace(tmp, jsonl)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        target.unlink(missing_ok=True)
        raise WriteFailed(jsonl, exc, len(body)) from None
    return None


def setting_of(spec: dict) -> str:
    """The run's ``timeline.columnar`` (run.json's config for a case, its top level for a command)."""
    value = (spec.get("config") or {}).get("timeline_columnar") or spec.get("timeline_columnar") or "auto"
    return value if value in CHOICES else "auto"


def compact_run(run) -> list[str]:
    """Compact every rank file of an ended run that the setting asks for; returns one line per
    file moved (``rank-0.jsonl: 1,234,567 samples -> rank-0.samples.parquet, 12.3 MiB``)."""
    from memdiag.units import format_bytes

    mode = setting_of(run.spec)
    if mode == "never" or run.spec.get("status") in (None, "running"):
        return []
    done = []
    by_file = {}
    for problem in run.problems:
        by_file.setdefault(problem.split(":", 1)[0], []).append(problem)
    for timeline in run.ranks.values():
        try:
            size = timeline.path.stat().st_size
        except OSError:
            continue
        if not wanted(mode, size) or timeline.header.get("sampler") == "watcher":
            continue
        if compact_rank(timeline, by_file.get(timeline.path.name, [])) is None:
            target = samples_path(timeline.path)
            done.append(f"{timeline.path.name}: {len(timeline.t_ns):,} samples -> {target.name}, "
                        f"{format_bytes(target.stat().st_size)} (was {format_bytes(size)} of JSONL)")
    return done
