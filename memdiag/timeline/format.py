"""Paths and record kinds of the on-disk format (documented in docs/FORMAT.md)."""

from __future__ import annotations

from pathlib import Path

FORMAT_VERSION = "1.7"
"""major.minor: readers refuse an unknown major version and accept any minor. 1.2: a node
sample's rank entries carry their children (``children``, ``children_pss_bytes``, ``children_roles``).
1.7: a rank without children has no children figures in node samples (read as 0)."""

RUN_JSON = "run.json"
SUMMARY_JSON = "summary.json"
REPORT_HTML = "report.html"
TIMELINE_DIR = "timeline"
RANK_FILE = "rank-{rank}.jsonl"
NODE_FILE = "node-{host}.jsonl"

# record kinds ("kind" field); samples are the bulk, events mark moments
HEADER = "header"
SAMPLE = "sample"
SAMPLES = "samples"
"""A batch of a rank's samples, column by column (1.1): one JSON object per flush instead of
one per tick keeps long runs small and fast to read."""
RANK_SAMPLES = "rank_samples"
"""A batch of one rank's host figures taken by the node watcher (``sampler=watcher``, 1.4):
``rank``, ``t``, ``rss_bytes``, ``hwm_bytes``; the reader joins them to the rank's phases and steps."""
DEVICE_SAMPLES = "device_samples"
"""A batch of a rank's device figures read at its hook events, where no sampler thread runs in
the rank (``sampler=watcher`` on CUDA, 1.6): ``t``, ``device_allocated_bytes``,
``device_reserved_bytes``, each the highest the allocator held since the previous point (the
peak ledger's reading at a phase or ZeRO-3 sub-module boundary), under the sampling budget."""
COLUMNAR = "columnar"
"""A compacted rank file's second record (1.5): its samples are in ``samples_file`` (Parquet,
``timeline/columnar.py``) with ``level_rows`` rows at each level of ``level_windows_s``."""
PHASE_BEGIN = "phase_begin"
PHASE_END = "phase_end"
STEP = "step"
MEMORY = "memory"
MODEL = "model"
MODEL_INPUT = "model_input"
GUARD = "guard"
MALLOC = "malloc"
WARNING = "warning"
EXCEPTION = "exception"
"""What ended a rank: an uncaught exception's type, message, the user's file and line (memdiag.failure)."""
KILLED = "killed"
DROPPED = "dropped"
"""Lines a writer could not keep while the disk was full: how many, and between which times."""
ENDED = "ended"
"""The node watcher's last record: why it stopped (the job ended, or memdiag died)."""

FLUSH_INTERVAL_S = 0.1
SOURCE_SYNTHETIC = "synthetic (bench)"


def sample_batch(**columns: list) -> dict:
    """A ``samples`` record from equal-length columns (``t`` first)."""
    return {"kind": SAMPLES, **columns}


def record_values(record: dict, name: str) -> list:
    """The figures ``name`` of a ``samples`` batch or a single ``sample`` (format 1.0), oldest
    first: live followers (``memdiag top``, the metrics) read both shapes through this."""
    if record.get("kind") in (SAMPLES, DEVICE_SAMPLES, RANK_SAMPLES):
        values = record.get(name)
        return values if isinstance(values, list) else []
    value = record.get(name)
    return [] if value is None else [value]


def rank_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / TIMELINE_DIR / RANK_FILE.format(rank=rank)


def node_path(run_dir: Path, host: str) -> Path:
    return Path(run_dir) / TIMELINE_DIR / NODE_FILE.format(host=host)
