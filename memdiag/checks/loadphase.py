"""Load-phase figures per rank, shared by the host-limit, 5290 and not-released checks."""

from __future__ import annotations

from dataclasses import dataclass

from memdiag.timeline.reader import Phase, RankTimeline, Run

LOAD_PHASES = ("model_build", "zero_init", "checkpoint_load")
LOAD = "load"
"""memdiag's own phase from its start in the process to deepspeed.initialize: the load phase
of any script, where the case's ``model_build`` is not there to mark it."""


@dataclass(frozen=True)
class RankLoad:
    rank: int
    host: str
    local_world_size: int
    baseline_bytes: int
    """RSS just before the model build (the process's runtime: imports, process group)."""
    load_peak_bytes: int
    """Exact host peak of the load phases (model build and checkpoint load)."""
    init_peak_bytes: int | None
    """Exact host peak of ``deepspeed.initialize``."""
    load_end_ns: int
    built_under_zero_init: bool
    read_checkpoint: bool

    @property
    def model_bytes(self) -> int:
        """What loading the model cost this rank: load peak minus the runtime before it."""
        return self.load_peak_bytes - self.baseline_bytes


def _first(phases: list[Phase], names: tuple[str, ...]) -> Phase | None:
    return next((p for p in phases if p.name in names and p.end_ns is not None), None)


def rank_load(timeline: RankTimeline) -> RankLoad | None:
    phases = timeline.phases
    outer = _first(phases, ("model_build",)) or _first(phases, LOAD_PHASES) or _first(phases, (LOAD,))
    init = _first(phases, ("ds_initialize",))
    if outer is None or outer.begin_rss_bytes is None or outer.host_peak_bytes is None:
        return None
    inside = [p for p in phases if outer.begin_ns <= p.begin_ns and p.end_ns and p.end_ns <= outer.end_ns]
    return RankLoad(
        rank=timeline.rank,
        host=timeline.header.get("host", "?"),
        local_world_size=int(timeline.header.get("local_world_size", 1)),
        baseline_bytes=outer.begin_rss_bytes,
        load_peak_bytes=max(p.host_peak_bytes or 0 for p in inside),
        init_peak_bytes=init.host_peak_bytes if init else None,
        load_end_ns=outer.end_ns,
        built_under_zero_init=any(p.name == "zero_init" for p in inside),
        read_checkpoint=any(p.name == "checkpoint_load" for p in inside),
    )


def run_loads(run: Run) -> list[RankLoad]:
    return [load for t in run.ranks.values() if (load := rank_load(t)) is not None]


def model_event(run: Run, kind: str = "model") -> dict | None:
    for timeline in run.ranks.values():
        for event in timeline.events:
            if event["kind"] == kind:
                return event
    return None


def num_parameters(run: Run) -> int | None:
    event = model_event(run)
    return run.spec.get("num_parameters") or (event or {}).get("num_parameters")
