"""Which lines allocated the device memory at the first training steps' peak, on CUDA: PyTorch's
allocator history (``torch.cuda.memory._record_memory_history``) from the end of
``deepspeed.initialize`` through the first ``N`` optimizer steps (``stacks.device=steps:N``),
then the allocations live at the highest moment of that window, grouped by stack, the largest
first, in the host tables' shape.

Per rank, ``stacks/device-rank-<R>.pickle`` is PyTorch's own snapshot (it opens in
https://pytorch.org/memory_viz) and ``stacks/device-rank-<R>-steps.json`` the reduced table the
findings and the report read. The CPU accelerator has no device allocator to record: the rank's
header says so. Recording failures are one warning; every other figure is recorded as before.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Callable

from memdiag.failure import is_users
from memdiag.stacks import FRAMES, STACKS_DIR, TOP

PHASE = "steps"
"""The device tables' phase name: the first training steps."""
BEFORE = "(allocated before the recording began)"
"""The row of tensors older than the history (parameters, optimizer states): no stack."""
MAX_ENTRIES = 1_000_000
"""Allocator events kept (a ring): enough for a few steps of a 70B ZeRO-3 layer loop."""


def table_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / STACKS_DIR / f"device-rank-{rank}-{PHASE}.json"


def snapshot_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / STACKS_DIR / f"device-rank-{rank}.pickle"


def reduce_snapshot(snapshot: dict, *, device: int, rank: int, before_bytes: int) -> dict:
    """The allocations live at the recorded window's highest moment on ``device``, grouped by
    stack. ``before_bytes``: what was allocated when the recording began (its tensors have no
    stack; frees of them, seen as frees of unknown addresses, lower it)."""
    traces = snapshot.get("device_traces") or []
    events = traces[device] if device < len(traces) else []
    live: dict[int, dict] = {}
    before = total = peak = before_bytes
    peak_index = -1
    for index, event in enumerate(events):  # pass 1: the highest moment
        before, total = _apply(event, live, before, total)
        if total > peak:
            peak, peak_index = total, index
    live, before = {}, before_bytes
    total = before_bytes
    for event in events[: peak_index + 1]:  # pass 2: what was live then
        before, total = _apply(event, live, before, total)
    groups: dict[tuple, dict] = {}
    for event in live.values():
        frames = [[f.get("name", "?"), f.get("filename", "?"), int(f.get("line", 0))] for f in (event.get("frames") or [])][:FRAMES]
        group = groups.setdefault(tuple(map(tuple, frames)), {"bytes": 0, "count": 0, "frames": frames})
        group["bytes"] += int(event["size"])
        group["count"] += 1
    if before > 0:
        groups[("before",)] = {"bytes": before, "count": 0, "frames": [[BEFORE, "", 0]]}
    rows = sorted(groups.values(), key=lambda g: -g["bytes"])[:TOP]
    for row in rows:
        row["user_frame"] = next((f for f in row["frames"] if is_users(f[1])), None)
    return {"rank": rank, "phase": PHASE, "kind": "device", "peak_bytes": int(peak), "events": len(events),
            "stacks": rows}


def _apply(event: dict, live: dict[int, dict], before: int, total: int) -> tuple[int, int]:
    action = event.get("action")
    if action == "alloc":
        live[event["addr"]] = event
        total += int(event["size"])
    elif action == "free_completed":  # the allocator's own figures fall here, not at free_requested
        gone = live.pop(event.get("addr"), None)
        size = int(event["size"])
        total -= size
        if gone is None:  # a tensor older than the recording
            before -= size
    return before, total


class DeviceStacks:
    """The allocator history of one CUDA rank over its first ``steps`` optimizer steps."""

    def __init__(self, run_dir: Path, rank: int, device_index: int | None, steps: int,
                 warn: Callable[[str, str], None]) -> None:
        self.run_dir, self.rank, self.index, self.steps, self.warn = Path(run_dir), rank, device_index or 0, steps, warn
        self.recording = False
        self.done = steps == 0
        self._seen = 0
        self._before = 0

    def begin(self, device_index: int | None = None) -> None:
        """After ``deepspeed.initialize`` (the engine's device is bound by then): the training steps are next."""
        if self.done or self.recording:
            return
        if device_index is not None:
            self.index = device_index
        try:
            import torch

            self._before = int(torch.cuda.memory_allocated(self.index))
            torch.cuda.memory._record_memory_history(max_entries=MAX_ENTRIES, stacks="python", device=self.index)
            self.recording = True
        except Exception as exc:  # another torch, or recording unavailable
            self.done = True
            self.warn("device_stacks", f"device allocation stacks are off: {exc!r}")

    def step_done(self, _record=None) -> None:
        if not self.recording:
            return
        self._seen += 1
        if self._seen >= self.steps:
            self.finish()

    def finish(self) -> None:
        """Stop recording, keep PyTorch's snapshot and the reduced table (also at an early end)."""
        if not self.recording:
            return
        self.recording, self.done = False, True
        try:
            import torch

            snapshot = torch.cuda.memory._snapshot(self.index)
            torch.cuda.memory._record_memory_history(enabled=None, device=self.index)
            out = snapshot_path(self.run_dir, self.rank)
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "wb") as f:
                pickle.dump(snapshot, f)
            # _snapshot(device) keeps one device's traces, first in the list
            device = 0 if len(snapshot.get("device_traces") or []) == 1 else self.index
            table = reduce_snapshot(snapshot, device=device, rank=self.rank, before_bytes=self._before)
            table |= {"steps": self._seen, "snapshot": out.name}
            table_path(self.run_dir, self.rank).write_text(json.dumps(table, indent=1))
        except Exception as exc:
            self.warn("device_stacks_reduce", f"the device allocation stacks could not be kept: {exc!r}")


def read_device_tables(run_dir: Path) -> list[dict]:
    """Every rank's reduced device table, lowest rank first; unreadable ones skipped."""
    tables = []
    for path in sorted((Path(run_dir) / STACKS_DIR).glob(f"device-rank-*-{PHASE}.json")):
        try:
            tables.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(tables, key=lambda t: t.get("rank", 0))
