"""Head and FFN importance: batched, vectorised scores equal slow one-prompt-at-a-time references
(tests/reference_importance.py), and find the hand-built induction head."""

import math

import pytest
import reference_importance as ref  # tests/reference_importance.py: slow, plain loops
import torch
from torch.testing import assert_close

import mechicl
from mechicl.analyses.evaluation import answer_batch
from mechicl.analyses.importance import ffn_importance, head_importance, importance_prompts
from mechicl.model import as_hooked_model
from mechicl.model.masks import Mask
from mechicl.results import HeadScores, LayerScores
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
    assert imp.params["prompt_ids"] == [p.id for p in prompts]
    assert [t.tolist() for t in imp.tokens] == [
        batch.tokens[i, :n].tolist() for i, n in enumerate(batch.attention_mask.sum(-1).tolist())]


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


def test_normalize_layers_gives_unit_norm_per_layer(tiny_llama, prompts):
    for method in ("bansal", "michel", "ablation"):
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


@pytest.mark.parametrize("method", ["bansal", "michel", "ablation"])
def test_induction_toy_ranks_its_induction_head_first(induction_toy, method):
    """On a copy task (the answer is what followed the earlier occurrence of the last token)
    the induction head (1, 2) matters most, then the previous-token head (0, 1) feeding it; the
    distractor heads write only into a subspace nothing reads, so they score exactly 0.

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
