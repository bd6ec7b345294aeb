"""The run directory object: made once, its start record with the host limit resolved once."""

import json

import pytest

from memdiag.config import HardwareProfile
from memdiag.probes.host import read_meminfo
from memdiag.rundir import RunDir, resolve_host_limit


def test_the_host_limit_comes_from_the_override_then_the_profile_then_the_machine():
    profile = HardwareProfile(name="BI-V150", accelerator="cuda", device_memory_bytes=64 * 2**30, host_ram_bytes=500 * 2**30)
    assert resolve_host_limit(7 * 2**30, profile) == (7 * 2**30, "host_ram override")
    assert resolve_host_limit(None, profile) == (500 * 2**30, "hardware profile BI-V150")
    limit, source = resolve_host_limit(None, None)
    # the machine's: its MemTotal, or its memory cgroup's limit where that is lower
    assert source in ("MemTotal of this machine",) or source.startswith("memory cgroup")
    assert 0 < limit <= read_meminfo().total_bytes


def test_a_run_directory_is_made_once_and_says_how_it_started_and_ended(tmp_path):
    rundir = RunDir.create(tmp_path, "case", "1x2")
    assert (rundir.path / "timeline").is_dir() and (rundir.path / "logs").is_dir()
    assert not rundir.started
    rundir.start(host_limit=(2**30, "host_ram override"), case="case", layout="1x2")
    spec = json.loads((rundir.path / "run.json").read_text())
    assert spec["status"] == "running" and spec["host_limit_bytes"] == 2**30 and spec["host_limit_source"] == "host_ram override"
    assert spec["versions"]["torch"] and spec["owner"]["pid"] and spec["layout"] == "1x2"
    rundir.node_ended("n0", {"exit_code": 0})
    assert rundir.node_record("n0")["exit_code"] == 0 and "ended_at" in rundir.node_record("n0")
    assert rundir.node_record("n1") == {}
    rundir.end(status="completed", exit_code=0, duration_s=1.23456, signal=None)
    spec = json.loads((rundir.path / "run.json").read_text())
    assert (spec["status"], spec["exit_code"], spec["duration_s"]) == ("completed", 0, 1.235) and "signal" not in spec
    joined = RunDir.at(rundir.path)
    assert joined.started and joined.read()["status"] == "completed"


def test_an_existing_run_directory_is_never_made_again(tmp_path, monkeypatch):
    import memdiag.rundir as rundir_module

    monkeypatch.setattr(rundir_module, "stamp", lambda: "20260101T000000.000000Z")
    RunDir.create(tmp_path, "case", "1x1")
    with pytest.raises(FileExistsError):
        RunDir.create(tmp_path, "case", "1x1")


def test_check_host_ram_is_a_what_if_that_leaves_the_run_as_it_was(tmp_path):
    from memdiag.checks import with_host_limit
    from memdiag.timeline import read_run

    rundir = RunDir.create(tmp_path, "case", "1x1")
    rundir.start(host_limit=(2**30, "host_ram override"), config={"host_ram_bytes": 2**30})
    run = read_run(rundir.path)
    what_if = with_host_limit(run, 5 * 2**30, "--host-ram 5G")
    assert (what_if.spec["host_limit_bytes"], what_if.spec["host_limit_source"]) == (5 * 2**30, "--host-ram 5G")
    assert run.spec["host_limit_bytes"] == 2**30 and what_if.spec["config"] == {"host_ram_bytes": 2**30}
