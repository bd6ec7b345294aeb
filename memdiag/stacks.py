"""Which lines allocated the host memory at a phase's peak: memray records a rank's allocations
during the phases asked for (``stacks=``), and memdiag keeps the ones live at the phase's
high-water mark, grouped by stack, the largest first.

Per rank and phase, ``stacks/host-rank-<R>-<phase>.bin`` is memray's own capture (``memray
stats``, ``memray flamegraph`` open it) and ``.json`` the reduced table the findings and the
report read. Without memray (another platform, another version), one warning says stack capture
is off; every other figure is recorded as before.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from memdiag.failure import is_users

log = logging.getLogger(__name__)

STACKS_DIR = "stacks"
TOP = 20
"""Stacks kept per phase in the reduced table."""
FRAMES = 12
"""Frames kept per stack, innermost first."""


AUTO = "auto"
"""Every phase's first occurrence: load, deepspeed.initialize, the first forward, backward and
optimizer step, the first checkpoint save or load. A ZeRO-3 rank's host peak is set in one of
them (the loop's later steps reuse what the first allocated: optimizer states and pinned buffers
are made at initialize or lazily in the first step), so whichever phase holds the run's host
peak has its stacks, at a cost paid once per phase rather than per step."""


@dataclass(frozen=True)
class StackPhases:
    """What ``stacks=`` asks for: ``phases`` None for every phase, empty for none; ``first_only``
    captures each phase once, at its first occurrence."""

    phases: frozenset[str] | None
    first_only: bool = False


def parse_phases(text: str | None) -> StackPhases:
    """``stacks=`` as the phases to capture: auto, all, off, or a comma list of phase names."""
    text = (text or "").strip()
    if text == AUTO:
        return StackPhases(None, first_only=True)
    if text == "all":
        return StackPhases(None)
    if text in ("", "off", "none", "false"):
        return StackPhases(frozenset())
    return StackPhases(frozenset(part.strip() for part in text.split(",") if part.strip()))


def table_path(run_dir: Path, rank: int, phase: str) -> Path:
    return Path(run_dir) / STACKS_DIR / f"host-rank-{rank}-{phase}.json"


class HostStacks:
    """memray around the chosen phases of one rank (one capture at a time: an inner phase of
    a captured one is inside its capture)."""

    def __init__(self, run_dir: Path, rank: int, choice: StackPhases, warn: Callable[[str, str], None]) -> None:
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.phases = choice.phases
        self.first_only = choice.first_only
        self.warn = warn
        self._tracker = None
        self._phase: str | None = None
        self._started = 0.0
        self._seen: set[str] = set()
        """Phases begun so far (``first_only``: an inner phase first seen inside another's capture
        counts as captured there, so the loop's second step starts no capture)."""
        self.off = self.phases is not None and not self.phases

    def wanted(self, phase: str) -> bool:
        return not self.off and (self.phases is None or phase in self.phases)

    def begin(self, phase: str) -> None:
        first = phase not in self._seen
        self._seen.add(phase)
        if self._tracker is not None or not self.wanted(phase) or (self.first_only and not first):
            return
        try:
            import memray

            path = tracker_path(self.run_dir, self.rank, phase)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
            tracker = memray.Tracker(path, file_format=memray.FileFormat.AGGREGATED_ALLOCATIONS, follow_fork=False)
            tracker.__enter__()
        except Exception as exc:  # no memray, or one tracker already running (the user's own)
            self.off = True
            self.warn("stacks", f"host allocation stacks are off: {exc!r}")
            return
        self._tracker, self._phase, self._started = tracker, phase, time.monotonic()

    def end(self, phase: str) -> None:
        if self._tracker is None or phase != self._phase:
            return
        tracker, self._tracker, self._phase = self._tracker, None, None
        try:
            tracker.__exit__(None, None, None)
            captured_s = time.monotonic() - self._started
            reduce_capture(tracker_path(self.run_dir, self.rank, phase), table_path(self.run_dir, self.rank, phase),
                           rank=self.rank, phase=phase, captured_s=captured_s,
                           occurrence="first" if self.first_only else "last")
        except Exception as exc:
            self.warn("stacks_reduce", f"the {phase} phase's allocation stacks could not be reduced: {exc!r}")


    def close(self) -> None:
        """End the capture still open (the run ended inside a captured phase)."""
        if self._phase is not None:
            self.end(self._phase)


def tracker_path(run_dir: Path, rank: int, phase: str) -> Path:
    return Path(run_dir) / STACKS_DIR / f"host-rank-{rank}-{phase}.bin"


def reduce_capture(capture: Path, out: Path, *, rank: int, phase: str, captured_s: float | None = None,
                   occurrence: str = "last") -> dict:
    """memray's allocations live at the capture's high-water mark, grouped by stack, the largest
    first, each with the deepest frame in the user's own code."""
    import memray

    with memray.FileReader(capture) as reader:
        peak = int(reader.metadata.peak_memory)
        records = sorted(reader.get_high_watermark_allocation_records(merge_threads=True), key=lambda r: -r.size)
        rows = []
        for record in records[:TOP]:
            frames = [[function, filename, int(line)] for function, filename, line in record.stack_trace(max_stacks=FRAMES)]
            users = next((f for f in frames if is_users(f[1])), None)
            rows.append({"bytes": int(record.size), "count": int(record.n_allocations), "frames": frames, "user_frame": users})
    table = {"rank": rank, "phase": phase, "occurrence": occurrence, "peak_bytes": peak, "captured_s": captured_s,
             "capture": capture.name, "stacks": rows}
    out.write_text(json.dumps(table, indent=1))
    return table


def read_tables(run_dir: Path) -> list[dict]:
    """Every reduced table of a run (rank, phase order as found); unreadable ones skipped."""
    tables = []
    for path in sorted((Path(run_dir) / STACKS_DIR).glob("host-rank-*.json")):
        try:
            tables.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            log.debug("skipping %s", path)
    return tables


COVER = 0.5
"""A line "built" the phase's peak when the stacks through it hold at least this share of it."""


def built_at(table: dict) -> dict | None:
    """The deepest line of the user's own code that the allocations live at the phase's peak
    came through, holding at least ``COVER`` of them: the constructor or ``from_pretrained``
    call of a model built there (the stacks below it differ tensor by tensor)."""
    stacks = table.get("stacks") or []
    total = sum(s["bytes"] for s in stacks)
    if not total:
        return None
    covered: dict[tuple, int] = {}
    depth: dict[tuple, int] = {}
    for stack in stacks:
        outermost_first = list(reversed(stack["frames"]))
        seen = set()
        for position, (function, filename, line) in enumerate(outermost_first):
            key = (filename, line, function)
            if key in seen or not is_users(filename):
                continue
            seen.add(key)
            covered[key] = covered.get(key, 0) + stack["bytes"]
            depth[key] = max(depth.get(key, 0), position)
    held = [key for key, nbytes in covered.items() if nbytes >= COVER * total]
    if not held:
        return None
    filename, line, function = max(held, key=lambda key: depth[key])
    return {"file": filename, "line": line, "function": function, "bytes": covered[(filename, line, function)],
            "rank": table.get("rank"), "phase": table.get("phase")}


def phase_table(run_dir: Path, phase: str) -> dict | None:
    """The reduced table of ``phase`` of the lowest rank that has one."""
    return next((t for t in lowest_rank_tables(run_dir) if t.get("phase") == phase), None)


def stack_rows(table: dict, top: int = 10) -> list[dict[str, str]]:
    """The reduced table as rows a report prints: bytes, allocations, the user's line, where the
    bytes were allocated (the innermost frame)."""
    from memdiag.units import format_bytes

    rows = []
    for stack in (table.get("stacks") or [])[:top]:
        inner = stack["frames"][0] if stack["frames"] else None
        users = stack.get("user_frame")
        rows.append({
            "bytes": format_bytes(stack["bytes"]),
            "allocations": f"{stack['count']:,}",
            "your line": f"{users[1]}:{users[2]} ({users[0]})" if users else "-",
            "allocated in": (f"{inner[1]}:{inner[2]} ({inner[0]})" if inner[1] else str(inner[0])) if inner else "-",
        })
    return rows


def lowest_rank_tables(run_dir: Path) -> list[dict]:
    """One table per captured phase, the lowest rank's, the largest peak first (the phases a
    report shows first are the ones that could bind)."""
    chosen: dict[str, dict] = {}
    for table in read_tables(run_dir):
        phase = table.get("phase", "?")
        if phase not in chosen or table.get("rank", 0) < chosen[phase].get("rank", 0):
            chosen[phase] = table
    return sorted(chosen.values(), key=lambda t: -(t.get("peak_bytes") or 0))


CITED_SHARE = 0.05
"""A stack is cited when it holds at least this share of the table's bytes (not the runtime's crumbs)."""


def cite(table: dict | None, top: int = 3) -> tuple[str, list[dict]]:
    """``"; top stacks at rank R's PHASE peak: B at FILE:LINE (FUNCTION), ..."`` and the same as
    evidence, from a reduced table (host or device); ``("", [])`` without one."""
    from memdiag.units import format_bytes

    stacks = (table or {}).get("stacks") or []
    total = sum(stack["bytes"] for stack in stacks)
    stacks = [stack for stack in stacks[:top] if stack["bytes"] >= CITED_SHARE * total]
    if not stacks:
        return "", []
    cited = []
    for stack in stacks:
        frame = stack.get("user_frame") or (stack["frames"][0] if stack["frames"] else None)
        cited.append({"bytes": stack["bytes"], "function": frame[0] if frame else None,
                      "file": frame[1] if frame else None, "line": frame[2] if frame else None})
    kind = "device " if table.get("kind") == "device" else ""
    text = ", ".join(f"{format_bytes(c['bytes'])} at {c['file']}:{c['line']} ({c['function']})" if c["file"]
                     else f"{format_bytes(c['bytes'])} in {c['function'] or 'code with no Python frame'}" for c in cited)
    return f"; top {kind}stacks at rank {table.get('rank')}'s {phase_label(table)} peak: {text}", cited


REPEATED_PHASES = frozenset({"forward", "backward", "step", "optimizer_step", "checkpoint_save", "checkpoint_load"})


def phase_label(table: dict) -> str:
    """The captured phase as a reader says it: "first backward" where only a repeated phase's
    first occurrence was recorded (``stacks=auto``)."""
    phase = str(table.get("phase"))
    return f"first {phase}" if table.get("occurrence") == "first" and phase in REPEATED_PHASES else phase


def cite_phase(run_dir: Path, phases: list[str], stacks_setting: str | None) -> tuple[str, list[dict]]:
    """The first of ``phases`` (innermost first) with a captured table, cited; else, when the run
    did not capture any of them, which ``stacks=`` would."""
    for phase in phases:
        table = phase_table(run_dir, phase)
        if table is not None:
            return cite(table)
    if phases and stacks_setting is not None:
        return f"; to see which lines held it, run again with stacks={phases[-1]}", []
    return "", []

