"""The run directory: made once, its start record (``run.json``) written once with the host
limit resolved once, how each node ended, and how the run ended. ``memdiag run`` (a case or
``-- CMD``), its node parts and ``memdiag.record`` all go through ``RunDir``; nothing else
writes run.json (``runstate.settle`` only marks a dead run as abandoned).
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from memdiag import procs
from memdiag.files import WriteFailed, write_atomic
from memdiag.timeline import format as fmt

NODES_DIR = "nodes"
LOGS_DIR = "logs"


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "deepspeed", "transformers"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def owner() -> dict:
    """Who is running the run: ``report``/``check`` tell a live run from an abandoned one."""
    return {"host": platform.node(), "pid": os.getpid(), "start_ticks": procs.start_ticks(os.getpid())}


def resolve_host_limit(override_bytes: int | None, profile=None, *, override_source: str = "host_ram override") -> tuple[int, str]:
    """The host RAM a node may use and where that figure came from, in this order: the
    user's ``host_ram``, the hardware profile's, the memory cgroup's limit when lower than the
    machine, the machine's MemTotal. Resolved once, at the start; readers use what was stored."""
    from memdiag.probes import cgroup
    from memdiag.probes.host import read_meminfo

    if override_bytes is not None:
        return override_bytes, override_source
    if profile is not None and profile.host_ram_bytes is not None:
        return profile.host_ram_bytes, f"hardware profile {profile.name}"
    total = read_meminfo().total_bytes
    files = cgroup.locate()
    limit = cgroup.read(files).limit_bytes if files else None
    if limit is not None and limit < total:
        return limit, f"memory cgroup v{files.version} limit"
    return total, "MemTotal of this machine"


RESERVE = ".memdiag-reserve"
RESERVE_BYTES = 1 * 2**20
"""Space held from the start so that the end record lands even when the disk filled for good:
released just before run.json's last write."""


@dataclass
class RunDir:
    path: Path
    spec: dict

    @classmethod
    def create(cls, reports_dir: str | Path, name: str, label: str) -> RunDir:
        """A new run directory ``REPORTS_DIR/NAME/<UTC time>-LABEL`` (never an existing one)."""
        path = Path(reports_dir).resolve() / name / f"{stamp()}-{label}"
        (path / fmt.TIMELINE_DIR).mkdir(parents=True, exist_ok=False)
        (path / LOGS_DIR).mkdir()
        return cls(path, {})

    @classmethod
    def at(cls, path: str | Path) -> RunDir:
        """A directory the user named (``run_dir=``, the API, a node part): made if missing."""
        path = Path(path).resolve()
        (path / fmt.TIMELINE_DIR).mkdir(parents=True, exist_ok=True)
        (path / LOGS_DIR).mkdir(exist_ok=True)
        return cls(path, {})

    @property
    def started(self) -> bool:
        return (self.path / fmt.RUN_JSON).exists()

    def read(self) -> dict:
        self.spec = json.loads((self.path / fmt.RUN_JSON).read_text())
        return self.spec

    def start(self, *, host_limit: tuple[int, str], **fields) -> dict:
        """The start record: what runs (``fields``), the versions, the host limit with its
        source, who owns the run; status ``running``."""
        limit, source = host_limit
        self.spec = {
            **fields,
            "host_limit_bytes": limit,
            "host_limit_source": source,
            "versions": versions(),
            "started_at": utc_now(),
            "status": "running",
            "run_dir": str(self.path),
            "owner": owner(),
        }
        self.write()
        try:
            (self.path / RESERVE).write_bytes(b"\0" * RESERVE_BYTES)
        except OSError:
            pass  # no room even now: the end record will say so on the console
        return self.spec

    def release_reserve(self) -> None:
        try:
            (self.path / RESERVE).unlink()
        except OSError:
            pass

    def update(self, **fields) -> None:
        self.spec.update(fields)
        self.write()

    def write(self) -> None:
        write_atomic(self.path / fmt.RUN_JSON, json.dumps(self.spec, indent=2, default=str))

    def end(self, *, status: str, exit_code: int, duration_s: float, **fields) -> None:
        """How the run ended (``fields``: signal, killed_after_grace, disk_full, nodes ...)."""
        self.spec.update(status=status, exit_code=exit_code, ended_at=utc_now(), duration_s=round(duration_s, 3))
        self.spec.update({k: v for k, v in fields.items() if v})
        still_full = [span["from"] for span in fields.get("disk_full") or [] if not span.get("to")]
        if still_full:
            self.spec["incomplete"] = (f"incomplete: the disk stayed full from {still_full[0]} to the end of the run; the "
                                       "samples the ranks held from then on were lost")
        try:
            self.write()
        except WriteFailed:
            self.release_reserve()  # the room held since the start: the end record must land
            self.write()
        finally:
            self.release_reserve()

    def node_ended(self, name: str, record: dict) -> None:
        (self.path / NODES_DIR).mkdir(exist_ok=True)
        write_atomic(self.path / NODES_DIR / f"{name}.json", json.dumps(record | {"ended_at": utc_now()}, indent=2))

    def node_record(self, name: str) -> dict:
        try:
            return json.loads((self.path / NODES_DIR / f"{name}.json").read_text())
        except (OSError, ValueError):
            return {}
