"""A DeepSpeed ZeRO-3 training script that knows nothing of memdiag (profiled unchanged).

    torchrun --nproc_per_node 2 standalone_zero3.py
"""

import importlib
import os

import deepspeed
import torch
from transformers import LlamaConfig, LlamaForCausalLM

importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # no JIT on CPU
deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
config = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3},
    "bf16": {"enabled": True},
    "zero_allow_untested_optimizer": True,
}
with deepspeed.zero.Init(config_dict_or_path=config):
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
    )
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
steps = int(os.environ.get("STEPS", "3"))
for _ in range(steps):
    ids = torch.randint(0, 1024, (1, 64), device=engine.device)
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
print("standalone done", float(loss))
