"""ZeRO-3 training written the ways users write it; knows nothing of memdiag.

    torchrun --nproc_per_node 2 user_zero3.py MODE [CHECKPOINT_DIR]

MODE says how the model is built:
  constructor                LlamaForCausalLM(config), no zero.Init: whole fp32 model per rank
  constructor_zero_init      the same inside deepspeed.zero.Init: partitioned as it is built
  from_pretrained            from_pretrained(dir) with no DeepSpeed config alive
  from_pretrained_ds         HfDeepSpeedConfig(ds_config) first: transformers enters zero.Init
  trainer_outside            a Trainer script that builds with from_config before its
                             TrainingArguments(deepspeed=...) exist
  trainer_inside             the same with TrainingArguments created first
  save DIR                   write the checkpoint the from_pretrained modes read
"""

import importlib
import os
import sys

import deepspeed
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # no JIT on CPU
MODE = sys.argv[1]
CONFIG = LlamaConfig(
    vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4
)
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3},
    "bf16": {"enabled": True},
    "zero_allow_untested_optimizer": True,
}
STEPS = 3


def train_with_engine(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=DS_CONFIG)
    for _ in range(STEPS):
        ids = torch.randint(0, CONFIG.vocab_size, (1, 64), device=engine.device)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    print("user script done", float(loss), flush=True)


def train_with_trainer(build_first: bool):
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Tokens(Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            ids = torch.randint(0, CONFIG.vocab_size, (64,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    def arguments():
        return TrainingArguments(
            output_dir=os.environ.get("TRAINER_OUT", "trainer_out"), per_device_train_batch_size=1, max_steps=STEPS,
            deepspeed=dict(DS_CONFIG, train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto"),
            bf16=True, use_cpu=not torch.cuda.is_available(), report_to=[], save_strategy="no", logging_steps=1,
        )

    if build_first:  # the model exists before any DeepSpeed config: whole, fp32, on every rank
        model = AutoModelForCausalLM.from_config(CONFIG)
        args = arguments()
    else:
        args = arguments()
        model = AutoModelForCausalLM.from_config(CONFIG)
    Trainer(model=model, args=args, train_dataset=Tokens()).train()
    print("user script done", flush=True)


if MODE == "save":  # the small checkpoint the from_pretrained modes read
    LlamaForCausalLM(CONFIG).save_pretrained(sys.argv[2])
    raise SystemExit(0)
if MODE in ("constructor", "constructor_zero_init", "from_pretrained", "from_pretrained_ds"):
    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
if MODE == "constructor":
    train_with_engine(LlamaForCausalLM(CONFIG))
elif MODE == "constructor_zero_init":
    with deepspeed.zero.Init(config_dict_or_path=DS_CONFIG):
        model = LlamaForCausalLM(CONFIG)
    train_with_engine(model)
elif MODE == "from_pretrained":
    train_with_engine(AutoModelForCausalLM.from_pretrained(sys.argv[2]))
elif MODE == "from_pretrained_ds":
    from transformers.integrations import HfDeepSpeedConfig

    keep = HfDeepSpeedConfig(DS_CONFIG)  # must stay alive while the model is built
    train_with_engine(AutoModelForCausalLM.from_pretrained(sys.argv[2]))
elif MODE == "trainer_outside":
    train_with_trainer(build_first=True)
elif MODE == "trainer_inside":
    train_with_trainer(build_first=False)
else:
    raise SystemExit(f"unknown mode {MODE!r}")
