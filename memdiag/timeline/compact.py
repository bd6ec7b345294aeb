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
from memdiag.timeline.columnar import (LEVEL_WINDOWS_S, events_path, node_levels, samples_path, write_columnar,
                                       write_node_samples)
from memdiag.timeline.reader import NodeTimeline, Run, RankTimeline, join_watcher_samples, read_node_file, read_rank_file

AUTO_MIN_BYTES = 8 * 2**20
"""``timeline.columnar=auto`` compacts rank files from this size (about ten minutes of a rank at
100 Hz): shorter runs stay one JSONL file each, readable with grep and jq."""

_SAMPLE_PREFIXES = (b'{"kind":"' + fmt.SAMPLES.encode() + b'"', b'{"kind":"' + fmt.SAMPLE.encode() + b'"')
_NODE_SAMPLE_PREFIX = b'{"kind":"' + fmt.SAMPLE.encode() + b'"'


def _rank_samples_prefix(rank: int) -> bytes:
    return b'{"kind":"' + fmt.RANK_SAMPLES.encode() + b'","rank":' + str(rank).encode() + b","


def wanted(mode: str, size_bytes: int) -> bool:
    return mode == "always" or (mode == "auto" and size_bytes >= AUTO_MIN_BYTES)


def _not_compactable(problems: list[str], events: list[dict]) -> str | None:
    if problems:
        return "the reader skipped lines of it"
    if any(e.get("kind") == fmt.COLUMNAR for e in events):
        return "already columnar"
    return None


def _journal(jsonl: Path) -> tuple[bytes, list[bytes]]:
    """A JSONL file's header line and its other lines, as the writer wrote them."""
    header, *rest = jsonl.read_bytes().split(b"\n")
    return header, [line for line in rest if line.strip()]


def compact_rank(timeline: RankTimeline, problems: list[str]) -> str | None:
    """Move one rank file's samples and events into Parquet. ``timeline`` is the file as the
    reader read it whole; returns why it was left as it is, or None when it was compacted."""
    jsonl = timeline.path
    why = _not_compactable(problems, timeline.events)
    if why:
        return why
    header, lines = _journal(jsonl)
    # the writer's own lines (json.dumps with "kind" first); the events keep their bytes and order
    event_lines = [line for line in lines if not line.startswith(_SAMPLE_PREFIXES)]
    # sampler=watcher: the samples are the node file's, joined to the rank by the reader; they
    # move into the rank's Parquet all the same, and the node file drops them afterwards
    has_samples = len(timeline.t_ns) > 0
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
        _failed(jsonl, exc, tmp, *written)
    return None


def _failed(jsonl: Path, exc: OSError | WriteFailed, *partial: Path):
    """A compaction the disk cut short: its partial files removed, the JSONL in charge, and the
    failure raised as ``WriteFailed`` (the report says it in one line)."""
    for path in partial:
        path.unlink(missing_ok=True)
    if isinstance(exc, WriteFailed):
        raise exc
    raise WriteFailed(jsonl, exc, 0) from None


def setting_of(spec: dict) -> str:
    """The run's ``timeline.columnar`` (run.json's config for a case, its top level for a command)."""
    from memdiag.settings import BY_FIELD

    declared = BY_FIELD["timeline_columnar"]
    value = (spec.get("config") or {}).get("timeline_columnar") or spec.get("timeline_columnar")
    return value if value in declared.choices else declared.default


def compact_node_file(node: NodeTimeline, problems: list[str], moved_ranks: set[int]) -> str | None:
    """Move a node file's samples into ``node-<host>.samples.parquet`` (wide: the system figures
    and every rank's, with levels), and drop the ``rank_samples`` of ``moved_ranks`` (now in their
    ranks' Parquet). Its events stay JSONL beside a ``columnar`` record: they are few. Returns why
    it was left as it is, or None when it was compacted."""
    jsonl = node.path
    why = _not_compactable(problems, node.events)
    if why:
        return why
    header, lines = _journal(jsonl)
    moved = tuple(_rank_samples_prefix(rank) for rank in sorted(moved_ranks))
    kept = [line for line in lines if not line.startswith(_NODE_SAMPLE_PREFIX) and not (moved and line.startswith(moved))]
    kept_rank_samples = {rank for rank in node.rank_samples if rank not in moved_ranks}
    if sum(1 for line in kept if not line.startswith(b'{"kind":"' + fmt.RANK_SAMPLES.encode())) != len(node.events):
        return "its lines are not the writer's"
    if not len(node.t_ns):
        return "no samples"
    samples_file = samples_path(jsonl)
    tmp = jsonl.with_name(f"{jsonl.name}.{os.getpid()}.compact")
    try:
        rows = write_node_samples(samples_file, node, node_levels(node))
        record = {"kind": fmt.COLUMNAR, "t": int(node.t_ns[-1]), "samples_file": samples_file.name, "samples": rows[0],
                  "level_rows": rows, "level_windows_s": list(LEVEL_WINDOWS_S),
                  "rank_children_roles": {str(rank): seen for rank, seen in node.rank_children_roles.items()}}
        with open(tmp, "wb") as f:
            f.write(b"\n".join([header, json.dumps(record, separators=(",", ":")).encode(), *kept]) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        after, after_problems = read_node_file(tmp)
        same = (
            after is not None and not after_problems and np.array_equal(after.t_ns, node.t_ns)
            and all(np.array_equal(after.rank_rss.get(rank), values, equal_nan=True) for rank, values in node.rank_rss.items())
            and [e for e in after.events if e.get("kind") != fmt.COLUMNAR] == node.events
            and set(after.rank_samples) == kept_rank_samples
        )
        if not same:  # never trade the journal for something that does not read back whole
            tmp.unlink(missing_ok=True)
            samples_file.unlink(missing_ok=True)
            return "it did not read back the same"
        os.replace(tmp, jsonl)
    except (OSError, WriteFailed) as exc:
        _failed(jsonl, exc, tmp, samples_file)
    return None


def _samples_moved(rank_jsonl: Path) -> bool:
    """The rank file is compacted with its samples in Parquet (the node's copy is then spare)."""
    try:
        with open(rank_jsonl, "rb") as f:
            f.readline()
            record = json.loads(f.readline() or b"{}")
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("kind") == fmt.COLUMNAR and "samples_file" in record


def _rank_size(timeline: RankTimeline, node_share: dict[str, float]) -> int:
    """What ``timeline.columnar=auto`` weighs: the rank file, and with ``sampler=watcher`` its
    share of its node's file, where its samples are."""
    size = timeline.path.stat().st_size
    if timeline.header.get("sampler") == "watcher":
        size += int(node_share.get(timeline.header.get("host"), 0))
    return size


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
    node_share: dict[str, float] = {}
    for host, node in run.nodes.items():
        ranks_here = sum(1 for t in run.ranks.values() if t.header.get("host") == host) or 1
        try:
            node_share[host] = node.path.stat().st_size / ranks_here
        except OSError:
            pass
    for timeline in run.ranks.values():
        try:
            size = _rank_size(timeline, node_share)
        except OSError:
            continue
        if not wanted(mode, size):
            continue
        try:
            if compact_rank(timeline, by_file.get(timeline.path.name, [])) is None:
                done.append(_moved(timeline.path, size))
        except WriteFailed as exc:  # optional work: the JSONL is whole, the report still gets written
            done.append(f"{timeline.path.name} stays JSONL: {exc}")
    for node in run.nodes.values():
        done += _compact_node_file(node, by_file.get(node.path.name, []), mode)
    return done


def _compact_node_file(node: NodeTimeline, problems: list[str], mode: str) -> list[str]:
    """The node file, once the ranks it sampled have their samples in Parquet (or it is large)."""
    moved = {rank for rank in node.rank_samples if _samples_moved(fmt.rank_path(node.path.parent.parent, rank))}
    try:
        size = node.path.stat().st_size
    except OSError:
        return []
    if not (moved or wanted(mode, size)):
        return []
    try:
        if compact_node_file(node, problems, moved) is None:
            return [_moved(node.path, size)]
    except WriteFailed as exc:
        return [f"{node.path.name} stays JSONL: {exc}"]
    return []


def compact_node(run_dir: Path, host: str, mode: str) -> list[str]:
    """A node watcher's share once its ranks have exited: the rank files whose header names this
    node, compacted where they are written, so that a report of many nodes reads Parquet only."""
    if mode == "never":
        return []
    done = []
    node_jsonl = fmt.node_path(run_dir, host)
    node, node_problems = read_node_file(node_jsonl) if node_jsonl.exists() else (None, [])
    here = []
    for path in sorted((Path(run_dir) / fmt.TIMELINE_DIR).glob("rank-*.jsonl")):
        try:
            rank = int(path.stem.split("-", 1)[1])
            with open(path, "rb") as f:
                header = json.loads(f.readline())
        except (ValueError, OSError):
            continue
        if isinstance(header, dict) and header.get("host") == host:
            here.append((path, rank))
    share = {host: node_jsonl.stat().st_size / max(1, len(here))} if node is not None else {}
    for path, rank in here:
        timeline, problems = read_rank_file(path, rank)
        if timeline is None:
            continue
        if node is not None and not len(timeline.t_ns) and len(node.rank_samples.get(rank, {}).get("t", [])):
            join_watcher_samples(timeline, node.rank_samples[rank])  # sampler=watcher: its samples are the node's
        size = _rank_size(timeline, share)
        if wanted(mode, size) and compact_rank(timeline, problems) is None:
            done.append(_moved(path, size))
    if node is not None:
        done += _compact_node_file(node, node_problems, mode)
    return done


def _moved(jsonl: Path, size: int) -> str:
    """``rank-0.jsonl -> rank-0.samples.parquet and rank-0.events.parquet: 1.2 MiB (was 30 MiB of JSONL)``"""
    from memdiag.units import format_bytes

    files = [p for p in (samples_path(jsonl), events_path(jsonl)) if p.exists()]
    return (f"{jsonl.name} -> {' and '.join(p.name for p in files)}: "
            f"{format_bytes(sum(p.stat().st_size for p in files))} (was {format_bytes(size)} of JSONL)")
