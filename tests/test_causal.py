"""The causal check of induction scores (mechicl.analyses.causal): every number equals a slow,
obviously-correct reference (one sequence or prompt at a time, hand-written hooks or a plain
`mechicl.evaluate` under each mask, a literal loop over the bootstrap weights), the head sets
are the right ones, and the analyses go through the registry, the store and `load_result`."""

import dataclasses
import inspect
import json
import math

import numpy as np
import pytest
import reference_importance as ref  # tests/reference_importance.py: hand-written hooks, tasks
import torch

import mechicl
from mechicl.analyses import ANALYSES, OptionError
from mechicl.analyses.causal import (
    INDUCTION_ABLATION,
    INDUCTION_ABLATION_TASK,
    InductionAblation,
    ablate_induction_accuracy,
    ablate_induction_loss,
    ablation_difference,
    head_sets,
    random_heads,
    scan_input,
    top_heads,
)
from mechicl.analyses.pruning import PRUNING, evaluation_prompts, ranking_inputs, split_prompts
from mechicl.experiments.outputs import model_folder
from mechicl.model.masks import Mask
from mechicl.results import ResultError
from mechicl.stats import bootstrap_weights

pytestmark = pytest.mark.usefixtures("one_thread")

L, N_SEQ, SKIP = 6, 3, 2  # tiny vocabulary: short sequences
KS, DRAWS = [1, 3], 20


def flat_to_pairs(flat, n_heads):
    return [(int(i) // n_heads, int(i) % n_heads) for i in flat if int(i) >= 0]


def distinct_scores(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(model.n_layers, model.n_heads, generator=gen, dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# Head sets
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_top_heads_are_exactly_the_k_highest(seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (6, 5), generator=gen).double()  # many ties
    flat = scores.flatten().tolist()
    for k in (1, 2, 5, 13, 30):
        got = top_heads(scores, k).tolist()
        # literal: sort (score descending, index ascending), take k
        want = sorted(range(len(flat)), key=lambda i: (-flat[i], i))[:k]
        assert got == want
        assert min(flat[i] for i in got) >= max(
            [flat[i] for i in range(len(flat)) if i not in got], default=-1)
    assert flat_to_pairs(top_heads(scores, 7), 5) == mechicl.HeadScores.from_per_seed(
        "s", scores[None]).top_heads(7)
    with pytest.raises(ValueError, match="NaN or inf"):
        top_heads(torch.tensor([[1.0, float("nan")]]), 1)


def test_random_draws_are_seeded_distinct_of_size_k_and_exclude_nothing():
    total, k, draws = 270, 5, 20
    a = random_heads(total, k, draws, seed=3)
    assert a.shape == (draws, k) and a.dtype == torch.long
    assert torch.equal(a, random_heads(total, k, draws, seed=3))  # reproducible
    assert not torch.equal(a, random_heads(total, k, draws, seed=4))  # seeded
    for row in a.tolist():
        assert len(set(row)) == k and row == sorted(row) and 0 <= min(row) and max(row) < total
    assert len({tuple(row) for row in a.tolist()}) == draws  # the draws differ
    # more draws extend the same sequence of draws; another k draws independently
    assert torch.equal(random_heads(total, k, 40, seed=3)[:draws], a)
    assert not torch.equal(random_heads(total, 6, draws, seed=3)[:, :5], a)
    # every head can be drawn, the top heads included: over many draws each appears, and the
    # share of draws holding a given head is k / total
    many = random_heads(40, 5, 4000, seed=0)
    counts = torch.bincount(many.flatten(), minlength=40).double()
    assert (counts > 0).all()
    assert torch.allclose(counts / 4000, torch.full((40,), 5 / 40, dtype=torch.float64), atol=0.03)
    # the draws are what numpy gives for [seed, k, draw, 7919]
    rng = np.random.default_rng([3, k, 7, 7919])
    assert a[7].tolist() == sorted(rng.choice(total, size=k, replace=False).tolist())


def test_head_sets_layout():
    scores = torch.rand(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sets = head_sets(scores, [2, 5], draws=DRAWS, seed=9)
    assert sets.shape == (2, 1 + DRAWS, 5)
    assert sets[0, 0, :2].tolist() == top_heads(scores, 2).tolist()
    assert sets[1, 0].tolist() == top_heads(scores, 5).tolist()
    assert (sets[0, :, 2:] == -1).all() and (sets[1] >= 0).all()
    assert torch.equal(sets[0, 1:, :2], random_heads(12, 2, DRAWS, seed=9))
    assert torch.equal(sets[1, 1:], random_heads(12, 5, DRAWS, seed=9))


# --------------------------------------------------------------------------------------------
# The later-copy loss against a literal reference
# --------------------------------------------------------------------------------------------


def reference_sequences(model, n, length, skip, seed=0):
    """BOS + L distinct tokens x 4, drawn by numpy.default_rng([seed, s]) from the middle of the
    frequency ranking, for s = skip .. skip + n - 1 (the scan's protocol, written out)."""
    pool = model.frequency_ranking.middle(0.04, 0.04)
    out = []
    for s in range(skip, skip + n):
        rng = np.random.default_rng([seed, s])
        base = pool[torch.from_numpy(rng.choice(len(pool), size=length, replace=False))]
        out.append(torch.cat([torch.tensor([model.bos_token_id]), base.repeat(4)]))
    return out


def reference_later_loss(model, tokens, length, hooks):
    """One sequence, a plain forward with the hooks, cross-entropy written out per position:
    the tokens of copies 2.. except the first of copy 2 (positions L + 2 ..)."""
    with torch.no_grad():
        logits = model.run_with_hooks(tokens[None], fwd_hooks=list(hooks),
                                      return_type="logits")[0].double()
    losses = []
    for t in range(length + 2, len(tokens)):
        logp = torch.log_softmax(logits[t - 1], -1)
        losses.append(-float(logp[tokens[t]]))
    return sum(losses) / len(losses)


def reference_hooks(model, heads, means_z=None):
    return [ref.head_hook(model, layer, head, 0.0 if means_z is None else means_z[layer, head])
            for layer, head in heads]


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_later_copy_loss_equals_a_literal_reference(tiny, ablation):
    model = tiny
    scores = distinct_scores(model)
    result = ablate_induction_loss(model, scores, ks=KS, draws=DRAWS, ablation=ablation,
                                   n_seeds=N_SEQ, length=L, skip=SKIP, seed=0, batch_tokens=100)
    seqs = reference_sequences(model, N_SEQ, L, SKIP)
    assert torch.equal(result.tokens, torch.stack(seqs))
    means_z = ref.mean_activations_reference(model, seqs)[0] if ablation == "mean" else None
    assert result.values.shape == (len(KS), 1 + DRAWS, N_SEQ)
    n_total = model.n_layers * model.n_heads
    for i, k in enumerate(KS):
        want_top = sorted(range(n_total), key=lambda h: -float(scores.flatten()[h]))[:k]
        assert result.heads[i, 0, :k].tolist() == want_top
        for c in range(1 + DRAWS):
            heads = flat_to_pairs(result.heads[i, c], model.n_heads)
            assert len(set(heads)) == k
            if c > 0:
                rng = np.random.default_rng([0, k, c - 1, 7919])
                assert result.heads[i, c, :k].tolist() == sorted(
                    rng.choice(n_total, size=k, replace=False).tolist())
            want = [reference_later_loss(model, s, L, reference_hooks(model, heads, means_z))
                    for s in seqs]
            torch.testing.assert_close(result.values[i, c], torch.tensor(want, dtype=torch.float64),
                                       rtol=1e-5, atol=1e-5)
    want = [reference_later_loss(model, s, L, []) for s in seqs]
    torch.testing.assert_close(result.unablated, torch.tensor(want, dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)


def test_loss_is_batching_invariant_and_masks_share_passes(tiny_llama, monkeypatch):
    model = tiny_llama
    scores = distinct_scores(model, seed=2)
    ks = [1, 7]  # at most 1 + 8 + 8 distinct masks: all of them fit one CPU pass (512 tokens)
    calls = []
    original = model.run_with_hooks

    def counting(tokens, *args, **kwargs):
        calls.append(tuple(tokens.shape))
        return original(tokens, *args, **kwargs)

    monkeypatch.setattr(model, "run_with_hooks", counting)
    width = 1 + 4 * L
    small = ablate_induction_loss(model, scores, ks=ks, n_seeds=N_SEQ, length=L, skip=SKIP,
                                  batch_tokens=width)  # one row per pass
    n_masks = small.params["distinct_masks"]
    assert 2 < n_masks <= 17 and calls == [(1, width)] * (n_masks * N_SEQ)
    calls.clear()
    big = ablate_induction_loss(model, scores, ks=ks, n_seeds=N_SEQ, length=L, skip=SKIP,
                                batch_tokens=width * n_masks)  # every mask of one sequence
    assert calls == [(n_masks, width)] * N_SEQ
    torch.testing.assert_close(big.values, small.values, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(big.unablated, small.unablated, rtol=1e-5, atol=1e-6)
    # the distinct masks: the identity, every distinct top or random set of every k
    sets = {frozenset(s[s >= 0].tolist()) for s in small.heads.flatten(0, 1)}
    assert n_masks == 1 + len(sets)


def test_a_pass_does_not_hold_the_previous_passs_logits(tiny_llama, monkeypatch):
    """Peak memory: when a pass starts, no logits of the passes before it are alive (they were
    kept by the loop's variable, doubling the peak: the report's causal check measured 1.47x
    its memory estimate on SmolLM2)."""
    import gc

    model = tiny_llama
    original, alive_at_start = model.run_with_hooks, []

    def tracking(tokens, *args, **kwargs):
        gc.collect()
        alive_at_start.append(sum(  # type(t), not isinstance: no __class__ of every object
            1 for t in gc.get_objects()
            if issubclass(type(t), torch.Tensor) and t.ndim == 3 and t.shape[-1] == model.d_vocab))
        return original(tokens, *args, **kwargs)

    monkeypatch.setattr(model, "run_with_hooks", tracking)
    width = 1 + 4 * L
    ablate_induction_loss(model, distinct_scores(model, seed=2), ks=[1], n_seeds=N_SEQ,
                          length=L, skip=SKIP, batch_tokens=64 * width)  # a few passes
    assert len(alive_at_start) > 1
    assert alive_at_start == [0] * len(alive_at_start)


def test_evaluation_sequences_are_not_the_scans(tiny_llama):
    model = tiny_llama
    scan = mechicl.induction_scan(model, scores=["prefix_matching"], n_seeds=SKIP, length=L,
                                  progress=False)
    result = ablate_induction_loss(model, scan.scores["prefix_matching"], ks=[2],
                                   n_seeds=N_SEQ, length=L, skip=SKIP)
    seen = {tuple(t.tolist()) for t in scan.scores["prefix_matching"].tokens}
    assert not seen & {tuple(t.tolist()) for t in result.tokens}
    assert result.head_list(2) == scan.scores["prefix_matching"].top_heads(2)
    assert result.score == "prefix_matching"


# --------------------------------------------------------------------------------------------
# Accuracy against mechicl.evaluate under each mask
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def copy_task():
    return ref.copy_task(30)


@pytest.mark.parametrize("ablation, rule", [("zero", "none"), ("mean", "none"), ("zero", "chars")])
def test_accuracy_equals_evaluate_under_each_mask(tiny_gpt2, copy_task, ablation, rule):
    """Every condition's per-prompt correctness equals evaluate under its mask, choices ranked
    by the task's own rule (chars: lm-eval acc_norm) as evaluate ranks them."""
    model = tiny_gpt2
    copy_task = dataclasses.replace(copy_task, normalization=rule)
    scores = distinct_scores(model, seed=5)
    prompts = split_prompts(copy_task, shots=1, n_rank=4, n_eval=10)[1]
    result = ablate_induction_accuracy(model, scores, copy_task, shots=1, prompts=prompts,
                                       ks=KS, ablation=ablation, seed=0, batch_tokens=200)
    assert result.values.shape == (len(KS), 1 + DRAWS, 10)
    means = None
    if ablation == "mean":  # the heads' mean outputs over the prompts + gold answers
        z, mlp = ref.mean_activations_reference(
            model, [ref.prompt_tokens(model, p)[0] for p in prompts])
        means = mechicl.model.masks.ActivationMeans(z=z.float(), mlp_out=mlp.float(),
                                                    n_tokens=1)
    for i, _k in enumerate(KS):
        for c in range(1 + DRAWS):
            heads = flat_to_pairs(result.heads[i, c], model.n_heads)
            mask = Mask.remove(model, heads=heads, ablation=ablation, means=means)
            plain = mechicl.evaluate(model, copy_task, shots=1, prompts=prompts, mask=mask)
            want = torch.tensor(plain.predictions.correct.tolist(), dtype=torch.float64)
            assert torch.equal(result.values[i, c], want), (i, c)
    plain = mechicl.evaluate(model, copy_task, shots=1, prompts=prompts)
    assert torch.equal(result.unablated,
                       torch.tensor(plain.predictions.correct.tolist(), dtype=torch.float64))
    assert result.params["prompt_ids"] == [p.id for p in prompts]
    assert result.params["normalization"] == plain.normalization == rule
    table = result.table(n_resamples=200)
    assert table.unablated.tolist() == [plain.accuracy] * len(KS)


# --------------------------------------------------------------------------------------------
# The statistics against a literal loop
# --------------------------------------------------------------------------------------------


def synthetic(measure, seed=0, n=17, draws=DRAWS):
    gen = torch.Generator().manual_seed(seed)
    if measure == "accuracy":
        values = (torch.rand(2, 1 + draws, n, generator=gen) < 0.6).double()
        base = (torch.rand(n, generator=gen) < 0.8).double()
    else:
        values = 2 + torch.rand(2, 1 + draws, n, generator=gen, dtype=torch.float64)
        values[:, 0] += 0.3
        base = 1 + torch.rand(n, generator=gen, dtype=torch.float64)
    scores = torch.rand(2, 4, generator=gen, dtype=torch.float64)
    return InductionAblation(measure=measure, score="prefix_matching", ks=(1, 3), values=values,
                             unablated=base, heads=head_sets(scores, [1, 3], draws=draws),
                             scores=scores, params={"x": 1})


@pytest.mark.parametrize("measure", ["later_copy_loss", "accuracy"])
def test_table_equals_a_literal_bootstrap_loop(measure):
    result = synthetic(measure)
    n_resamples, seed = 300, 4
    table = result.table(n_resamples=n_resamples, seed=seed)
    v, base = result.values.numpy(), result.unablated.numpy()
    n = v.shape[2]
    w = bootstrap_weights(n, n_resamples, seed)
    for i, k in enumerate(result.ks):
        row = table[table.k == k].iloc[0]
        top = [float(v[i, 0, e]) for e in range(n)]
        rnd = [sum(float(v[i, c, e]) for c in range(1, 1 + DRAWS)) / DRAWS for e in range(n)]
        draw_means = [sum(float(v[i, c, e]) for e in range(n)) / n for c in range(1, 1 + DRAWS)]
        d = [top[e] - rnd[e] for e in range(n)]
        resampled = []
        for r in range(n_resamples):
            resampled.append(sum(w[r, e] * d[e] for e in range(n)) / n)
        assert row.top == pytest.approx(sum(top) / n)
        assert row.random_mean == pytest.approx(sum(rnd) / n)
        assert row.unablated == pytest.approx(float(base.sum()) / n)
        assert row["diff"] == pytest.approx(sum(d) / n)
        assert row.diff_low == pytest.approx(float(np.quantile(resampled, 0.025)))
        assert row.diff_high == pytest.approx(float(np.quantile(resampled, 0.975)))
        below = sum(m <= 1e-12 for m in resampled)
        above = sum(m >= -1e-12 for m in resampled)
        p = min(1.0, 2 * min((1 + below) / (1 + n_resamples), (1 + above) / (1 + n_resamples)))
        assert row.p == pytest.approx(p)
        assert row.random_low == pytest.approx(float(np.quantile(draw_means, 0.05)))
        assert row.random_high == pytest.approx(float(np.quantile(draw_means, 0.95)))
        top_mean = sum(top) / n
        if measure == "later_copy_loss":
            harmful = sum(m >= top_mean - 1e-12 for m in draw_means)
        else:
            harmful = sum(m <= top_mean + 1e-12 for m in draw_means)
        assert row.p_draws == pytest.approx((1 + harmful) / (1 + DRAWS))
        eff = [top[e] - float(base[e]) for e in range(n)]
        eff_resampled = [sum(w[r, e] * eff[e] for e in range(n)) / n for r in range(n_resamples)]
        assert row.top_vs_unablated == pytest.approx(sum(eff) / n)
        assert row.top_vs_unablated_low == pytest.approx(float(np.quantile(eff_resampled, 0.025)))
        assert row.top_vs_unablated_high == pytest.approx(float(np.quantile(eff_resampled, 0.975)))
        assert row.random_vs_unablated == pytest.approx(sum(rnd) / n - float(base.mean()))
        assert (row.draws, row.n, row.n_resamples) == (DRAWS, n, n_resamples)
    conditions = result.conditions()
    assert len(conditions) == 2 * (1 + DRAWS)
    assert conditions.value.tolist() == pytest.approx(result.values.mean(-1).flatten().tolist())
    assert conditions[conditions.kind == "top"].condition.tolist() == [0, 0]


def test_ablation_difference_equals_a_literal_bootstrap_loop():
    """Zero against mean ablation of the same heads on the same items: per-item differences,
    resampled by hand."""
    a, b = synthetic("later_copy_loss", seed=0), synthetic("later_copy_loss", seed=1)
    b = dataclasses.replace(b, heads=a.heads, unablated=a.unablated, params={"ablation": "mean"})
    n_resamples, seed = 300, 2
    table = ablation_difference(a, b, n_resamples=n_resamples, seed=seed)
    va, vb = a.values.numpy(), b.values.numpy()
    n = va.shape[2]
    w = bootstrap_weights(n, n_resamples, seed)
    for i, k in enumerate(a.ks):
        row = table[table.k == k].iloc[0]
        for name, (x, y) in {
            "top": ([va[i, 0, e] for e in range(n)], [vb[i, 0, e] for e in range(n)]),
            "random": ([sum(va[i, c, e] for c in range(1, 1 + DRAWS)) / DRAWS for e in range(n)],
                       [sum(vb[i, c, e] for c in range(1, 1 + DRAWS)) / DRAWS for e in range(n)]),
        }.items():
            d = [float(x[e] - y[e]) for e in range(n)]
            resampled = [sum(w[r, e] * d[e] for e in range(n)) / n for r in range(n_resamples)]
            assert row[f"{name}_a"] == pytest.approx(sum(x) / n)
            assert row[f"{name}_b"] == pytest.approx(sum(y) / n)
            assert row[f"{name}_diff"] == pytest.approx(sum(d) / n)
            assert row[f"{name}_diff_low"] == pytest.approx(float(np.quantile(resampled, 0.025)))
            assert row[f"{name}_diff_high"] == pytest.approx(float(np.quantile(resampled, 0.975)))
            below = sum(m <= 1e-12 for m in resampled)
            above = sum(m >= -1e-12 for m in resampled)
            assert row[f"{name}_p"] == pytest.approx(min(1.0, 2 * min(
                (1 + below) / (1 + n_resamples), (1 + above) / (1 + n_resamples))))
        assert (row.ablation_a, row.ablation_b, row.n) == ("zero", "mean", n)
    # not a paired comparison: other heads, other items, another measure
    other = synthetic("later_copy_loss", seed=1)
    with pytest.raises(ValueError, match="removed different heads"):
        ablation_difference(a, dataclasses.replace(b, heads=other.heads))
    with pytest.raises(ValueError, match="unablated values differ"):
        ablation_difference(a, dataclasses.replace(b, unablated=a.unablated + 1))
    with pytest.raises(ValueError, match="measure different things"):
        ablation_difference(a, synthetic("accuracy"))


def test_a_real_effect_is_found_and_a_null_one_is_not():
    """The test can fail both ways: a large top-k effect gives a small p and an interval away
    from 0; top-k values drawn like the random ones do not."""
    strong = synthetic("later_copy_loss", seed=1).table(n_resamples=500).iloc[0]
    assert strong["diff"] > 0.1 and strong.diff_low > 0 and strong.p < 0.01
    gen = torch.Generator().manual_seed(2)
    values = 2 + torch.rand(1, 1 + DRAWS, 40, generator=gen, dtype=torch.float64)
    scores = torch.rand(2, 4, generator=gen, dtype=torch.float64)
    null = InductionAblation(measure="later_copy_loss", score="s", ks=(2,), values=values,
                             unablated=torch.ones(40, dtype=torch.float64),
                             heads=head_sets(scores, [2], draws=DRAWS), scores=scores)
    row = null.table(n_resamples=500).iloc[0]
    assert row.diff_low < 0 < row.diff_high and row.p > 0.05


# --------------------------------------------------------------------------------------------
# The result protocol
# --------------------------------------------------------------------------------------------


def test_save_load_roundtrip_and_corruption(tmp_path, tiny_llama):
    result = ablate_induction_loss(tiny_llama, distinct_scores(tiny_llama), ks=[2],
                                   n_seeds=N_SEQ, length=L, skip=SKIP)
    back = mechicl.load_result(result.save(tmp_path / "r"))
    assert isinstance(back, InductionAblation)
    for name in ("values", "unablated", "heads", "scores", "tokens"):
        assert torch.equal(getattr(back, name), getattr(result, name)), name
    assert (back.measure, back.score, back.ks) == (result.measure, result.score, result.ks)
    assert back.params == json.loads(json.dumps(result.params))
    assert back.model == result.model
    assert back.table().equals(result.table())
    acc = synthetic("accuracy")
    back = InductionAblation.load(acc.save(tmp_path / "acc"))
    assert back.tokens is None and torch.equal(back.values, acc.values)

    # an edited number in the tensors, a truncated file, an edited result.json
    tensors = tmp_path / "r" / "tensors.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 1
    tensors.write_bytes(bytes(data))
    with pytest.raises(ResultError, match="tensors.safetensors: checksum mismatch"):
        mechicl.load_result(tmp_path / "r")
    tensors.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ResultError, match="tensors.safetensors"):
        mechicl.load_result(tmp_path / "r")
    meta = tmp_path / "acc" / "result.json"
    meta.write_text(meta.read_text().replace('"later_copy_loss"', '"x"').replace(
        '"accuracy"', '"loss"'))
    with pytest.raises(ResultError, match="result.json: checksum mismatch"):
        mechicl.load_result(tmp_path / "acc")


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [INDUCTION_ABLATION, INDUCTION_ABLATION_TASK])
@pytest.mark.parametrize("options, match", [
    ({"draws": 5}, r"\.draws = 5: need an integer >= 20"),
    ({"ks": [0, 5]}, r"\.ks = \[0, 5\]: need a list of integers, each >= 1"),
    ({"ks": []}, r"\.ks = \[\]: need a list of integers, each >= 1, at least one"),
    ({"ks": [5, 5]}, r"\.ks = \[5, 5\] has duplicates"),
    ({"score": "induction"}, r"\.score = 'induction' is not allowed; choose one of "
                             r"\['prefix_matching', 'copying'"),
    ({"ablation": "resample"}, r"\.ablation = 'resample' is not allowed; choose one of "
                               r"\['zero', 'mean'\]"),
    ({"scan_seeds": 0}, r"\.scan_seeds = 0: need an integer >= 1"),
    ({"nope": 1}, r"unknown option induction_ablation(_task)?\.nope; allowed: \["),
])
def test_bad_options_give_one_clear_error(spec, options, match):
    kwargs = {"task": "antonyms", "shots": 1} if spec.per_task else {}
    with pytest.raises(OptionError, match=match):
        spec.job("m", options, **kwargs)


def test_bad_arguments_of_the_functions(tiny_llama, copy_task):
    model = tiny_llama
    scores = distinct_scores(model)
    with pytest.raises(ValueError, match=r"ks=\[3, 9\]: \[9\] not in 1\.\.8 \(the model's "
                                         r"number of heads\)"):
        ablate_induction_loss(model, scores, ks=[3, 9], n_seeds=1, length=L)
    with pytest.raises(ValueError, match=r"draws=5: need an integer >= 20"):
        ablate_induction_loss(model, scores, ks=[1], draws=5, n_seeds=1, length=L)
    with pytest.raises(ValueError, match=r"ablation='resample' is not allowed; choose one of "
                                         r"\['zero', 'mean'\]"):
        ablate_induction_accuracy(model, scores, copy_task, shots=0, n=2, ks=[1],
                                  ablation="resample")
    with pytest.raises(ValueError, match=r"scores have shape \(4, 2\), the model has \[2, 4\]"):
        ablate_induction_loss(model, scores.T, ks=[1], n_seeds=1, length=L)
    with pytest.raises(ValueError, match="length=1 >= 2"):
        ablate_induction_loss(model, scores, ks=[1], n_seeds=1, length=1)


def test_cli_flags_and_score_aliases(capsys):
    from mechicl.cli import build_parser

    args = build_parser().parse_args(["ablate-induction", "--model", "m", "--out", "x",
                                      "--score", "prefix", "--ks", "10,5", "--draws", "30"])
    assert (args.score, args.ks, args.draws) == ("prefix_matching", [5, 10], 30)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ablate-induction", "--model", "m", "--out", "x",
                                   "--score", "bogus"])
    assert "'bogus' is not an induction score; allowed:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ablate-induction-task", "--model", "m", "--out", "x",
                                   "--tasks", "antonyms", "--draws", "3"])
    assert "need an integer >= 20" in capsys.readouterr().err


@pytest.mark.parametrize("spec, function, names", [
    (INDUCTION_ABLATION, ablate_induction_loss,
     {"ks": "ks", "draws": "draws", "ablation": "ablation", "n_seeds": "n_seeds",
      "length": "length", "batch_tokens": "batch_tokens"}),
    (INDUCTION_ABLATION_TASK, ablate_induction_accuracy,
     {"ks": "ks", "draws": "draws", "ablation": "ablation", "batch_tokens": "batch_tokens"}),
])
def test_python_defaults_are_the_registry_defaults(spec, function, names):
    params = inspect.signature(function).parameters
    for option, arg in names.items():
        default = params[arg].default
        assert (list(default) if isinstance(default, tuple) else default) == \
            spec.option(option).default, option


# --------------------------------------------------------------------------------------------
# Through the registry, the store and load_result
# --------------------------------------------------------------------------------------------


def test_the_ranking_scan_is_the_pruning_analysis_scan():
    """An ablation job reads the scan a pruning job by the same score reads: one key, reused."""
    job = INDUCTION_ABLATION_TASK.job("m", {"score": "copying", "scan_seeds": 7},
                                      task="antonyms", shots=1, seed=3)
    prune = PRUNING.job("m", {"rankings": ["copying:high-first"], "scan_seeds": 7},
                        task="antonyms", shots=1, seed=3)
    assert scan_input(job)["scan"] == ranking_inputs(prune)["heads:copying:high-first"]
    assert job.inputs() == scan_input(job)
    loss_job = INDUCTION_ABLATION.job("m", {"score": "copying", "scan_seeds": 7}, seed=3)
    assert loss_job.inputs() == scan_input(job)


def test_cli_and_store_run_the_loss_analysis(tiny_folder, tmp_path, capsys):
    from mechicl.cli import main

    store, out = tmp_path / "store", tmp_path / "out"
    argv = ["ablate-induction", "--model", str(tiny_folder), "--ks", "1,3", "--n-seeds",
            str(N_SEQ), "--length", str(L), "--scan-seeds", str(SKIP), "--scan-length", str(L),
            "--ablation", "mean", "--store", str(store), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    out = out / model_folder(str(tiny_folder))  # outputs are nested by model
    summary = (out / "ablate-induction-summary.csv").read_text()
    assert "random_mean" in summary and "p_draws" in summary
    capsys.readouterr()
    stem = f"{tiny_folder.name}-ablate-prefix_matching"
    result = mechicl.load_result(out / "results" / stem)
    assert isinstance(result, InductionAblation) and result.ks == (1, 3)
    assert result.params["ablation"] == "mean" and result.params["skip"] == SKIP
    # the same numbers as the Python function on the stored scan
    model = mechicl.load_model(str(tiny_folder))
    from mechicl.experiments.store import ResultStore

    scans = [e for e in ResultStore(store).entries() if e.manifest["job"]["analysis"] == "scan"]
    assert len(scans) == 1
    scan = scans[0].load()
    direct = ablate_induction_loss(model, scan.scores["prefix_matching"], ks=[1, 3],
                                   n_seeds=N_SEQ, length=L, skip=SKIP, ablation="mean")
    torch.testing.assert_close(result.values, direct.values, rtol=1e-6, atol=1e-6)
    assert torch.equal(result.heads, direct.heads)
    # run again: both jobs (the scan and the ablation) are found in the store
    keys = {e.key for e in ResultStore(store).entries()}
    assert len(keys) == 2
    assert main(argv) == 0
    assert {e.key for e in ResultStore(store).entries()} == keys
    again = mechicl.load_result(out / "results" / stem)
    assert torch.equal(again.values, result.values)


def test_run_jobs_runs_the_task_analysis(tiny_folder, tmp_path):
    import dataclasses as dc

    from mechicl.experiments.runner import run_jobs
    from mechicl.experiments.store import ResultStore
    from mechicl.inputs.tasks import TASKS, load_task, register_task

    name = "causal_copy_task"
    if name not in TASKS:
        register_task(name, lambda: dc.replace(ref.copy_task(30, seed=4), name=name))
    job = INDUCTION_ABLATION_TASK.job(str(tiny_folder), {
        "ks": [2], "n": 4, "eval_n": 8, "scan_seeds": SKIP, "scan_length": L}, task=name,
        shots=1, seed=1)
    store = ResultStore(tmp_path / "store")
    summary = run_jobs([job], store, progress=False)
    assert summary.ok, summary.errors
    row = summary.jobs[summary.asked[0]]
    stored = store.get(row["key"])
    result = mechicl.load_result(stored.path)
    assert isinstance(result, InductionAblation) and result.measure == "accuracy"
    prompts = evaluation_prompts(load_task(name), job)
    assert result.params["prompt_ids"] == [p.id for p in prompts]
    assert [p.id for p in prompts] == [p.id for p in split_prompts(
        load_task(name), shots=1, n_rank=4, n_eval=8, seed=1)[1]]
    # the same numbers as evaluate() under the stored top-2 mask
    model = mechicl.load_model(str(tiny_folder))
    top = Mask.remove(model, heads=result.head_list(2))
    plain = mechicl.evaluate(model, name, shots=1, prompts=prompts, mask=top)
    assert result.values[0, 0].tolist() == [float(c) for c in plain.predictions.correct]
    assert math.isclose(result.table().top.iloc[0], plain.accuracy)
    again = run_jobs([job], store, progress=False)
    assert [r["status"] for r in again.jobs][again.asked[0]] == "cached"
    assert set(ANALYSES) >= {"induction_ablation", "induction_ablation_task"}


# --------------------------------------------------------------------------------------------
# The real default model
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_top_prefix_heads_raise_the_later_copy_loss_on_smollm2(smollm2, tmp_path):
    """SmolLM2-135M (4-bit GGUF, de-quantised to float32), through the registry and a store:
    removing the top-5 prefix-matching heads raises the loss on the later copies more than
    removing 5 random heads (the known result), with the interval above 0."""
    from mechicl.experiments.grid import ModelEntry
    from mechicl.experiments.runner import LocalExecutor, run_jobs
    from mechicl.experiments.store import ResultStore

    job = INDUCTION_ABLATION.job("smollm2-135m", {
        "ks": [5], "n_seeds": 6, "length": 20, "scan_seeds": 8, "scan_length": 25})
    store = ResultStore(tmp_path / "store")
    summary = run_jobs([job], store, entries={"smollm2-135m": ModelEntry(
        name="smollm2-135m", spec="smollm2-135m")}, progress=False,
        executor=LocalExecutor(models={"smollm2-135m": smollm2}))
    assert summary.ok, summary.errors
    result = mechicl.load_result(store.get(summary.jobs[summary.asked[0]]["key"]).path)
    assert result.heads[0, 0].tolist() == top_heads(result.scores, 5).tolist()
    assert result.params["skip"] == 8 and result.n == 6
    row = result.table().iloc[0]
    print(result.table().T)
    assert row.top > row.unablated
    assert row.top > row.random_high  # above the 95% quantile of the random draws
    assert row["diff"] > 0 and row.diff_low > 0
