"""The memory model: every term named, in bytes, per device and per node.

Activation terms count the tensors autograd saves for backward in the Baichuan2 layer (the
same figure memdiag measures with ``saved_tensors_hooks``), per layer, with b = micro-batch,
s = sequence, h = hidden, i = intermediate, a = heads, v = vocabulary, in bf16:
two RMSNorms 8sbh each (fp32 square input, input, normalised), W_pack input 2sbh, q/k/v 6sbh,
o_proj input 2sbh, gate/up input 2sbh -> 28 sbh; the ALiBi attention scores and their softmax
(plain attention materialises both) 4 a s^2 b; SwiGLU 8 sbi. Head: final norm + lm_head input
10 sbh, log-softmax output in fp32 4 sbv, the normalised head weight 2 vh.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from memdiag.plan.model import Architecture
from memdiag.plan.step_peaks import GRAD, StageFit


@dataclass(frozen=True, kw_only=True)
class Coefficients:
    """Bytes per element of each activation shape; ``calibrate`` fits them from runs."""

    layer_sbh: float = 28.0
    layer_as2b: float = 4.0
    """Plain attention: the masked, clamped scores (saved by ``torch.max``) and the softmax."""
    layer_as2b_sdpa_math: float = 2.0
    """SDPA's math path (what a float ALiBi mask gets): only the softmax output is saved."""
    layer_sbi: float = 8.0
    head_sbh: float = 10.0
    head_sbv: float = 4.0
    backward_transient_as2b: float = 4.0
    """Gradient of the scores and of the softmax, alive together in a layer's backward."""
    backward_transient_sbv: float = 6.0
    """Gradient of the logits (fp32) and its bf16 cast."""
    allocator_reserve_fraction: float = 0.05
    """ZeRO-1/2: the caching allocator's reserve and fragmentation over the allocated peak
    (an assumption)."""
    allocator_reserve_layers: float = 11.1
    """ZeRO-3: what the caching allocator holds reserved above the allocated peak, in decoder
    layers' worth of gathered 16-bit parameters (each layer's all-gather buffers are freed on
    a side stream, and their blocks stay cached). Fitted on the published device figures
    (bench/plan_published.py, leave-one-out there); a fraction of the allocated peak does not
    fit them (0.10 to 3.4 of it, against 8.8 to 19.3 layers). ``plan --calibrate`` refits it from recorded CUDA runs."""
    nccl_buffer_bytes: float = 0.5 * 2**30
    """NCCL's communication buffers per device (channels x peers x NCCL_BUFFSIZE; an assumption)."""
    host_runtime_bytes: float = 0.35 * 2**30
    """One rank's host RAM before the model: Python, torch, DeepSpeed, transformers."""
    host_dataloader_worker_bytes: float = 12 * 2**20
    """What a forked DataLoader worker of a torch process holds of its own (USS) with a dataset it
    shares (numpy): its stack, batches and the interpreter pages it writes. Measured by
    bench/dataloader_workers.py (torch 2.13, CPU)."""
    # The three CPU-accelerator coefficients below default to what bench/plan_accuracy.py
    # fitted on six recorded runs (tiny and base, 1, 2 and 4 ranks; docs/DESIGN.md,
    # "Calibration"): without them the planned host peak of a CPU run was 41-52% low.
    host_state_factor: float = 1.72
    """CPU accelerator: host RAM per byte of training state (parameters, gradients, optimizer
    states) while training; above 1 by the optimizer step's fp32 temporaries."""
    host_bytes_per_model_param: float = 6.1
    """CPU accelerator: host RAM per parameter of the whole model on every rank (ZeRO-3's
    buckets and gathered layers are sized by the model, not the partition)."""
    host_offload_retained_bytes_per_param: float = 4.3
    """CPU offload: host RAM per offloaded parameter (of a rank's partition) that the process
    keeps after the freed transients of building the offload layout (the partitions copied into
    the flat parameter buffer, the copies that become the fp32 masters): RSS minus DeepSpeed's
    named host tensors, measured on DeepSpeed 0.19.8 by bench/offload_layout.py (24.3 B of RSS
    per parameter against 20.0 B of tensors, median of three runs; single runs ranged from 23.5
    to 25.2 B, glibc's reuse of freed chunks varies)."""
    host_rank_fixed_bytes: float = 160 * 2**20
    """CPU accelerator: host RAM a training rank adds whatever the model (communication
    buffers, allocator arenas, threads)."""
    source: str = "derived"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Training settings the terms depend on (``key=value`` overrides, as in ``memdiag run``)."""

    zero_stage: int = 3
    micro_batch: int = 1
    seq_len: int = 2048
    grad_accum: int = 1
    dtype: str = "bf16"
    attention: str = "plain"
    """``plain`` (matmul, mask, max, softmax: our model's path), ``sdpa_math``
    (``F.scaled_dot_product_attention`` with a float mask, no fused kernel) or ``fused``
    (flash / memory-efficient kernels: no s^2 tensor kept)."""
    activation_checkpointing: bool = False
    dataloader_workers: int = 0
    """Forked DataLoader workers per rank (``host_terms``: ``dataloader_workers``)."""
    dataloader_dataset_bytes: float = 0.0
    """The dataset's Python objects per rank, which each worker copies as it reads them."""
    fused_cross_entropy: bool = False
    """A fused linear cross-entropy (Liger's): no full logits or logits gradient (``activation_terms``)."""
    optimizer: str = "fused"
    """How Adam steps a partition (``OPTIMIZER_STEP_TEMPORARIES``): ``fused``, ``torch_foreach``
    or ``torch_for_loop``; ``memdiag.plan.inputs.optimizer_path`` resolves ``auto``."""
    offload: str = "none"
    """``none``, ``optimizer`` (states to CPU) or ``params`` (states and parameters to CPU)."""
    load: str = "reference"
    """``reference`` (full copy per rank), ``zero_init``, ``rank0_broadcast``."""
    load_dtype: str | None = None
    """dtype of the full copy in ``reference`` loading; None: fp32 (no dtype given)."""
    checkpoint_format: str = "bin"
    """``bin`` (pickle, read whole), ``safetensors`` (mmap, shared once per node), or ``none``
    (random initialisation: no checkpoint read)."""
    checkpoint_shards: int = 3
    """Shards of the checkpoint (Baichuan2-13B-Base ships three .bin files); one is in memory
    at a time while a rank reads it."""
    pin_memory: bool = False
    """``offload_*.pin_memory`` as the run resolves it (``memdiag.plan.inputs``: the
    ds_config's, else the installed DeepSpeed's default)."""
    save_16bit_weights: bool = False
    """``stage3_gather_16bit_weights_on_model_save`` (what HF's save_model needs under ZeRO-3)."""
    save: bool = False
    """The run saves a checkpoint: the ``save`` phase is judged."""
    resume: bool = False
    """The run resumes from a checkpoint: the ``resume`` phase is judged."""
    guard_fraction: float = 0.95
    """memdiag's guard stops a run whose ranks pass this fraction of the host limit: a layout
    past it does not fit a run memdiag watches."""
    ds_buffers: dict = field(default_factory=dict)
    """``stage3_max_live_parameters``, ``stage3_prefetch_bucket_size``, ``reduce_bucket_size``,
    ``allgather_bucket_size``, ``sub_group_size`` from the ds_config (elements)."""

    @property
    def phases(self) -> tuple[str, ...]:
        """The host phases this run goes through, in order: the ones its verdict judges."""
        return tuple(p for p in HOST_PHASES if p not in ("save", "resume") or getattr(self, p))

    @property
    def flash_attn(self) -> bool:
        return self.attention == "fused"


DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


DEVICE_USED_ONLY = ("allocator_reserve", "runtime_context", "nccl_buffers")
"""Device terms that are not tensors: in nvidia-smi's "used", not in torch's ``max_memory_allocated``."""


OPTIMIZER_STEP_TEMPORARIES = {"fused": 0, "torch_foreach": 1, "torch_for_loop": 2}
"""fp32 tensors of the stepped partition's size that Adam allocates while it steps (torch
2.x ``optim/adam.py``): the fused kernels (DeepSpeed's FusedAdam, torch's ``fused=True``) update
in place; ``_multi_tensor_adam`` makes ``exp_avg_sq_sqrt = _foreach_sqrt(exp_avg_sqs)`` and works
in place on it; ``_single_tensor_adam`` makes ``exp_avg_sq.sqrt()`` and its quotient by
``bias_correction2_sqrt`` before the in-place ``add_(eps)``. Measured: bench/optimizer_temporaries.py."""


SCORE_TENSORS = {"plain": 1.0, "sdpa_math": 0.5, "fused": 0.0}
"""s x s tensors a layer saves, relative to plain attention (scores and softmax: two)."""


def _measured_layer(arch: Architecture, s: Settings) -> tuple[float, float, float] | None:
    """(per layer s-linear bytes, per layer s^2 bytes, head bytes) from the counted forward,
    for the micro-batch; None when the architecture was not counted."""
    saved = arch.facts.saved if arch.facts is not None else None
    if saved is None:
        return None
    b, seq = s.micro_batch, s.seq_len
    scale = DTYPE_BYTES[s.dtype] / DTYPE_BYTES[saved.dtype]
    squared = saved.layer_per_token_squared * seq * seq
    if saved.attention != s.attention:
        # a model that runs one attention path (the case's own): the s^2 part scales with the
        # number of score tensors the requested path keeps
        squared *= SCORE_TENSORS[s.attention] / SCORE_TENSORS[saved.attention] if SCORE_TENSORS[saved.attention] else 0.0
    return saved.layer_per_token * seq * b * scale, squared * b * scale, (saved.head_per_token * seq * b + saved.head_fixed) * scale


def persistent_elements(arch: Architecture, param_threshold: float, model_threshold: float = float("inf")) -> int:
    """Elements ZeRO-3 keeps gathered on every rank after their first use (``ds_persist``):
    ``DeepSpeedZeRoOffload.mark_persistent_parameters`` walks the parameters in order and marks
    each of at most ``stage3_param_persistence_threshold`` elements while the total stays within
    ``stage3_model_persistence_threshold``. Measured: bench/zero3_persistence.py."""
    # the same for every layout: kept on the architecture (the search asks ~10^5 times)
    cache = arch.__dict__.setdefault("_persistent_elements", {})
    key = (param_threshold, model_threshold)
    if key not in cache:
        total = 0
        for numel in arch.tensor_numels:
            if numel + total > model_threshold:
                continue
            if numel <= param_threshold:
                total += numel
        cache[key] = total
    return cache[key]


def _saved_terms(arch: Architecture, s: Settings, c: Coefficients) -> tuple[float, float, float, float, float]:
    """(kept per layer, kept scores per layer, one layer's saved, its scores, the head's saved) at the
    end of the forward, from the counted forward when ``arch.facts`` has it, else the formula above;
    under checkpointing a layer keeps its input only."""
    b, seq, h, i, a, v = s.micro_batch, s.seq_len, arch.hidden_size, arch.intermediate_size, arch.num_heads, arch.vocab_size
    scale = DTYPE_BYTES[s.dtype] / 2
    layer = (c.layer_sbh * seq * b * h + c.layer_sbi * seq * b * i) * scale
    per_score = {"plain": c.layer_as2b, "sdpa_math": c.layer_as2b_sdpa_math, "fused": 0.0}[s.attention]
    scores = per_score * a * seq * seq * b * scale
    head = c.head_sbh * seq * b * h * scale + c.head_sbv * seq * b * v + 2 * v * h * scale
    measured = _measured_layer(arch, s)
    if measured is not None:
        layer, scores, head = measured
    if s.fused_cross_entropy:
        head = fused_linear_ce_bytes(b * seq, h, v, DTYPE_BYTES[s.dtype])
    if s.activation_checkpointing:
        return 2 * seq * b * h * scale, 0.0, layer, scores, head
    return layer, scores, layer, scores, head


def forward_saved_bytes(arch: Architecture, s: Settings, c: Coefficients) -> float:
    """What the forward keeps for the backward (what memdiag measures with ``saved_tensors_hooks``):
    every layer's kept tensors and the head's (under checkpointing, one recomputed layer too)."""
    kept, kept_scores, layer, scores, head = _saved_terms(arch, s, c)
    total = arch.num_layers * (kept + kept_scores) + head
    return total + (layer + scores if s.activation_checkpointing else 0.0)


def _counted_stages(arch: Architecture, s: Settings) -> dict[str, StageFit] | None:
    """Each stage's activation peak of the step (``memdiag.plan.step_peaks``), when the model's
    forward and backward were counted on the attention path planned."""
    peaks = arch.facts.peaks if arch.facts is not None else None
    if peaks is None or peaks.attention != s.attention:
        return None
    return peaks.stages(s.activation_checkpointing)


def activation_terms(arch: Architecture, s: Settings, c: Coefficients) -> dict[str, float]:
    """The step's activation memory at its peak, named. The step passes through stages that never
    overlap (``memdiag.plan.step_peaks``): the forward, the loss's and head's backward with every
    layer's kept tensors, and the layers' backward after the head's tensors are freed (where a
    checkpointed layer is recomputed). The terms are those of the stage with the highest peak:
    ``activations`` and ``attention_scores`` are what every layer keeps through it, the rest is held
    once (``logits_and_loss`` in the forward or the head's backward, ``recomputed_layer`` or
    ``layer_backward`` in the layers', ``fused_linear_cross_entropy`` with Liger's kernel)."""
    b, seq, L = s.micro_batch, s.seq_len, arch.num_layers
    fits = _counted_stages(arch, s)
    if fits is not None:
        scale = DTYPE_BYTES[s.dtype] / DTYPE_BYTES[arch.facts.peaks.dtype]
        stages = {}
        for key, f in fits.items():
            stage, _, grad = key.partition(GRAD)
            if s.fused_cross_entropy and grad and stage != "layers":
                continue  # Liger makes the head's weight gradient in its forward: in its buffers below
            linear, squared = f.per_layer(seq)
            stages[key] = (L * b * linear * scale, L * b * squared * scale, f.once(seq, b) * scale, int(grad or 0) * scale)
        if s.fused_cross_entropy:
            # no logits: the forward and the head's backward hold Liger's buffers over the kept tensors
            fused = fused_linear_ce_bytes(b * seq, arch.hidden_size, arch.vocab_size, DTYPE_BYTES[s.dtype])
            kept, kept_scores, _, _ = stages["head"]
            stages["forward"] = stages["head"] = (kept, kept_scores, fused, 0.0)
    else:
        kept, kept_scores, layer, scores, head = _saved_terms(arch, s, c)
        layer_transient = 0.0 if s.flash_attn else c.backward_transient_as2b * arch.num_heads * seq * seq * b * DTYPE_BYTES[s.dtype] / 2
        head_transient = 0.0 if s.fused_cross_entropy else c.backward_transient_sbv * seq * b * arch.vocab_size
        stages = {"head": (L * kept, L * kept_scores, head + head_transient, 0.0)}
        if s.activation_checkpointing:
            stages["layers"] = (L * kept, 0.0, layer + scores + layer_transient, 0.0)
        else:
            stages["layers"] = (L * kept, L * kept_scores, layer_transient, 0.0)
    binding = max(stages, key=lambda k: sum(stages[k]))
    kept, kept_scores, once, grad = (max(v, 0.0) for v in stages[binding])  # a fit's zero can come out as -1e-9
    if binding.partition(GRAD)[0] == "layers":
        name = "recomputed_layer" if s.activation_checkpointing else "layer_backward"
    else:
        name = "fused_linear_cross_entropy" if s.fused_cross_entropy else "logits_and_loss"
    terms = {"activations": kept, "attention_scores": kept_scores, name: once}
    if grad:
        # a full parameter gradient before ZeRO takes it (the lm_head's, the embedding's)
        terms["parameter_gradient_in_flight"] = grad
    return terms


def fused_linear_ce_bytes(tokens: int, hidden: int, vocab: int, dtype_bytes: int) -> float:
    """Liger's ``fused_linear_cross_entropy_forward`` (liger_kernel/ops/fused_linear_cross_entropy.py):
    the forward computes the loss and the gradients, one chunk of rows at a time, and keeps for the
    backward the gradient of its input (tokens x hidden) and of the head's weight (vocab x hidden),
    beside the input itself; one chunk's logits (``next_power_of_2(tokens / ceil(vocab / hidden))``
    rows x vocab) exist at a time and are overwritten by their gradient. Read from Liger's source:
    its Triton kernels need a GPU, so this term is not measured on the CPU accelerator."""
    inc_factor = -(-vocab // max(hidden, 1))
    rows = -(-tokens // inc_factor)
    chunk = 1 << max(rows - 1, 0).bit_length()
    return dtype_bytes * (2 * tokens * hidden + vocab * hidden + chunk * vocab)


def device_terms(arch: Architecture, s: Settings, world: int, c: Coefficients, act: dict[str, float] | None = None) -> dict[str, float]:
    """Per device. The ZeRO stage decides what is divided by ``world``. ``act``: the
    activation terms when already computed (they do not depend on the layout)."""
    n = arch.num_parameters
    d = DTYPE_BYTES[s.dtype]
    master = 4 if s.dtype != "fp32" else 0  # fp32 master weights next to bf16/fp16 parameters
    stage = s.zero_stage
    params = d * n / (world if stage >= 3 else 1)
    grads = d * n / (world if stage >= 2 else 1)
    optimizer = (master + 8) * n / (world if stage >= 1 else 1)
    if s.offload != "none":
        # the optimizer steps on the host, and each gradient partition is copied out of the
        # reduce bucket into the host's flat gradient buffer: only the buckets stay on the device
        optimizer = grads = 0.0
    if s.offload in ("params", "nvme"):
        params = 0.0
    buffers = s.ds_buffers
    terms = {"parameters": params, "gradients": grads, "optimizer_states": optimizer}
    if stage >= 3:
        layer_params = n / max(arch.num_layers, 1)
        live = min(float(buffers.get("stage3_max_live_parameters", 1e9)), 2 * layer_params)
        terms["zero3_gathered_parameters"] = d * live  # the layer computing and the one prefetched
        # buckets are sized by the ds_config but never larger than what they hold
        terms["zero3_prefetch_bucket"] = d * min(float(buffers.get("stage3_prefetch_bucket_size", 5e7)), n)
        # stage3.py: one reduction buffer per communication dtype, made when contiguous_gradients
        # (the default); overlap_comm reduces on another stream from the same buffer (measured:
        # bench/zero3_persistence.py)
        terms["zero3_reduce_bucket"] = (d * min(float(buffers.get("reduce_bucket_size", 5e8)), n)
                                        if buffers.get("contiguous_gradients", True) else 0.0)
        terms["zero3_persistent_parameters"] = d * persistent_elements(
            arch, float(buffers.get("stage3_param_persistence_threshold", 1e5)),
            float(buffers.get("stage3_model_persistence_threshold", float("inf"))))
    elif stage >= 1:
        # stage_1_and_2.setup_buckets: with contiguous_gradients (the default) one reduce buffer
        # of reduce_bucket_size elements in the training dtype, two with overlap_comm (off by
        # default below stage 3); the allgather runs in place (all_gather_into_tensor) and keeps
        # no bucket. Measured on DeepSpeed's CPU accelerator: bench/zero12_buckets.py
        if buffers.get("contiguous_gradients", True):
            copies = 2 if buffers.get("overlap_comm", False) else 1
            terms["reduce_bucket"] = copies * d * float(buffers.get("reduce_bucket_size", 5e8))
    act = act if act is not None else activation_terms(arch, s, c)
    terms |= act
    # while the optimizer steps, each stepped partition has an fp32 gradient and Adam's
    # temporaries of its size on top of the states
    per_stepped = 4 * (1 + OPTIMIZER_STEP_TEMPORARIES[s.optimizer])
    if stage >= 3 and s.offload == "none":
        # the optimizer step runs one sub-group at a time (stage3._optimizer_step), after the
        # activations are gone: it counts only when it is larger than what it replaces (with
        # offload the step runs on the host)
        step_only = per_stepped * min(float(buffers.get("sub_group_size", 1e9)), n / world)
        terms["step_fp32_grads_above_backward"] = max(0.0, step_only - sum(act.values()))
    elif stage in (1, 2) and s.offload == "none":
        # stage_1_and_2.step: each group's fp32 gradient partition is made from the 16-bit one
        # (which it then frees) before the optimizer steps; the activations and buckets are gone
        step_only = per_stepped * n / world
        replaced = sum(act.values()) + terms.get("reduce_bucket", 0.0) + (grads if stage == 2 else 0.0)
        terms["step_fp32_grads_above_backward"] = max(0.0, step_only - replaced)
    subtotal = sum(terms.values())
    if stage >= 3:
        terms["allocator_reserve"] = c.allocator_reserve_layers * d * arch.largest_layer_params
    else:
        terms["allocator_reserve"] = c.allocator_reserve_fraction * subtotal
    return terms


def host_terms(
    arch: Architecture,
    s: Settings,
    *,
    local_ranks: int,
    world: int,
    runtime_context_bytes: float,
    cpu_accelerator: bool,
    c: Coefficients,
) -> tuple[dict[str, float], dict[str, float]]:
    """Per node: (load-time terms, steady terms). Their sums are the two host peaks."""
    n = arch.num_parameters
    runtime = local_ranks * (c.host_runtime_bytes + runtime_context_bytes)
    load: dict[str, float] = {"runtime_base": runtime}
    copy_bytes = DTYPE_BYTES[s.load_dtype or "fp32"] * n
    shard = 2 * n / max(s.checkpoint_shards, 1)  # checkpoints are published in bf16
    if s.checkpoint_format == "none":
        shard = 0.0
    if s.load == "reference":
        load["model_full_copy_per_rank"] = local_ranks * copy_bytes
        if s.checkpoint_format == "none":
            pass
        elif s.checkpoint_format == "bin":
            load["checkpoint_shard_buffers"] = local_ranks * shard
        else:
            load["checkpoint_mmap_once_per_node"] = shard
    elif s.load == "rank0_broadcast":
        load["model_full_copy_rank0"] = copy_bytes
        if shard:
            load["checkpoint_shard_buffers"] = shard
    else:  # zero_init: one partition per rank
        load["model_partitions"] = local_ranks * DTYPE_BYTES[s.dtype] * n / world if cpu_accelerator else 0.0
        if s.checkpoint_format == "none":
            # random init writes each whole tensor in fp32 and zero.Init broadcasts it to every rank
            load["largest_tensor_in_flight"] = local_ranks * (4 + DTYPE_BYTES[s.dtype]) * arch.largest_tensor_elements
        elif s.checkpoint_format == "safetensors":
            # read with pread into the partitions: the shard sits in the page cache once per node
            load["checkpoint_page_cache_once_per_node"] = shard
        else:
            load["checkpoint_mmap_once_per_node"] = shard
    steady: dict[str, float] = {"runtime_base": runtime}
    steady |= offload_terms(arch, s, local_ranks=local_ranks, world=world, c=c)
    if cpu_accelerator:  # the CPU accelerator keeps the "device" in host RAM
        dev = device_terms(arch, s, world, c)
        states = dev["parameters"] + dev["gradients"] + dev["optimizer_states"]
        steady["training_states"] = local_ranks * c.host_state_factor * states
        steady["model_sized_buffers"] = local_ranks * c.host_bytes_per_model_param * n
        steady["activations"] = local_ranks * forward_saved_bytes(arch, s, c)
        steady["rank_fixed"] = local_ranks * c.host_rank_fixed_bytes
    if s.dataloader_workers:
        per_worker = c.host_dataloader_worker_bytes + worker_copied_bytes(s.dataloader_dataset_bytes, s.dataloader_workers)
        steady["dataloader_workers"] = local_ranks * s.dataloader_workers * per_worker
    return load, steady


def worker_copied_bytes(dataset_bytes: float, workers: int, epochs: float | None = None) -> float:
    """What one forked DataLoader worker has copied of a dataset held as Python objects: reading
    an object updates its reference count, which writes (so copies) its page. Each epoch a worker
    reads 1/workers of the samples (the sampler's batches are dealt round-robin); after ``epochs``
    shuffled epochs it has read 1 - (1 - 1/workers)^epochs of them, and over a long run (None) all.
    Measured: bench/dataloader_workers.py."""
    if epochs is None:
        return float(dataset_bytes)
    return float(dataset_bytes) * (1 - (1 - 1 / max(workers, 1)) ** epochs)


def _pow2_ceil(size: float) -> float:
    return float(1 << max(0, math.ceil(math.log2(size)))) if size > 1 else size


def sub_groups(arch: Architecture, s: Settings, world: int) -> tuple[float, int]:
    """(partition elements, count) of the largest optimizer sub-group of a rank.

    ``_create_fp16_sub_groups`` closes a group once its partitions reach ``sub_group_size``
    (0: every parameter a group of its own, the largest tensor's partition the largest)."""
    x = arch.num_parameters / world
    largest_partition = arch.largest_tensor_elements / world
    size = float(s.ds_buffers.get("sub_group_size", 1e9) or 0)
    partition = min(x, max(size, largest_partition))
    return partition, max(1, math.ceil(x / partition))


def offload_terms(arch: Architecture, s: Settings, *, local_ranks: int, world: int, c: Coefficients | None = None) -> dict[str, float]:
    """Host RAM per node that ZeRO-3 offload holds, as DeepSpeed 0.19 lays it out
    (deepspeed/runtime/zero/stage3.py; bench/offload_layout.py finds each of these tensors in a
    real run and checks their bytes) for a partition of x = N / world elements per rank:

    - ``offload_optimizer`` to the CPU: the fp32 master partition (4x), Adam's exp_avg and
      exp_avg_sq (8x), each sub-group master's fp32 ``.grad`` (4x, ``initialize_optimizer_states``),
      and the flat gradient partitions ``grad_partitions_flat_buffer`` the backward writes into,
      in the gradient accumulation dtype (the model's: 2x in bf16);
    - ``offload_param`` to the CPU: the 16-bit parameter partitions (2x, always pinned);
    - what the process keeps of the transients that built them (measured, see Coefficients);
    - ``pin_memory``: those buffers pinned; torch's CachingHostAllocator rounds each pinned
      block up to a power of two (``pinned_max_round_threshold`` defaults to no limit);
    - ``nvme`` (ZeRO-Infinity, both to NVMe): master, moments and parameters live on the
      drive; the host keeps the gradient partitions, the optimizer swapper's pinned buffers
      (``buffer_count`` 4 x the largest sub-group, fp32) and the parameter swapper's
      (``buffer_count`` 5 x ``buffer_size`` 1e8 elements, 16-bit), all pinned.
    """
    if s.offload == "none":
        return {}
    c = c or Coefficients()
    x = arch.num_parameters / world
    partition, groups = sub_groups(arch, s, world)
    d = DTYPE_BYTES[s.dtype]
    if s.offload == "nvme":
        optimizer_swap = s.ds_buffers.get("offload_optimizer") or {}
        param_swap = s.ds_buffers.get("offload_param") or {}
        swap_optimizer = 4 * partition * int(optimizer_swap.get("buffer_count", 4))
        swap_params = d * float(param_swap.get("buffer_size", 1e8)) * int(param_swap.get("buffer_count", 5))
        return {
            "offloaded_gradient_partitions": local_ranks * d * x,
            "nvme_optimizer_swap_buffers": local_ranks * _pow2_ceil(swap_optimizer),
            "nvme_parameter_swap_buffers": local_ranks * _pow2_ceil(swap_params),
        }
    terms = {
        "offloaded_fp32_master": local_ranks * 4 * x,
        "offloaded_adam_moments": local_ranks * 8 * x,
        "offloaded_master_grad_buffers": local_ranks * 4 * x,
        "offloaded_gradient_partitions": local_ranks * d * x,
    }
    pinned = [d * x] + [4 * partition] * groups if s.pin_memory else []
    if s.offload == "params":
        terms["offloaded_parameters"] = local_ranks * d * x
        pinned.append(d * x)
    terms["offload_build_transients_retained"] = local_ranks * c.host_offload_retained_bytes_per_param * x
    if pinned:
        terms["pinned_power_of_two_rounding"] = local_ranks * sum(_pow2_ceil(b) - b for b in pinned)
    return terms


HOST_PHASES = ("load", "initialize", "training", "save", "resume")


def host_phase_terms(
    arch: Architecture,
    s: Settings,
    *,
    local_ranks: int,
    world: int,
    runtime_context_bytes: float,
    cpu_accelerator: bool,
    c: Coefficients,
    first_node: bool = True,
) -> dict[str, dict[str, float]]:
    """Per node, the terms of each phase whose host peak can bind: loading, deepspeed.initialize
    (the optimizer's partitions being created), training, saving a checkpoint and resuming one.
    ``first_node``: the node of global rank 0, which gathers the 16-bit weights on save."""
    load, steady = host_terms(
        arch, s, local_ranks=local_ranks, world=world, runtime_context_bytes=runtime_context_bytes,
        cpu_accelerator=cpu_accelerator, c=c,
    )
    n = arch.num_parameters
    x = n / world
    sub_group, _ = sub_groups(arch, s, world)
    phases = {"load": load, "training": steady}
    initialize = dict(steady)
    if s.offload in ("optimizer", "params"):
        # initialize_optimizer_states' fp32 gradient_buffer of the largest sub-group (its
        # partitions' ds_numel) on the host, for as long as it runs
        initialize["initialize_gradient_buffer"] = local_ranks * 4 * sub_group
    phases["initialize"] = initialize
    if s.zero_stage >= 3:
        save = dict(steady)
        # each rank torch.save's its optimizer shard; from the device one fp32 flat buffer at a
        # time is copied to the host to be written (from offload, it is written in place)
        if s.offload == "none":
            save["optimizer_shard_staging"] = local_ranks * 4 * sub_group
        if s.save_16bit_weights and first_node:
            # stage3_gather_16bit_weights_on_model_save: rank 0 gathers the whole 16-bit model
            save["gathered_16bit_model_rank0"] = DTYPE_BYTES[s.dtype] * n
        phases["save"] = save
        resume = dict(steady)
        # load_checkpoint: each rank reads its optimizer shard (fp32 master + both moments) to the host
        resume["optimizer_shard_read"] = local_ranks * 12 * x
        phases["resume"] = resume
    # in the order a run goes through them (the table's columns, the JSON's keys)
    return {phase: phases[phase] for phase in HOST_PHASES if phase in phases}


def consolidation_bytes(arch: Architecture) -> float:
    """Offline ``zero_to_fp32.py``: every rank's optimizer shard loaded (12 B a parameter over
    all shards) and the fp32 state dict it builds (4 B): one machine, 16 B a parameter."""
    return 16.0 * arch.num_parameters


def with_coefficients(c: Coefficients, **changes) -> Coefficients:
    return replace(c, **changes)
