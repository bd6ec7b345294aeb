"""Helpers for fault injection on real runs: start memdiag, wait for a moment, find every
process of a run, mount a small filesystem."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 600  # a safety net on a slow shared machine, never a measurement


class Memdiag:
    """``memdiag run ...`` in a session of its own (as a terminal's foreground job is: the
    terminal's Ctrl-C goes to the whole group), its output collected as it comes."""

    def __init__(self, args: list[str], *, cwd: Path = REPO, env: dict | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "memdiag", "run", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout_s: float = WAIT_S) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = re.search(pattern, self.output)
            if match:
                return match
            if self.process.poll() is not None:
                self._reader.join(5)
                match = re.search(pattern, self.output)
                if match:
                    return match
                raise AssertionError(f"memdiag ended (rc {self.process.returncode}) before {pattern!r}:\n{self.output}")
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} within {timeout_s} s:\n{self.output}")

    @property
    def run_dir(self) -> Path:
        return Path(self.wait_for(r"run directory (\S+)").group(1))

    def signal_group(self, signum: int) -> None:
        """What a terminal does on Ctrl-C (SIGINT) or hang-up: the foreground group gets it."""
        os.killpg(self.process.pid, signum)

    def wait(self, timeout_s: float = WAIT_S) -> int:
        code = self.process.wait(timeout=timeout_s)
        self._reader.join(10)
        return code


def run_processes(run_dir: Path) -> list[int]:
    """Live processes that belong to a run: its path in their command line or environment
    (ranks and launchers have TMPDIR inside it, the watcher has it as an argument)."""
    needle = str(Path(run_dir).resolve()).encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
            blob = b""
            for part in ("cmdline", "environ"):
                with open(f"/proc/{entry.name}/{part}", "rb") as f:
                    blob += f.read()
        except OSError:
            continue
        if needle in blob:
            found.append(int(entry.name))
    return found


def wait_until_gone(run_dir: Path, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = run_processes(run_dir)
        if not left:
            return []
        time.sleep(0.2)
    return run_processes(run_dir)


def kill_leftovers(run_dir: Path) -> None:
    for pid in run_processes(run_dir):
        try:
            os.kill(pid, 9)
        except OSError:
            pass


@pytest.fixture
def small_fs(tmp_path):
    """Mount a tmpfs of the given size (MiB) under tmp_path; skipped where mounting is refused."""
    mounted: list[Path] = []

    def mount(size_mib: int) -> Path:
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no mount command: cannot make a small filesystem to fill")
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(point)], capture_output=True, text=True
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'not permitted'}); the full-disk tests need one")
        mounted.append(point)
        # made now, while there is room: creating a file on a full tmpfs can itself fail
        (point / FILLER).touch()
        return point

    yield mount
    for point in mounted:
        for pid in run_processes(point):
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


FILLER = "filler.bin"


def fill(directory: Path, leave_bytes: int = 0) -> Path:
    """Write a filler file until the filesystem is full (less ``leave_bytes``). Unbuffered: a
    buffered file would try its unwritten tail again when closed, and raise there."""
    filler = directory / FILLER
    st = os.statvfs(directory)
    size = max(0, st.f_bavail * st.f_frsize - leave_bytes)
    try:
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    except OSError as e:
        listing = subprocess.run(["du", "-ak", str(directory)], capture_output=True, text=True).stdout
        raise AssertionError(f"cannot open {filler} to fill the disk ({e}); {st.f_bavail} blocks free; holds:\n{listing}") from e
    chunk = b"\0" * 2**20
    try:
        while size > 0:
            size -= os.write(fd, chunk[: min(len(chunk), size)])
        os.fsync(fd)
    except OSError:
        pass  # full: that is the point
    finally:
        os.close(fd)
    return filler
