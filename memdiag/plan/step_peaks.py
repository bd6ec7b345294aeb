"""The activation memory of one training step by stage, counted from the model's own forward and
backward in FakeTensorMode (no memory is allocated, every storage is sized).

A step's activation memory peaks in one of three stages that never overlap:

- ``forward``: the layers' saved tensors and the loss being computed (the logits and their fp32 copy);
- ``head``: the backward of the loss, lm_head and final norm, with every layer's saved tensors (or,
  under activation checkpointing, each layer's checkpointed input) still held;
- ``layers``: the backward of the decoder layers, after the head's tensors are freed; under
  checkpointing the layer being recomputed holds its full activations only here.

Summing the head's tensors and a recomputed layer (as a formula of saved bytes does) counts
memory that is never live at once. Each stage's peak is ``layers x (x s + y s^2) + (u s + v s^2 + w)``
per sequence of the micro-batch, fitted on two layer counts and three sequence lengths (1k-4k:
FakeTensorMode costs the same at any size). A fit is exact while its stage peaks at the same point
as at the probes (tests/unit/test_step_peaks.py: a direct count at 5 layers and 1.5k or 8k tokens);
eager attention's forward, whose peak moves into a layer's scores past the probes, is the known
exception, and it never binds under checkpointing. bench/step_peaks.py puts the step's peak beside
a real bf16 CPU step's (0.99-1.03).

A parameter's gradient is live from the op that makes it until it is accumulated
(``register_post_accumulate_grad_hook``), where ZeRO takes it: into its reduce bucket, or, when it
is larger than the bucket (the lm_head's, the embedding's), reduce-scattered from its own storage
(``stage3.__add_grad_to_ipg_bucket``; ``stage_1_and_2``'s extra-large parameter). The stage fits
count the activations without it; each window in which a gradient of ``g`` bytes is live is fitted
apart (``<stage>+grad:<g>``: the activations live while it is), so a plan adds ``g`` only to what is
live beside it, never to the stage's peak elsewhere. A tied embedding's head part is held by the
autograd engine from the head's backward until the embedding's part is added to it at the end: it
is counted there, in the layers' stage, as the engine's buffer.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

STAGES = ("forward", "head", "layers")
PROBE_LAYERS = (1, 2)
PROBE_SEQ = (1024, 2048, 4096)


@dataclass(frozen=True, kw_only=True)
class StageFit:
    """Bytes live at a stage's peak for one sequence: ``layers x (x s + y s^2) + u s + v s^2 + w``."""

    x: float
    y: float
    u: float
    v: float
    w: float

    def per_layer(self, seq: int) -> tuple[float, float]:
        """(s-linear, s^2) bytes each layer holds through the stage."""
        return self.x * seq, self.y * seq * seq

    def once(self, seq: int, batch: int = 1) -> float:
        """Bytes held once, not per layer (the head's tensors, a recomputed layer, transients)."""
        return batch * (self.u * seq + self.v * seq * seq) + self.w

    def at(self, layers: int, seq: int, batch: int = 1) -> float:
        linear, squared = self.per_layer(seq)
        return batch * layers * (linear + squared) + self.once(seq, batch)


@dataclass(frozen=True, kw_only=True)
class StepPeaks:
    plain: dict[str, StageFit]
    checkpointed: dict[str, StageFit] | None
    """None when the model cannot checkpoint its layers (it then plans with the formula's stages)."""
    attention: str
    dtype: str

    def stages(self, checkpointing: bool) -> dict[str, StageFit] | None:
        return self.checkpointed if checkpointing else self.plain

    @classmethod
    def from_dict(cls, data: dict) -> StepPeaks:
        def fits(d):
            return None if d is None else {k: StageFit(**v) for k, v in d.items()}

        return cls(plain=fits(data["plain"]), checkpointed=fits(data.get("checkpointed")),
                   attention=data["attention"], dtype=data["dtype"])


GRAD = "+grad:"
"""Key of a gradient window's fit: ``head+grad:1089994752``."""


class LiveBytes:
    """A dispatch mode's bookkeeping: the bytes of every storage an op creates, until it is freed
    (a weak reference to the storage), after every op, with the stage it ran in. Storages alive
    before it starts (parameters, buffers) are not counted, nor are views of them. A parameter's
    gradient, once accumulated (``accumulated``), is taken out of the activations' sums it was in
    and kept beside them, in ``grads``, from the op that made it."""

    def __init__(self, existing: set[int]):
        self.existing = existing
        self.live = 0
        self.stage = "forward"
        self.trace: list[int] = []
        self.grads: list[int] = []
        self.stages: list[str] = []
        self._refs: dict[int, tuple[weakref.ref, int, int]] = {}

    def _free(self, key: int) -> None:
        entry = self._refs.pop(key, None)
        if entry is not None:
            self.live -= entry[1]

    def _add(self, storage) -> None:
        key = storage._cdata
        if key in self._refs or key in self.existing:
            return
        nbytes = storage.nbytes()
        self.live += nbytes
        # born at the trace entry this op is about to write
        self._refs[key] = (weakref.ref(storage, lambda ref, key=key: self._free(key)), nbytes, len(self.trace))

    def accumulated(self, grad) -> None:
        """``grad`` was live from the op that made it until now: in ``grads``, not the activations."""
        entry = self._refs.pop(grad.untyped_storage()._cdata, None)
        if entry is None:
            return
        _, nbytes, born = entry
        self.live -= nbytes
        for i in range(born, len(self.trace)):
            self.trace[i] -= nbytes
            self.grads[i] += nbytes

    def peaks(self) -> dict[str, int]:
        """Each stage's activation peak, and each gradient window's (``<stage>+grad:<bytes>``)."""
        out = dict.fromkeys(STAGES, 0)
        for live, grad, stage in zip(self.trace, self.grads, self.stages):
            if live > out[stage]:
                out[stage] = live
            if grad:
                key = f"{stage}{GRAD}{grad}"
                out[key] = max(out.get(key, 0), live)
        return out

    def mode(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        tracker._add(t.untyped_storage())
                tracker.trace.append(tracker.live)
                tracker.grads.append(0)
                tracker.stages.append(tracker.stage)
                return out

        return _Mode()


@contextlib.contextmanager
def _real_masks():
    """transformers takes a FakeTensor offset for a traced graph and then builds the s x s causal
    mask that a real training forward (no cache, offset 0, no padding) skips for SDPA's is_causal
    (masking_utils._ignore_causal_mask_sdpa): count what the real run allocates."""
    try:
        from transformers import masking_utils
    except ImportError:
        yield
        return
    original = getattr(masking_utils, "_ignore_causal_mask_sdpa", None)
    if original is None:
        yield
        return
    import torch

    def untraced(padding_mask, q_length, kv_length, q_offset, kv_offset, *args, **kwargs):
        if padding_mask is None:
            q_offset = 0 if isinstance(q_offset, torch.Tensor) else q_offset
            kv_offset = 0 if isinstance(kv_offset, torch.Tensor) else kv_offset
        return original(padding_mask, q_length, kv_length, q_offset, kv_offset, *args, **kwargs)

    masking_utils._ignore_causal_mask_sdpa = untraced
    try:
        yield
    finally:
        masking_utils._ignore_causal_mask_sdpa = original


def decoder_layers(model) -> list:
    """The repeated decoder layers: the longest ``ModuleList`` in the model."""
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return max(lists, key=len) if lists else []


def enable_checkpointing(model) -> bool:
    """Checkpoint every decoder layer as the HF Trainer's ``--gradient_checkpointing`` does."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    try:
        if enable is not None:
            enable()
        else:
            model.gradient_checkpointing_enable()
    except (ValueError, AttributeError, TypeError, NotImplementedError):
        return False
    return True


def measure(model, ids) -> dict[str, int]:
    """Each stage's peak for one forward and backward of ``model`` (built in FakeTensorMode) on ``ids``."""
    import torch
    from torch.utils._pytree import tree_flatten

    existing = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    tracker = LiveBytes(existing)
    layers = decoder_layers(model)
    last = layers[-1] if len(layers) else None
    after_last = {"armed": False}

    def last_done(module, args, output):
        if tracker.stage == "forward":
            after_last["armed"] = True

    def to_layers(_grad):
        tracker.stage = "layers"

    def first_after_last(module, args):
        # the first module the forward calls after the last layer (the final norm) takes its output:
        # that tensor's gradient is where the layers' backward begins, inside or outside a checkpoint
        if tracker.stage != "forward" or not after_last["armed"] or module is last:
            return
        for t in tree_flatten(args)[0]:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(to_layers)
                after_last["armed"] = False
                return

    trainable = [p for p in model.parameters() if p.requires_grad]
    handles = [p.register_post_accumulate_grad_hook(_drop_grad(tracker)) for p in trainable]
    if last is not None:
        handles.append(last.register_forward_hook(last_done))
    handles.append(torch.nn.modules.module.register_module_forward_pre_hook(first_after_last))
    try:
        with tracker.mode(), _real_masks():
            loss = model(input_ids=ids, labels=ids).loss
            tracker.stage = "head"
            loss.backward()
    finally:
        for h in handles:
            h.remove()
    return tracker.peaks()


def _drop_grad(tracker: LiveBytes):
    def drop(param):
        # AccumulateGrad keeps the gradient the op made (or, when its layout differs from the
        # parameter's, a copy, the original then freed as an activation would be)
        tracker.accumulated(param.grad)
        param.grad = None  # ZeRO has taken it

    return drop


def fit(measured: dict[tuple[int, int], dict[str, int]]) -> dict[str, StageFit]:
    """Each stage's fit from its peaks at ``PROBE_LAYERS`` x ``PROBE_SEQ``."""
    import numpy as np

    l1, l2 = PROBE_LAYERS
    seqs = np.array(PROBE_SEQ, dtype=float)
    fits = {}
    # a gradient window is fitted where every probe has it (the same parameters at any depth and length)
    keys = [k for k in measured[l1, PROBE_SEQ[0]] if all(k in m for m in measured.values())]
    for stage in keys:
        one = np.array([measured[l1, s][stage] for s in PROBE_SEQ], dtype=float)
        two = np.array([measured[l2, s][stage] for s in PROBE_SEQ], dtype=float)
        per_layer = (two - one) / (l2 - l1)
        x, y = np.linalg.lstsq(np.stack([seqs, seqs**2], axis=1), per_layer, rcond=None)[0]
        once = one - l1 * (x * seqs + y * seqs**2)
        u, v, w = np.linalg.solve(np.stack([seqs, seqs**2, np.ones_like(seqs)], axis=1), once)
        fits[stage] = StageFit(x=float(x), y=float(y), u=float(u), v=float(v), w=float(w))
    return fits


def count(build, *, vocab: int, dtype: str, attention: str, context=contextlib.nullcontext) -> StepPeaks:
    """``build(layers)``: the model with that many decoder layers, in training mode (called inside
    FakeTensorMode); ``context()``: what the step runs under (the attention backend)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    results: dict[bool, dict[str, StageFit] | None] = {}
    for checkpointing in (False, True):
        measured = {}
        for layers in PROBE_LAYERS:
            with FakeTensorMode(allow_non_fake_inputs=True):
                model = build(layers)
                if checkpointing and not enable_checkpointing(model):
                    break
                for seq in PROBE_SEQ:
                    with context():
                        measured[layers, seq] = measure(model, torch.randint(0, vocab, (1, seq)))
        results[checkpointing] = fit(measured) if len(measured) == len(PROBE_LAYERS) * len(PROBE_SEQ) else None
    return StepPeaks(plain=results[False], checkpointed=results[True], attention=attention, dtype=dtype)
