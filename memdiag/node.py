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
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import memdiag
from memdiag import procs
from memdiag.budget import SteadyClock, WindowBudget, node_roles, rank_roles
from memdiag.guard import GuardConfig, guard_reason, py_spy_dump
from memdiag.metrics import NodeMetrics, job_name
from memdiag.probes import cgroup
from memdiag.probes.device import NVML_INTERVAL_S, SOURCE_CUDA, ProcessNvml, nvml_module
from memdiag.probes.host import SelfStatusReader, read_meminfo, read_proc_status, read_pss_bytes
from memdiag.rankstate import RankFollowers
from memdiag.settings import BY_FIELD
from memdiag.timeline import format as fmt
from memdiag.timeline.writer import TimelineWriter

TREE_REFRESH_S = 0.5
DISCOVERY_INTERVAL_S = 2.0
"""How often the watcher looks for rank files it has not read the header of."""


def parse_environ_rank(data: bytes) -> int | None:
    """``RANK`` from the NUL-separated ``/proc/<pid>/environ``; 0 for the process of a
    single-process job (``memdiag run -- python x.py``: no launcher gave it a ``RANK``, memdiag
    marked it ``MEMDIAG_SINGLE_PROCESS``), whose guard and node figures would otherwise see no rank."""
    single = False
    for entry in data.split(b"\0"):
        if entry.startswith(b"RANK="):
            try:
                return int(entry[5:])
            except ValueError:
                return None
        single = single or entry == b"MEMDIAG_SINGLE_PROCESS=1"
    return 0 if single else None


@dataclass
class RankProcesses:
    rank: int
    pid: int
    children: list[int]
    start_ticks: int | None = None
    roles: dict[int, str] = field(default_factory=dict)
    """child PID -> ``procs.child_role``."""


def _rank_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return parse_environ_rank(f.read())
    except OSError:
        return None


def find_ranks(root_pid: int) -> dict[int, RankProcesses]:
    """Ranks at or below ``root_pid``: the topmost process carrying each ``RANK``, with
    everything below it as its children (dataloader workers, compilers). The root itself is a
    rank when no launcher sits between memdiag and the script (``memdiag run -- python x.py``),
    which shows as no rank below it (a launcher may have inherited a ``RANK`` of its own)."""
    children = procs.children_map()
    ranks: dict[int, RankProcesses] = {}
    for pid in procs.descendants(root_pid, children):
        rank = _rank_of(pid)
        if rank is None or rank in ranks:
            continue
        ranks[rank] = RankProcesses(rank, pid, procs.descendants(pid, children), procs.start_ticks(pid))
    if not ranks and (rank := _rank_of(root_pid)) is not None:
        ranks[rank] = RankProcesses(rank, root_pid, procs.descendants(root_pid, children), procs.start_ticks(root_pid))
    for found in ranks.values():
        if found.children:
            own = procs.read_cmdline(found.pid)
            found.roles = {c: procs.child_role(procs.read_cmdline(c), procs.read_name(c), own) for c in found.children}
    return ranks


class RankSampler:
    """The ranks' host figures at ``sample_hz``, read from outside them (``sampler=watcher``): one
    open ``/proc/<pid>/status`` per rank, written per rank in batches (``rank_samples``) like a
    rank's own sampler writes its ``samples``, under the same budget: each rank's phase and step
    come from its events as the watcher follows its file. A rank that has exited is dropped."""

    def __init__(self, writer: TimelineWriter, steady: Callable[[int, float], bool] = lambda rank, now: False,
                 steady_interval_s: float = 0.0,
                 nvml: Callable[[dict[int, RankProcesses]], dict[int, int | None]] | None = None) -> None:
        self.writer = writer
        self.steady = steady
        """Whether a rank is in steady training now (the watcher's view of its events)."""
        self.steady_interval_s = steady_interval_s
        self.nvml = nvml
        """Where a GPU is: NVML's figure of each rank's process, read at most every NVML_INTERVAL_S
        (one query per device for all ranks, out of the ranks); the other ticks write null."""
        self._columns = ("t", "rss_bytes", "hwm_bytes", *(("nvml_used_bytes",) if nvml is not None else ()))
        self._next_nvml = 0.0
        self._readers: dict[int, tuple[int, SelfStatusReader]] = {}
        self._budgets: dict[int, WindowBudget] = {}
        self._batches: dict[int, dict[str, list]] = {}
        self._flushed = time.monotonic()

    def sample(self, ranks: dict[int, RankProcesses]) -> None:
        t = time.time_ns()
        now = time.monotonic()
        nvml: dict[int, int | None] = {}
        if self.nvml is not None and now >= self._next_nvml:
            self._next_nvml = now + NVML_INTERVAL_S
            nvml = self.nvml(ranks)
        all_steady = True
        for rank, processes in ranks.items():
            reader = self._reader(rank, processes.pid)
            if reader is None:
                continue
            try:
                mem = reader.read()
            except OSError:  # the rank has exited
                self._drop(rank)
                continue
            sample = {"t": t, "rss_bytes": mem.rss_bytes, "hwm_bytes": mem.hwm_bytes}
            if self.nvml is not None:
                sample["nvml_used_bytes"] = nvml.get(rank)
            all_steady = self._add(rank, sample, now) and all_steady
        # while every rank is steady its samples wait for their window's end anyway: one batch a
        # window instead of one a flush interval (a batch's own bytes outweighed its two samples)
        if time.monotonic() - self._flushed >= (self.steady_interval_s if all_steady and ranks else fmt.FLUSH_INTERVAL_S):
            self.flush()

    def _add(self, rank: int, sample: dict, now: float) -> bool:
        """The rank's sample through its budget; whether the rank is steady."""
        budget = self._budgets.get(rank)
        if budget is None:
            budget = self._budgets[rank] = WindowBudget(self.steady_interval_s, rank_roles)
        steady = self.steady(rank, now)
        self._keep(rank, budget.take(sample, now, steady))
        return steady

    def _keep(self, rank: int, samples: list[dict]) -> None:
        batch = self._batches.setdefault(rank, {name: [] for name in self._columns})
        for sample in samples:
            for name, column in batch.items():
                column.append(sample[name])

    def _reader(self, rank: int, pid: int) -> SelfStatusReader | None:
        held = self._readers.get(rank)
        if held is not None and held[0] == pid:
            return held[1]
        self._drop(rank)
        try:
            reader = SelfStatusReader(pid)
        except OSError:
            return None
        self._readers[rank] = (pid, reader)
        return reader

    def _drop(self, rank: int) -> None:
        held = self._readers.pop(rank, None)
        if held is not None:
            held[1].close()
        budget = self._budgets.get(rank)
        if budget is not None:  # the exited rank's open window is written, not lost
            self._keep(rank, budget.close())

    def flush(self) -> None:
        for rank, batch in self._batches.items():
            if batch["t"]:
                self.writer.write({"kind": fmt.RANK_SAMPLES, "rank": rank, **batch})
        self._batches = {}
        self._flushed = time.monotonic()

    def close(self) -> None:
        for rank in list(self._readers):
            self._drop(rank)
        self.flush()


NO_CHILDREN = {"children_rss_bytes": 0, "children": 0, "children_pss_bytes": 0}
"""A rank entry's figures left out of the file while the rank has no children (1.7): the reader
reads them as 0. Most ranks have none; with them written, eight ranks' samples were a third larger."""


def as_written(sample: dict) -> dict:
    """A node sample as the file keeps it: a rank's ``pid`` and ``children`` count only with its
    once-a-second PSS read (no reader needs them every tick; they were a quarter of the bytes),
    and no children's figures for a rank without children."""
    def entry_as_written(entry: dict) -> dict:
        with_pss = "pss_bytes" in entry
        return {k: v for k, v in entry.items()
                if (with_pss or k not in ("pid", "children")) and not (k in NO_CHILDREN and v == 0 and not entry.get("children"))}

    return {**sample, "ranks": {rank: entry_as_written(entry) for rank, entry in sample.get("ranks", {}).items()}}


class NodeWatcher:
    def __init__(
        self,
        run_dir: Path,
        root_pid: int,
        interval_s: float = 0.1,
        pss_interval_s: float = 1.0,
        host: str | None = None,
        guard: GuardConfig | None = None,
        parent_pid: int | None = None,
        orphan_grace_s: float = 10.0,
        metrics_port: int | None = None,
        metrics_textfile: Path | None = None,
        rank_interval_s: float | None = None,
        columnar: str = "never",
        full_rate_s: float = float("inf"),
        steady_interval_s: float = 0.0,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.parent_pid = parent_pid
        """The memdiag that owns the job; when it dies the watcher stops the job itself."""
        self.orphan_grace_s = orphan_grace_s
        self._orphaned_at: float | None = None
        self._kill_at: float | None = None
        self._kill_pids: dict[int, int | None] = {}
        self._root_ticks = procs.start_ticks(root_pid)
        self.guard = guard
        self.guard_fired = False
        self.host = host or socket.gethostname()
        self.root_pid = root_pid
        self.interval_s = interval_s
        self.pss_interval_s = pss_interval_s
        # a command that already ended leaves no /proc entry: the watcher shares its cgroup
        self.cgroup_files = cgroup.locate(root_pid) or cgroup.locate(os.getpid())
        early_warnings: list[tuple[str, str]] = []
        self.metrics: NodeMetrics | None = None
        self.followers = RankFollowers(self.run_dir)
        """Each rank's phase and step from its file: the budget's view, and the metrics'."""
        if metrics_port is not None or metrics_textfile is not None:
            self.metrics = NodeMetrics(
                self.run_dir, job_name(self.run_dir), self.host, port=metrics_port, textfile_dir=metrics_textfile,
                limit_bytes=guard.limit_bytes if guard else None, guard_fraction=guard.fraction if guard else None,
                warn=lambda key, message: early_warnings.append((key, message)), followers=self.followers,
            )
        self.nvml = ProcessNvml(self._warn) if rank_interval_s else None
        """``sampler=watcher``: NVML's series read here for every rank (the ranks read it only with
        their categorised memory records, for the reconciliation)."""
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
                "metrics_url": self.metrics.url if self.metrics else None,
                "nvml": None if self.nvml is None else "per process" if self.nvml.started() else self.nvml.off,
                "nvml_module": nvml_module() if self.nvml is not None and self.nvml.started() else None,
                "guard": None if guard is None else {
                    "limit_bytes": guard.limit_bytes,
                    "fraction": guard.fraction,
                    "min_available_bytes": guard.min_available_bytes,
                    "grace_s": guard.grace_s,
                },
            },
        )
        if self.cgroup_files is None:
            self._warn("cgroup", "no memory cgroup files found; cgroup usage and limit not recorded")
        for key, message in early_warnings:
            self._warn(key, message)
        if self.metrics is not None:
            self.metrics.warn = self._warn
        self._metrics_errors = 0
        self.rank_interval_s = rank_interval_s
        self.columnar = columnar
        self.full_rate_s, self.steady_interval_s = full_rate_s, steady_interval_s
        self._clocks: dict[int, SteadyClock] = {}
        self._node_budget = WindowBudget(steady_interval_s, node_roles)
        nvml = self._nvml_used if self.nvml is not None and self.nvml.started() else None  # a CPU machine: no column
        self.rank_sampler = RankSampler(self.writer, self.rank_steady, steady_interval_s, nvml) if rank_interval_s else None
        self.stop_event = threading.Event()
        self._ranks: dict[int, RankProcesses] = {}
        self._next_tree = 0.0
        self._next_pss = 0.0
        self._next_discovery = 0.0
        self._headers: dict[str, dict] = {}

    def _declared_ranks(self, found: set[int]) -> dict[int, RankProcesses]:
        """Ranks that named this node and their pid in their timeline file's header, in the job's
        process tree, though no ``RANK`` was in their environment when they started (a process
        recording itself with ``memdiag.record``, workers whose framework sets ``RANK`` later):
        the watcher samples them and the guard counts them as it does the launcher's ranks."""
        now = time.monotonic()
        if now >= self._next_discovery:
            self._next_discovery = now + DISCOVERY_INTERVAL_S
            for path in (self.run_dir / fmt.TIMELINE_DIR).glob("rank-*.jsonl"):
                if path.name in self._headers:
                    continue
                try:
                    with open(path, "rb") as f:
                        header = json.loads(f.readline())
                except (OSError, ValueError):  # not whole yet: the next look reads it
                    continue
                if isinstance(header, dict) and header.get("kind") == fmt.HEADER:
                    self._headers[path.name] = header
        declared = {h["rank"]: h["pid"] for h in self._headers.values() if h.get("host") == self.host
                    and isinstance(h.get("rank"), int) and isinstance(h.get("pid"), int) and h["rank"] not in found}
        if not declared:  # the usual case: the launcher's ranks carry RANK, found by the tree walk already
            return {}
        children = procs.children_map()
        job = {self.root_pid, *procs.descendants(self.root_pid, children)}
        return {rank: RankProcesses(rank, pid, procs.descendants(pid, children), procs.start_ticks(pid))
                for rank, pid in declared.items() if pid in job}

    def rank_steady(self, rank: int, now: float) -> bool:
        """The rank's training loop has run past ``full_rate_s`` and it is still in it (its
        events as followed from its file; the ranks write them as they happen)."""
        state = self.followers.states.get(rank)
        if state is None:
            return False
        clock = self._clocks.get(rank)
        if clock is None:
            clock = self._clocks[rank] = SteadyClock(self.full_rate_s, self.steady_interval_s)
        return clock.steady(now, state.phase, state.step)

    def _nvml_used(self, ranks: dict[int, RankProcesses]) -> dict[int, int | None]:
        """NVML's figure of each rank's process, also for the live metrics; a CUDA rank whose
        allocator holds memory and that NVML does not list is a reason to say why, once."""
        states = self.followers.states
        on_device = {rank for rank in ranks if rank in states and states[rank].device_source == SOURCE_CUDA
                     and (states[rank].figures.get("device_allocated_bytes") or 0) > 0}
        figures = self.nvml.used({rank: processes.pid for rank, processes in ranks.items()}, on_device)
        for rank, used in figures.items():
            if used is not None and rank in states:
                states[rank].figures["nvml_used_bytes"] = used
        return figures

    def node_steady(self, sample: dict, now: float) -> bool:
        """Every rank of the node is steady: the node sample's bounds stand for its window."""
        ranks = sample.get("ranks") or {}
        return bool(ranks) and all(self.rank_steady(int(rank), now) for rank in ranks)

    def _write_sample(self, sample: dict) -> None:
        """The node sample under the budget: every sample while any rank is loading, initialising,
        saving or in its first minutes of training; each window's bounds when all are steady."""
        now = time.monotonic()
        self.followers.refresh(self._ranks)
        for kept in self._node_budget.take(as_written(sample), now, self.node_steady(sample, now)):
            self.writer.write(kept)

    def _warn(self, key: str, message: str) -> None:
        self.writer.write({"kind": fmt.WARNING, "t": time.time_ns(), "key": key, "message": message})

    def sample_once(self) -> dict:
        now = time.monotonic()
        if now >= self._next_tree:
            found = find_ranks(self.root_pid) if self._root_alive() else {}
            found |= self._declared_ranks(set(found))
            # a rank whose launcher died is re-parented, not gone: keep following it
            for rank, old in self._ranks.items():
                if rank not in found and procs.alive(old.pid, old.start_ticks):
                    found[rank] = old
            self._ranks = found
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
        for rank, processes in sorted(self._ranks.items()):
            entry = self._read_rank(processes, with_pss)
            if entry is not None:
                ranks[str(rank)] = entry
        record["ranks"] = ranks
        return record

    @staticmethod
    def _read_rank(rank: RankProcesses, with_pss: bool) -> dict | None:
        """The rank's own RSS and its children's (every tick); at PSS ticks ``pss_bytes`` (the
        rank and its children, shared pages split between them), ``children_pss_bytes`` and the
        children by role. A child that exits between two reads, or cannot be read, is skipped."""
        try:
            entry = {"pid": rank.pid, "rss_bytes": read_proc_status(rank.pid).rss_bytes}
        except OSError:
            return None  # the rank has exited
        children_rss, read = 0, []
        for child in rank.children:
            try:
                children_rss += read_proc_status(child).rss_bytes
                read.append(child)
            except OSError:
                pass
        entry["children_rss_bytes"] = children_rss
        entry["children"] = len(read)
        if with_pss:
            try:
                own = read_pss_bytes(rank.pid)
            except OSError:
                return entry
            children_pss, roles = 0, {}
            for child in read:
                try:
                    pss = read_pss_bytes(child)
                except OSError:
                    continue
                children_pss += pss
                role = roles.setdefault(rank.roles.get(child, "other"), {"count": 0, "pss_bytes": 0})
                role["count"] += 1
                role["pss_bytes"] += pss
            entry["pss_bytes"] = own + children_pss
            entry["children_pss_bytes"] = children_pss
            if roles:
                entry["children_roles"] = roles
        return entry

    def enforce_guard(self, sample: dict) -> None:
        """Stop the job, with every rank's stack, when the sample crosses the guard."""
        if self.guard is None or self.guard_fired:
            return
        reason = guard_reason(self.guard, sample)
        if reason is None:
            return
        self.guard_fired = True
        pids = {rank: processes.pid for rank, processes in self._ranks.items()}
        stacks = {}
        for rank, pid in pids.items():
            path = self.run_dir / "stacks" / f"rank-{rank}.txt"
            py_spy_dump(pid, path)
            stacks[str(rank)] = str(path.relative_to(self.run_dir))
        self.writer.write(
            {
                "kind": fmt.GUARD,
                "t": sample["t"],
                "reason": reason,
                "node_rss_bytes": sum(r["rss_bytes"] + r.get("children_rss_bytes", 0) for r in sample["ranks"].values()),
                "limit_bytes": self.guard.limit_bytes,
                "mem_available_bytes": sample.get("mem_available_bytes"),
                "stacks": stacks,
                "action": f"SIGTERM to ranks {sorted(pids)}, SIGKILL after {self.guard.grace_s:g} s",
            }
        )
        self.writer.flush()
        # memdiag's SIGTERM handler in each rank flushes its timeline; sampling goes on meanwhile
        self._stop_job({pid: procs.start_ticks(pid) for pid in pids.values()}, self.guard.grace_s)

    def _stop_job(self, pids: dict[int, int | None], grace_s: float) -> None:
        procs.send(pids, signal.SIGTERM)
        self._kill_at = time.monotonic() + grace_s
        self._kill_pids = pids

    def _kill_stragglers(self) -> None:
        if self._kill_at is not None and time.monotonic() >= self._kill_at:
            procs.send({p: t for p, t in self._kill_pids.items() if procs.alive(p, t)}, signal.SIGKILL)
            self._kill_at = None

    def request_stop(self) -> None:
        """memdiag's SIGTERM after the job: stop. The same signal sent by the kernel because
        memdiag died (PR_SET_PDEATHSIG) is not a stop: the job still has to be stopped."""
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            return
        self.stop_event.set()

    def _root_alive(self) -> bool:
        return procs.alive(self.root_pid, self._root_ticks)

    def job_alive(self) -> bool:
        return self._root_alive() or any(procs.alive(p.pid, p.start_ticks) for p in self._ranks.values())

    def _job_processes(self) -> dict[int, int | None]:
        pids: dict[int, int | None] = {}
        if self._root_alive():
            pids[self.root_pid] = self._root_ticks
            pids.update({p: procs.start_ticks(p) for p in procs.descendants(self.root_pid)})
        for rank in self._ranks.values():
            pids[rank.pid] = rank.start_ticks
            pids.update({p: None for p in rank.children})
        return pids

    def _watch_owner(self) -> None:
        """When the memdiag that owns the job is gone (killed with SIGKILL, say), nobody else
        will stop the job: SIGTERM all of it, SIGKILL what is left after the grace."""
        if self.parent_pid is None:
            return
        if self._orphaned_at is not None or os.getppid() == self.parent_pid:
            return
        self._orphaned_at = time.monotonic()
        pids = self._job_processes()
        self._warn("owner", f"memdiag (pid {self.parent_pid}) is gone; stopping the job ({len(pids)} processes)")
        self._stop_job(pids, self.orphan_grace_s)

    def run(self) -> None:
        deadline = time.monotonic()
        errors = 0
        reason = "stopped by memdiag"
        # with sampler=watcher the loop ticks at the ranks' rate and takes a node sample every few ticks
        tick_s = min(self.interval_s, self.rank_interval_s or self.interval_s)
        every = max(1, round(self.interval_s / tick_s))
        ticks = 0
        while not self.stop_event.is_set():
            try:
                if ticks % every == 0:
                    sample = self.sample_once()
                    self._write_sample(sample)
                    self.enforce_guard(sample)
                    self._update_metrics(sample)
                    self._watch_owner()
                    self._kill_stragglers()
                    if not self.job_alive():
                        reason = "the job ended" if self._orphaned_at is None else f"memdiag (pid {self.parent_pid}) died; the job was stopped"
                        break
                if self.rank_sampler is not None:
                    self.rank_sampler.sample(self._ranks)
            except Exception as exc:  # a watcher must outlive a bad read
                errors += 1
                if errors == 1:
                    self._warn("sample", f"node sample failed: {exc!r}")
            ticks += 1
            deadline = max(deadline + tick_s, time.monotonic())
            self.stop_event.wait(deadline - time.monotonic())
        if self.rank_sampler is not None:
            self.rank_sampler.close()
        for kept in self._node_budget.close():
            self.writer.write(kept)
        if self.metrics is not None:
            self.metrics.close()
        self.writer.write({"kind": fmt.ENDED, "t": time.time_ns(), "reason": reason})
        self.writer.close()
        if reason == "the job ended":
            self._compact()

    def _compact(self) -> None:
        """This node's rank files into Parquet (``timeline.columnar``) while the node's disk and
        cores are here to do it; whatever is left (a stopped watcher) the report compacts."""
        from memdiag.timeline.compact import compact_node

        try:
            for line in compact_node(self.run_dir, self.host, self.columnar):
                print(f"memdiag: node {self.host}: {line}", file=sys.stderr, flush=True)
        except Exception as exc:  # the JSONL stays what the report reads; the node file is closed by now
            print(f"memdiag: node {self.host}: rank files not compacted ({exc!r}); the report will compact them",
                  file=sys.stderr, flush=True)

    def _update_metrics(self, sample: dict) -> None:
        """Metrics never stop the watcher: a failure is warned once and the sampling goes on."""
        if self.metrics is None:
            return
        try:
            self.metrics.update(sample, self.guard_fired)
        except Exception as exc:
            self._metrics_errors += 1
            if self._metrics_errors == 1:
                self._warn("metrics", f"metrics not updated: {exc!r}; the run goes on")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="memdiag node watcher")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--root-pid", type=int, required=True)
    parser.add_argument("--interval-s", type=float, default=0.1)
    parser.add_argument("--pss-interval-s", type=float, default=1.0)
    parser.add_argument("--guard-limit-bytes", type=int, default=None)
    # the guard's defaults are the settings schema's (memdiag.settings), never a second copy
    parser.add_argument("--guard-fraction", type=float, default=BY_FIELD["guard_fraction"].default)
    parser.add_argument("--guard-min-available-bytes", type=int, default=BY_FIELD["guard_min_available_bytes"].default)
    parser.add_argument("--guard-grace-s", type=float, default=BY_FIELD["guard_grace_s"].default)
    parser.add_argument("--host", default=None, help="the node's name (default: the hostname)")
    parser.add_argument("--owner-pid", type=int, default=None, help="stop the job when this process (memdiag) dies")
    parser.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics here (0: a free port)")
    parser.add_argument("--metrics-textfile", type=Path, default=None, help="write the metrics into this directory too")
    parser.add_argument("--rank-interval-s", type=float, default=None,
                        help="sample every rank's /proc/<pid>/status this often (sampler=watcher)")
    parser.add_argument("--full-rate-s", type=float, default=BY_FIELD["sample_full_rate_s"].default,
                        help="the sampling budget (sample.full_rate_s): full rate until the ranks' loop has run this long")
    parser.add_argument("--steady-interval-s", type=float, default=BY_FIELD["sample_steady_interval_s"].default,
                        help="then each window of this long keeps its bounding samples (sample.steady_interval_s)")
    parser.add_argument("--columnar", default=BY_FIELD["timeline_columnar"].default, choices=BY_FIELD["timeline_columnar"].choices,
                        help="once the ranks have exited, move this node's rank files into Parquet (timeline.columnar)")
    args = parser.parse_args(argv)
    guard = None
    if args.guard_limit_bytes or args.guard_min_available_bytes:
        guard = GuardConfig(
            limit_bytes=args.guard_limit_bytes,
            fraction=args.guard_fraction,
            min_available_bytes=args.guard_min_available_bytes,
            grace_s=args.guard_grace_s,
        )
    watcher = NodeWatcher(
        args.run_dir, args.root_pid, args.interval_s, args.pss_interval_s, host=args.host, guard=guard,
        parent_pid=args.owner_pid, orphan_grace_s=args.guard_grace_s, metrics_port=args.metrics_port,
        metrics_textfile=args.metrics_textfile, rank_interval_s=args.rank_interval_s, columnar=args.columnar,
        full_rate_s=args.full_rate_s, steady_interval_s=args.steady_interval_s,
    )
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: watcher.request_stop())
    watcher.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
