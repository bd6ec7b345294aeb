"""DeepSpeed instrumentation by class patching, so models and engines built anywhere are seen.

Patched, with the phase each marks:
- ``deepspeed.zero.Init`` enter/exit: ``zero_init``
- ``transformers.PreTrainedModel.from_pretrained`` and ``memdiag.loading.load_into_zero3``: ``checkpoint_load``
- ``deepspeed.initialize``: ``ds_initialize``
- ``DeepSpeedEngine.forward/backward/step``: ``forward``/``backward``/``step`` per micro-step,
  with categorised memory after each and a ``step`` record (loss, tokens, time) at every
  gradient-accumulation boundary
- ``DeepSpeedZeroOptimizer_Stage3.step``: ``optimizer_step``
- ``DeepSpeedEngine.save_checkpoint/load_checkpoint``: ``checkpoint_save``/``checkpoint_load``
- ZeRO-3's ``PartitionedParameterCoordinator.fetch_sub_module``: the current layer, so peaks
  inside forward and backward are attributed to the layer being computed.

A hook that fails records the error once and disables itself (an I/O error does not: the disk
may have room again later); the wrapped call always runs.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from typing import Any, Callable

from dataclasses import asdict

from memdiag import categories
from memdiag.probes.malloc import read_malloc_stats
from memdiag.phases import PhaseTracker, StepRecord
from memdiag.timeline import format as fmt

log = logging.getLogger(__name__)

_ORIGINALS: list[tuple[Any, str, Any]] = []
_INSTALLED: list[_Hooks] = []


def record_malloc(after: str, **extra: Any) -> None:
    for hooks in _INSTALLED:
        hooks.guarded("malloc_event", lambda: hooks.record_malloc(after, **extra))


def set_active(active: bool) -> None:
    """Switch every hook on or off in place (bench/overhead alternates within one run)."""
    for hooks in _INSTALLED:
        hooks.active = active
_LAYER_RE = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def layer_name(module_name: str) -> str:
    """``model.layers.3.mlp.up_proj`` -> ``model.layers.3``; names without an index stay."""
    match = _LAYER_RE.match(module_name)
    return match.group(1) if match else (module_name or "(root)")


class _Hooks:
    def __init__(self, tracker: PhaseTracker, warn_once: Callable[[str, str], None]) -> None:
        self.tracker = tracker
        self.warn_once = warn_once
        self.disabled: set[str] = set()
        self.micro_losses: list[Any] = []
        self.tokens = 0
        self.step_t0: float | None = None
        self.saved = categories.SavedTensorCounter()
        self.activations_bytes = 0
        self.named_engines: set[int] = set()
        self.active = True
        self.zero_init_depth = 0
        self.builder_depth = 0
        self.built_by: dict[str, Any] | None = None
        """How the last model was built by transformers: ``from_pretrained`` or ``from_config``,
        and whether a DeepSpeed ZeRO-3 config (HfDeepSpeedConfig) was alive then."""

    def guarded(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        if name in self.disabled:
            return None
        try:
            return fn(*args)
        except OSError as exc:  # the disk or /proc, not the hook: try again next time
            self.warn_once(f"hook-io:{name}", f"memdiag hook {name} hit an I/O error (it stays on): {exc!r}")
            return None
        except Exception as exc:
            self.disabled.add(name)
            self.warn_once(f"hook:{name}", f"memdiag hook {name} failed and is now off: {exc!r}")
            return None

    def phase_wrapper(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not self.active:
                return fn(*args, **kwargs)
            self.guarded(phase, self.tracker.begin, phase)
            try:
                return fn(*args, **kwargs)
            finally:
                self.guarded(phase, self.tracker.end, phase)

        return wrapper

    def name_layers(self, engine: Any) -> None:
        if id(engine) in self.named_engines:
            return
        self.named_engines.add(id(engine))
        for name, module in engine.module.named_modules():
            module._memdiag_layer = layer_name(name)

    def on_forward(self, args: tuple, kwargs: dict, output: Any) -> None:
        if self.step_t0 is None:
            self.step_t0 = time.perf_counter()
        ids = kwargs.get("input_ids", args[0] if args else None)
        if hasattr(ids, "numel"):
            self.tokens += int(ids.numel())
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, dict):
            loss = output.get("loss")
        if loss is None and hasattr(output, "dim") and output.dim() == 0:
            loss = output
        if loss is not None:
            self.micro_losses.append(loss.detach())

    def record_memory(self, engine: Any, phase: str) -> None:
        device = self.tracker.device
        on_device = "cuda" if device is not None and not device.is_host_memory else None
        totals = categories.measure(engine, self.activations_bytes, on_device)
        reconciliation = {}
        if device is not None:
            figures = device.read(with_nvml=True)
            allocator = figures.allocated_bytes
            source = device.source
            if on_device:  # what nvidia-smi shows beside torch: the cache, and memory outside torch
                reconciliation = {"reserved_bytes": figures.reserved_bytes, "nvml_used_bytes": figures.nvml_used_bytes,
                                  "alloc_retries": figures.alloc_retries, "ooms": figures.ooms}
        else:
            allocator = self.tracker.read_rss()
            source = "process RSS"
        record = {
            "kind": fmt.MEMORY,
            "t": time.time_ns(),
            "phase": phase,
            "step": self.tracker.step,
            "allocator_bytes": allocator,
            "allocator_source": source,
        }
        on = {name: value for name, value in totals.items() if not name.startswith("host_")}
        record.update({f"{name}_bytes": value for name, value in totals.items()})
        record["other_bytes"] = allocator - sum(on.values())
        record.update(reconciliation)
        self.tracker.emit(record)

    def record_model(self, engine: Any) -> None:
        """What was built: true parameter count (ZeRO-3 partitioned ones by ``ds_numel``)."""
        device = self.tracker.device
        if device is not None:  # the device the engine runs on, once it exists
            device.bind(getattr(getattr(engine, "device", None), "index", None))
        params = list(engine.module.parameters())
        self.tracker.emit(
            {
                "kind": fmt.MODEL,
                "t": time.time_ns(),
                "num_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in params),
                "zero_stage": int(engine.zero_optimization_stage()),
                "dtype": str(next((p.dtype for p in params), None)),
                "model_class": type(engine.module).__name__,
            }
        )

    def record_malloc(self, after: str, **extra: Any) -> None:
        """glibc's freed-but-kept bytes after a phase (the not_released evidence)."""
        stats = read_malloc_stats()
        if stats is not None:
            record = {"kind": fmt.MALLOC, "t": time.time_ns(), "after": after, "rss_bytes": self.tracker.read_rss()}
            self.tracker.emit(record | asdict(stats) | extra)

    def record_model_input(self, model: Any, config: Any) -> None:
        """The model as handed to deepspeed.initialize: already partitioned (built under
        zero.Init) or whole on this rank, in which dtype, and how it was built (the 5290
        evidence)."""
        if model is None or not hasattr(model, "parameters"):
            return
        params = list(model.parameters())
        partitioned = any(hasattr(p, "ds_id") for p in params)
        materialised = sum(p.numel() * p.element_size() for p in params if not hasattr(p, "ds_id"))
        built = self.built_by or {"via": "constructor", "hf_deepspeed_config": _hf_zero3_enabled()}
        self.tracker.emit(
            {
                "kind": fmt.MODEL_INPUT,
                "t": time.time_ns(),
                "partitioned": partitioned,
                "dtype": str(next((p.dtype for p in params), None)),
                "materialised_bytes": materialised,
                "num_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in params),
                "model_class": type(model).__name__,
                "built_by": built["via"],
                "hf_deepspeed_config": built["hf_deepspeed_config"],
                "zero_stage": _zero_stage(config),
            }
        )

    def note_builder(self, via: str) -> None:
        self.built_by = {"via": via, "hf_deepspeed_config": _hf_zero3_enabled()}

    def on_step(self, engine: Any, steps_before: int) -> None:
        if engine.global_steps == steps_before:
            return  # inside gradient accumulation
        losses = [float(loss) for loss in self.micro_losses]
        elapsed = time.perf_counter() - self.step_t0 if self.step_t0 is not None else 0.0
        record = StepRecord(
            step=int(engine.global_steps),
            loss=sum(losses) / len(losses) if losses else None,
            tokens=self.tokens,
            step_time_s=elapsed,
        )
        self.micro_losses, self.tokens, self.step_t0 = [], 0, None
        self.tracker.record_step(record)


def _hf_zero3_enabled() -> bool:
    """Whether transformers sees a ZeRO-3 DeepSpeed config (HfDeepSpeedConfig, or
    TrainingArguments(deepspeed=...)) and so builds models under zero.Init itself."""
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return bool(is_deepspeed_zero3_enabled())


def _zero_stage(config: Any) -> int | None:
    """The ZeRO stage a ``deepspeed.initialize(config=...)`` asks for (a dict or a JSON path)."""
    if isinstance(config, (str, bytes)) or hasattr(config, "__fspath__"):
        import json

        try:
            with open(config) as f:
                config = json.load(f)
        except (OSError, ValueError):
            return None
    if isinstance(config, dict):
        stage = (config.get("zero_optimization") or {}).get("stage")
        return int(stage) if isinstance(stage, (int, str)) and str(stage).isdigit() else None
    return None


def _patch(owner: Any, name: str, replacement: Any) -> None:
    _ORIGINALS.append((owner, name, owner.__dict__.get(name, getattr(owner, name))))
    setattr(owner, name, replacement)


LOAD_PHASE = "load"
"""From memdiag's start in the process (before the script's imports) to deepspeed.initialize:
where a model is built and loaded, whoever's code does it."""


def install(tracker: PhaseTracker, warn_once: Callable[[str, str], None]) -> None:
    """Patch DeepSpeed's (and transformers') classes; once per process, before the model."""
    import deepspeed
    import torch
    from deepspeed.runtime.engine import DeepSpeedEngine

    if _ORIGINALS:
        return
    hooks = _Hooks(tracker, warn_once)
    _INSTALLED.append(hooks)

    init_cls = deepspeed.zero.Init
    enter, exit_ = init_cls.__enter__, init_cls.__exit__

    @functools.wraps(enter)
    def zero_init_enter(self: Any) -> Any:
        hooks.guarded("zero_init", tracker.begin, "zero_init")
        return enter(self)

    @functools.wraps(exit_)
    def zero_init_exit(self: Any, *exc: Any) -> Any:
        try:
            return exit_(self, *exc)
        finally:
            hooks.guarded("zero_init", tracker.end, "zero_init")

    _patch(init_cls, "__enter__", zero_init_enter)
    _patch(init_cls, "__exit__", zero_init_exit)
    ds_initialize = hooks.phase_wrapper("ds_initialize", deepspeed.initialize)

    @functools.wraps(deepspeed.initialize)
    def initialize(*args: Any, **kwargs: Any) -> Any:
        # the load phase (process start to here) ends as DeepSpeed takes the model over
        hooks.guarded("load_phase", tracker.end_if_innermost, LOAD_PHASE)
        model = kwargs.get("model", args[1] if len(args) > 1 else None)
        config = kwargs.get("config", kwargs.get("config_params"))
        hooks.guarded("model_event", hooks.record_model_input, model, config)
        result = ds_initialize(*args, **kwargs)
        hooks.guarded("model_event", hooks.record_model, result[0])
        hooks.guarded("malloc_event", hooks.record_malloc, "ds_initialize")
        return result

    _patch(deepspeed, "initialize", initialize)

    forward = DeepSpeedEngine.forward

    @functools.wraps(forward)
    def engine_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not hooks.active:
            return forward(self, *args, **kwargs)
        hooks.guarded("layers", hooks.name_layers, self)
        hooks.guarded("forward", tracker.begin, "forward")
        hooks.saved.reset()
        try:
            with torch.autograd.graph.saved_tensors_hooks(hooks.saved.pack, hooks.saved.unpack):
                output = forward(self, *args, **kwargs)
        finally:
            tracker.set_module(None)
            hooks.guarded("forward", tracker.end, "forward")
        hooks.activations_bytes = hooks.saved.total_bytes
        hooks.guarded("memory", hooks.record_memory, self, "forward")
        hooks.guarded("step_accounting", hooks.on_forward, args, kwargs, output)
        return output

    backward = DeepSpeedEngine.backward

    @functools.wraps(backward)
    def engine_backward(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not hooks.active:
            return backward(self, *args, **kwargs)
        hooks.guarded("backward", tracker.begin, "backward")
        try:
            return backward(self, *args, **kwargs)
        finally:
            tracker.set_module(None)
            hooks.guarded("backward", tracker.end, "backward")
            hooks.activations_bytes = 0
            hooks.saved.reset()
            hooks.guarded("memory", hooks.record_memory, self, "backward")

    step = DeepSpeedEngine.step

    @functools.wraps(step)
    def engine_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not hooks.active:
            return step(self, *args, **kwargs)
        steps_before = self.global_steps
        hooks.guarded("step", tracker.begin, "step")
        try:
            result = step(self, *args, **kwargs)
        finally:
            hooks.guarded("step", tracker.end, "step")
        hooks.guarded("memory", hooks.record_memory, self, "step")
        hooks.guarded("step_accounting", hooks.on_step, self, steps_before)
        return result

    _patch(DeepSpeedEngine, "forward", engine_forward)
    _patch(DeepSpeedEngine, "backward", engine_backward)
    _patch(DeepSpeedEngine, "step", engine_step)
    for method, phase in (("save_checkpoint", "checkpoint_save"), ("load_checkpoint", "checkpoint_load")):
        _patch(DeepSpeedEngine, method, hooks.phase_wrapper(phase, getattr(DeepSpeedEngine, method)))

    # internals that move between DeepSpeed versions: a missing one costs its feature, said once
    for feature, installer in (("layer attribution and the ZeRO-3 optimizer step", _install_zero3),
                               ("from_pretrained/from_config phases", _install_transformers_hooks)):
        try:
            installer(hooks, tracker)
        except (ImportError, AttributeError) as exc:
            warn_once(f"hook-missing:{feature}", f"{feature} unavailable with DeepSpeed {deepspeed.__version__}: {exc}")


def _install_zero3(hooks: _Hooks, tracker: PhaseTracker) -> None:
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    fetch = PartitionedParameterCoordinator.fetch_sub_module

    @functools.wraps(fetch)
    def fetch_sub_module(self: Any, current_submodule: Any, *args: Any, **kwargs: Any) -> Any:
        name = getattr(current_submodule, "_memdiag_layer", None)
        if name is not None and hooks.active:
            hooks.guarded("layers", tracker.set_module, name)
        return fetch(self, current_submodule, *args, **kwargs)

    _patch(PartitionedParameterCoordinator, "fetch_sub_module", fetch_sub_module)
    _patch(
        DeepSpeedZeroOptimizer_Stage3,
        "step",
        hooks.phase_wrapper("optimizer_step", DeepSpeedZeroOptimizer_Stage3.step),
    )


def _install_transformers_hooks(hooks: _Hooks, _tracker: PhaseTracker) -> None:
    _install_transformers(hooks)


def _install_transformers(hooks: _Hooks) -> None:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return
    original = PreTrainedModel.from_pretrained.__func__

    @functools.wraps(original)
    def from_pretrained(cls: Any, *args: Any, **kwargs: Any) -> Any:
        return _building(hooks, "from_pretrained", hooks.phase_wrapper("checkpoint_load", original), cls, *args, **kwargs)

    _patch(PreTrainedModel, "from_pretrained", classmethod(from_pretrained))
    from_config_original = PreTrainedModel._from_config.__func__

    @functools.wraps(from_config_original)
    def from_config(cls: Any, *args: Any, **kwargs: Any) -> Any:
        return _building(hooks, "from_config", from_config_original, cls, *args, **kwargs)

    _patch(PreTrainedModel, "_from_config", classmethod(from_config))

    from memdiag import loading  # memdiag's own lean loader: its checkpoint read is a phase too

    _patch(loading, "load_into_zero3", hooks.phase_wrapper("checkpoint_load", loading.load_into_zero3))


def uninstall() -> None:
    while _ORIGINALS:
        owner, name, original = _ORIGINALS.pop()
        setattr(owner, name, original)


def _building(hooks: _Hooks, via: str, build: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Note the outermost transformers builder of a model (``from_pretrained`` may call
    ``_from_config`` inside)."""
    if hooks.builder_depth == 0:
        hooks.guarded("builder", hooks.note_builder, via)
    hooks.builder_depth += 1
    try:
        return build(*args, **kwargs)
    finally:
        hooks.builder_depth -= 1
