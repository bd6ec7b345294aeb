"""An accelerate script with the DeepSpeed plugin from `accelerate launch`; knows nothing of
memdiag. The model is built with from_config before the Accelerator exists, so outside zero.Init:
the whole fp32 model on every rank.

    accelerate launch --use_deepspeed --zero_stage 3 --num_processes 2 accelerate_zero3.py
"""

import importlib

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, LlamaConfig

importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # no JIT on CPU
if not torch.cuda.is_available():  # as HF's Trainer does on the CPU: the process group first
    from accelerate import PartialState

    PartialState(cpu=True, backend="gloo")
config = LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4)
# built before the Accelerator exists: no DeepSpeed config is alive yet, so not under zero.Init
# (the mistake the 5290 check names; created after the Accelerator it would be partitioned)
model = AutoModelForCausalLM.from_config(config)
accelerator = Accelerator()  # the DeepSpeed plugin comes from `accelerate launch --use_deepspeed`
data = DataLoader([torch.randint(0, 8192, (64,), generator=torch.Generator().manual_seed(i)) for i in range(16)], batch_size=1)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
model, optimizer, data = accelerator.prepare(model, optimizer, data)
for step, ids in zip(range(3), data):
    loss = model(input_ids=ids, labels=ids).loss
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
print("accelerate script done", flush=True)
