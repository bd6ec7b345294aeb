"""The leak check's statistics on literal series: healthy allocator noise against a real leak."""

import numpy as np

from memdiag.checks.leak import MIN_RANK_CORRELATION, spearman, theil_sen

# RSS (MiB) at the start of steps 4-15 of two healthy CPU runs: allocator jumps and noise
HEALTHY = [
    [710, 799, 797, 842, 864, 816, 837, 859, 837, 838, 861, 818],
    [801, 802, 791, 738, 760, 780, 817, 863, 861, 884, 862, 880],
]


def test_healthy_series_are_not_consistent_growth():
    for values in HEALTHY:
        steps = np.arange(len(values), dtype=float)
        assert spearman(steps, np.array(values, dtype=float)) < MIN_RANK_CORRELATION


def test_a_32_mb_per_step_leak_in_noise_is():
    rng = np.random.default_rng(0)
    steps = np.arange(12, dtype=float)
    values = 800 + 32 * steps + rng.normal(0, 30, 12)
    assert spearman(steps, values) >= MIN_RANK_CORRELATION
    assert 25 < theil_sen(steps, values) < 40


def test_theil_sen_ignores_one_outlier():
    steps = np.arange(10, dtype=float)
    values = 2.0 * steps
    values[5] += 1000  # a checkpoint save, say
    assert theil_sen(steps, values) == 2.0
