"""Head and FFN importance: batched, vectorised scores equal slow one-prompt-at-a-time references
(tests/reference_importance.py), and find the hand-built induction head."""

import math

import numpy as np
import pytest
import reference_importance as ref  # tests/reference_importance.py: slow, plain loops
import torch
from scipy import stats
from torch.testing import assert_close

import mechicl
from mechicl.analyses import OptionError
from mechicl.analyses.evaluation import answer_batch
from mechicl.analyses.importance import (
    HEAD_IMPORTANCE,
    IMPORTANCE_METHODS,
    SIGNED_METHODS,
    compare_methods,
    ffn_importance,
    head_importance,
    importance_label,
    importance_prompts,
    is_signed,
    resampled_maps,
)
from mechicl.analyses.overlap import spearman, spearman_rows
from mechicl.model import as_hooked_model
from mechicl.model.masks import Mask
from mechicl.results import HeadScores, LayerScores
from mechicl.stats import bootstrap_weights
from mechicl.testing import INDUCTION_MODEL_HEADS, tiny_model

N_PROMPTS = 5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prompts():
    """Copy prompts of different lengths (batches pad), with 1- and 2-token answers."""
    out = ref.copy_prompts(N_PROMPTS)
    return out


def test_answer_batch_equals_reference_tokens(tiny_gpt2, prompts):
    """The references tokenise on their own; mechicl's answer batch agrees, and the prompts
    exercise padding (different lengths) and multi-token answers."""
    batch = answer_batch(tiny_gpt2, prompts)
    lengths = batch.attention_mask.sum(-1).tolist()
    assert len(set(lengths)) > 2
    assert set(batch.answer_mask.sum(-1).tolist()) == {1, 2}
    for i, prompt in enumerate(prompts):
        tokens, positions = ref.prompt_tokens(tiny_gpt2, prompt)
        assert batch.tokens[i, : lengths[i]].tolist() == tokens.tolist()
        assert torch.nonzero(batch.answer_mask[i]).flatten().tolist() == positions
        assert not bool(batch.answer_mask[i, lengths[i]:].any())
        other = answer_batch(tiny_gpt2, [prompt], which=(prompt.gold + 1) % 3)
        tokens, positions = ref.prompt_tokens(tiny_gpt2, prompt, which=(prompt.gold + 1) % 3)
        assert other.tokens[0].tolist() == tokens.tolist()
        assert torch.nonzero(other.answer_mask[0]).flatten().tolist() == positions


@pytest.fixture(scope="module", params=["tiny_gpt2", "tiny_llama"])
def model(request):
    return request.getfixturevalue(request.param)


# --------------------------------------------------------------------------------------------
# Gradient methods
# --------------------------------------------------------------------------------------------


def test_bansal_equals_reference(model, prompts):
    imp = head_importance(model, prompts=prompts, method="bansal")
    want = ref.bansal_reference(model, prompts)
    assert imp.mean.shape == (model.n_layers, model.n_heads) and imp.name == "importance_bansal"
    assert_close(imp.mean, want, rtol=1e-4, atol=1e-7)
    assert want.min() > 0
    # per example: the same formula on that prompt alone
    per_prompt = torch.stack([ref.bansal_reference(model, [p]) for p in prompts])
    assert_close(imp.per_seed, per_prompt, rtol=1e-4, atol=1e-7)
    # the token-weighted mean is not the plain mean of the per-example scores
    assert not torch.allclose(imp.mean, per_prompt.mean(0), rtol=1e-3)
    batch = answer_batch(model, prompts)
    assert imp.extras["n_real"].tolist() == batch.attention_mask.sum(-1).tolist()
    assert imp.extras["n_answer"].tolist() == batch.answer_mask.sum(-1).tolist()
    assert_close(imp.extras["loss"], torch.tensor([ref.ref_answer_loss(model, p) for p in prompts],
                                                  dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert imp.params["method"] == "bansal" and imp.params["n"] == N_PROMPTS
    assert imp.params["signed"] is False and not is_signed(imp)
    assert imp.params["prompt_ids"] == [p.id for p in prompts]
    assert [t.tolist() for t in imp.tokens] == [
        batch.tokens[i, :n].tolist() for i, n in enumerate(batch.attention_mask.sum(-1).tolist())]


@pytest.mark.parametrize("method, token_normalization", [
    ("bansal", "reference"), ("bansal", "uniform"), ("michel", "reference"),
    ("attribution", "reference")])
def test_resampled_maps_equal_the_method_on_the_resampled_prompts(tiny_llama, prompts, method,
                                                                  token_normalization):
    """A bootstrap resample of a map (report: the methods' agreement interval) equals the
    method run again on the resampled prompt list, duplicates included: Bansal's token
    pooling and the other methods' prompt means."""
    full = head_importance(tiny_llama, prompts=prompts, method=method,
                           token_normalization=token_normalization)
    weights = bootstrap_weights(len(prompts), 3, seed=4)
    again = resampled_maps(full, torch.as_tensor(weights))
    for r, row in enumerate(weights):
        drawn = [p for p, count in zip(prompts, row, strict=True) for _ in range(int(count))]
        direct = head_importance(tiny_llama, prompts=drawn, method=method,
                                 token_normalization=token_normalization)
        assert_close(again[r], direct.mean, rtol=1e-6, atol=1e-9)
    assert_close(resampled_maps(full, torch.ones(1, len(prompts)))[0], full.mean)
    with pytest.raises(ValueError, match="do not match the map's 5 prompts"):
        resampled_maps(full, torch.ones(2, 4))


def test_spearman_rows_equal_scipy():
    x, y = torch.randn(4, 3, 7, dtype=torch.float64), torch.randn(4, 3, 7, dtype=torch.float64)
    y[0] = x[0].round()  # ties
    expected = [stats.spearmanr(a.flatten(), b.flatten()).statistic for a, b in zip(x, y, strict=True)]
    assert_close(spearman_rows(x, y), torch.tensor(expected, dtype=torch.float64))


def test_bansal_does_not_depend_on_batching(model, prompts):
    one_batch = head_importance(model, prompts=prompts, method="bansal", batch_tokens=4096)
    many = head_importance(model, prompts=prompts, method="bansal", batch_tokens=12)
    assert_close(many.mean, one_batch.mean, rtol=1e-5, atol=1e-8)
    assert_close(many.per_seed, one_batch.per_seed, rtol=1e-5, atol=1e-8)
    reordered = head_importance(model, prompts=prompts[::-1], method="bansal", batch_tokens=30)
    assert_close(reordered.mean, one_batch.mean, rtol=1e-5, atol=1e-8)
    assert_close(reordered.per_seed.flip(0), one_batch.per_seed, rtol=1e-5, atol=1e-8)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model64(request):
    """A float64 copy of a tiny model, for finite differences. HF's LlamaRMSNorm computes in
    float32 whatever the input dtype, so the Llama model is only float32-accurate inside: its
    finite differences use a larger step and a looser tolerance."""
    bridge = tiny_model(request.param).to(torch.float64)
    m = as_hooked_model(bridge, name=f"tiny-{request.param}-f64")
    assert m.dtype == torch.float64
    tokens = torch.tensor([m.encode("w1 w2 w3")])
    with torch.no_grad():
        assert m(tokens).dtype == torch.float64
    return request.param, m


def test_michel_equals_finite_differences(model64, prompts):
    arch, model = model64
    eps, atol = (1e-5, 1e-8) if arch == "gpt2" else (1e-3, 2e-4)
    imp = head_importance(model, prompts=prompts, method="michel")
    per_prompt = torch.stack([ref.michel_reference(model, [p], eps=eps) for p in prompts])
    assert_close(imp.per_seed, per_prompt, rtol=1e-4, atol=atol)
    assert_close(imp.mean, per_prompt.mean(0), rtol=1e-4, atol=atol)
    assert per_prompt.mean(0).min() > 10 * atol
    # |sum_t grad| <= sum_t |grad|: Michel's per-example score is below Bansal's numerator.
    bansal = head_importance(model, prompts=prompts, method="bansal")
    assert not torch.allclose(bansal.mean, imp.mean, rtol=0.1)


def test_gradient_importance_with_a_mask(tiny_gpt2, prompts):
    """Under a mask, a removed head gets no gradient and the rest equals the reference run on
    the masked model (hand-written hooks inside the model's own hook context)."""
    mask = Mask.remove(tiny_gpt2, heads=[(0, 2)])
    imp = head_importance(tiny_gpt2, prompts=prompts, method="bansal", mask=mask)
    assert imp.mean[0, 2] == 0
    with tiny_gpt2.hooks(fwd_hooks=[ref.head_hook(tiny_gpt2, 0, 2)]):
        want = ref.bansal_reference(tiny_gpt2, prompts)
    assert_close(imp.mean, want, rtol=1e-4, atol=1e-7)
    assert imp.params["mask"] == mask.to_dict()


# --------------------------------------------------------------------------------------------
# Ablation importance
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["loss", "accuracy"])
@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_ablation_equals_reference(model, prompts, ablation, metric):
    means_z = None
    if ablation == "mean":
        batch = answer_batch(model, prompts)
        seqs = [batch.tokens[i, :n] for i, n in enumerate(batch.attention_mask.sum(-1).tolist())]
        means_z, _ = ref.mean_activations_reference(model, seqs)
    imp = head_importance(model, prompts=prompts, method="ablation", ablation=ablation,
                          metric=metric, batch_tokens=200)
    want = ref.ablation_reference(model, prompts, metric=metric, means_z=means_z)
    assert_close(imp.mean, want, rtol=1e-4, atol=1e-5)
    assert want.abs().max() > 0.1  # removing heads does change things
    assert imp.params["ablation"] == ablation and imp.params["metric"] == metric
    # per-example effects average to the score
    assert imp.per_seed.shape == (N_PROMPTS, model.n_layers, model.n_heads)
    assert_close(imp.per_seed.mean(0), imp.mean, rtol=1e-12, atol=1e-12)
    # signed: ablated minus unablated loss (accuracy: unablated minus ablated), no absolute
    # value; these random models have heads whose removal helps
    assert imp.params["signed"] is True and is_signed(imp)
    if metric == "loss":
        assert want.min() < -1e-3 and want.max() > 1e-3


# --------------------------------------------------------------------------------------------
# Attribution patching towards the ablation
# --------------------------------------------------------------------------------------------


def _reference_means(model, prompts):
    """``[layer, head, d_head]`` mean head outputs over the prompts' gold sequences (BOS left
    out), from the reference."""
    batch = answer_batch(model, prompts)
    seqs = [batch.tokens[i, :n] for i, n in enumerate(batch.attention_mask.sum(-1).tolist())]
    return ref.mean_activations_reference(model, seqs)[0]


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_attribution_equals_reference(model, prompts, ablation):
    """One backward per batch equals the literal per-prompt, per-head, per-position sum of
    ``(a - z) . dL/dz``, whatever the batching; the map is signed."""
    means_z = _reference_means(model, prompts) if ablation == "mean" else None
    imp = head_importance(model, prompts=prompts, method="attribution", ablation=ablation)
    want = ref.attribution_reference(model, prompts, means_z=means_z)
    assert imp.name == "importance_attribution"
    assert_close(imp.mean, want, rtol=1e-4, atol=1e-6)
    assert want.min() < -1e-3 and want.max() > 1e-3  # both signs: no absolute value
    assert imp.params["signed"] is True and is_signed(imp)
    assert imp.params["method"] == "attribution" and imp.params["ablation"] == ablation
    # averaged over prompts as the ablation effects are: per example, then the plain mean
    per_prompt = torch.stack([ref.attribution_reference(model, [p], means_z=means_z)
                              for p in prompts])
    assert_close(imp.per_seed, per_prompt, rtol=1e-4, atol=1e-6)
    assert_close(imp.per_seed.mean(0), imp.mean, rtol=1e-12, atol=1e-12)
    small = head_importance(model, prompts=prompts, method="attribution", ablation=ablation,
                            batch_tokens=12)
    assert_close(small.mean, imp.mean, rtol=1e-5, atol=1e-8)


def test_attribution_towards_zero_is_signed_michel(tiny_llama, prompts):
    """Towards zero, ``(0 - z) . dL/dz`` summed over tokens is minus the multiplicative gate's
    gradient, whose absolute value is Michel et al.'s per-example score."""
    attribution = head_importance(tiny_llama, prompts=prompts, method="attribution")
    michel = head_importance(tiny_llama, prompts=prompts, method="michel")
    assert_close(attribution.per_seed.abs(), michel.per_seed, rtol=1e-5, atol=1e-9)
    assert (attribution.per_seed < 0).any() and (attribution.per_seed > 0).any()


def test_attribution_approximates_mean_ablation_when_nearly_linear(prompts):
    """Attribution is the first-order Taylor term of mean ablation; where the loss is nearly
    linear in each head's output it approximates the exact effect.

    The model: tiny GPT-2 at HF's default init (std 0.02, so heads write little into the
    residual stream), in float64. With ``E(s)`` the loss change when a head's output moves the
    fraction ``s`` of the way to its mean, ``E(s) = A s + C s^2 + D s^3 + ...`` and attribution
    is ``A = E'(0)``. So ``E(1) - A = C + D + ...``, and ``C`` can be measured:
    ``2 (E(1) - 2 E(1/2)) = C + 3D/2``. The tolerances follow: (1) ``A`` equals the
    Richardson derivative ``4 E(1/2) - E(1) = A - D/2`` far more closely than it equals
    ``E(1)`` (third- vs second-order; measured 1.8e-8 vs 1.8e-6); (2) ``|A - E(1)|`` is the
    measured quadratic term, within a factor 1.5 for every head (measured: at most 1.01) --
    so the gap is curvature, not a wrong derivative; (3) on this model that gap is below 1 %
    of the largest effect (measured 0.4 %)."""
    model = as_hooked_model(tiny_model("gpt2", init_std=0.02).to(torch.float64),
                            name="tiny-gpt2-std002-f64")
    means_z = _reference_means(model, prompts)
    attribution = head_importance(model, prompts=prompts, method="attribution",
                                  ablation="mean").mean
    exact = head_importance(model, prompts=prompts, method="ablation", ablation="mean").mean
    assert_close(exact, ref.ablation_reference(model, prompts, means_z=means_z), rtol=1e-6,
                 atol=1e-12)
    half = ref.partial_ablation_reference(model, prompts, 0.5, means_z=means_z)
    gap = (attribution - exact).abs()
    assert (attribution - (4 * half - exact)).abs().max() < 0.1 * gap.max()
    assert (gap <= 1.5 * (2 * (exact - 2 * half)).abs() + 1e-12).all()
    assert gap.max() < 0.01 * exact.abs().max()
    assert spearman(attribution, exact) > 0.95


def test_attribution_with_a_mask(tiny_gpt2, prompts):
    """Under a base mask the estimate is taken on the masked model: a head the mask removed
    has nothing left to remove (0), the rest equals the reference under a hand-written hook;
    a base mask of another ablation kind is refused, as for method='ablation'."""
    mask = Mask.remove(tiny_gpt2, heads=[(0, 2)])
    imp = head_importance(tiny_gpt2, prompts=prompts, method="attribution", mask=mask)
    assert imp.mean[0, 2] == 0
    with tiny_gpt2.hooks(fwd_hooks=[ref.head_hook(tiny_gpt2, 0, 2)]):
        want = ref.attribution_reference(tiny_gpt2, prompts)
    assert_close(imp.mean, want, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="cannot combine"):
        head_importance(tiny_gpt2, prompts=prompts, method="attribution", ablation="mean",
                        mask=mask)
    with pytest.raises(ValueError, match="cannot combine"):
        head_importance(tiny_gpt2, prompts=prompts, method="ablation", ablation="mean",
                        mask=mask)


def test_normalize_layers_gives_unit_norm_per_layer(tiny_llama, prompts):
    for method in IMPORTANCE_METHODS:
        raw = head_importance(tiny_llama, prompts=prompts, method=method)
        normed = head_importance(tiny_llama, prompts=prompts, method=method,
                                 normalize_layers=True)
        norms = raw.mean.norm(dim=-1, keepdim=True)
        assert_close(normed.mean.norm(dim=-1), torch.ones(tiny_llama.n_layers, dtype=torch.float64))
        assert_close(normed.mean, raw.mean / norms)
        assert_close(normed.per_seed, raw.per_seed / norms)
        assert not torch.allclose(norms, torch.ones_like(norms))
        assert normed.params["normalize_layers"] is True


# --------------------------------------------------------------------------------------------
# The hand-built induction model
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", IMPORTANCE_METHODS)
def test_induction_toy_ranks_its_induction_head_first(induction_toy, method):
    """On a copy task (the answer is what followed the earlier occurrence of the last token)
    the induction head (1, 2) matters most, then the previous-token head (0, 1) feeding it; the
    distractor heads write only into a subspace nothing reads, so they score exactly 0.

    Attribution ranks them alike but underestimates both by orders of magnitude: the toy is
    saturated (answer loss ~0, so the gradient is ~0, while removing either head costs
    ~log(d_vocab)), the known failure of first-order estimates.

    For ablation the two special heads are nearly tied: without the previous-token head the
    induction head sinks onto BOS (weight 1 - O(e^-15)), so logits are ~0 and the loss is
    ~log(d_vocab), like without the induction head, whose removal zeroes the logits exactly
    (a loss higher by ~1e-6)."""
    model = induction_toy
    prompts = ref.copy_prompts(6)
    assert mechicl.analyses.evaluation.choice_logprobs(model, prompts)[0].argmax(-1).tolist() == [
        p.gold for p in prompts]
    imp = head_importance(model, prompts=prompts, method=method)
    induction = INDUCTION_MODEL_HEADS["induction"]
    previous = INDUCTION_MODEL_HEADS["previous_token"]
    assert imp.top_heads(2) == [induction, previous]
    others = imp.mean.clone()
    others[induction], others[previous] = 0.0, 0.0
    assert others.abs().max() < 1e-9
    if method == "ablation":
        base_loss = sum(ref.ref_answer_loss(model, p) for p in prompts) / len(prompts)
        assert imp.mean[induction] == pytest.approx(math.log(model.d_vocab) - base_loss, abs=1e-6)
        assert 0 < imp.mean[induction] - imp.mean[previous] < 1e-4
    else:
        assert imp.mean[induction] > 100 * imp.mean[previous]
    if method == "attribution":
        exact = head_importance(model, prompts=prompts, method="ablation")
        assert 0 < imp.mean[induction] < 0.1 * exact.mean[induction]


# --------------------------------------------------------------------------------------------
# Methods side by side
# --------------------------------------------------------------------------------------------


def _hand_within_layer_spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx = np.stack([stats.rankdata(row) - stats.rankdata(row).mean() for row in x])
    ry = np.stack([stats.rankdata(row) - stats.rankdata(row).mean() for row in y])
    return float((rx * ry).sum() / np.sqrt((rx**2).sum() * (ry**2).sum()))


def _hand_top(x: np.ndarray, k: int) -> set[int]:
    return set(sorted(range(x.size), key=lambda i: -x.flat[i])[:k])


def test_compare_methods_equals_hand_computation():
    """Every column against scipy / plain Python on small maps without ties: a magnitude map,
    a signed map (stored before ``params["signed"]`` existed: judged by its method) and an
    induction score."""
    magnitude = np.array([[0.9, 0.1, 0.5, 0.3], [0.8, 0.2, 0.05, 0.6], [0.4, 0.7, 0.01, 0.35]])
    signed = np.array([[-0.7, 0.15, 0.45, 0.02], [0.5, -0.3, 0.04, 0.25], [0.12, 0.6, -0.05,
                                                                            0.33]])
    score = np.array([[0.1, 0.9, 0.2, 0.3], [0.05, 0.8, 0.6, 0.15], [0.7, 0.25, 0.4, 0.35]])
    maps = {
        "bansal": HeadScores.from_per_seed("importance_bansal", torch.tensor(magnitude)[None],
                                           params={"method": "bansal", "signed": False}),
        "ablation": HeadScores.from_per_seed("importance_ablation", torch.tensor(signed)[None],
                                             params={"method": "ablation"}),
    }
    scans = {"prefix_matching": torch.tensor(score)}
    k = 4
    df = compare_methods(maps, scans, k=k)
    assert list(df["kind"]) == ["method", "induction score", "induction score"]
    assert list(df["a"]) == ["bansal", "bansal", "ablation"]
    assert list(df["b"]) == ["ablation", "prefix_matching", "prefix_matching"]
    assert list(df["k"]) == [k] * 3

    pair = df.iloc[0]
    assert not pair["signed a"] and pair["signed b"]
    rho = stats.spearmanr(magnitude.ravel(), signed.ravel()).statistic
    rho_abs = stats.spearmanr(magnitude.ravel(), np.abs(signed).ravel()).statistic
    assert pair["spearman"] == pytest.approx(rho, abs=1e-12)
    assert pair["spearman |.|"] == pytest.approx(rho_abs, abs=1e-12)
    assert rho != pytest.approx(rho_abs)
    assert pair["within-layer spearman"] == pytest.approx(
        _hand_within_layer_spearman(magnitude, signed), abs=1e-12)
    overlap = len(_hand_top(magnitude, k) & _hand_top(signed, k)) / k
    overlap_abs = len(_hand_top(magnitude, k) & _hand_top(np.abs(signed), k)) / k
    assert pair["top-k overlap"] == pytest.approx(overlap)
    assert pair["top-k overlap |.|"] == pytest.approx(overlap_abs)
    assert overlap != overlap_abs
    assert math.isnan(pair["median percentile"]) and math.isnan(pair["median rank"])

    induction = sorted(_hand_top(score, k))
    n = score.size
    for row, x in ((df.iloc[1], magnitude), (df.iloc[2], signed)):
        assert row["spearman"] == pytest.approx(
            stats.spearmanr(x.ravel(), score.ravel()).statistic, abs=1e-12)
        assert row["spearman |.|"] == pytest.approx(
            stats.spearmanr(np.abs(x).ravel(), score.ravel()).statistic, abs=1e-12)
        assert row["within-layer spearman"] == pytest.approx(
            _hand_within_layer_spearman(x, score), abs=1e-12)
        assert row["top-k overlap"] == pytest.approx(len(_hand_top(x, k) & set(induction)) / k)
        assert row["top-k overlap |.|"] == pytest.approx(
            len(_hand_top(np.abs(x), k) & set(induction)) / k)
        ranks = stats.rankdata(x.ravel())  # 1 = lowest
        assert row["median percentile"] == pytest.approx(
            float(np.median([100 * (ranks[i] - 1) / (n - 1) for i in induction])))
        abs_ranks = stats.rankdata(np.abs(x).ravel())
        assert row["median percentile |.|"] == pytest.approx(
            float(np.median([100 * (abs_ranks[i] - 1) / (n - 1) for i in induction])))
        assert row["median rank"] == pytest.approx(
            float(np.median([n + 1 - ranks[i] for i in induction])))
    assert df.iloc[2]["signed a"] and not df.iloc[2]["signed b"]
    # a map of another shape is refused
    with pytest.raises(ValueError, match="differ in shape"):
        compare_methods({"a": torch.zeros(3, 4), "b": torch.zeros(4, 3)}, k=2)


def test_registered_methods_and_unchanged_job_options(tiny_gpt2, prompts):
    """Every method is a value of the registered analysis's ``method``; the ablation kind is
    the ``ablation`` option (both for exact ablation and its attribution estimate); existing
    methods' jobs resolve to exactly the options they had before (so their keys are
    unchanged); the CLI outputs name mean-ablation maps apart and draw signed maps on a
    diverging scale centred at zero."""
    before = {"n": 50, "ablation": "zero", "metric": "loss", "normalize_layers": False,
              "token_normalization": "reference"}
    for method in ("bansal", "michel", "ablation"):
        job = HEAD_IMPORTANCE.job("m", {"method": method}, task="antonyms", shots=1)
        assert job.key_options() == {"method": method, **before}
    with pytest.raises(OptionError, match="estimates the change of the answer loss"):
        HEAD_IMPORTANCE.job("m", {"method": "attribution", "metric": "accuracy"},
                            task="antonyms", shots=1)
    with pytest.raises(OptionError, match="only apply to method='ablation'"):
        HEAD_IMPORTANCE.job("m", {"method": "michel", "ablation": "mean"}, task="antonyms",
                            shots=1)
    assert set(SIGNED_METHODS) < set(IMPORTANCE_METHODS)

    pairs = []
    for method, ablation in (("bansal", "zero"), ("ablation", "zero"), ("ablation", "mean"),
                             ("attribution", "mean")):
        job = HEAD_IMPORTANCE.job("tiny", {"method": method, "ablation": ablation},
                                  task="copy", shots=0)
        scores = head_importance(tiny_gpt2, prompts=prompts, method=method, ablation=ablation)
        pairs.append((job, scores))
    out = HEAD_IMPORTANCE.outputs(pairs, {})
    assert list(out.results) == ["copy-0shot-bansal", "copy-0shot-ablation",
                                 "copy-0shot-ablation-mean", "copy-0shot-attribution-mean"]
    assert [importance_label(j.options["method"], j.options["ablation"]) for j, _ in pairs] == [
        "bansal", "ablation", "ablation-mean", "attribution-mean"]
    for (_, scores), stem in zip(pairs, out.results, strict=True):
        heat = out.figures[stem].data[0]
        if is_signed(scores):
            assert heat.zmax == pytest.approx(float(scores.mean.abs().max()))
            assert heat.zmin == -heat.zmax
            assert heat.colorscale != out.figures["copy-0shot-bansal"].data[0].colorscale
        else:
            assert heat.zmin == 0 and heat.zmax == pytest.approx(float(scores.mean.max()))
    assert [r["method"] for r in out.rows] == ["bansal", "ablation", "ablation-mean",
                                              "attribution-mean"]


# --------------------------------------------------------------------------------------------
# FFN importance
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["accuracy", "loss"])
def test_ffn_importance_equals_reference(model, prompts, metric):
    imp = ffn_importance(model, prompts=prompts, metric=metric, batch_tokens=100)
    want = ref.ffn_reference(model, prompts, metric=metric)
    assert isinstance(imp, LayerScores) and imp.name == "ffn_importance"
    assert_close(imp.mean, want, rtol=1e-4, atol=1e-5)
    assert want.abs().max() > 0.05
    assert imp.per_seed.shape == (N_PROMPTS, model.n_layers)
    assert imp.params["metric"] == metric


def test_accuracy_knockouts_rank_choices_by_the_tasks_rule(tiny_gpt2, prompts):
    """metric="accuracy" ranks the choices as evaluate does: by the task's rule (chars: lm-eval
    acc_norm, for openbookqa and piqa), or by an explicit normalization; recorded in params."""
    heads = head_importance(tiny_gpt2, prompts=prompts, method="ablation", metric="accuracy",
                            normalization="chars")
    assert_close(heads.mean, ref.ablation_reference(tiny_gpt2, prompts, metric="accuracy",
                                                    chars=True), rtol=1e-4, atol=1e-5)
    ffn = ffn_importance(tiny_gpt2, prompts=prompts, metric="accuracy", normalization="chars")
    want = ref.ffn_reference(tiny_gpt2, prompts, metric="accuracy", chars=True)
    assert_close(ffn.mean, want, rtol=1e-4, atol=1e-5)
    assert heads.params["normalization"] == ffn.params["normalization"] == "chars"
    # the rule matters on these prompts, and without a task "task" means the sum
    assert not torch.equal(want, ref.ffn_reference(tiny_gpt2, prompts, metric="accuracy"))
    assert ffn_importance(tiny_gpt2, prompts=prompts).params["normalization"] == "none"
    with pytest.raises((ValueError, TypeError), match="bytes"):
        ffn_importance(tiny_gpt2, prompts=prompts, normalization="bytes")


def test_ffn_importance_under_a_mask(tiny_gpt2, prompts):
    """With FFN 0 already removed, removing it again changes nothing."""
    mask = Mask.remove(tiny_gpt2, ffns=[0])
    imp = ffn_importance(tiny_gpt2, prompts=prompts, metric="loss", mask=mask)
    assert imp.mean[0] == 0
    with tiny_gpt2.hooks(fwd_hooks=[ref.zero_mlp_hook(tiny_gpt2, 0)]):
        want = ref.ffn_reference(tiny_gpt2, prompts, metric="loss")
    assert_close(imp.mean[1], want[1], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Task plumbing, errors, results
# --------------------------------------------------------------------------------------------


def test_task_prompts_equal_explicit_prompts(tiny_gpt2):
    task = ref.copy_task(20)
    from_task = head_importance(tiny_gpt2, task, shots=1, n=4, seed=3, method="bansal")
    prompts = importance_prompts(task, shots=1, n=4, seed=3)
    explicit = head_importance(tiny_gpt2, prompts=prompts, method="bansal")
    assert_close(from_task.mean, explicit.mean, rtol=0, atol=0)
    assert from_task.params["task"] == "copy" and explicit.params["task"] == "custom"
    assert from_task.params["shots"] == 1 and from_task.params["seed"] == 3


def test_bad_arguments_raise(tiny_gpt2, prompts):
    model = tiny_gpt2
    with pytest.raises((ValueError, TypeError), match="fisher"):
        head_importance(model, prompts=prompts, method="fisher")
    with pytest.raises(ValueError, match="metric='accuracy'"):
        head_importance(model, prompts=prompts, method="bansal", metric="accuracy")
    with pytest.raises(ValueError, match="ablation='mean'"):
        head_importance(model, prompts=prompts, method="michel", ablation="mean")
    with pytest.raises((ValueError, TypeError), match="f1"):
        head_importance(model, prompts=prompts, method="ablation", metric="f1")
    with pytest.raises((ValueError, TypeError), match="shuffle"):
        head_importance(model, prompts=prompts, method="ablation", ablation="shuffle")
    with pytest.raises(ValueError, match="estimates the change of the answer loss"):
        head_importance(model, prompts=prompts, method="attribution", metric="accuracy")
    with pytest.raises((ValueError, TypeError), match="f1"):
        ffn_importance(model, prompts=prompts, metric="f1")
    with pytest.raises(ValueError, match="give a task"):
        head_importance(model)
    with pytest.raises(ValueError, match="no prompts"):
        head_importance(model, prompts=[])
    with pytest.raises(ValueError, match="balanced"):
        head_importance(model, prompts=prompts, balanced=True)
    with pytest.raises(KeyError, match="no_such_task"):
        head_importance(model, "no_such_task")


def test_results_roundtrip(tiny_gpt2, prompts, tmp_path):
    imp = head_importance(tiny_gpt2, prompts=prompts, method="bansal")
    back = HeadScores.load(imp.save(tmp_path / "imp"))
    assert back.name == imp.name and back.params == imp.params and back.model == imp.model
    for field in ("mean", "var", "per_seed"):
        assert torch.equal(getattr(back, field), getattr(imp, field))
    assert set(back.extras) == {"n_real", "n_answer", "loss"}
    for key, value in imp.extras.items():
        assert torch.equal(back.extras[key], value)
    assert all(torch.equal(a, b) for a, b in zip(back.tokens, imp.tokens, strict=True))
    assert back.top_heads(3) == imp.top_heads(3)

    ffn = ffn_importance(tiny_gpt2, prompts=prompts, metric="loss")
    back_ffn = LayerScores.load(ffn.save(tmp_path / "ffn"))
    assert back_ffn.name == "ffn_importance" and back_ffn.params == ffn.params
    for field in ("mean", "var", "per_seed"):
        assert torch.equal(getattr(back_ffn, field), getattr(ffn, field))
    df = back_ffn.to_dataframe()
    assert df["layer"].tolist() == [0, 1]
    assert int(df.loc[df["mean"].idxmax(), "rank"]) == 1
    with pytest.raises(ValueError, match="LayerScores"):
        LayerScores.load(tmp_path / "imp")
    assert not list(tmp_path.glob("**/*.tmp"))


# --------------------------------------------------------------------------------------------
# The real default model
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_bansal_equals_reference(smollm2):
    prompts = importance_prompts("country_capital", shots=1, n=2)
    imp = head_importance(smollm2, prompts=prompts, method="bansal")
    want = ref.bansal_reference(smollm2, prompts)
    assert imp.mean.shape == (smollm2.n_layers, smollm2.n_heads)
    assert_close(imp.mean, want, rtol=1e-3, atol=1e-6)
    assert want.min() > 0


@pytest.mark.slow
def test_default_model_ablation_equals_single_head_reference(smollm2):
    """Batched ablation importance on the real model (all 270 heads, two 0-shot prompts) equals
    the plain per-prompt loss with one hand-written zeroing hook, for a few heads."""
    prompts = importance_prompts("country_capital", shots=0, n=2)
    imp = head_importance(smollm2, prompts=prompts, method="ablation", metric="loss")
    base = [ref.ref_answer_loss(smollm2, p) for p in prompts]
    for layer, head in [(0, 0), (1, 5), (17, 3), (29, 8)]:
        hooks = [ref.head_hook(smollm2, layer, head)]
        want = sum(ref.ref_answer_loss(smollm2, p, hooks) - b
                   for p, b in zip(prompts, base, strict=True)) / len(prompts)
        assert imp.mean[layer, head].item() == pytest.approx(want, rel=1e-3, abs=1e-4)
    assert imp.mean.abs().max() > 0.01


@pytest.mark.slow
def test_default_model_michel_and_ffn_equal_references(smollm2):
    """Michel (vs literal per-prompt gradients) and FFN knock-out importance (vs one zeroing
    hook per layer, per prompt) on the real model."""
    prompts = importance_prompts("country_capital", shots=0, n=2)
    michel = head_importance(smollm2, prompts=prompts, method="michel")
    assert_close(michel.mean, ref.michel_gradient_reference(smollm2, prompts), rtol=1e-3,
                 atol=1e-6)
    ffn = ffn_importance(smollm2, prompts=prompts, metric="loss")
    assert_close(ffn.mean, ref.ffn_reference(smollm2, prompts, metric="loss"), rtol=1e-3,
                 atol=1e-4)
    assert ffn.mean.abs().max() > 0.01


@pytest.mark.slow
def test_default_model_methods_side_by_side(smollm2):
    """Every method on the real model (three 1-shot prompts): finite ``[layer, head]`` maps,
    signed where they should be; attribution towards the mean equals the literal per-prompt
    computation; compare_methods runs on them with an induction score."""
    prompts = importance_prompts("country_capital", shots=1, n=3)
    maps = {}
    for method, ablation in (("bansal", "zero"), ("michel", "zero"), ("ablation", "zero"),
                             ("ablation", "mean"), ("attribution", "zero"),
                             ("attribution", "mean")):
        imp = head_importance(smollm2, prompts=prompts, method=method, ablation=ablation)
        assert imp.mean.shape == (smollm2.n_layers, smollm2.n_heads)
        assert torch.isfinite(imp.mean).all() and torch.isfinite(imp.per_seed).all()
        assert is_signed(imp) == (method in SIGNED_METHODS)
        assert imp.mean.abs().max() > 0
        maps[importance_label(method, ablation)] = imp
    assert (maps["ablation-mean"].mean < 0).any() and (maps["attribution-mean"].mean < 0).any()
    want = ref.attribution_reference(smollm2, prompts, means_z=_reference_means(smollm2, prompts))
    assert_close(maps["attribution-mean"].mean, want, rtol=1e-3, atol=1e-5)
    scan = mechicl.induction_scan(smollm2, scores=["prefix_matching"], n_seeds=2,
                                  progress=False)
    df = compare_methods(maps, {"prefix_matching": scan.scores["prefix_matching"]}, k=10)
    assert len(df) == 15 + 6
    assert df[["spearman", "spearman |.|", "top-k overlap"]].notna().all().all()
    assert df.loc[df["kind"] == "induction score", "median percentile"].between(0, 100).all()


@pytest.mark.slow
def test_default_model_resampled_bansal_map_equals_the_rerun(smollm2):
    """The report's bootstrap of Bansal maps on the real model: a resample of three prompts
    (drawn 2, 0, 1 times) equals Bansal run on that prompt list, duplicates included."""
    prompts = importance_prompts("country_capital", shots=1, n=3)
    full = head_importance(smollm2, prompts=prompts, method="bansal")
    drawn = [prompts[0], prompts[0], prompts[2]]
    direct = head_importance(smollm2, prompts=drawn, method="bansal")
    again = resampled_maps(full, torch.tensor([[2.0, 0.0, 1.0]]))[0]
    assert_close(again, direct.mean, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(again, full.mean)  # the resample is a different map
