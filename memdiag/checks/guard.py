"""oom_guard: the node watcher stopped the run before the kernel's OOM killer would have."""

from __future__ import annotations

from memdiag.checks.finding import Finding
from memdiag.timeline.reader import Run
from memdiag.units import format_bytes


def check(run: Run) -> list[Finding]:
    findings = []
    for host, node in sorted(run.nodes.items()):
        for event in node.events:
            if event["kind"] != "guard":
                continue
            stacks = event.get("stacks", {})
            findings.append(
                Finding(
                    id="oom_guard",
                    severity="error",
                    message=f"node {host}: memdiag's guard stopped the run: {event['reason']}; "
                    f"py-spy stacks of {len(stacks)} rank(s) at that moment are in {', '.join(sorted(set(stacks.values())))}"
                    if stacks
                    else f"node {host}: memdiag's guard stopped the run: {event['reason']}",
                    evidence={k: v for k, v in event.items() if k not in ("kind",)},
                    fix="the run needs more host RAM than the limit allows: see host_limit_forecast and "
                    "scaling_5290 for what to change; force a larger limit with host_ram= only if it is real",
                    ranks=sorted(int(r) for r in stacks),
                    moments=[{"t": event["t"], "label": f"guard stopped the run ({format_bytes(event.get('node_rss_bytes'))})"}],
                )
            )
    return findings
