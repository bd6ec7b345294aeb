"""The one mapping from a run to what the planner needs: ``memdiag plan`` and ``memdiag run``'s
pre-launch consult both call ``for_run``, so they cannot disagree about the same run."""

from __future__ import annotations

from pathlib import Path

from memdiag.plan.model import Architecture
from memdiag.plan.terms import Settings
from memdiag.settings import RunSettings
from memdiag.versions import deepspeed_pin_memory_default


def offload_in(zero: dict) -> str:
    """What a ds_config's ``zero_optimization`` offloads: none, optimizer, params or nvme."""
    devices = {name: (zero.get(f"offload_{name}") or {}).get("device", "none") for name in ("optimizer", "param")}
    if "nvme" in devices.values():
        return "nvme"
    if devices["param"] == "cpu":
        return "params"
    return "optimizer" if devices["optimizer"] == "cpu" else "none"


def checkpoint_format(run: RunSettings) -> str:
    if run.checkpoint_format != "auto":
        return run.checkpoint_format
    if not run.checkpoint:
        return "none"  # random initialisation: nothing is read
    return "safetensors" if any(Path(run.checkpoint).glob("*.safetensors")) else "bin"


def optimizer_path(run: RunSettings, ds: dict, *, own: str | None, accelerator: str) -> str:
    """How the run's Adam steps (``Settings.optimizer``). ``own``: the optimizer the training
    script builds whatever the ds_config says (the case: ``torch_default``, torch's AdamW with
    the section's params); None: DeepSpeed builds the ds_config's section
    (engine._configure_basic_optimizer: FusedAdam, torch's Adam/AdamW with ``torch_adam``, CPU
    Adam when offloaded) and without one the script's own is HF Trainer's default
    (``adamw_torch_fused``)."""
    if run.optimizer != "auto":
        return run.optimizer
    if own is None:
        section = ds.get("optimizer") or {}
        params = section.get("params") or {}
        if not section or not params.get("torch_adam"):
            return "fused"
        own = {True: "torch_foreach", False: "torch_for_loop"}.get(params.get("foreach"), "torch_default")
    if own == "torch_default":
        # torch's _default_to_fused_or_foreach: foreach where every tensor is on CUDA, else the loop
        return "torch_foreach" if accelerator == "cuda" else "torch_for_loop"
    return own


def planner_settings(run: RunSettings, ds: dict, *, attention: str, optimizer: str = "fused") -> Settings:
    """The planner's settings of a run: its own settings, and what it leaves to the ds_config
    (offload, pinning, the 16-bit save, the buffers). ``attention`` and ``optimizer`` are
    already resolved (``optimizer_path``)."""
    zero = ds.get("zero_optimization", {})
    sections = [zero.get("offload_optimizer") or {}, zero.get("offload_param") or {}]
    pin = run.pin_memory
    if pin is None:
        pin = next((bool(s["pin_memory"]) for s in sections if "pin_memory" in s), deepspeed_pin_memory_default())
    save_16bit = run.save_16bit_weights
    if save_16bit is None:
        save_16bit = bool(zero.get("stage3_gather_16bit_weights_on_model_save", False))
    return Settings(
        zero_stage=run.zero_stage, micro_batch=run.micro_batch, seq_len=run.seq_len, grad_accum=run.grad_accum,
        dtype=run.dtype, attention=attention, activation_checkpointing=run.activation_checkpointing, optimizer=optimizer,
        fused_cross_entropy=run.fused_cross_entropy, dataloader_workers=run.dataloader_workers,
        dataloader_dataset_bytes=run.dataloader_dataset_bytes,
        offload=offload_in(zero) if run.offload == "auto" else run.offload, load=run.load, load_dtype=run.load_dtype,
        checkpoint_format=checkpoint_format(run), checkpoint_shards=run.checkpoint_shards, pin_memory=pin,
        save_16bit_weights=save_16bit, save=run.save, resume=run.resume, guard_fraction=run.guard_fraction,
        ds_buffers=zero,
    )


def auto_attention(arch: Architecture) -> str:
    """``attention=auto`` for a model of the user's: what transformers picks when
    ``attn_implementation`` is not given - SDPA where the model supports it (its flash and
    memory-efficient kernels keep no s x s tensor), else eager."""
    return "fused" if arch.facts is not None and arch.facts.supports_sdpa else "plain"


def hf_model(model_config: Path, *, dtype: str, attention: str) -> tuple[Architecture, str]:
    """A model of the user's and the attention path it runs, the step counted on that path
    (``auto``: the one transformers picks for it)."""
    arch = Architecture.from_hf_config(model_config, dtype=dtype, attention=attention)
    return arch, attention if attention != "auto" else auto_attention(arch)


def for_run(config, model_config: Path | None = None) -> tuple[Architecture, Settings]:
    """The architecture and planner settings of a composed run (``memdiag.config.RunConfig``);
    ``model_config``: plan an HF model instead of the case's (``attention=auto``: the path
    transformers picks for it, counted on that path)."""
    from memdiag import dsconfig
    from memdiag.config import load_ds_config
    from memdiag.registry import get_case

    if model_config is not None:
        arch, attention = hf_model(model_config, dtype=config.dtype, attention=config.attention)
    else:
        config.check_case_model_length()
        attention = config.attention_path
        arch = Architecture.for_case(config.case, config.model, dtype=config.dtype, attention=attention)
    ds = load_ds_config(config, hidden_size=arch.hidden_size)  # HF's "auto" buckets follow the planned model
    if config.ds_config_is_users:
        dsconfig.check_zero_section(ds, config.ds_config)
    own = None if model_config is not None else get_case(config.case).optimizer
    optimizer = optimizer_path(config, ds, own=own, accelerator=config.hardware.accelerator)
    return arch, planner_settings(config, ds, attention=attention, optimizer=optimizer)
