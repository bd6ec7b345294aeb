"""The Baichuan2-13B DeepSpeed ZeRO-3 case (see ../../docs/DESIGN.md and shared/reference)."""

ENTRY_MODULE = "cases.baichuan2_13b.train"


def num_parameters(model: dict) -> int:
    """Exact parameter count of the model config ``model`` (the ``model`` config group)."""
    from cases.baichuan2_13b.modeling_baichuan import BaichuanConfig, count_parameters

    return count_parameters(BaichuanConfig(**{k: v for k, v in model.items() if k != "scale"}))
