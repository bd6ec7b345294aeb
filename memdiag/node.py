"""The node watcher: one process per node that sees the whole node's memory.

It samples ``/proc/meminfo`` (MemTotal, MemAvailable), the memory cgroup (usage, peak, limit)
and, for every rank below the launcher's process and the rank's own children, RSS at every tick
and PSS (``/proc/<pid>/smaps_rollup``, ~0.4 ms a read) at a lower rate, so that pages shared
between ranks (mmap'd checkpoints, the CUDA context's libraries) are counted once per node.
It writes ``timeline/node-<host>.jsonl`` in the rank files' format.

    python -m memdiag.node RUN_DIR --root-pid PID
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import memdiag
from memdiag.probes import cgroup
from memdiag.probes.host import read_meminfo, read_proc_status, read_pss_bytes
from memdiag.timeline import format as fmt
from memdiag.timeline.writer import TimelineWriter

TREE_REFRESH_S = 0.5


def parse_environ_rank(data: bytes) -> int | None:
    """``RANK`` from the NUL-separated ``/proc/<pid>/environ``."""
    for entry in data.split(b"\0"):
        if entry.startswith(b"RANK="):
            try:
                return int(entry[5:])
            except ValueError:
                return None
    return None


def parse_stat_ppid(text: str) -> int:
    """Parent pid from ``/proc/<pid>/stat`` (the command name may hold spaces and parens)."""
    return int(text[text.rindex(")") + 2 :].split()[1])


@dataclass
class RankProcesses:
    rank: int
    pid: int
    children: list[int]


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                ppid = parse_stat_ppid(f.read())
        except (OSError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _descendants(root: int, children: dict[int, list[int]]) -> list[int]:
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            found.append(child)
            todo.append(child)
    return found


def _rank_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return parse_environ_rank(f.read())
    except OSError:
        return None


def find_ranks(root_pid: int) -> dict[int, RankProcesses]:
    """Ranks below ``root_pid``: the topmost process carrying each ``RANK``, with everything
    below it as its children (dataloader workers, compilers)."""
    children = _children_map()
    ranks: dict[int, RankProcesses] = {}
    for pid in _descendants(root_pid, children):
        rank = _rank_of(pid)
        if rank is None or rank in ranks:
            continue
        ranks[rank] = RankProcesses(rank, pid, _descendants(pid, children))
    return ranks


class NodeWatcher:
    def __init__(
        self,
        run_dir: Path,
        root_pid: int,
        interval_s: float = 0.1,
        pss_interval_s: float = 1.0,
        host: str | None = None,
    ) -> None:
        self.host = host or socket.gethostname()
        self.root_pid = root_pid
        self.interval_s = interval_s
        self.pss_interval_s = pss_interval_s
        self.cgroup_files = cgroup.locate(root_pid)
        self.writer = TimelineWriter(
            fmt.node_path(run_dir, self.host),
            {
                "tool_version": memdiag.__version__,
                "host": self.host,
                "pid": os.getpid(),
                "root_pid": root_pid,
                "interval_s": interval_s,
                "pss_interval_s": pss_interval_s,
                "cgroup_version": self.cgroup_files.version if self.cgroup_files else None,
            },
        )
        if self.cgroup_files is None:
            self._warn("cgroup", "no memory cgroup files found; cgroup usage and limit not recorded")
        self.stop_event = threading.Event()
        self._ranks: dict[int, RankProcesses] = {}
        self._next_tree = 0.0
        self._next_pss = 0.0

    def _warn(self, key: str, message: str) -> None:
        self.writer.write({"kind": fmt.WARNING, "t": time.time_ns(), "key": key, "message": message})

    def sample_once(self) -> dict:
        now = time.monotonic()
        if now >= self._next_tree:
            self._ranks = find_ranks(self.root_pid)
            self._next_tree = now + TREE_REFRESH_S
        with_pss = now >= self._next_pss
        if with_pss:
            self._next_pss = now + self.pss_interval_s
        system = read_meminfo()
        record: dict = {
            "kind": fmt.SAMPLE,
            "t": time.time_ns(),
            "mem_total_bytes": system.total_bytes,
            "mem_available_bytes": system.available_bytes,
        }
        if self.cgroup_files is not None:
            group = cgroup.read(self.cgroup_files)
            record.update(
                cgroup_usage_bytes=group.usage_bytes,
                cgroup_peak_bytes=group.peak_bytes,
                cgroup_limit_bytes=group.limit_bytes,
            )
        ranks = {}
        for rank, procs in sorted(self._ranks.items()):
            entry = self._read_rank(procs, with_pss)
            if entry is not None:
                ranks[str(rank)] = entry
        record["ranks"] = ranks
        return record

    @staticmethod
    def _read_rank(procs: RankProcesses, with_pss: bool) -> dict | None:
        try:
            entry = {"pid": procs.pid, "rss_bytes": read_proc_status(procs.pid).rss_bytes}
        except OSError:
            return None  # the rank has exited
        children_rss = 0
        for child in procs.children:
            try:
                children_rss += read_proc_status(child).rss_bytes
            except OSError:
                pass
        entry["children_rss_bytes"] = children_rss
        if with_pss:
            try:
                pss = read_pss_bytes(procs.pid)
                for child in procs.children:
                    try:
                        pss += read_pss_bytes(child)
                    except OSError:
                        pass
                entry["pss_bytes"] = pss
            except OSError:
                pass
        return entry

    def run(self) -> None:
        deadline = time.monotonic()
        errors = 0
        while not self.stop_event.is_set():
            try:
                self.writer.write(self.sample_once())
            except Exception as exc:  # a watcher must outlive a bad read
                errors += 1
                if errors == 1:
                    self._warn("sample", f"node sample failed: {exc!r}")
            deadline = max(deadline + self.interval_s, time.monotonic())
            self.stop_event.wait(deadline - time.monotonic())
        self.writer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="memdiag node watcher")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--root-pid", type=int, required=True)
    parser.add_argument("--interval-s", type=float, default=0.1)
    parser.add_argument("--pss-interval-s", type=float, default=1.0)
    args = parser.parse_args(argv)
    watcher = NodeWatcher(args.run_dir, args.root_pid, args.interval_s, args.pss_interval_s)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: watcher.stop_event.set())
    watcher.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
