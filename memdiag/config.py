"""Resolve ``key=value`` overrides into one typed run configuration.

Hydra's compose API does the composition (config groups ``model``, ``hardware``, ``data`` under
``cases/<case>/conf``); this module adds what users of this tool expect on top: ``model.scale=X``
as a spelling of the group choice ``model=X``, the CPU fallback when no accelerator is present
(stated in one line), and one-line errors that name the bad token and the closest valid keys.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from memdiag.errors import UsageError
from memdiag.units import parse_size

CASES_DIR = Path(__file__).resolve().parent.parent / "cases"
GROUPS = ("model", "hardware", "data", "load")
GROUP_ALIASES = {
    "model.scale": "model",
    "hardware.name": "hardware",
    "data.source": "data",
    "load.mode": "load",
}
LOADS = ("zero_init", "reference")
LAUNCHERS = ("torchrun", "deepspeed")
DTYPES = ("bf16", "fp16", "fp32")


@dataclass(frozen=True, kw_only=True)
class HardwareProfile:
    name: str
    """Profile name (``cpu``, ``BI-V150``, ...)."""
    accelerator: str
    """``cuda`` for CUDA-like stacks (NVIDIA, Iluvatar CoreX), ``cpu`` for DeepSpeed's CPU one."""
    device_memory_bytes: int | None
    """Memory of one device (one rank); ``None``: the host's, on the CPU accelerator."""
    devices_per_card: int = 1
    """Devices (ranks) one card holds: a BI-V150 card has two chips."""
    cards_per_node: int = 8
    peak_flops: float | None = None
    """Theoretical dense bf16 FLOP/s of one device, for MFU; ``None``: MFU not reported."""
    host_ram_bytes: int | None = None
    """Host RAM of one node; ``None``: read from the machine at run time."""
    device_runtime_context_bytes: int = 0
    """Device memory a rank uses before any tensor (driver context, library workspaces)."""
    host_runtime_context_bytes: int = 0
    """Host RAM a rank maps for the accelerator stack, on top of Python and the frameworks."""

    def __post_init__(self) -> None:
        if self.accelerator not in ("cuda", "cpu"):
            raise UsageError(f"hardware.accelerator={self.accelerator!r}: use cuda or cpu")
        if self.devices_per_card < 1 or self.cards_per_node < 1:
            raise UsageError("hardware.devices_per_card and hardware.cards_per_node must be >= 1")

    @property
    def devices_per_node(self) -> int:
        return self.devices_per_card * self.cards_per_node

    @classmethod
    def from_cfg(cls, cfg: dict) -> HardwareProfile:
        def size(key: str) -> int | None:
            value = cfg.get(key)
            return None if value is None else parse_size(value, name=f"hardware.{key}")

        return cls(
            name=str(cfg["name"]),
            accelerator=str(cfg["accelerator"]),
            device_memory_bytes=size("device_memory"),
            devices_per_card=int(cfg.get("devices_per_card", 1)),
            cards_per_node=int(cfg.get("cards_per_node", 8)),
            peak_flops=None if cfg.get("peak_flops") is None else float(cfg["peak_flops"]),
            host_ram_bytes=size("host_ram"),
            device_runtime_context_bytes=size("device_runtime_context") or 0,
            host_runtime_context_bytes=size("host_runtime_context") or 0,
        )


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One run, fully resolved: what ``run.json`` records and every rank reads back."""

    case: str
    steps: int
    micro_batch: int
    grad_accum: int
    seq_len: int
    nproc_per_node: int
    nnodes: int
    load: str
    """``zero_init`` (memdiag's lean loading) or ``reference`` (the benchmark's)."""
    load_concurrency: int
    """>0 (reference loading): at most this many local ranks build their model at once."""
    load_trim: bool
    """gc + malloc_trim(0) after the load and after deepspeed.initialize."""
    load_dtype: str | None
    """dtype the model is built in; None: fp32 for reference, the run's dtype for zero_init."""
    checkpoint: str | None
    ds_config: str
    """Absolute path of the DeepSpeed config the run starts from (overrides applied on top)."""
    zero_stage: int
    dtype: str
    reports_dir: str
    sample_hz: float
    instrument: bool
    """False runs the case without memdiag's sampler and hooks (overhead baseline)."""
    seed: int
    overhead_ab: int
    """>0: alternate memdiag off/on every this many steps inside the run (bench/overhead)."""
    inject_leak_mb: int
    """>0: deliberately keep this many MB alive per step (exercises the leak check)."""
    guard_fraction: float
    guard_min_available_bytes: int
    guard_grace_s: float
    host_ram_bytes: int | None
    force: bool
    """Launch even when the plan predicts that the layout does not fit (to reproduce an OOM)."""
    stop_grace_s: float = 30.0
    """On SIGTERM/SIGINT/SIGHUP: how long the job gets between SIGTERM and SIGKILL."""
    hostfile: str | None = None
    launcher: str = "torchrun"
    """``torchrun`` or ``deepspeed``: what starts the ranks of one node."""
    nodes_here: bool = False
    """Start every node's part on this machine (nodes simulated on one host)."""
    node_rank: int | None = None
    """Set: this process runs only that node's part of a multi-node run."""
    master_addr: str | None = None
    master_port: int | None = None
    run_dir: str | None = None
    """A node part joins this run directory instead of making one."""
    model: dict
    hardware: HardwareProfile
    data: dict
    overrides: list[str] = field(default_factory=list)
    selection_note: str = ""
    """Why the hardware profile was chosen, when memdiag chose it (first line of the run)."""

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batch", "grad_accum", "seq_len", "nproc_per_node", "nnodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UsageError(f"{name}={value!r} must be a positive integer")
        if self.load not in LOADS:
            raise UsageError(f"load={self.load!r}: use one of {', '.join(LOADS)}")
        if self.load_dtype is not None and self.load_dtype not in DTYPES:
            raise UsageError(f"load.dtype={self.load_dtype!r}: use one of {', '.join(DTYPES)}")
        if self.load_concurrency < 0:
            raise UsageError(f"load.concurrency={self.load_concurrency} must be >= 0")
        if self.dtype not in DTYPES:
            raise UsageError(f"dtype={self.dtype!r}: use one of {', '.join(DTYPES)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise UsageError(f"zero.stage={self.zero_stage!r}: use 0, 1, 2 or 3")
        if not 0 < self.guard_fraction <= 1:
            raise UsageError(f"guard.fraction={self.guard_fraction} must be in (0, 1]")
        if self.overhead_ab < 0 or self.inject_leak_mb < 0:
            raise UsageError("overhead_ab and inject_leak_mb must be >= 0")
        if not self.stop_grace_s >= 0:
            raise UsageError(f"stop_grace_s={self.stop_grace_s!r} must be >= 0 (seconds)")
        if not self.sample_hz > 0:
            raise UsageError(f"sample_hz={self.sample_hz!r} must be positive")
        if self.hardware.accelerator == "cuda" and self.nproc_per_node > self.hardware.devices_per_node:
            raise UsageError(
                f"layout {self.layout}: {self.nproc_per_node} ranks per node, but hardware profile {self.hardware.name} has "
                f"{self.hardware.devices_per_node} devices per node ({self.hardware.devices_per_card} per card x "
                f"{self.hardware.cards_per_node} cards); use at most {self.nnodes}x{self.hardware.devices_per_node}"
            )
        if self.launcher not in LAUNCHERS:
            raise UsageError(f"launcher={self.launcher!r}: use one of {', '.join(LAUNCHERS)}")
        if self.node_rank is not None and not (isinstance(self.node_rank, int) and 0 <= self.node_rank < self.nnodes):
            raise UsageError(f"node_rank={self.node_rank!r} must be an integer in 0..{self.nnodes - 1} (nnodes={self.nnodes})")
        if self.node_rank is not None and not self.run_dir:
            raise UsageError("node_rank= needs run_dir=DIR: the run directory every node writes into")
        if self.master_port is not None and not (isinstance(self.master_port, int) and 0 < self.master_port < 65536):
            raise UsageError(f"master_port={self.master_port!r} must be a port number (1..65535)")
        if self.nnodes > 1 and self.node_rank is None and not self.nodes_here and not self.hostfile:
            raise UsageError(
                f"layout {self.layout} spans {self.nnodes} nodes: give hostfile=FILE (memdiag starts each node over ssh), "
                "nodes_here=true (simulate the nodes on this machine), or node_rank=I run_dir=DIR on every node"
            )
        if self.seq_len > int(self.model.get("model_max_length", self.seq_len)):
            raise UsageError(
                f"seq_len={self.seq_len} exceeds model.model_max_length="
                f"{self.model['model_max_length']}"
            )

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def layout(self) -> str:
        return f"{self.nnodes}x{self.nproc_per_node}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        data = dict(data)
        data["hardware"] = HardwareProfile(**data["hardware"])
        return cls(**data)


def available_cases() -> list[str]:
    return sorted(p.parent.parent.name for p in CASES_DIR.glob("*/conf/config.yaml"))


def case_dir(case: str) -> Path:
    cases = available_cases()
    if case not in cases:
        hint = difflib.get_close_matches(case, cases, n=1)
        near = f" (did you mean {hint[0]}?)" if hint else ""
        raise UsageError(f"unknown case {case!r}{near}; available: {', '.join(cases)}")
    return CASES_DIR / case


def split_layout(text: str) -> tuple[int, int] | None:
    """``2x4`` -> (2 nodes, 4 ranks per node); None when it is not that form (callers word the error)."""
    nodes, sep, per_node = text.lower().partition("x")
    if not sep or not nodes.isdigit() or not per_node.isdigit() or int(nodes) < 1 or int(per_node) < 1:
        return None
    return int(nodes), int(per_node)


def parse_layout(text: str) -> tuple[int, int]:
    layout = split_layout(text)
    if layout is None:
        raise UsageError(f"layout={text!r}: write NODESxRANKS_PER_NODE with positive numbers, e.g. layout=2x4")
    return layout


def _split(token: str) -> tuple[str, str]:
    key, sep, value = token.partition("=")
    key = key.lstrip("+~")
    if not sep or not key or any(c.isspace() for c in key):
        raise UsageError(f"malformed override {token!r}: write key=value, e.g. steps=20")
    return key, value


def _flat_keys(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, dict):
        return [prefix]
    keys = []
    for key, value in node.items():
        keys += _flat_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]
    return keys


def _cuda_available() -> tuple[bool, str]:
    try:
        import torch

        if torch.cuda.is_available():
            return True, f"{torch.cuda.device_count()} CUDA device(s) visible"
        return False, "torch.cuda.is_available() is False"
    except Exception as exc:  # a broken driver reads as no accelerator, with the reason
        return False, f"CUDA probe failed: {exc}"


def compose(overrides: list[str], *, detect_accelerator: bool = True) -> RunConfig:
    """Overrides (``case=... model.scale=tiny steps=20``) -> a validated ``RunConfig``."""
    pairs = [_split(token) for token in overrides]
    case = next((v for k, v in pairs if k == "case"), "baichuan2_13b")
    conf_dir = case_dir(case) / "conf"
    hydra_overrides: list[str] = []
    for (key, value), token in zip(pairs, overrides):
        if key == "layout":
            nodes, per_node = parse_layout(value)
            hydra_overrides += [f"nnodes={nodes}", f"nproc_per_node={per_node}"]
        elif key in GROUP_ALIASES:
            hydra_overrides.append(f"{GROUP_ALIASES[key]}={value}")
        else:
            hydra_overrides.append(token)
    chosen_groups = {k.split("=", 1)[0] for k in hydra_overrides} & set(GROUPS)

    note = ""
    if detect_accelerator and "hardware" not in chosen_groups:
        # every key and value is checked first, in well under a second: probing CUDA imports torch
        _hydra(conf_dir, ["hardware=cpu", *hydra_overrides])
        has_cuda, why = _cuda_available()
        if not has_cuda:
            hydra_overrides.insert(0, "hardware=cpu")
            note = (
                f"no accelerator ({why}): using hardware profile 'cpu' - DeepSpeed's CPU "
                "accelerator with gloo, model.scale=tiny, 2 ranks per node (override with hardware=, "
                "model.scale=, nproc_per_node=, layout=)"
            )
        else:
            note = f"accelerator found ({why}): hardware profile from the case"

    raw = _hydra(conf_dir, hydra_overrides)
    if note.startswith("no accelerator"):  # say what will run, overrides included
        nproc = raw.get("nproc_per_node") or 2
        note = note.replace("model.scale=tiny, 2 ranks per node", f"model.scale={raw['model'].get('scale')}, {nproc} rank{'s' if nproc != 1 else ''} per node")
    return _to_run_config(raw, overrides, conf_dir.parent, note)


def _hydra(conf_dir: Path, hydra_overrides: list[str]) -> dict:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
            cfg = hydra_compose("config", overrides=hydra_overrides)
    except HydraException as exc:
        raise _explain(exc, hydra_overrides, conf_dir) from None
    raw = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(raw, dict)
    return raw


def _explain(exc: Exception, overrides: list[str], conf_dir: Path) -> UsageError:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    message = str(exc).splitlines()[0]
    if "Could not override" in message or "not in struct" in message:
        key = message.split("'")[1] if "'" in message else message
        with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
            base = OmegaConf.to_container(hydra_compose("config", overrides=[]))
        valid = _flat_keys(base) + list(GROUP_ALIASES) + ["case"]
        close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
        hint = f"; closest valid keys: {', '.join(close)}" if close else ""
        return UsageError(f"unknown key {key!r}{hint}")
    if "Could not find" in message or "Could not load" in message:
        group = next((g for g in GROUPS if f"'{g}/" in message), None)
        if group:
            options = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
            bad = next((o.split("=", 1)[1] for o in overrides if o.startswith(f"{group}=")), "?")
            alias = "model.scale" if group == "model" else group
            return UsageError(f"unknown {alias} {bad!r}; available: {', '.join(options)}")
    bad_token = next((o for o in overrides if o and o.split("=", 1)[-1] in message), None)
    where = f" in {bad_token!r}" if bad_token else ""
    return UsageError(f"cannot read override{where}: {message}")


def _to_run_config(raw: dict, overrides: list[str], case_path: Path, note: str) -> RunConfig:
    hardware = HardwareProfile.from_cfg(raw["hardware"])
    nproc = raw.get("nproc_per_node")
    if nproc is None:
        if hardware.accelerator == "cuda":
            import torch

            nproc = torch.cuda.device_count() or hardware.devices_per_node
        else:
            nproc = 2
    ds_config = Path(raw["ds_config"])
    if not ds_config.is_absolute():
        ds_config = case_path / ds_config
    if not ds_config.is_file():
        raise UsageError(f"ds_config={raw['ds_config']!r}: no file at {ds_config}")
    host_ram = raw.get("host_ram")
    try:
        return RunConfig(
            case=raw["case"],
            steps=raw["steps"],
            micro_batch=raw["micro_batch"],
            grad_accum=raw["grad_accum"],
            seq_len=raw["seq_len"],
            nproc_per_node=nproc,
            nnodes=raw["nnodes"],
            load=raw["load"]["mode"],
            load_concurrency=int(raw["load"]["concurrency"]),
            load_trim=bool(raw["load"]["trim"]),
            load_dtype=raw["load"]["dtype"],
            checkpoint=raw.get("checkpoint"),
            ds_config=str(ds_config),
            zero_stage=raw["zero"]["stage"],
            dtype=raw["dtype"],
            reports_dir=str(raw["reports_dir"]),
            sample_hz=float(raw["sample_hz"]),
            instrument=bool(raw["instrument"]),
            seed=raw["seed"],
            overhead_ab=int(raw["overhead_ab"]),
            inject_leak_mb=int(raw["inject_leak_mb"]),
            guard_fraction=float(raw["guard"]["fraction"]),
            guard_min_available_bytes=parse_size(raw["guard"]["min_available"], name="guard.min_available"),
            guard_grace_s=float(raw["guard"]["grace_s"]),
            host_ram_bytes=None if host_ram is None else parse_size(host_ram, name="host_ram"),
            force=bool(raw["force"]),
            stop_grace_s=float(raw.get("stop_grace_s", 30.0)),
            hostfile=raw.get("hostfile"),
            launcher=str(raw.get("launcher", "torchrun")),
            nodes_here=bool(raw.get("nodes_here", False)),
            node_rank=raw.get("node_rank"),
            master_addr=raw.get("master_addr"),
            master_port=raw.get("master_port"),
            run_dir=raw.get("run_dir"),
            model=raw["model"],
            hardware=hardware,
            data=raw["data"],
            overrides=list(overrides),
            selection_note=note,
        )
    except TypeError as exc:  # a value of the wrong type from the command line
        raise UsageError(f"bad override value: {exc}") from None


def load_ds_config(config: RunConfig) -> dict:
    """The case's ds_config with the run's settings applied (what the ranks pass DeepSpeed)."""
    ds = json.loads(Path(config.ds_config).read_text())
    ds["train_micro_batch_size_per_gpu"] = config.micro_batch
    ds["gradient_accumulation_steps"] = config.grad_accum
    ds.pop("train_batch_size", None)
    ds.setdefault("zero_optimization", {})["stage"] = config.zero_stage
    ds["bf16"] = {"enabled": config.dtype == "bf16"}
    ds["fp16"] = {"enabled": config.dtype == "fp16"}
    ds["steps_per_print"] = max(config.steps + 1, int(ds.get("steps_per_print", 10)))
    return ds
