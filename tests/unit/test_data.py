import numpy as np
import pytest
import torch

from cases.baichuan2_13b.data import TokenWindows, batches, write_synthetic
from memdiag.errors import UsageError


def test_windows_are_consecutive_and_ranks_disjoint(tmp_path):
    path = tmp_path / "tokens.npy"
    np.save(path, np.arange(100, dtype=np.int64))
    windows = TokenWindows(path, seq_len=10, vocab_size=1000)
    assert len(windows) == 10
    assert windows[3].tolist() == list(range(30, 40))
    r0 = batches(source="npy", path=str(path), seed=0, seq_len=10, vocab_size=1000, micro_batch=2, rank=0, world_size=2)
    r1 = batches(source="npy", path=str(path), seed=0, seq_len=10, vocab_size=1000, micro_batch=2, rank=1, world_size=2)
    first0, first1 = next(r0), next(r1)
    assert first0.shape == (2, 10) and first0.dtype == torch.int64
    assert first0[0, 0] == 0 and first1[0, 0] == 20
    assert next(r0)[0, 0] == 40


def test_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(UsageError) as err:
        TokenWindows(tmp_path / "absent.npy", 16, 100)
    assert "absent.npy" in str(err.value) and "python -m cases.baichuan2_13b.data" in str(err.value)


def test_wrong_dtype_and_out_of_vocab_ids(tmp_path):
    path = tmp_path / "f.npy"
    np.save(path, np.arange(100, dtype=np.int32))
    with pytest.raises(UsageError, match="int64"):
        TokenWindows(path, 10, 1000)
    write_synthetic(path, 100, vocab_size=5000)
    with pytest.raises(UsageError, match="outside the vocabulary"):
        TokenWindows(path, 10, 16)[0]


def test_synthetic_is_seeded_per_rank():
    a = next(batches(source="synthetic", path=None, seed=1, seq_len=8, vocab_size=50, micro_batch=1, rank=0, world_size=2))
    b = next(batches(source="synthetic", path=None, seed=1, seq_len=8, vocab_size=50, micro_batch=1, rank=0, world_size=2))
    c = next(batches(source="synthetic", path=None, seed=1, seq_len=8, vocab_size=50, micro_batch=1, rank=1, world_size=2))
    assert torch.equal(a, b) and not torch.equal(a, c) and int(a.max()) < 50
