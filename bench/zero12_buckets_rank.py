"""One rank of bench/zero12_buckets.py: ZeRO-1 and ZeRO-2 (DeepSpeed's own stage_1_and_2, on its
CPU accelerator with gloo) for each ds_config variant, one backward and step each; prints, per
variant, the gradient-reduction buckets DeepSpeed allocated (every buffer ``setup_buckets`` put
in its ipg buckets, each storage counted once) as JSON lines.

    torchrun --nproc_per_node 1 bench/zero12_buckets_rank.py
"""

import importlib
import json

import deepspeed
import torch

HIDDEN, LAYERS = 256, 4
VARIANTS = [
    {"stage": stage, "overlap_comm": overlap, "contiguous_gradients": contiguous, "reduce_bucket_size": 3e6,
     "allgather_bucket_size": 5e6}
    for stage in (1, 2) for overlap in (False, True) for contiguous in (True, False)
]


def buckets_of(zero) -> int:
    """Bytes of the reduction buffers ``setup_buckets`` allocates, recorded as it does."""
    seen: dict[int, int] = {}
    original = zero.setup_buckets

    def recording():
        original()
        for bucket in zero.ipg_buckets.values():
            for buffer in bucket.buffer:
                seen[buffer.untyped_storage().data_ptr()] = buffer.untyped_storage().nbytes()

    zero.setup_buckets = recording
    return seen


def main() -> None:
    # the CPU accelerator's shared-memory allreduce would be JIT-compiled first (a minute, and a
    # compiler on the machine); gloo does the collectives here
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed("gloo")
    for zero_config in VARIANTS:
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(HIDDEN, HIDDEN, bias=False) for _ in range(LAYERS)]).to(torch.bfloat16)
        # torch's AdamW as the client optimizer: DeepSpeed's own would JIT-compile FusedAdam (the
        # buckets do not depend on the optimizer)
        config = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}, "zero_allow_untested_optimizer": True,
                  "zero_optimization": zero_config}
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        engine, *_ = deepspeed.initialize(model=model, config=config, optimizer=optimizer)
        seen = buckets_of(engine.optimizer)
        batch = torch.randn(1, 8, HIDDEN, dtype=torch.bfloat16)
        loss = engine(batch).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        print(json.dumps({"zero_optimization": zero_config, "parameters": LAYERS * HIDDEN * HIDDEN,
                          "reduce_buffers_bytes": sum(seen.values()), "reduce_buffers": len(seen)}), flush=True)
        del engine, model, optimizer


if __name__ == "__main__":
    main()
