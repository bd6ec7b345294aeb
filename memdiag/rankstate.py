"""What each of a node's ranks is doing now, as the node watcher learns it from their timeline
files while the run goes: the open phases, the step, the latest device figures.

One follower per rank file serves both readers in the watcher: the sampling budget of the ranks
it samples from outside (``sampler=watcher``) and of its node samples, and the live metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from memdiag.timeline import format as fmt
from memdiag.timeline.reader import Follower

DEVICE_FIGURES = ("device_allocated_bytes", "device_reserved_bytes", "nvml_used_bytes")


@dataclass
class RankState:
    """Fed with a rank's records in file order; phases nest as the rank's tracker nests them."""

    open_phases: list[str] = field(default_factory=list)
    step: int = 0
    sampled_phase: str | None = None
    """The phase of the rank's latest own sample (``sampler=rank``), for a file without phase records."""
    figures: dict[str, float] = field(default_factory=dict)
    seen_phases: bool = False
    device_source: str | None = None
    """The rank's device (its header's ``device_source``): whether NVML should list its process."""

    @property
    def phase(self) -> str:
        if self.open_phases:
            return self.open_phases[-1]
        return "" if self.seen_phases or self.sampled_phase is None else self.sampled_phase

    def feed(self, record: dict) -> None:
        kind = record.get("kind")
        if kind == fmt.HEADER:
            self.device_source = record.get("device_source")
        elif kind == fmt.PHASE_BEGIN and isinstance(record.get("phase"), str):
            self.seen_phases = True
            self.open_phases.append(record["phase"])
        elif kind == fmt.PHASE_END and record.get("phase") in self.open_phases:
            # the innermost open phase of that name, as the tracker ends it
            del self.open_phases[len(self.open_phases) - 1 - self.open_phases[::-1].index(record["phase"])]
        elif kind == fmt.STEP and isinstance(record.get("step"), int):
            self.step = record["step"]
        if kind in (fmt.SAMPLES, fmt.SAMPLE, fmt.DEVICE_SAMPLES, fmt.PHASE_BEGIN):
            for name in DEVICE_FIGURES:
                values = fmt.record_values(record, name)
                last = values[-1] if values else None
                if isinstance(last, int | float) and not isinstance(last, bool):
                    self.figures[name] = last
        if kind in (fmt.SAMPLES, fmt.SAMPLE):
            phases, steps = fmt.record_values(record, "phase"), fmt.record_values(record, "step")
            if phases and isinstance(phases[-1], str):
                self.sampled_phase = phases[-1]
            if steps and isinstance(steps[-1], int):
                self.step = max(self.step, steps[-1])


class RankFollowers:
    """Each rank's timeline file followed from where it was last read."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._followers: dict[int, Follower] = {}
        self.states: dict[int, RankState] = {}

    def refresh(self, ranks) -> dict[int, RankState]:
        for rank in ranks:
            rank = int(rank)
            follower = self._followers.get(rank)
            if follower is None:
                follower = self._followers[rank] = Follower(fmt.rank_path(self.run_dir, rank))
            state = self.states.setdefault(rank, RankState())
            for record in follower.new_records():
                state.feed(record)
        return self.states
