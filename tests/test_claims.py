"""The report's claims for the methods comparison and the causal check: each sentence carries its
numbers, says "not significant" when the test says so, and marks tasks that are not in-context."""

import math

import pandas as pd

from mechicl.report.claims import causal_claims, method_claims


def causal_row(**changes):
    row = {"subject": "antonyms", "shots": 1, "k": 5, "measure": "accuracy",
           "score": "prefix_matching", "unablated": 0.6, "top": 0.3, "random_mean": 0.55,
           "random_low": 0.5, "random_high": 0.6, "diff": -0.25, "diff_low": -0.35,
           "diff_high": -0.15, "p": 0.001, "draws": 20, "n": 50}
    return {**row, **changes}


def test_causal_claims_follow_the_interval():
    table = pd.DataFrame([
        causal_row(),  # top-k costs more accuracy than random: harmful, significant
        causal_row(subject="sentiment", diff=0.02, diff_low=-0.05, diff_high=0.09, p=0.6),
        causal_row(subject="repeated sequences", shots=math.nan, measure="later_copy_loss",
                   unablated=2.3, top=8.1, random_mean=3.3, diff=4.8, diff_low=4.5,
                   diff_high=5.1),
        causal_row(subject="boolq", diff=0.2, diff_low=0.1, diff_high=0.3, p=0.002),
    ])
    found = causal_claims(table, {"antonyms": "in-context", "sentiment": "in-context",
                                  "boolq": "at chance"})
    assert [c.significant for c in found] == [True, False, True, True]
    assert "more harmful than random heads" in found[0].text
    assert "-0.25 [-0.35, -0.15]" in found[0].text and found[0].estimate == -0.25
    assert "not significantly different" in found[1].text
    assert "later-copy loss from 2.30 to 8.10" in found[2].text
    assert "more harmful" in found[2].text and "repeated random sequences" in found[2].text
    assert "less harmful than random heads" in found[3].text
    assert "boolq is at chance: not evidence about ICL" in found[3].text
    assert "not evidence" not in found[0].text


def test_method_claims_say_not_significant():
    k = 4
    agreement = pd.DataFrame([
        {"task": "t", "shots": 1, "a": "bansal", "b": "ablation", "spearman": 0.1,
         "spearman |.|": 0.7, "within-layer spearman |.|": 0.2, "layer-null p": 0.3},
        {"task": "t", "shots": 1, "a": "bansal", "b": "michel", "spearman": 0.9,
         "spearman |.|": 0.9, "within-layer spearman |.|": 0.8, "layer-null p": 0.001}])
    induction = pd.DataFrame([
        {"task": "t", "shots": 1, "method": "ablation", "induction score": "prefix_matching",
         f"top-{k} overlap": 0.5, f"layer-null top-{k} overlap": 0.45, "hypergeom p": 0.01,
         "layer-null p (top-k)": 0.4}])
    found = method_claims(agreement, induction, k)
    assert [c.significant for c in found] == [False, True, False]
    assert "(not significant)" in found[0].text and "0.70" in found[0].text
    assert "not significant" not in found[1].text
    assert "2 of its top 4 heads" in found[2].text
    assert "not significant once layers are controlled" in found[2].text
    assert found[2].estimate == 0.5 and found[2].p == 0.4


def test_method_agreement_claims_carry_their_bootstrap_interval():
    row = {"task": "t", "shots": 1, "a": "bansal", "spearman": 0.5,
           "within-layer spearman |.|": 0.4, "layer-null p": 0.001}
    agreement = pd.DataFrame([
        {**row, "b": "michel", "spearman |.|": 0.87, "spearman |.| low": 0.84,
         "spearman |.| high": 0.88},
        {**row, "b": "ablation", "spearman |.|": 0.52, "spearman |.| low": 0.53,
         "spearman |.| high": 0.64},
        {**row, "b": "attribution", "spearman |.|": 0.5}])  # no pairing: no interval
    empty = pd.DataFrame(columns=["task", "shots", "method", "induction score", "top-4 overlap",
                                  "layer-null top-4 overlap", "hypergeom p",
                                  "layer-null p (top-k)"])
    found = method_claims(agreement, empty, 4)
    assert "Spearman of the magnitudes 0.87 [0.84, 0.88]," in found[0].text
    assert (found[0].low, found[0].high) == (0.84, 0.88)
    # an estimate outside its resampling interval is called biased, not given the interval
    assert "0.52 (bootstrap interval [0.53, 0.64] excludes it" in found[1].text
    assert "depends on the number of prompts" in found[1].text
    assert "Spearman of the magnitudes 0.50, within" in found[2].text
    assert math.isnan(found[2].low)


def test_agreement_claims_quote_the_median_interval():
    from mechicl.report.claims import agreement_claims

    pairs = pd.DataFrame([
        {"shots": 1, "task_a": a, "task_b": b, "spearman": rho, "layer-means spearman": 0.8,
         "within-layer spearman": 0.6, "layer-null p": p}
        for a, b, rho, p in [("x", "y", 0.9, 0.001), ("x", "z", 0.8, 0.2), ("y", "z", 0.85, 0.01)]])
    found = agreement_claims(pairs, ["x", "y"], {(1, "all tasks"): (0.8, 0.9),
                                                 (1, "in-context tasks"): (0.91, 0.95)})
    assert "median Spearman between two tasks' importance maps 0.85 [0.80, 0.90] (range" in (
        found[0].text)
    assert "0.90 (bootstrap interval [0.91, 0.95] excludes it" in found[1].text
    assert "2 of 3 pairs" in found[0].text and found[0].estimate == 2 / 3
    without = agreement_claims(pairs, ["x", "y"])
    assert "maps 0.85 (range" in without[0].text


# --------------------------------------------------------------------------------------------
# Issue 23's sections
# --------------------------------------------------------------------------------------------


def test_attribution_claims_pick_the_extremes_and_follow_their_intervals():
    from mechicl.report.claims import attribution_claims

    heads = pd.DataFrame([
        {"component": "head", "layer": 0, "head": 0, "dla_mean": 0.9, "dla_low": 0.5,
         "dla_high": 1.3, "exact_mean": 0.8, "n": 16},
        {"component": "head", "layer": 1, "head": 1, "dla_mean": -0.2, "dla_low": -0.6,
         "dla_high": 0.1, "exact_mean": -0.1, "n": 16},
        {"component": "head", "layer": 1, "head": 0, "dla_mean": 0.1, "dla_low": -0.1,
         "dla_high": 0.3, "exact_mean": 0.1, "n": 16},
        {"component": "ffn", "layer": 0, "head": -1, "dla_mean": -1.5, "dla_low": -2.0,
         "dla_high": -1.0, "exact_mean": -1.4, "n": 16},
    ])
    agreement = pd.DataFrame([{"spearman": 0.8, "spearman_low": 0.6, "spearman_high": 0.9,
                               "k": 2, "top_k_overlap": 1.0, "top_k_null_mean": 0.5,
                               "top_k_p": 0.3}])
    found = attribution_claims(heads, agreement)
    assert [c.subject for c in found] == ["head toward in-context", "head toward memorised",
                                          "FFN toward in-context", "FFN toward memorised",
                                          "dla vs exact"]
    assert "largest direct logit attribution" in found[0].text and "head 0.0" in found[0].text
    assert found[0].significant and "smallest" in found[1].text
    assert "+0.90 [+0.50, +1.30]" in found[0].text and "extreme of 3 heads" in found[0].text
    assert "head 1.1" in found[1].text and not found[1].significant
    assert "not significant" in found[1].text
    # one FFN: it is both extremes; its interval excludes 0, toward the memorised answer
    assert all("layer-0 FFN" in c.text and "favours the memorised answer" in c.text
               for c in found[2:4])
    assert not found[4].significant and "not significant" in found[4].text


def test_scaling_claims_are_holm_corrected_over_the_extreme_factors():
    from mechicl.report.claims import scaling_claims
    from mechicl.stats import holm

    rows = []
    for factor in (0.0, 1.0, 5.0):
        for condition, p in (("top_positive", 0.01), ("top_negative", 0.04), ("random", math.nan)):
            rows.append({"factor": factor, "condition": condition, "share": 0.5, "low": 0.4,
                         "high": 0.6, "random_mean": 0.45, "band_low": 0.4, "band_high": 0.5,
                         "draws": 20, "vs_random": 0.05, "vs_random_low": 0.01,
                         "vs_random_high": 0.09, "p": p * (1 + factor), "n": 50})
    found = scaling_claims(pd.DataFrame(rows))
    # factor 1 is the unchanged model and random rows are the null: four claims
    assert [c.subject for c in found] == ["top_positive x0", "top_negative x0",
                                          "top_positive x5", "top_negative x5"]
    expected = holm([0.01, 0.04, 0.06, 0.24])
    assert [c.p for c in found] == expected
    assert [c.significant for c in found] == [p < 0.05 for p in expected]
    assert found[0].text.startswith("Removing the outputs") and "Holm p = 0.040" in found[0].text
    assert found[2].text.startswith("Scaling by 5") and "not significant" in found[3].text


def test_determinant_claims_name_the_proxies_and_correct_over_determinants():
    from mechicl.report.claims import determinant_claims

    stats = pd.DataFrame([
        {"determinant": "country_rank", "outcome": "in_context", "spearman": -0.3, "low": -0.5,
         "high": -0.1, "p": 0.004, "n": 80, "proxy": True},
        {"determinant": "country_rank", "outcome": "margin", "spearman": -0.3, "low": -0.5,
         "high": -0.1, "p": 0.001, "n": 80, "proxy": True},
        {"determinant": "closed_book_logprob", "outcome": "in_context", "spearman": 0.1,
         "low": -0.1, "high": 0.3, "p": 0.03, "n": 80, "proxy": False},
        {"determinant": "city_tokens", "outcome": "in_context", "spearman": math.nan,
         "low": math.nan, "high": math.nan, "p": math.nan, "n": 80, "proxy": True},
    ])
    found = determinant_claims(stats)
    assert [c.subject for c in found] == ["country_rank", "closed_book_logprob", "city_tokens"]
    assert found[0].p == 0.008 and found[1].p == 0.03  # a test not made is not in the family
    assert [c.significant for c in found] == [True, True, False]
    assert "not tested, not significant" in found[2].text
    assert "(a tokenizer proxy of frequency)" in found[0].text
    assert "proxy" not in found[1].text


def test_determinants_with_too_few_events_or_no_interval_are_not_tested():
    """Gemma-3-270M answers 169 of 170 counterfactual prompts in context: one example answered
    from memory can relate to no determinant, and 37% of bootstrap resamples hold none."""
    from mechicl.report.claims import MIN_EVENTS, determinant_claims

    def row(det, events, low=-0.5, p=0.004, constant=0):
        return {"determinant": det, "outcome": "in_context", "spearman": -0.3, "low": low,
                "high": -0.1, "p": p, "n": 170, "proxy": False, "events": events,
                "constant_resamples": constant}

    stats = pd.DataFrame([row("a", MIN_EVENTS), row("b", MIN_EVENTS - 1, p=0.001),
                          row("c", 1, low=math.nan, constant=367),
                          row("d", 40, low=math.nan, constant=3), row("e", 40, p=0.02)])
    found = determinant_claims(stats)
    assert [c.significant for c in found] == [True, False, False, False, True]
    assert found[0].p == 0.008 and found[4].p == 0.02  # the family: the two tested only
    assert all(math.isnan(c.p) for c in found[1:4])
    assert "rarer value in only 9 of the n = 170 examples, fewer than 10" in found[1].text
    assert "rarer value in only 1 of" in found[2].text
    assert "constant in 3 bootstrap resamples" in found[3].text
    assert all("not tested, not significant" in c.text for c in found[1:4])


def test_sparsity_claims_say_where_groups_fall_and_the_verdict():
    from mechicl.report.claims import sparsity_claims

    common = {"method": "magnitude", "unpruned_low": 0.6, "unpruned_high": 0.8, "chance": 0.0,
              "above_chance": True, "tolerance": 0.05, "n": 50, "holds_to": 20.0,
              "holds_low": 10.0, "holds_high": 30.0}
    thresholds = pd.DataFrame([
        {**common, "group": "recall", "unpruned": 0.7, "falls_at": 30.0, "falls_low": 20.0,
         "falls_high": 40.0},
        {**common, "group": "in_context", "unpruned": 0.7, "falls_at": 100.0,
         "falls_low": 60.0, "falls_high": 100.0},
    ])
    comparison = pd.DataFrame([{"method": "magnitude", "difference": 70.0,
                                "difference_low": -10.0, "difference_high": 80.0,
                                "verdict": "inconclusive", "sentence": "magnitude: ..."}])
    found = sparsity_claims(thresholds, comparison)
    assert "falls at 30% [20%, 40%]" in found[0].text and found[0].significant
    assert "falls nowhere within the grid (not significant)" in found[1].text
    assert not found[1].significant
    assert found[2].text == "magnitude: ... Not significant." and not found[2].significant
    assert found[2].estimate == 70.0


def test_reuse_claims_correct_over_statistics_and_skip_roles_held_on_one_task():
    from mechicl.report.claims import reuse_claims
    from mechicl.stats import holm

    overlap = pd.DataFrame([
        {"quantity": f"activation {s}", "effect": "activation", "statistic": s,
         "k": 3 if s == "top_k" else None, "value": 0.6, "low": 0.3, "high": 0.9,
         "plain-null expected": 0.1, "layer-null expected": 0.3, "layer-null p": p}
        for s, p in (("top_k", 0.01), ("spearman", 0.02), ("within_layer_spearman", 0.5))])
    roles = pd.DataFrame([
        {"quantity": "shared name_mover", "role": "name_mover", "ioi count": 2,
         "colored_objects count": 3, "value": 1.0, "low": 0.0, "high": 2.0, "heads": "3.1",
         "layer-null expected": 0.2, "layer-null p": 0.04},
        {"quantity": "shared induction", "role": "induction", "ioi count": 0,
         "colored_objects count": 1, "value": 0.0, "low": 0.0, "high": 0.0, "heads": "",
         "layer-null expected": 0.0, "layer-null p": 1.0},
    ])
    found = reuse_claims(overlap, roles, ("ioi", "colored_objects"))
    assert [c.p for c in found[:3]] == holm([0.01, 0.02, 0.5])
    assert [c.significant for c in found[:3]] == [True, True, False]
    assert "top-3 overlap of |effect| 0.60 [0.30, 0.90]" in found[0].text
    assert "not significant" in found[2].text
    assert found[3].subject == "shared name_mover" and found[3].p == 0.04  # one role: no change
    assert "(3.1)" in found[3].text and found[3].significant
    assert found[4].subject == "roles not held on both" and "induction" in found[4].text


def test_reuse_claims_flag_an_estimate_outside_its_bootstrap_interval():
    from mechicl.report.claims import reuse_claims

    overlap = pd.DataFrame([{"quantity": "direct top_k", "effect": "direct", "statistic": "top_k",
                             "k": 27, "value": 0.70, "low": 0.48, "high": 0.67,
                             "plain-null expected": 0.1, "layer-null expected": 0.43,
                             "layer-null p": 0.001}])
    roles = pd.DataFrame(columns=["role", "a count", "b count", "layer-null p"])
    found = reuse_claims(overlap, roles, ("a", "b"))
    assert "0.70 (bootstrap interval [0.48, 0.67] excludes it" in found[0].text
    assert found[0].significant
