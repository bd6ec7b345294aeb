import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from memdiag.shards import CheckpointError, Shard, parse_safetensors_header


def _header_bytes(header: dict) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw


def test_header_parsed_from_literal_bytes():
    raw = _header_bytes({
        "__metadata__": {"format": "pt"},
        "w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]},
    })
    start, header = parse_safetensors_header(raw, "x.safetensors", file_size=len(raw) + 12)
    assert start == len(raw)
    assert header == {"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}}


@pytest.mark.parametrize(
    "header, size_extra, message",
    [
        ({"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}}, 6, "tensor w has data offsets"),
        ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}}, 1, "unknown dtype 'Q4'"),
    ],
)
def test_header_errors_name_the_tensor(header, size_extra, message):
    raw = _header_bytes(header)
    with pytest.raises(CheckpointError, match=message):
        parse_safetensors_header(raw, "x.safetensors", file_size=len(raw) + size_extra)


def test_header_length_overrunning_the_file():
    raw = struct.pack("<Q", 10_000) + b"{}"
    with pytest.raises(CheckpointError, match="overruns the file"):
        parse_safetensors_header(raw, "x.safetensors", file_size=len(raw))


def test_slices_read_into_place_and_converted(tmp_path):
    torch.manual_seed(0)
    tensors = {"a": torch.randn(37, 11).to(torch.bfloat16), "b": torch.arange(10, dtype=torch.float32)}
    save_file(tensors, tmp_path / "m.safetensors")
    with Shard(tmp_path / "m.safetensors", "safetensors") as shard:
        assert sorted(shard.keys()) == ["a", "b"] and shard.shape("a") == (37, 11)
        flat = tensors["a"].reshape(-1)
        out = torch.empty(100, dtype=torch.bfloat16)
        shard.read_flat("a", 150, out)
        assert torch.equal(out, flat[150:250])
        converted = torch.empty(100, dtype=torch.float32)  # fp32 model, bf16 checkpoint
        shard.read_flat("a", 7, converted)
        assert torch.equal(converted, flat[7:107].float())
        assert torch.equal(shard.get("b"), tensors["b"])


def test_truncated_shard_names_file_and_tensor(tmp_path):
    save_file({"a": torch.ones(1000)}, tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"m\.safetensors: tensor a has data offsets"):
        Shard(tmp_path / "m.safetensors", "safetensors")
