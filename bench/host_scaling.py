"""Node host RAM of loading against local ranks: the benchmark's loading vs memdiag's lean one.

For 1, 2 and 4 local ranks, ``load=reference`` (every rank builds the whole fp32 model from the
checkpoint, as the benchmark does) against ``load=zero_init`` (partitioned build, each rank
copying its own partition out of the memory-mapped shards), on a ~110M-parameter model loaded
from a sharded bf16 safetensors checkpoint. Prints the node's model-dependent load bytes (per rank: load-phase peak minus RSS
just before the model build; summed over the node) and the node's whole-run peak from the node
watcher (on the CPU accelerator that also holds the training states, so it grows in every mode).

    python bench/host_scaling.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from memdiag.checks.loadphase import run_loads  # noqa: E402
from memdiag.summary import node_watcher_figures  # noqa: E402
from memdiag.timeline import read_run  # noqa: E402

GIB = 2**30
RANKS = (1, 2, 4)
MODES = {"reference": ["load=reference"], "zero_init": ["load=zero_init", "load.trim=true"]}


def make_checkpoint(directory: Path) -> None:
    import torch

    from cases.baichuan2_13b.modeling_baichuan import BaichuanConfig, BaichuanForCausalLM
    from memdiag.config import compose

    model = compose(["model.scale=base"]).model
    torch.manual_seed(0)
    # in bf16, as public checkpoints are: loading it without a dtype (the benchmark) makes fp32 copies
    BaichuanForCausalLM(BaichuanConfig(**{k: v for k, v in model.items() if k != "scale"})).to(torch.bfloat16).save_pretrained(
        directory, max_shard_size="100MB"
    )


def main() -> int:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "ckpt"
        make_checkpoint(checkpoint)
        reports = Path(tmp) / "reports"
        for mode, extra in MODES.items():
            for ranks in RANKS:
                before = set(reports.glob("baichuan2_13b/*"))
                subprocess.run(
                    [
                        sys.executable, "-m", "memdiag", "run", f"reports_dir={reports}", "model.scale=base",
                        "steps=1", "seq_len=64", f"nproc_per_node={ranks}", f"checkpoint={checkpoint}", *extra,
                    ],
                    cwd=REPO,
                    capture_output=True,
                    check=False,
                )
                (run_dir,) = set(reports.glob("baichuan2_13b/*")) - before
                run = read_run(run_dir)
                load_bytes = sum(l.model_bytes for l in run_loads(run))
                node = next(iter(run.nodes.values()))
                whole = node_watcher_figures(node)["rss_sum_peak_bytes"] or 0
                rows.append((mode, ranks, load_bytes, whole))
                print(f"{mode} x{ranks} done", file=sys.stderr)
    print("~110M-parameter model from a sharded safetensors checkpoint; CPU accelerator, ZeRO-3")
    print(f"{'load':10} {'ranks':>5} {'node load bytes (GiB)':>22} {'vs 1 rank':>10} {'node whole-run peak (GiB)':>26}")
    for mode in MODES:
        base = next(r[2] for r in rows if r[0] == mode and r[1] == 1)
        for _, ranks, load_bytes, whole in (r for r in rows if r[0] == mode):
            print(f"{mode:10} {ranks:>5} {load_bytes / GIB:>22.3f} {load_bytes / base:>10.2f} {whole / GIB:>26.3f}")
    lean = {r[1]: r[2] for r in rows if r[0] == "zero_init"}
    print(f"target: zero_init at 4 ranks within 1.3x of 1 rank: {lean[4] / lean[1]:.2f}x "
          f"({'met' if lean[4] <= 1.3 * lean[1] else 'NOT met'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
