"""The HTML memory timeline: pure figure building, then a self-contained page."""

from memdiag.report.figures import build_figures
from memdiag.report.html import write_report

__all__ = ["build_figures", "write_report"]
