"""Head / FFN masks: checked at hook level, against hand-written hooks and per-prompt loops.

A mask must zero (or mean-replace, or scale) exactly the components it names and nothing else;
the batched engines that stack many masked copies of the data in one forward pass
(``masked_choice_logprobs``, ``answer_losses``) must equal one mask and one prompt at a time.
"""

import contextlib

import pytest
import reference_importance as ref  # tests/reference_importance.py: slow, plain loops
import torch
from torch.testing import assert_close

import mechicl
from mechicl.analyses.evaluation import (
    answer_batch,
    answer_losses,
    choice_logprobs,
    masked_choice_logprobs,
)
from mechicl.inputs.tasks import build_prompts
from mechicl.model.masks import ActivationMeans, Mask, mean_activations, stack_hooks
from mechicl.testing import FIRST_WORD_ID, INDUCTION_MODEL_HEADS

pytestmark = pytest.mark.usefixtures("one_thread")


KINDS = ("z", "pattern", "q", "k", "v", "attn_out", "resid_mid", "mlp_out", "resid_post")


def words(model, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """``[batch, 1 + length]``: BOS then random words."""
    gen = torch.Generator().manual_seed(seed)
    body = torch.randint(FIRST_WORD_ID, model.d_vocab, (batch, length), generator=gen)
    return torch.cat([torch.full((batch, 1), model.bos_token_id), body], dim=1)


def capture(model, tokens, mask: Mask | None = None, kinds=KINDS) -> dict[tuple[str, int], torch.Tensor]:
    """Activations ``(kind, layer) -> tensor`` of one forward pass (under ``mask``)."""
    names = {model.hook_name(kind, layer): (kind, layer) for kind in kinds
             for layer in range(model.n_layers) if model.hook_name(kind, layer) in model.hook_dict}
    context = mask.applied(model) if mask is not None else contextlib.nullcontext()
    with context, torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
    return {names[name]: cache[name].clone() for name in names}


def n_hooks(model) -> int:
    """Forward hooks attached anywhere (hook points have several names: count each once)."""
    points = {id(hp): hp for hp in model.bridge.hook_dict.values()}
    return sum(len(hp._forward_hooks) for hp in points.values())


# --------------------------------------------------------------------------------------------
# Hook level: exactly what the mask says, nothing else
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer,head", [(0, 1), (1, 2)])
def test_removed_head_is_zero_and_nothing_else_in_its_layer_changes(tiny, layer, head):
    tokens = words(tiny, 2, 9)
    base = capture(tiny, tokens)
    masked = capture(tiny, tokens, Mask.remove(tiny, heads=[(layer, head)]))
    z, z0 = masked[("z", layer)], base[("z", layer)]
    assert z.shape[2] == tiny.n_heads  # query heads, also for grouped-query attention
    assert bool((z[:, :, head] == 0).all())
    assert bool((z0[:, :, head] != 0).any())
    others = [h for h in range(tiny.n_heads) if h != head]
    assert_close(z[:, :, others], z0[:, :, others], rtol=0, atol=0)
    # The mask acts on the head's output: its attention pattern, queries, keys, values and
    # everything in earlier layers are untouched.
    for kind in ("pattern", "q", "k", "v"):
        assert_close(masked[(kind, layer)], base[(kind, layer)], rtol=0, atol=0)
    for earlier in range(layer):
        for kind in KINDS:
            assert_close(masked[(kind, earlier)], base[(kind, earlier)], rtol=0, atol=0)
    # The attention output loses exactly this head's z @ W_O (b_O survives).
    lost = torch.einsum("bpd,dm->bpm", z0[:, :, head], tiny.W_O[layer, head])
    assert_close(base[("attn_out", layer)] - masked[("attn_out", layer)], lost,
                 rtol=1e-4, atol=1e-5)
    # ... and everything downstream sees it.
    assert not torch.allclose(masked[("resid_post", layer)], base[("resid_post", layer)])
    if layer + 1 < tiny.n_layers:
        assert not torch.allclose(masked[("z", layer + 1)], base[("z", layer + 1)])


def test_gqa_query_head_mask_leaves_its_kv_partner_alone(tiny_llama):
    """Heads 0 and 1 read the same KV head: removing query head 0 must not touch head 1."""
    model = tiny_llama
    assert model.n_kv_heads == 2 and model.kv_head_of(0) == model.kv_head_of(1) == 0
    tokens = words(model, 1, 12, seed=3)
    base = capture(model, tokens)
    masked = capture(model, tokens, Mask.remove(model, heads=[(0, 0)]))
    assert bool((masked[("z", 0)][:, :, 0] == 0).all())
    assert_close(masked[("z", 0)][:, :, 1:], base[("z", 0)][:, :, 1:], rtol=0, atol=0)
    assert_close(masked[("v", 0)], base[("v", 0)], rtol=0, atol=0)
    assert_close(masked[("k", 0)], base[("k", 0)], rtol=0, atol=0)
    assert masked[("k", 0)].shape[2] == 2  # the hook sees the KV heads un-expanded
    assert_close(masked[("pattern", 0)], base[("pattern", 0)], rtol=0, atol=0)
    # Same thing through hand-written hooks, on the logits.
    with torch.no_grad():
        want = model.run_with_hooks(tokens, fwd_hooks=[ref.head_hook(model, 0, 0)])
        with Mask.remove(model, heads=[(0, 0)]).applied(model):
            got = model(tokens)
    assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("layer", [0, 1])
def test_removed_ffn_is_zero_and_skips_only_its_sublayer(tiny, layer):
    tokens = words(tiny, 2, 9, seed=1)
    base = capture(tiny, tokens)
    masked = capture(tiny, tokens, Mask.remove(tiny, ffns=[layer]))
    assert bool((base[("mlp_out", layer)] != 0).any())
    assert bool((masked[("mlp_out", layer)] == 0).all())
    # The attention sublayer of the same layer and all earlier layers are unchanged ...
    for kind in ("z", "pattern", "attn_out", "resid_mid"):
        assert_close(masked[(kind, layer)], base[(kind, layer)], rtol=0, atol=0)
    for earlier in range(layer):
        for kind in KINDS:
            assert_close(masked[(kind, earlier)], base[(kind, earlier)], rtol=0, atol=0)
    # ... the block's output is its mid-residual (the MLP adds nothing, bias included) ...
    assert_close(masked[("resid_post", layer)], masked[("resid_mid", layer)], rtol=0, atol=0)
    # ... and later layers see the change.
    if layer + 1 < tiny.n_layers:
        assert not torch.allclose(masked[("z", layer + 1)], base[("z", layer + 1)])
        assert bool((masked[("mlp_out", layer + 1)] != 0).any())


def test_mean_ablation_replaces_by_the_means(tiny):
    tokens = words(tiny, 3, 10, seed=2)
    means = mean_activations(tiny, tokens)
    mask = Mask.remove(tiny, heads=[(0, 2), (1, 0)], ffns=[1], ablation="mean", means=means)
    base = capture(tiny, tokens)
    masked = capture(tiny, tokens, mask)
    for layer, head in [(0, 2), (1, 0)]:
        z = masked[("z", layer)]
        assert_close(z[:, :, head], means.z[layer, head].expand_as(z[:, :, head]),
                     rtol=0, atol=0)
    assert_close(masked[("z", 0)][:, :, [0, 1, 3]], base[("z", 0)][:, :, [0, 1, 3]],
                 rtol=0, atol=0)
    out = masked[("mlp_out", 1)]
    assert_close(out, means.mlp_out[1].expand_as(out), rtol=0, atol=0)
    assert_close(masked[("pattern", 0)], base[("pattern", 0)], rtol=0, atol=0)
    # A mean-ablated head is not a removed one.
    assert bool((means.z[0, 2] != 0).any())


def test_mean_activations_equal_reference(tiny):
    prompts = ref.copy_prompts(5)
    batch = answer_batch(tiny, prompts)
    lengths = batch.attention_mask.sum(-1).tolist()
    seqs = [batch.tokens[i, :n] for i, n in enumerate(lengths)]
    assert len(set(lengths)) > 1  # the padded tensor form really is padded
    want_z, want_mlp = ref.mean_activations_reference(tiny, seqs)
    for got in (mean_activations(tiny, batch.tokens, attention_mask=batch.attention_mask),
                mean_activations(tiny, [s.tolist() for s in seqs], batch_tokens=20)):
        assert got.n_tokens == sum(n - 1 for n in lengths)
        assert_close(got.z.double(), want_z, rtol=1e-5, atol=1e-6)
        assert_close(got.mlp_out.double(), want_mlp, rtol=1e-5, atol=1e-6)
    with_bos = mean_activations(tiny, [s.tolist() for s in seqs], skip_bos=False)
    assert with_bos.n_tokens == sum(lengths)
    assert not torch.allclose(with_bos.z, got.z)


def test_mean_activations_on_attention_only_model(induction_toy):
    tokens = words(induction_toy, 2, 8)
    means = mean_activations(induction_toy, tokens)
    want_z, _ = ref.mean_activations_reference(induction_toy, list(tokens))
    assert_close(means.z.double(), want_z, rtol=1e-5, atol=1e-6)


def test_scaling_multiplies_outputs(tiny_gpt2):
    model = tiny_gpt2
    tokens = words(model, 2, 9, seed=4)
    heads = torch.ones(model.n_layers, model.n_heads)
    heads[0, 3] = 2.0
    ffn = torch.tensor([0.5, 1.0])
    base = capture(model, tokens)
    masked = capture(model, tokens, Mask(heads=heads, ffn=ffn))
    assert_close(masked[("z", 0)][:, :, 3], 2 * base[("z", 0)][:, :, 3], rtol=0, atol=0)
    assert_close(masked[("z", 0)][:, :, :3], base[("z", 0)][:, :, :3], rtol=0, atol=0)
    assert_close(masked[("pattern", 0)], base[("pattern", 0)], rtol=0, atol=0)
    # mlp_out of layer 0 sees the doubled head through its input: compare with hand hooks.
    hooks = [ref.head_hook(model, 0, 3, factor=2.0),
             ("blocks.0.hook_mlp_out", lambda out, hook: out * 0.5)]
    with torch.no_grad():
        want = model.run_with_hooks(tokens, fwd_hooks=hooks)
        with Mask(heads=heads, ffn=ffn).applied(model):
            got = model(tokens)
    assert_close(got, want, rtol=0, atol=1e-6)
    assert not torch.allclose(got, model(tokens))


# --------------------------------------------------------------------------------------------
# Composition, serialisation, errors, clean-up
# --------------------------------------------------------------------------------------------


def test_composition_multiplies_and_conflicts_raise(tiny_gpt2):
    model = tiny_gpt2
    a = Mask.remove(model, heads=[(0, 1)], ffns=[1])
    b = Mask.remove(model, heads=[(1, 2)])
    both = a & b
    assert both.removed_heads == [(0, 1), (1, 2)] and both.removed_ffns == [1]
    scale = torch.ones(2, 4)
    scale[0, 1], scale[1, 3] = 2.0, 0.5
    half = torch.ones(2, 4)
    half[0, 1] = 0.5
    combo = Mask(heads=scale, ffn=torch.ones(2)) & Mask(heads=half, ffn=torch.tensor([1.0, 3.0]))
    assert_close(combo.heads, scale * half, rtol=0, atol=0)
    assert_close(combo.ffn, torch.tensor([1.0, 3.0]), rtol=0, atol=0)
    assert combo.heads[0, 1] == 1.0 and not combo.is_identity
    tokens = words(model, 2, 8)
    hooks = [ref.head_hook(model, 0, 1), ref.head_hook(model, 1, 2), ref.zero_mlp_hook(model, 1)]
    with torch.no_grad():
        want = model.run_with_hooks(tokens, fwd_hooks=hooks)
        with both.applied(model):
            got = model(tokens)
        with a.applied(model), b.applied(model):  # nested contexts compose as well
            nested = model(tokens)
    assert_close(got, want, rtol=0, atol=1e-6)
    assert_close(nested, want, rtol=0, atol=1e-6)
    # Ablations must agree, unless one side keeps everything.
    means = mean_activations(model, tokens)
    mean_mask = Mask.remove(model, heads=[(1, 0)], ablation="mean", means=means)
    with pytest.raises(ValueError, match="'zero'.*'mean'"):
        _ = a & mean_mask
    kept = Mask.keep_all(model) & mean_mask
    assert kept.ablation == "mean" and kept.means is means and kept == mean_mask
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(3, 4\)"):
        _ = a & Mask.keep_all((3, 4))
    with pytest.raises(TypeError):
        _ = a & 1


def test_composition_keeps_the_means_of_the_masking_side():
    shape = (2, 4)
    zeros = ActivationMeans(z=torch.zeros(2, 4, 3), mlp_out=torch.zeros(2, 5), n_tokens=1)
    ones = ActivationMeans(z=torch.ones(2, 4, 3), mlp_out=torch.ones(2, 5), n_tokens=1)
    knock = Mask.remove(shape, heads=[(0, 1)], ablation="mean", means=ones)
    combined = Mask.keep_all(shape, ablation="mean", means=zeros) & knock
    assert combined.means is ones  # the identity mask's means must not replace knock's


def test_json_roundtrip(tiny_gpt2, tmp_path):
    model = tiny_gpt2
    heads = torch.ones(2, 4)
    heads[0, 1], heads[1, 3] = 0.0, 0.25
    mask = Mask(heads=heads, ffn=torch.tensor([1.0, 0.0]))
    data = mask.to_dict()
    assert data["removed_heads"] == [[0, 1]] and data["removed_ffns"] == [1]
    assert data["n_layers"] == 2 and data["n_heads"] == 4 and data["ablation"] == "zero"
    back = Mask.from_json(mask.to_json())
    assert back == mask and back.key() == mask.key()
    assert Mask.load(mask.save(tmp_path / "mask.json")) == mask
    means = mean_activations(model, words(model, 2, 6))
    mean_mask = Mask.remove(model, heads=[(1, 1)], ffns=[0], ablation="mean", means=means)
    back = Mask.load(mean_mask.save(tmp_path / "mean.json"))
    assert back == mean_mask and back.ablation == "mean"
    assert_close(back.means.z, means.z, rtol=0, atol=0)
    assert back.means.n_tokens == means.n_tokens
    tokens = words(model, 1, 7, seed=9)
    with torch.no_grad():
        with mean_mask.applied(model):
            want = model(tokens)
        with back.applied(model):
            got = model(tokens)
    assert_close(got, want, rtol=0, atol=0)
    assert mean_mask != Mask.remove(model, heads=[(1, 1)], ffns=[0])
    with pytest.raises(ValueError, match="kind='HeadScores'"):
        Mask.from_dict({**data, "kind": "HeadScores"})
    with pytest.raises(ValueError, match=r"\[3, 4\]"):
        Mask.from_dict({**data, "n_layers": 3})


def test_bad_masks_raise_naming_the_bad_value(tiny_gpt2):
    model = tiny_gpt2
    # Under pytest the jaxtyping/beartype hook may reject shapes and literals first (a
    # TypeError showing the value); without it mechicl raises the ValueError.
    with pytest.raises((ValueError, TypeError), match=r"f32\[2\]|\(2,\)"):
        Mask(heads=torch.ones(2), ffn=torch.ones(2))
    with pytest.raises((ValueError, TypeError), match=r"f32\[3\]|\(3,\)"):
        Mask(heads=torch.ones(2, 4), ffn=torch.ones(3))
    with pytest.raises((ValueError, TypeError), match="random"):
        Mask.keep_all(model, ablation="random")
    with pytest.raises(ValueError, match="finite"):
        Mask(heads=torch.full((2, 4), float("nan")), ffn=torch.ones(2))
    with pytest.raises(ValueError, match=r"\(2, 0\)"):
        Mask.remove(model, heads=[(2, 0)])
    with pytest.raises(ValueError, match=r"\(0, 4\)"):
        Mask.remove(model, heads=[(0, 4)])
    with pytest.raises(ValueError, match=r"\(-1, 0\)"):
        Mask.remove(model, heads=[(-1, 0)])
    with pytest.raises(ValueError, match=r"FFN layer=5: need an integer in 0\.\.1"):
        Mask.remove(model, ffns=[5])
    with pytest.raises(ValueError, match="means"):
        Mask.remove(model, heads=[(0, 0)], ablation="mean")
    means = mean_activations(model, words(model, 1, 5))
    with pytest.raises(ValueError, match=r"\(2, 4\).*\[3, 4\]"):
        Mask.remove((3, 4), heads=[(2, 0)], ablation="mean", means=means)
    wrong = Mask.remove((3, 4), heads=[(2, 0)])
    with pytest.raises(ValueError, match=r"\(3, 4\).*\[2, 4\]"), wrong.applied(model):
        pass
    # Masks stacked in one pass must share ablation and means.
    other = mean_activations(model, words(model, 1, 5, seed=7))
    prompts = ref.copy_prompts(2)
    zero = Mask.remove(model, heads=[(0, 0)])
    m1 = Mask.remove(model, heads=[(0, 0)], ablation="mean", means=means)
    m2 = Mask.remove(model, heads=[(0, 1)], ablation="mean", means=other)
    with pytest.raises(ValueError, match="one ablation"):
        masked_choice_logprobs(model, prompts, [zero, m1])
    with pytest.raises(ValueError, match="same mean activations"):
        masked_choice_logprobs(model, prompts, [m1, m2])
    with pytest.raises(ValueError, match="rows_per_mask"):
        stack_hooks(model, [zero, zero], rows_per_mask=None)
    with pytest.raises(ValueError, match="no masks"):
        masked_choice_logprobs(model, prompts, [])
    assert n_hooks(model) == 0


def test_hooks_are_removed_after_the_context(tiny_llama):
    model = tiny_llama
    tokens = words(model, 1, 8)
    with torch.no_grad():
        before = model(tokens)
    mask = Mask.remove(model, heads=[(0, 1), (1, 3)], ffns=[0])
    assert n_hooks(model) == 0
    with mask.applied(model) as inside:
        assert inside is model or inside.bridge is model.bridge
        assert n_hooks(model) == 3
        with torch.no_grad():
            assert not torch.allclose(model(tokens), before)
    assert n_hooks(model) == 0
    with pytest.raises(RuntimeError, match="boom"), mask.applied(model):
        raise RuntimeError("boom")
    assert n_hooks(model) == 0
    # Identity layers get no hook at all.
    assert len(Mask.remove(model, heads=[(1, 0)]).hooks(model)) == 1
    assert Mask.keep_all(model).hooks(model) == []
    with torch.no_grad():
        assert_close(model(tokens), before, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Batched engines under many masks = one mask, one prompt at a time
# --------------------------------------------------------------------------------------------


def some_masks(model) -> list[Mask]:
    scaled = torch.ones(model.n_layers, model.n_heads)
    scaled[1, 1] = 1.7
    return [Mask.keep_all(model), Mask.remove(model, heads=[(0, 1)]),
            Mask.remove(model, heads=[(1, 2), (0, 3)], ffns=[0]),
            Mask(heads=scaled, ffn=torch.tensor([1.0, 0.0]))]


def mask_hooks(model, mask: Mask) -> list:
    """Hand-written hooks doing what ``mask`` says (zero ablation and scales)."""
    hooks = []
    for layer in range(model.n_layers):
        for head in range(model.n_heads):
            value = float(mask.heads[layer, head])
            if value != 1.0:
                hooks.append(ref.head_hook(model, layer, head, factor=value))
        if float(mask.ffn[layer]) != 1.0:
            factor = float(mask.ffn[layer])
            hooks.append((f"blocks.{layer}.hook_mlp_out",
                          lambda out, hook, f=factor: out * f))
    return hooks


@pytest.mark.parametrize("model_name", ["tiny_gpt2", "tiny_llama"])
def test_masked_choice_logprobs_equal_one_mask_at_a_time(request, model_name):
    model = request.getfixturevalue(model_name)
    prompts = ref.copy_prompts(6)
    masks = some_masks(model)
    loglik, n_tok = masked_choice_logprobs(model, prompts, masks)
    assert loglik.shape == (len(masks), 6, 3) and loglik.dtype == torch.float64
    # one mask per forward pass (the budget only fits one copy of each batch)
    small, small_n = masked_choice_logprobs(model, prompts, masks, batch_tokens=8)
    assert_close(small, loglik, rtol=1e-5, atol=1e-5)
    assert torch.equal(small_n, n_tok)
    for m, mask in enumerate(masks):
        single, single_n = choice_logprobs(model, prompts, mask=mask)
        assert_close(single, loglik[m], rtol=1e-5, atol=1e-5)
        assert torch.equal(single_n, n_tok)
        want = torch.tensor([ref.ref_choice_logliks(model, p, mask_hooks(model, mask))
                             for p in prompts], dtype=torch.float64)
        assert_close(loglik[m], want, rtol=1e-5, atol=1e-5)
    assert_close(choice_logprobs(model, prompts)[0], loglik[0], rtol=1e-5, atol=1e-5)
    for m in range(1, len(masks)):  # every mask changes the scores
        assert (loglik[m] - loglik[0]).abs().max() > 1e-3
    want_n = [[len(model.tokenizer(c, add_special_tokens=False)["input_ids"])
               for c in p.continuations] for p in prompts]
    assert n_tok.tolist() == want_n and max(max(r) for r in want_n) == 2


def test_masked_choice_logprobs_pad_missing_choices(tiny_gpt2):
    prompts = ref.copy_prompts(3)
    prompts[0] = mechicl.Prompt(id="short", text=prompts[0].text,
                                continuations=prompts[0].continuations[:2], gold=0)
    loglik, n_tok = masked_choice_logprobs(tiny_gpt2, prompts, some_masks(tiny_gpt2)[:2])
    assert bool(torch.isneginf(loglik[:, 0, 2]).all()) and n_tok[0, 2] == 0
    assert bool(torch.isfinite(loglik[:, 1:]).all())


@pytest.mark.parametrize("model_name", ["tiny_gpt2", "tiny_llama"])
def test_answer_losses_equal_per_prompt_loop(request, model_name):
    model = request.getfixturevalue(model_name)
    prompts = ref.copy_prompts(6)
    batch = answer_batch(model, prompts)
    masks = some_masks(model)
    losses = answer_losses(model, batch, masks)
    assert losses.shape == (len(masks), 6)
    want = torch.tensor([[ref.ref_answer_loss(model, p, mask_hooks(model, mask)) for p in prompts]
                         for mask in masks], dtype=torch.float64)
    assert_close(losses, want, rtol=1e-5, atol=1e-5)
    assert_close(answer_losses(model, batch, masks, batch_tokens=10), want, rtol=1e-5, atol=1e-5)
    assert_close(answer_losses(model, batch)[0], want[0], rtol=1e-5, atol=1e-5)
    assert (want[1:] - want[0]).abs().amax(-1).min() > 1e-3


# --------------------------------------------------------------------------------------------
# mask= of evaluate and induction_scan
# --------------------------------------------------------------------------------------------


def test_evaluate_with_mask_equals_explicit_hooks(tiny_gpt2):
    model = tiny_gpt2
    task = ref.copy_task(30)
    mask = Mask.remove(model, heads=[(0, 0), (1, 3)], ffns=[0])
    hooks = [ref.head_hook(model, 0, 0), ref.head_hook(model, 1, 3), ref.zero_mlp_hook(model, 0)]
    result = mechicl.evaluate(model, task, shots=1, n=10, mask=mask)
    prompts = build_prompts(task, shots=1, n=10)
    want_ll = [ref.ref_choice_logliks(model, p, hooks) for p in prompts]
    want_correct = [ref.ref_correct(model, p, hooks) for p in prompts]
    assert result.predictions["correct"].tolist() == want_correct
    assert result.accuracy == sum(want_correct) / len(prompts)
    for got, want in zip(result.predictions["loglik"], want_ll, strict=True):
        assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                     rtol=1e-5, atol=1e-5)
    with model.hooks(fwd_hooks=hooks):
        hooked = mechicl.evaluate(model, task, shots=1, n=10)
    assert hooked.accuracy == result.accuracy
    assert hooked.predictions["prediction"].tolist() == result.predictions["prediction"].tolist()
    assert result.params["mask"] == mask.to_dict() and hooked.params["mask"] is None
    plain = mechicl.evaluate(model, task, shots=1, n=10)
    assert plain.predictions["loglik"].tolist() != result.predictions["loglik"].tolist()


def test_induction_scan_with_mask(induction_toy):
    """Removing the previous-token head (0, 1) kills the induction head's prefix matching (it
    finds no previous-token information to match and sinks onto BOS); its own attention pattern
    (previous-token score) is untouched, since masks act on head outputs."""
    def short(s):
        return 6 + 2 * s

    model = induction_toy
    scores = ("prefix_matching", "previous_token")
    il, ih = INDUCTION_MODEL_HEADS["induction"]
    pl, ph = INDUCTION_MODEL_HEADS["previous_token"]
    plain = mechicl.induction_scan(model, scores=scores, n_seeds=3, length=short, progress=False)
    mask = Mask.remove(model, heads=[(pl, ph)])
    knocked = mechicl.induction_scan(model, scores=scores, n_seeds=3, length=short, mask=mask,
                                     progress=False)
    distractor = mechicl.induction_scan(model, scores=scores, n_seeds=3, length=short,
                                        mask=Mask.remove(model, heads=[(1, 0)]), progress=False)
    pm0, pm1 = plain.scores["prefix_matching"].mean, knocked.scores["prefix_matching"].mean
    assert pm0[il, ih] > 0.9 and pm1[il, ih] < 0.05
    # layer 0 attends exactly as before (layer 1 reads a changed residual stream)
    assert_close(knocked.scores["previous_token"].mean[0], plain.scores["previous_token"].mean[0],
                 rtol=0, atol=1e-6)
    assert knocked.scores["previous_token"].mean[pl, ph] > 0.9
    assert_close(distractor.scores["prefix_matching"].mean[il, ih], pm0[il, ih], rtol=0, atol=1e-6)
    assert (knocked.loss_later_copies > 2 * plain.loss_later_copies + 1).all()
    assert knocked.scores["prefix_matching"].params["mask"] == mask.to_dict()
    assert "mask" not in plain.scores["prefix_matching"].params
    assert n_hooks(model) == 0


def test_conflicting_means_and_ffn_masks_without_mlps_raise(induction_toy):
    shape = (2, 4)
    zeros = ActivationMeans(z=torch.zeros(2, 4, 3), mlp_out=torch.zeros(2, 5), n_tokens=1)
    ones = ActivationMeans(z=torch.ones(2, 4, 3), mlp_out=torch.ones(2, 5), n_tokens=1)
    a = Mask.remove(shape, heads=[(0, 1)], ablation="mean", means=ones)
    b = Mask.remove(shape, heads=[(1, 1)], ablation="mean", means=zeros)
    with pytest.raises(ValueError, match="different means"):
        _ = a & b
    with pytest.raises(ValueError, match="MLP of layer 0.*attention-only"):
        Mask.remove(induction_toy, ffns=[0]).hooks(induction_toy)


def test_float64_means_round_trip_exactly():
    means = ActivationMeans(z=torch.rand(2, 4, 3, dtype=torch.float64),
                            mlp_out=torch.rand(2, 5, dtype=torch.float64), n_tokens=3)
    mask = Mask.remove((2, 4), heads=[(0, 1)], ablation="mean", means=means)
    back = Mask.from_json(mask.to_json())
    assert back == mask and back.means.z.dtype == torch.float64


def test_none_among_several_masks_means_unmasked(tiny_gpt2):
    prompts = ref.copy_prompts(3)
    knock = Mask.remove(tiny_gpt2, heads=[(1, 2)])
    got, _ = masked_choice_logprobs(tiny_gpt2, prompts, [None, knock])
    plain, _ = masked_choice_logprobs(tiny_gpt2, prompts, None)
    masked, _ = masked_choice_logprobs(tiny_gpt2, prompts, [knock])
    # the same up to float32 rounding: the copies' pass holds one prompt, the plain one three
    assert_close(got[0], plain[0], rtol=1e-6, atol=1e-6)
    assert_close(got[1], masked[0])
    assert not torch.allclose(got[0], got[1])
