"""Process trees: who is below whom, who is alive, and stopping them.

Shared by the node watcher (which follows a job's ranks and, when memdiag dies, stops them)
and ``lifetime`` (which owns what a run starts). Ranks started by torchrun sit in sessions of
their own, so a process group does not reach them; the parent links do.

psutil walks the process table, signals and waits. A process is remembered across calls by
its start time in clock ticks (``/proc/<pid>/stat``; run.json's owner record keeps it too),
read here by hand: psutil only gives it as wall-clock seconds, which move with the clock.
"""

from __future__ import annotations

import os
import signal
import time

import psutil


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


def start_ticks(pid: int) -> int | None:
    stat = read_stat(pid)
    return None if stat is None else stat[2]


def _running(process: psutil.Process) -> bool:
    """Not ended, not a zombie, and its PID not reused since ``process`` was made."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _process(pid: int, ticks: int | None = None) -> psutil.Process | None:
    """``pid`` while it runs; with ``ticks``, only if it is still the process that started
    then. psutil pins the object to that process, so later signals cannot reach a successor."""
    try:
        process = psutil.Process(pid)
    except psutil.Error:
        return None
    # read after the object is made: a PID reused in between shows as other ticks
    if not _running(process) or (ticks is not None and start_ticks(pid) != ticks):
        return None
    return process


def _signal(processes: list[psutil.Process], signum: int) -> list[psutil.Process]:
    reached = []
    for process in processes:
        try:
            process.send_signal(signum)
            reached.append(process)
        except psutil.Error:  # ended meanwhile, or not ours to signal
            pass
    return reached


def _processes(pids) -> list[psutil.Process]:
    """The live ones of ``pids`` (pid -> start ticks, or bare pids)."""
    ticks = pids if isinstance(pids, dict) else dict.fromkeys(pids)
    return [p for p in (_process(pid, t) for pid, t in ticks.items()) if p is not None]


def children_map() -> dict[int, list[int]]:
    """ppid -> live (non-zombie) children, for every process on the machine."""
    children: dict[int, list[int]] = {}
    for process in psutil.process_iter(["ppid", "status"]):
        if process.info["status"] != psutil.STATUS_ZOMBIE:
            children.setdefault(process.info["ppid"], []).append(process.pid)
    return children


def descendants(root: int, children: dict[int, list[int]] | None = None) -> list[int]:
    # over one snapshot of the table, shared between calls (psutil's children() reads the
    # whole table again for every root, and counts zombies in)
    children = children_map() if children is None else children
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            found.append(child)
            todo.append(child)
    return found


COMPILERS = frozenset({"cc1", "cc1plus", "c++", "g++", "gcc", "clang", "clang++", "nvcc", "cicc", "ptxas", "ninja", "ld", "as"})


def child_role(cmdline: list[str], name: str, rank_cmdline: list[str]) -> str:
    """What a rank's child is, from its command line: a spawned multiprocessing worker (a
    DataLoader's with the spawn or forkserver method), a forked worker (fork keeps the parent's
    command line: DataLoader's default method on Linux), torch.compile's compile workers, a
    compiler (DeepSpeed's and torch's JIT op builds) or another program."""
    text = " ".join(cmdline)
    if "torch._inductor" in text and "compile_worker" in text:
        return "compile worker"
    if "multiprocessing.spawn" in text or "multiprocessing.forkserver" in text:
        return "spawned worker"
    if cmdline and cmdline == rank_cmdline:
        return "forked worker"
    if name in COMPILERS or (cmdline and os.path.basename(cmdline[0]) in COMPILERS):
        return "compiler"
    return "other"


def read_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [part.decode("utf-8", "replace") for part in f.read().split(b"\0") if part]
    except OSError:
        return []


def read_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def alive(pid: int, start_ticks: int | None = None) -> bool:
    """Running and not a zombie; with ``start_ticks``, still the same process (no PID reuse)."""
    return _process(pid, start_ticks) is not None


def send(pids, signum: int) -> list[int]:
    """Signal every live process of ``pids`` (pid -> start ticks, or bare pids; with ticks,
    a reused PID is left alone); returns those it reached."""
    return [p.pid for p in _signal(_processes(pids), signum)]


def reap_orphans(keep: set[int]) -> None:
    """Collect the exit status of re-parented children (we are a subreaper) so they do not
    linger as zombies; ``keep``: children whose status a ``Popen`` will collect."""
    for pid in children_map_zombies(os.getpid()):
        if pid in keep:
            continue
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def children_map_zombies(parent: int) -> list[int]:
    """Zombie children of ``parent``."""
    try:
        children = psutil.Process(parent).children()
    except psutil.Error:
        return []
    zombies = []
    for child in children:
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                zombies.append(child.pid)
        except psutil.Error:  # collected meanwhile
            pass
    return zombies


def terminate(pids: dict[int, int | None], grace_s: float, *, poll_s: float = 0.1, while_waiting=None) -> list[int]:
    """SIGTERM every process (pid -> start ticks), SIGKILL what is left after ``grace_s``;
    returns the pids that needed SIGKILL. ``while_waiting`` runs on every poll.

    Those that are our own children are collected as they end (psutil waits on them), as
    ``reap_orphans`` would; a ``Popen`` among them then reads exit code 0."""
    left = _signal(_processes(pids), signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while left and (remaining := deadline - time.monotonic()) > 0:
        _, left = psutil.wait_procs(left, timeout=min(poll_s, remaining))
        # a zombie that is not ours has ended too, though psutil waits until its parent collects it
        left = [p for p in left if _running(p)]
        if while_waiting is not None:
            while_waiting()
    left = _signal([p for p in left if _running(p)], signal.SIGKILL)
    return sorted(p.pid for p in left)
