"""The CUDA and NVML paths on literal inputs (CI has no GPU): NVML's process lists, the nested
allocator stats, the peak ledger across foreign resets, the categories' device filter."""

from __future__ import annotations

from collections import namedtuple
from types import SimpleNamespace

import pytest
import torch

from memdiag import categories
from memdiag.probes.device import PeakLedger, allocator_figures, inactive_split, process_used

Proc = namedtuple("Proc", "pid usedGpuMemory")


def test_nvmls_process_list_with_our_pid_host_pids_or_no_figure():
    assert process_used([Proc(7, 1), Proc(42, 5 * 2**30)], 42) == (5 * 2**30, None)
    used, why = process_used([Proc(42, None)], 42)
    assert used is None and "without a memory figure" in why and "MIG" in why
    used, why = process_used([Proc(1234567, 2**30), Proc(1234568, 2**30)], 42)
    assert used is None and "host's PID namespace" in why and "1234567" in why
    assert process_used([], 42)[1] == "NVML lists no process on this device"


def test_one_nested_stats_read_gives_allocated_reserved_retries_and_ooms():
    nested = {"allocated_bytes": {"all": {"current": 3 * 2**30, "peak": 5 * 2**30}, "large_pool": {"current": 1}},
              "reserved_bytes": {"all": {"current": 4 * 2**30}}, "num_alloc_retries": 2, "num_ooms": 0}
    assert allocator_figures(nested) == (3 * 2**30, 4 * 2**30, 2, 0)
    assert allocator_figures({}) == (0, 0, 0, 0)  # a device the process has not touched
    nested["inactive_split_bytes"] = {"all": {"current": 300 * 2**20, "peak": 2**30}}
    assert inactive_split(nested) == 300 * 2**20 and inactive_split({}) == 0


class Counter:
    """torch's per-device peak counter semantics: peaks since the last reset."""

    def __init__(self) -> None:
        self.allocated = self.peak = 0

    def set(self, allocated: int) -> None:
        self.allocated = allocated
        self.peak = max(self.peak, allocated)

    def reset(self) -> None:
        self.peak = self.allocated


def test_phase_peaks_survive_a_foreign_reset_and_the_users_view_survives_ours():
    counter = Counter()
    cache = 8  # the allocator reserves 8 bytes above what is allocated, say
    ledger = PeakLedger(lambda: (counter.peak, counter.peak + cache), counter.reset)
    counter.set(10)
    counter.set(90)  # the phase's real peak ...
    counter.set(20)
    ledger.foreign_reset()  # ... then DeepSpeed's see_memory_usage(force=True) resets the counter
    counter.reset()
    counter.set(30)
    assert ledger.take() == (90, 98)  # memdiag's phase peaks kept the pre-reset 90 and its reserve
    counter.set(25)
    # the user's max_memory_allocated since their own reset: 30, though memdiag reset in between
    assert ledger.users_max_allocated(counter.peak) == 30
    assert ledger.users_max_reserved(counter.peak + cache) == 38
    counter.set(70)
    assert ledger.take() == (70, 78) and ledger.users_max_allocated(counter.peak) == 70
    ledger.foreign_reset()
    counter.reset()
    assert ledger.users_max_allocated(counter.peak) == 70  # their view restarts at what is allocated now
    assert ledger.foreign_resets == 2


def test_the_ledgers_wrappers_on_a_torch_like_module_pass_other_devices_through():
    counters = {0: Counter(), 1: Counter()}
    memory = SimpleNamespace(
        reset_peak_memory_stats=lambda d=None: counters[d or 0].reset(),
        max_memory_allocated=lambda d=None: counters[d or 0].peak,
        max_memory_reserved=lambda d=None: counters[d or 0].peak,
    )
    cuda = SimpleNamespace(memory=memory, _utils=SimpleNamespace(_get_device_index=lambda d, optional=True: d or 0),
                           **vars(memory))
    fake_torch = SimpleNamespace(cuda=cuda)
    warned = []
    ledger = PeakLedger.over_torch_cuda(fake_torch, 0, lambda key, message: warned.append(key))
    counters[0].set(50)
    counters[1].set(80)
    cuda.reset_peak_memory_stats(0)  # foreign, ours: folded
    cuda.reset_peak_memory_stats(1)  # another device: untouched
    counters[0].set(5)
    assert ledger.take() == (50, 50) and warned == ["foreign_peak_reset"]
    assert cuda.max_memory_allocated(1) == 80 and memory.max_memory_allocated(0) == 50


def test_categories_count_only_the_devices_tensors_and_ledger_the_offloaded_ones():
    layer = torch.nn.Linear(64, 64, bias=False)
    engine = SimpleNamespace(module=layer, optimizer=None)
    on_cpu = categories.measure(engine, 0, "cpu")
    assert on_cpu["parameters"] == 64 * 64 * 4 and "host_parameters" not in on_cpu
    elsewhere = categories.measure(engine, 0, "cuda")  # a CUDA rank whose states were offloaded
    assert elsewhere["parameters"] == 0 and elsewhere["host_parameters"] == 64 * 64 * 4
    assert categories.measure(engine, 0)["parameters"] == 64 * 64 * 4  # no device given: all counted


@pytest.mark.parametrize("value", ["cpu"])
def test_ds_accelerator_cpu_is_honoured_before_cuda(monkeypatch, value):
    from memdiag.probes.device import SOURCE_CPU_ACCEL, DeviceProbe

    monkeypatch.setenv("DS_ACCELERATOR", value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine
    assert DeviceProbe.detect(0).source == SOURCE_CPU_ACCEL


class ScriptedNvml:
    """pynvml's calls the node watcher makes, answering from a script (CI has no GPU): two
    devices, their compute processes as nvidia-ml-py returns them."""

    class NVMLError_FunctionNotFound(Exception):
        pass

    def __init__(self, devices: list[list[Proc]], fail_init: Exception | None = None) -> None:
        self.devices = devices
        self.fail_init = fail_init
        self.queries = 0

    def nvmlInit(self) -> None:
        if self.fail_init is not None:
            raise self.fail_init

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[Proc]:
        self.queries += 1
        if isinstance(self.devices[handle], Exception):
            raise self.devices[handle]
        return self.devices[handle]


def test_the_watchers_nvml_reads_every_ranks_process_summed_over_devices_and_says_why_once():
    from memdiag.probes.device import ProcessNvml

    warned = []
    nvml = ScriptedNvml([[Proc(100, 5 * 2**30), Proc(101, 300 * 2**20)], [Proc(101, 6 * 2**30), Proc(999, 2**30)]])
    reader = ProcessNvml(lambda key, message: warned.append(key), nvml)
    assert reader.started()
    # rank 1 also holds a context on device 0 (the classic stray context): NVML counts it as its own
    assert reader.used({0: 100, 1: 101, 2: 102}) == {0: 5 * 2**30, 1: 6 * 2**30 + 300 * 2**20, 2: None}
    assert nvml.queries == 2 and warned == []  # one query per device for all ranks; rank 2 not on a device yet: no reason to warn
    # a container without the host's PID namespace: NVML lists host PIDs, none of the ranks'
    nvml.devices = [[Proc(40100, 5 * 2**30)], [Proc(40101, 6 * 2**30)]]
    assert reader.used({0: 100, 1: 101}, on_device={0, 1}) == {0: None, 1: None}
    assert reader.used({0: 100, 1: 101}, on_device={0, 1}) == {0: None, 1: None}
    assert warned == ["nvml_pid_namespace"]  # said once, with the fix
    nvml.devices = [[Proc(100, None)], []]  # MIG, or a driver hiding the figure
    assert reader.used({0: 100}) == {0: None} and warned[-1] == "nvml_hidden"
    nvml.devices = [RuntimeError("GPU is lost"), []]
    assert reader.used({0: 100}) == {} and warned[-1] == "nvml_failed" and reader.off
    assert reader.used({0: 100}) == {}  # and stays off, never raising


def test_no_nvml_on_this_machine_is_quiet_and_the_watcher_writes_no_nvml_column(tmp_path):
    import json

    from memdiag.node import RankProcesses, RankSampler
    from memdiag.probes.device import ProcessNvml
    from memdiag.timeline import TimelineWriter

    warned = []
    absent = ProcessNvml(lambda key, message: warned.append(key), ScriptedNvml([], fail_init=OSError("libnvidia-ml.so.1: not found")))
    assert not absent.started() and "not found" in absent.off and absent.used({0: 1}) == {} and warned == []
    import os

    for nvml, expect in ((None, None), (lambda ranks: {0: 7 * 2**30}, 7 * 2**30)):
        path = tmp_path / f"node-{expect}.jsonl"
        writer = TimelineWriter(path, {"host": "n0"})
        sampler = RankSampler(writer, nvml=nvml)
        for _ in range(3):
            sampler.sample({0: RankProcesses(0, os.getpid(), [])})
        sampler.close()
        writer.close()
        (batch,) = [json.loads(line) for line in path.read_text().splitlines() if '"rank_samples"' in line]
        if expect is None:
            assert "nvml_used_bytes" not in batch  # a CPU machine's file carries no column of nulls
        else:  # read at most every 0.1 s: the first tick, null on the next ones (they come within microseconds)
            assert batch["nvml_used_bytes"][0] == expect and batch["nvml_used_bytes"][1:] == [None, None]


def test_the_watcher_gives_each_cuda_rank_nvmls_figure_for_the_metrics_and_says_why_when_nvml_hides_it(tmp_path):
    """The node watcher's NVML, through its own code on a scripted NVML: a CUDA rank (its file's
    header) whose allocator holds memory and that NVML does not list gets the reason once, in the
    node file; a listed rank's figure reaches the followers the live metrics read."""
    import json
    import os

    from memdiag.node import NodeWatcher, RankProcesses
    from memdiag.probes.device import SOURCE_CUDA, ProcessNvml
    from memdiag.timeline import TimelineWriter, rank_path
    from memdiag.timeline import format as fmt

    for rank in (0, 1):
        writer = TimelineWriter(rank_path(tmp_path, rank), {"rank": rank, "host": "n0", "device_source": SOURCE_CUDA})
        writer.write({"kind": fmt.PHASE_BEGIN, "t": 1, "phase": "forward", "step": 1, "device_allocated_bytes": 2**30})
        writer.close()
    watcher = NodeWatcher(tmp_path, os.getpid(), host="n0", rank_interval_s=0.01)
    watcher.nvml = ProcessNvml(watcher._warn, ScriptedNvml([[Proc(4000, 3 * 2**30), Proc(98765, 2**30)]]))
    ranks = {0: RankProcesses(0, 4000, []), 1: RankProcesses(1, 4001, [])}
    watcher.followers.refresh(ranks)
    assert watcher._nvml_used(ranks) == {0: 3 * 2**30, 1: None}
    assert watcher.followers.states[0].figures["nvml_used_bytes"] == 3 * 2**30  # what the metrics serve
    assert "nvml_used_bytes" not in watcher.followers.states[1].figures
    watcher._nvml_used(ranks)
    watcher.writer.close()
    warnings = [json.loads(line) for line in (tmp_path / "timeline" / "node-n0.jsonl").read_text().splitlines()
                if '"warning"' in line]
    assert [w["key"] for w in warnings if w["key"].startswith("nvml")] == ["nvml_pid_namespace"]
    (said,) = [w["message"] for w in warnings if w["key"] == "nvml_pid_namespace"]
    assert "rank(s) 1 (PID(s) 4001)" in said and "hostPID" in said
