"""A rank that starts the processes ranks start: a forked and a spawned multiprocessing worker
(as DataLoader workers are), each holding CHILD_MB of its own, and a Python subprocess (as
DeepSpeed's op builder runs). Once every child holds its memory, the rank reads what /proc says
of all its descendants (RSS and PSS, psutil) and prints it as one JSON line with the time, holds
them a while longer (for the node watcher's samples around that moment), then lets them go.

    memdiag run -- torchrun --nproc_per_node 2 rank_children.py
"""

import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

import psutil

CHILD_MB = 64


def hold(ready, release) -> None:
    block = bytearray(CHILD_MB * 2**20)
    for i in range(0, len(block), 4096):
        block[i] = 1  # touched: resident, the child's own
    ready.set()
    release.wait(120)


def main() -> None:
    rank = os.environ.get("RANK")
    events = []
    workers = []
    for method in ("fork", "spawn"):
        context = mp.get_context(method)
        ready, release = context.Event(), context.Event()
        events.append((ready, release))
        workers.append(context.Process(target=hold, args=(ready, release)))
    for worker in workers:
        worker.start()
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    for ready, _ in events:
        ready.wait(120)
    time.sleep(1.5)  # settled: what the children hold no longer changes
    rss = pss = 0
    for child in psutil.Process().children(recursive=True):
        try:
            info = child.memory_full_info()
        except psutil.Error:
            continue
        rss, pss = rss + info.rss, pss + info.pss
    print(json.dumps({"rank": int(rank or 0), "t": time.time_ns(), "children_rss_bytes": rss, "children_pss_bytes": pss,
                      "pids": [os.getpid(), *(w.pid for w in workers), helper.pid]}), flush=True)
    time.sleep(2.5)  # the watcher samples PSS once a second: some land in this window
    for _, release in events:
        release.set()
    for worker in workers:
        worker.join()
    helper.kill()
    helper.wait()
    print(f"rank {rank} done", flush=True)


if __name__ == "__main__":
    main()
