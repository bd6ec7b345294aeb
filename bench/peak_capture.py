"""Does a short spike between two samples still show in the recorded phase peak?

A 256 MB allocation is held for 5 ms inside a phase, starting right after a sample. The sampled
value can miss it; the phase peak (VmHWM read and reset at the phase boundaries, the CUDA
allocator's peak counter on a device) must not. On a host, faulting in 256 MB takes far longer
than 10 ms (the bench prints how long), so at 100 Hz the samples see the rise too; the 1 Hz row
puts the whole spike between two samples. On a GPU (cudaMalloc, no page faults) the 5 ms hold is
real and the 100 Hz row is the test. 20 trials per row; prints how often each caught the spike.
Each row twice: sampled by a thread in the process (``sampler=rank``) and from outside it by the
node watcher's rank sampler (``sampler=watcher``, the default; on CUDA its device figures are the
allocator's peaks read at the boundaries).

    python bench/peak_capture.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memdiag.phases import PhaseTracker  # noqa: E402
from memdiag.probes.device import DeviceProbe  # noqa: E402
from memdiag.node import RankProcesses, RankSampler  # noqa: E402
from memdiag.sampler import DeviceSeries, Sampler  # noqa: E402
from memdiag.timeline import TimelineWriter, rank_path, read_run  # noqa: E402

SPIKE_BYTES = 256 * 10**6
HOLD_S = 0.005
TRIALS = 20


def host_spike() -> None:
    import torch

    block = torch.ones(SPIKE_BYTES, dtype=torch.uint8)  # every page touched, GIL released
    time.sleep(HOLD_S)
    del block


def device_spike() -> None:
    import torch

    block = torch.empty(SPIKE_BYTES, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    time.sleep(HOLD_S)
    del block


SPIKE_SPANS_S: list[float] = []


class WatcherSampling:
    """The node watcher's rank sampler over this process, at its own pace in a thread (in a run
    it is the watcher process; the reads are the same /proc/<pid>/status through an open fd)."""

    def __init__(self, run_dir: Path, index: int, interval_s: float) -> None:
        self.writer = TimelineWriter(Path(run_dir) / "timeline" / f"node-t{index}.jsonl", {"host": f"t{index}"})
        self.sampler = RankSampler(self.writer)
        self.ranks = {index: RankProcesses(index, os.getpid(), [])}
        self.interval_s = interval_s
        self.samples_written = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        deadline = time.monotonic()
        while not self._stop.is_set():
            self.sampler.sample(self.ranks)
            self.samples_written += 1
            deadline = max(deadline + self.interval_s, time.monotonic())
            self._stop.wait(deadline - time.monotonic())

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sampler.close()
        self.writer.close()


def trial(run_dir: Path, spike, device: DeviceProbe | None, index: int, interval_s: float, mode: str) -> None:
    header = {"rank": index, "host": f"t{index}", "sampler": mode,
              "device_source": device.source if device is not None else None}
    writer = TimelineWriter(rank_path(run_dir, index), header, flush_interval_s=0.0 if mode == "watcher" else 0.1)
    tracker = PhaseTracker(writer.write, device)
    if mode == "rank":
        sampler = Sampler(writer, tracker, device, interval_s=interval_s)
    else:
        sampler = WatcherSampling(run_dir, index, interval_s)
        if device is not None:
            series = DeviceSeries(writer, tracker)
            tracker.device_listener = series.add
    sampler.start()
    time.sleep(0.05)
    with tracker.phase_scope("spike"):
        written = sampler.samples_written
        while sampler.samples_written == written:  # start right after a sample
            time.sleep(0.0002)
        started = time.perf_counter()
        spike()
        SPIKE_SPANS_S.append(time.perf_counter() - started)
        time.sleep(interval_s)
    time.sleep(0.03)
    sampler.stop()
    if mode == "watcher" and device is not None:
        series.close()
    writer.close()


def evaluate(run_dir: Path, column: str, peak_key: str, baseline_key: str) -> tuple[int, int, list[float]]:
    run = read_run(run_dir)
    sampled_hits = phase_hits = 0
    phase_rises = []
    for timeline in run.ranks.values():
        phase = next(p for p in timeline.phases if p.name == "spike")
        base = getattr(phase, baseline_key)
        sampled = timeline.columns[column]
        inside = (timeline.t_ns >= phase.begin_ns) & (timeline.t_ns <= phase.end_ns)
        sampled_rise = float(sampled[inside].max() - base) if inside.any() else 0.0
        peak = getattr(phase, peak_key)
        phase_rise = float(peak - base)
        sampled_hits += sampled_rise >= 0.9 * SPIKE_BYTES
        phase_hits += phase_rise >= 0.9 * SPIKE_BYTES
        phase_rises.append(phase_rise / 1e6)
    return sampled_hits, phase_hits, phase_rises


def main() -> int:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("rank", "watcher"):
            for hz in (100, 1):
                host_dir = Path(tmp) / f"host-{mode}-{hz}"
                for i in range(TRIALS):
                    trial(host_dir, host_spike, None, i, 1 / hz, mode)
                results[f"{mode}: host @{hz} Hz"] = evaluate(host_dir, "rss_bytes", "host_peak_bytes", "begin_rss_bytes")
        device = DeviceProbe.detect(0)
        if device is not None and device.source.startswith("torch.cuda"):
            for mode in ("rank", "watcher"):
                dev_dir = Path(tmp) / f"device-{mode}"
                for i in range(TRIALS):
                    trial(dev_dir, device_spike, device, i, 0.01, mode)
                results[f"{mode}: device @100 Hz"] = evaluate(
                    dev_dir, "device_allocated_bytes", "device_peak_bytes", "begin_device_bytes"
                )
    spans = sorted(SPIKE_SPANS_S)
    print(
        f"spike {SPIKE_BYTES / 1e6:.0f} MB held {HOLD_S * 1e3:.0f} ms, starting right after a sample; "
        f"{TRIALS} trials per row; allocate+hold+free took {spans[0] * 1e3:.1f}..{spans[-1] * 1e3:.1f} ms"
    )
    print(f"{'sampler: memory':24} {'sampled value caught it':>24} {'phase peak caught it':>21} {'phase peak rise (MB)':>22}")
    for name, (sampled, phase, rises) in results.items():
        print(f"{name:24} {sampled:>19}/{TRIALS:<4} {phase:>16}/{TRIALS:<4} {min(rises):>10.1f} .. {max(rises):.1f}")
    if not any("device" in name for name in results):
        print("device: no CUDA device here; the device half runs where one exists")
    print(json.dumps({k: {"sampled_hits": v[0], "phase_hits": v[1]} for k, v in results.items()}))
    return 0 if all(v[1] == TRIALS for v in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
