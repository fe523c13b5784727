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
