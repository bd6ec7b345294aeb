"""Read checkpoint shards a slice at a time, without holding whole tensors.

safetensors: the header is parsed here and a rank's slice is ``pread`` straight into its
partition's memory. Nothing is memory-mapped, so the shard's bytes sit once in the node's page
cache (reclaimable, shared) and never in a rank's RSS; a mmap'd read would put the touched
pages into every reader's RSS as file-backed pages. Pickle ``.bin`` (torch's zip format):
``torch.load(mmap=True)``, whose tensors are views of the mapped file.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from memdiag.errors import UsageError

CONVERT_CHUNK_BYTES = 16 * 2**20
"""Bound on the staging buffer when the checkpoint's dtype differs from the model's."""

SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip


class CheckpointError(UsageError):
    """A checkpoint that cannot be loaded as it is: the message names the file and tensor."""


def parse_safetensors_header(raw: bytes, path: Path, file_size: int) -> tuple[int, dict[str, dict]]:
    """``(data_start, {name: {"dtype", "shape", "data_offsets"}})`` from the file's first bytes.

    Layout: little-endian u64 header length N, N bytes of JSON, then the data; offsets in the
    JSON are relative to the data start."""
    if len(raw) < 8:
        raise CheckpointError(f"{path} is too short to be a safetensors file ({len(raw)} bytes)")
    (length,) = struct.unpack("<Q", raw[:8])
    if length > file_size - 8 or len(raw) < 8 + length:
        raise CheckpointError(f"{path}: safetensors header of {length} bytes overruns the file; re-export the checkpoint")
    try:
        header = json.loads(raw[8 : 8 + length])
    except ValueError as exc:
        raise CheckpointError(f"{path}: safetensors header is not JSON ({exc}); re-export the checkpoint") from None
    header.pop("__metadata__", None)
    data_start = 8 + length
    for name, entry in header.items():
        begin, end = entry.get("data_offsets", (None, None))
        if entry.get("dtype") not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unknown dtype {entry.get('dtype')!r}")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= file_size - data_start):
            raise CheckpointError(f"{path}: tensor {name} has data offsets {entry.get('data_offsets')} outside the file (truncated?)")
    return data_start, header


class Shard:
    """One shard: ``keys()``, ``shape(name)``, ``get(name)``, ``read_flat(name, start, out)``."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path = Path(path)
        self.format = fmt
        self._fd: int | None = None
        self._bin = None
        if fmt == "safetensors":
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
                size = os.fstat(self._fd).st_size
                head = os.pread(self._fd, 8, 0)
                length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
                raw = head + os.pread(self._fd, min(length, max(size - 8, 0)), 8)
            except OSError as exc:
                self.close()
                raise CheckpointError(f"{self.path} cannot be read: {exc.strerror}") from None
            try:
                self._data_start, self._header = parse_safetensors_header(raw, self.path, size)
            except CheckpointError:
                self.close()
                raise
        else:
            import torch

            try:
                self._bin = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as exc:
                raise CheckpointError(f"{self.path} cannot be opened as a torch checkpoint: {exc}") from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._bin = None

    def __enter__(self) -> Shard:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def keys(self) -> list[str]:
        return list(self._header) if self._bin is None else list(self._bin.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        if self._bin is not None:
            return tuple(self._bin[name].shape)
        return tuple(self._header[name]["shape"])

    def _dtype(self, name: str):
        import torch

        return getattr(torch, SAFETENSORS_DTYPES[self._header[name]["dtype"]])

    def get(self, name: str):
        """The whole tensor (for parameters that are not partitioned)."""
        import torch

        if self._bin is not None:
            return self._bin[name]
        out = torch.empty(self.shape(name), dtype=self._dtype(name))
        self.read_flat(name, 0, out.view(-1))
        return out

    def read_flat(self, name: str, start: int, out) -> None:
        """Fill the 1-D tensor ``out`` with elements ``[start, start + out.numel())`` of the
        flattened tensor ``name``, converting dtype if they differ."""
        if self._bin is not None:
            out.copy_(self._bin[name].reshape(-1)[start : start + out.numel()])
            return
        import torch

        src_dtype = self._dtype(name)
        item = torch.empty(0, dtype=src_dtype).element_size()
        offset = self._data_start + self._header[name]["data_offsets"][0] + start * item
        if out.dtype == src_dtype and out.is_contiguous() and out.device.type == "cpu":
            self._pread_into(out, offset, name)
            return
        step = max(1, CONVERT_CHUNK_BYTES // item)
        staging = torch.empty(min(step, out.numel()), dtype=src_dtype)
        for first in range(0, out.numel(), step):
            part = staging[: min(step, out.numel() - first)]
            self._pread_into(part, offset + first * item, name)
            out[first : first + part.numel()].copy_(part)

    def _pread_into(self, tensor, offset: int, name: str) -> None:
        import torch

        view = memoryview(tensor.view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got == 0:
                raise CheckpointError(f"{self.path}: tensor {name} ends early (file truncated); re-export the checkpoint")
            done += got
