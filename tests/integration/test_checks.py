"""Every check fires on a real run made to show its problem, and stays quiet on a healthy one.

The 5290 runs use a ~110M-parameter model (`model.scale=base`): big enough that a full fp32
copy per rank (~0.44 GB) stands far above allocator noise, small enough for two CPU cores.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BASE = ["model.scale=base", "steps=1", "seq_len=64"]


def memdiag(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "memdiag", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_case(reports: Path, *overrides) -> Path:
    before = set(reports.glob("baichuan2_13b/*"))
    result = memdiag("run", f"reports_dir={reports}", *overrides)
    (run_dir,) = set(reports.glob("baichuan2_13b/*")) - before
    return run_dir, result


def check(*run_dirs, extra=()):
    result = memdiag("check", "--json", *extra, *run_dirs)
    return result.returncode, json.loads(result.stdout)


def ids(findings, severity=("error", "warning")):
    return {f["id"] for f in findings if f["severity"] in severity}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    return tmp_path_factory.mktemp("check-reports")


@pytest.fixture(scope="module")
def healthy(reports):
    run_dir, result = run_case(reports, "steps=40")  # long enough for the allocator to settle
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir


@pytest.fixture(scope="module")
def reference_runs(reports):
    runs = {}
    for ranks in (1, 2, 4):
        run_dir, result = run_case(reports, *BASE, "load=reference", f"nproc_per_node={ranks}")
        assert result.returncode in (0, 1), result.stderr  # 1: findings with errors
        runs[ranks] = run_dir
    return runs


@pytest.fixture(scope="module")
def zero_init_base(reports):
    run_dir, result = run_case(reports, *BASE, "nproc_per_node=2")
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir


def test_healthy_run_is_quiet(healthy):
    code, findings = check(healthy)
    assert code == 0
    assert ids(findings) == set(), findings
    assert (healthy / "findings.json").exists()


def test_host_limit_fires_against_a_smaller_limit(healthy):
    code, findings = check(healthy, extra=("--host-ram", "1G"))
    assert code == 1
    limit = next(f for f in findings if f["id"] == "host_limit")
    assert limit["severity"] == "error" and limit["evidence"]["limit_bytes"] == 2**30
    forecast = next(f for f in findings if f["id"] == "host_limit_forecast")
    assert forecast["evidence"]["over_limit_bytes_by_local_ranks"]


def test_5290_fires_on_reference_loading_with_the_cause(reference_runs):
    _, findings = check(reference_runs[2])
    finding = next(f for f in findings if f["id"] == "scaling_5290")
    causes = " ".join(finding["evidence"]["causes"])
    assert "outside deepspeed.zero.Init" in causes and "float32" in causes
    assert finding["evidence"]["built_by"] == "constructor" and "deepspeed.zero.Init" in finding["fix"]
    n = finding["evidence"]["num_parameters"]
    assert all(b > 0.9 * 4 * n for b in finding["evidence"]["materialised_bytes_by_rank"].values())  # a whole fp32 copy per rank
    # 8 such ranks fit this machine's RAM: a warning; on a node that cannot hold them, an error
    assert finding["severity"] == "warning"
    code, findings = check(reference_runs[2], extra=("--host-ram", "4G"))
    assert code == 1 and next(f for f in findings if f["id"] == "scaling_5290")["severity"] == "error"
    _, findings = check(reference_runs[1], extra=("--host-ram", "4G"))  # one local rank: a forecast, never an error
    assert next(f for f in findings if f["id"] == "scaling_5290")["severity"] == "warning"


def test_5290_quiet_under_zero_init(zero_init_base):
    _, findings = check(zero_init_base)
    assert "scaling_5290" not in ids(findings)


def test_5290_fit_across_rank_counts(reference_runs):
    code, findings = check(*reference_runs.values())
    fit = next(f for f in findings if f["id"] == "scaling_5290_fit")
    assert fit["severity"] == "error" and code == 1
    per_rank = fit["evidence"]["slope_bytes_per_rank"]
    assert 0.8 < per_rank / fit["evidence"]["fp32_full_model_bytes"] < 1.5


def test_not_released_fires_without_trim_and_not_with_it(reports, reference_runs):
    _, findings = check(reference_runs[1])
    kept = next(f for f in findings if f["id"] == "not_released")
    assert kept["evidence"]["malloc_free_bytes"] > 128 * 2**20
    # what loading allocated, by line (the load phase's stacks, captured by default): the model's build
    assert "top stacks at rank 0's load peak" in kept["message"] and kept["evidence"]["top_stacks"]
    assert kept["evidence"]["top_stacks"][0]["file"].endswith(".py")
    run_dir, result = run_case(reports, *BASE, "load=reference", "nproc_per_node=1", "load.trim=true")
    _, findings = check(run_dir)
    assert "not_released" not in ids(findings)
    events = [json.loads(l) for l in (run_dir / "timeline" / "rank-0.jsonl").read_text().splitlines() if '"malloc"' in l]
    before, after = events[0], events[-1]  # the effect of gc + malloc_trim, measured
    assert after["after"] == "load_trim"
    assert after["rss_before_trim_bytes"] - after["rss_bytes"] > 0.5 * before["free_bytes"]
    released = next(f for f in findings if f["id"] == "not_released")
    assert released["severity"] == "info" and released["evidence"]["released_bytes"] > 128 * 2**20


def test_leak_fires_on_an_injected_leak(reports):
    # 64 MB a step (~8% of a rank's RSS): a smaller leak is first absorbed by glibc's free
    # chunks, so RSS grows slower than the leak until they are used up
    run_dir, result = run_case(reports, "steps=16", "inject_leak_mb=64")
    assert "leak_host" in result.stdout  # `memdiag run` prints its findings at the end
    _, findings = check(run_dir)
    leak = next(f for f in findings if f["id"] == "leak_host")
    assert 32 * 2**20 < leak["evidence"]["slope_bytes_per_step"] < 96 * 2**20


def test_device_headroom_fires_against_a_small_device(reports):
    run_dir, _ = run_case(reports, "steps=2", "hardware.device_memory=512M")
    _, findings = check(run_dir)
    assert "device_headroom" in ids(findings)


def test_guard_stops_an_over_limit_run_with_stacks(tmp_path):
    """Started from the user's own directory (not the checkout) with a relative reports_dir:
    the guard's stop, its stacks and the run directory all land there."""
    import os

    # the plan refuses this layout at this limit; force=true reproduces the OOM on purpose
    result = subprocess.run(
        [sys.executable, "-m", "memdiag", "run", "reports_dir=mine", "steps=50", "host_ram=900M", "guard.grace_s=5", "force=true"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=os.environ | {"PYTHONPATH": str(REPO)},
    )
    (run_dir,) = (tmp_path / "mine" / "baichuan2_13b").iterdir()
    assert not (REPO / "mine").exists() and not list(REPO.glob("reports/baichuan2_13b/*/stacks"))
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "guard" in result.stdout and "[ERROR] oom_guard" in result.stdout  # a finding, on the console
    spec = json.loads((run_dir / "run.json").read_text())
    assert spec["status"] == "stopped_by_guard"
    stacks = list((run_dir / "stacks").glob("rank-*.txt"))
    assert len(stacks) == 2 and all("Thread" in s.read_text() for s in stacks)
    _, findings = check(run_dir)
    guard = next(f for f in findings if f["id"] == "oom_guard")
    assert guard["severity"] == "error" and guard["moments"]
    html = (run_dir / "report.html").read_text()
    assert "stopped the run" in html
    for rank in (0, 1):  # the timelines were flushed on SIGTERM and end after the guard
        lines = (run_dir / "timeline" / f"rank-{rank}.jsonl").read_text().splitlines()
        last = json.loads(lines[-1])["t"]  # a sample batch holds a list of times
        assert max(last if isinstance(last, list) else [last]) >= guard["moments"][0]["t"] - 2e9


def test_comparison_page_of_reference_and_zero_init(tmp_path, reference_runs, zero_init_base):
    out = tmp_path / "compare.html"
    result = memdiag("report", reference_runs[2], zero_init_base, "--out", out)
    assert result.returncode == 0, result.stderr
    html = out.read_text()
    rows = {name: diff for name, _, diff in re.findall(r"<tr><td>([a-z_]+)</td><td>([^<]+)</td><td>[^<]+</td><td>([^<]+)</td></tr>", html)}
    assert {"model_build", "ds_initialize", "train"} <= set(rows)
    assert rows["model_build"].startswith("-")  # zero_init loads with less node host RAM than reference
    assert 'data-figure="compare"' in html.replace("'", '"')


def test_the_planned_host_peak_is_within_10_percent_or_the_report_says_it_is_not(reports, healthy, reference_runs, zero_init_base):
    """Default coefficients against real CPU runs (tiny and base, 1, 2 and 4 ranks): within 10% of
    the node's measured peak, or the report's plan panel marks the gap and names the term.

    The node's true peak is bracketed, not known: the highest sum of the ranks' sampled RSS is
    at most it (the ranks' peaks fall between samples), the sum of the ranks' exact peaks
    (VmHWM per phase) at least it. Run to run the first moves by several percent on this
    machine, so the plan counts as within 10% when it is within 10% of that bracket."""
    from memdiag.plan.calibrate import observe, predict
    from memdiag.plan.terms import Coefficients
    from memdiag.summary import summarize
    from memdiag.timeline import read_run

    within = 0
    errors = []
    for run_dir in (healthy, *reference_runs.values(), zero_init_base):
        run = read_run(run_dir)
        observation = observe(run)
        planned = predict(observation, Coefficients())["host_peak_per_node"]
        sampled = observation.measured["host_peak_per_node"]
        exact_sum = sum(summarize(run).host_peak_bytes_per_rank.values())  # these runs are one node
        low, high = min(sampled, exact_sum), max(sampled, exact_sum)
        error = (planned - sampled) / sampled
        errors.append((run_dir.name, round(error, 3), round((exact_sum - sampled) / sampled, 3)))
        html = (run_dir / "report.html").read_text()
        if abs(error) <= 0.10:
            assert "host_peak_per_node is" not in html
        else:
            assert "The plan misses this run" in html and "host_peak_per_node is" in html, (run_dir.name, error)
        within += 0.9 * low <= planned <= 1.1 * high
    assert within >= 3, errors  # the fitted defaults hold for most of them


def test_a_slow_leak_over_a_long_run_is_flagged_with_the_time_to_the_limit(reports):
    """9 MB a step, about 1% of a rank's RSS (under the 2% a short window needs), over 200 steps:
    judged against the run's own noise it is a leak, with when the node would reach its limit."""
    run_dir, result = run_case(reports, "steps=200", "seq_len=64", "inject_leak_mb=9", "host_ram=8G")
    assert result.returncode in (0, 1), result.stdout[-2000:] + result.stderr[-2000:]
    _, findings = check(run_dir)
    leak = next(f for f in findings if f["id"] == "leak_host")
    assert 5 * 2**20 < leak["evidence"]["slope_bytes_per_step"] < 13 * 2**20, leak
    assert leak["evidence"]["slope_bytes_per_step"] < 0.02 * leak["evidence"]["first_bytes"]  # the short-window rule misses it
    assert leak["evidence"]["steps_to_host_limit"] > 0
    assert "reaches its 8.00 GiB host limit in about" in leak["message"]


@pytest.mark.parametrize("text, said", [("[1, 2]", "run.json holds a JSON list, not an object"),
                                        ('{"status": ', "run.json is not valid JSON")])
def test_a_run_whose_run_json_is_broken_cannot_be_judged_but_its_report_is_written(tmp_path, healthy, text, said):
    """Timelines intact, run.json garbled or of the wrong shape: check says so in one line and
    exits 2 (the host limit is unknown); report still draws what was recorded."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(healthy, broken)
    (broken / "run.json").write_text(text)
    result = memdiag("check", broken)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stdout + result.stderr
    assert sum(said in line and "cannot_judge" in line for line in result.stdout.splitlines()) == 1
    result = memdiag("report", broken)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert said in (broken / "report.html").read_text()
