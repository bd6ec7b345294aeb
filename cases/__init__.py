"""Benchmark cases memdiag runs; each registers itself with ``memdiag.registry``."""

from cases import baichuan2_13b  # noqa: F401
