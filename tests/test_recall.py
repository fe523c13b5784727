"""Memorised vs in-context answers (mechicl.analyses.recall): every number equals a slow,
obviously-correct reference on tiny random models (one prompt, one head, one forward at a time,
hooks written out by hand, the final norm's scale computed from its eps), the frozen-norm
decomposition adds up exactly, and the analyses go through the registry, the store and
`load_result`."""

import dataclasses
import json
import math

import numpy as np
import pytest
import reference_importance as ref  # tests/reference_importance.py: hand-written hooks
import torch
from scipy import stats as scipy_stats

import mechicl
from mechicl.analyses.causal import random_heads
from mechicl.analyses.recall import (
    ANSWER_ATTRIBUTION,
    ANSWER_DETERMINANTS,
    VALUE_SCALING,
    AnswerAttribution,
    AnswerDeterminants,
    ValueScaling,
    answer_attribution,
    answer_determinants,
    direct_effects,
    residual_components,
    value_scaling,
)
from mechicl.inputs.pairs import PromptPairs
from mechicl.inputs.tasks import Example, Prompt, Task, build_prompts, load_task
from mechicl.results import ResultError
from mechicl.stats import wilson_interval

pytestmark = pytest.mark.usefixtures("one_thread")

TEMPLATE = "w90 {country} w91 {context_capital} w92 {country} w93"
CLOSED = "w94 {country} w93"


def toy_capital_task(n: int = 30, seed: int = 0, name: str = "toy_capitals") -> Task:
    """Counterfactual 'capitals' over toy words: countries of one or two words (so prompts
    differ in length), a context city and a different memorised city; gold = in context."""
    rng = np.random.default_rng([seed, 77])
    examples = []
    for i in range(n):
        words = [f"w{int(w)}" for w in rng.permutation(range(4, 88))[:4]]
        country = " ".join(words[:2]) if i % 3 == 0 else words[0]
        context, memorised = words[2], words[3]
        examples.append(Example(id=f"cap{i}", input={"country": country,
                                                     "context_capital": context},
                                choices=(memorised, context), gold=1,
                                meta={"memorised_answer": memorised}))
    return Task(name=name, examples=tuple(examples), template=TEMPLATE)


def toy_pairs(model, n: int = 4) -> PromptPairs:
    task = toy_capital_task()
    exs = task.examples[:n]
    return PromptPairs.from_texts(
        model, [task.render(e) for e in exs],
        [TEMPLATE.format(country=e.fields["country"], context_capital=e.choices[0])
         for e in exs],
        [" " + e.choices[1] for e in exs], [" " + e.choices[0] for e in exs], name="toy",
        params={"example_ids": [e.id for e in exs]})


# --------------------------------------------------------------------------------------------
# References: one pair, one component, one forward at a time
# --------------------------------------------------------------------------------------------


def _final_norm_module(model):
    module = model.bridge.ln_final
    return getattr(module, "original_component", None) or module


def ref_dla(model, tokens, answer, wrong):
    """Plain loop: hook_z @ W_O per head (mlp_out per FFN) at the last position, times the
    frozen scale 1 / rms (RMSNorm) or 1 / std after centring (LayerNorm), times the norm's
    gain, dotted with W_U[:, answer] - W_U[:, wrong]. Returns (heads, ffn, model's logit diff)."""
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens[None])
    norm = _final_norm_module(model)
    eps = getattr(norm, "eps", None) or norm.variance_epsilon
    x = cache["ln_final.hook_in"][0, -1].double()
    layer_norm = isinstance(norm, torch.nn.LayerNorm)
    if layer_norm:
        scale = 1 / torch.sqrt(((x - x.mean()) ** 2).mean() + eps)
    else:
        scale = 1 / torch.sqrt((x ** 2).mean() + eps)
    gain = norm.weight.detach().double()
    d_w = (model.W_U[:, answer] - model.W_U[:, wrong]).double()

    def dla(out):
        out = out.double()
        if layer_norm:
            out = out - out.mean()
        return float(scale * (out * gain) @ d_w)

    heads = torch.zeros(model.n_layers, model.n_heads, dtype=torch.float64)
    ffn = torch.zeros(model.n_layers, dtype=torch.float64)
    for layer in range(model.n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"][0, -1]
        for head in range(model.n_heads):
            heads[layer, head] = dla(z[head] @ model.W_O[layer, head])
        ffn[layer] = dla(cache[f"blocks.{layer}.hook_mlp_out"][0, -1])
    return heads, ffn, float(logits[0, -1, answer] - logits[0, -1, wrong])


def ref_exact(model, tokens, answer, wrong):
    """One forward per component: its output at the last position subtracted from the final
    residual stream (a hook on ln_final.hook_in), the final norm recomputed by the model."""
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens[None])
    clean = float(logits[0, -1, answer] - logits[0, -1, wrong])

    def without(out):
        def hook(x, hook):
            x = x.clone()
            x[0, -1] = x[0, -1] - out
            return x
        with torch.no_grad():
            lg = model.run_with_hooks(tokens[None], fwd_hooks=[("ln_final.hook_in", hook)])
        return clean - float(lg[0, -1, answer] - lg[0, -1, wrong])

    heads = torch.zeros(model.n_layers, model.n_heads, dtype=torch.float64)
    ffn = torch.zeros(model.n_layers, dtype=torch.float64)
    for layer in range(model.n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"][0, -1]
        for head in range(model.n_heads):
            heads[layer, head] = without(z[head] @ model.W_O[layer, head])
        ffn[layer] = without(cache[f"blocks.{layer}.hook_mlp_out"][0, -1])
    return heads, ffn


# --------------------------------------------------------------------------------------------
# Attribution
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def attributions(tiny):
    pairs = toy_pairs(tiny)
    assert not pairs.same_length  # right padding is exercised
    return pairs, answer_attribution(tiny, pairs, n_resamples=200, n_permutations=200,
                                     batch_tokens=20)  # several passes


def test_dla_equals_a_plain_loop_and_the_parts_sum_to_the_logit_difference(tiny, attributions):
    pairs, result = attributions
    for i in range(len(pairs)):
        heads, ffn, logit_diff = ref_dla(tiny, pairs.clean_tokens(i), int(pairs.answer[i]),
                                         int(pairs.wrong[i]))
        torch.testing.assert_close(result.dla[i], heads, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(result.ffn_dla[i], ffn, rtol=1e-4, atol=1e-5)
        assert math.isclose(float(result.total[i]), logit_diff, rel_tol=1e-4, abs_tol=1e-5)
    # the frozen-norm decomposition: heads + FFNs + embeddings/biases = the logit difference
    parts = result.dla.sum((1, 2)) + result.ffn_dla.sum(1) + result.rest
    torch.testing.assert_close(parts, result.total, rtol=1e-6, atol=1e-6)
    assert result.closure() < 1e-6 and result.params["residual_closure"] < 1e-6
    assert result.rest.abs().max() > 0  # the remainder is a real term, not a plug


def test_exact_equals_one_component_at_a_time(tiny, attributions):
    pairs, result = attributions
    for i in range(len(pairs)):
        heads, ffn = ref_exact(tiny, pairs.clean_tokens(i), int(pairs.answer[i]),
                               int(pairs.wrong[i]))
        torch.testing.assert_close(result.exact[i], heads, rtol=1e-3, atol=2e-5)
        torch.testing.assert_close(result.ffn_exact[i], ffn, rtol=1e-3, atol=2e-5)


def test_with_the_norm_frozen_the_exact_effects_are_the_dla(tiny, attributions):
    pairs, result = attributions
    comps = residual_components(tiny, pairs.clean, pairs.answer_pos)
    frozen = direct_effects(tiny, comps, pairs.answer, pairs.wrong, kind="exact",
                            final_norm="frozen")
    torch.testing.assert_close(frozen.heads, result.dla, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(frozen.ffn, result.ffn_dla, rtol=1e-6, atol=1e-7)
    # recomputing the norm is a real difference (the only one)
    assert (result.exact - result.dla).abs().max() > 1e-6


def test_intervals_and_agreement_are_the_named_statistics(tiny_llama):
    from mechicl.analyses.overlap import permutation_null, spearman, top_k_overlap
    from mechicl.stats import bootstrap_weights

    result = answer_attribution(tiny_llama, toy_pairs(tiny_llama, 5), n_resamples=300,
                                n_permutations=300, seed=2)
    table = result.table()
    heads = table[table.component == "head"]
    torch.testing.assert_close(torch.tensor(heads.dla_mean.to_numpy()),
                               result.dla.mean(0).flatten())
    # literal percentile bootstrap over pairs of head (1, 2)
    w = bootstrap_weights(5, 300, seed=2)
    values = result.exact[:, 1, 2].numpy()
    means = [float(row @ values / 5) for row in w]
    row = heads[(heads["layer"] == 1) & (heads["head"] == 2)].iloc[0]
    assert math.isclose(row.exact_low, float(np.quantile(means, 0.025)), rel_tol=1e-9)
    assert math.isclose(row.exact_high, float(np.quantile(means, 0.975)), rel_tol=1e-9)
    assert row.exact_low <= row.exact_mean <= row.exact_high
    agree = result.agreement(k=2)
    assert agree["spearman"] == pytest.approx(spearman(result.dla.mean(0), result.exact.mean(0)))
    assert agree["spearman_low"] <= agree["spearman"] <= agree["spearman_high"]
    assert agree["top_k_overlap"] == top_k_overlap(result.dla.mean(0), result.exact.mean(0), 2)
    _, null = permutation_null(result.dla.mean(0), result.exact.mean(0), statistic="top_k", k=2,
                               n_permutations=300, seed=2, within_layers=True)
    assert agree["top_k_null_mean"] == pytest.approx(float(null.mean()))
    assert 0 < agree["top_k_p"] <= 1


def test_attribution_saves_loads_and_detects_corruption(tiny_llama, tmp_path):
    result = answer_attribution(tiny_llama, toy_pairs(tiny_llama, 3), n_resamples=50,
                                n_permutations=50)
    back = mechicl.load_result(result.save(tmp_path / "a"))
    assert isinstance(back, AnswerAttribution) and back.params == json.loads(
        json.dumps(result.params))
    for name in AnswerAttribution.TENSORS:
        assert torch.equal(getattr(back, name), getattr(result, name))
    (tmp_path / "a" / "tensors.safetensors").write_bytes(b"broken")
    with pytest.raises(ResultError, match="tensors.safetensors"):
        mechicl.load_result(tmp_path / "a")


# --------------------------------------------------------------------------------------------
# Value scaling
# --------------------------------------------------------------------------------------------


def scaled_hooks(model, heads, factor):
    return [ref.head_hook(model, layer, head, factor=factor) for layer, head in heads]


def test_value_scaling_equals_hooks_one_prompt_at_a_time(tiny_llama):
    model = tiny_llama
    task = toy_capital_task()
    scores = torch.randn(model.n_layers, model.n_heads, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64)
    factors = [0.0, 1.0, 3.0]
    result = value_scaling(model, scores, task, n=5, n_heads=2, factors=factors, draws=20,
                           seed=4, exclude=["cap0"], batch_tokens=64)
    prompts = [p for p in build_prompts(task, shots=0, seed=4) if p.id != "cap0"][:5]
    assert result.params["prompt_ids"] == [p.id for p in prompts]
    flat = scores.flatten()
    order = torch.argsort(flat, descending=True, stable=True)
    assert result.heads[0].tolist() == order[:2].tolist()
    assert result.heads[1].tolist() == torch.argsort(-flat, descending=True,
                                                     stable=True)[:2].tolist()
    assert torch.equal(result.heads[2:], random_heads(flat.numel(), 2, 20, seed=4))
    for c in (0, 1, 2, 21):
        heads = result.head_list(c)
        for i, factor in enumerate(factors):
            for j, prompt in enumerate(prompts):
                ll = ref.ref_choice_logliks(model, prompt, scaled_hooks(model, heads, factor))
                margin = ll[1] - ll[0]  # gold (in context) is choice 1
                assert math.isclose(float(result.margin[i, c, j]), margin, rel_tol=1e-4,
                                    abs_tol=1e-4)
                assert result.in_context[i, c, j] == float(margin > 0)
    # factor 1 is the unchanged model for every condition
    assert (result.margin[1] == result.margin[1, :1]).all()


def test_value_scaling_table_is_the_named_statistics(tiny_llama):
    model = tiny_llama
    gen = torch.Generator().manual_seed(0)
    result = value_scaling(model, torch.rand(model.n_layers, model.n_heads, generator=gen),
                           toy_capital_task(), n=8, n_heads=1, factors=[0.0, 5.0], draws=20)
    table = result.table(n_resamples=500)
    for i, factor in enumerate(result.factors):
        rows = table[table.factor == factor].set_index("condition")
        draws = [float(result.in_context[i, c].mean()) for c in range(2, 22)]
        assert rows.loc["random", "share"] == pytest.approx(np.mean(draws))
        assert rows.loc["random", "band_low"] == pytest.approx(np.quantile(draws, 0.05))
        for c, name in enumerate(("top_positive", "top_negative")):
            k = int(result.in_context[i, c].sum())
            assert rows.loc[name, "share"] == k / 8
            assert (rows.loc[name, "low"], rows.loc[name, "high"]) == wilson_interval(k, 8)
            diff = result.in_context[i, c] - result.in_context[i, 2:].mean(0)
            assert rows.loc[name, "vs_random"] == pytest.approx(float(diff.mean()))
            assert rows.loc[name, "vs_random_low"] <= rows.loc[name, "vs_random"] + 1e-12
            band_low, band_high = np.quantile(draws, [0.05, 0.95])
            outside = not band_low <= k / 8 <= band_high
            assert bool(rows.loc[name, "outside_band"]) == outside
    names = [t.name for t in result.figure().data]
    assert names == ["20 random sets (5-95%)", "random mean", "top positive", "top negative"]


def test_value_scaling_bad_input_names_the_value(tiny_llama):
    task = toy_capital_task()
    scores = torch.zeros(tiny_llama.n_layers, tiny_llama.n_heads)
    with pytest.raises(ValueError, match=r"factors=\[-1.0\]"):
        value_scaling(tiny_llama, scores, task, factors=[-1.0])
    with pytest.raises(ValueError, match="draws=5"):
        value_scaling(tiny_llama, scores, task, draws=5)
    with pytest.raises(ValueError, match="n_heads=5 must be in 1..4"):
        value_scaling(tiny_llama, scores, task, n_heads=5)
    three = [Prompt(id="q", text="w1", continuations=(" w2", " w3", " w4"), gold=0)]
    with pytest.raises(ValueError, match="3 choices"):
        value_scaling(tiny_llama, scores, None, prompts=three, n_heads=1)
    with pytest.raises(ValueError, match="kind"):
        value_scaling(tiny_llama, scores, task, kind="nope")


def test_value_scaling_saves_and_loads(tiny_llama, tmp_path):
    result = value_scaling(tiny_llama, torch.rand(2, 4), toy_capital_task(), n=3, n_heads=1,
                           factors=[0.0, 2.0], draws=20)
    back = mechicl.load_result(result.save(tmp_path / "v"))
    assert isinstance(back, ValueScaling) and back.factors == (0.0, 2.0)
    assert torch.equal(back.in_context, result.in_context)
    assert back.table().equals(result.table())


# --------------------------------------------------------------------------------------------
# Determinants
# --------------------------------------------------------------------------------------------


def test_determinants_equal_a_per_example_reference(tiny_llama):
    model = tiny_llama
    task = toy_capital_task()
    result = answer_determinants(model, task, n=9, closed_book=CLOSED, n_resamples=200)
    ranking = model.frequency_ranking.token_ids.tolist()
    prompts = build_prompts(task, shots=0, n=9)
    examples = {e.id: e for e in task.examples}
    assert result.data.id.tolist() == [p.id for p in prompts]
    for row, prompt in zip(result.data.itertuples(), prompts, strict=True):
        ex = examples[prompt.id]
        ll = ref.ref_choice_logliks(model, prompt)
        assert row.margin == pytest.approx(ll[1] - ll[0], rel=1e-4, abs=1e-4)
        assert row.in_context == int(ll[1] - ll[0] > 0)
        closed = Prompt(id="c", text=CLOSED.format(**ex.fields),
                        continuations=(" " + ex.choices[0],), gold=0)
        assert row.closed_book_logprob == pytest.approx(ref.ref_choice_logliks(model, closed)[0],
                                                        rel=1e-4, abs=1e-4)
        country_ids = model.encode(" " + ex.fields["country"], prepend_bos=False)
        assert row.country_rank == ranking.index(country_ids[0])
        assert row.country_tokens == len(country_ids)
        city = model.encode(" " + ex.fields["context_capital"], prepend_bos=False)
        assert (row.city_rank, row.city_tokens) == (ranking.index(city[0]), 1)
    assert "proxy" in result.params["frequency_proxy"]


def test_determinant_statistics_are_spearman_with_bootstrap_and_terciles(tiny_llama, tmp_path):
    result = answer_determinants(tiny_llama, toy_capital_task(), closed_book=CLOSED,
                                 n_resamples=300)
    data = result.data
    stats = result.statistics().set_index(["determinant", "outcome"])
    for det in ("closed_book_logprob", "city_rank"):
        rho = scipy_stats.spearmanr(data[det], data.margin).statistic
        row = stats.loc[(det, "margin")]
        assert row.spearman == pytest.approx(rho)
        assert row.low <= rho <= row.high and 0 < row.p <= 1
        assert math.isnan(row.events) and row.constant_resamples == 0
    k = int(data.in_context.sum())
    assert (stats.xs("in_context", level="outcome").events == min(k, len(data) - k)).all()

    # one example answered from memory: rho exists, but a third of the resamples lack it
    rare = dataclasses.replace(result, data=result.data.assign(
        in_context=[0] + [1] * (len(data) - 1)))
    row = rare.statistics(n_resamples=300).set_index(["determinant", "outcome"]).loc[
        ("closed_book_logprob", "in_context")]
    x = data.closed_book_logprob.to_numpy(float)
    assert row.spearman == pytest.approx(scipy_stats.spearmanr(x, rare.data.in_context).statistic)
    assert row.events == 1 and row.constant_resamples > 0
    assert math.isnan(row.low) and math.isnan(row.high)
    terciles = result.terciles()
    for det in ("country_rank", "closed_book_logprob"):
        rows = terciles[terciles.determinant == det]
        order = np.argsort(data[det].to_numpy(float), kind="stable")
        for (_, r), part in zip(rows.iterrows(), np.array_split(order, 3), strict=True):
            k = int(data.in_context.iloc[part].sum())
            assert r.n == len(part) and r.in_context_rate == k / len(part)
            assert (r.low, r.high) == wilson_interval(k, len(part))
    assert [t.name for t in result.figure().data] == [
        "low tercile", "middle tercile", "high tercile"]
    back = mechicl.load_result(result.save(tmp_path / "d"))
    assert isinstance(back, AnswerDeterminants) and back.data.equals(result.data)


def test_determinants_bad_closed_book_field(tiny_llama):
    with pytest.raises(ValueError, match="closed_book='w1 {city}'"):
        answer_determinants(tiny_llama, toy_capital_task(), n=2, closed_book="w1 {city}")


# --------------------------------------------------------------------------------------------
# Through the registry, the store and the CLI
# --------------------------------------------------------------------------------------------


def test_value_scaling_job_reads_the_attribution_job():
    job = VALUE_SCALING.job("m", {"attribution_n": 7, "attribution_prompts": "ioi"},
                            task="counterfactual_capital", shots=0, seed=3)
    att = job.inputs()["attribution"]
    assert att == ANSWER_ATTRIBUTION.job("m", {"n": 7, "prompts": "ioi"}, seed=3)
    assert ANSWER_DETERMINANTS.job("m", task="counterfactual_capital", shots=0).options[
        "closed_book"].startswith("Q: What is the capital of")


def test_run_jobs_runs_value_scaling_on_its_attribution(tiny_folder, tmp_path):
    from mechicl.experiments.runner import run_jobs
    from mechicl.experiments.store import ResultStore
    from mechicl.inputs.tasks import TASKS, register_task

    name = "recall_toy_capitals"
    if name not in TASKS:
        register_task(name, lambda: dataclasses.replace(toy_capital_task(), name=name))
    job = VALUE_SCALING.job(str(tiny_folder), {
        "n_heads": 1, "factors": [0.0, 2.0], "n": 4, "attribution_prompts": "repeated_tokens",
        "attribution_n": 3}, task=name, shots=0, seed=1)
    store = ResultStore(tmp_path / "store")
    summary = run_jobs([job], store, progress=False)
    assert summary.ok, summary.errors
    result = mechicl.load_result(store.get(summary.jobs[summary.asked[0]]["key"]).path)
    assert isinstance(result, ValueScaling) and result.params["task"] == name
    stored = [e for e in store.entries() if e.manifest["job"]["analysis"] == "answer_attribution"]
    assert len(stored) == 1
    attribution = stored[0].load()
    # the same numbers as the Python function on the stored attribution
    model = mechicl.load_model(str(tiny_folder))
    direct = value_scaling(model, attribution, name, n_heads=1, factors=[0.0, 2.0], n=4,
                           seed=1)
    assert torch.equal(direct.heads, result.heads)
    torch.testing.assert_close(direct.margin, result.margin, rtol=1e-6, atol=1e-6)
    again = run_jobs([job], store, progress=False)
    assert [r["status"] for r in again.jobs][again.asked[0]] == "cached"


def test_cli_runs_answer_attribution(tiny_folder, tmp_path, capsys):
    from mechicl.cli import main
    from mechicl.experiments.outputs import model_folder

    out = tmp_path / "out"
    assert main(["answer-attribution", "--model", str(tiny_folder), "--prompts",
                 "repeated_tokens", "--n", "3", "--n-resamples", "50", "--n-permutations", "50",
                 "--store", str(tmp_path / "store"), "--formats", "html", "--no-progress",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    out = out / model_folder(str(tiny_folder))
    summary = (out / "answer-attribution-summary.csv").read_text()
    assert "spearman" in summary and "top_k_null_mean" in summary
    results = [p for p in (out / "results").iterdir() if p.is_dir()]
    assert len(results) == 1
    assert isinstance(mechicl.load_result(results[0]), AnswerAttribution)
    assert sorted(p.name for p in out.glob("*.html")) == sorted(
        f"{results[0].name}{s}.html" for s in ("-dla", "-exact", "-ffn-dla", "-ffn-exact"))


# --------------------------------------------------------------------------------------------
# The real default model
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_capitals(smollm2):
    pairs = mechicl.make_pairs("capitals", smollm2, n=6, seed=0)
    result = answer_attribution(smollm2, pairs, n_resamples=200, n_permutations=200)
    assert result.dla.shape == (6, 30, 9) and result.closure() < 1e-3
    assert result.params["residual_closure"] < 1e-4
    comps = residual_components(smollm2, pairs.clean, pairs.answer_pos)
    frozen = direct_effects(smollm2, comps, pairs.answer, pairs.wrong, kind="exact",
                            final_norm="frozen")
    torch.testing.assert_close(frozen.heads, result.dla, rtol=1e-4, atol=1e-4)
    # the slow reference: hook_z @ W_O per head, mlp_out per FFN, through the frozen norm
    for i in (0, 5):
        heads, ffn, diff = ref_dla(smollm2, pairs.clean_tokens(i), pairs.answer[i],
                                   pairs.wrong[i])
        torch.testing.assert_close(result.dla[i].double(), heads, rtol=1e-3, atol=2e-4)
        torch.testing.assert_close(result.ffn_dla[i].double(), ffn, rtol=1e-3, atol=2e-4)
        assert float(result.total[i]) == pytest.approx(diff, abs=1e-3)
    # the model's own logit difference
    i = 0
    with torch.no_grad():
        logits = smollm2(pairs.clean_tokens(i)[None])
    want = float(logits[0, -1, pairs.answer[i]] - logits[0, -1, pairs.wrong[i]])
    assert float(result.total[i]) == pytest.approx(want, abs=1e-3)
    scaling = value_scaling(smollm2, result, "counterfactual_capital", n=3, n_heads=2,
                            factors=[1.0, 5.0], draws=20)
    assert set(scaling.params["prompt_ids"]).isdisjoint(pairs.params["example_ids"])
    assert (scaling.margin[0] == scaling.margin[0, :1]).all()  # factor 1: the unchanged model
    table = scaling.table()
    assert set(table.condition) == {"top_positive", "top_negative", "random"}
    # the slow reference: each scaled set's hooks, one prompt and one choice at a time
    task = load_task("counterfactual_capital")
    by_id = {p.id: p for p in build_prompts(task, shots=0, seed=0)}
    prompt = by_id[scaling.params["prompt_ids"][0]]
    for c in (0, 1, 7):
        ll = ref.ref_choice_logliks(smollm2, prompt,
                                    scaled_hooks(smollm2, scaling.head_list(c), 5.0))
        gold = prompt.gold  # the in-context answer
        assert float(scaling.margin[1, c, 0]) == pytest.approx(ll[gold] - ll[1 - gold], abs=2e-3)
    det = answer_determinants(smollm2, "counterfactual_capital", n=8, n_resamples=100)
    assert det.params["frequency_proxy"].startswith("rank of the first token")
    assert "bpe-merges" in det.params["frequency_proxy"]
    assert (det.data.closed_book_logprob < 0).all()
