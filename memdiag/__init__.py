"""memdiag: memory diagnostics for DeepSpeed ZeRO-3 training."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``memdiag.record`` and ``memdiag.MemdiagCallback`` without importing them (and
    transformers) for every ``memdiag`` command."""
    if name in ("record", "MemdiagCallback"):
        from memdiag import api

        return getattr(api, name)
    raise AttributeError(f"module 'memdiag' has no attribute {name!r}")
