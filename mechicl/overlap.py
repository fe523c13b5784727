"""Agreement between two per-head (or per-layer) score maps: rank correlations and top-k overlap.

Rank correlations are computed on the scores themselves (Spearman's rho = Pearson correlation of
average ranks, so ties get their mean rank; Kendall's tau-b), flattened over layers x heads.
llm-interpret's ``spearman_rankings.py`` correlates the *argsort permutations* instead, which is
not a rank correlation (it compares which flat index holds the k-th smallest score).

Axis names: ``layer head``.
"""

import torch
from jaxtyping import Float
from torch import Tensor

from mechicl.results import HeadScores, LayerScores

__all__ = ["kendall", "rank", "spearman", "top_k_overlap"]

Scores = HeadScores | LayerScores | Tensor


def _flat(x: Scores) -> Float[Tensor, " n"]:
    t = x.mean if isinstance(x, (HeadScores, LayerScores)) else torch.as_tensor(x)
    return t.detach().flatten().to("cpu", torch.float64)


def _pair(a: Scores, b: Scores) -> tuple[Tensor, Tensor]:
    x, y = _flat(a), _flat(b)
    if x.shape != y.shape:
        raise ValueError(f"score maps differ in size: {x.numel()} vs {y.numel()}")
    if x.numel() < 2:
        raise ValueError("need at least 2 scores to correlate")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("scores contain NaN or inf")
    return x, y


def rank(x: Float[Tensor, "..."]) -> Float[Tensor, " n"]:
    """Average ranks of the flattened scores (1 = smallest; ties share their mean rank).

    >>> rank(torch.tensor([10.0, 30.0, 20.0, 20.0])).tolist()
    [1.0, 4.0, 2.5, 2.5]
    """
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    # Boundaries of runs of equal values: each run gets the mean of its ordinal ranks.
    new_run = torch.ones_like(sorted_x, dtype=torch.bool)
    new_run[1:] = sorted_x[1:] != sorted_x[:-1]
    run_id = torch.cumsum(new_run.long(), 0) - 1
    ordinal = torch.arange(1, x.numel() + 1, dtype=torch.float64)
    n_runs = int(run_id[-1]) + 1
    total = torch.zeros(n_runs, dtype=torch.float64).index_add_(0, run_id, ordinal)
    count = torch.zeros(n_runs, dtype=torch.float64).index_add_(0, run_id, torch.ones_like(ordinal))
    out = torch.empty_like(x)
    out[order] = (total / count)[run_id]
    return out


def spearman(a: Scores, b: Scores) -> float:
    """Spearman's rho between two score maps (NaN if either is constant)."""
    x, y = _pair(a, b)
    rx, ry = rank(x), rank(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = (rx.square().sum() * ry.square().sum()).sqrt()
    return float("nan") if denom == 0 else float((rx * ry).sum() / denom)


def kendall(a: Scores, b: Scores) -> float:
    """Kendall's tau-b between two score maps (all pairs, vectorised; NaN if either is constant)."""
    x, y = _pair(a, b)
    dx = torch.sign(x[:, None] - x[None, :])
    dy = torch.sign(y[:, None] - y[None, :])
    upper = torch.triu(torch.ones_like(dx, dtype=torch.bool), diagonal=1)
    concordance = (dx * dy)[upper].sum()
    n_x = (dx[upper] != 0).sum().double()  # pairs not tied in x
    n_y = (dy[upper] != 0).sum().double()
    denom = (n_x * n_y).sqrt()
    return float("nan") if denom == 0 else float(concordance / denom)


def top_k_overlap(a: Scores, b: Scores, k: int) -> float:
    """Share of the ``k`` highest-scoring entries of ``a`` that are among the top ``k`` of ``b``."""
    x, y = _pair(a, b)
    if not 1 <= k <= x.numel():
        raise ValueError(f"k={k} must be in 1..{x.numel()}")
    top_x = set(torch.argsort(x, descending=True, stable=True)[:k].tolist())
    top_y = set(torch.argsort(y, descending=True, stable=True)[:k].tolist())
    return len(top_x & top_y) / k
