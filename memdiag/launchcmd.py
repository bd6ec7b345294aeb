"""What a training launch command says about the run, read without running it.

``memdiag plan -- torchrun --nnodes 2 --nproc_per_node 8 train.py --deepspeed ds.json ...``: the
launcher's layout (torchrun / ``python -m torch.distributed.run``, the ``deepspeed`` launcher with
its hostfile, ``accelerate launch`` with its config file), and the HF ``TrainingArguments`` and model arguments a
Trainer script takes. What it reads becomes memdiag settings (``key=value`` tokens, parsed by
``memdiag.settings`` like any other); what it cannot read is named with the key to give.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from memdiag import dsconfig
from memdiag.errors import UsageError

SEQ_LEN_ARGS = ("--max_seq_length", "--max_seq_len", "--model_max_length", "--cutoff_len", "--max_length", "--seq_length",
                "--seq_len", "--block_size", "--max_source_length")
"""Sequence-length arguments by their common names (TRL, FastChat/Alpaca, LLaMA-Factory, run_clm)."""


BOOL_FLAGS = {"--bf16", "--fp16", "--gradient_checkpointing", "--use_liger_kernel", "--tf32"}
"""``TrainingArguments`` booleans: bare (``--bf16``) or with a value (``--bf16 True``)."""


TRAINER_OPTIM = {"adamw_torch_fused": "fused", "adamw_apex_fused": "fused", "adamw_torch": "torch_foreach"}
"""``TrainingArguments.optim`` by how its Adam steps on CUDA (``memdiag.plan.terms``): the fused
kernels, or torch's AdamW with its default there (foreach)."""


@dataclass
class Launch:
    """A launch command, read."""

    tokens: list[str] = field(default_factory=list)
    """``key=value`` settings for ``memdiag.settings`` (and the layout)."""
    model_dir: Path | None = None
    """``--model_name_or_path`` when it is a local directory with a config.json."""
    read: list[str] = field(default_factory=list)
    """What was read, as ``--arg value -> key=value`` lines, for the user to check."""
    gaps: list[str] = field(default_factory=list)
    """What could not be read, each with the key to give instead."""


def _options(args: list[str]) -> dict[str, str | None]:
    """``--key value`` / ``--key=value`` / bare flags of a script's arguments (last one wins)."""
    out: dict[str, str | None] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            key, eq, value = arg.partition("=")
            key = "--" + key[2:].replace("-", "_")
            if eq:
                out[key] = value
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                out[key] = args[i + 1]
                i += 1
            else:
                out[key] = None
        i += 1
    return out


def _truthy(value: str | None) -> bool:
    return value is None or value.strip().lower() in ("true", "1", "yes")


def _split_launcher(argv: list[str]) -> tuple[str, dict[str, str | None], list[str]]:
    """(launcher name, its options, the script's arguments)."""
    if not argv:
        raise UsageError("plan -- CMD: give the launch command after --, e.g. -- torchrun --nproc_per_node 8 train.py --deepspeed ds.json")
    head = Path(argv[0]).name
    rest = argv[1:]
    if head.startswith("python"):
        if rest[:2] in (["-m", "torch.distributed.run"], ["-m", "torch.distributed.launch"]):
            head, rest = "torchrun", rest[2:]
        elif rest[:2] == ["-m", "deepspeed.launcher.runner"]:
            head, rest = "deepspeed", rest[2:]
        else:
            return "python", {}, rest[1:] if rest and not rest[0].startswith("-") else rest
    if head == "accelerate" and rest[:1] == ["launch"]:
        rest = rest[1:]
    if head not in ("torchrun", "deepspeed", "accelerate"):
        return head, {}, rest
    # launcher options come first, up to the script (or -m module)
    launcher: list[str] = []
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg in ("-m", "--module"):
            i += 2
            break
        if not arg.startswith("-"):
            i += 1
            break
        launcher.append(arg)
        takes_value = "=" not in arg and arg.replace("-", "_") not in (
            "__standalone", "__no_python", "__no_local_rank", "__force_multi", "__multi_gpu", "__use_deepspeed", "__use_fsdp",
            "__use_megatron_lm", "__cpu", "__debug", "__quiet", "_q")
        if takes_value and i + 1 < len(rest) and not rest[i + 1].startswith("-"):
            launcher.append(rest[i + 1])
            i += 1
        i += 1
    return head, _options(launcher), rest[i:]


def _hostfile_slots(path: str) -> list[int]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise UsageError(f"--hostfile {path}: {exc.strerror or exc}") from None
    slots = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            _, _, spec = line.partition("slots=")
            slots.append(_whole(spec.split()[0], f"{path}: slots") if spec.strip() else 1)
    return slots


class _Unreadable(ValueError):
    """A launcher value memdiag cannot read: the layout becomes a gap, not an error."""


def _whole(text: str, key: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _Unreadable(f"{key} {text!r}: not a whole number; give --layout NxM") from None
    if value < 1:
        raise _Unreadable(f"{key} {value}: not a positive count; give --layout NxM")
    return value


def _int(options: dict, key: str) -> int | None:
    value = options.get(key)
    return None if value is None else _whole(value, key)


def read(argv: list[str]) -> Launch:
    """The settings a launch command decides; nothing is run."""
    launch = Launch()
    launcher, lopts, script_args = _split_launcher(argv)
    accelerate = _with_flags(_accelerate_config(lopts, launch), lopts) if launcher == "accelerate" else {}
    try:
        nodes, per_node = _layout(launcher, lopts, launch, accelerate)
    except _Unreadable as exc:
        nodes = per_node = None
        launch.gaps.append(str(exc))
    if nodes and per_node:
        _took(launch, launcher, f"layout={nodes}x{per_node}")
    _read_accelerate_deepspeed(accelerate, launch)
    _read_script_args(_options(script_args), launch)
    return launch


def _took(launch: Launch, source: str, token: str) -> None:
    """A setting read from the command, and the line that says where from."""
    launch.tokens.append(token)
    launch.read.append(f"{source} -> {token}")


def _accelerate_config(lopts: dict, launch: Launch) -> dict:
    """``accelerate launch``'s config file: ``--config_file``, else accelerate's default one
    (``$HF_HOME/accelerate/default_config.yaml``) when it exists, as accelerate reads it."""
    import os

    import yaml

    given = lopts.get("--config_file")
    if given:
        path = Path(given)
    else:
        home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface")
        path = Path(home) / "accelerate" / "default_config.yaml"
        if not path.is_file():
            return {}
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        launch.gaps.append(f"accelerate config {path}: not readable YAML ({str(exc).splitlines()[0]}); give --layout NxM and the keys")
        return {}
    if not isinstance(config, dict):
        launch.gaps.append(f"accelerate config {path}: not a mapping of accelerate's keys; give --layout NxM and the keys")
        return {}
    launch.read.append(f"accelerate config {path}")
    return config


ACCELERATE_FLAGS = ("num_machines", "num_processes", "mixed_precision")
ACCELERATE_DEEPSPEED_FLAGS = ("deepspeed_config_file", "zero_stage", "offload_optimizer_device", "offload_param_device",
                              "gradient_accumulation_steps", "zero3_init_flag", "zero3_save_16bit_model")
"""``accelerate launch``'s flags that stand for its config file's keys (the flags win)."""


def _with_flags(config: dict, lopts: dict) -> dict:
    def value(text):
        lowered = str(text).strip().lower()
        return {"true": True, "false": False}.get(lowered, int(lowered) if lowered.isdigit() else text)

    out = dict(config) | {k: value(lopts[f"--{k}"]) for k in ACCELERATE_FLAGS if lopts.get(f"--{k}") is not None}
    ds = dict(out.get("deepspeed_config") or {}) | {
        k: value(lopts[f"--{k}"]) for k in ACCELERATE_DEEPSPEED_FLAGS if lopts.get(f"--{k}") is not None}
    if "--use_deepspeed" in lopts:
        out["distributed_type"] = "DEEPSPEED"
    if "--use_deepspeed" in lopts or ds:
        out["deepspeed_config"] = ds
    return out


ACCELERATE_OFFLOAD = {("none", "none"): "none", ("cpu", "none"): "optimizer", ("cpu", "cpu"): "params", ("nvme", "nvme"): "nvme"}
"""accelerate's DeepSpeed plugin (offload_optimizer_device, offload_param_device) as memdiag's ``offload``."""


def _read_accelerate_deepspeed(config: dict, launch: Launch) -> None:
    """accelerate's DeepSpeed plugin keys as settings (its ds_config file, when named, decides
    instead: accelerate refuses the plugin keys beside one)."""
    def take(source: str, token: str) -> None:
        _took(launch, source, token)

    precision = {"bf16": "bf16", "fp16": "fp16", "no": "fp32"}.get(str(config.get("mixed_precision", "")).lower())
    if precision:
        take(f"mixed_precision: {config['mixed_precision']}", f"dtype={precision}")
    ds = config.get("deepspeed_config")
    if str(config.get("distributed_type", "")).upper() != "DEEPSPEED" or not isinstance(ds, dict):
        return
    if ds.get("deepspeed_config_file"):
        take("deepspeed_config_file", f"ds_config={Path(str(ds['deepspeed_config_file'])).resolve()}")
        return
    stage = ds.get("zero_stage")
    if stage is not None:
        take(f"zero_stage: {stage}", f"zero.stage={stage}")
    devices = (str(ds.get("offload_optimizer_device", "none")).lower(), str(ds.get("offload_param_device", "none")).lower())
    if devices in ACCELERATE_OFFLOAD:
        take(f"offload devices {devices[0]}/{devices[1]}", f"offload={ACCELERATE_OFFLOAD[devices]}")
    else:
        launch.gaps.append(f"offload_optimizer_device {devices[0]} with offload_param_device {devices[1]}: give offload=")
    if ds.get("gradient_accumulation_steps") is not None:
        take("gradient_accumulation_steps", f"grad_accum={ds['gradient_accumulation_steps']}")
    if stage == 3 and ds.get("zero3_init_flag"):
        take("zero3_init_flag: true", "load=zero_init")
    if ds.get("zero3_save_16bit_model") is not None:
        take(f"zero3_save_16bit_model: {ds['zero3_save_16bit_model']}", f"save_16bit_weights={str(bool(ds['zero3_save_16bit_model'])).lower()}")


def _layout(launcher: str, lopts: dict, launch: Launch, accelerate: dict) -> tuple[int | None, int | None]:
    nodes = per_node = None
    if launcher == "torchrun":
        nnodes = lopts.get("--nnodes")
        nodes = _whole(str(nnodes).split(":")[-1], "--nnodes") if nnodes else 1  # an elastic MIN:MAX plans the MAX
        per_node_text = lopts.get("--nproc_per_node")
        if per_node_text in (None, "gpu", "auto"):
            launch.gaps.append(f"--nproc_per_node {per_node_text or '(not given)'}: the devices of the machine it runs on; give --layout NxM")
        else:
            per_node = _whole(per_node_text, "--nproc_per_node")
    elif launcher == "deepspeed":
        hostfile = lopts.get("--hostfile")
        slots = _hostfile_slots(hostfile) if hostfile else []
        nodes = _int(lopts, "--num_nodes") or (len(slots) if slots else 1)
        per_node = _int(lopts, "--num_gpus") or (min(slots) if slots else None)
        if per_node is None:
            launch.gaps.append("deepspeed without --num_gpus or a hostfile: every GPU of the machine; give --layout NxM")
    elif launcher == "accelerate":
        # the config file's keys with the command's flags over them, as accelerate takes them
        options = {f"--{k}": str(v) for k, v in accelerate.items() if k in ("num_machines", "num_processes")}
        nodes = _int(options, "--num_machines") or 1
        total = _int(options, "--num_processes")
        if total is None:
            launch.gaps.append("accelerate launch without --num_processes (nor a config file that sets it): give --layout NxM")
        else:
            per_node = max(1, total // nodes)
    elif launcher == "python":
        nodes, per_node = 1, 1
    else:
        launch.gaps.append(f"{launcher}: a launcher memdiag does not read; give --layout NxM")
    return nodes, per_node


def _read_script_args(opts: dict[str, str | None], launch: Launch) -> None:
    def take(arg: str, token: str) -> None:
        _took(launch, f"{arg}{'' if opts.get(arg) is None else ' ' + str(opts[arg])}", token)

    trainer = "--output_dir" in opts or "--deepspeed" in opts
    ds_path = opts.get("--deepspeed")
    ds = None
    if ds_path:
        take("--deepspeed", f"ds_config={Path(ds_path).resolve()}")
        try:
            ds = dsconfig.read(ds_path)
        except UsageError:
            ds = None  # said in one line when the settings compose it
    for arg, key in (("--per_device_train_batch_size", "micro_batch"), ("--gradient_accumulation_steps", "grad_accum")):
        ds_key = {"micro_batch": "train_micro_batch_size_per_gpu", "grad_accum": "gradient_accumulation_steps"}[key]
        value = opts.get(arg)
        if value is None and trainer and not (isinstance(ds, dict) and ds.get(ds_key) not in (None, "auto")):
            value = str(dsconfig.TRAINER_ARGUMENTS[arg[2:]])
            launch.read.append(f"{arg} not given -> {key}={value} (the HF Trainer's default)")
            launch.tokens.append(f"{key}={value}")
        elif value is not None:
            try:
                _whole(value, arg)
            except _Unreadable:
                launch.gaps.append(f"{arg} {value!r}: not a whole number; give {key}=N")
                continue
            _agrees(ds, ds_path, ds_key, arg, value)
            take(arg, f"{key}={value}")
    if "--bf16" in opts or "--fp16" in opts:
        dtype = "bf16" if _truthy(opts.get("--bf16", "false")) else "fp16" if _truthy(opts.get("--fp16", "false")) else "fp32"
        take("--bf16" if "--bf16" in opts else "--fp16", f"dtype={dtype}")
    elif trainer and isinstance(ds, dict) and "auto" in (_section(ds, "bf16"), _section(ds, "fp16")):
        launch.tokens.append("dtype=fp32")
        launch.read.append("--bf16/--fp16 not given -> dtype=fp32 (the HF Trainer fills the ds_config's \"auto\" with false)")
    if "--gradient_checkpointing" in opts:
        take("--gradient_checkpointing", f"activation_checkpointing={str(_truthy(opts['--gradient_checkpointing'])).lower()}")
    seq = next((a for a in SEQ_LEN_ARGS if opts.get(a)), None)
    if seq and not str(opts[seq]).isdigit():
        launch.gaps.append(f"{seq} {opts[seq]!r}: not a whole number; give seq_len=N")
    elif seq:
        take(seq, f"seq_len={opts[seq]}")
    else:
        launch.gaps.append(f"the sequence length ({', '.join(SEQ_LEN_ARGS[:4])}, ...): not in the command, so memdiag's "
                           "default seq_len is planned; give seq_len=N")
    attn = opts.get("--attn_implementation") or opts.get("--flash_attn")
    if attn:
        path = {"eager": "plain", "sdpa": "fused", "flash_attention_2": "fused", "flash_attention_3": "fused", "fa2": "fused",
                "auto": None, "disabled": "plain"}.get(attn)
        if path:
            take("--attn_implementation" if "--attn_implementation" in opts else "--flash_attn", f"attention={path}")
    stage = ds.get("zero_optimization", {}).get("stage") if isinstance(ds, dict) and isinstance(ds.get("zero_optimization"), dict) else None
    if ds_path and stage == 3:
        # TrainingArguments registers the ds_config before the model is made; from_pretrained
        # then builds it under deepspeed.zero.Init (transformers' is_deepspeed_zero3_enabled)
        launch.tokens.append("load=zero_init")
        launch.read.append("--deepspeed with ZeRO-3 -> load=zero_init (from_pretrained builds under deepspeed.zero.Init)")
    model = opts.get("--model_name_or_path") or opts.get("--model_path")
    if model:
        if (Path(model) / "config.json").is_file():
            launch.model_dir = Path(model).resolve()
            launch.read.append(f"--model_name_or_path {model} -> --model-config {launch.model_dir}")
            _read_weights(launch.model_dir, launch)
        else:
            launch.gaps.append(f"--model_name_or_path {model}: not a local directory with a config.json; give --model-config FILE")
    else:
        launch.gaps.append("no --model_name_or_path: the case's model is planned; give --model-config FILE for yours")
    if "--use_liger_kernel" in opts:
        take("--use_liger_kernel", f"fused_cross_entropy={str(_truthy(opts['--use_liger_kernel'])).lower()}")
    workers = opts.get("--dataloader_num_workers")
    if workers is not None:
        if str(workers).isdigit():
            take("--dataloader_num_workers", f"dataloader.num_workers={workers}")
            launch.gaps.append("the dataset's size in Python objects, which each forked worker copies as it reads: give "
                               "dataloader.dataset_bytes=SIZE (0, the default, for memory-mapped or Arrow datasets)")
        else:
            launch.gaps.append(f"--dataloader_num_workers {workers!r}: not a whole number; give dataloader.num_workers=N")
    optim = opts.get("--optim")
    if isinstance(ds, dict) and ds.get("optimizer"):
        pass  # DeepSpeed builds the ds_config's section; optimizer=auto reads it
    elif optim in TRAINER_OPTIM:
        take("--optim", f"optimizer={TRAINER_OPTIM[optim]}")
    elif optim:
        launch.gaps.append(f"--optim {optim}: its step's temporaries are not modelled; planned as fused Adam (none), "
                           "give optimizer=torch_foreach to count one fp32 copy of the stepped partition")
    if "--resume_from_checkpoint" in opts:
        take("--resume_from_checkpoint", "resume=true")
    _read_saving(opts, trainer, launch, take)


def _read_saving(opts: dict[str, str | None], trainer: bool, launch: Launch, take) -> None:
    """Whether the run saves a checkpoint: the Trainer saves every ``save_steps`` (500) unless
    ``--save_strategy no``, and a Trainer script's ``save_model`` gathers the model at the end."""
    strategy = opts.get("--save_strategy")
    if strategy is not None:
        saves = strategy.strip().lower() != "no"
        take("--save_strategy", f"save={str(saves).lower()}")
    elif opts.get("--save_steps") is not None:
        take("--save_steps", "save=true")
    elif trainer:
        launch.tokens.append("save=true")
        launch.read.append("--save_strategy not given -> save=true (the HF Trainer saves every 500 steps by default)")


def _read_weights(model_dir: Path, launch: Launch) -> None:
    """How from_pretrained will read the checkpoint: its format and number of shards."""
    for fmt, pattern in (("safetensors", "*.safetensors"), ("bin", "*.bin")):
        files = [p for p in model_dir.glob(pattern) if "training_args" not in p.name]
        if files:
            launch.tokens += [f"checkpoint_format={fmt}", f"checkpoint_shards={len(files)}"]
            launch.read.append(f"{len(files)} {pattern} in the model directory -> checkpoint_format={fmt} checkpoint_shards={len(files)}")
            return
    launch.gaps.append(f"no weights in {model_dir} (config only): planned as reading none (checkpoint_format=none); give checkpoint_format= and "
                       "checkpoint_shards= for the files the run reads")


def _section(ds: dict, name: str):
    section = ds.get(name)
    return section.get("enabled") if isinstance(section, dict) else None


def _agrees(ds, ds_path, ds_key: str, arg: str, value: str) -> None:
    """The HF Trainer refuses a ds_config value that is not "auto" and differs from its argument."""
    if not isinstance(ds, dict) or ds.get(ds_key) in (None, "auto"):
        return
    if str(ds[ds_key]) != str(value):
        raise UsageError(
            f"{ds_path}: {ds_key}={ds[ds_key]} but the command's {arg} is {value}; the HF Trainer refuses the mismatch: "
            f"set {ds_key} to \"auto\" or make them agree"
        )

