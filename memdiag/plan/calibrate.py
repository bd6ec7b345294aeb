"""Calibration: compare each term with what recorded runs measured and fit the empirical ones."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from memdiag.errors import UsageError
from memdiag.plan.terms import Coefficients


def load_coefficients(path: Path) -> Coefficients:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"--coefficients {path}: {exc}") from None
    known = Coefficients().to_dict()
    unknown = set(data) - set(known)
    if unknown:
        raise UsageError(f"--coefficients {path}: unknown fields {sorted(unknown)}")
    return replace(Coefficients(), **data)


def calibrate_main(run_dirs: list[Path], coefficients: Coefficients) -> int:
    raise UsageError("--calibrate is not available yet")
