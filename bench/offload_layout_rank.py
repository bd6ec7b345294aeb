"""One rank of bench/offload_layout.py: a stack of bf16 linear layers built under zero.Init,
ZeRO-3 with the optimizer and parameters offloaded to the CPU (DeepSpeed's own offload code,
here on its CPU accelerator with gloo), two steps; prints /proc/self/status VmRSS at each stage.

    torchrun --nproc_per_node 1 bench/offload_layout_rank.py LAYERS [HIDDEN] [deepspeed|torch]

The optimizer is DeepSpeed's CPU Adam (what an offloaded ds_config gets; JIT-compiled on first
use, minutes on a small machine) or torch's AdamW as the client optimizer, which DeepSpeed steps
on the same offloaded fp32 partitions: the host tensors are the same roles and sizes either way
(exp_avg and exp_avg_sq in fp32), so the tests use it and compile nothing.
"""

import gc
import importlib
import json
import sys

import deepspeed
import torch


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    layers, hidden = int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 2048
    optimizer_kind = sys.argv[3] if len(sys.argv) > 3 else "deepspeed"
    if optimizer_kind == "torch":
        # nor the CPU accelerator's shared-memory allreduce (another JIT build); gloo does the collectives
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed("gloo")
    # buckets far below the model, so that what grows with the model is the offload layout alone
    config = {
        "train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
        "zero_optimization": {
            "stage": 3, "sub_group_size": 1e8, "reduce_bucket_size": 1e6, "stage3_prefetch_bucket_size": 1e6,
            "stage3_max_live_parameters": 1e7,
            "offload_optimizer": {"device": "cpu", "pin_memory": False},
            "offload_param": {"device": "cpu", "pin_memory": False},
        },
    }
    if optimizer_kind == "torch":
        config.pop("optimizer")
        config.update(zero_allow_untested_optimizer=True, zero_force_ds_cpu_optimizer=False)
    record = {"optimizer": optimizer_kind, "layers": layers, "hidden": hidden, "parameters": layers * hidden * hidden, "start_rss_bytes": rss_bytes()}
    with deepspeed.zero.Init(config_dict_or_path=config, dtype=torch.bfloat16):
        model = torch.nn.Sequential(*[torch.nn.Linear(hidden, hidden, bias=False) for _ in range(layers)])
    record["built_rss_bytes"] = rss_bytes()
    if optimizer_kind == "torch":
        engine, *_ = deepspeed.initialize(model=model, config=config, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4))
    else:
        engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    record["initialized_rss_bytes"] = rss_bytes()
    batch = torch.randn(1, 16, hidden, dtype=torch.bfloat16)
    for _ in range(2):
        loss = engine(batch).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
    gc.collect()
    record["stepped_rss_bytes"] = rss_bytes()
    record["tensors"] = named_cpu_tensor_bytes(engine.optimizer)
    print(json.dumps(record), flush=True)


def _storage_bytes(tensors, seen: set) -> int:
    total = 0
    for tensor in tensors:
        if tensor is None or tensor.device.type != "cpu":
            continue
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def named_cpu_tensor_bytes(zero) -> dict[str, int]:
    """The host tensors of DeepSpeed's ZeRO-3 optimizer by the role memdiag names them (each
    storage counted once), and every other live CPU tensor found by the garbage collector."""
    seen: set = set()
    masters = list(zero.fp32_partitioned_groups_flat)
    named = {
        "offloaded_fp32_master": _storage_bytes(masters, seen),
        "offloaded_master_grad_buffers": _storage_bytes([m.grad for m in masters], seen),
        "offloaded_adam_moments": _storage_bytes(
            [t for state in zero.optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor) and t.numel() > 1], seen),
        "offloaded_gradient_partitions": _storage_bytes([zero.grad_partitions_flat_buffer], seen),
        "offloaded_parameters": _storage_bytes(list(getattr(zero, "param_groups_fp16_flat_cpu_memory", [])), seen),
    }
    named["other_cpu_tensors"] = _storage_bytes([o for o in gc.get_objects() if isinstance(o, torch.Tensor)], seen)
    return named


if __name__ == "__main__":
    main()
