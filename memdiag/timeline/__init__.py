"""The run directory's timeline files: one append-only JSONL file per rank and per node."""

from memdiag.timeline.format import FORMAT_VERSION, node_path, rank_path
from memdiag.timeline.reader import RankTimeline, Run, read_run
from memdiag.timeline.writer import TimelineWriter

__all__ = [
    "FORMAT_VERSION",
    "RankTimeline",
    "Run",
    "TimelineWriter",
    "node_path",
    "rank_path",
    "read_run",
]
