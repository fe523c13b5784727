"""Agreement between two per-head (or per-layer) score maps: rank correlations, top-k overlap
and their null distributions.

Rank correlations are computed on the scores themselves (Spearman's rho = Pearson correlation of
average ranks, so ties get their mean rank; Kendall's tau-b), flattened over layers x heads.
llm-interpret's ``spearman_rankings.py`` correlates the *argsort permutations* instead, which is
not a rank correlation (it compares which flat index holds the k-th smallest score).

Set overlap of the top heads: :func:`top_k_overlap` (share of ``a``'s top k in ``b``'s top k),
:func:`jaccard`, :func:`rank_biased_overlap` (Webber, Moffat & Zobel 2010: top-weighted, no
cut-off), and :func:`top_k_pvalue`, the hypergeometric probability of at least that overlap
between two random k-sets. :func:`permutation_pvalue` gives a permutation null for any of these;
:func:`bootstrap_ci` a percentile interval over the seeds / examples the score maps were averaged
from (``HeadScores.per_seed``). :func:`overlap_matrix` compares many maps at once (DataFrame).

Controls for layer structure (issue 21): importance maps agree in good part because whole
layers matter (a map of per-layer means alone correlates ~0.8 with the full map), so agreement
over all heads mixes "the same layers matter" with "the same heads within a layer matter".
:func:`within_layer_spearman` correlates ranks taken within each layer (layer means removed),
and ``permutation_pvalue(..., within_layers=True)`` draws its null by relabelling heads only
within their own layer (:func:`layer_permutations`), so that layer structure is part of the
null. :func:`permutation_null` returns the null distribution itself (e.g. the top-k overlap
that layer structure alone gives).

Axis names: ``layer head seed``.
"""

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechicl.analyses._registry import (
    Analysis,
    Call,
    Job,
    Option,
    Outputs,
    get_analysis,
    job_stem,
    register_analysis,
)
from mechicl.results import HeadScores, LayerScores, read_result, result_type, write_result

__all__ = ["OverlapTable", "bootstrap_ci", "jaccard", "kendall", "layer_permutations",
           "overlap_matrix", "overlap_table", "percentile_interval", "percentile_intervals",
           "permutation_null",
           "permutation_pvalue", "rank", "rank_biased_overlap", "spearman",
           "spearman_rows", "top_k", "top_k_overlap", "top_k_overlap_rows", "top_k_pvalue",
           "within_layer_spearman", "within_layer_spearman_rows"]

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
    return _rank_rows(torch.as_tensor(x, dtype=torch.float64).flatten()[None])[0]


def spearman(a: Scores, b: Scores) -> float:
    """Spearman's rho between two score maps (NaN if either is constant)."""
    x, y = _pair(a, b)
    return float(_spearman_rows(x[None], y[None])[0])


def spearman_rows(a: Float[Tensor, "row ..."], b: Float[Tensor, "row ..."]
                  ) -> Float[Tensor, " row"]:
    """Spearman's rho of each row pair (e.g. bootstrap resamples of two maps), vectorised;
    every dimension after the first is flattened. NaN where a row is constant.

    >>> spearman_rows(torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]),
    ...               torch.tensor([[1.0, 3.0, 2.0], [3.0, 2.0, 1.0]])).tolist()
    [0.5, -1.0]
    """
    x, y = _row_pair(a, b, 2)
    return _spearman_rows(x.flatten(1), y.flatten(1))


def _row_pair(a: Tensor, b: Tensor, min_ndim: int) -> tuple[Tensor, Tensor]:
    x, y = (torch.as_tensor(t).detach().to("cpu", torch.float64) for t in (a, b))
    if x.shape != y.shape or x.ndim < min_ndim:
        dims = "[row, ...]" if min_ndim == 2 else "[row, layer, head]"
        raise ValueError(f"need two {dims} tensors of one shape; got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    return x, y


def top_k_overlap_rows(a: Float[Tensor, "row ..."], b: Float[Tensor, "row ..."], k: int
                       ) -> Float[Tensor, " row"]:
    """:func:`top_k_overlap` of each row pair (e.g. bootstrap resamples of two maps), vectorised;
    every dimension after the first is flattened.

    >>> top_k_overlap_rows(torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]]),
    ...                    torch.tensor([[3.0, 1.0, 2.0], [1.0, 2.0, 3.0]]), 2).tolist()
    [0.5, 0.5]
    """
    x, y = _row_pair(a, b, 2)
    return _top_k_overlap_rows(x.flatten(1), y.flatten(1), top_k(x[0].numel(), k=k))


def within_layer_spearman_rows(a: Float[Tensor, "row layer head"],
                               b: Float[Tensor, "row layer head"]) -> Float[Tensor, " row"]:
    """:func:`within_layer_spearman` of each ``[layer, head]`` row pair, vectorised; NaN where
    every layer of either map is constant (where :func:`within_layer_spearman` raises).

    >>> layers, heads = 10 * torch.arange(3.0)[:, None], torch.arange(4.0)
    >>> within_layer_spearman_rows(torch.stack([layers + heads, layers + heads]),
    ...                            torch.stack([layers - heads, layers + heads])).tolist()
    [-1.0, 1.0]
    """
    x, y = _row_pair(a, b, 3)
    if x.ndim != 3:
        raise ValueError(f"need [row, layer, head] tensors; got shape {tuple(x.shape)}")
    return _within_layer_spearman_rows(x, y)


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
    k = top_k(x.numel(), k=k)
    return float(_top_k_overlap_rows(x[None], y[None], k)[0])


def top_k(n: int, *, k: int | None = None, percentile: int | float | None = None) -> int:
    """``k`` itself, or the number of entries in the top ``percentile`` % of ``n`` (at least 1).

    >>> top_k(270, percentile=10)
    27
    """
    if (k is None) == (percentile is None):
        raise ValueError("give exactly one of k and percentile")
    if percentile is not None:
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile={percentile} must be in (0, 100]")
        k = max(1, round(n * percentile / 100))
    assert k is not None
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in 1..{n}")
    return k


def _top_set(x: Tensor, k: int) -> set[int]:
    return set(torch.argsort(x, descending=True, stable=True)[:k].tolist())


def jaccard(a: Scores, b: Scores, k: int) -> float:
    """|A ∩ B| / |A ∪ B| of the two top-``k`` sets."""
    x, y = _pair(a, b)
    k = top_k(x.numel(), k=k)
    sa, sb = _top_set(x, k), _top_set(y, k)
    return len(sa & sb) / len(sa | sb)


def rank_biased_overlap(a: Scores, b: Scores, p: float = 0.9) -> float:
    """Rank-biased overlap RBO_ext (Webber et al. 2010, eq. 32) of the two rankings (highest
    score first, ties broken by position), in [0, 1]; ``p`` sets the top-weightedness (the top
    ``1 / (1 - p)`` ranks carry most of the weight).

    For rankings of the full length ``n``: ``RBO = X_n/n p^n + (1 - p)/p sum_d X_d/d p^d``,
    where ``X_d`` is the overlap of the two top-``d`` sets; identical rankings give 1.
    """
    x, y = _pair(a, b)
    if not 0 < p < 1:
        raise ValueError(f"p={p} must be in (0, 1)")
    n = x.numel()
    rank_x = torch.empty(n, dtype=torch.long)
    rank_x[torch.argsort(x, descending=True, stable=True)] = torch.arange(1, n + 1)
    rank_y = torch.empty(n, dtype=torch.long)
    rank_y[torch.argsort(y, descending=True, stable=True)] = torch.arange(1, n + 1)
    # an item is in both top-d sets from depth max(rank_x, rank_y) on
    overlap = torch.cumsum(torch.bincount(torch.maximum(rank_x, rank_y), minlength=n + 1)[1:], 0)
    d = torch.arange(1, n + 1, dtype=torch.float64)
    agreement = overlap.double() / d
    weights = p ** d
    return float(agreement[-1] * p**n + (1 - p) / p * (agreement * weights).sum())


def top_k_pvalue(a: Scores, b: Scores, k: int) -> float:
    """P(overlap >= observed) for two independent uniformly random k-subsets of the n entries
    (hypergeometric upper tail): how surprising the observed top-k overlap is."""
    x, y = _pair(a, b)
    n = x.numel()
    k = top_k(n, k=k)
    observed = len(_top_set(x, k) & _top_set(y, k))
    total = math.comb(n, k)
    tail = sum(math.comb(k, j) * math.comb(n - k, k - j) for j in range(observed, k + 1))
    return tail / total


def _rank_rows(x: Tensor) -> Tensor:
    """Average ranks along the last axis of ``[m, n]`` (ties share their mean rank)."""
    m, n = x.shape
    order = torch.argsort(x, dim=-1, stable=True)
    sorted_x = torch.gather(x, -1, order)
    new_run = torch.ones_like(sorted_x, dtype=torch.bool)
    new_run[:, 1:] = sorted_x[:, 1:] != sorted_x[:, :-1]
    run_id = torch.cumsum(new_run.long(), -1) - 1 + torch.arange(m)[:, None] * n  # global ids
    ordinal = torch.arange(1, n + 1, dtype=torch.float64).expand(m, n).flatten()
    total = torch.zeros(m * n, dtype=torch.float64).index_add_(0, run_id.flatten(), ordinal)
    count = torch.zeros(m * n, dtype=torch.float64).index_add_(0, run_id.flatten(),
                                                               torch.ones_like(ordinal))
    ranks_sorted = (total / count.clamp_min(1))[run_id]
    out = torch.empty_like(ranks_sorted)
    out.scatter_(-1, order, ranks_sorted)
    return out


def _top_k_overlap_rows(x: Tensor, y: Tensor, k: int) -> Tensor:
    """Top-k overlap of each row pair of ``[m, n]`` maps (ties broken by position)."""
    top_x = torch.argsort(x, dim=-1, descending=True, stable=True)[:, :k]
    top_y = torch.argsort(y, dim=-1, descending=True, stable=True)[:, :k]
    member_y = torch.zeros_like(y, dtype=torch.bool).scatter_(1, top_y, True)
    return member_y.gather(1, top_x).double().sum(-1) / k


def _pearson_rows(x: Tensor, y: Tensor) -> Tensor:
    x = x - x.mean(-1, keepdim=True)
    y = y - y.mean(-1, keepdim=True)
    denom = (x.square().sum(-1) * y.square().sum(-1)).sqrt()
    return torch.where(denom > 0, (x * y).sum(-1) / denom, torch.full_like(denom, float("nan")))


def _spearman_rows(x: Tensor, y: Tensor) -> Tensor:
    return _pearson_rows(_rank_rows(x), _rank_rows(y))


Statistic = Callable[[Tensor, Tensor], float]


def _layer_pair(a: Scores, b: Scores) -> tuple[Tensor, Tensor]:
    """Both maps as ``[layer, head]`` float64 tensors of one shape (finite)."""
    x, y = (t.mean if isinstance(t, (HeadScores, LayerScores)) else torch.as_tensor(t)
            for t in (a, b))
    x, y = (t.detach().to("cpu", torch.float64) for t in (x, y))
    for t in (x, y):
        if t.ndim != 2:
            raise ValueError(f"within-layer statistics need [layer, head] maps (HeadScores or a "
                             f"2-d tensor); got shape {tuple(t.shape)}"
                             + (" (a per-layer map has no heads to rank or permute within its "
                                "layers)" if t.ndim == 1 else ""))
    if x.shape != y.shape:
        raise ValueError(f"score maps differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("scores contain NaN or inf")
    return x, y


def _centred_layer_ranks(x: Tensor) -> Tensor:
    """``[m, layer, head]`` -> ``[m, layer * head]``: average ranks within each layer minus the
    layer's mean rank (all zeros in a constant layer)."""
    m, n_layers, n_heads = x.shape
    r = _rank_rows(x.reshape(m * n_layers, n_heads))
    return (r - r.mean(-1, keepdim=True)).reshape(m, n_layers * n_heads)


def _within_layer_spearman_rows(x: Tensor, y: Tensor) -> Tensor:
    """Pooled within-layer rank correlation of each ``[layer, head]`` pair of ``[m, layer, head]``
    (NaN where every layer of either map is constant)."""
    rx, ry = _centred_layer_ranks(x), _centred_layer_ranks(y)
    denom = (rx.square().sum(-1) * ry.square().sum(-1)).sqrt()
    return torch.where(denom > 0, (rx * ry).sum(-1) / denom, torch.full_like(denom, float("nan")))


def within_layer_spearman(a: Scores, b: Scores) -> float:
    """Rank correlation of two ``[layer, head]`` maps with the layer means removed: the pooled
    within-layer rank correlation.

    Each head's score is ranked within its own layer (average ranks for ties), the layer's mean
    rank is subtracted, and the result is the Pearson correlation of these centred ranks over
    all heads, ``sum(rx * ry) / sqrt(sum(rx^2) * sum(ry^2))``. Two maps that agree only on which
    layers matter score about 0 here, whatever their whole-map :func:`spearman`.

    A layer that is constant in one map has all-zero centred ranks in that map: it adds nothing
    to the covariance or to that map's variance, while the other map's variation in that layer
    still counts in its variance (pulling the value towards 0).

    Args:
        a: a ``[layer, head]`` map (``HeadScores`` or a 2-d tensor).
        b: a map of the same shape.

    Raises:
        ValueError: for maps that are not ``[layer, head]`` (e.g. per-layer ``LayerScores``),
            of different shapes, with NaN / inf, or when every layer of ``a`` or of ``b`` is
            constant (or has a single head): no within-layer ranking to correlate.

    >>> layers, heads = 10 * torch.arange(3.0)[:, None], torch.arange(4.0)
    >>> a, b = layers + heads, layers - heads  # same layer structure, heads reversed
    >>> round(spearman(a, b), 2), within_layer_spearman(a, b)
    (0.79, -1.0)
    """
    x, y = _layer_pair(a, b)
    value = float(_within_layer_spearman_rows(x[None], y[None])[0])
    if math.isnan(value):
        raise ValueError(f"every layer of a or of b is constant (maps of shape "
                         f"{tuple(x.shape)}): no within-layer ranking to correlate")
    return value


def layer_permutations(n_layers: int, n_heads: int, n_permutations: int, *, seed: int = 0,
                       ) -> Int[Tensor, "permutation layer head"]:
    """Random relabellings of the heads that keep every head in its layer: the layer-preserving
    null of :func:`permutation_pvalue`.

    Each draw permutes each layer's heads independently (one uniform random permutation per
    layer per draw: the argsort of ``torch.rand(n_permutations, n_layers, n_heads)`` drawn from
    a ``torch.Generator`` seeded by ``seed``).

    Returns:
        ``[permutation, layer, head]`` indices into the flattened ``[layer, head]`` map: draw
        ``p`` puts the score of flat head ``perms[p, l, h]`` (always one of layer ``l``'s) at
        ``(l, h)``, i.e. ``shuffled = b.flatten()[perms.flatten(1)]``.

    >>> perms = layer_permutations(2, 3, 1, seed=0)
    >>> perms.shape, sorted(perms[0, 1].tolist())
    (torch.Size([1, 2, 3]), [3, 4, 5])
    """
    for name, value in (("n_layers", n_layers), ("n_heads", n_heads),
                        ("n_permutations", n_permutations)):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    gen = torch.Generator().manual_seed(seed)
    within = torch.argsort(torch.rand(n_permutations, n_layers, n_heads, generator=gen), dim=-1)
    return within + torch.arange(n_layers)[:, None] * n_heads


_PERMUTATION_STATISTICS = ("spearman", "top_k", "within_layer_spearman")


def _statistic_rows(statistic: str, x: Tensor, y: Tensor, shape: tuple[int, ...], k: int,
                    ) -> Tensor:
    """``statistic`` between the flat map ``x`` ``[n]`` and every row of ``y`` ``[m, n]``."""
    xs = x.expand_as(y)
    if statistic == "spearman":
        return _spearman_rows(xs, y)
    if statistic == "top_k":
        return _top_k_overlap_rows(xs, y, k)
    return _within_layer_spearman_rows(xs.reshape(-1, *shape), y.reshape(-1, *shape))


def permutation_null(a: Scores, b: Scores, *, statistic: str = "spearman", k: int = 10,
                     n_permutations: int = 1000, seed: int = 0, within_layers: bool = False,
                     ) -> tuple[float, Float[Tensor, " permutation"]]:
    """The observed ``statistic`` and its values under random relabellings of ``b``'s heads
    (vectorised over the relabellings): the null distribution of :func:`permutation_pvalue`.

    Args:
        a: the first score map.
        b: the second score map, whose heads are relabelled.
        statistic: ``"spearman"``, ``"top_k"`` (:func:`top_k_overlap`) or
            ``"within_layer_spearman"`` (:func:`within_layer_spearman`; ``[layer, head]`` maps
            only).
        k: the ``k`` of ``"top_k"``.
        n_permutations: the number of relabellings.
        seed: seeds the ``torch.Generator`` of the relabellings.
        within_layers: False: relabel all heads uniformly at random; True: the layer-preserving
            null, each layer's heads permuted independently (:func:`layer_permutations`), so
            that the null keeps ``b``'s layer structure (needs ``[layer, head]`` maps with at
            least 2 heads per layer).

    Returns:
        ``(observed, null)``, ``null`` of shape ``[permutation]`` (NaN for a draw where the
        statistic is undefined). ``null.mean()`` is the agreement the null alone gives, e.g.
        with ``within_layers=True`` the top-k overlap expected from layer structure alone.

    >>> a = 10 * torch.arange(3.0)[:, None] + torch.arange(4.0)
    >>> observed, null = permutation_null(a, a, within_layers=True, n_permutations=100)
    >>> observed, null.shape, bool((null > 0.75).all())  # layer structure alone: rho > 0.75
    (1.0, torch.Size([100]), True)
    """
    if statistic not in _PERMUTATION_STATISTICS:
        raise ValueError(f"statistic={statistic!r} is not allowed; choose one of "
                         f"{list(_PERMUTATION_STATISTICS)}")
    if n_permutations < 1:
        raise ValueError(f"n_permutations={n_permutations} must be >= 1")
    if within_layers or statistic == "within_layer_spearman":
        x2, y2 = _layer_pair(a, b)
        shape: tuple[int, ...] = tuple(x2.shape)
        x, y = x2.flatten(), y2.flatten()
        if x.numel() < 2:
            raise ValueError("need at least 2 scores to correlate")
    else:
        x, y = _pair(a, b)
        shape = (x.numel(),)
    if statistic == "top_k":
        k = top_k(x.numel(), k=k)
    if within_layers:
        if shape[1] < 2:
            raise ValueError(f"the layer-preserving null needs at least 2 heads per layer; got "
                             f"maps of shape {shape}")
        perms = layer_permutations(shape[0], shape[1], n_permutations, seed=seed).flatten(1)
    else:
        gen = torch.Generator().manual_seed(seed)
        perms = torch.argsort(torch.rand(n_permutations, x.numel(), generator=gen), dim=-1)
    observed = float(_statistic_rows(statistic, x, y[None], shape, k)[0])
    return observed, _statistic_rows(statistic, x, y[perms], shape, k)


def _pvalue(observed: float, null: Tensor) -> float:
    """The permutation p-value ``(1 + #{null >= observed}) / (1 + len(null))`` (a NaN draw counts
    as at least as large; NaN when ``observed`` is NaN)."""
    if math.isnan(observed):
        return float("nan")
    extreme = (null >= observed - 1e-12) | null.isnan()
    return (1 + int(extreme.sum())) / (1 + null.numel())


def permutation_pvalue(a: Scores, b: Scores, *, statistic: str = "spearman", k: int = 10,
                       n_permutations: int = 1000, seed: int = 0, within_layers: bool = False,
                       ) -> float:
    """Permutation p-value of ``statistic`` (``"spearman"``, ``"top_k"`` or
    ``"within_layer_spearman"``): the share of random relabellings of ``b``'s heads with a
    statistic at least as large as observed,
    ``(1 + #{null >= observed}) / (1 + n_permutations)`` (one-sided: more agreement than chance;
    NaN when the observed statistic is undefined, e.g. Spearman with a constant map).

    ``within_layers=True`` uses the layer-preserving null: heads are relabelled only within their
    own layer (each layer permuted independently, :func:`layer_permutations`), so that a small
    p-value means more agreement than the maps' layer structure alone gives. It needs
    ``[layer, head]`` maps: for per-layer maps it is meaningless and raises. The arguments are
    :func:`permutation_null`'s.

    >>> layers, heads = 10 * torch.arange(3.0)[:, None], torch.arange(4.0)
    >>> a, b = layers + heads, layers - heads  # same layer structure, heads reversed
    >>> permutation_pvalue(a, b, n_permutations=999)  # rho = 0.79 is rare among relabellings
    0.002
    >>> permutation_pvalue(a, b, n_permutations=999, within_layers=True)  # not beyond layers
    1.0
    """
    return _pvalue(*permutation_null(a, b, statistic=statistic, k=k,
                                     n_permutations=n_permutations, seed=seed,
                                     within_layers=within_layers))


def bootstrap_ci(a: HeadScores | LayerScores, b: HeadScores | LayerScores, *,
                 statistic: str = "spearman", k: int = 10, n_resamples: int = 1000,
                 confidence: float = 0.95, seed: int = 0, paired: bool = False,
                 ) -> tuple[float, float, float]:
    """Percentile bootstrap interval of ``statistic`` (``"spearman"`` or ``"top_k"``) between
    the mean maps of ``a`` and ``b``, resampling their rows (``per_seed``: seeds or examples)
    with replacement. ``paired=True`` resamples the same row indices in both (same examples).

    Returns:
        ``(estimate on the full data, low, high)``.
    """
    if statistic not in ("spearman", "top_k"):
        raise ValueError(f"statistic={statistic!r} is not allowed; choose 'spearman' or 'top_k'")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must be in (0, 1)")
    pa = a.per_seed.flatten(1).double()
    pb = b.per_seed.flatten(1).double()
    if pa.shape[1] != pb.shape[1]:
        raise ValueError(f"score maps differ in size: {pa.shape[1]} vs {pb.shape[1]}")
    if paired and pa.shape[0] != pb.shape[0]:
        raise ValueError(f"paired=True needs as many rows in both ({pa.shape[0]} vs {pb.shape[0]})")
    gen = torch.Generator().manual_seed(seed)

    def resampled_means(rows: Tensor, idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if idx is None:
            idx = torch.randint(rows.shape[0], (n_resamples, rows.shape[0]), generator=gen)
        counts = torch.zeros(n_resamples, rows.shape[0], dtype=torch.float64)
        counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
        return counts @ rows / rows.shape[0], idx  # [resample, n]

    means_a, idx = resampled_means(pa)
    means_b, _ = resampled_means(pb, idx if paired else None)
    if statistic == "spearman":
        estimate = spearman(pa.mean(0), pb.mean(0))
        values = _spearman_rows(means_a, means_b)
    else:
        k = top_k(pa.shape[1], k=k)
        estimate = top_k_overlap(pa.mean(0), pb.mean(0), k)
        values = _top_k_overlap_rows(means_a, means_b, k)
    low, high = percentile_interval(values, confidence)
    return estimate, low, high


def percentile_interval(values: Float[Tensor, " resample"], level: float = 0.95
                        ) -> tuple[float, float]:
    """The two-sided percentile interval at ``level`` of bootstrap values (NaNs left out).

    >>> [round(x, 6) for x in percentile_interval(torch.arange(101.0), 0.9)]
    [5.0, 95.0]
    """
    low, high = percentile_intervals(torch.as_tensor(values)[:, None], level)
    return float(low[0]), float(high[0])


def percentile_intervals(values: Float[Tensor, "resample ..."], level: float = 0.95
                         ) -> tuple[Float[Tensor, "..."], Float[Tensor, "..."]]:
    """:func:`percentile_interval` of every entry at once (e.g. each head's bootstrap means):
    the quantiles over the first axis, NaNs left out.

    >>> low, high = percentile_intervals(torch.arange(101.0)[:, None] * torch.tensor([1.0, 2.0]),
    ...                                  0.9)
    >>> low.round().tolist(), high.round().tolist()
    ([5.0, 10.0], [95.0, 190.0])
    """
    alpha = (1 - level) / 2
    q = torch.tensor([alpha, 1 - alpha], dtype=torch.float64)
    low, high = torch.nanquantile(torch.as_tensor(values, dtype=torch.float64), q, dim=0)
    return low, high


_STATS: dict[str, Callable[..., float]] = {
    "spearman": lambda a, b, k: spearman(a, b),
    "within_layer_spearman": lambda a, b, k: within_layer_spearman(a, b),
    "kendall": lambda a, b, k: kendall(a, b),
    "top_k": top_k_overlap,
    "jaccard": jaccard,
    "rbo": lambda a, b, k: rank_biased_overlap(a, b),
    "top_k_pvalue": top_k_pvalue,
}


def overlap_matrix(maps: Mapping[str, Scores], *, statistic: str = "spearman", k: int = 10,
                   ) -> pd.DataFrame:
    """``statistic`` between every pair of the named score maps (tasks x shots, models...), as a
    square DataFrame. Statistics: spearman, within_layer_spearman (``[layer, head]`` maps),
    kendall, top_k, jaccard, rbo, top_k_pvalue."""
    if statistic not in _STATS:
        raise ValueError(f"statistic={statistic!r} is not allowed; choose one of {list(_STATS)}")
    names = list(maps)
    fn = _STATS[statistic]
    values = [[fn(maps[r], maps[c], k) for c in names] for r in names]
    return pd.DataFrame(values, index=names, columns=names)


def _layer_controls(a: HeadScores, b: HeadScores, *, k: int, n_permutations: int, seed: int,
                    ) -> dict[str, float]:
    """:func:`overlap_table`'s layer-structure columns (NaN where undefined)."""
    names = ("within-layer spearman", "layer-null p (spearman)", "layer-null p (top-k)",
             f"layer-null top-{k} overlap")
    if any(t.mean.ndim != 2 or t.mean.shape[1] < 2 for t in (a, b)):
        return dict.fromkeys(names, float("nan"))
    x, y = _layer_pair(a, b)
    within = float(_within_layer_spearman_rows(x[None], y[None])[0])
    rho, rho_null = permutation_null(x, y, statistic="spearman", n_permutations=n_permutations,
                                     seed=seed, within_layers=True)
    overlap, overlap_null = permutation_null(x, y, statistic="top_k", k=k,
                                             n_permutations=n_permutations, seed=seed,
                                             within_layers=True)
    return dict(zip(names, (within, _pvalue(rho, rho_null), _pvalue(overlap, overlap_null),
                            float(overlap_null.mean())), strict=True))


def overlap_table(importance: Mapping[tuple[str, int], HeadScores],
                  scans: Mapping[str, HeadScores], *, k: int, n_permutations: int = 1000,
                  n_resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Every induction score against every importance map: one row per (task, shots, score)
    with Spearman, Kendall tau-b, top-``k`` overlap, Jaccard@k, rank-biased overlap, the
    hypergeometric and permutation p-values, the layer-structure controls and (when both maps
    have several seeds / examples) a bootstrap interval of Spearman's rho.

    The controls, next to the raw values: ``"within-layer spearman"``
    (:func:`within_layer_spearman`), ``"layer-null p (spearman)"`` and ``"layer-null p (top-k)"``
    (:func:`permutation_pvalue` of Spearman and of the top-``k`` overlap with
    ``within_layers=True``: heads relabelled within their layers) and
    ``"layer-null top-{k} overlap"``, the mean top-``k`` overlap over those relabellings (what
    layer structure alone gives; compare with ``"top-{k} overlap"``). They are NaN where
    undefined: maps with a single head per layer, or (within-layer Spearman) every layer of a
    map constant.

    Args:
        importance: ``(task, shots) -> importance map``.
        scans: ``score name -> induction score map``.
        k: the number of "top heads".
    """
    rows = []
    for (task_name, shots), imp in importance.items():
        for score, scan in scans.items():
            row = {"task": task_name, "shots": shots, "induction score": score,
                   "spearman": spearman(scan, imp), "kendall": kendall(scan, imp),
                   f"top-{k} overlap": top_k_overlap(scan, imp, k),
                   f"jaccard@{k}": jaccard(scan, imp, k),
                   "rbo (p=0.9)": rank_biased_overlap(scan, imp, p=0.9),
                   "hypergeom p": top_k_pvalue(scan, imp, k),
                   "permutation p": permutation_pvalue(
                       scan, imp, statistic="spearman", n_permutations=n_permutations,
                       seed=seed)}
            row |= _layer_controls(scan, imp, k=k, n_permutations=n_permutations, seed=seed)
            if scan.per_seed.shape[0] > 1 and imp.per_seed.shape[0] > 1:
                _, low, high = bootstrap_ci(scan, imp, statistic="spearman",
                                            n_resamples=n_resamples, seed=seed)
                row |= {"spearman ci low": low, "spearman ci high": high}
            rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# The registered analysis: a scan's scores against an importance map
# --------------------------------------------------------------------------------------------


@result_type
@dataclass(frozen=True, kw_only=True)
class OverlapTable:
    """Overlap statistics between score maps (:func:`overlap_table`'s rows).

    Attributes:
        data: one row per (task, shots, induction score).
        params: the settings (k, permutations, resamples, seed).
        model: the model's provenance.
    """

    data: pd.DataFrame = field(repr=False)
    params: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dataframe(self) -> pd.DataFrame:
        return self.data.copy()

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write as a folder (:func:`~mechicl.results.write_result`, ``overlap.parquet``)."""
        return write_result(path, kind="OverlapTable", params=self.params, model=self.model,
                            tables={"overlap": self.data})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "OverlapTable":
        """Read a result written by :meth:`save`, verified
        (:func:`~mechicl.results.read_result`)."""
        folder = read_result(path, "OverlapTable")
        return cls(data=folder.tables["overlap"], params=folder.params, model=folder.model)


def _inputs(job: Job) -> dict[str, Job]:
    # by name through the registry: the scan and importance modules need not be imported here
    given = job.input_options
    return {"scan": get_analysis("scan").job(job.model, given.get("scan"), seed=job.seed),
            "importance": get_analysis("importance").job(
                job.model, given.get("importance"), seed=job.seed, task=job.task,
                shots=job.shots)}


def _run(call: Call) -> OverlapTable:
    scan, importance = call.inputs["scan"], call.inputs["importance"]
    o = call.options
    k = top_k(importance.mean.numel(), percentile=o["top_k_percent"])
    table = overlap_table({(call.job.task, call.job.shots): importance}, scan.scores, k=k,
                          n_permutations=o["n_permutations"], n_resamples=o["n_resamples"],
                          seed=call.seed)
    params = {"task": call.job.task, "shots": call.job.shots, "k": k, **o, "seed": call.seed}
    return OverlapTable(data=table, params=params, model=importance.model)


def _check(options: dict[str, Any], tasks: Sequence[str], shots: Sequence[int]) -> None:
    if options["top_k_percent"] <= 0:
        raise ValueError(f"top_k_percent={options['top_k_percent']!r} must be in (0, 100]")


def _outputs(pairs: Sequence[tuple[Job, OverlapTable]], options: Mapping[str, Any]) -> Outputs:
    return Outputs(results={job_stem(job, "overlap"): table for job, table in pairs},
                   rows=[row for _, table in pairs for row in table.data.to_dict("records")])


OVERLAP = register_analysis(Analysis(
    name="overlap", help="overlap between induction scores and a task's head importance",
    run=_run, result_type=OverlapTable, per_task=True, needs_model=False, memory=None,
    inputs=_inputs, configured_by=("scan", "importance"), outputs=_outputs, check=_check,
    options=(
        Option(name="top_k_percent", type=float, default=10.0, minimum=0, maximum=100,
               help="the 'top heads': this percentage of all heads"),
        Option(name="n_permutations", type=int, default=1000, minimum=1,
               help="relabellings of the permutation p-value"),
        Option(name="n_resamples", type=int, default=1000, minimum=1,
               help="bootstrap resamples of Spearman's interval"),
    ),
))
