"""Cases register themselves here (as torchtitan's train specs do); memdiag asks by name.

A case is a folder ``cases/<name>/`` with Hydra config groups under ``conf/`` and a package
whose ``__init__`` calls ``register_case(CaseSpec(...))``. ``cases/__init__.py`` imports every
case package, so ``get_case`` needs no f-string imports.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from memdiag.errors import UsageError


@dataclass(frozen=True, kw_only=True)
class CaseSpec:
    name: str
    conf_dir: Path
    """Hydra config groups (``config.yaml``, ``model/``, ``hardware/``, ``data/``)."""
    entry_module: str
    """What torchrun starts on every rank: ``python -m ENTRY RUN_DIR``."""
    model_class: str
    """``module:Class`` the planner builds on the meta device to count the model."""
    num_parameters: Callable[[dict], int]
    """Exact parameters of a ``model`` config group."""
    model_config: Callable[[dict], dict]
    """The ``model`` config group as the HF config the model class takes."""
    model_types: tuple[str, ...] = ()
    """HF ``model_type`` values the case's model class implements: a bare ``config.json`` of one
    (no modeling files beside it) is planned with the case's class."""
    model_attention: str = "plain"
    """The attention path the planner's activation count is taken on (it scales the s^2 terms)."""
    benchmark_attention: str | None = None
    """What ``attention=auto`` means for this case: the path the benchmark's model code took."""
    optimizer: str | None = None
    """The optimizer the case's training script builds itself, whatever the ds_config's
    ``optimizer`` section says (``optimizer=auto``); None: DeepSpeed builds the section's."""
    runnable: dict[str, tuple] = field(default_factory=dict)
    """Setting values the case's own training can run (the planner models more)."""
    seed_measurement: dict | None = None
    """A published measurement of this case, printed beside the plan."""


_CASES: dict[str, CaseSpec] = {}


def register_case(spec: CaseSpec) -> CaseSpec:
    _CASES[spec.name] = spec
    return spec


def available_cases() -> list[str]:
    importlib.import_module("cases")
    return sorted(_CASES)


def get_case(name: str) -> CaseSpec:
    cases = available_cases()
    if name not in _CASES:
        hint = difflib.get_close_matches(name, cases, n=1)
        near = f" (did you mean {hint[0]}?)" if hint else ""
        raise UsageError(f"unknown case {name!r}{near}; available: {', '.join(cases)}")
    return _CASES[name]


def case_for_model_type(model_type: str | None) -> CaseSpec | None:
    """The registered case whose model class implements ``model_type``, if any."""
    if not model_type:
        return None
    available_cases()
    return next((spec for spec in _CASES.values() if model_type in spec.model_types), None)
