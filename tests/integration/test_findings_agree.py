"""Findings that agree with the run and with each other, on real runs of the default (tiny)
CPU case: the cross-run fit judged against the model's own copy size, forecasts that do not
depend on the rank count of the run they come from, and fixes that name only what the run
shows."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.scale=tiny", "steps=2", "seq_len=64"]


def memdiag(*args):
    return subprocess.run([sys.executable, "-m", "memdiag", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    reports = tmp_path_factory.mktemp("agree")
    made = {}
    for load, ranks in (("reference", 1), ("reference", 2), ("reference", 4), ("zero_init", 1), ("zero_init", 2)):
        before = set(reports.glob("baichuan2_13b/*"))
        result = memdiag("run", f"reports_dir={reports}", *TINY, f"load={load}", f"nproc_per_node={ranks}")
        assert result.returncode in (0, 1), result.stdout[-2000:] + result.stderr[-2000:]
        (run_dir,) = set(reports.glob("baichuan2_13b/*")) - before
        made[load, ranks] = run_dir
    return made


def findings_of(*run_dirs, extra=()):
    result = memdiag("check", "--json", *extra, *run_dirs)
    return json.loads(result.stdout)


def test_a_copy_per_rank_is_the_5290_pattern_at_the_tiny_scale(runs):
    """Was: "grows 47.67 MiB per local rank (1.08x an fp32 copy) ... flat enough", because a
    fixed 96 MiB floor hid a 46 MiB model."""
    fit = next(f for f in findings_of(*(runs["reference", r] for r in (1, 2, 4))) if f["id"] == "scaling_5290_fit")
    assert fit["severity"] == "error", fit["message"]
    assert 0.8 < fit["evidence"]["slope_bytes_per_rank"] / fit["evidence"]["fp32_full_model_bytes"] < 1.6
    assert fit["evidence"]["noise_floor_bytes"] < fit["evidence"]["slope_bytes_per_rank"]
    assert "noise floor" in fit["message"] and "bf16 copy" in fit["message"]
    lean = next(f for f in findings_of(runs["zero_init", 1], runs["zero_init", 2]) if f["id"] == "scaling_5290_fit")
    assert lean["severity"] != "error" and not lean["fix"]  # partitioned at deepspeed.initialize: not 5290


def test_forecasts_from_one_and_two_rank_runs_agree(runs):
    """Was: 1 rank "16+ ranks exceed", 2 ranks "up to 16 ranks fit" for the same model and
    loading (the 1-rank run's unpartitioned training state was extrapolated linearly)."""
    tables = []
    for ranks in (1, 2):
        forecast = next(f for f in findings_of(runs["zero_init", ranks]) if f["id"] == "host_limit_forecast")
        tables.append(forecast["evidence"]["node_peak_bytes_by_local_ranks"])
    for k in ("8", "16"):
        assert tables[0][k] == pytest.approx(tables[1][k], rel=0.15), (k, tables)


def test_the_fix_names_only_what_the_run_shows(runs):
    """Was: a zero_init run over a 1G limit was told to build under zero.Init and to see a
    scaling_5290 finding that did not exist."""
    findings = findings_of(runs["zero_init", 2], extra=("--host-ram", "1G"))
    limit = next(f for f in findings if f["id"] == "host_limit")
    assert "scaling_5290" not in {f["id"] for f in findings}
    assert "zero.Init" not in limit["fix"] and "scaling_5290" not in limit["fix"]
    reference = findings_of(runs["reference", 2], extra=("--host-ram", "1G"))
    assert "scaling_5290" in {f["id"] for f in reference}


def test_no_scaling_error_from_a_single_rank(runs):
    findings = findings_of(runs["reference", 1])
    assert not [f for f in findings if f["id"].startswith("scaling_5290") and f["severity"] == "error"]


def test_the_5290_finding_and_the_forecast_quote_one_answer(runs):
    """Was: scaling_5290 "8 ranks per node still fit" beside host_limit_forecast "up to 16 ranks
    per node fit" for the same run: now both quote the one forecast."""
    first = findings_of(runs["reference", 2])
    table = next(f for f in first if f["id"] == "host_limit_forecast")["evidence"]["node_peak_bytes_by_local_ranks"]
    limit_k = (table["4"] + table["8"]) // 2 // 1024  # 4 ranks a node fit, 8 do not
    findings = findings_of(runs["reference", 2], extra=("--host-ram", f"{limit_k}K"))
    forecast = next(f for f in findings if f["id"] == "host_limit_forecast")["message"]
    pattern = next(f for f in findings if f["id"] == "scaling_5290")["message"]
    for said in ("up to 4 ranks per node fit in", "8 ranks exceed it by"):
        assert said in forecast and said in pattern, (forecast, pattern)


def test_a_compacted_run_reads_and_judges_as_its_jsonl_did(runs, tmp_path):
    """The same real run twice: as its ranks wrote it (JSONL) and moved into Parquet by
    `memdiag report` with timeline.columnar=always; summary and findings must not change."""
    import shutil

    original = runs["reference", 2]
    copy = tmp_path / original.name
    shutil.copytree(original, copy)
    spec = json.loads((copy / "run.json").read_text())
    spec["config"]["timeline_columnar"] = "always"
    (copy / "run.json").write_text(json.dumps(spec))
    result = memdiag("report", copy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(".samples.parquet and rank-") == 2, result.stdout  # both ranks, one line each
    for rank in (0, 1):
        lines = (copy / "timeline" / f"rank-{rank}.jsonl").read_text().splitlines()
        assert [json.loads(line)["kind"] for line in lines] == ["header", "columnar"]
        assert (copy / "timeline" / f"rank-{rank}.samples.parquet").stat().st_size > 0
    # sampler=watcher: the ranks' samples were the node file's; they moved with their ranks, and
    # the node's own samples into its Parquet (wide: a column per rank and figure)
    import pyarrow.parquet as pq

    (node_file,) = (copy / "timeline").glob("node-*.jsonl")
    kinds = [json.loads(line)["kind"] for line in node_file.read_text().splitlines()]
    assert kinds[:2] == ["header", "columnar"] and "sample" not in kinds and "rank_samples" not in kinds
    table = pq.read_table(node_file.with_name(node_file.name.replace(".jsonl", ".samples.parquet")))
    assert {"t_ns", "mem_available_bytes", "rank_0_rss_bytes", "rank_1_pss_bytes", "keep", "seq"} <= set(table.column_names)
    ours, theirs = (json.loads((d / "summary.json").read_text()) for d in (original, copy))
    assert {k: v for k, v in theirs.items() if k != "problems"} == {k: v for k, v in ours.items() if k != "problems"}
    where = lambda findings: [{k: v for k, v in f.items() if k != "run"} for f in findings]  # noqa: E731 - the run's path
    assert where(findings_of(copy)) == where(findings_of(original))


def test_each_node_watcher_compacts_its_ranks_files_when_they_exit(tmp_path):
    """timeline.columnar=always: the node watcher moves the rank files into Parquet once its ranks
    have exited (its lines in the launcher log), so the report reads Parquet and compacts nothing."""
    result = memdiag("run", f"reports_dir={tmp_path}", *TINY, "nproc_per_node=2", "timeline.columnar=always")
    assert result.returncode in (0, 1), result.stdout[-2000:] + result.stderr[-2000:]
    (run_dir,) = tmp_path.glob("baichuan2_13b/*")
    log = (run_dir / "logs" / "launcher.log").read_text()
    for rank in (0, 1):
        assert f"rank-{rank}.jsonl -> rank-{rank}.samples.parquet and rank-{rank}.events.parquet" in log, log[-3000:]
        kinds = [json.loads(line)["kind"] for line in (run_dir / "timeline" / f"rank-{rank}.jsonl").read_text().splitlines()]
        assert kinds == ["header", "columnar"]
    assert "node-" in log and ".jsonl -> node-" in log, log[-3000:]  # the node's own file too
    assert ".samples.parquet" not in result.stdout  # nothing left for the report to compact
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and set(summary["host_peak_bytes_per_rank"]) == {"0", "1"}
