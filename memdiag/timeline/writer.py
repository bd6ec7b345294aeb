"""Append-only JSONL writer shared by a rank's sampler thread and its training thread."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from memdiag.timeline.format import FLUSH_INTERVAL_S, FORMAT_VERSION, HEADER


class TimelineWriter:
    """Buffers records and writes them out at least every ``FLUSH_INTERVAL_S``.

    ``write`` only appends to a list under a lock, so the training thread never waits on the
    disk; whoever calls ``write`` or ``maybe_flush`` after the interval has passed does the
    write, which in practice is the sampler thread. A SIGKILL loses at most one interval.
    """

    def __init__(self, path: Path, header: dict) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._last_flush = time.monotonic()
        self.closed = False
        first = {"kind": HEADER, "t": time.time_ns(), "format_version": FORMAT_VERSION}
        first.update(header)
        self._pending.append(json.dumps(first))
        self.flush()

    def write(self, record: dict) -> None:
        line = json.dumps(record, separators=(",", ":"))
        with self._lock:
            self._pending.append(line)
        self.maybe_flush()

    def maybe_flush(self) -> None:
        if time.monotonic() - self._last_flush >= FLUSH_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            if self.closed:
                return
            lines, self._pending = self._pending, []
            self._last_flush = time.monotonic()
            if lines:
                self._file.write("\n".join(lines) + "\n")
                self._file.flush()

    def close(self) -> None:
        self.flush()
        with self._lock:
            if not self.closed:
                os.fsync(self._file.fileno())
                self._file.close()
                self.closed = True
