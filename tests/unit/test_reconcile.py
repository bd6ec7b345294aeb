"""The per-phase device reconciliation of a CUDA rank, read from literal timeline text: the exact
allocated and reserved peaks of each phase, NVML's highest sample in it, the fragmented part of
the cache; drawn in the report, tabled in report.md and used by plan --calibrate."""

from __future__ import annotations

import json

import pytest

from memdiag.probes.device import SOURCE_CPU_ACCEL, SOURCE_CUDA
from memdiag.reconcile import reconcile
from memdiag.timeline import read_run

GIB = 2**30


def cuda_run(tmp_path, source=SOURCE_CUDA, exact=True):
    run = tmp_path / "run"
    (run / "timeline").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"world_size": 1, "status": "completed"}))
    header = {"kind": "header", "t": 1, "format_version": "1.3", "tool_version": "0.1.0", "rank": 0, "local_rank": 0,
              "world_size": 1, "local_world_size": 1, "host": "gpu0", "pid": 1, "sample_hz": 100.0,
              "device_source": source, "device_total_bytes": 80 * GIB}
    # forward twice (two steps), then step; the samples miss the forward's exact peaks
    samples = {"kind": "samples", "t": [15, 25, 35, 45], "phase": ["forward", "forward", "step", "step"],
               "step": [0, 1, 1, 1], "module": [None] * 4, "rss_bytes": [GIB] * 4, "hwm_bytes": [GIB] * 4,
               "device_allocated_bytes": [9 * GIB, 10 * GIB, 20 * GIB, 21 * GIB],
               "device_reserved_bytes": [12 * GIB, 13 * GIB, 24 * GIB, 24 * GIB],
               "nvml_used_bytes": [13 * GIB, 15 * GIB, 25 * GIB, 26 * GIB]}

    def end(t, phase, alloc, reserved, inactive):
        fields = {"device_reserved_peak_bytes": reserved * GIB, "device_inactive_split_bytes": inactive * GIB} if exact else {}
        return {"kind": "phase_end", "t": t, "phase": phase, "step": 0, "host_peak_bytes": GIB,
                "device_peak_bytes": alloc * GIB if exact else None, **fields}

    events = [
        {"kind": "phase_begin", "t": 10, "phase": "forward", "step": 0}, end(19, "forward", 11, 13, 1),
        {"kind": "phase_begin", "t": 20, "phase": "forward", "step": 1}, end(29, "forward", 12, 14, 2),
        {"kind": "phase_begin", "t": 30, "phase": "step", "step": 1}, end(49, "step", 23, 25, 1),
    ]
    lines = [header, samples, *events]
    (run / "timeline" / "rank-0.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return run


def test_each_phase_splits_nvml_into_allocated_cache_and_outside_torch(tmp_path):
    rank, rows = reconcile(read_run(cuda_run(tmp_path)))
    assert rank == 0 and [r.phase for r in rows] == ["forward", "step"]
    forward, step = rows
    # the highest of the phase's occurrences, exact where the phase recorded it (12, not the sampled 10)
    assert (forward.allocated_peak_bytes, forward.reserved_peak_bytes, forward.nvml_used_peak_bytes) == (12 * GIB, 14 * GIB, 15 * GIB)
    assert forward.cache_bytes == 2 * GIB and forward.outside_torch_bytes == 1 * GIB and forward.inactive_split_bytes == 2 * GIB
    assert (step.allocated_peak_bytes, step.cache_bytes, step.outside_torch_bytes) == (23 * GIB, 2 * GIB, 1 * GIB)


def test_a_run_before_exact_reserved_peaks_falls_back_to_its_samples(tmp_path):
    _, rows = reconcile(read_run(cuda_run(tmp_path, exact=False)))
    forward = rows[0]
    assert (forward.allocated_peak_bytes, forward.reserved_peak_bytes, forward.inactive_split_bytes) == (10 * GIB, 13 * GIB, None)


def test_the_cpu_accelerator_has_nothing_to_reconcile(tmp_path):
    assert reconcile(read_run(cuda_run(tmp_path, source=SOURCE_CPU_ACCEL))) is None


def test_the_report_draws_one_stacked_bar_per_phase_and_the_markdown_tables_it(tmp_path):
    from memdiag.report.figures import build_figures
    from memdiag.report.markdown import write_markdown
    from memdiag.summary import summarize

    run = read_run(cuda_run(tmp_path))
    summary = summarize(run)
    figure = build_figures(run, summary)["reconciliation"]
    assert figure.layout.barmode == "stack" and len(figure.data) == 3
    assert [list(bar.y) for bar in figure.data] == [[12.0, 23.0], [2.0, 2.0], [1.0, 1.0]]
    assert all(list(bar.x) == ["forward", "step"] for bar in figure.data)
    md = write_markdown(run, summary, [], [], None, tmp_path / "report.md").read_text()
    assert "**Device memory per phase, rank 0**" in md
    assert "| forward | 12.00 GiB | 2.00 GiB | 2.00 GiB | 1.00 GiB | 15.00 GiB |" in md


def test_calibration_reads_the_reserve_from_the_exact_phase_peaks(tmp_path):
    from memdiag.plan.calibrate import cuda_reserve_layers
    from memdiag.plan.terms import Settings

    class Arch:
        largest_layer_params = GIB // 2  # 1 GiB per gathered bf16 layer

    # reserved peak 25 (exact, step) minus allocated peak 23 (exact, step): 2 layers
    assert cuda_reserve_layers(read_run(cuda_run(tmp_path)), Arch(), Settings()) == pytest.approx(2.0)
