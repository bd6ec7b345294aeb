"""Run a bench's rank script as one real rank (torchrun, DeepSpeed's CPU accelerator with gloo
unless the machine has a GPU) and read the JSON lines it prints: what the ZeRO benches measure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def json_lines(script: Path, *args: str, timeout_s: float = 900) -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", str(script), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not records:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return records
