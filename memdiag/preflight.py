"""Checks made before anything launches: every path a run was given, the nodes it will reach,
and the token file against the model's vocabulary. Each failure is one line (UsageError, exit
2) and nothing is written; none of them imports torch or DeepSpeed."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from memdiag.errors import UsageError

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
SSH_TIMEOUT_S = 10
TOKEN_SAMPLE = 1 << 20
"""Token ids read to check the vocabulary: the head, the tail and spots in between."""


def writable_dir(path: str | Path, name: str) -> Path:
    """A directory memdiag will write into (made if missing): not a file, and writable at
    the deepest part that exists."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{name}={path} is a file, not a directory: give a directory to write into")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{name}={path}: {existing} is a file, so the directory cannot be made")
    # try it: permission bits do not bind root, and a read-only mount or /proc only shows on a write
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise UsageError(f"{name}={path}: {existing} is not writable ({exc.strerror or exc}); choose a directory you can write to") from None
    return path


def writable_file(path: str | Path, name: str) -> Path:
    """A file memdiag will write (its directory made if missing)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{name} {path} is a directory: give a file name, e.g. {path / 'compare.html'}")
    writable_dir(path.parent, name)
    return path


def checkpoint_dir(path: str | Path) -> None:
    """An HF checkpoint directory: config.json, and an index whose shards all exist (or one
    weights file)."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"checkpoint={path}: no such directory (give a local Hugging Face checkpoint directory)")
    if not path.is_dir():
        raise UsageError(f"checkpoint={path} is a file: give the directory that holds config.json and the weights")
    if not (path / "config.json").is_file():
        raise UsageError(f"checkpoint={path} holds no config.json: not a Hugging Face checkpoint directory")
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = path / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                shards = set(weight_map.values())
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise UsageError(f"checkpoint={path}: {index_name} is not a valid shard index ({exc!r})") from None
            missing = sorted(s for s in shards if not (path / s).is_file())
            if missing:
                raise UsageError(f"checkpoint={path}: {index_name} lists {missing[0]}, which is missing ({len(missing)} of {len(shards)} shards missing)")
            return
    if not any((path / name).is_file() for name in SINGLE_FILES):
        raise UsageError(f"checkpoint={path} holds no {SAFE_INDEX}, {BIN_INDEX} or {' / '.join(SINGLE_FILES)}")


def token_file(path: str | Path, *, vocab_size: int, seq_len: int) -> None:
    """The benchmark's token format (one int64 .npy), long enough for one window, and ids
    within the model's vocabulary on a sample of the file."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise UsageError(
            f"data.path={path}: no such file; make one with `python -m cases.baichuan2_13b.data {path} "
            "--vocab-size V` or use data=synthetic"
        )
    try:
        tokens = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as exc:
        raise UsageError(f"data.path={path} is not a .npy array ({exc})") from None
    if tokens.dtype != np.int64 or tokens.ndim != 1:
        raise UsageError(f"data.path={path} holds {tokens.dtype} of shape {tokens.shape}; the format is a 1-D int64 array of token ids")
    if len(tokens) < seq_len:
        raise UsageError(f"data.path={path} has {len(tokens)} tokens, fewer than seq_len={seq_len}")
    spots = np.linspace(0, max(len(tokens) - TOKEN_SAMPLE // 8, 0), 8).astype(np.int64)
    sample = np.concatenate([np.asarray(tokens[s : s + TOKEN_SAMPLE // 8]) for s in spots])
    high, low = int(sample.max()), int(sample.min())
    if high >= vocab_size or low < 0:
        raise UsageError(
            f"data.path={path} holds token id {high if high >= vocab_size else low}, outside the model's vocabulary "
            f"(0..{vocab_size - 1}); make the file for this model (`python -m cases.baichuan2_13b.data OUT "
            f"--vocab-size {vocab_size}`) or choose the model.scale its tokenizer was made for"
        )


def remote_nodes(hosts: list[str]) -> None:
    """Multi-node runs started over ssh: ssh and rsync present here, every host reachable
    without a password."""
    for tool in ("ssh", "rsync"):
        if shutil.which(tool) is None:
            raise UsageError(
                f"layout spans {len(hosts)} nodes over ssh, but `{tool}` is not installed here; install it, or start "
                "memdiag on every node yourself (node_rank=I run_dir=DIR), or simulate the nodes with nodes_here=true"
            )

    def reach(host: str) -> tuple[str, str | None]:
        try:
            result = subprocess.run(
                ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_TIMEOUT_S}", host, "true"],
                capture_output=True, text=True, timeout=SSH_TIMEOUT_S + 5,
            )
        except subprocess.TimeoutExpired:
            return host, "timed out"
        return host, None if result.returncode == 0 else (result.stderr.strip().splitlines() or ["ssh failed"])[-1]

    with ThreadPoolExecutor(max_workers=min(16, len(hosts))) as pool:
        for host, problem in pool.map(reach, hosts):
            if problem:
                raise UsageError(f"node {host} is not reachable with `ssh -o BatchMode=yes {host}`: {problem}")


def check_run(config) -> None:
    """Everything ``memdiag run`` was given, before it makes a directory or starts a process."""
    writable_dir(config.reports_dir, "reports_dir")
    if config.run_dir:
        writable_dir(config.run_dir, "run_dir")
    if config.checkpoint:
        checkpoint_dir(config.checkpoint)
    if config.data.get("source") == "npy":
        if not config.data.get("path"):
            raise UsageError("data=openwebtext needs data.path=FILE (one int64 .npy of token ids)")
        token_file(config.data["path"], vocab_size=int(config.model["vocab_size"]), seq_len=config.seq_len)
