"""Compaction: an ended run's large rank files moved from JSONL into the columnar files
(``columnar.py``), checked against what the reader read before the JSONL is shortened. A file
the reader had to skip lines of, or a run still going, is left as it is."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from memdiag.files import WriteFailed
from memdiag.timeline import format as fmt
from memdiag.timeline.columnar import events_path, samples_path, write_columnar
from memdiag.timeline.reader import Run, RankTimeline, read_rank_file

AUTO_MIN_BYTES = 8 * 2**20
"""``timeline.columnar=auto`` compacts rank files from this size (about ten minutes of a rank at
100 Hz): shorter runs stay one JSONL file each, readable with grep and jq."""

_SAMPLE_PREFIXES = (b'{"kind":"' + fmt.SAMPLES.encode() + b'"', b'{"kind":"' + fmt.SAMPLE.encode() + b'"')


def wanted(mode: str, size_bytes: int) -> bool:
    return mode == "always" or (mode == "auto" and size_bytes >= AUTO_MIN_BYTES)


def compact_rank(timeline: RankTimeline, problems: list[str]) -> str | None:
    """Move one rank file's samples and events into Parquet. ``timeline`` is the file as the
    reader read it whole; returns why it was left as it is, or None when it was compacted."""
    jsonl = timeline.path
    if problems:
        return "the reader skipped lines of it"
    if any(e.get("kind") == fmt.COLUMNAR for e in timeline.events):
        return "already columnar"
    header, *rest = jsonl.read_bytes().split(b"\n")
    lines = [line for line in rest if line.strip()]
    # the writer's own lines (json.dumps with "kind" first); the events keep their bytes and order
    event_lines = [line for line in lines if not line.startswith(_SAMPLE_PREFIXES)]
    has_samples = len(event_lines) < len(lines)  # sampler=watcher: the node file holds them
    if len(event_lines) != len(timeline.events):
        return "its lines are not the writer's"
    if not event_lines and not has_samples:
        return "nothing recorded"
    written: list[Path] = []
    tmp = jsonl.with_name(f"{jsonl.name}.{os.getpid()}.compact")
    try:
        if has_samples:
            written.append(samples_path(jsonl))
        if event_lines:
            written.append(events_path(jsonl))
        body = write_columnar(jsonl, header, timeline if has_samples else None, timeline.events, event_lines)
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        after, after_problems = read_rank_file(tmp, timeline.rank)
        same = (
            after is not None and not after_problems
            and (not has_samples or np.array_equal(after.t_ns, timeline.t_ns))
            and [e for e in after.events if e.get("kind") != fmt.COLUMNAR] == timeline.events
        )
        if not same:  # never trade the journal for something that does not read back whole
            tmp.unlink(missing_ok=True)
            for path in written:
                path.unlink(missing_ok=True)
            return "it did not read back the same"
        os.replace(tmp, jsonl)
    except (OSError, WriteFailed) as exc:
        tmp.unlink(missing_ok=True)
        for path in written:
            path.unlink(missing_ok=True)
        if isinstance(exc, WriteFailed):
            raise
        raise WriteFailed(jsonl, exc, 0) from None
    return None


def setting_of(spec: dict) -> str:
    """The run's ``timeline.columnar`` (run.json's config for a case, its top level for a command)."""
    from memdiag.settings import BY_FIELD

    declared = BY_FIELD["timeline_columnar"]
    value = (spec.get("config") or {}).get("timeline_columnar") or spec.get("timeline_columnar")
    return value if value in declared.choices else declared.default


def compact_run(run: Run) -> list[str]:
    """Compact every rank file of an ended run that the setting asks for (what the node watchers
    left, or every file of a run they did not compact); returns one line per file moved, or kept
    as JSONL because the disk would not take its Parquet."""
    mode = setting_of(run.spec)
    if mode == "never" or run.spec.get("status") in (None, "running"):
        return []
    done = []
    by_file: dict[str, list[str]] = {}
    for problem in run.problems:
        by_file.setdefault(problem.split(":", 1)[0], []).append(problem)
    for timeline in run.ranks.values():
        try:
            size = timeline.path.stat().st_size
        except OSError:
            continue
        if not wanted(mode, size):
            continue
        try:
            if compact_rank(timeline, by_file.get(timeline.path.name, [])) is None:
                done.append(_moved(timeline.path, size))
        except WriteFailed as exc:  # optional work: the JSONL is whole, the report still gets written
            done.append(f"{timeline.path.name} stays JSONL: {exc}")
    return done


def compact_node(run_dir: Path, host: str, mode: str) -> list[str]:
    """A node watcher's share once its ranks have exited: the rank files whose header names this
    node, compacted where they are written, so that a report of many nodes reads Parquet only."""
    if mode == "never":
        return []
    done = []
    for path in sorted((Path(run_dir) / fmt.TIMELINE_DIR).glob("rank-*.jsonl")):
        try:
            rank = int(path.stem.split("-", 1)[1])
            size = path.stat().st_size
            with open(path, "rb") as f:
                header = json.loads(f.readline())
        except (ValueError, OSError):
            continue
        if not isinstance(header, dict) or header.get("host") != host or not wanted(mode, size):
            continue
        timeline, problems = read_rank_file(path, rank)
        if timeline is not None and compact_rank(timeline, problems) is None:
            done.append(_moved(path, size))
    return done


def _moved(jsonl: Path, size: int) -> str:
    """``rank-0.jsonl -> rank-0.samples.parquet and rank-0.events.parquet: 1.2 MiB (was 30 MiB of JSONL)``"""
    from memdiag.units import format_bytes

    files = [p for p in (samples_path(jsonl), events_path(jsonl)) if p.exists()]
    return (f"{jsonl.name} -> {' and '.join(p.name for p in files)}: "
            f"{format_bytes(sum(p.stat().st_size for p in files))} (was {format_bytes(size)} of JSONL)")
