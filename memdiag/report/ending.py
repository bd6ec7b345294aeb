"""What the user sees last, the same whatever started the run (``memdiag run case=``,
``memdiag run -- CMD``, ``memdiag.record``): the findings with their severity, how the run ended
(completed, stopped by the guard, interrupted by a signal, failed: the rank that failed first
and its signal or exception before the others' follow-on errors), then the report's path."""

from __future__ import annotations

from pathlib import Path

from memdiag.checks.finding import Finding
from memdiag.failure import failure_excerpt
from memdiag.report.build import format_finding
from memdiag.summary import Summary
from memdiag.units import format_bytes


def ending(run_dir: Path, spec: dict, summary: Summary, findings: list[Finding], code: int, *, html: Path,
           guard: dict | None, what: str = "the run", echoed_stderr: bool = False) -> tuple[list[str], int]:
    """(console lines, exit status). ``code``: the job's own exit status; ``html``: the report's
    path; ``guard``: the node
    watcher's guard event, if it stopped the run; ``what``: "the run", "the command" or "the
    recording"; ``echoed_stderr``: the job's stderr was on the console already (``run -- CMD``),
    so only the cause's first line is repeated."""
    lines = [format_finding(f) for f in findings if f.severity != "info"]
    info = sum(f.severity == "info" for f in findings)
    if info:
        lines.append(f"memdiag: {info} info finding(s) in the report")
    status = spec.get("status")
    if status == "interrupted":
        lines.append(f"memdiag: {what} was stopped ({spec.get('signal') or 'a stop signal'}); the report shows what was recorded")
    elif guard is not None:
        lines.append(f"memdiag: the guard stopped {what}: {guard['reason']}; stacks in {run_dir / 'stacks'}")
        code = 1
    elif code != 0 or status == "failed":
        how = f"exit code {code}" if code else "an uncaught exception"
        lines.append(f"memdiag: {what} failed ({how})")
        excerpt = failure_excerpt(run_dir)
        if excerpt and not echoed_stderr:
            lines.append(excerpt)
        elif excerpt.startswith("rank "):  # the stderr was on the console already: its cause, first
            lines.append("memdiag: " + excerpt.splitlines()[0])
        code = code or 1
    else:
        lines.append("memdiag: done. " + _figures(summary))
        if any(f.severity == "error" for f in findings) and what == "the run":
            code = 1  # a case run fails on an error finding; a command keeps its own exit status
    lines.append(f"memdiag: report {html}")
    return lines, code


def _figures(summary: Summary) -> str:
    parts = []
    if summary.loss is not None:
        parts.append(f"loss {summary.loss:.4f}")
    if summary.tokens_per_s_per_device is not None:
        parts.append(f"{summary.tokens_per_s_per_device:,.1f} tokens/s per device")
    peaks = ", ".join(f"{format_bytes(b)} (node {h})" for h, b in summary.host_peak_bytes_per_node.items())
    if peaks:
        parts.append(f"host RAM peak per node: {peaks}")
    return ", ".join(parts) or "nothing was recorded"
