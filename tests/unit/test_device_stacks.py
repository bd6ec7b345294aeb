"""The device allocations live at the recorded window's peak, from a literal PyTorch snapshot
(the shape ``torch.cuda.memory._snapshot()`` returns with the history on)."""

from __future__ import annotations

import pytest

from memdiag.device_stacks import BEFORE, reduce_snapshot
from memdiag.errors import UsageError
from memdiag.settings import parse_stacks_device

USER = {"filename": "/home/me/train.py", "name": "train_step", "line": 10}
LIB = {"filename": "/usr/lib/python3/site-packages/torch/nn/functional.py", "name": "linear", "line": 99}


def alloc(addr, size, *frames):
    return {"action": "alloc", "addr": addr, "size": size, "stream": 0, "frames": list(frames)}


def free(addr, size):
    return {"action": "free_completed", "addr": addr, "size": size, "stream": 0, "frames": []}


def test_the_live_allocations_at_the_peak_grouped_by_stack_with_what_came_before():
    events = [
        alloc(1, 100, LIB, USER),
        alloc(2, 50, LIB),
        free(99, 30),  # a tensor older than the recording: what came before shrinks to 970
        alloc(3, 200, LIB, USER | {"line": 20}),
        free(1, 100),  # after the peak: not in the table
        alloc(4, 10, LIB),
        {"action": "free_requested", "addr": 3, "size": 200, "stream": 0, "frames": []},  # not yet freed
    ]
    snapshot = {"segments": [], "device_traces": [[], events]}
    table = reduce_snapshot(snapshot, device=1, rank=3, before_bytes=1000)
    assert table["peak_bytes"] == 1320 and table["rank"] == 3 and table["phase"] == "steps"
    rows = [(r["bytes"], r["count"], r["frames"][0][0]) for r in table["stacks"]]
    assert rows == [(970, 0, BEFORE), (200, 1, "linear"), (100, 1, "linear"), (50, 1, "linear")]
    assert table["stacks"][1]["user_frame"] == ["train_step", "/home/me/train.py", 20]
    assert table["stacks"][3]["user_frame"] is None


def test_an_empty_history_is_what_came_before():
    table = reduce_snapshot({"device_traces": []}, device=0, rank=0, before_bytes=64)
    assert table["peak_bytes"] == 64 and [r["bytes"] for r in table["stacks"]] == [64]


@pytest.mark.parametrize("text, steps", [("steps:3", 3), ("off", 0), ("STEPS:1", 1)])
def test_the_setting_reads_steps_or_off(text, steps):
    assert parse_stacks_device(text) == steps


@pytest.mark.parametrize("text", ["steps:0", "steps", "3", "all"])
def test_a_bad_setting_is_one_line(text):
    with pytest.raises(UsageError, match="write steps:N"):
        parse_stacks_device(text)


def test_the_report_draws_and_tables_a_device_table(tmp_path):
    """A CUDA run's device table (written as DeviceStacks writes it): an icicle, a table with the
    user's line, the snapshot's name, and report.md's top five."""
    import json

    from memdiag.device_stacks import table_path
    from memdiag.report.figures import stacks_figure
    from memdiag.report.html import _stacks_html
    from memdiag.timeline.reader import Run

    events = [alloc(1, 3 * 2**20, LIB, USER), alloc(2, 2**20, LIB)]
    table = reduce_snapshot({"device_traces": [events]}, device=0, rank=0, before_bytes=5 * 2**20)
    table |= {"steps": 2, "snapshot": "device-rank-0.pickle"}
    path = table_path(tmp_path, 0)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(table))
    run = Run(path=tmp_path, spec={}, ranks={})
    html = _stacks_html(run)
    assert "first 2 training step(s): live at the device peak (9.00 MiB, rank 0)" in html
    assert "/home/me/train.py:10 (train_step)" in html and "device-rank-0.pickle" in html and "memory_viz" in html
    assert "(allocated before the recording began)" in html
    figure = stacks_figure(table)
    icicle = figure.data[0]
    assert icicle.type == "icicle" and icicle.values[0] == 9 * 2**20
    assert "train_step (train.py:10)" in icicle.labels
