"""The torch and DeepSpeed versions memdiag supports, checked where a run starts, so an
unsupported one is named with the range instead of failing later inside a hook."""

from __future__ import annotations

import importlib.metadata
import re

from memdiag.errors import UsageError

SUPPORTED = {"torch": (2, 2), "deepspeed": (0, 14), "transformers": (4, 57)}
"""The oldest release of each that memdiag supports (setup.py says the same)."""


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def check_supported() -> None:
    for name, oldest in SUPPORTED.items():
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise UsageError(f"{name} is not installed; memdiag needs {name} >= {'.'.join(map(str, oldest))}") from None
        if _release(version)[: len(oldest)] < oldest:
            raise UsageError(
                f"{name} {version} is older than memdiag supports ({name} >= {'.'.join(map(str, oldest))}); "
                f"upgrade it, or use the versions in constraints.txt"
            )
