"""Why a run failed. What a failed rank raised: the exception's type and message, and the line in
the user's own code it came through, taken in the rank by a ``sys.excepthook`` (recorded as an
``exception`` event in its timeline) or read back from a rank's log when only the log has it.
And which rank failed first, read from the launcher's log (torchrun's root-cause record), so the
console names the cause before the other ranks' follow-on errors."""

from __future__ import annotations

import os
import re
import sysconfig
import traceback
from pathlib import Path

LIBRARY_DIRS = tuple(
    os.path.realpath(p) + os.sep
    for p in {sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")} if p
)
MEMDIAG_DIR = os.path.dirname(os.path.realpath(__file__)) + os.sep


def is_users(filename: str) -> bool:
    """A frame in the user's code: not the standard library, an installed package or memdiag."""
    if not filename or filename.startswith("<"):
        return False
    path = os.path.realpath(filename)
    return not path.startswith(MEMDIAG_DIR) and not path.startswith(LIBRARY_DIRS) and "site-packages" not in path


def _user_frame(frames: list[tuple[str, int, str]]) -> tuple[str, int, str] | None:
    """The deepest frame in the user's code (where their line called into what raised); else the deepest."""
    users = [f for f in frames if is_users(f[0])]
    return (users or frames or [None])[-1]


def exception_record(exc_type, exc, tb) -> dict:
    """The ``exception`` event a rank writes for what ended it."""
    frames = [(f.filename, f.lineno or 0, f.name) for f in traceback.extract_tb(tb)]
    where = _user_frame(frames)
    record = {"type": exc_type.__name__, "message": str(exc)[:2000]}
    if where:
        record.update(file=where[0], line=where[1], function=where[2])
    record["traceback"] = "".join(traceback.format_exception(exc_type, exc, tb))[-4000:]
    return record


_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<function>.+?)\s*$')
_RAISED = re.compile(r"^(?P<type>[A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit|Warning|[A-Z]\w*))(?::\s?(?P<message>.*))?$")


def parse_traceback(text: str) -> dict | None:
    """The last Python traceback in a log's text, as ``exception_record`` gives it (None without one)."""
    start = text.rfind("Traceback (most recent call last):")
    if start < 0:
        return None
    frames, raised = [], None
    for line in text[start:].splitlines()[1:]:
        match = _FRAME.match(line)
        if match:
            frames.append((match["file"], int(match["line"]), match["function"]))
            continue
        if line.startswith((" ", "\t")) or not line.strip():
            continue
        found = _RAISED.match(line.strip())
        if found:
            raised = found
            break
    if raised is None:
        return None
    record = {"type": raised["type"].rsplit(".", 1)[-1], "message": (raised["message"] or "").strip()}
    where = _user_frame(frames)
    if where:
        record.update(file=where[0], line=where[1], function=where[2])
    return record


def describe(error: dict) -> str:
    """``rank 1 raised ValueError: bad batch at train.py:42 (in step)``."""
    text = f"{error['type']}: {error['message']}" if error.get("message") else error["type"]
    if "rank" in error:
        text = f"rank {error['rank']} raised {text}"
    if error.get("file"):
        text += f" at {error['file']}:{error['line']}" + (f" (in {error['function']})" if error.get("function") else "")
    return text


def root_cause(text: str) -> dict | None:
    """torchrun's "Root Cause (first observed failure)" block of a launcher log: the rank that
    failed first, its exit code, and the signal that ended it (None when the log has none)."""
    import signal

    block = text.split("Root Cause (first observed failure)", 1)
    if len(block) < 2:
        return None
    fields = dict(re.findall(r"^\s*(rank|exitcode|traceback|host)\s*:\s*(.*?)\s*$", block[1], re.M))
    rank = re.match(r"(\d+)", fields.get("rank", ""))
    code = re.match(r"(-?\d+)", fields.get("exitcode", ""))
    if rank is None or code is None:
        return None
    exitcode = int(code.group(1))
    number = -exitcode if exitcode < 0 else None
    name = None
    if number is not None:
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
    how = f"killed by {name} (signal {number})" if number is not None else f"exited with code {exitcode}"
    return {"rank": int(rank.group(1)), "exitcode": exitcode, "signal": name, "host": fields.get("host"), "how": how}


def failure_excerpt(run_dir: Path, lines: int = 15) -> str:
    """Why the run failed, cause first: the rank torchrun saw fail first (and how) with the end
    of its log, then - only without such a record - the end of the first rank log that holds a
    traceback (or of the launcher's log). The other ranks' errors follow from the first."""
    logs_dir = run_dir / "logs"
    launcher_logs = [logs_dir / "launcher.log", *sorted(logs_dir.glob("launcher-*.log"))]
    for log_file in [*launcher_logs, logs_dir / "stderr.log"]:  # stderr.log: a `-- CMD` run's torchrun
        try:
            cause = root_cause(log_file.read_text(errors="replace"))
        except OSError:
            continue
        if cause is None:
            continue
        head = f"rank {cause['rank']} failed first: {cause['how']}" + (f" on {cause['host']}" if cause.get("host") else "")
        own_log = logs_dir / f"rank-{cause['rank']}.log"
        try:
            own = own_log.read_text(errors="replace")
        except OSError:
            own = ""
        if "Traceback" in own:
            tail = [line for line in own.splitlines() if line.strip()][-lines:]
            return head + f"; its log {own_log}:\n" + "\n".join(tail)
        if cause["signal"]:
            return head + " with no Python error in its log: ended from outside (the kernel's OOM killer leaves a line in " \
                "`dmesg`); the other ranks' errors follow from it"
        return head + f"; see {own_log}"
    logs = sorted(logs_dir.glob("rank-*.log")) + launcher_logs + [logs_dir / "stderr.log"]
    for log_file in logs:
        try:
            text = log_file.read_text(errors="replace")
        except OSError:
            continue
        if "Traceback" in text or log_file.name.startswith("launcher") or log_file.name == "stderr.log":
            tail = [line for line in text.splitlines() if line.strip()][-lines:]
            return f"{log_file}:\n" + "\n".join(tail)
    return ""
