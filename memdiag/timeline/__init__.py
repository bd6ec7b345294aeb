"""The run directory's timeline files: one append-only JSONL file per rank and per node."""

from memdiag.timeline.format import FORMAT_VERSION, node_path, rank_path
from memdiag.timeline.reader import Follower, RankTimeline, Run, guard_event, read_run
from memdiag.timeline.writer import TimelineWriter

__all__ = [
    "FORMAT_VERSION",
    "Follower",
    "RankTimeline",
    "Run",
    "TimelineWriter",
    "guard_event",
    "node_path",
    "rank_path",
    "read_run",
]
