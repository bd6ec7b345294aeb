"""Host RAM of DataLoader workers, measured: what a forked worker of a torch process holds of its
own (PSS: the pages it shares with its rank are split between them), with the dataset held as
Python objects (lists of token ids: each worker's reads update reference counts, so it copies the
pages it touches) and as one numpy array (only the array object's header is touched).

One process per dataset form, like a rank: build the dataset, iterate one epoch with
``DataLoader(num_workers=W, persistent_workers=True)`` (fork, Linux's default), then read the
workers' PSS and RSS from /proc while they are still alive. Beside it memdiag's term.

    python bench/dataloader_workers.py [--dataset-mb 256] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

WORKER = r"""
import json, sys
import numpy as np, psutil, torch
from torch.utils.data import DataLoader, Dataset

form, megabytes, workers, epochs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
SEQ = 512
rows = megabytes * 2**20 // (SEQ * 8)  # int64 ids: the numpy array's bytes
if form == "python":
    data = [list(range(i, i + SEQ)) for i in range(rows)]
    held = sum(sys.getsizeof(r) + sum(sys.getsizeof(x) for x in r) for r in data[:100]) / 100 * rows
else:
    data = np.arange(rows * SEQ, dtype=np.int64).reshape(rows, SEQ)
    held = data.nbytes

class Tokens(Dataset):
    def __len__(self):
        return rows
    def __getitem__(self, i):
        return torch.tensor(data[i])

loader = DataLoader(Tokens(), batch_size=8, num_workers=workers, persistent_workers=True, shuffle=True)
for _ in range(epochs):
    for _ in loader:
        pass
children = psutil.Process().children()
memory = [c.memory_full_info() for c in children]
print(json.dumps({"form": form, "dataset_bytes": held, "workers": len(children),
                  "worker_pss_bytes": [m.pss for m in memory], "worker_rss_bytes": [m.rss for m in memory],
                  "worker_uss_bytes": [m.uss for m in memory],
                  "rank_rss_bytes": psutil.Process().memory_info().rss}), flush=True)
"""


def measure(form: str, megabytes: int, workers: int, epochs: int = 1, timeout_s: float = 600) -> dict:
    done = subprocess.run([sys.executable, "-c", WORKER, form, str(megabytes), str(workers), str(epochs)],
                          capture_output=True, text=True, timeout=timeout_s)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"dataloader worker bench ({form}) failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(lines[-1])


def memdiag_worker_bytes(row: dict, epochs: int) -> float:
    """memdiag's bytes of one worker's own after ``epochs`` (the planner's term takes the long run)."""
    from memdiag.plan.terms import Coefficients, worker_copied_bytes

    copied = worker_copied_bytes(row["dataset_bytes"], row["workers"], epochs) if row["form"] == "python" else 0.0
    return Coefficients().host_dataloader_worker_bytes + copied


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset-mb", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    print(f"DataLoader workers (fork, persistent), {args.workers} per rank, {args.dataset_mb} MiB of token ids; per worker:")
    print(f"  {'held as':8} {'epochs':>6} {'dataset':>10} {'USS':>9} {'memdiag':>9} {'PSS':>9} {'RSS':>9}")
    for form, epochs in (("numpy", 1), ("python", 1), ("python", 3)):
        row = measure(form, args.dataset_mb, args.workers, epochs)
        uss, pss, rss = (sum(row[f"worker_{k}_bytes"]) / row["workers"] / 2**20 for k in ("uss", "pss", "rss"))
        print(f"  {form:8} {epochs:6d} {row['dataset_bytes'] / 2**20:6.0f} MiB {uss:5.0f} MiB "
              f"{memdiag_worker_bytes(row, epochs) / 2**20:5.0f} MiB {pss:5.0f} MiB {rss:5.0f} MiB")
    print("  USS: what the worker adds to the node; memdiag: host_dataloader_worker_bytes plus what it has copied of a\n"
          "  dataset held as Python objects (dataloader.dataset_bytes; the planner takes the long run: all of it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
