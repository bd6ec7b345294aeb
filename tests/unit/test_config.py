import pytest

from memdiag.config import compose, load_ds_config
from memdiag.errors import UsageError


def test_cpu_fallback_is_stated_and_picks_tiny_on_two_ranks():
    config = compose(["case=baichuan2_13b"])
    assert config.hardware.name == "cpu"
    assert config.model["scale"] == "tiny"
    assert config.nproc_per_node == 2
    assert "no accelerator" in config.selection_note and "cpu" in config.selection_note


def test_explicit_choices_win_over_the_cpu_fallback():
    config = compose(["model.scale=small", "steps=3", "seq_len=128", "nproc_per_node=1"])
    assert config.model["scale"] == "small" and config.model["hidden_size"] == 2048
    assert (config.steps, config.seq_len, config.nproc_per_node) == (3, 128, 1)


def test_13b_scale_matches_the_public_config():
    model = compose(["hardware=bi_v150", "model.scale=13b", "nproc_per_node=8"]).model
    assert (model["hidden_size"], model["num_hidden_layers"], model["num_attention_heads"]) == (
        5120,
        40,
        40,
    )
    assert (model["intermediate_size"], model["vocab_size"]) == (13696, 125696)


def test_bi_v150_profile():
    hw = compose(["hardware=bi_v150", "nproc_per_node=8"]).hardware
    assert hw.devices_per_card == 2 and hw.cards_per_node == 8
    assert hw.peak_flops == 198e12 and hw.host_ram_bytes == 500 * 2**30
    assert hw.device_memory_bytes == 64 * 2**30


def test_unknown_key_names_the_closest():
    with pytest.raises(UsageError) as err:
        compose(["stepz=3"])
    assert "'stepz'" in str(err.value) and "steps" in str(err.value)


def test_unknown_nested_key_names_the_closest():
    with pytest.raises(UsageError, match="model.hidden_size"):
        compose(["model.hiden_size=3"])


def test_malformed_override_names_the_token():
    with pytest.raises(UsageError, match="'steps20'"):
        compose(["steps20"])


def test_unparseable_value_names_the_token():
    with pytest.raises(UsageError, match="steps=\\["):
        compose(["steps=["])


def test_unknown_case_lists_the_available():
    with pytest.raises(UsageError, match="available: baichuan2_13b"):
        compose(["case=llama"])


def test_unknown_scale_lists_the_options():
    with pytest.raises(UsageError) as err:
        compose(["model.scale=huge"])
    assert "13b" in str(err.value) and "tiny" in str(err.value)


@pytest.mark.parametrize(
    "token, field", [("steps=abc", "steps"), ("load=lazy", "load"), ("host_ram=500X", "host_ram")]
)
def test_bad_values_name_their_field(token, field):
    with pytest.raises(UsageError, match=field):
        compose([token])


def test_ds_config_takes_the_run_settings():
    config = compose(["grad_accum=4", "micro_batch=2", "zero.stage=2"])
    ds = load_ds_config(config)
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"]["enabled"] is True
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.95]  # the reference settings


def test_an_unsupported_version_is_named_with_the_range(monkeypatch):
    import importlib.metadata

    from memdiag import versions

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.12.6" if name == "deepspeed" else real(name))
    with pytest.raises(UsageError, match=r"deepspeed 0.12.6 is older than memdiag supports \(deepspeed >= 0.14\)"):
        versions.check_supported()
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.13.0+cpu" if name == "torch" else real(name))
    versions.check_supported()  # a local build label is not a version
