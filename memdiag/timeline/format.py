"""Paths and record kinds of the on-disk format (documented in docs/FORMAT.md)."""

from __future__ import annotations

from pathlib import Path

FORMAT_VERSION = "1.0"
"""major.minor: readers refuse an unknown major version and accept any minor."""

RUN_JSON = "run.json"
SUMMARY_JSON = "summary.json"
REPORT_HTML = "report.html"
TIMELINE_DIR = "timeline"
RANK_FILE = "rank-{rank}.jsonl"
NODE_FILE = "node-{host}.jsonl"

# record kinds ("kind" field); samples are the bulk, events mark moments
HEADER = "header"
SAMPLE = "sample"
PHASE_BEGIN = "phase_begin"
PHASE_END = "phase_end"
STEP = "step"
MEMORY = "memory"
MODEL = "model"
MODEL_INPUT = "model_input"
GUARD = "guard"
MALLOC = "malloc"
WARNING = "warning"
KILLED = "killed"

FLUSH_INTERVAL_S = 0.1


def rank_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / TIMELINE_DIR / RANK_FILE.format(rank=rank)


def node_path(run_dir: Path, host: str) -> Path:
    return Path(run_dir) / TIMELINE_DIR / NODE_FILE.format(host=host)
