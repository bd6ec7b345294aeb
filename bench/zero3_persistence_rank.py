"""One rank of bench/zero3_persistence.py: ZeRO-3 (DeepSpeed's own stage 3 on its CPU
accelerator, gloo) for each persistence setting, one forward, backward and step each; prints,
per setting, the parameters' elements in ``named_parameters()`` order, the elements DeepSpeed
keeps gathered after the step (``ds_persist`` parameters whose full data is still there) and the
bytes of its gradient-reduction buffers (the IPG buckets' ``buffer``).

    torchrun --nproc_per_node 1 bench/zero3_persistence_rank.py
"""

import importlib
import json

import deepspeed
import torch

HIDDEN, LAYERS = 512, 3
VARIANTS = [
    {},  # DeepSpeed's defaults: 1e5 elements per parameter, no model cap
    {"stage3_param_persistence_threshold": 0},
    {"stage3_param_persistence_threshold": 3e5},  # every weight too (512 x 512 = 262,144)
    {"stage3_param_persistence_threshold": 3e5, "stage3_model_persistence_threshold": 6e5},
    # the reduce bucket: overlap_comm moves the reduction to its own stream, not to a second buffer
    {"reduce_bucket_size": 3e5, "overlap_comm": True},
    {"reduce_bucket_size": 3e5, "overlap_comm": False},
    {"reduce_bucket_size": 3e5, "contiguous_gradients": False},
]


def model() -> torch.nn.Module:
    layers = []
    for _ in range(LAYERS):
        layers += [torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.LayerNorm(HIDDEN)]
    return torch.nn.Sequential(*layers)


def main() -> None:
    # the CPU accelerator's shared-memory allreduce would be JIT-compiled first; gloo does the collectives
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed("gloo")
    for persistence in VARIANTS:
        zero = {"stage": 3, "stage3_prefetch_bucket_size": 0, **persistence}
        config = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}, "zero_allow_untested_optimizer": True,
                  "zero_optimization": zero}
        with deepspeed.zero.Init(config_dict_or_path=config, dtype=torch.bfloat16):
            net = model()
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
        engine, *_ = deepspeed.initialize(model=net, config=config, optimizer=optimizer)
        loss = engine(torch.randn(1, 8, HIDDEN, dtype=torch.bfloat16)).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        params = list(engine.module.named_parameters())
        gathered = sum(p.ds_numel for _, p in params if getattr(p, "ds_persist", False) and p.data.numel() == p.ds_numel)
        buffers = {b.buffer.untyped_storage().data_ptr(): b.buffer.untyped_storage().nbytes()
                   for b in engine.optimizer.ipg_buckets.values() if getattr(b, "buffer", None) is not None and b.buffer.numel()}
        print(json.dumps({"zero_optimization": zero, "tensor_numels": [p.ds_numel for _, p in params],
                          "persistent_elements": gathered, "reduce_buffers_bytes": sum(buffers.values())}), flush=True)
        del engine, net, optimizer


if __name__ == "__main__":
    main()
