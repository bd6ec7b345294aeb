"""The one owner of every process a run starts, from its start to its end.

memdiag starts the launcher (torchrun, the deepspeed launcher, the user's command, or the
node parts of a multi-node run) and the node watcher, each in a session of its own, so a
Ctrl-C at the terminal reaches memdiag alone and memdiag decides what the job gets:

- SIGTERM, SIGINT or SIGHUP to memdiag: SIGTERM to every process of the job (the launcher and
  all below it, ranks included: torchrun puts them in sessions of their own, so only the parent
  links reach them), SIGKILL to what is left after ``stop_grace_s``; a second signal skips the
  wait. The run ends ``interrupted`` with the signal's name; memdiag exits 128 + the signal.
- memdiag is a child subreaper, so ranks whose launcher died are re-parented to memdiag and
  still counted (and stopped) as the job.
- memdiag's own death, even by SIGKILL: the kernel sends its children SIGTERM
  (``PR_SET_PDEATHSIG``), and the node watcher, which follows the job's ranks, stops what is
  left and writes its last record.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from memdiag import procs

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
LEFTOVER_GRACE_S = 10.0
"""After the launcher ends by itself, how long processes it left behind get before SIGKILL."""

_libc = None
_received: list[int] = []
"""Stop signals memdiag received while handling them (the whole ``memdiag run``)."""
_installed: list[dict[int, object]] = []


@contextlib.contextmanager
def handling_stops():
    """Record SIGTERM, SIGINT and SIGHUP instead of dying of them, for as long as memdiag owns a
    run (its job, then the report): the job is stopped through ``Job.wait`` and the end is
    still recorded. Nested uses share one set of handlers."""
    if not _installed:
        previous = {}
        for signum in STOP_SIGNALS:
            try:
                previous[signum] = signal.signal(signum, lambda n, _f: _received.append(n))
            except ValueError:  # not the main thread: the caller owns signals
                pass
        _installed.append(previous)
    else:
        _installed.append({})
    try:
        yield _received
    finally:
        for signum, handler in _installed.pop().items():
            signal.signal(signum, handler)
        if not _installed:
            _received.clear()


def _prctl(option: int, value: int) -> bool:
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        return _libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux
        return False


def become_subreaper() -> bool:
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


def exit_code(returncode: int) -> int:
    """As a shell reports it: a death by signal N is 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass
class Ended:
    """How the job ended."""

    codes: dict[str, int]
    """Each main process's exit code, shell style (128 + N for signal N)."""
    status: str
    """``completed``, ``failed`` or ``interrupted``."""
    signal: str | None = None
    """The stop signal memdiag received (``SIGTERM`` ...)."""
    killed: list[int] = field(default_factory=list)
    """Processes that needed SIGKILL."""
    disk_full: list[tuple[str, str | None]] = field(default_factory=list)
    """When the run directory's filesystem was full: (from, to or None), UTC."""

    @property
    def code(self) -> int:
        """The run's exit code: 128 + the stop signal, else the first non-zero code."""
        if self.signal is not None:
            return 128 + signal.Signals[self.signal].value
        return next((c for c in self.codes.values() if c), 0)


class Job:
    """Processes started for one run (``start``) and helpers beside them (``start_helper``,
    the node watcher: not part of the job, stopped after it). Use as a context manager: the
    stop signals are handled inside it, and on leaving it nothing it started is alive."""

    def __init__(self, stop_grace_s: float = 30.0, *, say: Callable[[str], None] | None = None, signal_tree: bool = True):
        self.stop_grace_s = stop_grace_s
        self.signal_tree = signal_tree
        """False when the mains are memdiag node parts: they stop their own trees, and a
        SIGTERM straight to their node watchers would end the watchers' records early."""
        self.say = say or (lambda text: print(f"memdiag: {text}", file=sys.stderr, flush=True))
        self.mains: dict[str, subprocess.Popen] = {}
        self.helpers: list[subprocess.Popen] = []
        self.signals: list[int] = []
        self._stop_at: float | None = None
        self.killed: list[int] = []

    # -- signals -------------------------------------------------------------------------------
    def __enter__(self) -> Job:
        become_subreaper()
        self._stops = handling_stops()
        self.signals = self._stops.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop_everything()
        finally:
            self._stops.__exit__(None, None, None)

    @property
    def stop_signal(self) -> str | None:
        return signal.Signals(self.signals[0]).name if self.signals else None

    # -- starting ------------------------------------------------------------------------------
    @staticmethod
    def _spawn(command: list[str], **kwargs) -> subprocess.Popen:
        owner = os.getpid()

        def in_child() -> None:
            # our death reaches the child; if we died before this line, stop at once
            _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != owner:
                os.kill(os.getpid(), signal.SIGTERM)

        return subprocess.Popen(command, start_new_session=True, preexec_fn=in_child, **kwargs)

    def start(self, name: str, command: list[str], **kwargs) -> subprocess.Popen:
        process = self._spawn(command, **kwargs)
        self.mains[name] = process
        return process

    def start_helper(self, command: list[str], **kwargs) -> subprocess.Popen:
        process = self._spawn(command, **kwargs)
        self.helpers.append(process)
        return process

    # -- the job -------------------------------------------------------------------------------
    def _helper_pids(self) -> set[int]:
        pids = set()
        for helper in self.helpers:
            pids.add(helper.pid)
            pids.update(procs.descendants(helper.pid))
        return pids

    def processes(self) -> dict[int, int | None]:
        """Every live process of the job: all below memdiag but the helpers."""
        children = procs.children_map()
        helpers = self._helper_pids()
        pids = [p for p in procs.descendants(os.getpid(), children) if p not in helpers]
        return {p: procs.start_ticks(p) for p in pids}

    def request_stop(self, reason: str) -> None:
        """Stop the job as a stop signal would, for a reason of memdiag's own."""
        if self._stop_at is None:
            self.say(reason)
            self._begin_stop(self.stop_grace_s)

    def _begin_stop(self, grace_s: float) -> None:
        self._stop_at = time.monotonic() + grace_s
        targets = self.processes() if self.signal_tree else {p.pid: None for p in self.mains.values()}
        procs.send(targets, signal.SIGTERM)

    def _kill_all(self) -> None:
        left = self.processes()
        self.killed += procs.send(left, signal.SIGKILL)

    def wait(self, *, tick: Callable[[], None] | None = None, poll_s: float = 0.2) -> Ended:
        """Until every main process has ended and nothing of the job is left. The process
        table is read only once the mains are done or a stop is under way."""
        keep = {p.pid for p in self.mains.values()} | {p.pid for p in self.helpers}
        announced = 0
        while True:
            done = all(p.poll() is not None for p in self.mains.values())
            if done or self._stop_at is not None:
                procs.reap_orphans(keep)
                if done and not self.processes():
                    break
            now = time.monotonic()
            if len(self.signals) > announced:
                announced = len(self.signals)
                if announced == 1:
                    self.say(
                        f"{self.stop_signal}: stopping the job (SIGTERM to every process, SIGKILL after "
                        f"{self.stop_grace_s:g} s; signal again to kill it now)"
                    )
                    self._begin_stop(self.stop_grace_s)
                else:
                    self.say(f"{signal.Signals(self.signals[-1]).name} again: killing the job now")
                    self._kill_all()
            elif done and self._stop_at is None:
                self._begin_stop(LEFTOVER_GRACE_S)  # the launcher left processes behind
            if self._stop_at is not None and now >= self._stop_at:
                self._kill_all()
                self._stop_at = now + 1.0
            if tick is not None:
                tick()
            time.sleep(poll_s)
        codes = {name: exit_code(p.wait()) for name, p in self.mains.items()}
        if self.signals:
            status = "interrupted"
        else:
            status = "completed" if all(c == 0 for c in codes.values()) else "failed"
        return Ended(codes=codes, status=status, signal=self.stop_signal, killed=sorted(set(self.killed)))

    def stop_helpers(self, timeout_s: float = 10.0) -> None:
        """The watcher ends by itself once the job is gone; make sure of it."""
        deadline = time.monotonic() + timeout_s
        for helper in self.helpers:
            try:
                helper.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                helper.terminate()
                try:
                    helper.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    helper.kill()
                    helper.wait()

    def stop_everything(self) -> None:
        """On leaving, for any reason (an exception included): nothing started outlives us."""
        left = self.processes()
        if left:
            procs.terminate(left, min(self.stop_grace_s, 5.0))
        for process in [*self.mains.values(), *self.helpers]:
            if process.poll() is None:
                process.kill()
            process.wait()
        procs.reap_orphans(set())
