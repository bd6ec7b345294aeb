"""The node watcher's Prometheus endpoint scraped during a real 2-rank run: the names and labels
a cluster's dashboards expect, and the host figures equal to the node timeline's sample of the
same moment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]


def test_the_endpoint_serves_the_node_timelines_figures_during_a_run(tmp_path):
    run = subprocess.Popen([sys.executable, "-m", "memdiag", "run", "steps=60", "seq_len=64", f"reports_dir={tmp_path}",
                            "metrics_port=0"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=os.environ | {"PYTHONPATH": str(REPO)})
    try:
        scrapes = []
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and run.poll() is None and len(scrapes) < 3:
            node_files = list(tmp_path.glob("baichuan2_13b/*/timeline/node-*.jsonl"))
            if not node_files:
                time.sleep(0.5)
                continue
            url = json.loads(node_files[0].read_text().splitlines()[0])["metrics_url"]
            port = url.rsplit(":", 1)[1].split("/")[0]
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
            families = {f.name: f for f in text_string_to_metric_families(text)}
            steps = [s.value for s in families["memdiag_step"].samples]
            if len(steps) == 2 and min(steps) >= 1:  # both ranks are training
                scrapes.append((node_files[0], families))
            time.sleep(1.0)
        output = run.communicate(timeout=600)[0]
    finally:
        run.kill()
    assert run.returncode == 0, output[-3000:]
    assert len(scrapes) == 3, output[-3000:]
    for node_file, families in scrapes:
        t_s = families["memdiag_sample_timestamp_seconds"].samples[0].value
        records = [json.loads(line) for line in node_file.read_text().splitlines()]
        (sample,) = [r for r in records if r["kind"] == "sample" and abs(r["t"] / 1e9 - t_s) < 1e-6]
        rss = {s.labels["rank"]: s.value for s in families["memdiag_host_rss_bytes"].samples}
        assert rss == {rank: entry["rss_bytes"] for rank, entry in sample["ranks"].items()}
        assert families["memdiag_node_memory_available_bytes"].samples[0].value == sample["mem_available_bytes"]
        total = sum(e["rss_bytes"] + e.get("children_rss_bytes", 0) for e in sample["ranks"].values())  # 1.7: none without children
        assert families["memdiag_node_ranks_rss_bytes"].samples[0].value == total
        for family in ("memdiag_host_rss_bytes", "memdiag_device_allocated_bytes", "memdiag_step"):
            assert {tuple(sorted(s.labels)) for s in families[family].samples} == {("job", "node", "rank")}
        job = families["memdiag_host_rss_bytes"].samples[0].labels["job"]
        assert job.startswith("baichuan2_13b/") and job.endswith("-1x2")
        assert {s.labels["phase"] for s in families["memdiag_phase_info"].samples} <= {"forward", "backward", "step",
                                                                                   "optimizer_step", "train", "data"}
