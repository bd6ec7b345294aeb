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


# RSS (MiB) at steps 20-39 of a healthy 40-step CPU run that an earlier threshold (1% of the
# window's mean) called a leak: flat for ten steps, then allocator jumps (one CI run)
HEALTHY_STAIRCASE = [761.4] * 10 + [783.5, 783.5, 783.5, 849.5, 893.5, 915.6, 915.6, 915.6, 871.5, 893.6]


def test_a_healthy_staircase_is_not_a_leak_and_a_leak_is():
    from memdiag.checks.leak import HOST_THRESHOLD_BYTES_PER_STEP, steady_growth

    steps = np.arange(20, 40, dtype=float)
    mib = 2**20
    healthy = steady_growth(steps, np.array(HEALTHY_STAIRCASE) * mib, HOST_THRESHOLD_BYTES_PER_STEP)
    assert healthy.rho >= MIN_RANK_CORRELATION  # it does rise, in rank order
    assert not healthy.leaks  # but by ~1% a step, below the 2% that counts
    leaking = steady_growth(steps, (np.array(HEALTHY_STAIRCASE) + 64 * (steps - 20)) * mib, HOST_THRESHOLD_BYTES_PER_STEP)
    assert leaking.leaks and 55 * mib < leaking.slope < 75 * mib


def test_a_slow_leak_over_a_long_run_is_judged_against_the_runs_noise():
    """9 MiB a step in a 1.8 GiB rank (0.5%: under the short-window 2%) over 100 steady steps,
    in +-40 MiB of step-to-step noise, is a leak; the same noise without the slope is not, and
    neither is a staircase that levels off early in the window."""
    from memdiag.checks.leak import HOST_THRESHOLD_BYTES_PER_STEP, steady_growth

    rng = np.random.default_rng(1)
    mib = 2**20
    steps = np.arange(100, 200, dtype=float)
    noise = rng.normal(0, 40, len(steps))
    leaking = steady_growth(steps, (1800 + 9 * (steps - 100) + noise) * mib, HOST_THRESHOLD_BYTES_PER_STEP)
    assert leaking.leaks and 7 * mib < leaking.slope < 11 * mib
    assert leaking.slope > 3 * leaking.standard_error
    flat = steady_growth(steps, (1800 + noise) * mib, HOST_THRESHOLD_BYTES_PER_STEP)
    assert not flat.leaks
    staircase = np.where(steps < 115, 1800 + 10 * (steps - 100), 1950) + noise
    assert not steady_growth(steps, staircase * mib, HOST_THRESHOLD_BYTES_PER_STEP).leaks
