"""A user's DeepSpeed config, read as it is: the settings it decides, its ``"auto"`` values filled
the way the HF Trainer fills them, and its ZeRO section checked by the installed DeepSpeed.

The Trainer's rules are transformers' ``integrations/deepspeed.py``
(``HfTrainerDeepSpeedConfig.trainer_config_process`` and ``trainer_config_finalize``): the batch,
accumulation, clipping, optimizer and precision values come from ``TrainingArguments``; the
bucket sizes from the model's ``hidden_size``. Here the arguments are memdiag's settings (or a
launch command's Trainer arguments, read into them); a value the memory depends on that nothing
gives is refused with the key to give.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path

from memdiag.cache import cache_root
from memdiag.errors import UsageError

SETTING_KEYS = {
    "micro_batch": ("train_micro_batch_size_per_gpu", "per_device_train_batch_size"),
    "grad_accum": ("gradient_accumulation_steps", "gradient_accumulation_steps"),
    "zero_stage": ("zero_optimization.stage", None),
    "dtype": ("bf16.enabled / fp16.enabled", "bf16 / --fp16"),
}
"""Setting field -> (the ds_config key that decides it, the TrainingArguments field that fills
its "auto")."""

TRAINER_ARGUMENTS = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1}
"""``TrainingArguments``' defaults a launch command may leave out (memdiag.launchcmd)."""

TRAINER_DEFAULTS = {
    "gradient_clipping": 1.0,  # max_grad_norm
    "optimizer.params.lr": 5e-5,  # learning_rate
    "optimizer.params.betas": [0.9, 0.999],  # adam_beta1, adam_beta2
    "optimizer.params.eps": 1e-8,  # adam_epsilon
    "optimizer.params.weight_decay": 0.0,
    "scheduler.params.warmup_min_lr": 0,
    "scheduler.params.warmup_max_lr": 5e-5,
    "scheduler.params.warmup_num_steps": 1,
}
"""``TrainingArguments``' defaults for the "auto" values no memory figure depends on."""


def read(path: str | Path) -> dict:
    """The ds_config at ``path``; a file that is not a JSON object is one clear line."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"ds_config={path}: no such file") from None
    except OSError as exc:
        raise UsageError(f"ds_config={path}: cannot read it ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise UsageError(f"ds_config={path} is not JSON ({exc}): fix the file or point at another") from None
    if not isinstance(data, dict):
        raise UsageError(f"ds_config={path}: a DeepSpeed config is a JSON object, this is a {type(data).__name__}")
    return data


def _get(ds: dict, dotted: str):
    node = ds
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(ds: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = ds
    for part in parents:
        node = node.get(part)
        if not isinstance(node, dict):
            return  # the section is not there: nothing to fill
    if last in node:
        node[last] = value


def _enabled(section) -> bool | str:
    """A precision section's ``enabled`` as DeepSpeed reads it (absent: false)."""
    return section.get("enabled", False) if isinstance(section, dict) else False


def settings_from(ds: dict, path: str | Path, given: set[str]) -> dict:
    """The settings the ds_config decides (``micro_batch``, ``grad_accum``, ``zero_stage``,
    ``dtype``), for those the user did not give (``given``: setting fields). An ``"auto"`` value
    of one the user did not give is refused, naming the key that fills it."""
    out: dict = {}

    def auto(field: str, key: str) -> None:
        hf_field = SETTING_KEYS[field][1]
        if field not in given:
            setting = {"zero_stage": "zero.stage"}.get(field, field)
            raise UsageError(
                f"ds_config={path}: {key} is \"auto\" (the HF Trainer fills it from --{hf_field}): give {setting}=..."
            )

    for field in ("micro_batch", "grad_accum"):
        key = SETTING_KEYS[field][0]
        value = ds.get(key)
        if value == "auto":
            auto(field, key)
        elif value is not None:
            try:
                out[field] = int(value)
            except (TypeError, ValueError):
                raise UsageError(f"ds_config={path}: {key}={value!r} is not a whole number") from None
    stage = _get(ds, "zero_optimization.stage")
    if stage is not None:
        if stage not in (0, 1, 2, 3):
            raise UsageError(f"ds_config={path}: zero_optimization.stage={stage!r}: DeepSpeed's stages are 0, 1, 2, 3")
        out["zero_stage"] = int(stage)
    bf16, fp16 = _enabled(ds.get("bf16") or ds.get("bfloat16")), _enabled(ds.get("fp16"))
    if "auto" in (bf16, fp16):
        auto("dtype", "bf16.enabled" if bf16 == "auto" else "fp16.enabled")
    else:  # neither enabled: DeepSpeed trains in fp32
        out["dtype"] = "bf16" if bf16 else "fp16" if fp16 else "fp32"
    return {k: v for k, v in out.items() if k not in given}


def fill_auto(ds: dict, *, micro_batch: int, grad_accum: int, dtype: str, hidden_size: int, world_size: int | None = None) -> dict:
    """``ds`` with every ``"auto"`` the HF Trainer fills, filled (in place, and returned)."""
    for key, value in (("train_micro_batch_size_per_gpu", micro_batch), ("gradient_accumulation_steps", grad_accum)):
        if ds.get(key) == "auto":
            ds[key] = value
    if ds.get("train_batch_size") == "auto":
        if world_size is None:
            ds.pop("train_batch_size")  # DeepSpeed derives it from the other two and the world
        else:
            ds["train_batch_size"] = world_size * micro_batch * grad_accum
    for section, enabled in (("bf16", dtype == "bf16"), ("fp16", dtype == "fp16")):
        if _get(ds, f"{section}.enabled") == "auto":
            ds[section]["enabled"] = enabled
    zero = ds.get("zero_optimization")
    if isinstance(zero, dict):
        for key, value in (
            ("reduce_bucket_size", hidden_size * hidden_size),
            ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
            ("stage3_param_persistence_threshold", 10 * hidden_size),
        ):
            if zero.get(key) == "auto":
                zero[key] = value
    for key, value in TRAINER_DEFAULTS.items():
        if _get(ds, key) == "auto":
            _set(ds, key, value)
    return ds


def still_auto(ds: dict, prefix: str = "") -> list[str]:
    """Keys still ``"auto"`` (dotted), after ``fill_auto``: ones memdiag does not know how to fill."""
    keys = []
    for key, value in ds.items():
        if isinstance(value, dict):
            keys += still_auto(value, f"{prefix}{key}.")
        elif value == "auto":
            keys.append(f"{prefix}{key}")
    return keys


def check_zero_section(ds: dict, path: str | Path) -> None:
    """``zero_optimization`` as the installed DeepSpeed reads it: an unknown key (DeepSpeed's
    config model forbids extras) or a bad value is one line naming the file and the key."""
    zero = ds.get("zero_optimization")
    if not isinstance(zero, dict):
        return
    try:
        version = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        return  # planning for another machine: no DeepSpeed here to ask
    # importing DeepSpeed to ask costs seconds; its answer for the same section and version does not change
    key = hashlib.sha256(json.dumps({"deepspeed": version, "zero": zero}, sort_keys=True, default=str).encode()).hexdigest()[:24]
    accepted = cache_root() / "zero_checked" / key
    if accepted.exists():
        return
    import logging

    logging.disable(logging.WARNING)  # DeepSpeed logs its accelerator choice on import: not the plan's business
    try:
        import deepspeed
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except ImportError:
        return  # planning for another machine: no DeepSpeed here to ask
    finally:
        logging.disable(logging.NOTSET)
    from pydantic import ValidationError

    try:
        DeepSpeedZeroConfig(**zero)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'zero_optimization'}: {error['msg']}" for error in exc.errors()
        )
        raise UsageError(
            f"ds_config={path}: zero_optimization is not what DeepSpeed {deepspeed.__version__} reads ({problems}): "
            "fix or remove the key"
        ) from None
    try:
        accepted.parent.mkdir(parents=True, exist_ok=True)
        accepted.touch()
    except OSError:
        pass  # a read-only cache: asked again next time
