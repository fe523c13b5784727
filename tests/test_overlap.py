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
    layer_permutations,
    overlap_matrix,
    overlap_table,
    permutation_null,
    permutation_pvalue,
    rank,
    rank_biased_overlap,
    spearman,
    top_k,
    top_k_overlap,
    top_k_pvalue,
    within_layer_spearman,
)
from mechicl.results import HeadScores, LayerScores


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


# --------------------------------------------------------------------------------------------
# Controls for layer structure: within-layer Spearman, layer-preserving null (issue 21)
# --------------------------------------------------------------------------------------------

def within_layer_reference(a, b):
    """Per layer: scipy ranks minus their mean; then numpy's Pearson over all heads."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ra = np.concatenate([stats.rankdata(row) - stats.rankdata(row).mean() for row in a])
    rb = np.concatenate([stats.rankdata(row) - stats.rankdata(row).mean() for row in b])
    return np.corrcoef(ra, rb)[0, 1]


def _layered_maps(seed, n_layers=12, n_heads=10, shared_heads=0.0, layer_sd=3.0):
    """Two maps sharing their layer means (and ``shared_heads`` of a within-layer pattern), with
    independent noise."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    means, pattern = layer_sd * randn(n_layers, 1), randn(n_layers, n_heads)
    a = means + shared_heads * pattern + randn(n_layers, n_heads)
    b = means + shared_heads * pattern + randn(n_layers, n_heads)
    return a, b


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_within_layer_spearman_equals_plain_loop(seed, ties):
    a, b = _maps(seed, ties)  # [6, 5]; with ties, some layers are constant in one map
    want = within_layer_reference(a.numpy(), b.numpy())
    assert np.isfinite(want)
    assert within_layer_spearman(a, b) == pytest.approx(want, abs=1e-12)
    assert within_layer_spearman(b, a) == pytest.approx(want, abs=1e-12)
    assert within_layer_spearman(a, a) == pytest.approx(1.0)
    heads = _scores(torch.stack([a, a + 1]), "a")  # HeadScores: its mean map
    assert within_layer_spearman(heads, b) == pytest.approx(within_layer_reference(a + 0.5, b))


def test_within_layer_spearman_with_constant_layers():
    a = torch.tensor([[1.0, 1.0, 1.0], [1.0, 3.0, 2.0], [5.0, 6.0, 4.0]])  # layer 0 constant
    b = torch.tensor([[3.0, 1.0, 2.0], [1.0, 2.0, 3.0], [4.0, 6.0, 5.0]])
    want = within_layer_reference(a, b)
    assert within_layer_spearman(a, b) == pytest.approx(want, abs=1e-12)
    # the constant layer adds b's variation to the denominator only: not the 0.5 of layers 1-2
    assert within_layer_spearman(a, b) < within_layer_reference(a[1:], b[1:]) == pytest.approx(0.5)
    ones = torch.ones(3, 3)
    with pytest.raises(ValueError, match="every layer"):
        within_layer_spearman(ones * torch.arange(3.0)[:, None], b)  # per-layer means only
    with pytest.raises(ValueError, match="every layer"):
        within_layer_spearman(torch.randn(5, 1), torch.randn(5, 1))  # one head per layer


def test_within_layer_spearman_ignores_shared_layer_structure():
    a, b = _layered_maps(4)
    assert spearman(a, b) > 0.8  # the shared layer means alone
    assert abs(within_layer_spearman(a, b)) < 0.25
    assert within_layer_spearman(a, b) == pytest.approx(within_layer_reference(a, b), abs=1e-12)
    a, b = _layered_maps(4, shared_heads=2.0)
    assert within_layer_spearman(a, b) > 0.6


def test_within_layer_errors_name_the_shape():
    with pytest.raises(ValueError, match=r"shape \(30,\).*per-layer"):
        within_layer_spearman(torch.randn(30), torch.randn(30))
    per_layer = LayerScores(name="ffn", mean=torch.randn(4), var=torch.zeros(4),
                            per_seed=torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"\(4,\)"):
        within_layer_spearman(per_layer, per_layer)
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        within_layer_spearman(torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"\(3, 4\) vs \(4, 3\)"):
        within_layer_spearman(torch.randn(3, 4), torch.randn(4, 3))
    with pytest.raises(ValueError, match="NaN"):
        within_layer_spearman(torch.full((3, 4), float("nan")), torch.randn(3, 4))
    for statistic in ("spearman", "top_k"):
        with pytest.raises(ValueError, match=r"shape \(30,\)"):
            permutation_pvalue(torch.randn(30), torch.randn(30), statistic=statistic,
                               within_layers=True)
    with pytest.raises(ValueError, match=r"per-layer"):
        permutation_pvalue(per_layer, per_layer, within_layers=True)
    with pytest.raises(ValueError, match=r"2 heads per layer.*\(5, 1\)"):
        permutation_pvalue(torch.randn(5, 1), torch.randn(5, 1), within_layers=True)
    with pytest.raises(ValueError, match="statistic='kendall'.*within_layer_spearman"):
        permutation_pvalue(torch.randn(3, 4), torch.randn(3, 4), statistic="kendall")
    with pytest.raises(ValueError, match="n_permutations=0"):
        layer_permutations(3, 4, 0)


def test_layer_permutations_keep_every_head_in_its_layer():
    n_layers, n_heads, n = 5, 3, 6000
    perms = layer_permutations(n_layers, n_heads, n, seed=2)
    assert perms.shape == (n, n_layers, n_heads) and perms.dtype == torch.long
    layer_of = torch.div(perms, n_heads, rounding_mode="floor")
    assert torch.equal(layer_of, torch.arange(n_layers)[None, :, None].expand_as(perms))
    within = perms - torch.arange(n_layers)[:, None] * n_heads
    assert torch.equal(within.sort(-1).values, torch.arange(n_heads).expand_as(within))
    # every layer gets its own permutation, and each of the 3! orders is about equally frequent
    assert (within[:, 0] != within[:, 1]).any(-1).float().mean() > 0.7
    codes = (within * torch.tensor([9, 3, 1])).sum(-1)  # [draw, layer]: one code per order
    counts = torch.stack([torch.bincount(c, minlength=27) for c in codes.T])
    freq = counts[:, counts.sum(0) > 0] / n
    assert freq.shape == (n_layers, 6) and ((freq - 1 / 6).abs() < 0.03).all()
    assert torch.equal(layer_permutations(n_layers, n_heads, 10, seed=2), perms[:10])
    assert not torch.equal(layer_permutations(n_layers, n_heads, 10, seed=3), perms[:10])


def _statistic_reference(statistic, k):
    if statistic == "spearman":
        return lambda u, v: stats.spearmanr(u.flatten(), v.flatten()).statistic
    if statistic == "top_k":
        return lambda u, v: len(set(_ranking(torch.as_tensor(u))[:k])
                                & set(_ranking(torch.as_tensor(v))[:k])) / k
    return within_layer_reference


def layer_permutation_reference(a, b, statistic, k, n_permutations, seed):
    """The library's permutations (same draws), applied one layer of one draw at a time."""
    a, b = a.double().numpy(), b.double().numpy()
    n_layers, n_heads = b.shape
    fn = _statistic_reference(statistic, k)
    observed = fn(a, b)
    perms = layer_permutations(n_layers, n_heads, n_permutations, seed=seed).numpy()
    null = []
    for draw in perms:
        shuffled = np.empty_like(b)
        for layer in range(n_layers):
            order = draw[layer] - layer * n_heads  # positions within the layer
            shuffled[layer] = b[layer][order]
        null.append(fn(a, shuffled))
    return observed, np.array(null)


@pytest.mark.parametrize("statistic", ["spearman", "top_k", "within_layer_spearman"])
@pytest.mark.parametrize("ties", [False, True])
def test_layer_permutation_pvalue_equals_plain_loop(statistic, ties):
    a, b = _maps(6, ties)
    observed, null = permutation_null(a, b, statistic=statistic, k=5, n_permutations=300, seed=4,
                                      within_layers=True)
    want_observed, want_null = layer_permutation_reference(a, b, statistic, 5, 300, 4)
    assert observed == pytest.approx(want_observed, abs=1e-12)
    assert null.numpy() == pytest.approx(want_null, abs=1e-12)
    want_p = (1 + sum(v >= want_observed - 1e-12 for v in want_null)) / 301
    assert permutation_pvalue(a, b, statistic=statistic, k=5, n_permutations=300, seed=4,
                              within_layers=True) == pytest.approx(want_p, abs=1e-15)


def test_layer_permutation_pvalue_matches_an_independent_numpy_null():
    """Independent draws (numpy's generator, one layer at a time): the p-values agree within
    Monte Carlo error, and differ from the ordinary null's."""
    a, b = _layered_maps(7, n_layers=6, n_heads=5)
    rng = np.random.default_rng(0)
    x, y = a.numpy(), b.numpy()
    observed = stats.spearmanr(x.flatten(), y.flatten()).statistic
    n = 3000
    null = [stats.spearmanr(x.flatten(),
                            np.stack([rng.permutation(row) for row in y]).flatten()).statistic
            for _ in range(n)]
    want = (1 + sum(v >= observed - 1e-12 for v in null)) / (1 + n)
    got = permutation_pvalue(a, b, n_permutations=n, seed=1, within_layers=True)
    assert 0.05 < want < 0.95  # a p-value where the two nulls can disagree
    assert got == pytest.approx(want, abs=0.05)
    assert permutation_pvalue(a, b, n_permutations=n, seed=1) < 0.01


def test_within_layer_spearman_under_the_ordinary_null_equals_plain_loop():
    a, b = _maps(2, True)
    x, y = a.flatten(), b.flatten()
    gen = torch.Generator().manual_seed(5)
    perms = torch.argsort(torch.rand(200, x.numel(), generator=gen), dim=-1)
    observed = within_layer_reference(a, b)
    null = np.array([within_layer_reference(a, y[perm].reshape(a.shape)) for perm in perms])
    extreme = (null >= observed - 1e-12) | np.isnan(null)
    assert permutation_pvalue(a, b, statistic="within_layer_spearman", n_permutations=200,
                              seed=5) == pytest.approx((1 + extreme.sum()) / 201)


def test_layer_null_separates_layer_structure_from_head_agreement():
    # shared layer means only: tiny ordinary p, large layer-null p, top-k overlap as expected
    a, b = _layered_maps(0)
    assert permutation_pvalue(a, b, n_permutations=500) < 0.01
    assert permutation_pvalue(a, b, statistic="top_k", k=12, n_permutations=500) < 0.01
    assert permutation_pvalue(a, b, n_permutations=500, within_layers=True) > 0.1
    observed, null = permutation_null(a, b, statistic="top_k", k=12, n_permutations=500,
                                      within_layers=True)
    assert permutation_pvalue(a, b, statistic="top_k", k=12, n_permutations=500,
                              within_layers=True) > 0.1
    assert observed > 0.4 and abs(float(null.mean()) - observed) < 0.15  # chance: 0.1
    # shared within-layer pattern as well: small p under both nulls
    a, b = _layered_maps(0, shared_heads=1.5)
    for statistic in ("spearman", "within_layer_spearman"):
        for within in (False, True):
            assert permutation_pvalue(a, b, statistic=statistic, n_permutations=500,
                                      within_layers=within) < 0.01


def test_permutation_pvalue_of_an_undefined_statistic_is_nan():
    a, _ = _maps(0, False)
    assert math.isnan(permutation_pvalue(a, torch.ones_like(a), n_permutations=50))
    assert math.isnan(permutation_pvalue(a, torch.ones_like(a), n_permutations=50,
                                         within_layers=True))


def test_overlap_table_layer_controls():
    g = torch.Generator().manual_seed(8)
    a, b = _layered_maps(3, n_layers=8, n_heads=6, shared_heads=0.7)
    imp = _scores(b + 0.3 * torch.randn(3, 8, 6, generator=g, dtype=torch.float64), "imp")
    scan = _scores(a + 0.3 * torch.randn(4, 8, 6, generator=g, dtype=torch.float64), "scan")
    table = overlap_table({("task", 1): imp}, {"prefix": scan}, k=5, n_permutations=200,
                          n_resamples=50, seed=3)
    row = table.iloc[0]
    # existing columns first, unchanged
    assert list(table.columns[:10]) == ["task", "shots", "induction score", "spearman", "kendall",
                                        "top-5 overlap", "jaccard@5", "rbo (p=0.9)",
                                        "hypergeom p", "permutation p"]
    assert row["permutation p"] == permutation_pvalue(scan, imp, n_permutations=200, seed=3)
    assert row["within-layer spearman"] == pytest.approx(
        within_layer_reference(scan.mean, imp.mean), abs=1e-12)
    assert row["layer-null p (spearman)"] == permutation_pvalue(
        scan, imp, n_permutations=200, seed=3, within_layers=True)
    assert row["layer-null p (top-k)"] == permutation_pvalue(
        scan, imp, statistic="top_k", k=5, n_permutations=200, seed=3, within_layers=True)
    _, want_null = layer_permutation_reference(scan.mean, imp.mean, "top_k", 5, 200, 3)
    assert row["layer-null top-5 overlap"] == pytest.approx(want_null.mean(), abs=1e-12)
    assert {"spearman ci low", "spearman ci high"} <= set(table.columns)
    # single-head layers: the controls are undefined, the rest is computed
    one = overlap_table({("task", 1): _scores(torch.randn(2, 6, 1, generator=g), "i")},
                        {"prefix": _scores(torch.randn(2, 6, 1, generator=g), "s")}, k=2,
                        n_permutations=20, n_resamples=20)
    assert one[["within-layer spearman", "layer-null p (spearman)", "layer-null p (top-k)",
                "layer-null top-2 overlap"]].isna().all(axis=None)
    assert one["spearman"].notna().all()


def test_overlap_matrix_within_layer():
    a, b = _maps(1, False)
    m = overlap_matrix({"a": a, "b": b}, statistic="within_layer_spearman")
    assert m.loc["a", "a"] == pytest.approx(1.0)
    assert m.loc["a", "b"] == pytest.approx(within_layer_reference(a, b), abs=1e-12)


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
        assert within_layer_spearman(a, b) == pytest.approx(
            within_layer_reference(a.mean, b.mean), abs=1e-12)
        for statistic in ("spearman", "top_k"):
            observed, null = layer_permutation_reference(a.mean, b.mean, statistic, k, 100, 1)
            assert permutation_pvalue(a, b, statistic=statistic, k=k, n_permutations=100, seed=1,
                                      within_layers=True) == pytest.approx(
                (1 + sum(v >= observed - 1e-12 for v in null)) / 101)
    _, low, high = bootstrap_ci(prefix, imp, n_resamples=100, seed=4)
    want = bootstrap_reference(prefix.per_seed, imp.per_seed, "spearman", k, 100, 4, False,
                               0.95)
    assert (low, high) == pytest.approx(tuple(want), abs=1e-9)
