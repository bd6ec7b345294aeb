"""What a check returns: one finding, with the evidence from the timeline and the fix."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

SEVERITIES = ("error", "warning", "info")


@dataclass(frozen=True, kw_only=True)
class Finding:
    id: str
    """The check that produced it (``host_limit``, ``scaling_5290`` ...)."""
    severity: str
    """``error`` (the run failed or will fail there), ``warning``, or ``info``."""
    message: str
    evidence: dict = field(default_factory=dict)
    """Figures with units in their names, times (ns since the epoch), ranks."""
    fix: str = ""
    ranks: list[int] = field(default_factory=list)
    moments: list[dict] = field(default_factory=list)
    """``{"t": ns, "label": str}`` points in the run the report marks."""

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity={self.severity!r}: use one of {SEVERITIES}")

    def to_dict(self) -> dict:
        return asdict(self)
