"""mechicl.stats against slow, obviously-correct references: literal loops over the same
bootstrap resamples, scipy's bootstrap and binomial test."""

import math

import numpy as np
import pytest
import scipy.stats

from mechicl.stats import (
    bootstrap_weights,
    mcnemar_exact,
    paired_bootstrap,
    removable_fraction,
    wilson_interval,
)


def resample_indices(n: int, n_resamples: int, seed: int) -> list[np.ndarray]:
    """The resamples of :func:`bootstrap_weights` as explicit index lists."""
    w = bootstrap_weights(n, n_resamples, seed)
    return [np.repeat(np.arange(n), row.astype(int)) for row in w]


def test_bootstrap_weights_are_multinomial_resamples():
    w = bootstrap_weights(30, 4000, seed=3)
    assert w.shape == (4000, 30) and (w.sum(1) == 30).all() and (w >= 0).all()
    assert (w == w.astype(int)).all()
    # each example drawn Binomial(30, 1/30) times: mean 1, variance 29/30
    assert w.mean() == pytest.approx(1.0, abs=0.02)
    assert w.var() == pytest.approx(29 / 30, abs=0.05)
    assert (bootstrap_weights(30, 5, seed=3) == w[:5]).all()  # seeded, prefix-stable
    assert not (bootstrap_weights(30, 5, seed=4) == w[:5]).all()
    with pytest.raises(ValueError, match="n=0"):
        bootstrap_weights(0, 5)


def test_paired_bootstrap_against_a_literal_loop():
    rng = np.random.default_rng(0)
    a = (rng.random((3, 40)) < [[0.8], [0.5], [0.3]]).astype(float)
    b = (rng.random(40) < 0.6).astype(float)
    r = paired_bootstrap(a, b, n_resamples=300, seed=7, level=0.9, threshold=0.1)
    idx = resample_indices(40, 300, seed=7)
    for c in range(3):
        means = np.array([np.mean([a[c, i] - b[i] for i in rows]) for rows in idx])
        assert r.estimate[c] == pytest.approx(np.mean(a[c] - b))
        assert r.draws[c] == pytest.approx(means)
        assert r.low[c] == pytest.approx(np.quantile(means, 0.05))
        assert r.high[c] == pytest.approx(np.quantile(means, 0.95))
        assert r.p_greater[c] == pytest.approx((1 + np.sum(means <= 0.1 + 1e-12)) / 301)
        assert r.p_less[c] == pytest.approx((1 + np.sum(means >= 0.1 - 1e-12)) / 301)


def test_paired_bootstrap_agrees_with_scipy():
    rng = np.random.default_rng(1)
    a = (rng.random(150) < 0.7).astype(float)
    b = np.where(rng.random(150) < 0.8, a, 1 - a)  # correlated with a: pairing matters
    r = paired_bootstrap(a, b, n_resamples=20000, seed=0)
    ref = scipy.stats.bootstrap((a, b), lambda x, y: np.mean(x - y), paired=True,
                                vectorized=False, n_resamples=20000, method="percentile",
                                random_state=0).confidence_interval
    assert r.low[0] == pytest.approx(ref.low, abs=0.01)
    assert r.high[0] == pytest.approx(ref.high, abs=0.01)
    # the unpaired interval is wider: a paired bootstrap that forgot the pairing would fail here
    unpaired = math.sqrt(a.var() / 150 + b.var() / 150) * 1.96 * 2
    assert r.high[0] - r.low[0] < 0.8 * unpaired


def test_paired_bootstrap_errors():
    with pytest.raises(ValueError, match="level=1.5"):
        paired_bootstrap(np.ones(3), level=1.5)
    with pytest.raises(ValueError, match="NaN"):
        paired_bootstrap(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="at least one example"):
        paired_bootstrap(np.ones((2, 0)))


def test_mcnemar_against_scipy_binomtest():
    rng = np.random.default_rng(2)
    for _ in range(20):
        a = (rng.random(60) < rng.random()).astype(int)
        b = (rng.random(60) < rng.random()).astype(int)
        b10, b01 = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
        expected = scipy.stats.binomtest(b10, b10 + b01, 0.5).pvalue if b10 + b01 else 1.0
        assert mcnemar_exact(a, b) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="0/1"):
        mcnemar_exact(np.array([0, 2]), np.array([0, 1]))
    with pytest.raises(ValueError, match="one length"):
        mcnemar_exact(np.array([0, 1]), np.array([0, 1, 1]))


def test_wilson_against_scipy():
    for k, n in [(0, 20), (20, 20), (8, 10), (37, 50)]:
        ref = scipy.stats.binomtest(k, n).proportion_ci(method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ref.low, ref.high), abs=1e-3)


def literal_removable(shares, correct, unpruned, tolerance, alpha, level, n_resamples, seed):
    """The removable-share rule written out with loops over shares and resamples."""
    idx = resample_indices(len(unpruned), n_resamples, seed)
    drops = [[np.mean([unpruned[i] - correct[s][i] for i in rows]) for rows in idx]
             for s in range(len(shares))]

    def largest(ok):
        best = 0.0
        for share, good in zip(shares, ok, strict=True):
            if not good:
                break
            best = share
        return best

    observed = [np.mean(unpruned - correct[s]) for s in range(len(shares))]
    p_less = [(1 + sum(d >= tolerance - 1e-12 for d in drops[s])) / (1 + n_resamples)
              for s in range(len(shares))]
    per_resample = [largest([drops[s][r] < tolerance for s in range(len(shares))])
                    for r in range(n_resamples)]
    return (largest([p < alpha for p in p_less]), largest([o < tolerance for o in observed]),
            np.quantile(per_resample, (1 - level) / 2), np.quantile(per_resample, (1 + level) / 2))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_removable_fraction_against_a_literal_loop(seed):
    rng = np.random.default_rng(seed)
    n = 60
    unpruned = (rng.random(n) < 0.8).astype(float)
    shares = np.array([5.0, 10.0, 20.0, 30.0])
    flips = [0.0, 0.03, 0.1, 0.4]  # growing damage
    correct = np.stack([np.where(rng.random(n) < f, 0.0, unpruned) for f in flips])
    r = removable_fraction(shares, correct, unpruned, tolerance=0.05, alpha=0.05, level=0.9,
                           n_resamples=200, seed=seed)
    assert (r.removable, r.estimate, r.low, r.high) == pytest.approx(
        literal_removable(shares, correct, unpruned, 0.05, 0.05, 0.9, 200, seed))


def test_removable_fraction_cases():
    unpruned = np.r_[np.ones(160), np.zeros(40)]  # 0.80 on 200 prompts
    same = unpruned.copy()
    lose40 = unpruned.copy()
    lose40[:40] = 0  # 0.60
    shares = np.array([10.0, 20.0, 30.0])
    r = removable_fraction(shares, np.stack([same, lose40, same]), unpruned)
    assert (r.removable, r.estimate) == (10.0, 10.0)  # 30% is fine again, but 20% is not
    small = np.r_[np.ones(32), np.zeros(8)]  # 0.80 on 40 prompts
    lose1 = small.copy()
    lose1[0] = 0  # a 2.5-point drop: the estimate passes, 40 prompts cannot exclude 5 points
    r = removable_fraction(np.array([10.0]), lose1[None], small)
    assert r.estimate == 10.0 and r.removable == 0.0 and r.low == 0.0 and r.high == 10.0
    r = removable_fraction(np.array([10.0]), lose1[None], small, tolerance=0.2)
    assert r.removable == 10.0  # a 20-point tolerance is excluded
    with pytest.raises(ValueError, match="ascending"):
        removable_fraction(np.array([20.0, 10.0]), np.stack([same, same]), unpruned)
    with pytest.raises(ValueError, match="ascending"):
        removable_fraction(np.array([0.0, 10.0]), np.stack([same, same]), unpruned)
