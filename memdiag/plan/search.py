"""Evaluate layouts (nodes x devices per node) against device memory and host RAM."""

from __future__ import annotations

from dataclasses import dataclass, replace

from memdiag.config import HardwareProfile
from memdiag.plan.model import Architecture
from memdiag.plan.terms import DEVICE_USED_ONLY, Coefficients, Settings, activation_terms, device_terms, host_phase_terms
from memdiag.units import format_bytes


"""Device terms that are not tensors: in the "used" figure, not in the allocated one."""


@dataclass(frozen=True)
class LayoutResult:
    nodes: int
    devices_per_node: int
    device_terms: dict[str, float]
    host_phases: dict[str, dict[str, float]]
    """Per phase (load, initialize, training, save, resume), the host terms of the busiest
    node (the one of global rank 0)."""
    device_capacity_bytes: float
    host_limit_bytes: float
    devices_per_card: int
    guard_fraction: float = 0.95
    """memdiag's guard line, as a fraction of the host limit (``guard.fraction``)."""
    judged: tuple[str, ...] = ("load", "initialize", "training")
    """The phases the run goes through (``Settings.phases``): the host verdict is theirs. The
    others (a save or resume the run does not do) are shown, never judged."""

    @property
    def host_load_terms(self) -> dict[str, float]:
        return self.host_phases["load"]

    @property
    def host_steady_terms(self) -> dict[str, float]:
        return self.host_phases["training"]

    @property
    def host_phase_peaks(self) -> dict[str, float]:
        return {phase: sum(terms.values()) for phase, terms in self.host_phases.items()}

    @property
    def judged_peaks(self) -> dict[str, float]:
        return {p: v for p, v in self.host_phase_peaks.items() if p in self.judged}

    @property
    def binding_phase(self) -> str:
        """The judged phase whose node host peak is the highest."""
        peaks = self.judged_peaks
        return max(peaks, key=peaks.get)

    @property
    def unjudged_over(self) -> dict[str, float]:
        """Phases the run does not go through that would not fit if it did, and would bind: a
        warning beside the verdict."""
        bar = max(self.host_limit_bytes, self.host_peak_bytes)
        return {p: v for p, v in self.host_phase_peaks.items() if p not in self.judged and v > bar}

    @property
    def world(self) -> int:
        return self.nodes * self.devices_per_node

    @property
    def device_peak_bytes(self) -> float:
        """The device's "used" peak (what nvidia-smi shows, and what runs out): allocated
        tensors plus the allocator's reserve, the runtime context and NCCL's buffers."""
        return sum(self.device_terms.values())

    @property
    def device_allocated_peak_bytes(self) -> float:
        """Tensors alone (torch.cuda.max_memory_allocated)."""
        return sum(v for k, v in self.device_terms.items() if k not in DEVICE_USED_ONLY)

    @property
    def host_load_bytes(self) -> float:
        return sum(self.host_load_terms.values())

    @property
    def host_steady_bytes(self) -> float:
        return sum(self.host_steady_terms.values())

    @property
    def host_peak_bytes(self) -> float:
        return max(self.judged_peaks.values())

    @property
    def device_margin_bytes(self) -> float:
        return self.device_capacity_bytes - self.device_peak_bytes

    @property
    def host_margin_bytes(self) -> float:
        return self.host_limit_bytes - self.host_peak_bytes

    @property
    def guard_line_bytes(self) -> float:
        return self.guard_fraction * self.host_limit_bytes

    @property
    def guard_margin_bytes(self) -> float:
        """Host RAM left under the guard's line: what a run memdiag watches can use."""
        return self.guard_line_bytes - self.host_peak_bytes

    @property
    def guard_stops(self) -> bool:
        """The host peak fits the limit but passes the guard's line: the guard would stop it."""
        return self.host_margin_bytes >= 0 and self.guard_margin_bytes < 0

    @property
    def fits(self) -> bool:
        return self.device_margin_bytes >= 0 and self.host_margin_bytes >= 0 and not self.guard_stops

    @property
    def verdict(self) -> str:
        problems = []
        if self.device_margin_bytes < 0:
            problems.append(f"device OOM by {format_bytes(-self.device_margin_bytes)}")
        if self.host_margin_bytes < 0:
            problems.append(f"host OOM by {format_bytes(-self.host_margin_bytes)} ({self.binding_phase})")
        elif self.guard_stops:
            problems.append(f"stopped by memdiag's guard: host peak {self.host_peak_bytes / self.host_limit_bytes:.1%} of the limit "
                            f"in {self.binding_phase}, past guard.fraction={self.guard_fraction:g}")
        warning = "".join(f"; with {phase}=true host OOM by {format_bytes(peak - self.host_limit_bytes)} ({phase})"
                          for phase, peak in self.unjudged_over.items())
        if problems:
            return ", ".join(problems) + warning
        return (f"fits (device margin {format_bytes(self.device_margin_bytes)}, host margin {format_bytes(self.host_margin_bytes)}, "
                f"{format_bytes(self.guard_margin_bytes)} under the guard's line)" + warning)

    @property
    def name(self) -> str:
        """``NODESxDEVICES``; where a card holds several devices, the cards too (never a fraction)."""
        if self.devices_per_card == 1:
            return f"{self.nodes}x{self.devices_per_node}"
        cards, part = divmod(self.devices_per_node, self.devices_per_card)
        if part:
            return f"{self.nodes}x{self.devices_per_node} ({self.devices_per_node} of a card's {self.devices_per_card} devices)"
        return f"{self.nodes}x{self.devices_per_node} = {_count(self.nodes, 'node')} x {_count(cards, 'card')}"

    def to_dict(self) -> dict:
        terms = {f"device.{k}": int(v) for k, v in self.device_terms.items()}
        terms |= {f"host_load.{k}": int(v) for k, v in self.host_load_terms.items()}
        terms |= {f"host_steady.{k}": int(v) for k, v in self.host_steady_terms.items()}
        for phase in ("initialize", "save", "resume"):
            terms |= {f"host_{phase}.{k}": int(v) for k, v in self.host_phases.get(phase, {}).items()}
        return {
            "nodes": self.nodes,
            "devices_per_node": self.devices_per_node,
            "cards_per_node": self.devices_per_node / self.devices_per_card,
            "world_size": self.world,
            "device_peak_bytes": int(self.device_peak_bytes),
            "device_used_peak_bytes": int(self.device_peak_bytes),
            "device_allocated_peak_bytes": int(self.device_allocated_peak_bytes),
            "device_verdict_uses": "used",
            "device_capacity_bytes": int(self.device_capacity_bytes),
            "host_peak_bytes_per_node": int(self.host_peak_bytes),
            "host_load_bytes_per_node": int(self.host_load_bytes),
            "host_steady_bytes_per_node": int(self.host_steady_bytes),
            "host_peak_bytes_by_phase": {k: int(v) for k, v in self.host_phase_peaks.items()},
            "binding_host_phase": self.binding_phase,
            "judged_host_phases": list(self.judged),
            "host_limit_bytes": int(self.host_limit_bytes),
            "guard_line_bytes": int(self.guard_line_bytes),
            "stopped_by_guard": self.guard_stops,
            "fits": self.fits,
            "verdict": self.verdict,
            "terms": terms,
        }


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def evaluate(
    arch: Architecture,
    settings: Settings,
    hardware: HardwareProfile,
    nodes: int,
    devices_per_node: int,
    coefficients: Coefficients,
    *,
    device_capacity_bytes: float,
    host_limit_bytes: float,
    act: dict[str, float] | None = None,
) -> LayoutResult:
    world = nodes * devices_per_node
    cpu = hardware.accelerator == "cpu"
    dev = device_terms(arch, settings, world, coefficients, act)
    if cpu:  # the CPU accelerator's "device" is host memory: no caching allocator to hold a reserve
        dev["allocator_reserve"] = 0.0
    if hardware.device_runtime_context_bytes:
        dev["runtime_context"] = float(hardware.device_runtime_context_bytes)
    if not cpu and world > 1:
        dev["nccl_buffers"] = coefficients.nccl_buffer_bytes
    phases = host_phase_terms(
        arch,
        settings,
        local_ranks=devices_per_node,
        world=world,
        runtime_context_bytes=hardware.host_runtime_context_bytes,
        cpu_accelerator=cpu,
        c=coefficients,
    )
    return LayoutResult(
        nodes=nodes,
        devices_per_node=devices_per_node,
        device_terms=dev,
        host_phases=phases,
        device_capacity_bytes=device_capacity_bytes,
        host_limit_bytes=host_limit_bytes,
        devices_per_card=hardware.devices_per_card,
        judged=settings.phases,
        guard_fraction=settings.guard_fraction,
    )


def device_counts(max_per_node: int) -> list[int]:
    counts = {1}
    while max(counts) * 2 <= max_per_node:
        counts.add(max(counts) * 2)
    counts.add(max_per_node)
    return sorted(counts)


def search(arch, settings, hardware, coefficients, *, nodes: list[int], per_node: list[int], device_capacity_bytes, host_limit_bytes):
    act = activation_terms(arch, settings, coefficients)  # the same for every layout
    return [
        evaluate(arch, settings, hardware, n, d, coefficients, device_capacity_bytes=device_capacity_bytes,
                 host_limit_bytes=host_limit_bytes, act=act)
        for n in nodes
        for d in per_node
    ]


def recommend(results: list[LayoutResult]) -> LayoutResult | None:
    """Fewest nodes that fit; among those the most devices per node (nodes are paid for whole)."""
    fitting = [r for r in results if r.fits]
    return min(fitting, key=lambda r: (r.nodes, -r.devices_per_node)) if fitting else None


FIXES = (
    ("load=zero_init", {"load": "zero_init", "checkpoint_format": "safetensors"}),
    ("load.dtype=bf16", {"load_dtype": "bf16"}),
    ("activation_checkpointing=true", {"activation_checkpointing": True}),
    ("attention=fused", {"attention": "fused"}),
    ("offload=optimizer", {"offload": "optimizer"}),
)


def fixes_for(layout: LayoutResult, arch, settings, hardware, coefficients, *, device_capacity_bytes, host_limit_bytes) -> list[tuple[str, LayoutResult]]:
    """Changes (one, then pairs when none alone suffices) and ``layout`` as it would then be."""
    def apply(changes: list[tuple[str, dict]]) -> tuple[str, LayoutResult] | None:
        merged: dict = {}
        for _, change in changes:
            merged |= change
        changed = replace(settings, **merged)
        if changed == settings:
            return None
        result = evaluate(
            arch, changed, hardware, layout.nodes, layout.devices_per_node, coefficients,
            device_capacity_bytes=device_capacity_bytes, host_limit_bytes=host_limit_bytes,
        )
        return " + ".join(label for label, _ in changes), result

    found = [r for fix in FIXES if (r := apply([fix])) is not None]
    if not any(result.fits for _, result in found):
        for i, first in enumerate(FIXES):
            for second in FIXES[i + 1 :]:
                pair = apply([first, second])
                if pair is not None and pair[1].fits:
                    found.append(pair)
    return found


def deepspeed_estimate(
    arch: Architecture, devices_per_node: int, nodes: int, *, zero_init: bool, offload: str = "none",
    buffer_factor: float = 1.0,
) -> dict[str, int]:
    """DeepSpeed's own ZeRO-3 model-state estimate with the true counts (its estimator,
    transcribed in memdiag.plan.estimator and tested against the installed DeepSpeed).

    The ``..._all_cold`` entry point prints; the function below it returns the figures. Its
    ``..._all_live`` variant counts a live model's parameters, which under zero.Init or on
    the meta device are empty, so it is not used."""
    from memdiag.plan.estimator import estimate_zero3_model_states_mem_needs

    largest = max(arch.largest_layer_params, arch.largest_tensor_elements)
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        arch.num_parameters, largest, num_gpus_per_node=devices_per_node, num_nodes=nodes,
        cpu_offload=offload in ("optimizer", "params"), cpu_offload_params=offload == "params", zero_init=zero_init,
        additional_buffer_factor=buffer_factor,
    )
    return {"host_bytes_per_node": cpu, "device_bytes": gpu, "largest_layer_params": largest}


def check_run_layout(config, host_limit_bytes: int, device_capacity_bytes: int):
    """The plan's verdict on the layout ``memdiag run`` is about to launch, and the nearest
    layout that fits (fewest nodes, then most devices per node), if any. The run's settings
    reach the planner through ``plan.inputs.for_run``, as ``memdiag plan``'s do."""
    from memdiag.plan.inputs import for_run

    arch, settings = for_run(config)
    coefficients = Coefficients()
    chosen = evaluate(arch, settings, config.hardware, config.nnodes, config.nproc_per_node, coefficients,
                      device_capacity_bytes=device_capacity_bytes, host_limit_bytes=host_limit_bytes)
    nearest = None
    if not chosen.fits:
        per_node = device_counts(max(config.hardware.devices_per_node, config.nproc_per_node))
        nearest = recommend(search(arch, settings, config.hardware, coefficients, nodes=list(range(1, 9)), per_node=per_node,
                                   device_capacity_bytes=device_capacity_bytes, host_limit_bytes=host_limit_bytes))
    return chosen, nearest
