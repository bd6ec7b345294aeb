"""Downsampling that never loses a peak: a min/max envelope per time bucket.

Each bucket of consecutive samples keeps its minimum and its maximum, in time order, so the
drawn line still touches every extreme; the global maximum is always kept. LTTB would choose
visually salient points but can drop a one-sample spike; memory plots are read for spikes.
"""

from __future__ import annotations

import numpy as np

DEFAULT_BUCKETS = 1500


def minmax_indices(values: np.ndarray, buckets: int = DEFAULT_BUCKETS) -> np.ndarray:
    """Indices to keep: all when few, else per bucket the argmin and argmax in order."""
    n = len(values)
    if n <= 2 * buckets:
        return np.arange(n)
    edges = np.linspace(0, n, buckets + 1).astype(np.int64)
    highs = np.where(np.isnan(values), -np.inf, values)
    lows = np.where(np.isnan(values), np.inf, values)
    size = int(edges[1] - edges[0])
    if np.all(np.diff(edges) == size):  # equal buckets: one argmax and argmin per row
        starts = edges[:-1]
        hi = highs[: size * buckets].reshape(buckets, size).argmax(axis=1) + starts
        lo = lows[: size * buckets].reshape(buckets, size).argmin(axis=1) + starts
        return np.unique(np.concatenate([lo, hi, [n - 1]]))
    bucket = np.searchsorted(edges, np.arange(n), side="right") - 1
    # per bucket the first occurrence of its highest and of its lowest value (np.argmax's and
    # np.argmin's choice), over every bucket at once: lexsort is stable
    firsts = lambda order: order[np.append(True, bucket[order][1:] != bucket[order][:-1])]  # noqa: E731
    keep = np.concatenate([firsts(np.lexsort((-highs, bucket))), firsts(np.lexsort((lows, bucket))), [n - 1]])
    return np.unique(keep)


def describe(original: int, kept: int) -> str:
    if kept >= original:
        return f"all {original:,} samples drawn"
    return f"{original:,} samples drawn as {kept:,} (min/max per time bucket: every peak kept)"
