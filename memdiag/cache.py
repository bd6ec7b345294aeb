"""memdiag's on-disk cache (``MEMDIAG_CACHE``, else ``$XDG_CACHE_HOME/memdiag``): answers that
cost an import or a model build and depend only on their key (the planner's model facts, the
installed DeepSpeed's verdict on a ds_config's zero section). Losing it costs time, never a result."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    base = os.environ.get("MEMDIAG_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "memdiag")
    return Path(base)
