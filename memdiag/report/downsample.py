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
    clean = np.where(np.isnan(values), -np.inf, values)
    edges = np.linspace(0, n, buckets + 1).astype(np.int64)
    size = int(edges[1] - edges[0])
    if np.all(np.diff(edges) == size):  # equal buckets: vectorised
        shaped = clean[: size * buckets].reshape(buckets, size)
        lows = np.where(np.isnan(values[: size * buckets]), np.inf, values[: size * buckets]).reshape(buckets, size)
        hi = shaped.argmax(axis=1) + edges[:-1]
        lo = lows.argmin(axis=1) + edges[:-1]
        keep = np.concatenate([lo, hi, [n - 1]])
    else:
        keep = [n - 1]
        for start, end in zip(edges[:-1], edges[1:]):
            if end > start:
                keep += [start + int(np.argmin(np.where(np.isnan(values[start:end]), np.inf, values[start:end]))),
                         start + int(np.argmax(clean[start:end]))]
        keep = np.array(keep)
    return np.unique(keep)


def describe(original: int, kept: int) -> str:
    if kept >= original:
        return f"all {original:,} samples drawn"
    return f"{original:,} samples drawn as {kept:,} (min/max per time bucket: every peak kept)"
