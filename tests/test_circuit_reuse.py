"""Circuit reuse (Merullo, Eickhoff & Pavlick 2024): mechicl.analyses.circuit_reuse against slow,
obviously correct references on a tiny 3-layer grouped-query model, and once on SmolLM2 (slow).

* The per-pair effects are patch's / path_patch's per-pair metrics: their means equal the
  results' effects, and the normalised observed effects equal ``normalize=True``.
* Attention at the role positions, the direct / inhibition effects and every role criterion
  equal a per-head, per-pair loop over ``run_with_cache`` / ``run_with_hooks`` and the textbook
  path-patching reference (tests/reference_path_attribution.py).
* The overlap statistics equal overlap.py's functions on the effect maps; the bootstrap
  intervals equal an explicit loop over resamples; the shared-role null equals a loop over
  layer-preserving relabellings.
* Save / load, corrupt files, bad input, figures, the registered analysis.
"""

import inspect
import json
import logging
import math

import numpy as np
import pandas as pd
import pytest
import reference_path_attribution as ref  # tests/reference_path_attribution.py
import torch
from torch.testing import assert_close

from mechicl import load_result
from mechicl.analyses import get_analysis
from mechicl.analyses.circuit_reuse import (
    ATTENTION,
    EFFECTS,
    ROLES,
    CircuitReuse,
    TaskCircuit,
    assign_roles,
    attention_scores,
    circuit_reuse,
    reuse_figures,
    reuse_tables,
    role_positions,
    task_circuit,
)
from mechicl.analyses.overlap import (
    layer_permutations,
    percentile_interval,
    permutation_pvalue,
    spearman,
    top_k_overlap,
    top_k_pvalue,
    within_layer_spearman,
)
from mechicl.analyses.patching import patch
from mechicl.analyses.path_patching import path_patch
from mechicl.inputs.pairs import PromptPairs, ioi_pairs, make_pairs
from mechicl.model import as_hooked_model
from mechicl.results import ResultError
from mechicl.stats import bootstrap_weights
from mechicl.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

N_PAIRS = 4
TAU_E, TAU_A = 0.02, 0.1  # low enough that the random model has name movers above layer 0
OPTIONS = {"effect_threshold": TAU_E, "attention_threshold": TAU_A, "n_resamples": 200,
           "n_permutations": 200, "top_k_percent": 25.0}


def colored_pairs(model, n: int, seed: int = 0) -> PromptPairs:
    """Colored-Objects-shaped pairs in toy words (the toy tokenizer knows no colours): ``w50``,
    then three ``colour object w51`` items, ``w52 w53``, the queried object, ``w54 w55``; the
    answer is the queried object's colour, the corrupted prompt asks about another object."""
    gen = torch.Generator().manual_seed(seed)
    rows: dict[str, list] = {k: [] for k in ("c", "r", "a", "w", "q", "ac", "wc", "ct", "rt")}
    for _ in range(n):
        cols = (torch.randperm(10, generator=gen)[:3] + 10).tolist()
        objs = (torch.randperm(10, generator=gen)[:3] + 30).tolist()
        q = int(torch.randint(3, (1,), generator=gen))
        other = (q + 1) % 3
        words = ["w50"]
        for c, o in zip(cols, objs, strict=True):
            words += [f"w{c}", f"w{o}", "w51"]
        words += ["w52", "w53"]
        clean = " ".join([*words, f"w{objs[q]}", "w54", "w55"])
        corrupted = " ".join([*words, f"w{objs[other]}", "w54", "w55"])
        rows["ct"].append(clean)
        rows["rt"].append(corrupted)
        rows["c"].append(model.encode(clean))
        rows["r"].append(model.encode(corrupted))
        rows["a"].append(model.encode(f"w{cols[q]}", prepend_bos=False)[0])
        rows["w"].append(model.encode(f"w{cols[other]}", prepend_bos=False)[0])
        rows["ac"].append(2 + 3 * q)  # <bos> w50 then colour j at 2 + 3j
        rows["wc"].append(2 + 3 * other)
        rows["q"].append(len(words) + 1)
    length = len(rows["c"][0])
    return PromptPairs(
        name="colored_objects", clean=torch.tensor(rows["c"]), corrupted=torch.tensor(rows["r"]),
        lengths=torch.full((n,), length), answer=torch.tensor(rows["a"]),
        wrong=torch.tensor(rows["w"]), clean_text=tuple(rows["ct"]),
        corrupted_text=tuple(rows["rt"]), answer_text=("a",) * n, wrong_text=("w",) * n,
        positions={"queried": torch.tensor(rows["q"]), "answer_color": torch.tensor(rows["ac"]),
                   "wrong_color": torch.tensor(rows["wc"]),
                   "end": torch.full((n,), length - 1)})


@pytest.fixture(scope="module")
def model3():
    return as_hooked_model(tiny_model("llama", n_layers=3), name="tiny3-llama")


@pytest.fixture(scope="module")
def task_pairs(model3):
    ioi = ioi_pairs(model3, N_PAIRS, templates="BABA", names=[f"w{i}" for i in range(10)])
    return ioi, colored_pairs(model3, N_PAIRS)


@pytest.fixture(scope="module")
def result(model3, task_pairs):
    return circuit_reuse(model3, *task_pairs, **OPTIONS)


# ---- slow references ----------------------------------------------------------------------


def ref_attention(model, pairs: PromptPairs) -> torch.Tensor:
    """``[kind, layer, head, pair]`` from run_with_cache, one head and one pair at a time."""
    pos = role_positions(pairs)
    spots = {"end_to_answer": ("end", "answer"), "end_to_second": ("end", "second"),
             "second_to_first": ("second", "first"),
             "second_to_after_first": ("second", "after_first")}
    out = torch.zeros(len(ATTENTION), model.n_layers, model.n_heads, len(pairs),
                      dtype=torch.float64)
    for p in range(len(pairs)):
        for layer in range(model.n_layers):
            name = ref.hook(model, "pattern", layer)
            with torch.no_grad():
                _, cache = model.run_with_cache(pairs.clean_tokens(p)[None],
                                                names_filter=lambda n, name=name: n == name)
            for head in range(model.n_heads):
                for i, kind in enumerate(ATTENTION):
                    q, k = spots[kind]
                    out[i, layer, head, p] = float(cache[name][0, head, int(pos[q][p]),
                                                               int(pos[k][p])])
    return out


def ref_attention_layers(model, pairs: PromptPairs, layers) -> torch.Tensor:
    """:func:`ref_attention` at a few layers (``[kind, layer, head, pair]``)."""
    pos = role_positions(pairs)
    keys = (("end", "answer"), ("end", "second"), ("second", "first"), ("second", "after_first"))
    out = torch.zeros(len(ATTENTION), len(layers), model.n_heads, len(pairs), dtype=torch.float64)
    names = [ref.hook(model, "pattern", layer) for layer in layers]
    for p in range(len(pairs)):
        with torch.no_grad():
            _, cache = model.run_with_cache(pairs.clean_tokens(p)[None],
                                            names_filter=lambda n: n in names)
        for j, name in enumerate(names):
            for i, (q, k) in enumerate(keys):
                out[i, j, :, p] = cache[name][0, :, int(pos[q][p]), int(pos[k][p])].double()
    return out


def ref_metric(model, tokens, answer, wrong, hooks=()) -> float:
    with torch.no_grad():
        logits = model.run_with_hooks(tokens[None], return_type="logits", fwd_hooks=list(hooks))
    return float(ref.logit_diff(logits, answer, wrong))


def ref_task(model, pairs: PromptPairs, movers=None) -> dict:
    """Per head and pair, plain loops: the clean / corrupted metric, activation patching of the
    head's hook_z (denoising), path patching to the logits and to the movers' q (noising)."""
    n_l, n_h, n_p = model.n_layers, model.n_heads, len(pairs)
    act, direct, inhib = (torch.full((n_l, n_h, n_p), float("nan"), dtype=torch.float64)
                          for _ in range(3))
    clean_m, corr_m = torch.zeros(n_p, dtype=torch.float64), torch.zeros(n_p, dtype=torch.float64)
    for p in range(n_p):
        clean, corr = pairs.clean_tokens(p), pairs.corrupted_tokens(p)
        a, w = int(pairs.answer[p]), int(pairs.wrong[p])
        clean_m[p] = ref_metric(model, clean, a, w)
        corr_m[p] = ref_metric(model, corr, a, w)
        z_names = [ref.hook(model, "z", layer) for layer in range(n_l)]
        _, clean_cache = ref.cache_run(model, clean, z_names)
        caches = ref.path_caches(model, clean, corr)
        for layer in range(n_l):
            for head in range(n_h):
                def put(z, hook, source=clean_cache[z_names[layer]], head=head):
                    z = z.clone()
                    z[:, :, head] = source[:, :, head]
                    return z
                act[layer, head, p] = ref_metric(model, corr, a, w, [(z_names[layer], put)])
                direct[layer, head, p] = ref.path_patch_reference(
                    model, clean, corr, a, w, senders=[(layer, head)], receivers="logits",
                    caches=caches)
                if movers and layer < max(m[0] for m in movers):
                    inhib[layer, head, p] = ref.path_patch_reference(
                        model, clean, corr, a, w, senders=[(layer, head)], receivers=movers,
                        receiver_input=("q",), caches=caches)
    return {"clean": clean_m, "corrupted": corr_m, "act": act, "direct": direct, "inhib": inhib}


def ref_roles(act, direct, inhib, attention) -> dict[str, set]:
    """The role criteria, head by head."""
    out: dict[str, set] = {r: set() for r in ROLES}
    n_l, n_h = act.shape
    for layer in range(n_l):
        for head in range(n_h):
            d, i = float(direct[layer, head]), float(inhib[layer, head])
            to_answer, dup, ind = (float(attention[k, layer, head]) for k in (0, 2, 3))
            if d >= TAU_E and to_answer >= TAU_A:
                out["name_mover"].add((layer, head))
            if d <= -TAU_E and to_answer >= TAU_A:
                out["negative_name_mover"].add((layer, head))
            if not math.isnan(i) and i >= TAU_E:
                out["s_inhibition"].add((layer, head))
            if dup >= TAU_A:
                out["duplicate_token"].add((layer, head))
            if ind >= TAU_A:
                out["induction"].add((layer, head))
    return out


# ---- effects, attention and roles against the references ----------------------------------


def test_per_pair_effects_are_patch_and_path_patch_per_pair_metrics(model3, task_pairs, result):
    for pairs, circuit in zip(task_pairs, result.circuits, strict=True):
        act = patch(model3, pairs, metric="logit_diff", target="head_out")
        direct = path_patch(model3, pairs, metric="logit_diff", receivers="logits")
        assert_close(circuit.effects[0].mean(-1), act.effect().double(), atol=1e-5, rtol=1e-5)
        assert_close(circuit.effects[1].mean(-1), -direct.effect().double(), atol=1e-5,
                     rtol=1e-5)
        # normalised observed effects: patch's normalize=True (and 1 - it for noising)
        act_n = patch(model3, pairs, metric="logit_diff", target="head_out", normalize=True)
        direct_n = path_patch(model3, pairs, metric="logit_diff", receivers="logits",
                              normalize=True)
        assert_close(result.effect_map(pairs.name, "activation"), act_n.values.double(),
                     atol=1e-4, rtol=1e-4)
        assert_close(result.effect_map(pairs.name, "direct"), 1 - direct_n.values.double(),
                     atol=1e-4, rtol=1e-4)
        if circuit.name_movers:
            inhib = path_patch(model3, pairs, metric="logit_diff",
                               receivers=list(circuit.name_movers), receiver_input="q")
            assert_close(circuit.effects[2].mean(-1), -inhib.effect().double(), atol=1e-5,
                         rtol=1e-5, equal_nan=True)
        else:
            assert circuit.effects[2].isnan().all()


def test_attention_equals_run_with_cache_loop(model3, task_pairs):
    for pairs in task_pairs:
        assert_close(attention_scores(model3, pairs), ref_attention(model3, pairs), atol=1e-6,
                     rtol=1e-5)


def test_roles_equal_per_head_loop_reference(model3, task_pairs, result):
    assert result.circuits[0].name_movers, "the fixture should have IOI name movers"
    assert max(m[0] for m in result.circuits[0].name_movers) > 0
    for pairs, circuit in zip(task_pairs, result.circuits, strict=True):
        want = ref_task(model3, pairs, list(circuit.name_movers))
        gap = (want["clean"] - want["corrupted"]).mean()
        act = (want["act"].mean(-1) - want["corrupted"].mean()) / gap
        direct = (want["clean"].mean() - want["direct"].mean(-1)) / gap
        inhib = (want["clean"].mean() - want["inhib"].mean(-1)) / gap
        attention = ref_attention(model3, pairs).mean(-1)
        assert_close(result.effect_map(pairs.name, "activation"), act, atol=1e-4, rtol=1e-4)
        assert_close(result.effect_map(pairs.name, "direct"), direct, atol=1e-4, rtol=1e-4)
        assert_close(result.effect_map(pairs.name, "inhibition"), inhib, atol=1e-4, rtol=1e-4,
                     equal_nan=True)
        roles = ref_roles(act, direct, inhib, attention)
        got = result.role_map(pairs.name)
        for i, role in enumerate(ROLES):
            assert {tuple(h) for h in got[i].nonzero().tolist()} == roles[role], role
        # the name movers found are the receivers of the inhibition paths
        assert set(circuit.name_movers) == roles["name_mover"]


def test_assign_roles_thresholds_are_inclusive_and_nan_holds_no_role():
    eff = torch.tensor([0.05, -0.05, float("nan")]).reshape(1, 1, 1, 3).expand(1, 3, 1, 3)
    att = torch.full((1, 4, 1, 3), 0.1)
    roles = assign_roles(eff, att, effect_threshold=0.05, attention_threshold=0.1)[0, :, 0]
    assert roles.tolist() == [[True, False, False], [False, True, False],
                              [True, False, False], [True] * 3, [True] * 3]


# ---- statistics -------------------------------------------------------------------------


def test_overlap_statistics_equal_overlap_module(result):
    a, b = result.tasks
    k = result.params["k"]
    rows = result.overlap.set_index("quantity")
    for effect in ("activation", "direct"):
        x, y = result.effect_map(a, effect), result.effect_map(b, effect)
        assert rows.loc[f"{effect} top_k", "value"] == top_k_overlap(x.abs(), y.abs(), k)
        assert rows.loc[f"{effect} top_k", "hypergeometric p"] == top_k_pvalue(x.abs(), y.abs(), k)
        assert rows.loc[f"{effect} spearman", "value"] == pytest.approx(spearman(x, y))
        assert rows.loc[f"{effect} within_layer_spearman", "value"] == pytest.approx(
            within_layer_spearman(x, y))
        for stat, maps in (("top_k", (x.abs(), y.abs())), ("spearman", (x, y)),
                           ("within_layer_spearman", (x, y))):
            for label, within in (("plain", False), ("layer", True)):
                want = permutation_pvalue(*maps, statistic=stat, k=k, n_permutations=200,
                                          seed=0, within_layers=within)
                assert rows.loc[f"{effect} {stat}", f"{label}-null p"] == pytest.approx(want)


def test_bootstrap_intervals_equal_explicit_resample_loop(result):
    """Resample r of task t: pairs drawn with bootstrap_weights(n, R, seed + t); the maps of
    each resample computed pair by pair, the statistic per resample, then the percentile
    interval of overlap.py."""
    first, second = result.circuits
    n_res = result.params["n_resamples"]

    def resampled_maps(circuit, seed, effect):
        w = bootstrap_weights(circuit.n, n_res, seed)
        e = EFFECTS.index(effect)
        maps = []
        for r in range(n_res):
            idx = np.repeat(np.arange(circuit.n), w[r].astype(int))
            num = sum(circuit.effects[e, :, :, i] for i in idx)
            den = sum(circuit.clean[i] - circuit.corrupted[i] for i in idx)
            maps.append(num / den)
        return maps

    ma, mb = resampled_maps(first, 0, "direct"), resampled_maps(second, 1, "direct")
    rho = torch.tensor([spearman(x, y) for x, y in zip(ma, mb, strict=True)])
    row = result.overlap.set_index("quantity").loc["direct spearman"]
    low, high = percentile_interval(rho, 0.95)
    assert row["low"] == pytest.approx(low) and row["high"] == pytest.approx(high)
    # a per-head interval of the heads table
    heads = result.heads.set_index(["layer", "head"])
    values = torch.tensor([float(m[1, 2]) for m in ma])
    low, high = percentile_interval(values, 0.95)
    assert heads.loc[(1, 2), "ioi direct low"] == pytest.approx(low)
    assert heads.loc[(1, 2), "ioi direct high"] == pytest.approx(high)


def test_shared_roles_and_layer_null_equal_loop(result):
    a, b = result.tasks
    ra, rb = result.role_map(a), result.role_map(b)
    n_layers, n_heads = ra.shape[1:]
    perms = layer_permutations(n_layers, n_heads, 200, seed=0)
    rows = result.roles.set_index("role")
    for i, role in enumerate(ROLES):
        shared = {(l_, h) for l_ in range(n_layers) for h in range(n_heads)
                  if ra[i, l_, h] and rb[i, l_, h]}
        assert rows.loc[role, "value"] == len(shared)
        counts = []
        for perm in perms:
            relabelled = rb[i].flatten()[perm.flatten()].reshape(n_layers, n_heads)
            counts.append(sum(bool(ra[i, l_, h] and relabelled[l_, h])
                              for l_ in range(n_layers) for h in range(n_heads)))
        assert rows.loc[role, "layer-null expected"] == pytest.approx(np.mean(counts))
        p = (1 + sum(c >= len(shared) for c in counts)) / 201
        assert rows.loc[role, "layer-null p"] == pytest.approx(p)
        n_a, n_b = int(ra[i].sum()), int(rb[i].sum())
        assert rows.loc[role, "plain-null expected"] == pytest.approx(n_a * n_b / ra[i].numel())


# ---- result protocol, figures, bad input, registry ------------------------------------------


def test_save_load_round_trip_and_corruption(result, tmp_path):
    folder = result.save(tmp_path / "reuse")
    back = load_result(folder)
    assert isinstance(back, CircuitReuse) and back.tasks == result.tasks
    pd.testing.assert_frame_equal(back.heads, result.heads)
    pd.testing.assert_frame_equal(back.roles, result.roles)
    for c, d in zip(result.circuits, back.circuits, strict=True):
        assert_close(c.effects, d.effects, equal_nan=True)
        assert c.name_movers == d.name_movers
    meta = json.loads((folder / "result.json").read_text())
    meta["fields"]["tasks"] = ["ioi"]  # edited: the checksum no longer matches
    (folder / "result.json").write_text(json.dumps(meta))
    with pytest.raises(ResultError):
        load_result(folder)


def test_one_pair_warns_of_zero_width_intervals(result, caplog):
    one = [TaskCircuit(task=c.task, clean=c.clean[:1], corrupted=c.corrupted[:1],
                       effects=c.effects[..., :1], attention=c.attention[..., :1])
           for c in result.circuits]
    with caplog.at_level(logging.WARNING, logger="mechicl.analyses.circuit_reuse"):
        tables = reuse_tables(*one, k=2, n_resamples=20, n_permutations=20)
    assert "fewer than 2 prompt pairs" in caplog.text
    assert (tables["overlap"]["low"] == tables["overlap"]["high"]).all()


def test_figures(result):
    figs = reuse_figures(result, "x")
    assert sorted(figs) == ["x-activation-heatmaps", "x-activation-scatter",
                            "x-direct-heatmaps", "x-direct-scatter"]
    heat = figs["x-direct-heatmaps"]
    assert [t.type for t in heat.data] == ["heatmap", "heatmap"]
    assert_close(torch.tensor(heat.data[1].z), result.effect_map("colored_objects", "direct"))
    marked = [t.name for t in figs["x-direct-scatter"].data[1:]]
    held = [r for i, r in enumerate(ROLES)
            if (result.role_map("ioi")[i] | result.role_map("colored_objects")[i]).any()]
    assert [m.split(" (")[0] for m in marked] == held
    # what the CLI writes: the result, the four figures, one summary row per statistic / role
    spec = get_analysis("circuit_reuse")
    out = spec.outputs([(spec.job("tiny", {"n": N_PAIRS}), result)], {})
    assert list(out.results) == ["tiny-circuit-reuse"] and len(out.figures) == 4
    assert [r["quantity"] for r in out.rows] == [*result.overlap["quantity"],
                                                 *result.roles["quantity"]]


def test_bad_input(model3, task_pairs):
    ioi, colored = task_pairs
    with pytest.raises(ValueError, match="both pair sets are 'ioi'"):
        circuit_reuse(model3, ioi, ioi)
    other = PromptPairs(name="capitals", clean=ioi.clean, corrupted=ioi.corrupted,
                        lengths=ioi.lengths, answer=ioi.answer, wrong=ioi.wrong,
                        clean_text=ioi.clean_text, corrupted_text=ioi.corrupted_text,
                        answer_text=ioi.answer_text, wrong_text=ioi.wrong_text)
    with pytest.raises(ValueError, match=r"defined for pairs named \['ioi', 'colored_objects'\]; "
                                         "got pairs named 'capitals'"):
        circuit_reuse(model3, ioi, other)
    shifted = PromptPairs(**{**{f: getattr(colored, f) for f in (
        "name", "clean", "corrupted", "lengths", "answer", "wrong", "clean_text",
        "corrupted_text", "answer_text", "wrong_text")},
        "positions": {**colored.positions, "answer_color": colored.positions["wrong_color"] + 1}})
    with pytest.raises(ValueError, match="is not the queried object"):
        role_positions(shifted)
    with pytest.raises(ValueError, match="effect_threshold=0.0 must be"):
        circuit_reuse(model3, ioi, colored, effect_threshold=0.0)


def test_registered_analysis_options():
    spec = get_analysis("circuit_reuse")
    assert spec.cli_name == "circuit-reuse" and spec.result_type is CircuitReuse
    job = spec.job("m", {"n": 4})
    assert job.options["effect_threshold"] == 0.05 and "batch_tokens" not in job.key_options()
    with pytest.raises(ValueError, match="attention_threshold = 2.0"):
        spec.job("m", {"attention_threshold": 2.0})
    with pytest.raises(ValueError, match="n = 1: need an integer >= 2"):
        spec.job("m", {"n": 1})
    params = inspect.signature(circuit_reuse).parameters  # the Python API's defaults agree
    for name in ("top_k_percent", "effect_threshold", "attention_threshold", "n_permutations",
                 "n_resamples", "batch_tokens"):
        assert params[name].default == spec.option(name).default, name


@pytest.mark.slow
def test_smollm2_ioi_pair_and_colored_positions(smollm2):
    """On SmolLM2: one IOI pair through task_circuit (~30 s of CPU: the whole analysis costs
    ~30 s per IOI pair and ~60 s per Colored Objects pair, too slow for a test), and the role
    positions and attention of 8 real Colored Objects pairs against run_with_cache."""
    ioi = ioi_pairs(smollm2, 1, seed=0)
    circuit = task_circuit(smollm2, ioi, effect_threshold=0.05, attention_threshold=0.1)
    assert float(circuit.clean[0] - circuit.corrupted[0]) > 0  # SmolLM2 does IOI
    eff, att = circuit.draws(torch.ones(1, 1, dtype=torch.float64))
    roles = assign_roles(eff, att, effect_threshold=0.05, attention_threshold=0.1)[0]
    movers = {tuple(h) for h in roles[ROLES.index("name_mover")].nonzero().tolist()}
    assert movers == set(circuit.name_movers)
    if movers:  # heads at or above the highest receiver cannot reach it
        top = max(layer for layer, _ in movers)
        assert circuit.effects[2, top:].isnan().all()
        assert not circuit.effects[2, :top].isnan().any()
    colored = make_pairs("colored_objects", smollm2, n=8, seed=0)
    pos = role_positions(colored)  # the listed object follows its colour in the real tokenizer
    rows = torch.arange(8)
    assert (colored.clean[rows, pos["first"]] == colored.clean[rows, pos["second"]]).all()
    got = attention_scores(smollm2, colored.select([0, 1]), None)
    want = ref_attention_layers(smollm2, colored.select([0, 1]), layers=(0, 15, 29))
    assert_close(got[:, [0, 15, 29]], want, atol=1e-5, rtol=1e-4)
