"""Training data in the benchmark's format: one int64 .npy of token ids.

Item ``i`` is the window ``tokens[i * seq_len : (i + 1) * seq_len]``; labels are the inputs
(the model shifts them). Without a file, a seeded generator yields random ids of the vocabulary.

Make a synthetic token file:  python -m cases.baichuan2_13b.data OUT.npy --tokens 1000000 [--scale 13b]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from memdiag.errors import UsageError


class TokenWindows:
    """Consecutive ``seq_len`` windows of a token file, memory-mapped (never read whole)."""

    def __init__(self, path: str | Path, seq_len: int, vocab_size: int) -> None:
        path = Path(path)
        if not path.is_file():
            raise UsageError(
                f"data file {path} does not exist: tokenise openwebtext into one int64 .npy, or "
                f"make a synthetic one with `python -m cases.baichuan2_13b.data {path}`, "
                "or use data=synthetic"
            )
        try:
            self.tokens = np.load(path, mmap_mode="r")
        except ValueError as exc:
            raise UsageError(f"data file {path} is not a .npy array: {exc}") from None
        if self.tokens.dtype != np.int64 or self.tokens.ndim != 1:
            raise UsageError(
                f"data file {path} holds {self.tokens.dtype} of shape {self.tokens.shape}; "
                "the benchmark format is a 1-D int64 array of token ids"
            )
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        if len(self) == 0:
            raise UsageError(f"data file {path} has fewer than seq_len={seq_len} tokens")

    def __len__(self) -> int:
        return len(self.tokens) // self.seq_len

    def __getitem__(self, index: int) -> torch.Tensor:
        window = np.asarray(self.tokens[index * self.seq_len : (index + 1) * self.seq_len])
        if window.max() >= self.vocab_size or window.min() < 0:
            raise UsageError(
                f"token id {int(window.max())} in window {index} is outside the vocabulary "
                f"({self.vocab_size}); use a model.scale whose vocab_size covers the tokenizer"
            )
        return torch.from_numpy(window.astype(np.int64))


def batches(
    *,
    source: str,
    path: str | None,
    seed: int,
    seq_len: int,
    vocab_size: int,
    micro_batch: int,
    rank: int,
    world_size: int,
) -> Iterator[torch.Tensor]:
    """Micro-batches of ``(micro_batch, seq_len)`` ids; ranks read disjoint windows."""
    if source == "synthetic":
        generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)
        while True:
            yield torch.randint(0, vocab_size, (micro_batch, seq_len), generator=generator)
    if source != "npy" or path is None:
        raise UsageError(f"data.source={source!r}: use data=synthetic or data=openwebtext")
    windows = TokenWindows(path, seq_len, vocab_size)
    index = rank * micro_batch
    while True:
        rows = [windows[(index + i) % len(windows)] for i in range(micro_batch)]
        yield torch.stack(rows)
        index += world_size * micro_batch


def write_synthetic(path: Path, num_tokens: int, vocab_size: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    np.save(path, rng.integers(0, vocab_size, size=num_tokens, dtype=np.int64))


def scale_vocab_size(scale: str) -> int:
    """The vocabulary of a model scale of this case (its conf/model/<scale>.yaml)."""
    import yaml

    path = Path(__file__).resolve().parent / "conf" / "model" / f"{scale}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise SystemExit(f"--scale {scale!r}: use one of {', '.join(options)}")
    return int(yaml.safe_load(path.read_text())["vocab_size"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="write a synthetic token file (benchmark format)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--scale", default="tiny", help="the model.scale the file is for (default tiny, the CPU case); "
                        "its vocabulary bounds the ids")
    parser.add_argument("--vocab-size", type=int, help="ids in 0..N-1 (default: the --scale's vocabulary)")
    args = parser.parse_args(argv)
    vocab = args.vocab_size or scale_vocab_size(args.scale)
    write_synthetic(args.out, args.tokens, vocab)
    print(f"wrote {args.tokens} tokens (ids 0..{vocab - 1}) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
