"""One rank of tests/integration/test_zero3_grad_window.py: DeepSpeed's stage 3 (its CPU accelerator,
gloo) on an embedding, a layer and an lm_head whose weights are larger than ``reduce_bucket_size``;
records the elements of every gradient DeepSpeed reduce-scatters from the parameter's own storage
rather than from its bucket (the path of a gradient larger than the bucket), beside the
parameters' elements.

    torchrun --nproc_per_node 1 bench/zero3_grad_window_rank.py
"""

import importlib
import json

import deepspeed
import torch

VOCAB, HIDDEN, BUCKET = 4096, 256, 100_000  # embedding and lm_head 1,048,576 elements; the layer 65,536


def main() -> None:
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed("gloo")
    stage3 = importlib.import_module("deepspeed.runtime.zero.stage3")
    reduced: list[int] = []
    held: dict = {}
    original = stage3.reduce_scatter_coalesced

    def recording(tensors, *args, **kwargs):
        buckets = {b.buffer.untyped_storage().data_ptr() for b in held["optimizer"].ipg_buckets.values()
                   if getattr(b, "buffer", None) is not None}
        # a gradient copied into the bucket is a view of its buffer; a larger one keeps its own storage
        reduced.extend(t.numel() for t in tensors if t.untyped_storage().data_ptr() not in buckets)
        return original(tensors, *args, **kwargs)

    stage3.reduce_scatter_coalesced = recording
    config = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 3, "reduce_bucket_size": BUCKET, "stage3_prefetch_bucket_size": 0,
                                    "stage3_param_persistence_threshold": 0}}
    with deepspeed.zero.Init(config_dict_or_path=config, dtype=torch.bfloat16):
        net = torch.nn.Sequential(torch.nn.Embedding(VOCAB, HIDDEN), torch.nn.Linear(HIDDEN, HIDDEN, bias=False),
                                  torch.nn.Linear(HIDDEN, VOCAB, bias=False))
    engine, *_ = deepspeed.initialize(model=net, config=config, optimizer=torch.optim.AdamW(net.parameters(), lr=1e-4))
    held["optimizer"] = engine.optimizer
    ids = torch.randint(0, VOCAB, (1, 64))
    logits = engine(ids).float()
    loss = torch.nn.functional.cross_entropy(logits.view(-1, VOCAB), ids.view(-1))
    engine.backward(loss)
    engine.step()
    print(json.dumps({"parameter_elements": [p.ds_numel for p in engine.module.parameters()], "bucket": BUCKET,
                      "reduced_from_own_storage": reduced}), flush=True)


if __name__ == "__main__":
    main()
