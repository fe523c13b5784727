"""Overlap statistics against scipy or plain loops, including ties, on random maps and on the
real default model's score maps."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from mechicl.analyses.overlap import (
    _rank_rows,
    bootstrap_ci,
    jaccard,
    kendall,
    overlap_matrix,
    permutation_pvalue,
    rank,
    rank_biased_overlap,
    spearman,
    top_k,
    top_k_overlap,
    top_k_pvalue,
)
from mechicl.results import HeadScores


def _maps(seed: int, ties: bool):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(6, 5, generator=g, dtype=torch.float64)
    b = a + torch.randn(6, 5, generator=g, dtype=torch.float64)
    if ties:  # coarse rounding makes many ties in both maps
        a, b = a.round(), (b * 2).round()
    return a, b


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spearman_and_kendall_equal_scipy(seed, ties):
    a, b = _maps(seed, ties)
    x, y = a.flatten().numpy(), b.flatten().numpy()
    assert spearman(a, b) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert kendall(a, b) == pytest.approx(stats.kendalltau(x, y, variant="b").statistic, abs=1e-12)
    assert rank(a).numpy().tolist() == stats.rankdata(x).tolist()


def test_argsort_correlation_is_not_a_rank_correlation():
    """llm-interpret correlates argsort permutations: generally a different number."""
    a, b = _maps(3, False)
    argsorts = stats.spearmanr(torch.argsort(a.flatten()).numpy(),
                               torch.argsort(b.flatten()).numpy()).statistic
    assert abs(argsorts - spearman(a, b)) > 0.05


def test_top_k_overlap_and_errors():
    a = torch.tensor([[5.0, 4.0], [3.0, 2.0]])
    b = torch.tensor([[5.0, 1.0], [3.0, 4.0]])
    assert top_k_overlap(a, b, 1) == 1.0 and top_k_overlap(a, b, 2) == 0.5
    assert top_k_overlap(a, b, 4) == 1.0
    with pytest.raises(ValueError, match="k=5"):
        top_k_overlap(a, b, 5)
    with pytest.raises(ValueError, match="differ in size"):
        spearman(a, torch.ones(3))
    assert torch.isnan(torch.tensor(spearman(a, torch.ones(2, 2))))


# --------------------------------------------------------------------------------------------
# Set overlap, RBO, hypergeometric p-value, permutation null, bootstrap (issue 7)
# --------------------------------------------------------------------------------------------

def _ranking(x):
    """Indices from highest to lowest score, ties by position (plain Python)."""
    flat = x.flatten().tolist()
    return sorted(range(len(flat)), key=lambda i: (-flat[i], i))


def rbo_reference(a, b, p):
    """Webber et al. 2010 eq. 32, literally, with Python sets."""
    ra, rb = _ranking(a), _ranking(b)
    n = len(ra)
    total = 0.0
    for d in range(1, n + 1):
        x_d = len(set(ra[:d]) & set(rb[:d]))
        total += x_d / d * p**d
    x_n = len(set(ra) & set(rb))
    return x_n / n * p**n + (1 - p) / p * total


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_jaccard_rbo_and_hypergeometric(seed, ties):
    a, b = _maps(seed, ties)
    for k in (1, 5, 12):
        sa, sb = set(_ranking(a)[:k]), set(_ranking(b)[:k])
        assert jaccard(a, b, k) == pytest.approx(len(sa & sb) / len(sa | sb))
        assert top_k_overlap(a, b, k) == pytest.approx(len(sa & sb) / k)
        n = a.numel()
        want = stats.hypergeom(n, k, k).sf(len(sa & sb) - 1)
        assert top_k_pvalue(a, b, k) == pytest.approx(want, rel=1e-9)
    for p in (0.5, 0.9, 0.98):
        assert rank_biased_overlap(a, b, p) == pytest.approx(rbo_reference(a, b, p), abs=1e-12)
    assert rank_biased_overlap(a, a, 0.9) == pytest.approx(1.0)
    assert rank_biased_overlap(a, -a, 0.9) < 0.5


def test_top_k_from_percentile_and_errors():
    assert top_k(270, percentile=10) == 27 and top_k(270, k=5) == 5 and top_k(3, percentile=1) == 1
    for kwargs in ({}, {"k": 1, "percentile": 5}, {"k": 0}, {"percentile": 0}, {"k": 271}):
        with pytest.raises(ValueError):
            top_k(270, **kwargs)
    a, b = _maps(0, False)
    with pytest.raises(ValueError, match="p=1"):
        rank_biased_overlap(a, b, 1.0)


def test_rank_rows_equals_scipy_per_row():
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 4, (7, 11), generator=g).double()  # many ties
    want = np.stack([stats.rankdata(row) for row in x.numpy()])
    assert np.array_equal(_rank_rows(x).numpy(), want)


def permutation_reference(a, b, statistic, k, n_permutations, seed):
    """One permutation at a time, same permutations as the library (same generator draws)."""
    x, y = a.flatten().double(), b.flatten().double()
    gen = torch.Generator().manual_seed(seed)
    perms = torch.argsort(torch.rand(n_permutations, x.numel(), generator=gen), dim=-1)
    fn = (lambda u, v: stats.spearmanr(u.numpy(), v.numpy()).statistic) if statistic == "spearman" \
        else (lambda u, v: len(set(_ranking(u)[:k]) & set(_ranking(v)[:k])) / k)
    observed = fn(x, y)
    null = [fn(x, y[perm]) for perm in perms]
    return (1 + sum(v >= observed - 1e-12 for v in null)) / (1 + n_permutations)


@pytest.mark.parametrize("statistic", ["spearman", "top_k"])
def test_permutation_pvalue_equals_plain_loop(statistic):
    a, b = _maps(4, True)
    got = permutation_pvalue(a, b, statistic=statistic, k=5, n_permutations=200, seed=3)
    assert got == pytest.approx(permutation_reference(a, b, statistic, 5, 200, 3))
    # strongly related maps: small p; unrelated: not small
    assert permutation_pvalue(a, a + 0.01 * b, n_permutations=200) < 0.01
    g = torch.Generator().manual_seed(9)
    noise = torch.randn(6, 5, generator=g, dtype=torch.float64)
    assert permutation_pvalue(a, noise, n_permutations=200) > 0.01


def _scores(per_seed, name):
    return HeadScores.from_per_seed(name, per_seed)


def bootstrap_reference(pa, pb, statistic, k, n_resamples, seed, paired, confidence):
    gen = torch.Generator().manual_seed(seed)
    idx_a = torch.randint(pa.shape[0], (n_resamples, pa.shape[0]), generator=gen)
    idx_b = idx_a if paired else torch.randint(pb.shape[0], (n_resamples, pb.shape[0]),
                                               generator=gen)
    values = []
    for r in range(n_resamples):
        ma, mb = pa[idx_a[r]].mean(0).flatten(), pb[idx_b[r]].mean(0).flatten()
        if statistic == "spearman":
            values.append(stats.spearmanr(ma.numpy(), mb.numpy()).statistic)
        else:
            values.append(len(set(_ranking(ma)[:k]) & set(_ranking(mb)[:k])) / k)
    alpha = (1 - confidence) / 2
    return np.quantile(np.array(values), [alpha, 1 - alpha])


@pytest.mark.parametrize("statistic", ["spearman", "top_k"])
@pytest.mark.parametrize("paired", [False, True])
def test_bootstrap_ci_equals_plain_loop(statistic, paired):
    g = torch.Generator().manual_seed(11)
    base = torch.randn(4, 5, generator=g, dtype=torch.float64)
    pa = base + 0.8 * torch.randn(8, 4, 5, generator=g, dtype=torch.float64)
    pb = base + 0.8 * torch.randn(8, 4, 5, generator=g, dtype=torch.float64)
    a, b = _scores(pa, "a"), _scores(pb, "b")
    est, low, high = bootstrap_ci(a, b, statistic=statistic, k=4, n_resamples=300, seed=2,
                                  paired=paired)
    want_low, want_high = bootstrap_reference(pa, pb, statistic, 4, 300, 2, paired, 0.95)
    assert (low, high) == pytest.approx((want_low, want_high), abs=1e-9)
    full = spearman(pa.mean(0), pb.mean(0)) if statistic == "spearman" else \
        top_k_overlap(pa.mean(0), pb.mean(0), 4)
    assert est == pytest.approx(full) and low <= high
    with pytest.raises(ValueError, match="paired=True"):
        bootstrap_ci(a, _scores(pb[:3], "c"), paired=True)


def test_overlap_matrix():
    a, b = _maps(0, False)
    c = -a
    m = overlap_matrix({"a": a, "b": b, "c": c}, statistic="spearman")
    assert list(m.index) == list(m.columns) == ["a", "b", "c"]
    assert m.loc["a", "a"] == pytest.approx(1.0) and m.loc["a", "c"] == pytest.approx(-1.0)
    assert m.loc["a", "b"] == pytest.approx(spearman(a, b)) == pytest.approx(m.loc["b", "a"])
    for stat in ("kendall", "top_k", "jaccard", "rbo", "top_k_pvalue"):
        assert overlap_matrix({"a": a, "b": b}, statistic=stat, k=5).shape == (2, 2)
    assert overlap_matrix({"a": a, "b": b}, statistic="top_k_pvalue", k=5).loc["a", "a"] == \
        pytest.approx(1 / math.comb(30, 5))
    with pytest.raises(ValueError, match="statistic='nope'"):
        overlap_matrix({"a": a}, statistic="nope")


@pytest.mark.slow
def test_every_statistic_on_the_default_models_maps(smollm2):
    """Prefix matching, OV copying and task importance of SmolLM2 (270 heads): each statistic
    equals its scipy / plain-loop reference on real maps, not only on random ones."""
    import mechicl

    scan = mechicl.induction_scan(smollm2, scores=("prefix_matching", "ov_eigen"), n_seeds=6,
                                  progress=False)
    prefix, ov = scan.scores["prefix_matching"], scan.scores["ov_eigen"]
    imp = mechicl.head_importance(smollm2, "antonyms", shots=1, n=8)
    assert prefix.mean.shape == imp.mean.shape == (30, 9)
    k = top_k(270, percentile=10)
    for a, b in ((prefix, imp), (ov, imp), (prefix, ov)):
        x, y = a.mean.flatten().numpy(), b.mean.flatten().numpy()
        assert spearman(a, b) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
        assert kendall(a, b) == pytest.approx(stats.kendalltau(x, y, variant="b").statistic,
                                              abs=1e-12)
        sa, sb = set(_ranking(a.mean)[:k]), set(_ranking(b.mean)[:k])
        assert top_k_overlap(a, b, k) == pytest.approx(len(sa & sb) / k)
        assert jaccard(a, b, k) == pytest.approx(len(sa & sb) / len(sa | sb))
        assert top_k_pvalue(a, b, k) == pytest.approx(
            stats.hypergeom(270, k, k).sf(len(sa & sb) - 1), rel=1e-9)
        assert rank_biased_overlap(a, b, 0.9) == pytest.approx(
            rbo_reference(a.mean, b.mean, 0.9), abs=1e-12)
        assert permutation_pvalue(a, b, n_permutations=100, seed=1) == pytest.approx(
            permutation_reference(a.mean, b.mean, "spearman", k, 100, 1))
    _, low, high = bootstrap_ci(prefix, imp, n_resamples=100, seed=4)
    want = bootstrap_reference(prefix.per_seed, imp.per_seed, "spearman", k, 100, 4, False,
                               0.95)
    assert (low, high) == pytest.approx(tuple(want), abs=1e-9)
