"""The torch, DeepSpeed and transformers versions memdiag supports, checked where a run
starts, so an unsupported one is named with the range instead of failing later inside a hook.
The ranges are setup.py's, read from memdiag's installed metadata."""

from __future__ import annotations

import importlib.metadata

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from memdiag.errors import UsageError

CHECKED = ("torch", "deepspeed", "transformers")


def _ranges() -> dict[str, SpecifierSet]:
    """Name -> the range setup.py asks for, for each of ``CHECKED``."""
    try:
        requires = importlib.metadata.requires("memdiag") or []
    except importlib.metadata.PackageNotFoundError:
        # run from a checkout that was never installed: there is no range to read, and
        # refusing would stop runs that may well work; an unsupported version then fails later
        return {}
    ranges = {}
    for line in requires:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if name in CHECKED and requirement.marker is None:  # a marker: an extra's requirement
            ranges[name] = requirement.specifier
    return ranges


def _spelled(name: str, spec: SpecifierSet) -> str:
    return f"{name} " + ", ".join(f"{s.operator} {s.version}" for s in sorted(spec, key=str))


def check_supported() -> None:
    for name, spec in _ranges().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise UsageError(f"{name} is not installed; memdiag needs {_spelled(name, spec)}") from None
        try:
            version = Version(installed)
        except InvalidVersion:
            continue  # a build that names itself outside PEP 440 cannot be placed: let it run
        # a pre-release, nightly or vendor build of a release counts as that release
        # (2.2.0rc1, 2.6.0a0+ecf3bae); the local label (+cpu) is no part of the version
        release = Version(version.base_version)
        if release not in spec:
            older = any(s.operator in (">", ">=") and release not in s for s in spec)
            raise UsageError(
                f"{name} {installed} is {'older than' if older else 'not a version'} memdiag supports "
                f"({_spelled(name, spec)}); upgrade it, or use the versions in constraints.txt"
            )


PIN_MEMORY_DEFAULT_FROM = Version("0.19.5")
"""``offload_optimizer``/``offload_param`` ``pin_memory`` defaults to true from DeepSpeed 0.19.5
(``runtime/zero/offload_config.py``; false in 0.19.4 and every release before)."""


def deepspeed_pin_memory_default() -> bool:
    """What DeepSpeed pins when an offload section leaves ``pin_memory`` unset: the installed
    version's default, and the newest's where none is installed (a plan for another machine)."""
    try:
        return Version(importlib.metadata.version("deepspeed")) >= PIN_MEMORY_DEFAULT_FROM
    except (importlib.metadata.PackageNotFoundError, InvalidVersion):
        return True
