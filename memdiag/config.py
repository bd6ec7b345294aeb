"""Compose a case and the user's ``key=value`` settings into one typed run configuration.

The settings themselves are declared once in ``memdiag.settings``; this module adds the case:
Hydra composes its config groups (``model``, ``hardware``, ``data`` under
``cases/<case>/conf``), ``model.scale=X`` spells the group choice ``model=X``, and without an
accelerator the CPU profile is chosen and said in one line.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from memdiag import dsconfig
from memdiag import settings as schema
from memdiag.errors import UsageError
from memdiag.registry import get_case
from memdiag.settings import RunSettings, split_layout  # noqa: F401 (split_layout: re-exported)
from memdiag.units import parse_size

GROUPS = ("model", "hardware", "data")
GROUP_ALIASES = {
    "model.scale": "model",
    "hardware.name": "hardware",
    "data.source": "data",
}


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
class RunConfig(RunSettings):
    """One run, fully resolved: the settings (``RunSettings``) and what composing the case
    made of them. What ``run.json`` records and every rank reads back."""

    case: str
    nnodes: int
    nproc_per_node: int
    layout: str
    ds_config: str
    """Absolute path of the DeepSpeed config the run starts from (the settings applied on top)."""
    ds_config_is_users: bool = False
    """The user gave ``ds_config=``: the settings it decides are read from it (``memdiag.dsconfig``)."""
    model: dict
    hardware: HardwareProfile
    data: dict
    overrides: list[str] = field(default_factory=list)
    selection_note: str = ""
    """Why the hardware profile was chosen, when memdiag chose it (first line of the run)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.nnodes < 1 or self.nproc_per_node < 1:
            raise UsageError(f"layout {self.layout}: nodes and ranks per node must be positive")
        if self.hardware.accelerator == "cuda" and self.nproc_per_node > self.hardware.devices_per_node:
            raise UsageError(
                f"layout {self.layout}: {self.nproc_per_node} ranks per node, but hardware profile {self.hardware.name} has "
                f"{self.hardware.devices_per_node} devices per node ({self.hardware.devices_per_card} per card x "
                f"{self.hardware.cards_per_node} cards); use at most {self.nnodes}x{self.hardware.devices_per_node}"
            )
        if self.node_rank is not None and not 0 <= self.node_rank < self.nnodes:
            raise UsageError(f"node_rank={self.node_rank!r} must be an integer in 0..{self.nnodes - 1} (nnodes={self.nnodes})")
        if self.node_rank is not None and not self.run_dir:
            raise UsageError("node_rank= needs run_dir=DIR: the run directory every node writes into")

    def check_case_model_length(self) -> None:
        """``seq_len`` against the case's own model; a plan of another model (``--model-config``,
        a launch command's ``--model_name_or_path``) is not held to the case's maximum."""
        if self.seq_len > int(self.model.get("model_max_length", self.seq_len)):
            raise UsageError(f"seq_len={self.seq_len} exceeds model.model_max_length={self.model['model_max_length']}")

    def check_launchable(self) -> None:
        """What only a launch needs: the nodes it spans, and values the case's training can run."""
        self.check_case_model_length()
        if self.nnodes > 1 and self.node_rank is None and not self.nodes_here and not self.hostfile:
            raise UsageError(
                f"layout {self.layout} spans {self.nnodes} nodes: give hostfile=FILE (memdiag starts each node over ssh), "
                "nodes_here=true (simulate the nodes on this machine), or node_rank=I run_dir=DIR on every node"
            )
        runnable = get_case(self.case).runnable
        for name, values in runnable.items():
            value = getattr(self, name)
            if value != "auto" and value not in values:
                raise UsageError(
                    f"{schema.key_of(name)}={str(value).lower()}: the {self.case} case's training runs "
                    f"{', '.join(str(v).lower() for v in values)} "
                    f"(`memdiag plan` models {value} too)"
                )

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def attention_path(self) -> str:
        """``attention`` with ``auto`` resolved: the case's benchmark path (one answer for
        the planner and the ranks)."""
        if self.attention != "auto":
            return self.attention
        return get_case(self.case).benchmark_attention or "plain"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        data = dict(data)
        data["hardware"] = HardwareProfile(**data["hardware"])
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def parse_layout(text: str) -> tuple[int, int]:
    layout = split_layout(text)
    if layout is None:
        raise UsageError(f"layout={text!r}: write NODESxRANKS_PER_NODE with positive numbers, e.g. layout=2x4")
    return layout


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


def compose(overrides: list[str], *, command: str = schema.RUN, detect_accelerator: bool = True) -> RunConfig:
    """Overrides (``case=... model.scale=tiny steps=20``) -> a validated ``RunConfig``; every
    setting parsed by ``memdiag.settings`` for ``command`` (run or plan), the case's groups by Hydra."""
    values, group_tokens = schema.parse(overrides, command)
    given = set(values)
    users_ds_config = None
    if values.get("ds_config"):
        # the user's own DeepSpeed config, relative to where they stand: what it decides is read
        # from it, below what they gave as keys and above the case's defaults
        users_ds_config = Path(values["ds_config"]).resolve()
        for key, value in dsconfig.settings_from(dsconfig.read(users_ds_config), users_ds_config, given).items():
            values.setdefault(key, value)
    pairs = [schema.split_token(token) for token in group_tokens]
    case = next((v for k, v in pairs if k == "case"), "baichuan2_13b")
    spec = get_case(case)
    conf_dir = spec.conf_dir
    hydra_overrides = [f"{GROUP_ALIASES.get(key, key)}={value}" for key, value in pairs if key != "case"]
    chosen_groups = {k.split("=", 1)[0] for k in hydra_overrides} & set(GROUPS)

    note = ""
    if detect_accelerator and "hardware" not in chosen_groups:
        # every key and value is checked first, in well under a second: probing CUDA imports torch
        _hydra(conf_dir, ["hardware=cpu", *hydra_overrides])
        has_cuda, why = _cuda_available()
        if not has_cuda:
            hydra_overrides.insert(0, "hardware=cpu")
            note = f"no accelerator ({why}): using hardware profile 'cpu' - DeepSpeed's CPU accelerator with gloo"
        else:
            note = f"accelerator found ({why}): hardware profile from the case"

    raw = _hydra(conf_dir, hydra_overrides)
    hardware = HardwareProfile.from_cfg(raw["hardware"])
    # a config group may set a setting's default for itself (the CPU profile: 20 steps of 256
    # tokens on 2 ranks); what the user gave wins
    group_defaults = {k: v for k, v in raw.items() if k in schema.SCHEMA}
    for key, value in group_defaults.items():
        values.setdefault(schema.SCHEMA[key].field, schema.SCHEMA[key].parse(value))
    nnodes, nproc = 1, values.get("nproc_per_node")
    if values.get("layout"):
        nnodes, nproc = parse_layout(values["layout"])
    if nproc is None:
        if hardware.accelerator == "cuda" and detect_accelerator:
            import torch

            nproc = torch.cuda.device_count() or hardware.devices_per_node
        elif hardware.accelerator == "cuda":
            nproc = hardware.devices_per_node
        else:
            nproc = 2
    if note.startswith("no accelerator"):  # say what will run, overrides included
        note += (f", model.scale={raw['model'].get('scale')}, {nproc} rank{'s' if nproc != 1 else ''} per node "
                 "(override with hardware=, model.scale=, nproc_per_node=, layout=)")
    values.pop("ds_config", None)
    ds_config = users_ds_config or Path(raw["ds_config"])
    if not ds_config.is_absolute():
        ds_config = conf_dir.parent / ds_config  # the case's, beside its package
    if not ds_config.is_file():
        raise UsageError(f"ds_config={str(ds_config)!r}: no such file")
    values.update(nnodes=nnodes, nproc_per_node=nproc, layout=f"{nnodes}x{nproc}")
    return RunConfig(
        **values, case=case, ds_config=str(ds_config), ds_config_is_users=users_ds_config is not None,
        model=raw["model"], hardware=hardware, data=raw["data"],
        overrides=list(overrides), selection_note=note,
    )


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
        valid = [k for k in _flat_keys(base) if k.startswith(schema.GROUP_PREFIXES)] + list(GROUP_ALIASES) + ["case"]
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


def load_ds_config(config: RunConfig, *, hidden_size: int | None = None) -> dict:
    """The run's ds_config with its settings applied (what the ranks pass DeepSpeed, and what
    the planner reads): a setting left unset or ``auto`` keeps the ds_config's value; the HF
    Trainer's ``"auto"`` values are filled as the Trainer fills them, the bucket sizes from
    ``hidden_size`` (the case model's unless the planner plans another)."""
    ds = dsconfig.read(config.ds_config)
    dsconfig.fill_auto(ds, micro_batch=config.micro_batch, grad_accum=config.grad_accum, dtype=config.dtype,
                       hidden_size=int(hidden_size or config.model["hidden_size"]))
    if left := dsconfig.still_auto(ds):
        raise UsageError(f"ds_config={config.ds_config}: {', '.join(left)} \"auto\", which the HF Trainer does not fill: give a value")
    ds["train_micro_batch_size_per_gpu"] = config.micro_batch
    ds["gradient_accumulation_steps"] = config.grad_accum
    ds.pop("train_batch_size", None)
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = config.zero_stage
    if config.offload in ("none", "optimizer", "params"):
        zero.pop("offload_optimizer", None)
        zero.pop("offload_param", None)
        if config.offload != "none":
            zero["offload_optimizer"] = {"device": "cpu"}
        if config.offload == "params":
            zero["offload_param"] = {"device": "cpu"}
    if config.pin_memory is not None:
        for section in ("offload_optimizer", "offload_param"):
            if section in zero:
                zero[section]["pin_memory"] = config.pin_memory
    if config.save_16bit_weights is not None:
        zero["stage3_gather_16bit_weights_on_model_save"] = config.save_16bit_weights
    ds["bf16"] = {"enabled": config.dtype == "bf16"}
    ds["fp16"] = {"enabled": config.dtype == "fp16"}
    ds["steps_per_print"] = max(config.steps + 1, int(ds.get("steps_per_print", 10)))
    return ds
