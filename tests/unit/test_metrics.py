"""The node's Prometheus metrics from literal watcher samples: one consistent snapshot, the
forecast to the host limit, the node_exporter textfile, and a port that cannot be bound."""

from __future__ import annotations

import socket

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client import generate_latest

from memdiag.metrics import NodeMetrics

GIB = 2**30


def sample(t_s: float, *rss_gib: float) -> dict:
    return {"t": int(t_s * 1e9), "mem_available_bytes": 100 * GIB,
            "ranks": {str(r): {"pid": 100 + r, "rss_bytes": int(g * GIB), "children_rss_bytes": 0} for r, g in enumerate(rss_gib)}}


def scraped(metrics: NodeMetrics) -> dict[tuple[str, str | None], float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, s.labels.get("rank")): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def metrics(tmp_path, warned=None, **kw) -> NodeMetrics:
    kw = {"port": None, "textfile_dir": None, "limit_bytes": 10 * GIB, "guard_fraction": 0.95} | kw
    return NodeMetrics(tmp_path, "case/run", "n0", warn=lambda k, m: (warned if warned is not None else []).append(k), **kw)


def test_a_scrape_shows_the_last_sample_whole_with_peaks_and_the_forecast(tmp_path):
    m = metrics(tmp_path)
    m.update(sample(0, 1, 2), guard_fired=False)
    m.update(sample(10, 2, 3), guard_fired=False)  # the node grows 2 GiB in 10 s
    seen = scraped(m)
    assert seen[("memdiag_host_rss_bytes", "0")] == 2 * GIB and seen[("memdiag_host_rss_bytes", "1")] == 3 * GIB
    assert seen[("memdiag_node_ranks_rss_bytes", None)] == 5 * GIB
    assert seen[("memdiag_guard_line_bytes", None)] == 9.5 * GIB and seen[("memdiag_guard_fired", None)] == 0
    assert seen[("memdiag_sample_timestamp_seconds", None)] == 10.0
    assert seen[("memdiag_node_seconds_to_host_limit", None)] == 25.0  # 5 GiB left at 0.2 GiB/s
    m.update(sample(20, 1.5), guard_fired=True)  # rank 1 ended; rank 0 fell below its peak
    seen = scraped(m)
    assert ("memdiag_host_rss_bytes", "1") not in seen and seen[("memdiag_host_rss_peak_bytes", "0")] == 2 * GIB
    assert seen[("memdiag_guard_fired", None)] == 1 and seen[("memdiag_node_seconds_to_host_limit", None)] == float("inf")


def test_phase_step_and_device_figures_come_from_the_ranks_timeline(tmp_path):
    from memdiag.timeline import TimelineWriter, rank_path
    from memdiag.timeline import format as fmt

    writer = TimelineWriter(rank_path(tmp_path, 0), {"rank": 0})
    writer.write(fmt.sample_batch(t=[1, 2], phase=["forward", "backward"], step=[3, 3], rss_bytes=[5, 6],
                                  device_allocated_bytes=[7, 8], device_reserved_bytes=[9, 10]))
    writer.close()
    m = metrics(tmp_path)
    m.update(sample(1, 1), guard_fired=False)
    seen = scraped(m)
    assert seen[("memdiag_step", "0")] == 3 and seen[("memdiag_device_allocated_bytes", "0")] == 8
    assert seen[("memdiag_device_reserved_bytes", "0")] == 10 and seen[("memdiag_phase_info", "0")] == 1
    text = generate_latest(m.registry).decode()
    assert 'memdiag_phase_info{job="case/run",node="n0",phase="backward",rank="0"} 1.0' in text


def test_the_textfile_for_node_exporter_is_written_whole(tmp_path):
    out = tmp_path / "textfile"
    out.mkdir()
    m = metrics(tmp_path, textfile_dir=out)
    m.update(sample(0, 1), guard_fired=False)
    (written,) = out.glob("*.prom")
    assert written.name == "memdiag_case_run_n0.prom" and "memdiag_host_rss_bytes" in written.read_text()
    assert not list(out.glob("*.tmp*"))


def test_a_port_in_use_is_one_warning_and_metrics_go_on(tmp_path):
    busy = socket.socket()
    busy.bind(("0.0.0.0", 0))
    busy.listen()
    warned: list[str] = []
    m = metrics(tmp_path, warned, port=busy.getsockname()[1])
    assert warned == ["metrics_port"] and m.url is None
    m.update(sample(0, 1), guard_fired=False)  # the snapshot is still kept (the textfile or a later scrape)
    busy.close()
