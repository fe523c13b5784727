"""Pruning curves: the right heads / FFNs are removed, and every row equals a plain evaluation of
the model under that row's mask."""

import math

import numpy as np
import pandas as pd
import pytest
import reference_importance as ref  # tests/reference_importance.py: tasks and plain loops
import torch

import mechicl
import mechicl.analyses.pruning
import mechicl.stats
from mechicl.analyses.pruning import PruneCurve, prune_curve, prune_order, pruning_mask
from mechicl.model.masks import ActivationMeans, Mask
from mechicl.results import HeadScores

SHOTS, N = 1, 10


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task():
    return ref.copy_task(30)


def scores_for(model, seed: int = 0) -> torch.Tensor:
    """Distinct pseudo-importance scores ``[layer, head]``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(model.n_layers, model.n_heads, generator=gen, dtype=torch.float64)


def gold_logprob(result: mechicl.EvalResult) -> float:
    rows = result.predictions
    return float(np.mean([ll[g] for ll, g in zip(rows["loglik"], rows["gold"], strict=True)]))


def row(curve: PruneCurve, **where) -> pd.Series:
    data = curve.data
    selected = np.ones(len(data), dtype=bool)
    for key, value in where.items():
        selected &= (data[key] == value).to_numpy()
    assert selected.sum() == 1, (where, data)
    return data[selected].iloc[0]


# --------------------------------------------------------------------------------------------
# Orders and masks
# --------------------------------------------------------------------------------------------


def test_prune_order_is_ascending_and_stable():
    scores = torch.tensor([[0.5, 0.1, 0.5], [0.1, 0.9, 0.5]])
    assert prune_order(scores).tolist() == [1, 3, 0, 2, 5, 4]
    assert prune_order(torch.zeros(2, 3)).tolist() == list(range(6))
    assert prune_order(torch.tensor([3.0, 1.0, 2.0])).tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match="NaN"):
        prune_order(torch.tensor([[1.0, float("nan")]]))


@pytest.mark.parametrize("shape", [(2, 4), (3, 4), (5, 3)])
def test_pruning_mask_removes_floor_of_percent(shape):
    n_layers, n_heads = shape
    total = n_layers * n_heads
    gen = torch.Generator().manual_seed(total)
    scores = torch.randint(0, 3, shape, generator=gen).double()  # many ties
    order = prune_order(scores)
    ffn_scores = torch.tensor([2.0, 1.0, 2.0, 0.0, 1.0][:n_layers])
    ffn_order = prune_order(ffn_scores)
    for percent in (0, 10, 12.5, 25, 30, 33, 50, 66.7, 90, 99, 100):
        mask = pruning_mask(shape, head_order=order, head_percent=float(percent),
                            ffn_order=ffn_order, ffn_percent=float(percent))
        k = math.floor(percent * total / 100 + 1e-9)
        removed = {(int(i) // n_heads, int(i) % n_heads) for i in order[:k]}
        assert set(mask.removed_heads) == removed and len(mask.removed_heads) == k
        # least important first; among equal scores the lower flat index goes first
        want = sorted(range(total), key=lambda i: (float(scores.flatten()[i]), i))[:k]
        assert sorted(mask.removed_heads) == sorted((i // n_heads, i % n_heads) for i in want)
        kept = scores.flatten()[order[k:]]
        if k and kept.numel():
            assert scores.flatten()[order[:k]].max() <= kept.min()
        k_ffn = math.floor(percent * n_layers / 100 + 1e-9)
        assert mask.removed_ffns == sorted(ffn_order[:k_ffn].tolist())
        assert bool(((mask.heads == 0) | (mask.heads == 1)).all())


def test_pruning_mask_errors():
    with pytest.raises(ValueError, match="percent=110"):
        pruning_mask((2, 4), head_order=torch.arange(8), head_percent=110.0)
    with pytest.raises(ValueError, match="percent=-5"):
        pruning_mask((2, 4), head_order=torch.arange(8), head_percent=-5.0, ffn_percent=0.0)
    with pytest.raises(ValueError, match="head_order of 8"):
        pruning_mask((2, 4), head_percent=50.0, ffn_percent=0.0)
    with pytest.raises(ValueError, match="head_order of 8"):
        pruning_mask((2, 4), head_order=torch.arange(6), head_percent=50.0, ffn_percent=0.0)
    with pytest.raises(ValueError, match="ffn_order of 2"):
        pruning_mask((2, 4), head_percent=0.0, ffn_percent=50.0)
    # nothing removed: no order needed
    assert pruning_mask((2, 4), head_percent=10.0, ffn_percent=0.0).is_identity


def test_pruning_mask_defaults_pass_the_type_checker():
    mask = pruning_mask((2, 4), head_order=torch.arange(8), head_percent=50.0)
    assert mask.removed_heads == [(0, 0), (0, 1), (0, 2), (0, 3)]


# --------------------------------------------------------------------------------------------
# Curves = evaluate under each row's mask
# --------------------------------------------------------------------------------------------


def test_curve_rows_equal_evaluate_under_their_masks(tiny_gpt2, task):
    model = tiny_gpt2
    scores = scores_for(model)
    percents = [0, 25, 50, 75]
    curve = prune_curve(model, task, shots=SHOTS, n=N, head_rankings={"mine": scores},
                        head_percents=percents, random_draws=0)
    assert len(curve.data) == len(percents)
    assert curve.data["heads_removed"].tolist() == [0, 2, 4, 6]
    assert set(curve.data["head_ranking"]) == {"mine"} and set(curve.data["ffn_ranking"]) == {"none"}
    plain = mechicl.evaluate(model, task, shots=SHOTS, n=N)
    zero = row(curve, head_percent=0)
    assert zero["accuracy"] == plain.accuracy == curve.baseline
    assert zero["gold_logprob"] == pytest.approx(gold_logprob(plain), abs=1e-5)
    assert (zero["ci_low"], zero["ci_high"]) == pytest.approx((plain.ci_low, plain.ci_high))
    assert zero["n"] == N and zero["chance"] == pytest.approx(plain.chance)
    order = prune_order(scores)
    for percent in (25, 75):
        mask = pruning_mask(model, head_order=order, head_percent=float(percent),
                            ffn_percent=0.0)
        assert len(mask.removed_heads) == percent * 8 // 100
        masked = mechicl.evaluate(model, task, shots=SHOTS, n=N, mask=mask)
        got = row(curve, head_percent=percent)
        assert got["accuracy"] == masked.accuracy
        assert got["gold_logprob"] == pytest.approx(gold_logprob(masked), abs=1e-5)
        i = int(np.flatnonzero(curve.data.head_percent == percent)[0])
        assert curve.correct[i].tolist() == masked.predictions["correct"].astype(int).tolist()
    assert curve.correct[0].tolist() == plain.predictions["correct"].astype(int).tolist()
    assert curve.data["gold_logprob"].nunique() == len(percents)  # every row differs
    assert curve.params["distinct_masks"] == len(percents)
    assert curve.params["head_rankings"] == ["mine"]
    assert curve.params["prompt_ids"] == plain.predictions["id"].tolist()


def test_ranking_from_head_scores_and_prompts(tiny_gpt2, task):
    """A HeadScores ranking is named after its score and task; explicit prompts work too."""
    model = tiny_gpt2
    prompts = mechicl.build_prompts(task, shots=SHOTS, n=N)
    imp = mechicl.head_importance(model, prompts=prompts[:4], method="bansal")
    curve = prune_curve(model, prompts=prompts, head_rankings=imp, head_percents=[0, 50],
                        random_draws=0)
    assert set(curve.data["head_ranking"]) == {"importance_bansal:custom"}
    mask = pruning_mask(model, head_order=prune_order(imp.mean), head_percent=50.0,
                        ffn_percent=0.0)
    masked = mechicl.evaluate(model, task, shots=SHOTS, n=N, mask=mask)
    assert row(curve, head_percent=50)["accuracy"] == masked.accuracy
    assert curve.data["task"].tolist() == ["custom", "custom"]


def test_mean_ablation_defaults_to_the_evaluated_prompts_means(tiny_gpt2, task):
    """ablation="mean" without means replaces removed heads and FFNs by their mean over the
    evaluated prompts (each with its gold answer): rows equal evaluate under masks built from
    hand-computed means (the CLI's `prune --ablation mean` failed before: no means)."""
    model = tiny_gpt2
    prompts = mechicl.build_prompts(task, shots=SHOTS, n=N)
    scores = scores_for(model)
    curve = prune_curve(model, prompts=prompts, head_rankings={"mine": scores},
                        ffn_rankings={"mine": scores.sum(-1)}, head_percents=[0, 50],
                        ffn_percents=[0, 50], random_draws=0, ablation="mean")
    batch = mechicl.analyses.evaluation.answer_batch(model, prompts)
    z, mlp = ref.mean_activations_reference(
        model, [batch.tokens[i, :n] for i, n in enumerate(batch.attention_mask.sum(-1).tolist())])
    means = ActivationMeans(z=z.float(), mlp_out=mlp.float(), n_tokens=0)
    zeroed = prune_curve(model, prompts=prompts, head_rankings={"mine": scores},
                         ffn_rankings={"mine": scores.sum(-1)}, head_percents=[50],
                         ffn_percents=[50], random_draws=0)
    for hp, fp in ((50, 0), (0, 50), (50, 50)):
        mask = pruning_mask(model, head_order=prune_order(scores), head_percent=hp,
                            ffn_order=prune_order(scores.sum(-1)), ffn_percent=fp,
                            ablation="mean", means=means)
        masked = mechicl.evaluate(model, prompts=prompts, task=task, mask=mask)
        got = curve.data[(curve.data.head_percent == hp) & (curve.data.ffn_percent == fp)]
        assert got["accuracy"].item() == masked.accuracy
        assert got["gold_logprob"].item() == pytest.approx(gold_logprob(masked), abs=1e-4)
    # mean and zero ablation are different masks (the gold log-probabilities differ)
    assert curve.params["ablation"] == "mean"
    assert (row(curve, head_percent=50, ffn_percent=50)["gold_logprob"]
            != zeroed.data["gold_logprob"].item())


def test_random_draws_are_reproducible_and_distinct(tiny_gpt2, task):
    model = tiny_gpt2
    kwargs = dict(shots=SHOTS, n=N, head_percents=[0, 50], random_draws=3)
    first = prune_curve(model, task, **kwargs)
    again = prune_curve(model, task, **kwargs)
    pd.testing.assert_frame_equal(first.data, again.data)
    assert first.data["head_ranking"].tolist() == ["random"] * 6
    assert sorted(first.data["draw"].tolist()) == [0, 0, 1, 1, 2, 2]
    # three different random masks at 50% (duplicates would have been merged), one identity
    assert first.params["distinct_masks"] == 4
    half = first.data[first.data["head_percent"] == 50]
    assert half["gold_logprob"].nunique() == 3
    assert first.data[first.data["head_percent"] == 0]["accuracy"].nunique() == 1
    other_seed = prune_curve(model, task, **{**kwargs, "random_draws": 1}, seed=1)
    assert other_seed.data["gold_logprob"].iloc[-1] not in set(half["gold_logprob"])


def test_combined_head_and_ffn_grid(tiny_llama, task):
    model = tiny_llama
    head_scores = scores_for(model, seed=1)
    ffn_scores = torch.tensor([0.3, 0.1], dtype=torch.float64)
    curve = prune_curve(model, task, shots=SHOTS, n=N, head_rankings={"h": head_scores},
                        ffn_rankings={"f": ffn_scores}, head_percents=[0, 50],
                        ffn_percents=[0, 50], random_draws=0)
    assert len(curve.data) == 4
    assert curve.params["distinct_masks"] == 4
    for hp in (0, 50):
        for fp in (0, 50):
            got = row(curve, head_percent=hp, ffn_percent=fp)
            assert got["heads_removed"] == hp * 8 // 100 and got["ffns_removed"] == fp * 2 // 100
            mask = pruning_mask(model, head_order=prune_order(head_scores), head_percent=float(hp),
                                ffn_order=prune_order(ffn_scores), ffn_percent=float(fp))
            assert mask.removed_ffns == ([1] if fp else [])
            masked = mechicl.evaluate(model, task, shots=SHOTS, n=N, mask=mask)
            assert got["accuracy"] == masked.accuracy
            assert got["gold_logprob"] == pytest.approx(gold_logprob(masked), abs=1e-5)
    # With random rankings for both, draw d of heads pairs with draw d of FFNs only.
    rand = prune_curve(model, task, shots=SHOTS, n=N, head_rankings={"h": head_scores},
                       ffn_rankings={"f": ffn_scores}, head_percents=[0, 50],
                       ffn_percents=[0, 50], random_draws=2)
    pairs = rand.data[["head_ranking", "ffn_ranking", "draw"]].drop_duplicates()
    assert len(pairs) == 7 and len(rand.data) == 7 * 4
    both_random = pairs[(pairs.head_ranking == "random") & (pairs.ffn_ranking == "random")]
    assert sorted(both_random["draw"].tolist()) == [0, 1]


def test_duplicate_masks_are_evaluated_once(tiny_gpt2, task, monkeypatch):
    model = tiny_gpt2
    seen: list[list[Mask]] = []
    original = mechicl.analyses.pruning.masked_choice_logprobs

    def spy(model, prompts, masks, **kwargs):
        seen.append(list(masks))
        return original(model, prompts, masks, **kwargs)

    monkeypatch.setattr(mechicl.analyses.pruning, "masked_choice_logprobs", spy)
    scores = scores_for(model)
    # two names for one ranking; 10% of 8 heads removes none, like 0%
    curve = prune_curve(model, task, shots=SHOTS, n=N,
                        head_rankings={"a": scores, "b": scores.clone()},
                        head_percents=[0, 10, 50], random_draws=0)
    assert len(seen) == 1
    masks = seen[0]
    assert len(masks) == 2 == curve.params["distinct_masks"]
    assert len({m.key() for m in masks}) == len(masks)
    assert len(curve.data) == 6
    for name in ("a", "b"):
        zero = row(curve, head_ranking=name, head_percent=0)
        ten = row(curve, head_ranking=name, head_percent=10)
        assert ten["heads_removed"] == 0 and ten["accuracy"] == zero["accuracy"]
        assert ten["gold_logprob"] == zero["gold_logprob"]
    assert row(curve, head_ranking="a", head_percent=50)["gold_logprob"] == row(
        curve, head_ranking="b", head_percent=50)["gold_logprob"]


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


def test_curve_save_load_roundtrip(tiny_gpt2, task, tmp_path):
    curve = prune_curve(tiny_gpt2, task, shots=SHOTS, n=N, head_rankings={"mine": scores_for(
        tiny_gpt2)}, head_percents=[0, 50], random_draws=1)
    back = PruneCurve.load(curve.save(tmp_path / "curve"))
    pd.testing.assert_frame_equal(back.data, curve.data)
    assert back.params == curve.params and back.model == curve.model
    pd.testing.assert_frame_equal(back.summary(), curve.summary())
    assert torch.equal(back.correct, curve.correct) and curve.correct.shape == (len(curve.data), N)
    assert back.baseline == curve.baseline
    HeadScores.from_per_seed("x", torch.zeros(1, 2, 4)).save(tmp_path / "scores")
    with pytest.raises((ValueError, FileNotFoundError)):
        PruneCurve.load(tmp_path / "scores")
    assert not list(tmp_path.glob("**/*.tmp"))


def hand_curve(rows: list[tuple[str, int, float, float]], chance: float = 0.25,
               n: int = 100) -> PruneCurve:
    """A curve from ``(head_ranking, draw, head_percent, accuracy)`` rows (heads only, 10
    heads): the first ``accuracy * n`` prompts of each row are correct."""
    data = pd.DataFrame([{"task": "t", "shots": 1, "head_ranking": name, "ffn_ranking": "none",
                          "draw": draw, "head_percent": float(hp), "ffn_percent": 0.0,
                          "heads_removed": int(hp * 10 // 100), "ffns_removed": 0,
                          "accuracy": acc, "n": n, "chance": chance}
                         for name, draw, hp, acc in rows])
    correct = torch.stack([torch.arange(n) < round(acc * n) for *_, acc in rows]).long()
    return PruneCurve(data=data, correct=correct)


def test_summary_numbers():
    curve = hand_curve([
        ("imp", 0, 0, 0.80), ("imp", 0, 10, 0.80), ("imp", 0, 20, 0.60), ("imp", 0, 30, 0.80),
        ("random", 0, 0, 0.80), ("random", 1, 0, 0.80),
        ("random", 0, 10, 0.70), ("random", 1, 10, 0.90),  # per prompt: mean 0.8, no drop
        ("random", 0, 20, 0.70), ("random", 1, 20, 0.72),  # mean 0.71: a drop
        ("random", 0, 30, 0.80), ("random", 1, 30, 0.80),
    ], n=200)
    assert curve.baseline == 0.80
    summary = curve.summary(tolerance=0.05).set_index("head_ranking")
    assert summary.loc["imp", "removable"] == 10.0  # 30% is fine again, 20% is not
    assert summary.loc["random", "removable"] == 10.0
    assert summary.loc["imp", "draws"] == 1 and summary.loc["random", "draws"] == 2
    assert (summary["baseline"] == 0.80).all() and (summary["tolerance"] == 0.05).all()
    assert (summary["unit"] == "heads").all() and (summary["n"] == 200).all()
    assert curve.summary(tolerance=0.3).set_index("head_ranking").loc["imp",
                                                                      "removable"] == 30.0
    with pytest.raises(ValueError, match="unpruned"):
        _ = hand_curve([("imp", 0, 50, 0.5)]).baseline
    old = PruneCurve(data=curve.data)  # written before per-prompt correctness was stored
    with pytest.raises(ValueError, match="recompute"):
        old.summary()


def test_points_against_a_literal_loop():
    rng = np.random.default_rng(0)
    n = 50
    rows = [("imp", 0, 0), ("imp", 0, 10), ("imp", 0, 20), ("random", 0, 0), ("random", 1, 0),
            ("random", 2, 0), ("random", 0, 10), ("random", 1, 10), ("random", 2, 10),
            ("random", 0, 20), ("random", 1, 20), ("random", 2, 20)]
    correct = torch.from_numpy(rng.random((len(rows), n)) < 0.7).long()
    correct[[3, 4, 5]] = correct[0].clone()  # one unpruned model
    data = pd.DataFrame([{"task": "t", "shots": 1, "head_ranking": name, "ffn_ranking": "none",
                          "draw": d, "head_percent": float(hp), "ffn_percent": 0.0,
                          "heads_removed": hp // 10, "ffns_removed": 0,
                          "accuracy": float(c.float().mean()), "n": n, "chance": 0.5}
                         for (name, d, hp), c in zip(rows, correct, strict=True)])
    curve = PruneCurve(data=data, correct=correct)
    pts = curve.points(n_resamples=200, seed=3).set_index(["head_ranking", "head_percent"])
    w = mechicl.stats.bootstrap_weights(n, 200, seed=3)
    idx = [np.repeat(np.arange(n), r.astype(int)) for r in w]
    c = correct.numpy().astype(float)
    base = c[0]
    for hp, imp_row, rand_rows in [(10.0, 1, [6, 7, 8]), (20.0, 2, [9, 10, 11])]:
        rand = c[rand_rows].mean(0)
        drops = [np.mean([base[i] - c[imp_row][i] for i in r]) for r in idx]
        vs = [np.mean([c[imp_row][i] - rand[i] for i in r]) for r in idx]
        got = pts.loc[("imp", hp)]
        assert got.accuracy == pytest.approx(c[imp_row].mean())
        assert (got.drop_low, got.drop_high) == pytest.approx(
            (np.quantile(drops, 0.025), np.quantile(drops, 0.975)))
        assert (got.vs_random_low, got.vs_random_high) == pytest.approx(
            (np.quantile(vs, 0.025), np.quantile(vs, 0.975)))
        r = pts.loc[("random", hp)]
        assert r.accuracy == pytest.approx(rand.mean()) and r.draws == 3
        accs = c[rand_rows].mean(1)
        assert (r.band_low, r.band_high) == pytest.approx(
            (np.quantile(accs, 0.05), np.quantile(accs, 0.95)))
        assert math.isnan(r.vs_random)


def test_prune_curve_errors(tiny_gpt2, task):
    model = tiny_gpt2
    kwargs = dict(shots=SHOTS, n=N)
    with pytest.raises(ValueError, match="'bad' has 7 scores"):
        prune_curve(model, task, head_rankings={"bad": torch.rand(7)}, **kwargs)
    with pytest.raises(ValueError, match="'bad' has 4 scores.*2 layers"):
        prune_curve(model, task, ffn_rankings={"bad": torch.rand(4)}, ffn_percents=[0, 50],
                    **kwargs)
    with pytest.raises(ValueError, match="percent=110"):
        prune_curve(model, task, head_percents=[0, 110], **kwargs)
    with pytest.raises(ValueError, match="percent=-10"):
        prune_curve(model, task, ffn_percents=[-10], **kwargs)
    with pytest.raises(ValueError, match="random_draws=-1"):
        prune_curve(model, task, random_draws=-1, **kwargs)
    with pytest.raises(ValueError, match="nothing to prune by"):
        prune_curve(model, task, random_draws=0, **kwargs)
    with pytest.raises(ValueError, match="reserved"):
        prune_curve(model, task, head_rankings={"random": torch.rand(8)}, **kwargs)
    with pytest.raises(ValueError, match="NaN"):
        prune_curve(model, task, head_rankings={"nan": torch.full((2, 4), float("nan"))},
                    **kwargs)
    with pytest.raises(ValueError, match="give a task"):
        prune_curve(model, random_draws=1)


def test_prune_curve_figure_traces():
    from mechicl.plotting import layer_bars, prune_curve_figure

    curve = hand_curve([("imp", 0, 0, 0.80), ("imp", 0, 10, 0.60),
                        ("random", 0, 0, 0.80), ("random", 1, 0, 0.80),
                        ("random", 0, 10, 0.70), ("random", 1, 10, 0.50)])
    fig = prune_curve_figure(curve)
    names = [t.name for t in fig.data]
    assert "imp" in names and "random (2 draws)" in names
    band = next(t for t in fig.data if t.fill == "toself")  # 5-95% quantiles of the draws
    assert list(band.y) == pytest.approx([0.80, 0.69, 0.51, 0.80])
    # grey, no markers at its corners (plotly's default for short traces), no hover text
    assert band.mode == "lines" and band.fillcolor == "rgba(128,128,128,0.25)"
    assert band.hoverinfo == "skip"
    imp = next(t for t in fig.data if t.name == "imp")
    assert imp.error_y.array is not None  # paired-bootstrap error bars over prompts
    random_line = next(t for t in fig.data if t.name == "random (2 draws)")
    assert list(random_line.y) == pytest.approx([0.80, 0.60])
    assert fig.layout.xaxis.title.text == "% of heads removed"
    with pytest.raises(ValueError, match="x='layer'"):
        prune_curve_figure(curve, x="layer")
    with pytest.raises((ValueError, TypeError)):
        layer_bars(torch.ones(2, 2))
    bars = layer_bars(torch.tensor([0.5, -0.1]))
    assert list(bars.data[0].y) == pytest.approx([0.5, -0.1])
    assert bars.layout.xaxis.title.text == "layer"
