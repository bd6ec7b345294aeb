"""DeepSpeed instrumentation by class patching, so models and engines built anywhere are seen.

Patched: ``deepspeed.zero.Init`` (enter/exit -> phase ``zero_init``), ``deepspeed.initialize``
(``ds_initialize``), ``DeepSpeedEngine.forward/backward/step`` (``forward``/``backward``/
``step`` per micro-step; a ``step`` record at each gradient-accumulation boundary with loss,
tokens and step time). A hook that fails records the error once and disables itself; the
wrapped call always runs.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable

from memdiag.phases import PhaseTracker, StepRecord

log = logging.getLogger(__name__)

_ORIGINALS: list[tuple[Any, str, Any]] = []


class _Hooks:
    def __init__(self, tracker: PhaseTracker, warn_once: Callable[[str, str], None]) -> None:
        self.tracker = tracker
        self.warn_once = warn_once
        self.disabled: set[str] = set()
        self.micro_losses: list[Any] = []
        self.tokens = 0
        self.step_t0: float | None = None

    def guarded(self, name: str, fn: Callable[..., Any], *args: Any) -> None:
        if name in self.disabled:
            return
        try:
            fn(*args)
        except Exception as exc:
            self.disabled.add(name)
            self.warn_once(f"hook:{name}", f"memdiag hook {name} failed and is now off: {exc!r}")

    def phase_wrapper(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.guarded(phase, self.tracker.begin, phase)
            try:
                return fn(*args, **kwargs)
            finally:
                self.guarded(phase, self.tracker.end, phase)

        return wrapper

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


def _patch(owner: Any, name: str, replacement: Any) -> None:
    _ORIGINALS.append((owner, name, owner.__dict__.get(name, getattr(owner, name))))
    setattr(owner, name, replacement)


def install(tracker: PhaseTracker, warn_once: Callable[[str, str], None]) -> None:
    """Patch DeepSpeed's classes; call once per process, before the model is built."""
    import deepspeed
    from deepspeed.runtime.engine import DeepSpeedEngine

    if _ORIGINALS:
        return
    hooks = _Hooks(tracker, warn_once)

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
    _patch(deepspeed, "initialize", hooks.phase_wrapper("ds_initialize", deepspeed.initialize))

    forward = DeepSpeedEngine.forward

    @functools.wraps(forward)
    def engine_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        hooks.guarded("forward", tracker.begin, "forward")
        try:
            output = forward(self, *args, **kwargs)
        finally:
            hooks.guarded("forward", tracker.end, "forward")
        hooks.guarded("step_accounting", hooks.on_forward, args, kwargs, output)
        return output

    step = DeepSpeedEngine.step

    @functools.wraps(step)
    def engine_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        steps_before = self.global_steps
        hooks.guarded("step", tracker.begin, "step")
        try:
            result = step(self, *args, **kwargs)
        finally:
            hooks.guarded("step", tracker.end, "step")
        hooks.guarded("step_accounting", hooks.on_step, self, steps_before)
        return result

    _patch(DeepSpeedEngine, "forward", engine_forward)
    _patch(DeepSpeedEngine, "backward", hooks.phase_wrapper("backward", DeepSpeedEngine.backward))
    _patch(DeepSpeedEngine, "step", engine_step)


def uninstall() -> None:
    while _ORIGINALS:
        owner, name, original = _ORIGINALS.pop()
        setattr(owner, name, original)
