"""Weight pruning in place (magnitude, Wanda), the derived recall / in-context tasks and the
sparsity curves (issue 23 §2), each checked against a slow, obviously correct reference: plain
loops over rows, tokens and prompts on a fresh Hugging Face model or one prompt at a time."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from mechicl.analyses import ANALYSES
from mechicl.analyses.sparsity import (
    DEFAULT_ICL_TASKS,
    DEFAULT_RECALL_TASKS,
    DEFAULT_SPARSITIES,
    SparsityCurves,
    sparsity_curves,
    sparsity_figure,
)
from mechicl.inputs.tasks import (
    BUILTIN_TASKS,
    TASKS,
    Example,
    Task,
    build_prompts,
    load_task,
    tasks_registered,
)
from mechicl.inputs.variants import VARIANT_TASKS, calibration_text
from mechicl.model import as_hooked_model
from mechicl.model.sparsity import calibration_batch, prunable_weights, prune_counts, pruned
from mechicl.results import load_result
from mechicl.testing import tiny_hf_model, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = ["gpt2", "llama"]


def fresh(arch):
    """A model of our own: pruning mutates weights, so session fixtures are not used."""
    return as_hooked_model(tiny_model(arch), name=f"tiny-{arch}")


def calibration(model):
    return calibration_batch(model, [" ".join(f"w{(7 * i) % 96}" for i in range(200))],
                             n_sequences=3, length=12)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.bridge.original_model.state_dict().items()}


# --------------------------------------------------------------------------------------------
# The slow reference: a fresh HF model pruned with plain loops
# --------------------------------------------------------------------------------------------

REFERENCE_LINEARS = {
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
}


def reference_modules(hf, arch, layer):
    blocks = hf.model.layers if arch == "llama" else hf.transformer.h
    return [blocks[layer].get_submodule(name) for name in REFERENCE_LINEARS[arch]]


def as_rows(module, arch):
    """The weight as a list of output rows (Conv1D stores [in, out])."""
    w = module.weight.detach()
    return (w.T if arch == "gpt2" else w).tolist()


def reference_prune(hf, arch, sparsity, method, tokens=None):
    """Prune ``hf`` in place, block by block, one row at a time; returns the masks by module."""
    n_layers = len(hf.model.layers if arch == "llama" else hf.transformer.h)
    masks = {}
    for layer in range(n_layers):
        modules = reference_modules(hf, arch, layer)
        norms = {}
        if method == "wanda":
            seen = {id(m): [] for m in modules}

            def keep(mod, args, out, seen=seen):
                seen[id(mod)].append(args[0].detach())

            handles = [m.register_forward_hook(keep) for m in modules]
            with torch.no_grad():
                hf(tokens)
            for h in handles:
                h.remove()
            for m in modules:
                x = seen[id(m)][0]
                total = [0.0] * x.shape[-1]
                for b in range(x.shape[0]):
                    for p in range(1, x.shape[1]):  # no BOS
                        for j, v in enumerate(x[b, p].tolist()):
                            total[j] += v * v
                norms[id(m)] = [math.sqrt(t) for t in total]
        for index, m in enumerate(modules):
            rows = as_rows(m, arch)
            k = int(math.floor(sparsity * len(rows[0]) + 1e-9))
            mask = torch.zeros(len(rows), len(rows[0]), dtype=torch.bool)
            for i, row in enumerate(rows):
                score = [abs(v) * (norms[id(m)][j] if norms else 1.0) for j, v in enumerate(row)]
                for j in sorted(range(len(row)), key=lambda j: (score[j], j))[:k]:
                    mask[i, j] = True
            with torch.no_grad():
                w = m.weight.T if arch == "gpt2" else m.weight
                w[mask] = 0.0
            masks[(layer, index)] = mask
    return masks


# --------------------------------------------------------------------------------------------
# Pruning
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_prunable_weights_are_the_block_linears_each_once(arch):
    model = fresh(arch)
    weights = prunable_weights(model)
    n_layers = model.n_layers
    assert len(weights) == n_layers * len(REFERENCE_LINEARS[arch])
    hf, _ = tiny_hf_model(arch)
    ref = [m.weight.numel() for layer in range(n_layers) for m in reference_modules(hf, arch, layer)]
    assert [w.weight.numel() for w in weights] == ref
    names = " ".join(w.name for w in weights)
    assert "lm_head" not in names and "wte" not in names and "embed" not in names


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_exact_sparsity_in_every_output_row(arch, method):
    model = fresh(arch)
    kwargs = {"calibration": calibration(model)} if method == "wanda" else {}
    with pruned(model, 0.3, method, **kwargs) as record:
        for w in prunable_weights(model):
            rows = w.rows()
            k = prune_counts(rows.shape[1], 0.3)
            assert ((rows == 0).sum(1) == k).all(), w.name
    assert record.n_pruned == sum(prune_counts(w.rows().shape[1], 0.3) * w.rows().shape[0]
                                  for w in prunable_weights(model))


@pytest.mark.parametrize("arch", ARCHS)
def test_magnitude_keeps_the_largest_weights_of_each_row(arch):
    model = fresh(arch)
    before = [w.rows().clone() for w in prunable_weights(model)]
    with pruned(model, 0.6):
        for w, orig in zip(prunable_weights(model), before, strict=True):
            cut = w.rows() == 0
            for i in range(orig.shape[0]):
                assert orig[i][~cut[i]].abs().min() >= orig[i][cut[i]].abs().max()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_pruning_equals_the_slow_reference_and_its_logits(arch, method):
    model = fresh(arch)
    tokens = calibration(model)
    hf, _ = tiny_hf_model(arch)  # the same seed: the same weights, never wrapped
    masks = reference_prune(hf, arch, 0.5, method, tokens if method == "wanda" else None)
    probe = model.to_tokens(["w1 w5 w9 w2 w7 w3 w1 w5", "w4 w4 w8 w0 w6"])
    kwargs = {"calibration": tokens} if method == "wanda" else {}
    with pruned(model, 0.5, method, **kwargs):
        for w in prunable_weights(model):
            per_layer = [x for x in prunable_weights(model) if x.layer == w.layer]
            mask = masks[(w.layer, per_layer.index(w))]
            assert torch.equal(w.rows() == 0, mask), w.name
        with torch.no_grad():
            got = model(probe, return_type="logits")
            want = hf(probe).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_restore_is_bit_exact_and_the_hash_follows(arch):
    model = fresh(arch)
    before, digest = snapshot(model), model.weights_hash
    with pytest.raises(RuntimeError, match="inside"):
        with pruned(model, 0.9, "wanda", calibration=calibration(model)):
            assert model.weights_hash != digest
            raise RuntimeError("an error inside the block")
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.weights_hash == digest
    del model.__dict__["weights_hash"]  # recomputed from the restored weights
    assert model.weights_hash == digest


@pytest.mark.parametrize("arch", ARCHS)
def test_sparsity_zero_changes_nothing(arch):
    model = fresh(arch)
    tokens = model.to_tokens("w3 w1 w4 w1 w5 w9")
    with torch.no_grad():
        base = model(tokens, return_type="logits")
    digest = model.weights_hash
    for method, kwargs in (("magnitude", {}), ("wanda", {"calibration": calibration(model)})):
        with pruned(model, 0.0, method, **kwargs) as record:
            assert record.n_pruned == 0 and model.weights_hash == digest
            with torch.no_grad():
                assert torch.equal(model(tokens, return_type="logits"), base)


def test_gqa_keys_per_query_head_follow_the_pruned_kv_weights():
    model = fresh("llama")
    with pruned(model, 0.5):
        w_k = model.W_K  # [layer, head, d_model, d_head], KV heads repeated
        assert torch.equal(w_k[:, 0], w_k[:, 1]) and torch.equal(w_k[:, 2], w_k[:, 3])
        assert float((w_k == 0).double().mean()) == pytest.approx(0.5)


def test_bad_pruning_arguments_say_what_is_allowed():
    model = fresh("llama")
    with pytest.raises(ValueError, match=r"sparsity=0.95: need a number from 0 to 0.9"):
        with pruned(model, 0.95):
            pass
    with pytest.raises(ValueError, match=r"method='obd' is not allowed; choose one of"):
        with pruned(model, 0.5, "obd"):
            pass
    with pytest.raises(ValueError, match="method='wanda' needs calibration="):
        with pruned(model, 0.5, "wanda"):
            pass
    with pytest.raises(ValueError, match="only used by method='wanda'"):
        with pruned(model, 0.5, calibration=calibration(model)):
            pass
    with pytest.raises(ValueError, match="the calibration text has 3 tokens"):
        calibration_batch(model, ["w1 w2 w3"], n_sequences=2, length=4)


# --------------------------------------------------------------------------------------------
# Derived tasks
# --------------------------------------------------------------------------------------------


def test_variant_tasks_are_registered_but_not_builtin():
    assert set(VARIANT_TASKS) <= set(TASKS) and not set(VARIANT_TASKS) & set(BUILTIN_TASKS)


def test_capital_in_context_states_the_true_capital():
    base, task = load_task("counterfactual_capital"), load_task("capital_in_context")
    assert len(task) == len(base)
    for ex, cf in zip(task.examples, base.examples, strict=True):
        true = cf.meta["memorised_answer"]
        assert ex.answer == true and set(ex.choices) == set(cf.choices)
        assert task.render(ex) == (f"The capital of {ex.fields['country']} is {true}. Q: What "
                                   f"is the capital of {ex.fields['country']}? A:")


def test_sentiment_unrelated_maps_the_labels():
    base, task = load_task("sentiment"), load_task("sentiment_unrelated")
    mapping = {"negative": "foo", "positive": "bar"}
    for ex, orig in zip(task.examples, base.examples, strict=True):
        assert ex.answer == mapping[orig.answer] and ex.fields == orig.fields
    prompt = build_prompts(task, shots=4, n=1)[0]
    assert "negative" not in prompt.text and "Sentiment" not in prompt.text
    assert set(prompt.labels) <= {"foo", "bar"}


def test_repeated_words_answer_is_the_next_word_of_the_repeat():
    task = load_task("repeated_words")
    golds = []
    for ex in task.examples:
        seq, m = ex.meta["sequence"].split(), ex.meta["repeat_shown"]
        assert len(set(seq)) == len(seq) == 8 and 1 <= m <= 7
        assert ex.fields["input"].split() == seq + seq[:m]
        assert ex.answer == seq[m] and set(ex.choices) <= set(seq)
        golds.append(ex.gold)
    assert np.bincount(golds).tolist() == [75, 75, 75, 75]


def test_calibration_text_is_boolq_passages_which_no_curve_task_reads():
    text = calibration_text()
    assert text == [ex.fields["passage"] for ex in load_task("boolq").examples]
    assert calibration_text(5) == text[:5]
    default_tasks = [spec.partition(":")[0] for spec in (*DEFAULT_RECALL_TASKS,
                                                         *DEFAULT_ICL_TASKS)]
    assert "boolq" not in default_tasks


# --------------------------------------------------------------------------------------------
# The curves
# --------------------------------------------------------------------------------------------


def toy_tasks():
    """Two tasks the toy tokenizer reads (every word is w0 .. w95)."""

    def recall():
        rng = np.random.default_rng(0)
        exs = [Example(id=f"r{i}", input=f"w{i}", gold=int(i % 3),
                       choices=tuple(f"w{int(j)}" for j in rng.choice(96, 3, replace=False)))
               for i in range(40)]
        return Task(name="toy_recall", examples=tuple(exs), template="{input} is")

    def copy():
        exs = []
        for i in range(40):
            words = [f"w{int(j)}" for j in np.random.default_rng(i).choice(96, 5, replace=False)]
            exs.append(Example(id=f"c{i}", input=" ".join(words + words[:2]),
                               choices=(words[2], words[4]), gold=0))
        return Task(name="toy_copy", examples=tuple(exs), template="{input}")

    return {"toy_recall": recall, "toy_copy": copy}


def reference_correct(model, prompts):
    """One forward per prompt and choice: is the gold continuation the most likely?"""
    out = []
    for p in prompts:
        context = model.encode(p.text)
        totals = []
        for cont in p.continuations:
            ids = model.encode(p.text + cont)
            tokens = torch.tensor([ids])
            with torch.no_grad():
                logp = model(tokens, return_type="logits")[0].log_softmax(-1)
            totals.append(sum(float(logp[i - 1, ids[i]]) for i in range(len(context), len(ids))))
        out.append(int(np.argmax(totals)) == p.gold)
    return out


def test_curves_equal_one_prompt_at_a_time_under_pruning():
    model = fresh("gpt2")
    with tasks_registered(toy_tasks()):
        curves = sparsity_curves(model, methods=["magnitude", "wanda"],
                                 sparsities=[0.0, 50.0, 90.0], recall_tasks=["toy_recall"],
                                 icl_tasks=["toy_copy:1"], n=6, calibration_sequences=2,
                                 calibration_length=8)
        c = curves.correct
        assert len(c) == 2 * 3 * 12
        tokens = calibration_batch(model, calibration_text(), n_sequences=2, length=8)
        for method in ("magnitude", "wanda"):
            for share in (0.0, 50.0, 90.0):
                got = []
                kwargs = {"calibration": tokens} if method == "wanda" else {}
                with pruned(model, share / 100, method, **kwargs):
                    for name, shots in (("toy_recall", 0), ("toy_copy", 1)):
                        prompts = build_prompts(load_task(name), shots=shots, n=6, seed=0)
                        got += reference_correct(model, prompts)
                rows = c[(c["method"] == method) & (c["sparsity"] == share)]
                assert rows["correct"].tolist() == got, (method, share)
    groups = curves.groups()
    row = groups[(groups["method"] == "wanda") & (groups["group"] == "in_context")
                 & (groups["sparsity"] == 90.0)].iloc[0]
    sub = c[(c["method"] == "wanda") & (c["group"] == "in_context") & (c["sparsity"] == 90.0)]
    assert row["accuracy"] == sub["correct"].mean() and row["n"] == 6
    assert set(curves.pruning["achieved"].round(1)) == {0.0, 0.5, 0.9}


def synthetic(recall_falls, icl_falls, n=60, unpruned=0.9):
    """Curves where each group's accuracy is ``unpruned`` until its fall, then 0."""
    rows = []
    for group, falls, task in (("recall", recall_falls, "a"), ("in_context", icl_falls, "b")):
        for s in DEFAULT_SPARSITIES:
            for i in range(n):
                ok = i < unpruned * n and s < falls
                rows.append({"method": "magnitude", "sparsity": s, "group": group,
                             "task": task, "shots": 0, "prompt_id": f"{task}{i}",
                             "chance": 0.25, "correct": ok})
    return SparsityCurves(correct=pd.DataFrame(rows), pruning=pd.DataFrame(),
                          params={"tolerance": 0.05})


def test_falls_at_and_the_verdict_follow_the_data():
    supported = synthetic(30.0, 70.0)
    t = supported.thresholds().set_index("group")
    assert t.loc["recall", "falls_at"] == 30.0 and t.loc["in_context", "falls_at"] == 70.0
    assert t.loc["recall", "holds_to"] == 20.0 and t.loc["in_context", "holds_to"] == 60.0
    row = supported.comparison().iloc[0]
    assert row["verdict"] == "supported" and row["difference"] == 40.0
    assert row["difference_low"] > 0 and "supported" in row["sentence"]
    assert synthetic(70.0, 30.0).comparison().iloc[0]["verdict"] == "contradicted"
    never = synthetic(100.0, 100.0).comparison().iloc[0]
    assert never["verdict"] == "inconclusive" and never["falls_recall"] == 100.0
    assert synthetic(30.0, 70.0, unpruned=0.2).comparison().iloc[0]["verdict"] == "uninformative"


def test_drop_intervals_are_the_paired_bootstrap_and_wilson():
    from mechicl.stats import paired_bootstrap, wilson_interval

    curves = synthetic(30.0, 70.0)
    g = curves.groups().set_index(["group", "sparsity"])
    c = curves.correct
    recall = c[c["group"] == "recall"].pivot(index="sparsity", columns="prompt_id",
                                             values="correct").to_numpy(float)
    boot = paired_bootstrap(recall[0][None], recall, n_resamples=2000, seed=0)
    assert g.loc[("recall", 40.0), "drop_low"] == pytest.approx(boot.low[4])
    assert (g.loc[("recall", 0.0), "ci_low"], g.loc[("recall", 0.0), "ci_high"]) == \
        pytest.approx(wilson_interval(54, 60))


def test_result_round_trip_figure_and_registry(tmp_path):
    curves = synthetic(30.0, 70.0)
    loaded = load_result(curves.save(tmp_path / "curves"))
    assert isinstance(loaded, SparsityCurves) and loaded.correct.equals(curves.correct)
    fig = sparsity_figure(curves)
    assert {t.name for t in fig.data if t.name} >= {"recall (closed book)", "in context"}
    spec = ANALYSES["sparsity_curves"]
    assert spec.cli_name == "sparsity"
    defaults = spec.defaults()
    assert defaults["sparsities"] == list(DEFAULT_SPARSITIES)
    assert defaults["recall_tasks"] == list(DEFAULT_RECALL_TASKS)
    assert defaults["icl_tasks"] == list(DEFAULT_ICL_TASKS)
    with pytest.raises(ValueError, match="'boolq' calibrates Wanda"):
        spec.resolve({"icl_tasks": ["boolq"]})
    with pytest.raises(ValueError, match="'nope' is not registered"):
        spec.resolve({"recall_tasks": ["nope"]})
    with pytest.raises(ValueError, match="sparsities"):
        spec.resolve({"sparsities": [0.0, 95.0]})


# --------------------------------------------------------------------------------------------
# The real default model
# --------------------------------------------------------------------------------------------


def assert_removes_the_lowest_scores(before, after, score, sparsity):
    """The defining property, indifferent to ties (4-bit weights tie often): each output row
    loses exactly floor(sparsity x its length) weights, every removed weight scores at most
    every kept one of its row, and the kept ones are unchanged."""
    removed = (after == 0) & (before != 0)
    k = int(math.floor(sparsity * before.shape[1] + 1e-9))
    for i in range(before.shape[0]):
        row = removed[i]
        gone = int(row.sum()) + int(((before[i] == 0) & (after[i] == 0)).sum())
        assert gone >= k and int(row.sum()) <= k, i
        if row.any() and (~row).any():
            assert float(score[i][row].max()) <= float(score[i][~row & (before[i] != 0)].min()), i
    assert torch.equal(after[after != 0], before[after != 0])


@pytest.mark.slow
def test_smollm2_pruning_removes_the_lowest_scores_of_each_row_and_restores(smollm2):
    tokens = calibration_batch(smollm2, calibration_text(4), n_sequences=2, length=32)
    weights = prunable_weights(smollm2)
    assert len(weights) == 30 * 7  # q, k, v, o, gate, up, down per block; no lm_head
    # the HF nn.Linear layers inside the bridge's wrappers ([out, in])
    first, middle = ([w.module for w in weights if w.layer == b] for b in (0, 14))
    assert [w.name.split(".")[-2] for w in weights[:7]] == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert all(type(m) is torch.nn.Linear for m in first + middle)
    # Wanda's scores for block 0: its inputs come from the unpruned embeddings, so a forward of
    # the unpruned model gives them (later blocks see their pruned predecessors)
    seen = {}

    def keep(mod, args, out):
        seen[id(mod)] = args[0].detach()

    handles = [m.register_forward_hook(keep) for m in first]
    probe = smollm2.to_tokens("The capital of France is")
    with torch.no_grad():
        smollm2(tokens)
    for h in handles:
        h.remove()
    with torch.no_grad():
        base = smollm2(probe, return_type="logits")
    norms = {id(m): seen[id(m)][:, 1:].double().pow(2).sum((0, 1)).sqrt() for m in first}
    k_proj = next(w for w in weights if w.name.endswith("k_proj._original_component"))
    assert tuple(k_proj.rows().shape) == (192, 576)  # 3 KV heads x 64: pruned once
    digest = smollm2.weights_hash
    for method, modules, share in (("wanda", first, 0.5), ("magnitude", middle, 0.3)):
        before = [m.weight.detach().clone() for m in modules]
        kwargs = {"calibration": tokens} if method == "wanda" else {}
        with pruned(smollm2, share, method, **kwargs) as record:
            assert share - 1 / 576 <= record.achieved <= share  # floor(share x row) per row
            assert ((k_proj.rows() == 0).sum(1) == math.floor(share * 576 + 1e-9)).all()
            assert smollm2.weights_hash != digest
            for m, w in zip(modules, before, strict=True):
                score = w.abs().double() * (norms[id(m)][None] if method == "wanda" else 1.0)
                assert_removes_the_lowest_scores(w, m.weight.detach(), score, share)
            with torch.no_grad():
                assert not torch.equal(smollm2(probe, return_type="logits"), base)
        for m, w in zip(modules, before, strict=True):
            assert torch.equal(m.weight.detach(), w)
    with torch.no_grad():
        assert torch.equal(smollm2(probe, return_type="logits"), base)
    assert smollm2.weights_hash == digest


def test_cli_outputs_hold_the_thresholds_the_verdict_and_the_figure():
    from mechicl.analyses import Job

    spec = ANALYSES["sparsity_curves"]
    job = Job(analysis="sparsity_curves", model="some/model", seed=0, options=spec.defaults())
    out = spec.outputs([(job, synthetic(30.0, 70.0))], {})
    assert list(out.results) == ["model-sparsity"] and list(out.figures) == ["model-sparsity-curves"]
    rows = {r["group"]: r for r in out.rows}
    assert rows["recall"]["falls_at"] == 30.0 and rows["in_context"]["verdict"] == "supported"
