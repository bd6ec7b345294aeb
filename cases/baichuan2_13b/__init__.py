"""The Baichuan2-13B DeepSpeed ZeRO-3 case (see ../../docs/DESIGN.md and shared/reference)."""

from pathlib import Path

from memdiag.registry import CaseSpec, register_case

ENTRY_MODULE = "cases.baichuan2_13b.train"
MODEL_CLASS = "cases.baichuan2_13b.modeling_baichuan:BaichuanForCausalLM"
"""What ``memdiag plan`` builds (on the meta device, and under FakeTensorMode) to count the case's model."""
MODEL_ATTENTION = "plain"
"""The attention path the planner counts the model's activations on; it scales the s^2 terms to others."""


def model_config(model: dict) -> dict:
    """The ``model`` config group as the HF config the model class takes."""
    return {k: v for k, v in model.items() if k != "scale"} | {"model_type": "baichuan"}


def num_parameters(model: dict) -> int:
    """Exact parameter count of the model config ``model`` (the ``model`` config group)."""
    from cases.baichuan2_13b.modeling_baichuan import BaichuanConfig, count_parameters

    return count_parameters(BaichuanConfig(**{k: v for k, v in model.items() if k != "scale"}))


BENCHMARK_ATTENTION = "sdpa_math"
"""The attention path the benchmark's model code takes, for ``memdiag plan``. Upstream
Baichuan2-13B trains through ``F.scaled_dot_product_attention`` when xformers imports, with the
ALiBi bias as a float mask: no fused kernel takes such a mask, so SDPA's math path runs and
keeps one bf16 score tensor per layer (our model implements the upstream no-xformers path,
``plain``, which keeps two). It is the path that agrees with the seed's measurement below;
``plain`` would predict 66.5 GiB there, above the device."""

SEED_MEASUREMENT = {"layout": "2x8", "device_bytes": int(56.59 * 2**30), "source": "the seed's benchmark table (mem 56.59/64)"}
"""The one 13B measurement on BI-V150: 2 nodes x 8 processes (4 cards of 2 chips)."""


SPEC = register_case(CaseSpec(
    name="baichuan2_13b",
    conf_dir=Path(__file__).resolve().parent / "conf",
    entry_module=ENTRY_MODULE,
    model_class=MODEL_CLASS,
    num_parameters=num_parameters,
    model_config=model_config,
    # Baichuan and Baichuan2 (7B, 13B) all say "baichuan": the same layers and parameters (the
    # 7Bs' rotary position encoding has no parameters, the 13Bs' ALiBi none either)
    model_types=("baichuan",),
    model_attention=MODEL_ATTENTION,
    benchmark_attention=BENCHMARK_ATTENTION,
    # our model implements upstream's two paths (without and with xformers importable); the
    # planner also models offload to NVMe and rank-0 broadcast loading, which this case cannot run
    optimizer="torch_default",
    runnable={"attention": ("plain", "sdpa_math"), "load": ("reference", "zero_init"), "offload": ("none", "optimizer", "params"),
              "fused_cross_entropy": (False,), "dataloader_workers": (0,)},
    seed_measurement=SEED_MEASUREMENT,
))
