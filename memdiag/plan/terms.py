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

from dataclasses import asdict, dataclass, field, replace

from memdiag.plan.model import Architecture


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
    host_runtime_bytes: float = 0.35 * 2**30
    """One rank's host RAM before the model: Python, torch, DeepSpeed, transformers."""
    host_state_factor: float = 1.0
    """CPU accelerator: host RAM per byte of training state (parameters, gradients, optimizer
    states) while training; above 1 by the optimizer step's fp32 temporaries."""
    host_bytes_per_model_param: float = 0.0
    """CPU accelerator: host RAM per parameter of the whole model on every rank (ZeRO-3's
    buckets and gathered layers are sized by the model, not the partition)."""
    host_rank_fixed_bytes: float = 0.0
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
    ds_buffers: dict = field(default_factory=dict)
    """``stage3_max_live_parameters``, ``stage3_prefetch_bucket_size``, ``reduce_bucket_size``,
    ``allgather_bucket_size``, ``sub_group_size`` from the ds_config (elements)."""


    @property
    def flash_attn(self) -> bool:
        return self.attention == "fused"


DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def activation_terms(arch: Architecture, s: Settings, c: Coefficients) -> dict[str, float]:
    """Saved-for-backward bytes at the end of the forward, plus the backward's transient."""
    b, seq, h, i, a, v = s.micro_batch, s.seq_len, arch.hidden_size, arch.intermediate_size, arch.num_heads, arch.vocab_size
    scale = DTYPE_BYTES[s.dtype] / 2
    layer = (c.layer_sbh * seq * b * h + c.layer_sbi * seq * b * i) * scale
    per_score = {"plain": c.layer_as2b, "sdpa_math": c.layer_as2b_sdpa_math, "fused": 0.0}[s.attention]
    scores = per_score * a * seq * seq * b * scale
    if s.activation_checkpointing:  # layer inputs kept; one layer recomputed at a time
        layers, all_scores = arch.num_layers * 2 * seq * b * h * scale + layer, scores
    else:
        layers, all_scores = arch.num_layers * layer, arch.num_layers * scores
    transient_scores = 0.0 if s.flash_attn else c.backward_transient_as2b * a * seq * seq * b * scale
    return {
        "activations": layers,
        "attention_scores": all_scores,
        "logits_and_loss": c.head_sbh * seq * b * h * scale + c.head_sbv * seq * b * v + 2 * v * h * scale,
        "backward_transient": max(transient_scores, c.backward_transient_sbv * seq * b * v),
    }


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
    if s.offload in ("optimizer", "params"):
        optimizer = 0.0
    if s.offload == "params":
        params = 0.0
    buffers = s.ds_buffers
    terms = {"parameters": params, "gradients": grads, "optimizer_states": optimizer}
    if stage >= 3:
        layer_params = n / max(arch.num_layers, 1)
        live = min(float(buffers.get("stage3_max_live_parameters", 1e9)), 2 * layer_params)
        terms["zero3_gathered_parameters"] = d * live  # the layer computing and the one prefetched
        # buckets are sized by the ds_config but never larger than what they hold
        terms["zero3_prefetch_bucket"] = d * min(float(buffers.get("stage3_prefetch_bucket_size", 5e7)), n)
        terms["zero3_reduce_bucket"] = d * min(float(buffers.get("reduce_bucket_size", 5e8)), n)
    elif stage >= 1:
        terms["allgather_bucket"] = d * min(float(buffers.get("allgather_bucket_size", 5e8)), n)
        terms["reduce_bucket"] = d * min(float(buffers.get("reduce_bucket_size", 5e8)), n)
    act = act if act is not None else activation_terms(arch, s, c)
    terms |= act
    if stage >= 3:
        # the optimizer step runs one sub-group at a time with fp32 gradients, after the
        # activations are gone: it counts only when it is larger than what it replaces
        step_only = 4 * min(float(buffers.get("sub_group_size", 1e9)), n / world)
        terms["step_fp32_grads_above_backward"] = max(0.0, step_only - sum(act.values()))
    subtotal = sum(terms.values())
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
    if s.offload in ("optimizer", "params"):
        steady["offloaded_optimizer_states"] = local_ranks * 12 * n / world
        steady["pinned_buffers"] = local_ranks * 4 * float(s.ds_buffers.get("sub_group_size", 1e9))
    if s.offload == "params":
        steady["offloaded_parameters"] = local_ranks * DTYPE_BYTES[s.dtype] * n / world
    if cpu_accelerator:  # the CPU accelerator keeps the "device" in host RAM
        dev = device_terms(arch, s, world, c)
        states = dev["parameters"] + dev["gradients"] + dev["optimizer_states"]
        act = activation_terms(arch, s, c)
        steady["training_states"] = local_ranks * c.host_state_factor * states
        steady["model_sized_buffers"] = local_ranks * c.host_bytes_per_model_param * n
        steady["activations"] = local_ranks * (act["activations"] + act["attention_scores"] + act["logits_and_loss"])
        steady["rank_fixed"] = local_ranks * c.host_rank_fixed_bytes
    return load, steady


def with_coefficients(c: Coefficients, **changes) -> Coefficients:
    return replace(c, **changes)
