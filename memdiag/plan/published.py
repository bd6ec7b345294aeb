"""Published runs as a validation set: each case's memdiag prediction beside DeepSpeed's estimator.

A case file is JSON Lines, one published run per line (``bench/published/cases.jsonl``): where it
was published (``source``: ``owner/repo#issue`` or a URL) and the sentence with the figure
(``quote``), the model (``case:<name>`` for a memdiag case, else a config name in the models
folder), the layout, the device's memory, the node's host RAM, the training settings in
``memdiag plan``'s ``key=value`` names, the ZeRO buffers of its ds_config, and either a figure
(``measured``: ``device_used_peak``, ``host_node_peak`` or ``host_node_phase:<phase>``, with an
optional ``low``/``high`` range) or an outcome (``outcome``: the ``device`` or ``host`` limit,
``oom`` or ``fits``), and what is ambiguous in it. A malformed line is refused with its number.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path

from memdiag.config import HardwareProfile
from memdiag.errors import UsageError
from memdiag.units import parse_size

CATEGORIES = ("device", "host", "host_offload")
"""``host``: host RAM without offload; ``host_offload``: with optimizer/parameter offload."""
MEASURES = ("device_used_peak", "host_node_peak")
PHASE_PREFIX = "host_node_phase:"
DEFAULT_PHASES = ("load", "initialize", "training")
"""A run that neither saved nor resumed a checkpoint (a case names ``save``/``resume`` when it did)."""
REQUIRED = ("id", "category", "source", "quote", "model", "nodes", "devices_per_node", "device_memory", "settings", "ambiguity")


@dataclass(frozen=True, kw_only=True)
class PublishedCase:
    id: str
    category: str
    source: str
    quote: str
    model: str
    nodes: int
    devices_per_node: int
    device_memory_bytes: int
    host_ram_bytes: int | None
    settings: dict
    ds_config: dict
    ambiguity: str
    profile: str | None = None
    ds_config_file: str | None = None
    """A ds_config file as published (relative to the models folder's parent), read as
    ``memdiag plan --ds-config`` reads one."""
    phases: tuple[str, ...] = DEFAULT_PHASES
    """The phases the published run went through: its peak is the highest of these."""
    measured_what: str | None = None
    measured_bytes: int | None = None
    measured_low_bytes: int | None = None
    measured_high_bytes: int | None = None
    outcome_limit: str | None = None
    outcome_result: str | None = None
    line: int = 0

    @property
    def is_figure(self) -> bool:
        return self.measured_bytes is not None


def _refuse(path: Path, line: int, what: str) -> UsageError:
    return UsageError(f"{path}:{line}: {what}")


def parse_case(text: str, *, path: Path, line: int) -> PublishedCase:
    """One line of a case file, validated; every problem names the file and line."""
    try:
        row = json.loads(text)
    except ValueError as exc:
        raise _refuse(path, line, f"not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise _refuse(path, line, "a case is a JSON object")
    missing = [k for k in REQUIRED if k not in row]
    if missing:
        raise _refuse(path, line, f"missing {', '.join(missing)}")
    if row["category"] not in CATEGORIES:
        raise _refuse(path, line, f"category {row['category']!r}: use one of {', '.join(CATEGORIES)}")
    measured, outcome = row.get("measured"), row.get("outcome")
    if (measured is None) == (outcome is None):
        raise _refuse(path, line, "give exactly one of measured (a figure) or outcome (oom or fits)")
    try:
        nodes, per_node = int(row["nodes"]), int(row["devices_per_node"])
        if str(row["device_memory"]).strip().upper().endswith(("KB", "MB", "GB", "TB")):
            # an "80GB" A100 has 80 GiB (nvidia-smi: 81920MiB), as memdiag's own profiles say
            raise UsageError(f"device_memory {row['device_memory']!r}: a card's memory as sold is binary; "
                             f"write {str(row['device_memory']).strip()[:-1]}iB")
        device_memory = parse_size(row["device_memory"], name="device_memory")
        host_ram = None if row.get("host_ram") is None else parse_size(row["host_ram"], name="host_ram")
        fields: dict = {}
        if measured is not None:
            what = measured.get("what", "")
            if what not in MEASURES and not what.startswith(PHASE_PREFIX):
                raise UsageError(f"measured.what {what!r}: use {', '.join(MEASURES)} or {PHASE_PREFIX}<phase>")
            fields = {"measured_what": what, "measured_bytes": parse_size(measured["value"], name="measured.value")}
            for bound in ("low", "high"):
                if bound in measured:
                    fields[f"measured_{bound}_bytes"] = parse_size(measured[bound], name=f"measured.{bound}")
        else:
            if outcome.get("limit") not in ("device", "host") or outcome.get("result") not in ("oom", "fits"):
                raise UsageError("outcome needs limit (device or host) and result (oom or fits)")
            if outcome["limit"] == "host" and host_ram is None:
                raise UsageError("a host outcome needs host_ram")
            fields = {"outcome_limit": outcome["limit"], "outcome_result": outcome["result"]}
    except UsageError as exc:
        raise _refuse(path, line, str(exc)) from None
    except (KeyError, TypeError, ValueError) as exc:
        raise _refuse(path, line, f"bad field ({exc})") from None
    if nodes < 1 or per_node < 1:
        raise _refuse(path, line, "nodes and devices_per_node must be positive")
    phases = tuple(row.get("phases") or DEFAULT_PHASES)
    if not set(phases) <= {"load", "initialize", "training", "save", "resume"}:
        raise _refuse(path, line, f"phases {list(phases)}: use load, initialize, training, save, resume")
    if not isinstance(row["settings"], dict):
        raise _refuse(path, line, "settings is an object of memdiag plan key=value settings")
    return PublishedCase(
        id=str(row["id"]), category=row["category"], source=str(row["source"]), quote=str(row["quote"]),
        model=str(row["model"]), nodes=nodes, devices_per_node=per_node, device_memory_bytes=device_memory,
        host_ram_bytes=host_ram, settings={str(k): str(v) for k, v in row["settings"].items()},
        ds_config=dict(row.get("ds_config") or {}), ambiguity=str(row["ambiguity"]), profile=row.get("profile"),
        ds_config_file=row.get("ds_config_file"),
        phases=phases, line=line, **fields,
    )


def load_cases(path: Path) -> list[PublishedCase]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror or exc}") from None
    cases = [parse_case(text, path=Path(path), line=n) for n, text in enumerate(lines, 1) if text.strip()]
    seen: dict[str, int] = {}
    for case in cases:
        if case.id in seen:
            raise _refuse(Path(path), case.line, f"id {case.id!r} repeats line {seen[case.id]}")
        seen[case.id] = case.line
    return cases


@dataclass(frozen=True)
class Prediction:
    memdiag_bytes: float
    deepspeed_bytes: float
    memdiag_fits: bool | None = None
    deepspeed_fits: bool | None = None
    detail: dict = field(default_factory=dict)


def generic_gpu(device_memory_bytes: int) -> HardwareProfile:
    """A CUDA device of the case's memory with the same context assumptions as memdiag's
    NVIDIA profiles (1 GiB device context, 3 GiB host mappings a rank)."""
    return HardwareProfile(
        name="cuda", accelerator="cuda", device_memory_bytes=device_memory_bytes,
        device_runtime_context_bytes=2**30, host_runtime_context_bytes=3 * 2**30,
    )


def predict(case: PublishedCase, models_dir: Path, coefficients=None) -> Prediction:
    """memdiag's figure (or verdict) for the case and DeepSpeed's estimator's, on the same counts."""
    from memdiag.config import compose
    from memdiag.plan.inputs import for_run, hf_model, optimizer_path, planner_settings
    from memdiag.plan.search import deepspeed_estimate, evaluate
    from memdiag.plan.terms import DTYPE_BYTES, Coefficients
    from memdiag.settings import PLAN, RunSettings, parse

    from memdiag import dsconfig

    coefficients = coefficients or Coefficients()
    overrides = [f"{k}={v}" for k, v in case.settings.items()]
    if case.model.startswith("case:") and "optimizer" not in case.settings:
        # the published run's script handed its ds_config's AdamW section to DeepSpeed (FusedAdam);
        # torch's AdamW is the case's own training script, memdiag's reproduction
        overrides.append("optimizer=fused")
    # a published ds_config file is read as `memdiag plan --ds-config` reads the user's
    ds_file = (models_dir.parent / case.ds_config_file).resolve() if case.ds_config_file else None
    case_config = None
    if case.model.startswith("case:"):  # planned exactly as `memdiag plan` plans the case
        name = case.model.split(":", 1)[1]
        case_config = compose([f"case={name}", "model.scale=13b", *overrides]
                              + ([f"ds_config={ds_file}"] if ds_file else [])
                              + ([f"hardware={case.profile}"] if case.profile else []), command=PLAN, detect_accelerator=False)
        arch, settings = for_run(case_config)
        if case.ds_config:
            ds = dsconfig.fill_auto({"zero_optimization": settings.ds_buffers | case.ds_config}, micro_batch=settings.micro_batch,
                                    grad_accum=settings.grad_accum, dtype=settings.dtype, hidden_size=arch.hidden_size)
            settings = replace(settings, ds_buffers=ds["zero_optimization"])
    else:
        values = parse(overrides, PLAN)[0]
        ds = {}
        if ds_file is not None:
            ds = dsconfig.read(ds_file)
            for key, value in dsconfig.settings_from(ds, ds_file, set(values)).items():
                values.setdefault(key, value)
        run = RunSettings(**values)
        path = models_dir / f"{case.model}.json"
        if not path.is_file():
            raise UsageError(f"line {case.line}: model {case.model!r}: no {path}")
        arch, attention = hf_model(path, dtype=run.dtype, attention=run.attention)
        # the published zero keys over the file's; "auto" buckets follow the model, as the HF Trainer fills them
        ds["zero_optimization"] = (ds.get("zero_optimization") or {}) | case.ds_config
        dsconfig.fill_auto(ds, micro_batch=run.micro_batch, grad_accum=run.grad_accum, dtype=run.dtype, hidden_size=arch.hidden_size)
        if ds_file is not None:
            dsconfig.check_zero_section(ds, ds_file)
        optimizer = optimizer_path(run, ds, own=None, accelerator="cuda")
        settings = planner_settings(run, ds, attention=attention, optimizer=optimizer)
    hardware = case_config.hardware if case_config is not None else generic_gpu(case.device_memory_bytes)
    host_limit = case.host_ram_bytes or float("inf")
    layout = evaluate(arch, settings, hardware, case.nodes, case.devices_per_node, coefficients,
                      device_capacity_bytes=case.device_memory_bytes, host_limit_bytes=host_limit)
    ds = deepspeed_estimate(arch, case.devices_per_node, case.nodes, zero_init=settings.load != "reference",
                            offload=settings.offload, buffer_factor=1.5)
    if case.measured_what == "device_used_peak" or case.outcome_limit == "device":
        ours, theirs, capacity = layout.device_peak_bytes, ds["device_bytes"], case.device_memory_bytes
    elif case.measured_what and case.measured_what.startswith(PHASE_PREFIX):
        phase = case.measured_what[len(PHASE_PREFIX):]
        peaks = layout.host_phase_peaks
        if phase not in peaks:
            raise UsageError(f"line {case.line}: phase {phase!r}: memdiag models {', '.join(peaks)}")
        ours, theirs, capacity = peaks[phase], ds["host_bytes_per_node"], case.host_ram_bytes
    else:
        peaks = layout.host_phase_peaks
        ours = max(peaks[p] for p in case.phases if p in peaks)
        theirs, capacity = ds["host_bytes_per_node"], case.host_ram_bytes
    known = capacity is not None
    return Prediction(
        memdiag_bytes=ours, deepspeed_bytes=theirs,
        memdiag_fits=ours <= capacity if known else None, deepspeed_fits=theirs <= capacity if known else None,
        detail={"binding_phase": layout.binding_phase, "device_allocated_bytes": layout.device_allocated_peak_bytes,
                "num_parameters": arch.num_parameters,
                "allocator_reserve_bytes": layout.device_terms.get("allocator_reserve", 0.0),
                "gathered_layer_bytes": DTYPE_BYTES[settings.dtype] * arch.largest_layer_params},
    )


@dataclass(frozen=True)
class Scored:
    case: PublishedCase
    prediction: Prediction

    @property
    def error(self) -> float | None:
        """Relative error of a figure; inside a published range it is zero."""
        c, p = self.case, self.prediction
        if c.measured_bytes is None:
            return None
        return _relative(p.memdiag_bytes, c)

    @property
    def deepspeed_error(self) -> float | None:
        if self.case.measured_bytes is None:
            return None
        return _relative(self.prediction.deepspeed_bytes, self.case)

    @property
    def verdict_right(self) -> bool | None:
        if self.case.outcome_result is None:
            return None
        return self.prediction.memdiag_fits == (self.case.outcome_result == "fits")

    @property
    def deepspeed_verdict_right(self) -> bool | None:
        if self.case.outcome_result is None:
            return None
        return self.prediction.deepspeed_fits == (self.case.outcome_result == "fits")


def _relative(predicted: float, case: PublishedCase) -> float:
    low = case.measured_low_bytes or case.measured_bytes
    high = case.measured_high_bytes or case.measured_bytes
    if low <= predicted <= high:
        return 0.0
    reference = low if predicted < low else high
    return (predicted - reference) / reference


CARDS = CATEGORIES + ("zero12",)
"""The accuracy cards: each category, and ZeRO-1/2 runs (any category) on their own."""


def in_card(case: PublishedCase, card: str) -> bool:
    if card == "zero12":
        return str(case.settings.get("zero.stage", "3")) in ("1", "2")
    return case.category == card


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


def summary(scored: list[Scored]) -> dict[str, dict]:
    """Per card: median and 95th-percentile |error| of memdiag and of DeepSpeed's estimator, the
    share of figures under-estimated by more than 10% (the errors that end in an OOM), and
    verdicts right."""
    out = {}
    for card in CARDS:
        rows = [s for s in scored if in_card(s.case, card)]
        figures = [s for s in rows if s.error is not None]
        verdicts = [s for s in rows if s.verdict_right is not None]
        card_out = {"figures": len(figures), "verdicts": len(verdicts),
                    "memdiag_verdicts_right": sum(bool(s.verdict_right) for s in verdicts),
                    "deepspeed_verdicts_right": sum(bool(s.deepspeed_verdict_right) for s in verdicts)}
        for who, error in (("memdiag", lambda s: s.error), ("deepspeed", lambda s: s.deepspeed_error)):
            errors = [error(s) for s in figures]
            card_out[f"{who}_median_abs_error"] = statistics.median(abs(e) for e in errors) if errors else None
            card_out[f"{who}_p95_abs_error"] = _p95([abs(e) for e in errors]) if errors else None
            card_out[f"{who}_under_10pct_share"] = sum(e < -0.10 for e in errors) / len(errors) if errors else None
        out[card] = card_out
    return out


def reserve_layers(case: PublishedCase, prediction: Prediction) -> float | None:
    """The allocator reserve a device figure implies, in gathered layers (None for others)."""
    if case.measured_what != "device_used_peak" or str(case.settings.get("zero.stage", "3")) != "3":
        return None  # the reserve in gathered layers is ZeRO-3's (below it, a fraction of the tensors)
    d = prediction.detail
    without = prediction.memdiag_bytes - d["allocator_reserve_bytes"]
    return (case.measured_bytes - without) / d["gathered_layer_bytes"]


def fit_reserve_layers(scored: list[Scored]) -> float | None:
    """``allocator_reserve_layers`` fitted on the device figures: the median of what each implies."""
    implied = [k for s in scored if (k := reserve_layers(s.case, s.prediction)) is not None]
    return statistics.median(implied) if implied else None


def leave_one_out(scored: list[Scored], models_dir: Path) -> dict[str, float]:
    """Each device figure predicted with the reserve fitted on the other device figures."""
    from memdiag.plan.terms import Coefficients

    errors = {}
    figures = [s for s in scored if s.case.measured_what == "device_used_peak"]
    for s in figures:
        k = fit_reserve_layers([o for o in figures if o is not s])
        if k is None:
            continue
        refit = predict(s.case, models_dir, Coefficients(allocator_reserve_layers=k))
        errors[s.case.id] = _relative(refit.memdiag_bytes, s.case)
    return errors
