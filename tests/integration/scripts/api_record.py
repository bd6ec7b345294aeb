"""memdiag's Python API in a user's script: `memdiag.record` around the training, or a Trainer
with `memdiag.MemdiagCallback`; started by torchrun (or plain python), not by `memdiag run`.

    torchrun --nproc_per_node 2 api_record.py engine|trainer RUN_DIR
"""

import importlib
import os
import sys

import deepspeed
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import memdiag

importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # no JIT on CPU
MODE, RUN_DIR = sys.argv[1], sys.argv[2]
CONFIG = LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4)
DS = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3},
      "bf16": {"enabled": True}, "zero_allow_untested_optimizer": True}

if MODE == "engine":
    with memdiag.record(run_dir=RUN_DIR):
        deepspeed.init_distributed(dist_backend="gloo")
        with deepspeed.zero.Init(config_dict_or_path=DS):
            model = LlamaForCausalLM(CONFIG)
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4), config=DS)
        for _ in range(3):
            ids = torch.randint(0, 2048, (1, 64))
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
elif MODE == "trainer":
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Tokens(Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, i):
            ids = torch.randint(0, 2048, (64,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    args = TrainingArguments(output_dir=os.path.join(RUN_DIR, "..", "out"), per_device_train_batch_size=1, max_steps=3,
                             deepspeed=dict(DS, train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto"),
                             bf16=True, use_cpu=True, report_to=[], save_strategy="no")
    model = LlamaForCausalLM(CONFIG)
    Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[memdiag.MemdiagCallback(RUN_DIR)]).train()
print("api script done", flush=True)
