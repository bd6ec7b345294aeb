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


def test_steady_training_keeps_each_windows_bounds_and_the_rest_stays_at_full_rate(tmp_path):
    """sample.full_rate_s / sample.steady_interval_s: before the first step and outside the
    training loop every tick is written; in the loop past full_rate_s, each window's lowest and
    highest RSS and highest device figure, so a spike inside a window survives."""
    writer = TimelineWriter(rank_path(tmp_path, 0), {"rank": 0})
    tracker = PhaseTracker(writer.write)
    sampler = Sampler(writer, tracker, None, interval_s=0.01, full_rate_s=1.0, steady_interval_s=0.5)
    t = 0

    def tick(now: float, rss: int, device: int) -> None:
        nonlocal t
        t += 1
        sampler._take({"kind": fmt.SAMPLE, "t": t, "phase": tracker.phase, "step": tracker.step, "rss_bytes": rss,
                       "hwm_bytes": rss, "device_allocated_bytes": device}, now=now)

    for i in range(50):  # initialisation (step 0): every tick
        tick(i * 0.01, 100 + i, 0)
    tracker.record_step(StepRecord(step=1, loss=1.0, tokens=1, step_time_s=1.0))
    with tracker.phase_scope("forward"):
        for i in range(100):  # the first second of the loop: full rate
            tick(1 + i * 0.01, 200, 0)
        for i in range(100):  # then two 0.5 s windows with a spike (rss 999) and a device high (7) in the first
            tick(2 + i * 0.01, 999 if i == 10 else 300 - (i == 30) * 50, 7 if i == 20 else 1)
    with tracker.phase_scope("save"):  # outside the loop: full rate again
        for i in range(20):
            tick(3 + i * 0.01, 400, 0)
    sampler.stop()
    writer.close()
    timeline = read_run(tmp_path).ranks[0]
    rss = list(timeline.columns["rss_bytes"])
    assert rss[50:150] == [200] * 100  # the loop's first second, every tick
    steady = rss[150:-20]
    assert 999 in steady and 250 in steady and len(steady) <= 2 * 3  # bounds of two windows, not 100 ticks
    assert 7 in list(timeline.columns["device_allocated_bytes"])  # the device high survives too
    assert rss[-20:] == [400] * 20 and rss[:50] == list(range(100, 150))
