"""What a run directory says about how its run ended, made truthful after the fact.

A run.json that still says ``running`` while nothing of memdiag is alive was left by a memdiag
that could not finish (SIGKILL, a machine that went down): ``settle`` marks it ``abandoned``
with the time of its last sample, so it never reads as a live run.
"""

from __future__ import annotations

import datetime as dt
import platform
import time

from memdiag import procs
from memdiag.files import WriteFailed
from memdiag.rundir import RunDir
from memdiag.timeline import format as fmt
from memdiag.rundir import RESERVE
from memdiag.timeline.reader import Run, incomplete_text

STALE_S = 300.0
"""Without an owner on this host to ask: a run with no write for this long is not live."""


def owner_alive(spec: dict) -> bool | None:
    """True/False when the owner is a process on this host; None when it cannot be asked."""
    owner = spec.get("owner") or {}
    if owner.get("host") != platform.node() or not owner.get("pid"):
        return None
    return procs.alive(int(owner["pid"]), owner.get("start_ticks"))


def last_record_ns(run: Run) -> int | None:
    times = []
    for timeline in [*run.ranks.values(), *run.nodes.values()]:
        if len(timeline.t_ns):
            times.append(int(timeline.t_ns[-1]))
        times += [e["t"] for e in timeline.events if e.get("kind") != fmt.HEADER][-1:]
    return max(times) if times else None


def _newest_write_s(run: Run) -> float:
    paths = [run.path / fmt.RUN_JSON, *(run.path / fmt.TIMELINE_DIR).glob("*.jsonl")]
    stamps = []
    for path in paths:
        try:
            stamps.append(path.stat().st_mtime)
        except OSError:
            pass
    return max(stamps, default=0.0)


def _write(run: Run) -> None:
    try:
        RunDir(run.path, run.spec).write()
    except WriteFailed:
        pass  # a read-only copy of a run: what it says still reads right here


def settle(run: Run) -> str | None:
    """Make run.json say what the timelines show: ``incomplete: N samples dropped ...`` when
    a full disk cost samples, and ``abandoned`` for a run left ``running`` by a dead memdiag
    (returns that note; None for a live or finished run)."""
    spec = run.spec
    if run.dropped and spec and spec.get("incomplete") != incomplete_text(run.dropped):
        spec["incomplete"] = incomplete_text(run.dropped)
        _write(run)
    if spec.get("status") != "running":
        return None
    alive = owner_alive(spec)
    if alive or (alive is None and time.time() - _newest_write_s(run) < STALE_S):
        return None
    last = last_record_ns(run)
    at = dt.datetime.fromtimestamp(last / 1e9, dt.timezone.utc).isoformat() if last else None
    note = (
        "memdiag did not finish this run (it was killed, or its machine went down)"
        + (f"; the last record is from {at}" if at else "; nothing was recorded")
    )
    spec.update(status="abandoned", abandoned_at=at, abandoned_note=note)
    _write(run)
    try:
        (run.path / RESERVE).unlink()  # the dead run's held room
    except OSError:
        pass
    return note
