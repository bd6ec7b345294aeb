"""Append-only JSONL writer shared by a rank's sampler thread and its training thread.

A full or failing disk never reaches the caller: lines that cannot be written stay in a
bounded buffer (the newest ``hold_bytes``) and go out, in order, when a later write succeeds;
the lines dropped to stay within the bound are counted and a ``dropped`` record says how many
and between which times, so the run can be marked incomplete.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import threading
import time
from collections import deque
from pathlib import Path

from memdiag.timeline.format import DROPPED, FLUSH_INTERVAL_S, FORMAT_VERSION, HEADER
from memdiag.units import format_bytes

HOLD_BYTES = 64 * 2**20
"""Per writer (per rank): what a full disk may hold back in memory before the oldest goes."""
RETRY_S = 1.0
"""After a failed write, how long to wait before trying the disk again."""


def _say(text: str) -> None:
    try:
        print(f"memdiag: {text}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


class TimelineWriter:
    """Buffers records and writes them out at least every ``FLUSH_INTERVAL_S``.

    ``write`` only appends to a list under a lock, so the training thread never waits on the
    disk; whoever calls ``write`` or ``maybe_flush`` after the interval has passed does the
    write, which in practice is the sampler thread. A SIGKILL loses at most one interval.
    Bytes go out with ``os.write`` on an ``O_APPEND`` descriptor, so a write cut short by a
    full disk leaves no torn line: the unwritten rest of the line is retried first.
    """

    def __init__(self, path: Path, header: dict, *, hold_bytes: int = HOLD_BYTES,
                 flush_interval_s: float = FLUSH_INTERVAL_S) -> None:
        self.path = Path(path)
        self.flush_interval_s = flush_interval_s
        """0: every record goes to the disk as it is written (a rank with no sampler thread to
        flush for it: its events, a few a step, are then on disk when the watcher looks)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._lock = threading.Lock()
        self._pending: list[tuple[int, int, bytes]] = []
        """(t_ns, samples in the record, the line) not yet handed to the disk."""
        self._held: deque[tuple[int, int, bytes]] = deque()
        self._held_bytes = 0
        self._partial = b""
        """The rest of a line the disk took only part of."""
        self.hold_bytes = hold_bytes
        self._last_flush = time.monotonic()
        self._retry_at = 0.0
        self.failing: OSError | None = None
        self.dropped_records = 0
        self.dropped_samples = 0
        self.dropped_span_ns: tuple[int, int] | None = None
        self._dropped_unreported = (0, 0, None)
        self.closed = False
        first = {"kind": HEADER, "t": time.time_ns(), "format_version": FORMAT_VERSION}
        first.update(header)
        self._pending.append(self._encode(first))
        self.flush()

    @staticmethod
    def _encode(record: dict) -> tuple[int, int, bytes]:
        line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
        t = record.get("t")
        samples = len(t) if isinstance(t, list) else (1 if record.get("kind") == "sample" else 0)
        return (t[0] if isinstance(t, list) and t else t if isinstance(t, int) else 0), samples, line

    def write(self, record: dict) -> None:
        if self.closed:
            return
        item = self._encode(record)
        with self._lock:
            self._pending.append(item)
        self.maybe_flush()

    def maybe_flush(self) -> None:
        if time.monotonic() - self._last_flush >= self.flush_interval_s:
            self.flush()

    def flush(self, *, force: bool = False) -> None:
        with self._lock:
            if self.closed:
                return
            self._last_flush = time.monotonic()
            for item in self._pending:
                self._held.append(item)
                self._held_bytes += len(item[2])
            self._pending = []
            if self.failing is not None and not force and time.monotonic() < self._retry_at:
                self._bound()
                return
            try:
                self._drain()
            except OSError as exc:  # a disk that is full, over quota or failing: hold, retry later
                self._bound()
                self._on_failure(exc)
                return
            if self.failing is not None:
                self.failing = None
                _say(f"{self.path.name}: writing again; the held samples are on disk")

    def _drain(self) -> None:
        if self._partial:
            self._partial = self._partial[os.write(self._fd, self._partial):]
            if self._partial:
                raise OSError(errno.ENOSPC, "short write")
        while self._held:
            chunk, items = [], 0
            size = 0
            for item in self._held:  # one write per flush in the normal case
                chunk.append(item[2])
                size += len(item[2])
                items += 1
                if size > 4 * 2**20:
                    break
            data = b"".join(chunk)
            written = os.write(self._fd, data)
            # whole lines that went out leave the queue; a cut line's rest goes to _partial
            done = 0
            while items and done + len(self._held[0][2]) <= written:
                done += len(self._held[0][2])
                self._held_bytes -= len(self._held[0][2])
                self._held.popleft()
                items -= 1
            if done < written:
                line = self._held.popleft()[2]
                self._held_bytes -= len(line)
                self._partial = line[written - done:]
                raise OSError(errno.ENOSPC, "short write")
        if self._dropped_unreported[0]:
            records, samples, (first, last) = self._dropped_unreported
            note = {"kind": DROPPED, "t": time.time_ns(), "records": records, "samples": samples,
                    "first_t": first, "last_t": last, "reason": "the disk was full; the oldest held lines were dropped"}
            line = self._encode(note)[2]
            written = os.write(self._fd, line)
            self._dropped_unreported = (0, 0, None)
            if written < len(line):
                self._partial = line[written:]
                raise OSError(errno.ENOSPC, "short write")

    def _bound(self) -> None:
        """Drop the oldest held lines beyond ``hold_bytes`` (never a header still held)."""
        keep = 1 if self._held and self._held[0][2].startswith(b'{"kind":"header"') else 0
        while self._held_bytes > self.hold_bytes and len(self._held) > keep:
            t, samples, line = self._held[keep]
            del self._held[keep]
            self._held_bytes -= len(line)
            self.dropped_records += 1
            self.dropped_samples += samples
            self.dropped_span_ns = (self.dropped_span_ns[0] if self.dropped_span_ns else t, t)
            records, n, span = self._dropped_unreported
            self._dropped_unreported = (records + 1, n + samples, (span[0] if span else t, t))

    def _on_failure(self, exc: OSError) -> None:
        self._retry_at = time.monotonic() + RETRY_S
        if self.failing is None:
            self.failing = exc
            _say(
                f"{self.path.name}: cannot write ({os.strerror(exc.errno) if exc.errno else exc}); "
                f"keeping the newest samples in memory (up to {format_bytes(self.hold_bytes)}) until it can"
            )

    @property
    def held_bytes(self) -> int:
        return self._held_bytes + len(self._partial)

    def abandon_in_child(self) -> None:
        """In a forked child: this file is the parent's. Drop the copied buffer unwritten (the
        parent writes it) and close the copied descriptor; the lock may have been copied while
        another thread of the parent held it, so it is replaced, never taken."""
        self._lock = threading.Lock()
        self._pending, self._partial = [], b""
        self._held.clear()
        self._held_bytes = 0
        self.closed = True
        try:
            os.close(self._fd)
        except OSError:
            pass

    def close(self) -> None:
        self.flush(force=True)
        with self._lock:
            if not self.closed:
                try:
                    os.fsync(self._fd)
                except OSError:
                    pass
                os.close(self._fd)
                self.closed = True
