"""Architecture facts of any HF decoder, counted from the model itself, not from a formula.

- Parameters, the largest layer and tied weights: the model built on the meta device
  (``AutoModelForCausalLM.from_config``, ``trust_remote_code`` where the config asks); tied
  weights are one ``Parameter``, so counting unique parameters counts them once.
- Saved-for-backward bytes: the model's real forward (with labels, in train mode, in the
  dtype trained in) under ``FakeTensorMode`` with ``saved_tensors_hooks``, counting unique
  storages that are not parameters: exact bytes, nothing allocated. Run with 1 and 2 decoder
  layers at two sequence lengths, which separates per layer ``x * s + y * s^2`` from the head's
  ``u * s + w`` (all per sequence of the micro-batch).

Both are cached on disk per (config, dtype, attention), so a layout search or a second plan
never builds a model. torch and transformers are imported only when counting.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from memdiag.cache import cache_root
from memdiag.errors import UsageError
from memdiag.plan.step_peaks import StepPeaks, decoder_layers

CACHE_VERSION = 9
PROBE_SEQ = (256, 512)
"""Sequence lengths the forward is run at; two points fit the s and s^2 terms exactly."""
ATTN_IMPLEMENTATION = {"plain": "eager", "sdpa_math": "sdpa", "fused": "sdpa"}
"""How the planner's attention settings map onto transformers' ``attn_implementation``."""
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True, kw_only=True)
class SavedBytes:
    """Saved-for-backward bytes for one sequence of length ``s`` (multiply by the micro-batch)."""

    layer_per_token: float
    layer_per_token_squared: float
    head_per_token: float
    head_fixed: float
    attention: str
    dtype: str

    def layer(self, s: int) -> float:
        return self.layer_per_token * s + self.layer_per_token_squared * s * s

    def head(self, s: int) -> float:
        return self.head_per_token * s + self.head_fixed


@dataclass(frozen=True, kw_only=True)
class ModelFacts:
    name: str
    model_class: str
    num_parameters: int
    num_layers: int
    largest_layer_params: int
    """The largest decoder layer (what ZeRO-3 gathers at once)."""
    largest_tensor_elements: int
    tied_parameters: int
    """Elements shared by tied tensors, counted once in ``num_parameters``."""
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    supports_sdpa: bool = False
    """transformers picks SDPA for this model when ``attn_implementation`` is not given (else eager)."""
    tensor_numels: tuple[int, ...] = ()
    """Elements of each parameter in ``named_parameters()`` order, tied ones once (the order
    ZeRO-3's ``mark_persistent_parameters`` walks)."""
    saved: SavedBytes | None = None
    peaks: StepPeaks | None = None
    """The step's activation peak by stage, forward and backward counted (``memdiag.plan.step_peaks``)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelFacts:
        data = dict(data)
        saved = data.pop("saved", None)
        peaks = data.pop("peaks", None)
        data["tensor_numels"] = tuple(data.get("tensor_numels") or ())
        return cls(**data, saved=SavedBytes(**saved) if saved else None, peaks=StepPeaks.from_dict(peaks) if peaks else None)


def cache_dir() -> Path:
    return cache_root() / "arch"


def _key(config: dict, model_class: str | None, dtype: str, attention: str) -> str:
    text = json.dumps({"v": CACHE_VERSION, "config": config, "class": model_class, "dtype": dtype, "attention": attention}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def read_config(path: str | Path) -> dict:
    """An HF ``config.json`` (or the directory holding it) as a dict, with a clear error."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--model-config {path}: no such file") from None
    except ValueError as exc:
        raise UsageError(f"--model-config {path} is not JSON: {exc}") from None
    if not isinstance(config, dict) or "model_type" not in config and "architectures" not in config:
        raise UsageError(f"--model-config {path}: not an HF model config (no model_type or architectures)")
    config["_memdiag_source_dir"] = str(path.parent.resolve())
    return config


def _import(path: str):
    import importlib

    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def facts(config: dict, *, dtype: str = "bf16", attention: str = "plain", model_class: str | None = None, trust_remote_code: bool | None = None) -> ModelFacts:
    """Counted facts for ``config`` (an HF config dict), from the cache when it has them.
    ``model_class``: ``"module:Class"`` of a ``PreTrainedModel`` to build instead of the Auto
    class (the case's own model; its config class is its ``config_class``), imported only
    when counting."""
    if model_class is None and trust_remote_code is None:
        case = _case_implementing(config)
        if case is not None:
            model_class, trust_remote_code = case.model_class, False
    clean = {k: v for k, v in config.items() if k != "_memdiag_source_dir"}
    key = _key(clean, model_class, dtype, attention)
    path = cache_dir() / f"{key}.json"
    try:
        return ModelFacts.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        pass
    counted = count(
        config, dtype=dtype, attention=attention, model_class=_import(model_class) if model_class else None,
        trust_remote_code=trust_remote_code,
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(counted.to_dict()))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home: count again next time
    return counted


def _modeling_files_missing(config: dict) -> list[str]:
    """The files a remote-code config's ``auto_map`` names that are not beside it."""
    source = config.get("_memdiag_source_dir")
    modules = {ref.split("--")[-1].rsplit(".", 1)[0] for ref in _auto_map_refs(config.get("auto_map") or {})}
    return sorted(f"{m}.py" for m in modules if not (source and (Path(source) / f"{m}.py").is_file()))


def _auto_map_refs(auto_map: dict) -> list[str]:
    refs = []
    for value in auto_map.values():
        refs += [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, str)]
    return refs


def _case_implementing(config: dict):
    """A memdiag case whose model class implements the config's model_type, used when the
    config's own modeling files are not there to build it (a bare Baichuan config.json)."""
    from memdiag.registry import case_for_model_type

    case = case_for_model_type(config.get("model_type"))
    if case is None or (config.get("auto_map") and not _modeling_files_missing(config)):
        return None  # the user's own modeling code is there: it is what they train
    return case


def _unknown_model_type(model_type: str) -> UsageError:
    import difflib

    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING_NAMES), n=3, cutoff=0.5)
    hint = f" (closest: {', '.join(close)})" if close else ""
    return UsageError(
        f"model_type {model_type!r} is not one transformers {transformers.__version__} builds{hint}; for a remote-code "
        "model give --model-config the directory holding its config.json and the modeling files its auto_map names"
    )


def _hf_config(config: dict, model_class, trust_remote_code: bool | None, **changes):
    from transformers import AutoConfig

    data = {k: v for k, v in config.items() if k != "_memdiag_source_dir"} | changes
    if model_class is not None:
        return model_class.config_class(**{k: v for k, v in data.items() if k not in ("model_type", "architectures")})
    source = config.get("_memdiag_source_dir")
    remote = bool(config.get("auto_map")) if trust_remote_code is None else trust_remote_code
    if remote and (missing := _modeling_files_missing(config)):
        raise UsageError(
            f"the config's auto_map names {', '.join(missing)}, not found beside it{f' in {source}' if source else ''}: "
            "copy them from the model's repository, or give a config transformers builds itself"
        )
    try:
        if remote and source:
            base = AutoConfig.from_pretrained(source, trust_remote_code=True)
            for key, value in changes.items():
                setattr(base, key, value)
            return base
        model_type = data.pop("model_type", None)
        if model_type is None:
            raise UsageError("the config has no model_type: transformers cannot tell which model to build")
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        if model_type not in CONFIG_MAPPING_NAMES:
            raise _unknown_model_type(model_type)
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError, OSError) as exc:
        raise UsageError(
            f"transformers cannot build this config ({exc}); a remote-code model needs its config.json in a "
            "directory with its modeling files (auto_map), or a newer transformers"
        ) from None


def _build(hf_config, model_class, trust_remote_code: bool, dtype=None):
    """The model; ``dtype``: the torch dtype trained in, over the config's own ``torch_dtype`` (a
    config saved as float32 would otherwise build, and count, fp32 activations)."""
    from transformers import AutoModelForCausalLM

    if model_class is not None:
        return model_class(hf_config)
    try:
        if dtype is None:
            return AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
        try:
            return AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code, dtype=dtype)
        except TypeError:  # transformers before 4.56 names it torch_dtype
            return AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code, torch_dtype=dtype)
    except ValueError as exc:
        raise UsageError(f"transformers cannot build a causal LM from this config: {exc}") from None


def _num_layers_key(hf_config) -> str:
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        if hasattr(hf_config, key):
            return key
    text_config = getattr(hf_config, "text_config", None)
    if text_config is not None:
        raise UsageError("a multimodal config: give the text model's config (its text_config) to plan the decoder")
    raise UsageError("the config says nothing of its number of layers (num_hidden_layers)")


def count(config: dict, *, dtype: str, attention: str, model_class=None, trust_remote_code: bool | None = None) -> ModelFacts:
    from transformers.utils import logging as hf_logging

    # the count builds and steps the model as a Trainer would: transformers' advice to a training
    # run (use_cache with checkpointing, ...) is not the user's to read
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return _count(config, dtype=dtype, attention=attention, model_class=model_class, trust_remote_code=trust_remote_code)
    finally:
        hf_logging.set_verbosity(previous)


def _count(config: dict, *, dtype: str, attention: str, model_class, trust_remote_code: bool | None) -> ModelFacts:
    import torch

    remote = bool(config.get("auto_map")) if trust_remote_code is None else trust_remote_code
    hf_config = _hf_config(config, model_class, remote)
    layers_key = _num_layers_key(hf_config)
    with torch.device("meta"):
        model = _build(hf_config, model_class, remote)
    unique = {id(p): p for p in model.parameters()}
    n = sum(p.numel() for p in unique.values())
    tied = _tied_elements(model)
    layers = decoder_layers(model)
    largest_layer = max((sum(p.numel() for p in layer.parameters()) for layer in layers), default=n)
    largest_tensor = max((p.numel() for p in unique.values()), default=0)
    supports_sdpa = bool(getattr(type(model), "_supports_sdpa", False))
    if attention == "auto":  # what transformers picks when attn_implementation is not given
        attention = "fused" if supports_sdpa else "plain"
    text = getattr(hf_config, "text_config", None) or hf_config
    heads = int(getattr(text, "num_attention_heads", getattr(text, "n_head", 0)) or 0)
    facts_ = ModelFacts(
        name=str((config.get("architectures") or [type(model).__name__])[0]),
        model_class=type(model).__name__,
        num_parameters=n,
        num_layers=len(layers),
        largest_layer_params=largest_layer,
        largest_tensor_elements=largest_tensor,
        tied_parameters=tied,
        hidden_size=int(getattr(text, "hidden_size", getattr(text, "n_embd", 0)) or 0),
        num_heads=heads,
        num_kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        intermediate_size=int(getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 0),
        vocab_size=int(getattr(text, "vocab_size", 0) or 0),
        supports_sdpa=supports_sdpa,
        tensor_numels=tuple(p.numel() for _, p in model.named_parameters()),
        saved=saved_bytes(config, hf_config_for=lambda **c: _hf_config(config, model_class, remote, **c),
                          layers_key=layers_key, model_class=model_class, remote=remote, dtype=dtype, attention=attention),
        peaks=_step_peaks(lambda **c: _hf_config(config, model_class, remote, **c), layers_key=layers_key,
                          model_class=model_class, remote=remote, dtype=dtype, attention=attention),
    )
    return facts_


def _step_peaks(hf_config_for, *, layers_key: str, model_class, remote: bool, dtype: str, attention: str) -> StepPeaks | None:
    import torch

    from memdiag.plan import step_peaks

    torch_dtype = getattr(torch, TORCH_DTYPES[dtype])

    def build(layers: int):
        hf_config = hf_config_for(**{layers_key: layers})
        if model_class is None:
            hf_config._attn_implementation = ATTN_IMPLEMENTATION[attention]
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch_dtype)  # built in the dtype trained in (a .to() cannot swap fakes)
        try:
            return _build(hf_config, model_class, remote, torch_dtype).train()
        finally:
            torch.set_default_dtype(previous)

    probe = hf_config_for()
    vocab = int(getattr(getattr(probe, "text_config", None) or probe, "vocab_size"))
    try:
        return step_peaks.count(build, vocab=vocab, dtype=dtype, attention=attention, context=lambda: _attention_backend(attention))
    except Exception as exc:  # a model's own kernel or autograd Function FakeTensorMode cannot run
        import sys

        print(f"memdiag: warning: the model's backward could not be counted ({type(exc).__name__}: {str(exc)[:160]}); "
              "its step peak is planned from the forward's saved bytes and the formula's transients", file=sys.stderr)
        return None


def _tied_elements(model) -> int:
    """Elements of parameters that appear under more than one name (tied embeddings)."""
    names: dict[int, list[str]] = {}
    sizes: dict[int, int] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
        sizes[id(p)] = p.numel()
    return sum(sizes[k] * (len(v) - 1) for k, v in names.items() if len(v) > 1)


def _saved_in_forward(hf_config, model_class, remote: bool, dtype: str, attention: str, seq: int) -> int:
    """Bytes of unique non-parameter storages saved for backward by one training forward."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
    if model_class is None:
        hf_config._attn_implementation = ATTN_IMPLEMENTATION[attention]
    storages: dict[int, int] = {}

    def pack(tensor):
        base = tensor._base if tensor._base is not None else tensor
        if not (base.is_leaf and base.requires_grad):
            storage = tensor.untyped_storage()
            storages[storage._cdata] = storage.nbytes()
        return tensor

    previous = torch.get_default_dtype()
    with FakeTensorMode(allow_non_fake_inputs=True):
        torch.set_default_dtype(torch_dtype)  # built in the dtype trained in (a .to() cannot swap fakes)
        try:
            model = _build(hf_config, model_class, remote, torch_dtype).train()
        finally:
            torch.set_default_dtype(previous)
        vocab = int(getattr(getattr(hf_config, "text_config", None) or hf_config, "vocab_size"))
        ids = torch.randint(0, vocab, (1, seq))
        context = _attention_backend(attention)
        with context, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids)
    return sum(storages.values())


def _attention_backend(attention: str):
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if attention == "sdpa_math":
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def saved_bytes(config: dict, *, hf_config_for, layers_key: str, model_class, remote: bool, dtype: str, attention: str) -> SavedBytes:
    """Per layer ``x s + y s^2`` and head ``u s + w`` from forwards at 1 and 2 layers and two
    sequence lengths."""
    s1, s2 = PROBE_SEQ
    totals = {}
    for layers in (1, 2):
        for seq in PROBE_SEQ:
            totals[layers, seq] = _saved_in_forward(hf_config_for(**{layers_key: layers}), model_class, remote, dtype, attention, seq)
    layer1, layer2 = totals[2, s1] - totals[1, s1], totals[2, s2] - totals[1, s2]
    head1, head2 = totals[1, s1] - layer1, totals[1, s2] - layer2
    # layer(s) = x s + y s^2 through (s1, layer1), (s2, layer2)
    y = (layer2 / s2 - layer1 / s1) / (s2 - s1)
    x = layer1 / s1 - y * s1
    u = (head2 - head1) / (s2 - s1)
    w = head1 - u * s1
    return SavedBytes(layer_per_token=x, layer_per_token_squared=y, head_per_token=u, head_fixed=w, attention=attention, dtype=dtype)
