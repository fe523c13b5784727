"""Is a task in-context learning? Above-chance accuracy and the paired in-context gain.

An importance map of a task says which heads matter *for that task*; it says something about
in-context learning only if the model's accuracy depends on the demonstrations. Per task and
shot count this module tests

- **above chance**: the 95% Wilson interval's lower bound exceeds chance (below chance: its
  upper bound is under chance, which usually means a scoring problem such as unnormalised
  choices of different lengths);
- **in-context gain**: k-shot minus 0-shot accuracy on the *same* evaluation examples (paired
  by example id): a paired percentile-bootstrap interval and the exact McNemar test, Holm-
  corrected over the task's k > 0.

and classifies the task:

- ``in-context``: some k > 0 is above chance with a significant positive gain;
- ``below chance``: otherwise, some shot count is significantly below chance;
- ``at chance``: otherwise, no shot count is above chance;
- ``recall only``: above chance, but no significant gain from demonstrations (the model knows
  the answers without them; its maps measure recall, not ICL);
- ``untested``: no 0-shot result or no k > 0 result, so the gain cannot be tested.

Axis names: ``example``.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from mechicl.analyses.evaluation import EvalResult
from mechicl.stats import holm, mcnemar_exact, paired_bootstrap, wilson_interval

__all__ = ["CLASSES", "icl_gain", "icl_validity", "task_classes"]

CLASSES: tuple[str, ...] = ("in-context", "recall only", "at chance", "below chance",
                            "untested")
"""The classes of :func:`task_classes`, in the order a report lists them."""


def _correct_by_id(result: EvalResult) -> pd.Series:
    p = result.predictions
    if "id" not in p or "correct" not in p:
        raise ValueError(f"{result.task} {result.shots}-shot: predictions need 'id' and "
                         f"'correct' columns, have {sorted(p.columns)}")
    return pd.Series(p["correct"].astype(int).to_numpy(), index=p["id"].astype(str))


def icl_gain(zero: EvalResult, k_shot: EvalResult, *, n_resamples: int = 2000, seed: int = 0,
             level: float = 0.95) -> dict[str, Any]:
    """k-shot minus 0-shot accuracy on the examples both evaluated (paired by example id).

    Returns:
        ``gain`` (mean per-example difference), ``gain_low``, ``gain_high`` (paired percentile
        bootstrap at ``level``), ``mcnemar_p`` (exact, two-sided), ``n_paired``.

    Raises:
        ValueError: the two results share no example, or are of different tasks.
    """
    if zero.task != k_shot.task:
        raise ValueError(f"cannot pair {zero.task!r} with {k_shot.task!r}: different tasks")
    a, b = _correct_by_id(k_shot), _correct_by_id(zero)
    common = a.index.intersection(b.index).sort_values()  # resamples independent of row order
    if not len(common):
        raise ValueError(f"{zero.task}: the {zero.shots}-shot and {k_shot.shots}-shot results "
                         "share no example id; evaluate both on the same seeded examples")
    x, y = a.loc[common].to_numpy(), b.loc[common].to_numpy()
    boot = paired_bootstrap(x, y, n_resamples=n_resamples, seed=seed, level=level)
    return {"gain": float(boot.estimate[0]), "gain_low": float(boot.low[0]),
            "gain_high": float(boot.high[0]), "mcnemar_p": mcnemar_exact(x, y),
            "n_paired": len(common)}


def icl_validity(results: Mapping[tuple[str, int], EvalResult], *, alpha: float = 0.05,
                 n_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per (task, shots): accuracy, Wilson interval, chance, above / below chance, and (for
    k > 0, when the task has a 0-shot result) the paired in-context gain with its Holm-corrected
    McNemar p-value.

    Args:
        results: ``(task, shots) -> EvalResult``.
        alpha: significance level of the gain tests.
        n_resamples, seed: the bootstrap of the gain intervals.

    Returns:
        Columns ``task, shots, n, accuracy, ci_low, ci_high, chance, above_chance,
        below_chance, gain, gain_low, gain_high, mcnemar_p, holm_p, gain_significant``.
    """
    rows = []
    for (task, shots), r in results.items():
        correct = int(_correct_by_id(r).sum())
        low, high = wilson_interval(correct, r.n)
        rows.append({"task": task, "shots": shots, "n": r.n, "accuracy": correct / r.n,
                     "ci_low": low, "ci_high": high, "chance": r.chance,
                     "above_chance": low > r.chance, "below_chance": high < r.chance,
                     "gain": np.nan, "gain_low": np.nan, "gain_high": np.nan,
                     "mcnemar_p": np.nan, "holm_p": np.nan, "gain_significant": False})
        if shots > 0 and (task, 0) in results:
            rows[-1].update(icl_gain(results[(task, 0)], r, n_resamples=n_resamples, seed=seed))
            rows[-1].pop("n_paired")
    table = pd.DataFrame(rows)
    for _, g in table[table.mcnemar_p.notna()].groupby("task"):
        table.loc[g.index, "holm_p"] = holm(g.mcnemar_p.tolist())
    table["gain_significant"] = (table.holm_p < alpha) & table.holm_p.notna()
    return table.sort_values(["task", "shots"], kind="stable").reset_index(drop=True)


def task_classes(validity: pd.DataFrame) -> pd.DataFrame:
    """One row per task of an :func:`icl_validity` table: its class (:data:`CLASSES`) and the
    evidence (the shot count and gain behind ``in-context``).

    >>> v = pd.DataFrame({"task": ["a", "a", "b", "b"], "shots": [0, 5, 0, 5],
    ...                   "above_chance": [False, True, True, True],
    ...                   "below_chance": [False] * 4, "gain": [np.nan, 0.3, np.nan, 0.0],
    ...                   "gain_low": [np.nan, 0.2, np.nan, -0.1],
    ...                   "gain_high": [np.nan, 0.4, np.nan, 0.1],
    ...                   "holm_p": [np.nan, 0.001, np.nan, 1.0],
    ...                   "gain_significant": [False, True, False, False]})
    >>> task_classes(v)[["task", "class"]].values.tolist()
    [['a', 'in-context'], ['b', 'recall only']]
    """
    rows = []
    for task, g in validity.groupby("task", sort=False):
        gained = g[g.gain_significant & (g.gain > 0) & g.above_chance]
        if gained.shape[0]:
            cls = "in-context"
        elif not (g.shots == 0).any() or not (g.shots > 0).any():
            cls = "untested"  # no 0-shot baseline, or no k > 0: no gain to test
        elif g.below_chance.any():
            cls = "below chance"
        elif not g.above_chance.any():
            cls = "at chance"
        else:
            cls = "recall only"
        best = gained.loc[gained.gain.idxmax()] if len(gained) else None
        rows.append({"task": task, "class": cls,
                     "shots": None if best is None else int(best.shots),
                     "gain": np.nan if best is None else float(best.gain),
                     "gain_low": np.nan if best is None else float(best.gain_low),
                     "gain_high": np.nan if best is None else float(best.gain_high),
                     "holm_p": np.nan if best is None else float(best.holm_p),
                     "below_chance_shots": [int(k) for k in g.shots[g.below_chance]]})
    return pd.DataFrame(rows)
