"""Categorised memory of one rank: exact sums of the real tensors DeepSpeed holds.

Categories: ``parameters`` (ZeRO-3 partitions, or whole parameters below stage 3),
``gathered_parameters`` (full parameters ZeRO-3 has fetched right now), ``gradients``
(partitions), ``optimizer_master`` (fp32 master weights), ``optimizer_exp_avg`` and
``optimizer_exp_avg_sq`` (Adam's moments), ``activations`` (bytes saved for backward, counted
through ``torch.autograd.graph.saved_tensors_hooks``), and ``other`` = the allocator's total
minus all of those. Every tensor is counted by its underlying storage, once, in the first
category that claims it, so views and flat buffers are never counted twice.

Only tensors on the rank's device are counted against its allocator (``device_type``): under
ZeRO offload the fp32 masters, Adam's moments and gradient partitions are CPU tensors, which
go to a host ledger of the same categories (``host_<category>``) instead of being subtracted
from the CUDA figure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

CATEGORIES = (
    "parameters",
    "gathered_parameters",
    "gradients",
    "optimizer_master",
    "optimizer_exp_avg",
    "optimizer_exp_avg_sq",
    "optimizer_other",
    "activations",
)


def _storage(tensor: Any) -> tuple[int, int] | None:
    try:
        storage = tensor.untyped_storage()
    except (AttributeError, RuntimeError):
        return None
    nbytes = storage.nbytes()
    return (storage.data_ptr(), nbytes) if nbytes else None


def _device_type(tensor: Any) -> str | None:
    try:
        return tensor.device.type
    except AttributeError:
        return None


@dataclass
class _Ledger:
    device_type: str | None = None
    """Count only tensors of this device type here; the others go to ``host``. None: all here."""
    seen: set[int] = field(default_factory=set)
    totals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    host: dict[str, int] = field(default_factory=dict)
    """Bytes per category of tensors off the device (offloaded to host RAM)."""

    def claim(self, category: str, tensors: Iterable[Any]) -> None:
        for tensor in tensors:
            if tensor is None:
                continue
            found = _storage(tensor)
            if found is None or found[0] in self.seen:
                continue
            self.seen.add(found[0])
            if self.device_type is None or _device_type(tensor) == self.device_type:
                self.totals[category] += found[1]
            else:
                self.host[category] = self.host.get(category, 0) + found[1]


def _optimizer_parts(engine: Any) -> tuple[list, list, list, Any]:
    """(parameter partitions, gradient buffers, fp32 master tensors, inner torch optimizer)."""
    opt = getattr(engine, "optimizer", None)
    partitions = list(getattr(opt, "fp16_partitioned_groups_flat", None) or [])
    partitions += list(getattr(opt, "bf16_groups_flat", None) or [])
    grads = [getattr(opt, "grad_partitions_flat_buffer", None)]
    masters = list(getattr(opt, "fp32_partitioned_groups_flat", None) or [])
    masters += list(getattr(opt, "single_partition_of_fp32_groups", None) or [])
    masters += list(getattr(opt, "fp32_groups_flat_partition", None) or [])
    grads += [m.grad for m in masters]
    averaged = getattr(opt, "averaged_gradients", None) or {}
    for value in averaged.values() if isinstance(averaged, dict) else []:
        grads += list(value) if isinstance(value, (list, tuple)) else [value]
    inner = getattr(opt, "optimizer", opt)
    return partitions, grads, masters, inner


def measure(engine: Any, activations_bytes: int, device_type: str | None = None) -> dict[str, int]:
    """Bytes per category for ``engine`` (a DeepSpeedEngine, or anything with ``.module``) on
    ``device_type`` (None: wherever they are); tensors elsewhere as ``host_<category>``."""
    ledger = _Ledger(device_type)
    module = getattr(engine, "module", engine)
    params = list(module.parameters())
    partitions, grads, masters, inner = _optimizer_parts(engine)
    ledger.claim("parameters", partitions)
    ledger.claim("parameters", (getattr(p, "ds_tensor", None) for p in params))
    zero3 = any(hasattr(p, "ds_id") for p in params[:1])
    live = (p.data for p in params if p.data.numel())
    ledger.claim("gathered_parameters" if zero3 else "parameters", live)
    ledger.claim("gradients", grads)
    ledger.claim("gradients", (p.grad for p in params))
    ledger.claim("optimizer_master", masters)
    for state in getattr(inner, "state", {}).values():
        for key, value in state.items():
            name = f"optimizer_{key}" if key in ("exp_avg", "exp_avg_sq") else "optimizer_other"
            ledger.claim(name, [value] if hasattr(value, "untyped_storage") else [])
    totals = ledger.totals
    totals["activations"] = activations_bytes
    return totals | {f"host_{name}": value for name, value in ledger.host.items()}


class SavedTensorCounter:
    """Counts unique storages saved for backward during one forward (parameters excluded:
    a saved weight is a parameter, counted there)."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def pack(self, tensor: Any) -> Any:
        base = tensor._base if tensor._base is not None else tensor
        if not (base.is_leaf and base.requires_grad):
            found = _storage(tensor)
            if found is not None:
                self.storages[found[0]] = found[1]
        return tensor

    @staticmethod
    def unpack(tensor: Any) -> Any:
        return tensor

    @property
    def total_bytes(self) -> int:
        return sum(self.storages.values())

    def reset(self) -> None:
        self.storages = {}
