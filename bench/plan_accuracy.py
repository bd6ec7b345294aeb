"""The planner's terms against measured runs, in sample and out of sample.

Runs the CPU case at two sizes (tiny ~12M, base ~110M parameters) on 1, 2 and 4 ranks, then
compares every term memdiag plan predicts with what the runs measured: model states per rank
(categorised memory), saved activations (saved_tensors_hooks), the node's load-phase host peak
and its whole-run host peak. The empirical host coefficients are fitted on all runs (in sample)
and, for the headline, on all runs but the one predicted (leave one out).

    python bench/plan_accuracy.py [--runs DIR ...]     # reuse recorded runs instead of running
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from memdiag.plan.calibrate import fit, observe, predict  # noqa: E402
from memdiag.plan.terms import Coefficients  # noqa: E402
from memdiag.timeline import read_run  # noqa: E402

RUNS = [("tiny", 1), ("tiny", 2), ("tiny", 4), ("base", 1), ("base", 2), ("base", 4)]
TARGET = 0.05
TERMS = ("parameters", "gradients", "optimizer_states", "saved_activations", "host_load_per_node", "host_peak_per_node")


def make_runs(reports: Path) -> list[Path]:
    dirs = []
    for scale, ranks in RUNS:
        before = set(reports.glob("baichuan2_13b/*"))
        subprocess.run(
            [sys.executable, "-m", "memdiag", "run", f"reports_dir={reports}", f"model.scale={scale}",
             f"nproc_per_node={ranks}", "steps=4", "seq_len=128"],
            cwd=REPO, capture_output=True, check=True,
        )
        (run_dir,) = set(reports.glob("baichuan2_13b/*")) - before
        dirs.append(run_dir)
        print(f"{scale} x{ranks}: {run_dir.name}", file=sys.stderr)
    return dirs


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", nargs="+", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = args.runs or make_runs(Path(tmp) / "reports")
        observations = [observe(read_run(d)) for d in dirs]
    in_sample = fit(observations, Coefficients())
    errors: dict[str, list[float]] = {t: [] for t in TERMS}
    print(f"{'run':22} {'term':20} {'measured':>10} {'in sample':>10} {'err':>7} {'left out':>10} {'err':>7}")
    for i, obs in enumerate(observations):
        others = observations[:i] + observations[i + 1 :]
        held_out = fit(others, Coefficients())
        p_in, p_out = predict(obs, in_sample), predict(obs, held_out)
        label = f"{obs.arch.name.split()[-1]} {obs.world} rank(s)"
        for term in TERMS:
            measured = obs.measured[term]
            e_in, e_out = (p_in[term] - measured) / measured, (p_out[term] - measured) / measured
            errors[term].append(e_out)
            print(f"{label:22} {term:20} {measured / 2**20:8.1f}Mi {p_in[term] / 2**20:8.1f}Mi {e_in:+7.1%} {p_out[term] / 2**20:8.1f}Mi {e_out:+7.1%}")
    print(f"\nfitted on all {len(observations)} runs: host_runtime {in_sample.host_runtime_bytes / 2**20:.1f} MiB, "
          f"host_state_factor {in_sample.host_state_factor:.3f}, host_bytes_per_model_param {in_sample.host_bytes_per_model_param:.2f}, "
          f"host_rank_fixed {in_sample.host_rank_fixed_bytes / 2**20:.1f} MiB")
    print("worst error, each run predicted from the others (leave one out):")
    for term, values in errors.items():
        worst = max(abs(v) for v in values)
        print(f"  {term:20} {worst:6.1%}  {'within' if worst <= TARGET else 'NOT within'} {TARGET:.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
