"""Every user-facing setting, declared once: its key, type, choices, default, one-line doc and
the commands that take it. ``memdiag run``, ``memdiag plan``, ``memdiag run -- CMD`` and
``memdiag.record`` all parse through ``parse``, so they accept the same names with the same
defaults and refuse a bad one in the same words. Nothing here imports torch: a bad key is
refused in well under a second.

Adding a setting: one ``setting(...)`` field on ``RunSettings``; the code that uses it reads
``config.<field>``. A setting the planner uses is turned into its terms in
``memdiag.plan.inputs.planner_settings`` (the one mapping from a run to the planner).
"""

from __future__ import annotations

import difflib
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from memdiag.errors import UsageError
from memdiag.units import ACCEPTED_FORMS, parse_size

RUN = "run"
"""``memdiag run case=NAME key=value ...``"""
PLAN = "plan"
"""``memdiag plan key=value ...``"""
CMD = "run --"
"""``memdiag run key=value ... -- CMD``: the user's own command."""
API = "record"
"""``memdiag.record(...)`` and ``MemdiagCallback(...)``: keyword arguments, dots as underscores."""
COMMANDS = (RUN, PLAN, CMD, API)

CASE_RUN = frozenset({RUN})
PLANNED = frozenset({RUN, PLAN})
RECORDING = frozenset({RUN, CMD, API})
"""Settings of the recorder and its guard: every command that records."""
LAUNCHING = frozenset({RUN, CMD})

BOOL_WORDS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
GROUP_KEYS = ("case", "model.scale", "model", "hardware", "hardware.name", "data", "data.source")
"""Keys that choose a case's config groups (composed by Hydra in ``memdiag.config``)."""
GROUP_PREFIXES = ("model.", "data.", "hardware.")
"""A field of the case's model, data or hardware group (``model.hidden_size=...``), checked by Hydra."""


def setting(default: Any, doc: str, *, key: str | None = None, kind: str | None = None,
            choices: tuple = (), commands: frozenset = CASE_RUN) -> Any:
    """A dataclass field that is a user-facing setting."""
    return field(default=default, metadata={"key": key, "doc": doc, "kind": kind, "choices": choices, "commands": commands})


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """What a user can set about a run, by any command. ``RunConfig`` (memdiag.config) is this
    plus what composing the case resolves (hardware, model, data)."""

    # the training
    steps: int = setting(10, "optimizer steps to run (each grad_accum micro-steps)")
    micro_batch: int = setting(1, "train_micro_batch_size_per_gpu", commands=PLANNED)
    grad_accum: int = setting(1, "gradient_accumulation_steps", commands=PLANNED)
    seq_len: int = setting(2048, "tokens per sample", commands=PLANNED)
    zero_stage: int = setting(3, "ZeRO stage", key="zero.stage", choices=(0, 1, 2, 3), commands=PLANNED)
    dtype: str = setting("bf16", "training dtype (fp16 is refused on the CPU accelerator)", choices=("bf16", "fp16", "fp32"), commands=PLANNED)
    attention: str = setting(
        "auto", "attention path: auto (the case's benchmark path; for another model transformers' default: fused where it "
        "supports SDPA, else plain), plain (matmul + softmax), "
        "sdpa_math (SDPA with a float mask), fused (flash / memory-efficient kernels)",
        choices=("auto", "plain", "sdpa_math", "fused"), commands=PLANNED)
    activation_checkpointing: bool = setting(False, "recompute each decoder layer in backward", commands=PLANNED)
    fused_cross_entropy: bool = setting(
        False, "the loss is a fused linear cross-entropy (Liger's, the HF Trainer's use_liger_kernel): the logits and their "
        "gradient exist one chunk at a time", commands=PLANNED)
    dataloader_workers: int = setting(
        0, "DataLoader worker processes per rank (forked): each holds memory of its own and, over the run, a copy of "
        "every Python object of the dataset it reads", key="dataloader.num_workers", commands=PLANNED)
    dataloader_dataset_bytes: int = setting(
        0, "bytes of the dataset each rank holds as Python objects (lists, dicts of token ids), e.g. 2G; 0 for "
        "memory-mapped, numpy or Arrow data, which forked workers share", key="dataloader.dataset_bytes", kind="size",
        commands=PLANNED)
    optimizer: str = setting(
        "auto", "how Adam steps a partition, which decides the step's fp32 temporaries: auto (a ds_config optimizer section "
        "is DeepSpeed's FusedAdam, or torch's with torch_adam; the case's own: torch's AdamW default), fused (none), "
        "torch_foreach (one: sqrt(exp_avg_sq); torch's default on CUDA), torch_for_loop (two; torch's default on CPU)",
        choices=("auto", "fused", "torch_foreach", "torch_for_loop"), commands=PLANNED)
    offload: str = setting("auto", "ZeRO offload: auto (the ds_config's offload sections), none, optimizer (states to CPU), "
                           "params (states and parameters), nvme", choices=("auto", "none", "optimizer", "params", "nvme"), commands=PLANNED)
    pin_memory: bool | None = setting(None, "pin the offloaded states' host memory; unset: the ds_config's offload section, "
                                      "else DeepSpeed's default (true from 0.19.5, false before)", kind="bool", commands=PLANNED)
    save_16bit_weights: bool | None = setting(
        None, "stage3_gather_16bit_weights_on_model_save; unset: the ds_config's", kind="bool", commands=PLANNED)
    save: bool = setting(False, "save a DeepSpeed checkpoint after the last step (engine.save_checkpoint); the plan judges "
                         "the save phase", commands=PLANNED)
    resume: bool = setting(False, "resume from a DeepSpeed checkpoint (engine.load_checkpoint; the case reads back the one it "
                           "saves); the plan judges the resume phase", commands=PLANNED)
    # loading
    load: str = setting("reference", "reference: every rank builds the whole model (the benchmark's loading, DeepSpeed issue 5290); "
                        "zero_init: memdiag's lean loading; rank0_broadcast: planned only",
                        choices=("reference", "zero_init", "rank0_broadcast"), commands=PLANNED)
    load_dtype: str | None = setting(None, "dtype the model is built in; unset: fp32 for reference, the run's dtype for zero_init",
                                     key="load.dtype", kind="str", choices=("bf16", "fp16", "fp32"), commands=PLANNED)
    load_concurrency: int = setting(0, ">0: at most this many local ranks load at once", key="load.concurrency")
    load_trim: bool = setting(False, "gc + malloc_trim(0) after the load and after deepspeed.initialize", key="load.trim")
    checkpoint: str | None = setting(None, "an HF checkpoint directory to load; unset: random initialisation", kind="path")
    checkpoint_format: str = setting("auto", "how the checkpoint is read: auto (the files in checkpoint=; none without one), "
                                     "bin, safetensors, none", choices=("auto", "bin", "safetensors", "none"), commands=PLANNED)
    checkpoint_shards: int = setting(3, "shards of the checkpoint (one is in memory at a time while a rank reads it)", commands=PLANNED)
    ds_config: str | None = setting(None, "DeepSpeed config to start from; unset: the case's", kind="path", commands=PLANNED)
    # the layout
    layout: str | None = setting(None, "NODESxRANKS_PER_NODE, e.g. 2x4", kind="str")
    nproc_per_node: int | None = setting(None, "ranks per node; unset: one per local device (2 on the CPU accelerator)", kind="int")
    hostfile: str | None = setting(None, "DeepSpeed hostfile ('NAME slots=N' per line); its first nodes are used", kind="path")
    launcher: str = setting("torchrun", "what starts a node's ranks", choices=("torchrun", "deepspeed"))
    nodes_here: bool = setting(False, "start every node's part on this machine (simulated nodes)")
    node_rank: int | None = setting(None, "run only this node's part (memdiag started on every node, e.g. by srun)", kind="int")
    master_addr: str | None = setting(None, "rendezvous host; unset: the first host (127.0.0.1 with nodes_here)", kind="str")
    master_port: int | None = setting(None, "rendezvous port; unset: a free port (nodes_here) or 29500", kind="int")
    host_ram_bytes: int | None = setting(None, "host RAM limit per node, e.g. 500G; unset: the profile's, the cgroup's or MemTotal",
                                         key="host_ram", kind="size", commands=frozenset(COMMANDS))
    force: bool = setting(False, "launch even when the plan predicts the layout does not fit (to reproduce an OOM)")
    # the recorder and the run directory
    reports_dir: str = setting("reports", "where run directories are made", kind="path", commands=LAUNCHING)
    run_dir: str | None = setting(None, "the run directory to write (node parts: the one to join)", kind="path", commands=RECORDING)
    name: str | None = setting(None, "the folder under reports_dir (a case's runs: the case name)", kind="str", commands=frozenset({CMD, API}))
    sample_hz: float = setting(100.0, "samples per second per rank", commands=RECORDING)
    sampler: str = setting(
        "watcher", "where samples are taken: watcher (the node watcher reads every rank's /proc/<pid>/status at "
        "sample_hz from outside: no thread in the ranks; on CUDA the allocator is read at the ranks' phase and layer "
        "boundaries, its peak since the last one) or rank (a sampler thread in every rank polls host and device at "
        "sample_hz); phase peaks are exact either way", choices=("watcher", "rank"), commands=RECORDING)
    sample_full_rate_s: float = setting(
        120.0, "seconds of the training loop sampled at sample_hz once its first step is done (the rest of the run, "
        "outside the training steps, always is); after them, each sample.steady_interval_s writes only the samples "
        "that bound it (lowest and highest RSS, highest device allocation): a day's run stays small and every phase "
        "peak stays exact", key="sample.full_rate_s", commands=RECORDING)
    sample_steady_interval_s: float = setting(
        1.0, "after sample.full_rate_s, the window whose bounding samples are written (0: every sample, always)",
        key="sample.steady_interval_s", commands=RECORDING)
    stacks: str = setting("auto", "phases whose host allocation stacks memray records in every rank (what was live at the "
                          "phase's peak, by line): auto (each phase's first occurrence: load, ds_initialize, the first "
                          "forward, backward and optimizer step, the first checkpoint save; the steps after them run "
                          "untraced), load, a comma list (load,ds_initialize), all (every step too), or off",
                          commands=RECORDING)
    stacks_device: str = setting("steps:2", "CUDA only: record the device allocator's history (PyTorch's memory snapshot) "
                                 "from deepspeed.initialize through this many optimizer steps, then keep what was live at "
                                 "their peak by stack: steps:N, or off", key="stacks.device", commands=RECORDING)
    timeline_columnar: str = setting(
        "auto", "at the run's end, move each rank file's samples into Parquet (rank-R.samples.parquet, zstd, with the "
        "coarse levels a report of a long run reads): auto (rank files from 8 MiB, about ten minutes at 100 Hz), "
        "always, or never (JSONL only)", key="timeline.columnar", choices=("auto", "always", "never"), commands=RECORDING)
    instrument: bool = setting(True, "false: no sampler, hooks or node watcher (the overhead baseline)")
    stop_grace_s: float = setting(30.0, "on SIGTERM/SIGINT/SIGHUP: seconds between SIGTERM to the job and SIGKILL", commands=LAUNCHING)
    guard_fraction: float = setting(0.95, "the guard stops the job when its ranks hold this fraction of host_ram (the plan "
                                    "recommends no layout past it)", key="guard.fraction", commands=RECORDING | {PLAN})
    guard_min_available_bytes: int = setting(0, "... or when MemAvailable falls below this (e.g. 2G); 0: off",
                                             key="guard.min_available", kind="size", commands=RECORDING)
    guard_grace_s: float = setting(10.0, "seconds between the guard's SIGTERM and SIGKILL", key="guard.grace_s", commands=RECORDING)
    metrics_port: int = setting(0, "the node watcher's Prometheus endpoint (/metrics): a port, 0 for a free one (its URL is "
                                "in the node timeline's header and `memdiag top`), -1 for none", commands=RECORDING)
    metrics_textfile: str | None = setting(None, "also write the metrics into this directory every second (node_exporter's "
                                           "textfile collector)", kind="path", commands=RECORDING)
    report: bool = setting(True, "write the summary, findings and report when the recording ends", commands=frozenset({API}))
    # experiments on memdiag itself
    seed: int = setting(1234, "random seed")
    overhead_ab: int = setting(0, ">0: memdiag off and on in alternating blocks of this many steps (bench/overhead)")
    inject_leak_mb: int = setting(0, ">0: keep this many MB per step alive on purpose (tests the leak check)")

    def __post_init__(self) -> None:
        positive = ("steps", "micro_batch", "grad_accum", "seq_len", "checkpoint_shards")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"{key_of(name)}={value!r} must be a positive integer")
        for name in ("load_concurrency", "overhead_ab", "inject_leak_mb", "guard_min_available_bytes", "dataloader_workers",
                     "dataloader_dataset_bytes"):
            if getattr(self, name) < 0:
                raise UsageError(f"{key_of(name)}={getattr(self, name)!r} must be >= 0")
        if self.nproc_per_node is not None and self.nproc_per_node < 1:
            raise UsageError(f"nproc_per_node={self.nproc_per_node!r} must be a positive integer")
        if not 0 < self.guard_fraction <= 1:
            raise UsageError(f"guard.fraction={self.guard_fraction} must be in (0, 1]")
        if not self.sample_hz > 0:
            raise UsageError(f"sample_hz={self.sample_hz!r} must be positive")
        for name in ("stop_grace_s", "guard_grace_s", "sample_full_rate_s", "sample_steady_interval_s"):
            if not getattr(self, name) >= 0:
                raise UsageError(f"{key_of(name)}={getattr(self, name)!r} must be >= 0 (seconds)")
        if not -1 <= self.metrics_port < 65536:
            raise UsageError(f"metrics_port={self.metrics_port!r} must be a port number (1..65535), 0 for a free port or -1 for none")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise UsageError(f"master_port={self.master_port!r} must be a port number (1..65535)")
        parse_stacks_device(self.stacks_device)
        if self.layout is not None and split_layout(self.layout) is None:
            raise UsageError(f"layout={self.layout!r}: write NODESxRANKS_PER_NODE with positive numbers, e.g. layout=2x4")


RECORDER_FIELDS = ("sample_hz", "sampler", "sample_full_rate_s", "sample_steady_interval_s", "stacks", "stacks_device")
"""What a rank's recorder reads (``memdiag.instrument``); carried to a ``run -- CMD`` job's ranks
as one environment variable, ``RECORDER_ENV``."""
RECORDER_ENV = "MEMDIAG_RECORDER"


def recorder_env(settings: RunSettings) -> str:
    import json

    return json.dumps({name: getattr(settings, name) for name in RECORDER_FIELDS})


def recorder_from_env(environ: dict) -> RunSettings:
    """The recorder's settings a launching memdiag put in ``RECORDER_ENV`` (the defaults without it)."""
    import json

    return RunSettings(**{k: v for k, v in json.loads(environ.get(RECORDER_ENV) or "{}").items() if k in RECORDER_FIELDS})


def parse_stacks_device(text: str | None) -> int:
    """``stacks.device=`` as the optimizer steps whose CUDA allocations are recorded: 0 for off."""
    text = (text or "").strip().lower()
    if text in ("", "off", "none", "false", "0"):
        return 0
    kind, _, count = text.partition(":")
    if kind != "steps" or not count.isdigit() or int(count) < 1:
        raise UsageError(f"stacks.device={text!r}: write steps:N (N >= 1) or off")
    return int(count)


@dataclass(frozen=True)
class Setting:
    """One declared setting, as the parsers and ``--help`` see it."""

    key: str
    field: str
    kind: str
    default: Any
    doc: str
    choices: tuple
    commands: frozenset

    def parse(self, value: Any) -> Any:
        """A value from the command line (text) or the API (text or Python) -> the typed value."""
        if self.default is None and (value is None or isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        try:
            if self.kind == "bool":
                parsed = value if isinstance(value, bool) else BOOL_WORDS[str(value).lower()]
            elif self.kind == "int":
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                parsed = int(value)
            elif self.kind == "float":
                parsed = float(value)
            elif self.kind == "size":
                return parse_size(value, name=self.key)
            else:
                parsed = str(value)
        except (KeyError, ValueError, TypeError):
            raise UsageError(f"{self.key}={value}: expected {EXPECTED[self.kind]}") from None
        if self.choices and parsed not in self.choices:
            raise UsageError(f"{self.key}={value!r}: use one of {', '.join(map(str, self.choices))}")
        return parsed

    def default_text(self) -> str:
        if self.default is None:
            return "unset"
        if isinstance(self.default, bool):
            return str(self.default).lower()
        return str(self.default)


EXPECTED = {"bool": "true or false", "int": "an integer", "float": "a number", "size": ACCEPTED_FORMS, "str": "text", "path": "a path"}


def _kind(f) -> str:
    if f.metadata["kind"]:
        return f.metadata["kind"]
    return {bool: "bool", int: "int", float: "float", str: "str"}[type(f.default)]


SCHEMA: dict[str, Setting] = {
    (f.metadata["key"] or f.name): Setting(
        key=f.metadata["key"] or f.name, field=f.name, kind=_kind(f), default=f.default, doc=f.metadata["doc"],
        choices=f.metadata["choices"], commands=f.metadata["commands"],
    )
    for f in fields(RunSettings)
    if f.metadata and f.default is not MISSING
}
BY_FIELD = {s.field: s for s in SCHEMA.values()}
ALIASES = {"flash_attn": ("attention", {True: "fused", False: "plain"})}
"""Older spellings that still parse: ``flash_attn=true`` is ``attention=fused``."""


def key_of(field_name: str) -> str:
    return BY_FIELD[field_name].key if field_name in BY_FIELD else field_name


def keys_for(command: str) -> list[str]:
    return [key for key, s in SCHEMA.items() if command in s.commands]


def split_layout(text: str) -> tuple[int, int] | None:
    """``2x4`` -> (2 nodes, 4 ranks per node); None when it is not that form."""
    nodes, sep, per_node = str(text).lower().partition("x")
    if not sep or not nodes.isdigit() or not per_node.isdigit() or int(nodes) < 1 or int(per_node) < 1:
        return None
    return int(nodes), int(per_node)


def split_token(token: str) -> tuple[str, str]:
    key, sep, value = token.partition("=")
    key = key.lstrip("+~")
    if not sep or not key or any(c.isspace() for c in key):
        raise UsageError(f"malformed override {token!r}: write key=value, e.g. steps=20")
    return key, value


def takes_groups(command: str) -> bool:
    return command in (RUN, PLAN)


def _refuse(key: str, command: str) -> UsageError:
    if key in SCHEMA or key in ALIASES or key in GROUP_KEYS:
        takers = SCHEMA[key].commands if key in SCHEMA else PLANNED
        where = ", ".join(f"`memdiag {c}`" if c != API else "`memdiag.record`" for c in COMMANDS if c in takers)
        return UsageError(f"{key!r} is not a setting of {_name(command)} (it is taken by {where}); "
                          f"{_name(command)} takes: {', '.join(keys_for(command))}")
    valid = keys_for(command) + ([*ALIASES, *GROUP_KEYS] if takes_groups(command) else [])
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"; closest valid keys: {', '.join(close)}" if close else f"; valid keys: {', '.join(keys_for(command))}"
    return UsageError(f"unknown key {key!r} for {_name(command)}{hint}")


def _name(command: str) -> str:
    return "`memdiag.record`" if command == API else f"`memdiag {command}`"


def parse(tokens: list[str], command: str) -> tuple[dict[str, Any], list[str]]:
    """``key=value`` tokens -> ({field: typed value} of the settings given, the tokens that
    choose or change the case's config groups, for Hydra). Refuses, in one line, a malformed
    token, an unknown key (with the closest ones), a key this command does not take (with the
    commands that do) and a bad value (with what it accepts)."""
    values: dict[str, Any] = {}
    groups: list[str] = []
    for token in tokens:
        key, text = split_token(token)
        if takes_groups(command) and (key in GROUP_KEYS or key.startswith(GROUP_PREFIXES)):
            groups.append(f"{key}={text}")
            continue
        values.update(parse_one(key, text, command))
    return values, groups


def parse_one(key: str, value: Any, command: str) -> dict[str, Any]:
    if key in ALIASES and command in PLANNED:
        target, mapping = ALIASES[key]
        flag = SCHEMA[target].parse
        try:
            word = value if isinstance(value, bool) else BOOL_WORDS[str(value).lower()]
        except KeyError:
            raise UsageError(f"{key}={value!r}: expected true or false") from None
        return {SCHEMA[target].field: flag(mapping[word])}
    if key not in SCHEMA or command not in SCHEMA[key].commands:
        raise _refuse(key, command)
    return {SCHEMA[key].field: SCHEMA[key].parse(value)}


def parse_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``memdiag.record(sample_hz=200, host_ram="500G", guard_fraction=0.9)``: keyword names
    are the keys with dots as underscores; values as on the command line or already typed."""
    by_kwarg = {s.key.replace(".", "_"): s.key for s in SCHEMA.values()}
    values: dict[str, Any] = {}
    for name, value in kwargs.items():
        values.update(parse_one(by_kwarg.get(name, name), value, API))
    return values


def defaults(command: str) -> dict[str, Any]:
    """{field: default} of every setting ``command`` takes."""
    return {s.field: s.default for s in SCHEMA.values() if command in s.commands}


def resolve(command: str, tokens: list[str] = (), **kwargs: Any) -> RunSettings:
    """The settings of one command's run: its defaults, then the tokens (groups are not
    allowed here: use ``memdiag.config.compose`` for a case)."""
    values, groups = parse(list(tokens), command)
    if groups:
        raise UsageError(f"{groups[0]!r}: {_name(command)} runs no case; drop it")
    values |= parse_kwargs(kwargs) if kwargs else {}
    return RunSettings(**values)


def help_text(command: str) -> str:
    """The keys ``command`` takes, for its ``--help``."""
    lines = []
    for key in keys_for(command):
        s = SCHEMA[key]
        choices = f" ({' | '.join(map(str, s.choices))})" if s.choices else ""
        lines.append(f"  {key}={s.default_text()}{choices}: {s.doc}")
    return "\n".join(lines)
