"""ICL validity: above chance, paired in-context gain, task classes, against literal loops and
scipy."""

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from mechicl.analyses.evaluation import EvalResult
from mechicl.analyses.icl import icl_gain, icl_validity, task_classes
from mechicl.stats import bootstrap_weights


def result(task: str, shots: int, correct: list[int], chance: float = 0.25,
           ids: list[str] | None = None) -> EvalResult:
    ids = ids or [f"e{i}" for i in range(len(correct))]
    preds = pd.DataFrame({"id": ids, "correct": [bool(c) for c in correct]})
    return EvalResult(task=task, shots=shots, accuracy=float(np.mean(correct)), ci_low=0.0,
                      ci_high=1.0, n=len(correct), chance=chance, predictions=preds)


def test_gain_is_paired_by_id_against_a_literal_loop():
    rng = np.random.default_rng(0)
    zero = (rng.random(80) < 0.4).astype(int)
    five = np.where(rng.random(80) < 0.3, 1, zero)
    ids = [f"e{i}" for i in range(80)]
    shuffled = rng.permutation(80)  # the k-shot result lists the examples in another order
    g = icl_gain(result("t", 0, zero.tolist(), ids=ids),
                 result("t", 5, five[shuffled].tolist(), ids=[ids[i] for i in shuffled]),
                 n_resamples=300, seed=1)
    assert g["gain"] == pytest.approx(five.mean() - zero.mean()) and g["n_paired"] == 80
    # the reference pairs in the sorted id order intersection() gives
    order = sorted(range(80), key=lambda i: ids[i])
    d = (five - zero)[order]
    means = [np.mean([d[i] for i in np.repeat(np.arange(80), w.astype(int))])
             for w in bootstrap_weights(80, 300, seed=1)]
    assert (g["gain_low"], g["gain_high"]) == pytest.approx(
        (np.quantile(means, 0.025), np.quantile(means, 0.975)))
    b10 = int(((five == 1) & (zero == 0)).sum())
    b01 = int(((five == 0) & (zero == 1)).sum())
    assert g["mcnemar_p"] == pytest.approx(scipy.stats.binomtest(b10, b10 + b01).pvalue)


def test_gain_errors():
    with pytest.raises(ValueError, match="different tasks"):
        icl_gain(result("a", 0, [1]), result("b", 5, [1]))
    with pytest.raises(ValueError, match="share no example"):
        icl_gain(result("a", 0, [1], ids=["x"]), result("a", 5, [1], ids=["y"]))


def test_validity_and_classes():
    n = 100
    rng = np.random.default_rng(3)
    base = (rng.random(n) < 0.3).astype(int)
    learn = np.where(rng.random(n) < 0.5, 1, base)  # ~0.65: a large gain over base
    recall = (rng.random(n) < 0.9).astype(int)
    chance = (rng.random(n) < 0.5).astype(int)
    below = (rng.random(n) < 0.05).astype(int)
    results = {("icl", 0): result("icl", 0, base.tolist()), ("icl", 5): result("icl", 5, learn.tolist()),
               ("rec", 0): result("rec", 0, recall.tolist()), ("rec", 5): result("rec", 5, recall.tolist()),
               ("coin", 0): result("coin", 0, chance.tolist(), chance=0.5),
               ("coin", 5): result("coin", 5, chance[::-1].tolist(), chance=0.5),
               ("obqa", 0): result("obqa", 0, below.tolist()), ("obqa", 5): result("obqa", 5, below.tolist())}
    v = icl_validity(results, n_resamples=500)
    row = v.set_index(["task", "shots"])
    assert row.loc[("icl", 5), "gain_significant"] and row.loc[("icl", 5), "gain"] > 0.2
    assert np.isnan(row.loc[("icl", 0), "gain"])
    assert not row.loc[("rec", 5), "gain_significant"] and row.loc[("rec", 5), "gain"] == 0
    assert row.loc[("obqa", 0), "below_chance"] and not row.loc[("coin", 0), "above_chance"]
    assert row.loc[("rec", 0), "above_chance"]
    classes = task_classes(v).set_index("task")["class"].to_dict()
    assert classes == {"coin": "at chance", "icl": "in-context", "obqa": "below chance",
                       "rec": "recall only"}


def test_holm_correction_against_the_definition():
    from mechicl.stats import holm

    p = [0.01, 0.04, 0.03, 0.2]
    # Holm: sorted p_(i) * (m - i + 1), running maximum, capped at 1
    expected = {0: 0.04, 2: 0.09, 1: 0.09, 3: 0.2}
    assert holm(p) == pytest.approx([expected[i] for i in range(4)])
    # a test not made (NaN) is not counted in the family
    assert holm([0.01, float("nan"), 0.03])[::2] == pytest.approx([0.02, 0.03])
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # 2 x 0.8 capped at 1; monotone


def test_a_task_without_a_zero_shot_result_is_untested():
    results = {("t", 5): result("t", 5, [1] * 40)}
    classes = task_classes(icl_validity(results, n_resamples=50))
    assert classes["class"].tolist() == ["untested"]


def test_claims_say_not_significant_and_carry_their_numbers():
    from mechicl.report.claims import icl_claims

    rng = np.random.default_rng(5)
    recall = (rng.random(60) < 0.9).astype(int)
    results = {("rec", 0): result("rec", 0, recall.tolist()),
               ("rec", 5): result("rec", 5, recall.tolist()),
               ("solo", 5): result("solo", 5, [1] * 30)}
    v = icl_validity(results, n_resamples=200)
    claims = {c.subject: c for c in icl_claims(v, task_classes(v))}
    assert "is not significant" in claims["rec"].text and not claims["rec"].significant
    assert claims["rec"].estimate == 0.0 and claims["rec"].low <= 0 <= claims["rec"].high
    assert "not tested" in claims["solo"].text and claims["solo"].statistic == "untested"
