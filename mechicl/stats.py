"""Statistics for comparing accuracies: intervals over prompts and paired tests.

Every comparison mechicl reports is *paired*: two conditions (unpruned vs pruned, 0-shot vs
k-shot, a ranking vs random orders) are scored on the same prompts, so their per-prompt
differences carry the comparison and prompt difficulty cancels. Three tools:

- :func:`wilson_interval`: the 95% Wilson score interval of one accuracy (binomial).
- :func:`paired_bootstrap`: the percentile bootstrap over prompts (Efron & Tibshirani 1993,
  ch. 13) of the mean per-prompt difference between conditions, many conditions at once (one
  resampling of the prompts shared by all of them, so intervals of different points of a
  curve are computed from the same resamples), with a one-sided bootstrap p-value.
- :func:`mcnemar_exact`: the exact McNemar test (two-sided binomial test on the discordant
  pairs) of two paired 0/1 outcomes.

:func:`holm` corrects a family of p-values for multiple comparisons (Holm 1979).

:func:`removable_fraction` combines them into the "fraction of heads removable" of a pruning
curve: the largest share removed such that at it, and at every smaller share, the accuracy drop
from the unpruned model is below a tolerance by a one-sided paired bootstrap test.

Axis names: ``condition example resample``.
"""

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from jaxtyping import Float, Shaped

__all__ = ["Bootstrap", "Removable", "bootstrap_weights", "holm", "mcnemar_exact",
           "paired_bootstrap", "removable_fraction", "wilson_interval"]

Array = np.ndarray


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default).

    >>> [round(x, 3) for x in wilson_interval(8, 10)]
    [0.49, 0.943]
    """
    if n <= 0:
        return (float("nan"), float("nan"))
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_weights(n: int, n_resamples: int, seed: int = 0) -> Float[Array, "resample example"]:
    """How often each of ``n`` examples is drawn in each of ``n_resamples`` bootstrap resamples
    (multinomial counts, rows sum to ``n``), seeded: ``numpy.random.default_rng([seed, n])``.

    A mean over a resample is ``weights @ x / n``: no ``[resample, n]`` gather of the data.

    >>> w = bootstrap_weights(5, 3, seed=1)
    >>> w.shape, w.sum(axis=1).tolist()
    ((3, 5), [5.0, 5.0, 5.0])
    """
    if n < 1 or n_resamples < 1:
        raise ValueError(f"n={n} and n_resamples={n_resamples} must both be >= 1")
    rng = np.random.default_rng([seed, n])
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_resamples).astype(np.float64)


@dataclass(frozen=True, kw_only=True)
class Bootstrap:
    """Percentile bootstrap of mean per-example differences, one value per condition.

    Attributes:
        estimate: the observed mean difference, ``[condition]``.
        low, high: the percentile interval at ``level`` (two-sided), ``[condition]``.
        p_greater: one-sided bootstrap p-value of "the mean difference is <= ``threshold``"
            against "it is greater": the share of resamples whose mean is <= ``threshold``
            (add-one smoothed, so never 0), ``[condition]``.
        p_less: the same for "less than ``threshold``", ``[condition]``.
        n: examples; n_resamples: resamples; level: interval coverage; threshold: tested value.
        draws: the resampled means ``[condition, resample]`` (for derived statistics).
    """

    estimate: Float[Array, " condition"]
    low: Float[Array, " condition"]
    high: Float[Array, " condition"]
    p_greater: Float[Array, " condition"]
    p_less: Float[Array, " condition"]
    n: int
    n_resamples: int
    level: float
    threshold: float
    draws: Float[Array, "condition resample"]

    @property
    def p_two_sided(self) -> Float[Array, " condition"]:
        """Two-sided bootstrap p-value of "the mean difference equals ``threshold``": twice the
        smaller one-sided p-value, at most 1.

        >>> r = paired_bootstrap(np.array([1.0, 2.0, 3.0]), seed=0)  # every resample above 0
        >>> round(float(r.p_two_sided[0]) * (r.n_resamples + 1))  # 2 x (1 + 0) / (1 + 2000)
        2
        """
        return np.minimum(1.0, 2 * np.minimum(self.p_greater, self.p_less))


def paired_bootstrap(
    a: Shaped[Array, "*#condition example"], b: Shaped[Array, "*#condition example"] | None = None,
    *, n_resamples: int = 2000, seed: int = 0, level: float = 0.95, threshold: float = 0.0,
) -> Bootstrap:
    """Percentile bootstrap over examples of ``mean(a - b)`` (``mean(a)`` without ``b``).

    ``a`` and ``b`` hold per-example values (e.g. 0/1 correctness) of the same examples under two
    conditions; leading axes are conditions (``b`` broadcasts, e.g. one unpruned row against
    every pruned row). All conditions share the same resamples of the examples.

    Args:
        a, b: per-example values, the example axis last.
        n_resamples: bootstrap resamples.
        seed: seeds the resamples (:func:`bootstrap_weights`).
        level: two-sided coverage of the interval.
        threshold: the value the one-sided p-values test against.

    Returns:
        A :class:`Bootstrap`, its arrays shaped like the leading axes, flattened.

    >>> r = paired_bootstrap(np.array([1, 1, 1, 0, 1, 1, 0, 1.0]), np.zeros(8), seed=0)
    >>> round(float(r.estimate[0]), 3), bool(r.low[0] > 0), bool(r.p_greater[0] < 0.05)
    (0.75, True, True)
    """
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1)")
    x = np.asarray(a, dtype=np.float64)
    if b is not None:
        x = x - np.asarray(b, dtype=np.float64)
    if x.ndim == 0 or x.shape[-1] < 1:
        raise ValueError(f"need at least one example on the last axis, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("per-example values contain NaN or inf")
    x = x.reshape(-1, x.shape[-1])  # [condition, example]
    n = x.shape[-1]
    w = bootstrap_weights(n, n_resamples, seed)  # [resample, example]
    draws = x @ w.T / n  # [condition, resample]
    alpha = (1 - level) / 2
    low, high = np.quantile(draws, [alpha, 1 - alpha], axis=-1)
    # 1e-12: resampled means of 0/1 data hit the threshold exactly; do not split hairs by rounding
    p_greater = (1 + (draws <= threshold + 1e-12).sum(-1)) / (1 + n_resamples)
    p_less = (1 + (draws >= threshold - 1e-12).sum(-1)) / (1 + n_resamples)
    return Bootstrap(estimate=x.mean(-1), low=low, high=high, p_greater=p_greater,
                     p_less=p_less, n=n, n_resamples=n_resamples, level=level,
                     threshold=threshold, draws=draws)


def mcnemar_exact(a: Shaped[Array, "..."], b: Shaped[Array, "..."]) -> float:
    """Exact McNemar p-value (two-sided) that two paired 0/1 outcomes have the same success rate:
    the binomial test of the discordant pairs (``a`` right and ``b`` wrong, vs the reverse)
    against p = 1/2. 1.0 without discordant pairs.

    >>> round(mcnemar_exact(np.array([1, 1, 1, 1, 1, 0]), np.array([0, 0, 0, 0, 0, 0])), 4)
    0.0625
    """
    x, y = np.asarray(a), np.asarray(b)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"need two 1-D outcome vectors of one length, got {x.shape} and "
                         f"{y.shape}")
    if not (np.isin(x, (0, 1)).all() and np.isin(y, (0, 1)).all()):
        raise ValueError("McNemar's test needs 0/1 outcomes")
    b10 = int(((x == 1) & (y == 0)).sum())
    b01 = int(((x == 0) & (y == 1)).sum())
    m = b10 + b01
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(b10, b01) + 1)) / 2.0 ** m
    return min(1.0, 2.0 * tail)


@dataclass(frozen=True, kw_only=True)
class Removable:
    """The share of units (heads, FFNs) removable from a pruning curve.

    Attributes:
        removable: the largest share such that at it and every smaller share the accuracy drop
            from the unpruned model is below ``tolerance`` by a one-sided paired bootstrap test
            at ``alpha`` (0 when even the first pruned share fails).
        estimate: the same rule on the observed drops, without the test.
        low, high: the percentile interval (``level``) of ``estimate`` over bootstrap resamples
            of the prompts.
        tolerance, alpha, level: the rule's settings.
    """

    removable: float
    estimate: float
    low: float
    high: float
    tolerance: float
    alpha: float
    level: float

    def to_dict(self) -> dict[str, Any]:
        return {"removable": self.removable, "estimate": self.estimate, "low": self.low,
                "high": self.high, "tolerance": self.tolerance, "alpha": self.alpha,
                "level": self.level}


def _prefix_max(ok: np.ndarray, shares: np.ndarray) -> Any:
    """Per column of ``ok`` ``[share, ...]``: the largest share such that every share up to it
    is ok (0.0 when none)."""
    run = np.cumprod(ok, axis=0).astype(bool)  # [share, ...]: ok so far
    return np.where(run, shares.reshape(-1, *([1] * (ok.ndim - 1))), 0.0).max(axis=0)  # [...]


def removable_fraction(
    shares: Shaped[Array, " share"], correct: Shaped[Array, "share example"],
    unpruned: Shaped[Array, " example"], *, tolerance: float = 0.05, alpha: float = 0.05,
    level: float = 0.90, n_resamples: int = 2000, seed: int = 0,
) -> Removable:
    """The largest share of units removable with an accuracy drop below ``tolerance``.

    Args:
        shares: the pruned shares (e.g. percents), ascending, all > 0.
        correct: per-example correctness (or a mean over random draws) at each share.
        unpruned: per-example correctness of the unpruned model on the same examples.
        tolerance: the accuracy drop (a proportion) that still counts as "no loss".
        alpha: level of the one-sided test "drop >= tolerance" that must be rejected.
        level: coverage of the bootstrap interval of the estimate.
        n_resamples, seed: the bootstrap (:func:`paired_bootstrap`).

    >>> shares = np.array([10.0, 20.0, 30.0])
    >>> unpruned = np.ones(40)
    >>> correct = np.stack([np.ones(40), np.ones(40), np.zeros(40)])
    >>> r = removable_fraction(shares, correct, unpruned)
    >>> r.removable, r.estimate
    (20.0, 20.0)
    """
    s = np.asarray(shares, dtype=np.float64)
    c = np.asarray(correct, dtype=np.float64)
    if s.ndim != 1 or c.shape[:1] != s.shape or (np.diff(s) <= 0).any() or (s <= 0).any():
        raise ValueError(f"shares must be ascending and > 0, one per row of correct; got shares "
                         f"{s.tolist()} and correct of shape {c.shape}")
    drop = paired_bootstrap(np.asarray(unpruned)[None], c, n_resamples=n_resamples, seed=seed,
                            level=level, threshold=tolerance)  # unpruned - pruned
    tested = _prefix_max(drop.p_less < alpha, s)
    estimate = _prefix_max(drop.estimate < tolerance, s)
    per_resample = _prefix_max(drop.draws < tolerance, s)  # [resample]
    low, high = np.quantile(per_resample, [(1 - level) / 2, (1 + level) / 2])
    return Removable(removable=float(tested), estimate=float(estimate), low=float(low),
                     high=float(high), tolerance=tolerance, alpha=alpha, level=level)


def holm(p: list[float]) -> list[float]:
    """Holm-adjusted p-values (Holm 1979; step-down, monotone, capped at 1): a family of tests
    controls the family-wise error rate at alpha by comparing each adjusted value with alpha.
    NaN values (tests not made) stay NaN and do not count.

    >>> holm([0.01, 0.04, 0.03])
    [0.03, 0.06, 0.06]
    >>> holm([0.2, float("nan")])
    [0.2, nan]
    """
    values = np.asarray(p, dtype=float)
    out = np.full(values.shape, np.nan)
    idx = np.flatnonzero(~np.isnan(values))
    running = 0.0
    for rank, i in enumerate(idx[np.argsort(values[idx], kind="stable")]):
        running = max(running, min(1.0, (len(idx) - rank) * values[i]))
        out[i] = running
    return [float(v) for v in out]
