"""Shared-context choice scoring (issue 20) equals the per-choice rows it replaces.

The reference is ``scoring="rows"``: every choice its own row (context + choice), full logits,
as the scoring was before; tests/reference_importance.py checks that path against plain loops.
Here: the shared path (one prompt per pass with a growing batch, several packed left-padded
prompts, masks split over passes) against it, on every tiny architecture and, marked slow, on
every built-in task of the default model.
"""

import pytest
import reference_importance as ref  # tests/reference_importance.py: slow, plain loops
import torch
from torch.testing import assert_close

import mechicl
from mechicl._batching import CPU_PASS_TOKENS, device_batch_tokens
from mechicl.analyses.evaluation import (
    _shared_passes,
    answer_batch,
    answer_losses,
    encode_prompt,
    masked_choice_logprobs,
    shared_context_scores,
    shared_context_supported,
)
from mechicl.analyses.importance import ffn_importance, head_importance
from mechicl.inputs.tasks import TASKS, build_prompts, load_task
from mechicl.model.masks import Mask, stack_hooks


def prompts_of_mixed_shapes() -> list[mechicl.Prompt]:
    """Contexts of different lengths; single- and multi-token choices; a missing choice."""
    return [
        mechicl.Prompt(id="a", text="a b c d", continuations=(" e f", " g", " h a b c"), gold=0),
        mechicl.Prompt(id="b", text="a b c d e f g", continuations=(" e", " g"), gold=1),
        mechicl.Prompt(id="c", text="a", continuations=(" e", " g h"), gold=0),
        mechicl.Prompt(id="d", text="a b a b a b", continuations=(" a", " b", " c"), gold=2),
    ]


def masks_of(model) -> list[Mask | None]:
    scaled = torch.ones(model.n_layers, model.n_heads)
    scaled[1, 1] = 1.7
    return [None, Mask.remove(model, ffns=[1]), Mask.remove(model, heads=[(0, 1)]),
            Mask.keep_all(model), Mask.remove(model, heads=[(1, 1)], ffns=[0]),
            Mask(heads=scaled, ffn=torch.ones(model.n_layers))]


@pytest.mark.parametrize("batch_tokens", [4, 12, 40, 4096])
def test_shared_scoring_equals_rows_on_every_architecture(tiny, batch_tokens):
    """4: every prompt alone and its masks one per pass; 12/40: packed prompts and split masks;
    4096: everything in one pass."""
    prompts, masks = prompts_of_mixed_shapes(), masks_of(tiny)
    assert shared_context_supported(tiny)
    want, want_n = masked_choice_logprobs(tiny, prompts, masks, scoring="rows")
    got, got_n = masked_choice_logprobs(tiny, prompts, masks, scoring="shared",
                                        batch_tokens=batch_tokens)
    assert torch.equal(got_n, want_n)
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))  # the missing choice
    finite = torch.isfinite(want)
    assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)
    for m in range(1, len(masks)):  # the masks change the scores, so equality means something
        if m != 3:  # Mask.keep_all
            assert (want[m] - want[0])[finite[0]].abs().max() > 1e-3
    # and against plain loops, one prompt, one choice and one mask at a time
    plain = torch.tensor([ref.ref_choice_logliks(tiny, p, [])[:2] for p in prompts])
    assert_close(got[0, :, :2], plain.double(), rtol=1e-5, atol=1e-5)


def test_one_prompt_grows_the_batch_and_several_are_left_padded(tiny_llama):
    """Both kinds of pass of shared_context_scores, directly: row 0 is the unmasked model."""
    model = tiny_llama
    encoded = [encode_prompt(model, p) for p in prompts_of_mixed_shapes()]
    masks = sorted([Mask.remove(model, ffns=[1]), Mask.remove(model, heads=[(0, 2)])],
                   key=lambda m: m.first_layer)
    together = shared_context_scores(model, encoded, masks)  # [prompt, row, choice]
    assert together.shape == (4, 3, 3)
    for i, enc in enumerate(encoded):
        alone = shared_context_scores(model, [enc], masks)[0]
        n = len(enc[1])
        assert_close(together[i, :, :n], alone[:, :n], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="ordered by their first layer"):
        shared_context_scores(model, encoded[:1], masks[::-1])


def test_passes_cover_every_prompt_and_mask_once_within_the_budget():
    lengths = [30, 5, 12, 12, 3, 200]
    for n_masked in (0, 1, 7):
        for budget in (1, 40, 100, 10_000):
            passes = _shared_passes(lengths, n_masked, budget)
            seen = [(p, m) for group, (lo, hi) in passes for p in group
                    for m in (range(lo, hi) if n_masked else [None])]
            want = [(p, m) for p in range(len(lengths))
                    for m in (range(n_masked) if n_masked else [None])]
            assert sorted(seen, key=str) == sorted(want, key=str)
            for group, (lo, hi) in passes:
                rows = len(group) * (1 + hi - lo)
                # over budget only when one prompt with one mask cannot fit
                assert rows * max(lengths[p] for p in group) <= budget or (
                    len(group) == 1 and hi - lo <= 1)


def test_models_unembed_only_the_positions_kept(tiny):
    """Gradient importance and the context pass rely on ``logits_to_keep`` (answer positions,
    the last position) reaching the Hugging Face model through the bridge."""
    tokens = torch.arange(3, 10)[None]
    with torch.no_grad():
        full = tiny(tokens, return_type="logits")
        kept = tiny.run_with_hooks(tokens, return_type="logits",
                                   logits_to_keep=torch.tensor([1, 4]))
        last = tiny(tokens, return_type="logits", logits_to_keep=1)
    assert kept.shape[1] == 2 and last.shape[1] == 1
    assert_close(kept, full[:, [1, 4]], rtol=1e-5, atol=1e-5)
    assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-5)


def test_masks_join_at_their_first_layer():
    assert Mask.keep_all((3, 2)).first_layer == 3
    assert Mask.remove((3, 2), heads=[(2, 0)], ffns=[1]).first_layer == 1
    scaled = torch.ones(3, 2)
    scaled[0, 1] = 0.5
    assert Mask(heads=scaled, ffn=torch.ones(3)).first_layer == 0


def test_mask_hooks_gate_the_rows_present_in_a_growing_batch(tiny_llama):
    """stack_hooks on a batch with fewer rows than masks gates its first rows."""
    model = tiny_llama
    masks = [Mask.remove(model, heads=[(0, 0)]), Mask.remove(model, heads=[(0, 1)])]
    name, hook = stack_hooks(model, masks, rows_per_mask=1)[0]
    z = torch.ones(1, 3, model.n_heads, model.d_head)
    out = hook(z, None)
    assert out.shape == z.shape and float(out[0, :, 0].abs().sum()) == 0.0
    assert float(out[0, :, 1].abs().sum()) > 0


def test_a_model_without_a_kv_cache_falls_back_to_rows(induction_toy):
    assert not shared_context_supported(induction_toy)
    toks = list(range(3, 12))
    tok = induction_toy.tokenizer.decode
    prompts = [mechicl.Prompt(id="x", text=tok(toks[:6]), continuations=(tok(toks[6:8]),
                                                                          tok(toks[8:9])), gold=0)]
    auto, _ = masked_choice_logprobs(induction_toy, prompts, None)
    rows, _ = masked_choice_logprobs(induction_toy, prompts, None, scoring="rows")
    assert torch.equal(auto, rows)


def test_device_batch_tokens_caps_only_the_cpu():
    assert device_batch_tokens(torch.device("cpu"), 10**6) == CPU_PASS_TOKENS
    assert device_batch_tokens(torch.device("cpu"), 7) == 7
    assert device_batch_tokens(torch.device("meta"), 10**6) == 10**6


@pytest.mark.parametrize("model_name", ["tiny_gpt2", "tiny_llama"])
def test_knockout_losses_equal_answer_losses(request, model_name):
    """FFN / ablation importance with the loss metric now scores the gold answer by shared
    context; answer_losses (full rows, checked against loops in test_masks.py) is the reference."""
    model = request.getfixturevalue(model_name)
    prompts = ref.copy_prompts(5)
    masks = [Mask.keep_all(model)] + [Mask.remove(model, ffns=[layer])
                                      for layer in range(model.n_layers)]
    want = answer_losses(model, answer_batch(model, prompts), masks)
    got = ffn_importance(model, prompts=prompts, metric="loss")
    assert_close(got.per_seed.T, (want[1:] - want[0]), rtol=1e-5, atol=1e-6)
    heads = head_importance(model, prompts=prompts, method="ablation", metric="loss")
    head_masks = [Mask.keep_all(model)] + [Mask.remove(model, heads=[(la, h)])
                                           for la in range(model.n_layers)
                                           for h in range(model.n_heads)]
    want_h = answer_losses(model, answer_batch(model, prompts), head_masks)
    assert_close(heads.per_seed.reshape(len(prompts), -1), (want_h[1:] - want_h[0]).T,
                 rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_shared_scoring_equals_rows_on_every_built_in_task(smollm2):
    """The issue's acceptance: on the default model, every built-in task at 0 and 5 shots,
    log-likelihoods within 1e-4 and identical predictions; and under FFN masks."""
    assert shared_context_supported(smollm2)
    worst = 0.0
    for name in sorted(TASKS):
        task = load_task(name)
        for shots in (0, 5):
            prompts = build_prompts(task, shots=shots, n=4, seed=1)
            want, want_n = masked_choice_logprobs(smollm2, prompts, None, scoring="rows")
            got, got_n = masked_choice_logprobs(smollm2, prompts, None, scoring="shared")
            assert torch.equal(got_n, want_n), name
            finite = torch.isfinite(want)
            diff = float((got[finite] - want[finite]).abs().max())
            worst = max(worst, diff)
            assert diff <= 1e-4, (name, shots, diff)
            assert torch.equal(got.argmax(-1), want.argmax(-1)), (name, shots)
    assert worst > 0  # two different computations, not one path twice
    prompts = build_prompts(load_task("antonyms"), shots=1, n=3, seed=0)
    masks = [Mask.remove(smollm2, ffns=[layer]) for layer in (0, 7, 29)]
    want, _ = masked_choice_logprobs(smollm2, prompts, masks, scoring="rows")
    got, _ = masked_choice_logprobs(smollm2, prompts, masks, scoring="shared", batch_tokens=64)
    finite = torch.isfinite(want)
    assert float((got[finite] - want[finite]).abs().max()) <= 1e-4


def test_evaluate_masks_equals_evaluate_per_mask(tiny_llama):
    model = tiny_llama
    task = ref.copy_task(12)
    masks = [None, Mask.remove(model, ffns=[0]), Mask.remove(model, heads=[(1, 0), (1, 2)])]
    results = mechicl.evaluate_masks(model, task, masks, shots=1, seed=3)
    assert len(results) == 3
    for mask, got in zip(masks, results, strict=True):
        want = mechicl.evaluate(model, task, shots=1, seed=3, mask=mask)
        assert got.accuracy == want.accuracy and got.params == want.params
        assert_close(torch.tensor(got.predictions.loglik.tolist()),
                     torch.tensor(want.predictions.loglik.tolist()), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="masks is empty"):
        mechicl.evaluate_masks(model, task, [], shots=1)
