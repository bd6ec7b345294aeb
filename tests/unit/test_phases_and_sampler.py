"""Exact per-phase peaks and the sampler thread, in this very process."""

import time

import numpy as np
import pytest

from memdiag.phases import PhaseTracker, StepRecord
from memdiag.probes import host
from memdiag.probes.device import DeviceMem, DeviceProbe
from memdiag.sampler import Sampler
from memdiag.timeline import TimelineWriter, read_run, rank_path
from memdiag.timeline import format as fmt

MIB = 2**20


def _needs_clear_refs():
    try:
        host.reset_peak_rss()
    except OSError:
        pytest.skip("this kernel refuses /proc/self/clear_refs")


def test_a_spike_between_samples_lands_in_its_phase_and_the_enclosing_one():
    _needs_clear_refs()
    events = []
    tracker = PhaseTracker(events.append)
    base = host.read_proc_status().rss_bytes
    with tracker.phase_scope("outer"):
        with tracker.phase_scope("inner"):
            spike = bytearray(256 * MIB)
            del spike
        with tracker.phase_scope("after"):
            pass
    ends = {e["phase"]: e["host_peak_bytes"] for e in events if e["kind"] == fmt.PHASE_END}
    assert ends["inner"] - base >= 240 * MIB
    assert ends["outer"] >= ends["inner"]
    assert ends["after"] - base < 64 * MIB  # reset at the boundary: the spike is not here
    assert [e["kind"] for e in events] == ["phase_begin"] * 2 + ["phase_end", "phase_begin"] + [
        "phase_end"
    ] * 2


def test_step_records_reach_listeners_and_set_the_step():
    events, seen = [], []
    tracker = PhaseTracker(events.append)
    tracker.step_listeners.append(seen.append)
    tracker.record_step(StepRecord(step=3, loss=2.5, tokens=512, step_time_s=0.1))
    assert tracker.step == 3 and seen[0].loss == 2.5 and events[-1]["tokens"] == 512


def test_sampler_writes_at_its_rate_and_carries_phase(tmp_path):
    writer = TimelineWriter(rank_path(tmp_path, 0), {"rank": 0})
    tracker = PhaseTracker(writer.write)
    sampler = Sampler(writer, tracker, None, interval_s=0.01)
    sampler.start()
    with tracker.phase_scope("forward"):
        time.sleep(0.3)
    sampler.stop()
    writer.close()
    run = read_run(tmp_path)
    timeline = run.ranks[0]
    assert 15 <= len(timeline.t_ns) <= 40
    assert "forward" in set(timeline.sample_phase)
    assert np.all(np.diff(timeline.t_ns) > 0)
    assert np.nanmin(timeline.columns["rss_bytes"]) > 0


class BrokenDevice(DeviceProbe):
    def read(self, *, with_nvml=True) -> DeviceMem:
        raise RuntimeError("NVML exploded")


def test_sampler_survives_a_failing_probe(tmp_path):
    writer = TimelineWriter(rank_path(tmp_path, 0), {"rank": 0})
    tracker = PhaseTracker(writer.write)
    sampler = Sampler(writer, tracker, BrokenDevice("broken", None), interval_s=0.005)
    sampler.start()
    time.sleep(0.1)
    assert sampler._thread.is_alive()
    sampler.stop()
    assert sampler.samples_written == 0 and sampler._errors > 3


def test_sampler_rejects_a_bad_interval(tmp_path):
    writer = TimelineWriter(rank_path(tmp_path, 0), {"rank": 0})
    with pytest.raises(ValueError, match="interval_s"):
        Sampler(writer, PhaseTracker(writer.write), None, interval_s=0)
