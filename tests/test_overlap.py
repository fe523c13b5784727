"""Rank correlations and top-k overlap against scipy, including ties."""

import pytest
import torch
from scipy import stats

from mechicl.overlap import kendall, rank, spearman, top_k_overlap


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
