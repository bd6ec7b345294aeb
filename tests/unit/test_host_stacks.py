"""``stacks=`` as HostStacks applies it, with memray itself: auto captures each phase once (its
first occurrence, an inner phase inside its outer one's capture), the steps after run untraced."""

from __future__ import annotations

import json

import pytest

from memdiag.stacks import HostStacks, StackPhases, cite, parse_phases, read_tables

memray = pytest.importorskip("memray")


@pytest.mark.parametrize("text, expected", [
    ("auto", StackPhases(None, first_only=True)),
    ("all", StackPhases(None)),
    ("off", StackPhases(frozenset())),
    ("", StackPhases(frozenset())),
    ("load, ds_initialize", StackPhases(frozenset({"load", "ds_initialize"}))),
])
def test_the_setting_as_text(text, expected):
    assert parse_phases(text) == expected


def first_buffer() -> bytearray:
    return bytearray(24 * 2**20)


def later_buffer() -> bytearray:
    return bytearray(40 * 2**20)


def optimizer_buffer() -> bytearray:
    return bytearray(8 * 2**20)


def drive(stacks: HostStacks) -> list:
    """A rank's phases in order, a buffer held in each forward (24 MiB in the first, 40 MiB after)
    and in each optimizer step (8 MiB)."""
    held = []
    for phase in ("load", "zero_init"):
        stacks.begin(phase)
    stacks.end("zero_init")
    stacks.end("load")
    for step in range(3):
        stacks.begin("forward")
        held.append(first_buffer() if step == 0 else later_buffer())
        stacks.end("forward")
        stacks.begin("step")
        stacks.begin("optimizer_step")  # inside the step's capture the first time
        held.append(optimizer_buffer())
        stacks.end("optimizer_step")
        stacks.end("step")
    return held


def test_auto_captures_each_phase_at_its_first_occurrence_only(tmp_path):
    warnings = []
    stacks = HostStacks(tmp_path, 0, parse_phases("auto"), lambda key, message: warnings.append(message))
    held = drive(stacks)
    assert not warnings and len(held) == 6
    tables = {t["phase"]: t for t in read_tables(tmp_path)}
    # zero_init began inside load's capture and optimizer_step inside the first step's: neither
    # starts a capture of its own later
    assert set(tables) == {"load", "forward", "step"}
    forward = tables["forward"]
    assert forward["occurrence"] == "first"
    top = forward["stacks"][0]
    assert top["bytes"] == pytest.approx(24 * 2**20, rel=0.01)  # the first forward's buffer, not a later one's
    assert any(frame[0] == "first_buffer" for frame in top["frames"])
    assert not any(frame[0] == "later_buffer" for stack in forward["stacks"] for frame in stack["frames"])
    assert "rank 0's first forward peak" in cite(forward)[0]
    assert sorted(p.name for p in (tmp_path / "stacks").glob("*.bin")) == [
        "host-rank-0-forward.bin", "host-rank-0-load.bin", "host-rank-0-step.bin"]


def test_all_keeps_each_phase_s_last_occurrence(tmp_path):
    stacks = HostStacks(tmp_path, 0, parse_phases("all"), lambda key, message: None)
    drive(stacks)
    forward = json.loads((tmp_path / "stacks" / "host-rank-0-forward.json").read_text())
    assert forward["occurrence"] == "last"
    assert forward["stacks"][0]["bytes"] == pytest.approx(40 * 2**20, rel=0.01)
    assert "rank 0's forward peak" in cite(forward)[0]


def test_a_second_tracker_turns_stacks_off_with_one_warning(tmp_path):
    warnings = []
    stacks = HostStacks(tmp_path / "run", 0, parse_phases("auto"), lambda key, message: warnings.append((key, message)))
    with memray.Tracker(tmp_path / "users.bin"):  # the user's own memray session
        drive(stacks)
    assert len(warnings) == 1 and warnings[0][0] == "stacks" and "off" in warnings[0][1]
    assert not read_tables(tmp_path / "run")


def test_a_peak_in_the_optimizer_step_cites_the_first_step_s_capture(tmp_path):
    """ZeRO-3's optimizer step runs inside the engine's step: under stacks=auto its first
    occurrence is inside the first step's capture, and host_limit cites that."""
    from memdiag.checks.host_limit import binding_phases
    from memdiag.stacks import cite_phase

    stacks = HostStacks(tmp_path, 0, parse_phases("auto"), lambda key, message: None)
    held = drive(stacks)
    assert held
    text, cited = cite_phase(tmp_path, binding_phases("optimizer_step"), "auto")
    assert "rank 0's first step peak" in text and cited[0]["function"] == "optimizer_buffer"
    assert binding_phases("zero_init") == ["zero_init", "load"] and binding_phases("backward") == ["backward"]
