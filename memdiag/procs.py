"""Process trees from ``/proc``: who is below whom, who is alive, and stopping them.

Shared by the node watcher (which follows a job's ranks and, when memdiag dies, stops them)
and ``lifetime`` (which owns what a run starts). Ranks started by torchrun sit in sessions of
their own, so a process group does not reach them; the parent links in ``/proc`` do.
"""

from __future__ import annotations

import os
import signal
import time


def parse_stat(text: str) -> tuple[str, int, int]:
    """(state, ppid, start time in clock ticks) from ``/proc/<pid>/stat``; the command name
    may hold spaces and parens."""
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[19])


def parse_stat_ppid(text: str) -> int:
    return parse_stat(text)[1]


def read_stat(pid: int) -> tuple[str, int, int] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return parse_stat(f.read())
    except (OSError, ValueError, IndexError):
        return None


def children_map() -> dict[int, list[int]]:
    """ppid -> live (non-zombie) children, for every process on the machine."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        stat = read_stat(int(entry.name))
        if stat is None or stat[0] == "Z":
            continue
        children.setdefault(stat[1], []).append(int(entry.name))
    return children


def descendants(root: int, children: dict[int, list[int]] | None = None) -> list[int]:
    children = children_map() if children is None else children
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int, start_ticks: int | None = None) -> bool:
    """Running and not a zombie; with ``start_ticks``, still the same process (no PID reuse)."""
    stat = read_stat(pid)
    if stat is None or stat[0] == "Z":
        return False
    return start_ticks is None or stat[2] == start_ticks


def start_ticks(pid: int) -> int | None:
    stat = read_stat(pid)
    return None if stat is None else stat[2]


def send(pids, signum: int) -> list[int]:
    """Signal every pid that exists; returns those it reached."""
    reached = []
    for pid in pids:
        try:
            os.kill(pid, signum)
            reached.append(pid)
        except (ProcessLookupError, PermissionError):
            pass
    return reached


def reap_orphans(keep: set[int]) -> None:
    """Collect the exit status of re-parented children (we are a subreaper) so they do not
    linger as zombies; ``keep``: children whose status a ``Popen`` will collect."""
    me = os.getpid()
    for pid in children_map_zombies(me):
        if pid in keep:
            continue
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def children_map_zombies(parent: int) -> list[int]:
    """Zombie children of ``parent``."""
    zombies = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = read_stat(int(entry.name))
            if stat is not None and stat[0] == "Z" and stat[1] == parent:
                zombies.append(int(entry.name))
    return zombies


def terminate(pids: dict[int, int | None], grace_s: float, *, poll_s: float = 0.1, while_waiting=None) -> list[int]:
    """SIGTERM every process (pid -> start ticks), SIGKILL what is left after ``grace_s``;
    returns the pids that needed SIGKILL. ``while_waiting`` runs on every poll."""
    send(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    left = dict(pids)
    while left and time.monotonic() < deadline:
        left = {p: s for p, s in left.items() if alive(p, s)}
        if while_waiting is not None:
            while_waiting()
        if left:
            time.sleep(poll_s)
    left = {p: s for p, s in left.items() if alive(p, s)}
    send(left, signal.SIGKILL)
    return sorted(left)
