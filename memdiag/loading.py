"""Memory-lean loading of Hugging Face checkpoints under DeepSpeed ZeRO-3.

The cure for DeepSpeed issue 5290: instead of every rank building the whole model in fp32
and reading every checkpoint shard (node host RAM = ranks x model), build the model already
partitioned under ``deepspeed.zero.Init`` (no weight initialisation: the checkpoint overwrites
it, and tensors are created in the target dtype so no whole-size conversion copy is made)
and let every rank read its own partition of each tensor straight out of the shard
(safetensors: ``pread`` into the partition; pickle ``.bin``: ``torch.load(mmap=True)``, see
memdiag.shards). No gather, no broadcast, no whole tensor on any rank: a rank holds its
1/world share, and the shard's bytes live once in the node's page cache.

    from memdiag.loading import load_zero3
    model = load_zero3(MyModel, "/ckpt/Baichuan2-13B-Base", ds_config, dtype=torch.bfloat16)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, ...)
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from memdiag.probes.malloc import malloc_trim, set_mmap_threshold
from memdiag.shards import CheckpointError, Shard

__all__ = ["CheckpointError", "load_zero3", "load_into_zero3", "find_checkpoint", "validate"]

LOAD_MMAP_THRESHOLD_BYTES = 2**20
TRAIN_MMAP_THRESHOLD_BYTES = 32 * 2**20
"""glibc's own ceiling for its dynamic threshold: training keeps the heap reuse it is used to."""

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_SINGLE = "pytorch_model.bin"


@dataclass(frozen=True)
class Checkpoint:
    directory: Path
    format: str
    """``safetensors`` or ``bin``."""
    weight_map: dict[str, str]
    """Tensor name -> shard file name."""

    @property
    def shard_files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))


def find_checkpoint(directory: str | Path) -> Checkpoint:
    """Read the shard index (or the single file) and check that every shard exists."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    for index_name, fmt in ((SAFE_INDEX, "safetensors"), (BIN_INDEX, "bin")):
        index = directory / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index} is not a valid shard index ({exc}); re-export the checkpoint") from None
            missing = sorted(f for f in set(weight_map.values()) if not (directory / f).is_file())
            if missing:
                raise CheckpointError(f"{index} lists shard {directory / missing[0]} which is missing ({len(missing)} missing)")
            return Checkpoint(directory, fmt, weight_map)
    for single, fmt in ((SAFE_SINGLE, "safetensors"), (BIN_SINGLE, "bin")):
        if (directory / single).is_file():
            with Shard(directory / single, fmt) as tensors:
                return Checkpoint(directory, fmt, {name: single for name in tensors.keys()})
    raise CheckpointError(f"{directory} holds no {SAFE_INDEX}, {BIN_INDEX}, {SAFE_SINGLE} or {BIN_SINGLE}")


def validate(checkpoint: Checkpoint, model: Any) -> None:
    """Every parameter present with the right shape, before any collective starts (so every
    rank stops at the same place with the same message)."""
    expected = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in model.named_parameters()}
    missing = sorted(set(expected) - set(checkpoint.weight_map))
    if missing:
        raise CheckpointError(
            f"{checkpoint.directory}: tensor {missing[0]} is not in the checkpoint ({len(missing)} missing)"
        )
    for shard_file in checkpoint.shard_files:
        path = checkpoint.directory / shard_file
        with Shard(path, checkpoint.format) as shard:
            present = set(shard.keys())
            for name in (n for n, f in checkpoint.weight_map.items() if f == shard_file and n in expected):
                if name not in present:
                    raise CheckpointError(f"{path}: the index maps tensor {name} here but the shard lacks it")
                shape = shard.shape(name)
                if shape != expected[name]:
                    raise CheckpointError(
                        f"{path}: tensor {name} has shape {list(shape)}, the model expects {list(expected[name])}"
                    )


def load_into_zero3(model: Any, directory: str | Path) -> Checkpoint:
    """Fill a model built under ``deepspeed.zero.Init`` from a checkpoint: every rank copies
    only its own partition of each tensor out of the shard. Nothing is gathered or broadcast,
    no rank ever holds a whole tensor, and the shard's bytes sit once in the node's page cache
    however many ranks read them."""
    import torch
    import torch.distributed as dist

    checkpoint = find_checkpoint(directory)
    validate(checkpoint, model)
    rank = dist.get_rank() if dist.is_initialized() else 0
    params = dict(model.named_parameters())
    for shard_file in checkpoint.shard_files:
        names = [n for n, f in checkpoint.weight_map.items() if f == shard_file and n in params]
        with Shard(checkpoint.directory / shard_file, checkpoint.format) as shard, torch.no_grad():
            for name in names:
                param = params[name]
                partition = getattr(param, "ds_tensor", None)
                if partition is None:  # not partitioned (ZeRO-3 off): the whole tensor
                    param.data.copy_(shard.get(name))
                    continue
                size = partition.numel()
                start, end = rank * size, min((rank + 1) * size, param.ds_numel)
                if end > start:
                    shard.read_flat(name, start, partition.data.view(-1)[: end - start])
    return checkpoint


@contextlib.contextmanager
def lean_allocator() -> Iterator[None]:
    """During loading, let every buffer of 1 MiB or more come from mmap: zero.Init builds each
    parameter whole before partitioning it, and those freed whole tensors would otherwise stay
    in glibc's heap on every rank (~100 MiB a rank for a 110M model). Afterwards, trim."""
    set_mmap_threshold(LOAD_MMAP_THRESHOLD_BYTES)
    try:
        yield
    finally:
        set_mmap_threshold(TRAIN_MMAP_THRESHOLD_BYTES)
        malloc_trim()


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


@contextlib.contextmanager
def default_dtype(dtype) -> Iterator[None]:
    """Create floating tensors in ``dtype`` from the start. zero.Init converts each new
    parameter with ``.to(dtype)``: built in fp32 that is a whole-size copy, touched in full on
    every rank; built in ``dtype`` the conversion is a no-op, the uninitialised whole tensor is
    never written, and only the rank's partition is copied out of it."""
    import torch

    previous = torch.get_default_dtype()
    if dtype is not None and dtype.is_floating_point:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def partitioned_init(ds_config: dict | str, dtype=None):
    """``deepspeed.zero.Init`` without its per-parameter broadcast from rank 0.

    zero.Init broadcasts every new parameter whole so that random initialisations agree; every
    other rank receives (and so writes, page by page) the whole tensor before partitioning it.
    When a checkpoint overwrites the weights that is a full-model broadcast for nothing and a
    transient of the largest tensor on every rank (the 13B embedding: 1.2 GiB in bf16)."""
    import deepspeed

    class _Init(deepspeed.zero.Init):
        def _zero_init_param(self, param):
            self._convert_to_deepspeed_param(param)
            param.partition()

    if not hasattr(deepspeed.zero.Init, "_zero_init_param"):  # another DeepSpeed: keep its own
        return deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=dtype)
    return _Init(config_dict_or_path=ds_config, dtype=dtype)


def load_zero3(
    model_cls: Any, directory: str | Path, ds_config: dict | str, *, dtype=None, trim: bool = True,
    concurrency: int = 0, lock_name: str = "load", **config_overrides,
):
    """Build ``model_cls`` partitioned under ZeRO-3 and load ``directory`` into it.

    ``trim``: gc + ``malloc_trim(0)`` afterwards, so freed buffers go back to the OS.
    ``concurrency``: >0, at most that many local ranks read the checkpoint at once (the build
    under zero.Init is collective and is not limited). ``config_overrides``: config attributes
    to set over the checkpoint's (as ``from_pretrained`` takes them).
    """
    config = model_cls.config_class.from_pretrained(directory, **config_overrides)
    find_checkpoint(directory)  # fail on a broken checkpoint before building anything
    with lean_allocator():
        with _no_init_weights(), default_dtype(dtype), partitioned_init(ds_config, dtype):
            model = model_cls(config)
        with node_slots(lock_name, concurrency) if concurrency else contextlib.nullcontext():
            load_into_zero3(model, directory)
    if trim:
        release_freed_memory()
    return model


def release_freed_memory() -> bool:
    """gc, then hand freed heap pages back to the OS (glibc ``malloc_trim(0)``)."""
    gc.collect()
    return malloc_trim()


@contextlib.contextmanager
def node_slots(name: str, slots: int, poll_s: float = 0.05) -> Iterator[int]:
    """At most ``slots`` processes of this node inside the block at once (``flock`` on slot
    files in /dev/shm); yields the slot held. For loading that is not collective."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    while True:
        for slot in range(slots):
            path = base / f"memdiag-{name}-slot{slot}.lock"
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                yield slot
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
                with contextlib.suppress(OSError):
                    path.unlink()
            return
        time.sleep(poll_s)


def save_bin_sharded(state_dict: dict, directory: str | Path, max_shard_bytes: int) -> Path:
    """Write ``pytorch_model-0000i-of-0000n.bin`` shards and their index, as the public
    Baichuan2 checkpoints are laid out (transformers 5 writes safetensors only)."""
    import torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = [{}]
    size = 0
    for name, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().clone().contiguous()
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
        torch.save(shard, directory / file)
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    index = directory / BIN_INDEX
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return index
