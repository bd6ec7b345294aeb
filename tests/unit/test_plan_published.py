"""The published validation set: its reader on literal lines, the shipped file's coverage, the
offload terms it exercises, and the one coefficient fitted on it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memdiag.errors import UsageError
from memdiag.plan.model import Architecture
from memdiag.settings import PLAN, parse
from memdiag.plan.published import Scored, fit_reserve_layers, load_cases, parse_case, predict
from memdiag.plan.terms import Coefficients, Settings, device_terms, host_phase_terms, offload_terms

REPO = Path(__file__).resolve().parents[2]
PUBLISHED = REPO / "bench" / "published"
GOOD = {
    "id": "x", "category": "host_offload", "source": "deepspeedai/DeepSpeed#3448", "quote": "I used 750G ~ 800G RAM",
    "model": "llama-30b", "nodes": 1, "devices_per_node": 8, "device_memory": "40GiB", "host_ram": None,
    "settings": {"offload": "params"}, "ambiguity": "G read as GiB",
    "measured": {"what": "host_node_peak", "value": "775G", "low": "750G", "high": "800G"},
}


def line(**changes) -> str:
    row = dict(GOOD)
    for key, value in changes.items():
        if value is None:
            row.pop(key, None)
        else:
            row[key] = value
    return json.dumps(row)


def test_a_good_line_reads_with_its_units_and_range():
    case = parse_case(line(), path=Path("cases.jsonl"), line=1)
    assert case.device_memory_bytes == 40 * 2**30
    assert case.measured_bytes == 775 * 2**30
    assert (case.measured_low_bytes, case.measured_high_bytes) == (750 * 2**30, 800 * 2**30)
    assert case.phases == ("load", "initialize", "training")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "a JSON object"),
        (line(quote=None), "missing quote"),
        (line(category="gpu"), "category 'gpu'"),
        (line(outcome={"limit": "host", "result": "oom"}), "exactly one of measured"),
        (line(measured={"what": "rss", "value": "1G"}), "measured.what 'rss'"),
        (line(device_memory="40 gigs"), "device_memory='40 gigs'"),
        (line(device_memory="80GB"), "write 80GiB"),  # an 80GB card has 80 GiB, as the profiles say
        (line(measured=None, outcome={"limit": "host", "result": "oom"}), "a host outcome needs host_ram"),
        (line(phases=["warmup"]), "phases ['warmup']"),
        (line(nodes=0), "must be positive"),
    ],
)
def test_a_malformed_line_is_refused_with_its_file_and_number(text, says):
    with pytest.raises(UsageError) as caught:
        parse_case(text, path=Path("cases.jsonl"), line=7)
    assert str(caught.value).startswith("cases.jsonl:7: ")
    assert says in str(caught.value)


def test_a_repeated_id_names_both_lines(tmp_path):
    path = tmp_path / "cases.jsonl"
    path.write_text(line() + "\n\n" + line() + "\n")
    with pytest.raises(UsageError, match=r"cases.jsonl:3: id 'x' repeats line 1"):
        load_cases(path)


def test_the_shipped_set_has_the_coverage_the_issue_asks_for():
    cases = load_cases(PUBLISHED / "cases.jsonl")
    host = [c for c in cases if c.category in ("host", "host_offload")]
    offload = [c for c in cases if c.category == "host_offload"]
    assert len(cases) >= 20 and len(host) >= 8 and len(offload) >= 5
    for case in cases:
        assert "#" in case.source or "://" in case.source or "shared/seed" in case.source, case.id
        assert case.quote.strip() and case.ambiguity.strip(), case.id
        if not case.model.startswith("case:"):
            assert (PUBLISHED / "models" / f"{case.model}.json").is_file(), case.model


def test_unknown_offload_lists_the_accepted_ones():
    with pytest.raises(UsageError, match="use one of auto, none, optimizer, params, nvme"):
        parse(["offload=disk"], PLAN)


@pytest.fixture(scope="module")
def llama30b():
    return Architecture.from_hf_config(PUBLISHED / "models" / "llama-30b.json", dtype="bf16", attention="fused")


def test_offload_moves_gradients_and_states_off_the_device(llama30b):
    on_device = device_terms(llama30b, Settings(), 8, Coefficients())
    offloaded = device_terms(llama30b, Settings(offload="params"), 8, Coefficients())
    assert on_device["gradients"] > 0 and on_device["parameters"] > 0
    assert offloaded["gradients"] == offloaded["parameters"] == offloaded["optimizer_states"] == 0


def test_sub_group_size_zero_groups_each_tensor_and_does_not_divide_by_zero(llama30b):
    zero = offload_terms(llama30b, Settings(offload="params", pin_memory=True, ds_buffers={"sub_group_size": 0}), local_ranks=8, world=8)
    large = offload_terms(llama30b, Settings(offload="params", pin_memory=True, ds_buffers={"sub_group_size": 1e9}), local_ranks=8, world=8)
    # the states are the same bytes; only the pinned blocks (one per sub-group) round differently
    assert zero["offloaded_fp32_master"] == large["offloaded_fp32_master"]
    assert zero["pinned_power_of_two_rounding"] != large["pinned_power_of_two_rounding"]


def test_nvme_keeps_gradients_and_swap_buffers_on_the_host_not_the_states(llama30b):
    # ZeRO-Infinity configs shrink sub_group_size: the optimizer swapper's buffers are 4 of the largest sub-group
    buffers = {"sub_group_size": 1e8}
    cpu = offload_terms(llama30b, Settings(offload="params", ds_buffers=buffers), local_ranks=8, world=8)
    nvme = offload_terms(llama30b, Settings(offload="nvme", ds_buffers=buffers), local_ranks=8, world=8)
    assert set(nvme) == {"offloaded_gradient_partitions", "nvme_optimizer_swap_buffers", "nvme_parameter_swap_buffers"}
    assert nvme["offloaded_gradient_partitions"] == cpu["offloaded_gradient_partitions"]
    assert sum(nvme.values()) < 0.3 * sum(cpu.values())
    # a rank: 4 x 1e8 fp32 and 5 x 1e8 bf16 elements, each pool rounded up to a power of two when pinned
    assert nvme["nvme_optimizer_swap_buffers"] == 8 * 2**31
    assert nvme["nvme_parameter_swap_buffers"] == 8 * 2**30


def test_offload_initialize_holds_the_largest_sub_group_gradient_buffer(llama30b):
    s = Settings(offload="params", ds_buffers={"sub_group_size": 1e9})
    phases = host_phase_terms(llama30b, s, local_ranks=8, world=8, runtime_context_bytes=0, cpu_accelerator=False, c=Coefficients())
    assert phases["initialize"]["initialize_gradient_buffer"] == 8 * 4 * 1e9
    assert "initialize_gradient_buffer" not in phases["training"]


def test_the_shipped_reserve_is_the_fit_on_the_published_device_figures():
    cases = [c for c in load_cases(PUBLISHED / "cases.jsonl") if c.measured_what == "device_used_peak"]
    scored = [Scored(c, predict(c, PUBLISHED / "models")) for c in cases]
    fitted = fit_reserve_layers(scored)
    assert fitted == pytest.approx(Coefficients().allocator_reserve_layers, rel=0.01)
    # and it is not a constant that ignores the model: a 70B layer reserves more than an 8B one
    reserves = {s.case.model: s.prediction.detail["allocator_reserve_bytes"] for s in scored}
    assert reserves["deepseek-r1-distill-llama-70b"] > 3 * reserves["llama-3-8b"]


def test_a_published_figure_inside_its_range_scores_zero():
    case = parse_case(line(), path=Path("cases.jsonl"), line=1)
    from memdiag.plan.published import Prediction

    inside = Scored(case, Prediction(memdiag_bytes=760 * 2**30, deepspeed_bytes=900 * 2**30))
    below = Scored(case, Prediction(memdiag_bytes=675 * 2**30, deepspeed_bytes=900 * 2**30))
    assert inside.error == 0.0
    assert below.error == pytest.approx(-0.1)
    assert inside.deepspeed_error == pytest.approx(100 / 800)


def test_the_bench_prints_every_category_and_refuses_a_bad_file(tmp_path):
    bench = REPO / "bench" / "plan_published.py"
    ok = subprocess.run([sys.executable, str(bench)], capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr
    for label in ("device", "host, no offload", "host, offload", "DeepSpeed", "fitted on the others", "targets:"):
        assert label in ok.stdout
    bad = tmp_path / "cases.jsonl"
    bad.write_text(line() + "\n" + line(id="y", nodes="two") + "\n")
    refused = subprocess.run([sys.executable, str(bench), "--cases", str(bad)], capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0 and f"{bad}:2:" in refused.stderr


def _run_dir(tmp_path, device_source: str) -> Path:
    run = tmp_path / device_source.split()[0]
    (run / "timeline").mkdir(parents=True)
    header = {"kind": "header", "t": 1, "format_version": "1.1", "tool_version": "0.1.0", "rank": 0, "local_rank": 0,
              "world_size": 1, "local_world_size": 1, "host": "gpu0", "pid": 1, "sample_hz": 100.0,
              "device_source": device_source, "device_total_bytes": 80 * 2**30}
    samples = {"kind": "samples", "t": [2, 3, 4], "phase": ["forward", "backward", "step"], "step": [0, 0, 1],
               "module": [None, None, None], "rss_bytes": [2**30] * 3, "hwm_bytes": [2**30] * 3,
               "device_allocated_bytes": [10 * 2**30, 14 * 2**30, 12 * 2**30],
               "device_reserved_bytes": [12 * 2**30, 20 * 2**30, 20 * 2**30]}
    (run / "timeline" / "rank-0.jsonl").write_text(json.dumps(header) + "\n" + json.dumps(samples) + "\n")
    return run


def test_calibrate_reads_the_reserve_in_gathered_layers_from_a_cuda_run_only(tmp_path, llama30b):
    from memdiag.plan.calibrate import cuda_reserve_layers
    from memdiag.probes.device import SOURCE_CPU_ACCEL, SOURCE_CUDA
    from memdiag.timeline import read_run

    layer_bytes = 2 * llama30b.largest_layer_params
    cuda = cuda_reserve_layers(read_run(_run_dir(tmp_path, SOURCE_CUDA)), llama30b, Settings())
    assert cuda == pytest.approx((20 - 14) * 2**30 / layer_bytes)  # reserved peak minus allocated peak
    assert cuda_reserve_layers(read_run(_run_dir(tmp_path, SOURCE_CPU_ACCEL)), llama30b, Settings()) is None
