"""Checks read recorded runs and return findings; one module each, in a registry."""

from __future__ import annotations

from dataclasses import replace

import json
import logging
from pathlib import Path
from typing import Callable

from memdiag.checks import children, device_headroom, guard, host_limit, leak, not_released, scaling_5290
from memdiag.checks.finding import Finding
from memdiag.failure import describe, parse_traceback
from memdiag.timeline import format as fmt
from memdiag.files import write_atomic
from memdiag.timeline.reader import Run

log = logging.getLogger(__name__)

FINDINGS_JSON = "findings.json"

CHECKS: dict[str, Callable[[Run], list[Finding]]] = {
    "oom_guard": guard.check,
    "host_limit": host_limit.check,
    "scaling_5290": scaling_5290.check,
    "not_released": not_released.check,
    "leak": leak.check,
    "device_headroom": device_headroom.check,
    "children_memory": children.check,
}
MULTI_RUN_CHECKS: dict[str, Callable[[list[Run]], list[Finding]]] = {
    "scaling_5290_fit": scaling_5290.check_many,
}
SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


def with_host_limit(run: Run, limit_bytes: int, source: str) -> Run:
    """The same run judged against another host limit (``check --host-ram``): a copy whose
    start record says so; the run directory is not touched."""
    return replace(run, spec=run.spec | {"host_limit_bytes": limit_bytes, "host_limit_source": source})


def run_error(run: Run) -> dict | None:
    """What the first failing rank raised: the earliest ``exception`` event of any rank, else the
    last traceback in a rank's log (``logs/rank-N.log``, a command's ``logs/stderr.log``)."""
    raised = [(e["t"], rank, e) for rank, timeline in run.ranks.items() for e in timeline.events if e.get("kind") == fmt.EXCEPTION]
    if raised:
        _, rank, event = min(raised, key=lambda item: item[0])
        return {"rank": rank, **{k: event[k] for k in ("type", "message", "file", "line", "function") if k in event}}
    logs = Path(run.path) / "logs"
    for log_file in [*sorted(logs.glob("rank-*.log")), logs / "stderr.log"]:
        try:
            found = parse_traceback(log_file.read_text(errors="replace"))
        except OSError:
            continue
        if found:
            rank = log_file.stem.split("-", 1)[1] if log_file.stem.startswith("rank-") else None
            return ({"rank": int(rank)} if rank and rank.isdigit() else {}) | found | {"log": str(log_file)}
    return None


def run_checks(run: Run) -> list[Finding]:
    """Every check on one run. A check that fails on odd data becomes a finding, not a crash."""
    findings = []
    for name, check in CHECKS.items():
        try:
            findings += check(run)
        except Exception as exc:  # an accounting surprise is itself worth reporting
            log.debug("check %s failed", name, exc_info=True)
            findings.append(
                Finding(id=name, severity="warning", message=f"check {name} could not run on this data ({exc!r}); the data it needs is missing or malformed")
            )
    for problem in run.problems:
        findings.append(Finding(id="incomplete_run", severity="info", message=problem))
    status = run.spec.get("status")
    if status and status != "completed":
        error = run_error(run) if status == "failed" else None
        findings.append(
            Finding(
                id="run_status",
                severity="error" if status in ("failed", "stopped_by_guard") else "warning",
                message=f"the run ended as {status!r} (exit code {run.spec.get('exit_code')})"
                + (f": {describe(error)}" if error else "") + "; findings use what was recorded",
                evidence={"error": error} if error else {},
                ranks=[error["rank"]] if error and "rank" in error else [],
            )
        )
    return sorted(findings, key=lambda f: SEVERITY_ORDER[f.severity])


def write_findings(run_dir: Path, findings: list[Finding]) -> Path:
    path = Path(run_dir) / FINDINGS_JSON
    write_atomic(path, json.dumps([f.to_dict() for f in findings], indent=2))
    return path


def read_findings(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / FINDINGS_JSON
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return []
