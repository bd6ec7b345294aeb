"""A rank that starts the processes ranks start: DataLoader workers forked and spawned (each
holds CHILD_MB of its own from its worker_init_fn), and a Python subprocess (as DeepSpeed's op
builder runs). Once every child holds its memory, the rank reads what /proc says of all its
descendants (RSS and PSS, psutil) and prints it as one JSON line with the time, holds them a while
longer (for the node watcher's samples around that moment), then lets them go.

    memdiag run -- torchrun --nproc_per_node 2 rank_children.py
"""

import json
import os
import subprocess
import sys
import time

import psutil
import torch
from torch.utils.data import DataLoader, Dataset

CHILD_MB = 64
HELD = []


def hold(_worker_id: int) -> None:
    block = bytearray(CHILD_MB * 2**20)
    for i in range(0, len(block), 4096):
        block[i] = 1  # touched: resident, the worker's own
    HELD.append(block)


class Items(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int):
        return torch.tensor([index])


def main() -> None:
    rank = os.environ.get("RANK")
    loaders = [DataLoader(Items(), batch_size=2, num_workers=1, persistent_workers=True, worker_init_fn=hold,
                          multiprocessing_context=method) for method in ("fork", "spawn")]
    batches = [iter(loader) for loader in loaders]
    for batch in batches:
        next(batch)  # the worker has run its init: it holds its block
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    time.sleep(1.5)  # settled: what the children hold no longer changes
    rss = pss = 0
    for child in psutil.Process().children(recursive=True):
        try:
            info = child.memory_full_info()
        except psutil.Error:
            continue
        rss, pss = rss + info.rss, pss + info.pss
    print(json.dumps({"rank": int(rank or 0), "t": time.time_ns(), "children_rss_bytes": rss, "children_pss_bytes": pss,
                      "pids": [os.getpid(), helper.pid]}), flush=True)
    time.sleep(2.5)  # the watcher samples PSS once a second: some land in this window
    del batches, loaders
    helper.kill()
    helper.wait()
    print(f"rank {rank} done", flush=True)


if __name__ == "__main__":
    main()
