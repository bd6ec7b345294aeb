"""Lean loading: identical weights from .bin and safetensors shards in every mode; broken
checkpoints stop before training with the file and tensor named."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from cases.baichuan2_13b.modeling_baichuan import BaichuanConfig, BaichuanForCausalLM  # noqa: E402
from memdiag.loading import CheckpointError, find_checkpoint, save_bin_sharded  # noqa: E402

TINY = ["model.scale=tiny", "steps=1", "seq_len=64"]


def tiny_model() -> BaichuanForCausalLM:
    torch.manual_seed(7)
    cfg = BaichuanConfig(vocab_size=16384, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8)
    return BaichuanForCausalLM(cfg)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    model = tiny_model()
    safe = root / "safetensors"
    model.save_pretrained(safe, max_shard_size="8MB")
    binary = root / "bin"
    model.config.save_pretrained(binary)
    save_bin_sharded(model.state_dict(), binary, max_shard_bytes=8 * 2**20)
    return {"safetensors": safe, "bin": binary}


def run_case(tmp_path, *overrides):
    result = subprocess.run(
        [sys.executable, "-m", "memdiag", "run", f"reports_dir={tmp_path}", *TINY, *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    runs = sorted((tmp_path / "baichuan2_13b").iterdir())
    return result, runs[-1]


def first_loss(run_dir: Path) -> float:
    for line in (run_dir / "timeline" / "rank-0.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "step":
            return record["loss"]
    raise AssertionError("no step record")


def test_index_files_are_the_public_layout(checkpoints):
    assert find_checkpoint(checkpoints["safetensors"]).format == "safetensors"
    ckpt = find_checkpoint(checkpoints["bin"])
    assert ckpt.format == "bin" and len(ckpt.shard_files) > 1
    assert all(f.startswith("pytorch_model-") for f in ckpt.shard_files)


def test_every_mode_and_format_gives_the_same_first_loss(tmp_path, checkpoints):
    losses = {}
    for fmt, path in checkpoints.items():
        for load in ("reference", "zero_init"):
            result, run_dir = run_case(tmp_path, f"load={load}", f"checkpoint={path}")
            assert result.returncode in (0, 1), result.stdout[-2000:] + result.stderr[-2000:]
            losses[(fmt, load)] = first_loss(run_dir)
    values = list(losses.values())
    assert max(values) - min(values) < 1e-3, losses
    random_init = first_loss(run_case(tmp_path)[1])
    assert abs(random_init - values[0]) > 1e-2  # the checkpoint was really loaded


def test_load_concurrency_one_reads_the_checkpoint_one_rank_at_a_time(tmp_path, checkpoints):
    result, run_dir = run_case(tmp_path, "load=zero_init", "load.concurrency=1", f"checkpoint={checkpoints['safetensors']}")
    assert result.returncode in (0, 1), result.stdout[-2000:] + result.stderr[-2000:]
    windows = []
    for rank in (0, 1):
        records = [json.loads(line) for line in (run_dir / "timeline" / f"rank-{rank}.jsonl").read_text().splitlines()]
        begin = next(r["t"] for r in records if r["kind"] == "phase_begin" and r["phase"] == "checkpoint_load")
        end = next(r["t"] for r in records if r["kind"] == "phase_end" and r["phase"] == "checkpoint_load")
        windows.append((begin, end))
    (_, first_end), (second_begin, _) = sorted(windows)
    assert second_begin >= first_end  # the slot is taken before the read (its phase) starts


def _broken(tmp_path, checkpoints, how):
    import shutil

    broken = tmp_path / f"broken-{how}"
    shutil.copytree(checkpoints["bin"], broken)
    index = broken / "pytorch_model.bin.index.json"
    if how == "missing_shard":
        first = sorted(broken.glob("pytorch_model-*.bin"))[0]
        first.unlink()
        return broken, first.name
    if how == "corrupt_index":
        index.write_text("{not json")
        return broken, index.name
    if how == "wrong_shape":
        cfg = json.loads((broken / "config.json").read_text())
        cfg["intermediate_size"] = 700
        (broken / "config.json").write_text(json.dumps(cfg))
        return broken, "mlp"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["missing_shard", "corrupt_index", "wrong_shape"])
def test_broken_checkpoint_is_named_before_training(tmp_path, checkpoints, how):
    broken, needle = _broken(tmp_path, checkpoints, how)
    with pytest.raises(CheckpointError) as err:
        from memdiag.loading import validate

        ckpt = find_checkpoint(broken)
        config = BaichuanConfig.from_pretrained(broken)
        with torch.device("meta"):
            validate(ckpt, BaichuanForCausalLM(config))
    assert needle in str(err.value)
    reports = tmp_path / "reports"
    result = subprocess.run(
        [sys.executable, "-m", "memdiag", "run", f"reports_dir={reports}", *TINY, "load=zero_init", f"checkpoint={broken}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert needle in result.stdout + result.stderr
    if how == "wrong_shape":  # only the ranks can see a shape: they stop before training
        (run_dir,) = (reports / "baichuan2_13b").iterdir()
        steps = [l for l in (run_dir / "timeline" / "rank-0.jsonl").read_text().splitlines() if '"kind":"step"' in l]
        assert steps == []
    else:  # a missing shard or a broken index is refused before launch: one line, nothing written
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
        assert not reports.exists() or not any(reports.iterdir())
