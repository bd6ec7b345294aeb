"""A rank that raises at step 2 (the other finishes its steps): what a failed run must explain.

    memdiag run -- torchrun --nproc_per_node 2 raise_at_step.py
"""

import os
import time


def train_step(step: int) -> None:
    if os.environ.get("RANK") == "1" and step == 2:
        raise ValueError(f"bad batch at step {step}")  # the line the finding must name
    time.sleep(0.2)


def main() -> None:
    for step in range(1, 4):
        train_step(step)
        print(f"rank {os.environ.get('RANK')} step {step}", flush=True)


if __name__ == "__main__":
    main()
