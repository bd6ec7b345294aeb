"""Load-phase figures per rank, shared by the host-limit, 5290 and not-released checks."""

from __future__ import annotations

from dataclasses import dataclass

from memdiag.units import format_bytes
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


TRAINING_PHASES = ("ds_initialize", "forward", "backward", "step", "optimizer_step")
STATE_BYTES_PER_PARAM = 16
"""bf16 parameters and gradients, fp32 master and Adam's two moments: ZeRO-3 divides them by
the ranks; on the CPU accelerator they sit in host RAM."""


@dataclass(frozen=True)
class NodeForecast:
    """Host RAM of one node of k ranks, from one run of any rank count: loading scales with
    the ranks (k x a rank's load peak); training holds a fixed part per rank plus the model's
    states once per node (k shares of 1/k)."""

    load_per_rank_bytes: int
    train_fixed_per_rank_bytes: int
    states_per_node_bytes: int

    def node_bytes(self, k: int) -> int:
        return max(k * self.load_per_rank_bytes, k * self.train_fixed_per_rank_bytes + self.states_per_node_bytes)


def _states_in_host_ram(run: Run) -> bool:
    hardware = (run.spec.get("config") or {}).get("hardware") or {}
    if hardware.get("accelerator"):
        return hardware["accelerator"] == "cpu"
    return any("cpu accelerator" in str(t.header.get("device_source") or "") for t in run.ranks.values())


def node_forecast(run: Run) -> NodeForecast | None:
    loads = run_loads(run)
    if not loads:
        return None
    world = max(len(run.ranks), 1)
    n = num_parameters(run) or 0
    states = STATE_BYTES_PER_PARAM * n if _states_in_host_ram(run) else 0
    train_peaks = [
        p.host_peak_bytes for t in run.ranks.values() for p in t.phases if p.name in TRAINING_PHASES and p.host_peak_bytes
    ]
    train_per_rank = max(train_peaks, default=0)
    return NodeForecast(
        load_per_rank_bytes=max(l.load_peak_bytes for l in loads),
        train_fixed_per_rank_bytes=max(0, int(train_per_rank - states / world)),
        states_per_node_bytes=int(states),
    )


FORECAST_RANKS = (1, 2, 4, 8, 16)
"""Local rank counts every forecast quotes (with the run's own and a full node's)."""


def full_node_ranks(run: Run) -> int | None:
    """Devices a node of the run's accelerator holds (None on the CPU accelerator)."""
    hardware = (run.spec.get("config") or {}).get("hardware") or {}
    if hardware.get("accelerator") == "cuda":
        return int(hardware.get("devices_per_card", 1)) * int(hardware.get("cards_per_node", 1))
    return None


@dataclass(frozen=True)
class RanksForecast:
    """How many ranks a node fits: the one answer the 5290 finding and the host-limit forecast
    both quote."""

    node: NodeForecast
    table: dict[int, int]
    """Local ranks -> the node's host peak."""
    limit: int | None

    @property
    def over(self) -> dict[int, int]:
        return {k: v - self.limit for k, v in self.table.items() if self.limit and v > self.limit}

    @property
    def fit(self) -> int | None:
        """The most local ranks of the table that fit (None: no limit known, or not even one)."""
        fitting = [k for k, v in self.table.items() if self.limit and v <= self.limit]
        return max(fitting) if fitting else None

    @property
    def first_over(self) -> int | None:
        return min(self.over) if self.over else None

    def sentence(self) -> str:
        if not self.limit:
            return "no host limit known"
        limit = format_bytes(self.limit)
        if self.first_over is None:
            return f"up to {max(self.table)} ranks per node fit in {limit}"
        over = f"{self.first_over} ranks exceed it by {format_bytes(self.over[self.first_over])}"
        if self.fit is None:
            return f"not even {min(self.table)} rank per node fits in {limit} ({over})"
        return f"up to {self.fit} ranks per node fit in {limit}; {over}"


def ranks_forecast(run: Run, limit: int | None = None) -> RanksForecast | None:
    """The node's host peak at each local rank count, against ``limit`` (default: the run's)."""
    node = node_forecast(run)
    if node is None:
        return None
    local = max((l.local_world_size for l in run_loads(run)), default=1)
    full = full_node_ranks(run)
    counts = sorted(set(FORECAST_RANKS) | {local} | ({full} if full else set()))
    return RanksForecast(node=node, table={k: node.node_bytes(k) for k in counts},
                         limit=limit if limit is not None else limit_of(run)[0])


def stacks_setting(run: Run) -> str | None:
    """The run's ``stacks=`` (None when run.json does not say)."""
    return (run.spec.get("config") or {}).get("stacks") or run.spec.get("stacks")


def limit_of(run: Run) -> tuple[int | None, str]:
    """The host limit the run's start record resolved once (``memdiag.rundir``), with its source."""
    return run.spec.get("host_limit_bytes"), run.spec.get("host_limit_source") or "unknown"
