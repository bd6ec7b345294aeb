"""DeepSpeed hostfiles: ``name slots=N`` per line, ``#`` comments. The names are only labels
for memdiag (a node's timeline, the ssh target); they need not resolve when the nodes are
simulated on one machine."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from memdiag.errors import UsageError

_LINE = re.compile(r"^(?P<name>[A-Za-z0-9_.\-]+)\s+slots\s*=\s*(?P<slots>\d+)$")


@dataclass(frozen=True)
class Host:
    name: str
    slots: int


def parse_hostfile(text: str, source: str = "hostfile") -> list[Host]:
    hosts: list[Host] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _LINE.match(line)
        if match is None:
            raise UsageError(f"{source} line {number}: {raw.strip()!r} is not 'NAME slots=N' (e.g. 'node1 slots=8')")
        host = Host(match["name"], int(match["slots"]))
        if host.slots < 1:
            raise UsageError(f"{source} line {number}: slots must be >= 1")
        if any(h.name == host.name for h in hosts):
            raise UsageError(f"{source} line {number}: host {host.name} is listed twice")
        hosts.append(host)
    if not hosts:
        raise UsageError(f"{source} lists no hosts; write one 'NAME slots=N' line per node")
    return hosts


def read_hostfile(path: str | Path) -> list[Host]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"hostfile={path}: cannot read it ({exc.strerror})") from None
    return parse_hostfile(text, str(path))


def format_hostfile(hosts: list[Host]) -> str:
    return "".join(f"{h.name} slots={h.slots}\n" for h in hosts)


def nodes_for_layout(hosts: list[Host], nnodes: int, per_node: int, source: str) -> list[Host]:
    """The first ``nnodes`` hosts, each with room for ``per_node`` ranks."""
    if len(hosts) < nnodes:
        raise UsageError(f"layout {nnodes}x{per_node} needs {nnodes} hosts; {source} lists {len(hosts)}")
    chosen = hosts[:nnodes]
    short = [h for h in chosen if h.slots < per_node]
    if short:
        raise UsageError(
            f"layout {nnodes}x{per_node} needs {per_node} slots per host; {source} gives {short[0].name} slots={short[0].slots}"
        )
    return [Host(h.name, per_node) for h in chosen]
