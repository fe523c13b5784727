"""Activation patching (mechicl.analyses.patching) on the tiny models: every target equals
TransformerLens's ``get_act_patch_*`` (or a plain one-forward-per-cell loop,
tests/reference_patching.py) for three kinds of metric, in both directions; the per-query-head
k/v view equals ordinary patching of an equivalent multi-head model; cell subsets, batching,
input forms, normalisation, the result container and the errors.

The real-model checks (SmolLM2) are in tests/test_patching_smollm2.py.
"""

import pandas as pd
import pytest
import reference_patching as ref  # tests/reference_patching.py: slow, plain references
import torch
from torch.testing import assert_close
from transformer_lens.model_bridge import TransformerBridge

from mechicl.analyses._engine import as_inputs
from mechicl.analyses.patching import TARGETS, PatchResult, patch, target_axes
from mechicl.inputs.pairs import PromptPairs
from mechicl.model import as_hooked_model
from mechicl.results import HeadScores
from mechicl.testing import FIRST_WORD_ID, SPECIAL_TOKEN_IDS, tiny_hf_model

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-4
BOS = SPECIAL_TOKEN_IDS["<bos>"]
D_VOCAB = 100  # the toy tokenizer: 4 special tokens + w0..w95
N_WORDS = D_VOCAB - FIRST_WORD_ID


def _other_word(ids: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """A word id different from each of ``ids`` (shift in 1..N_WORDS-1)."""
    return (ids - FIRST_WORD_ID + shift) % N_WORDS + FIRST_WORD_ID


def _make_pairs(seed: int, n: int = 3, length: int = 6, diff_at: tuple[int, ...] = (2,),
                extra: tuple[int, int] | None = (1, 4)):
    """``n`` random clean prompts (BOS first), corrupted copies that differ at the positions
    ``diff_at`` (and, for pair ``extra[0]``, also at ``extra[1]``), and answer / wrong ids."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(FIRST_WORD_ID, D_VOCAB, (n, length), generator=g)
    clean[:, 0] = BOS
    corrupted = clean.clone()
    for p in diff_at:
        corrupted[:, p] = _other_word(clean[:, p], torch.randint(1, N_WORDS, (n,), generator=g))
    if extra is not None:
        i, p = extra
        corrupted[i, p] = _other_word(clean[i, p], torch.tensor(7))
    answer = torch.randint(FIRST_WORD_ID, D_VOCAB, (n,), generator=g)
    wrong = _other_word(answer, torch.randint(1, N_WORDS, (n,), generator=g))
    return clean, corrupted, answer, wrong


CLEAN, CORRUPTED, ANSWER, WRONG = _make_pairs(0, length=6)
N_PAIRS, N_POS = CLEAN.shape


def per_pair_logit_diff(logits: torch.Tensor) -> torch.Tensor:
    """TransformerLens-style metric: the logit difference at the last position, ``[batch]``."""
    last = logits[:, -1]
    return (last.gather(-1, ANSWER[:, None]) - last.gather(-1, WRONG[:, None]))[:, 0]


def mean_logit_diff(logits: torch.Tensor) -> torch.Tensor:
    """TransformerLens-style metric: the mean logit difference over the batch (a scalar)."""
    return per_pair_logit_diff(logits).mean()


def expected(model, run, source, metric, target, by_pos, reduce="scalar"):
    """TransformerLens's grid for ``target`` (run on ``run`` with ``source``'s cache); the plain
    reference loop where TransformerLens has no function (resid-like targets over all
    positions, resid_post)."""
    if (target, by_pos) in ref.TL_FUNCTIONS:
        return ref.tl_patch(model, run, source, metric, target, by_pos, reduce=reduce)
    return ref.resid_reference(model, run, source, metric, target, by_pos)


# the expected axis names, written out (k/v of a GQA model: "kv_head" instead of "head")
AXES = {
    **{(t, False): ("layer",) for t in ("resid_pre", "resid_mid", "resid_post", "attn_out",
                                        "mlp_out")},
    **{(t, True): ("layer", "pos") for t in ("resid_pre", "resid_mid", "resid_post", "attn_out",
                                             "mlp_out")},
    **{(t, False): ("layer", "head") for t in ("head_out", "q", "k", "v")},
    **{(t, True): ("layer", "pos", "head") for t in ("head_out", "q", "k", "v")},
    ("pattern", False): ("layer", "head"),
    ("pattern", True): ("layer", "head", "pos"),
}


def expected_axes(model, target, by_pos, kv_heads="group"):
    axes = AXES[(target, by_pos)]
    if target in ("k", "v") and kv_heads == "group" and model.n_kv_heads < model.n_heads:
        axes = tuple("kv_head" if a == "head" else a for a in axes)
    return axes


CASES = [(t, b) for t in TARGETS for b in (False, True)]


def _id(case):
    return f"{case[0]}-{'by_pos' if case[1] else 'all_pos'}"


# --------------------------------------------------------------------------------------------
# 1-2. Every target equals TransformerLens, for three kinds of metric; axes as TransformerLens
# --------------------------------------------------------------------------------------------


def test_targets_list():
    assert set(TARGETS) == {"resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out",
                            "head_out", "q", "k", "v", "pattern"}
    assert {t for t, _ in ref.TL_FUNCTIONS} | {"resid_post"} == set(TARGETS)


def _some_cells(shape, n, seed):
    """``n`` distinct random cells of a grid of ``shape`` (``[n, len(shape)]``)."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(int(torch.tensor(shape).prod()), generator=g)[:n]
    return torch.stack(torch.unravel_index(flat, shape), dim=1)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_matches_transformerlens(tiny, case):
    target, by_pos = case
    # TransformerLens (or the plain loop) with a [batch] metric: every cell, every pair
    want_pairs = expected(tiny, CORRUPTED, CLEAN, per_pair_logit_diff, target, by_pos,
                          reduce="none")
    want = want_pairs.mean(-1)
    if target.startswith("resid") and not by_pos:
        # the whole residual stream at any layer: every cell is the clean run
        clean, corrupted = (ref.run_metric(tiny, t, mean_logit_diff) for t in (CLEAN, CORRUPTED))
        assert_close(want, clean.expand(want.shape), atol=ATOL, rtol=0)
        assert abs(clean - corrupted) > 1e-3
    else:
        assert want.max() - want.min() > 1e-3  # the grid is not trivial: the test can fail

    # (a) a callable returning one number for the batch
    got = patch(tiny, CLEAN, CORRUPTED, mean_logit_diff, target=target, by_pos=by_pos)
    assert got.axes == expected_axes(tiny, target, by_pos)
    assert got.values.shape == want.shape
    assert_close(got.values, want, atol=ATOL, rtol=0)
    assert got.per_pair is None and not got.normalized and got.direction == "denoising"
    assert got.metric == "mean_logit_diff" and got.target == target
    assert got.values.dtype == torch.float32
    # ... and TransformerLens run with that scalar metric itself, on a few cells (on one
    # architecture: it is the same number as the mean of TransformerLens's per-pair values)
    cells = _some_cells(want.shape, 3, seed=len(target))
    if (target, by_pos) in ref.TL_FUNCTIONS and tiny.group_size > 1:
        df = pd.DataFrame(cells.numpy(), columns=list(ref.TL_FUNCTIONS[(target, by_pos)]
                                                      .keywords["index_axis_names"]))
        tl = ref.tl_patch(tiny, CORRUPTED, CLEAN, mean_logit_diff, target, by_pos, index_df=df)
        assert_close(got.values[tuple(cells.T)], tl, atol=ATOL, rtol=0)

    # (b) a callable returning [batch]
    got = patch(tiny, CLEAN, CORRUPTED, per_pair_logit_diff, target=target, by_pos=by_pos)
    assert_close(got.per_pair, want_pairs, atol=ATOL, rtol=0)
    assert_close(got.values, want, atol=ATOL, rtol=0)

    # (c) the built-in logit difference with answer / wrong ids
    got = patch(tiny, CLEAN, CORRUPTED, "logit_diff", target=target, by_pos=by_pos,
                answer=ANSWER, wrong=WRONG)
    assert got.metric == "logit_diff" and got.axes == expected_axes(tiny, target, by_pos)
    assert_close(got.per_pair, want_pairs, atol=ATOL, rtol=0)
    assert_close(got.values, want, atol=ATOL, rtol=0)
    if by_pos:
        assert got.labels["pos"] == tiny.to_str_tokens(CLEAN[0])


@pytest.mark.parametrize("target", ["head_out", "resid_pre", "resid_mid", "pattern", "v", "k"])
def test_by_pos_patching_reuses_the_unpatched_prefix(tiny, target, monkeypatch):
    """By position, passes run after a cached unpatched prefix (issue 20); the numbers equal
    whole-prompt passes (and TransformerLens, test_matches_transformerlens above)."""
    from mechicl.analyses import _engine

    assert _engine.prefix_reuse_exact(tiny)  # probed (and cached) before the spy
    starts: list[int] = []
    real = _engine.run_copies

    def spy(*args, **kwargs):
        starts.append(kwargs.get("start_pos", 0))
        return real(*args, **kwargs)

    monkeypatch.setattr(_engine, "run_copies", spy)
    kw = dict(target=target, by_pos=True, answer=ANSWER, wrong=WRONG, batch_tokens=40)
    got = patch(tiny, CLEAN, CORRUPTED, "logit_diff", **kw)
    assert max(starts) > 0  # some passes skipped a prefix
    monkeypatch.setattr(_engine, "prefix_reuse_exact", lambda model: False)
    starts.clear()
    whole = patch(tiny, CLEAN, CORRUPTED, "logit_diff", **kw)
    assert set(starts) == {0}
    assert_close(got.per_pair, whole.per_pair, atol=ATOL, rtol=0)
    assert (whole.per_pair.amax() - whole.per_pair.amin()) > 1e-3


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_resid_mid_is_the_residual_stream(tiny, direction):
    """Replacing the whole residual stream between attention and MLP of any layer by the other
    run's makes the rest of the forward pass the other run's, as for resid_pre / resid_post (in
    the bridge, hook_resid_mid alone is only the MLP's input)."""
    got = patch(tiny, CLEAN, CORRUPTED, "logit_diff", target="resid_mid", direction=direction,
                answer=ANSWER, wrong=WRONG)
    other = got.clean if direction == "denoising" else got.corrupted
    assert (got.clean - got.corrupted).abs().min() > 1e-3
    assert_close(got.per_pair, other.expand(2, -1), atol=1e-4, rtol=0)
    # TransformerLens on the bridge with autograd on patches the MLP input only: different
    run, source = (CORRUPTED, CLEAN) if direction == "denoising" else (CLEAN, CORRUPTED)
    mlp_input_only = ref.tl_patch(tiny, run, source, per_pair_logit_diff, "resid_mid", True,
                                  reduce="none", grad=True)
    in_place = ref.tl_patch(tiny, run, source, per_pair_logit_diff, "resid_mid", True,
                            reduce="none")
    by_pos = patch(tiny, CLEAN, CORRUPTED, "logit_diff", target="resid_mid", by_pos=True,
                   direction=direction, answer=ANSWER, wrong=WRONG)
    assert_close(by_pos.per_pair, in_place, atol=ATOL, rtol=0)
    assert not torch.allclose(by_pos.per_pair, mlp_input_only, atol=1e-3)


@pytest.mark.parametrize("case", [c for c in CASES if c in ref.TL_FUNCTIONS], ids=_id)
def test_axes_are_transformerlens_layout(tiny_llama, tiny_gpt2, case):
    """Axis order and names as TransformerLens's ``index_axis_names``; GQA k/v in KV heads
    (``kv_head``) in the default group view and in query heads in the query view."""
    target, by_pos = case
    tl = ref.tl_axes(target, by_pos)
    for model in (tiny_gpt2, tiny_llama):
        axes, sizes = target_axes(model, target, by_pos=by_pos, n_pos=N_POS)
        assert axes == expected_axes(model, target, by_pos)
        assert axes == tuple("head" if a == "kv_head" else a for a in tl) or \
            axes == tuple("kv_head" if a == "head" else a for a in tl)
        size = {"head": model.n_heads, "kv_head": model.n_kv_heads, "layer": model.n_layers,
                "pos": N_POS}
        assert sizes == tuple(size[a] for a in axes)
        q_axes, q_sizes = target_axes(model, target, by_pos=by_pos, kv_heads="query",
                                      n_pos=N_POS)
        assert q_axes == AXES[(target, by_pos)]
        assert q_sizes == tuple(size[a] for a in q_axes)


def test_axes_examples(tiny_llama, tiny_gpt2):
    m = tiny_llama
    assert target_axes(m, "head_out", by_pos=True, n_pos=7) == (("layer", "pos", "head"),
                                                                 (2, 7, 4))
    assert target_axes(m, "pattern", by_pos=True, n_pos=7) == (("layer", "head", "pos"),
                                                               (2, 4, 7))
    assert target_axes(m, "k") == (("layer", "kv_head"), (2, 2))
    assert target_axes(m, "v", by_pos=True, n_pos=5) == (("layer", "pos", "kv_head"), (2, 5, 2))
    assert target_axes(m, "k", kv_heads="query") == (("layer", "head"), (2, 4))
    assert target_axes(tiny_gpt2, "k") == (("layer", "head"), (2, 4))
    assert target_axes(m, "resid_post") == (("layer",), (2,))
    assert target_axes(m, "mlp_out", by_pos=True, n_pos=3) == (("layer", "pos"), (2, 3))
    with pytest.raises((ValueError, TypeError), match="target"):
        target_axes(m, "z")
    with pytest.raises((ValueError, TypeError), match="kv_heads"):
        target_axes(m, "k", kv_heads="both")


# --------------------------------------------------------------------------------------------
# 3. Noising = TransformerLens with the roles swapped
# --------------------------------------------------------------------------------------------

NOISING_CASES = [("resid_pre", True), ("resid_post", False), ("head_out", True), ("k", True),
                 ("pattern", True)]


@pytest.mark.parametrize("case", NOISING_CASES, ids=_id)
def test_noising_is_transformerlens_with_roles_swapped(tiny, case):
    target, by_pos = case
    want_pairs = expected(tiny, CLEAN, CORRUPTED, per_pair_logit_diff, target, by_pos,
                          reduce="none")
    got = patch(tiny, CLEAN, CORRUPTED, "logit_diff", target=target, by_pos=by_pos,
                direction="noising", answer=ANSWER, wrong=WRONG)
    assert got.direction == "noising" and got.axes == expected_axes(tiny, target, by_pos)
    assert_close(got.per_pair, want_pairs, atol=ATOL, rtol=0)
    assert_close(got.values, want_pairs.mean(-1), atol=ATOL, rtol=0)
    assert got.baseline == pytest.approx(float(got.clean.mean()))
    if target == "resid_post" and not by_pos:
        assert_close(got.per_pair, got.corrupted.expand(2, -1), atol=ATOL, rtol=0)
    else:
        assert want_pairs.max() - want_pairs.min() > 1e-3


# --------------------------------------------------------------------------------------------
# 4. Patching the whole input restores the other run
# --------------------------------------------------------------------------------------------


def test_resid_pre_layer0_all_positions_restores(tiny):
    kw = {"target": "resid_pre", "answer": ANSWER, "wrong": WRONG}
    raw = patch(tiny, CLEAN, CORRUPTED, "logit_diff", **kw)
    assert (raw.clean - raw.corrupted).abs().min() > 1e-3
    assert_close(raw.per_pair[0], raw.clean, atol=ATOL, rtol=0)
    assert_close(raw.values[0], raw.clean.mean(), atol=ATOL, rtol=0)
    norm = patch(tiny, CLEAN, CORRUPTED, "logit_diff_normalized", **kw)
    # (not bit-exact: the patched pass runs two copies, the baseline one row; normalising
    # divides the ~1e-6 difference by the clean - corrupted gap)
    assert norm.normalized and norm.values[0] == pytest.approx(1.0, abs=ATOL)

    raw = patch(tiny, CLEAN, CORRUPTED, "logit_diff", direction="noising", **kw)
    assert_close(raw.per_pair[0], raw.corrupted, atol=ATOL, rtol=0)
    assert_close(raw.values[0], raw.corrupted.mean(), atol=ATOL, rtol=0)
    norm = patch(tiny, CLEAN, CORRUPTED, "logit_diff_normalized", direction="noising", **kw)
    assert norm.values[0] == pytest.approx(0.0, abs=ATOL)


def test_resid_pre_layer0_at_the_differing_position_restores(tiny):
    clean, corrupted, answer, wrong = _make_pairs(3, diff_at=(3,), extra=None)
    assert ((clean != corrupted).nonzero()[:, 1] == 3).all()
    kw = {"target": "resid_pre", "by_pos": True, "answer": answer, "wrong": wrong}
    norm = patch(tiny, clean, corrupted, "logit_diff_normalized", **kw)
    assert norm.values[0, 3] == pytest.approx(1.0, abs=ATOL)
    # the other positions are the same in both runs: patching them changes nothing
    others = [p for p in range(N_POS) if p != 3]
    assert_close(norm.values[0, others], torch.zeros(len(others)), atol=ATOL, rtol=0)
    raw = patch(tiny, clean, corrupted, "logit_diff", direction="noising", **kw)
    assert_close(raw.per_pair[0, 3], raw.corrupted, atol=ATOL, rtol=0)
    assert_close(raw.per_pair[0, others], raw.clean.expand(len(others), -1), atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------------
# 5. The per-query-head k/v view
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gqa_and_mha():
    """The tiny GQA Llama (same seed as ``tiny_llama``) and a multi-head Llama with each KV
    head repeated for its query heads: the same function."""
    hf, tokenizer = tiny_hf_model("llama")
    hf_mha = ref.mha_equivalent(hf)
    assert hf.config.num_key_value_heads == 2 and hf_mha.config.num_key_value_heads == 4
    gqa = as_hooked_model(TransformerBridge.boot_transformers(
        "mechicl-toy-llama", hf_model=hf, tokenizer=tokenizer, device="cpu"), name="gqa")
    mha = as_hooked_model(TransformerBridge.boot_transformers(
        "mechicl-toy-llama-mha-equivalent", hf_model=hf_mha, tokenizer=tokenizer,
        device="cpu"), name="mha-equivalent")
    assert (gqa.n_heads, gqa.n_kv_heads, mha.n_heads, mha.n_kv_heads) == (4, 2, 4, 4)
    with torch.no_grad():
        lg, lm = gqa(CORRUPTED), mha(CORRUPTED)
        _, cg = gqa.run_with_cache(CLEAN)
        _, cm = mha.run_with_cache(CLEAN)
    assert_close(lg, lm, atol=1e-5, rtol=1e-5)
    for layer in range(2):  # every query head reads its group's keys/values
        for kind in ("k", "v"):
            name = f"blocks.{layer}.attn.hook_{kind}"
            assert_close(cg[name].repeat_interleave(2, dim=2), cm[name], atol=1e-5, rtol=1e-5)
        name = f"blocks.{layer}.attn.hook_z"
        assert_close(cg[name], cm[name], atol=1e-5, rtol=1e-5)
    return gqa, mha


@pytest.mark.parametrize("target", ["k", "v"])
@pytest.mark.parametrize("by_pos", [False, True])
@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_query_view_equals_equivalent_mha(gqa_and_mha, target, by_pos, direction):
    gqa, mha = gqa_and_mha
    kw = {"target": target, "by_pos": by_pos, "direction": direction, "answer": ANSWER,
          "wrong": WRONG}
    got = patch(gqa, CLEAN, CORRUPTED, "logit_diff", kv_heads="query", **kw)
    want = patch(mha, CLEAN, CORRUPTED, "logit_diff", **kw)
    assert got.axes == want.axes == AXES[(target, by_pos)]
    assert_close(got.per_pair, want.per_pair, atol=ATOL, rtol=0)
    assert_close(got.values, want.values, atol=ATOL, rtol=0)
    assert got.params["kv_heads"] == "query"
    if direction == "noising":
        return
    # ... and equal to TransformerLens on the multi-head model
    tl = ref.tl_patch(mha, CORRUPTED, CLEAN, per_pair_logit_diff, target, by_pos, reduce="none")
    assert_close(got.per_pair, tl, atol=ATOL, rtol=0)
    # the group view is another thing: patching a KV head changes both its query heads
    group = patch(gqa, CLEAN, CORRUPTED, "logit_diff", **kw)
    assert group.axes[-1] == "kv_head" and group.values.shape[-1] == 2
    assert not torch.allclose(group.values.repeat_interleave(2, dim=-1), got.values, atol=1e-3)


@pytest.mark.parametrize("target", ["k", "v"])
def test_query_view_equals_hand_written_reference(gqa_and_mha, target):
    """The slow reference (used on SmolLM2) agrees with mechicl on the tiny GQA model."""
    gqa, _ = gqa_and_mha
    cells = [(1, None, 3), (0, None, 0), (1, 2, 1), (0, 5, 2)]  # (layer, key pos | all, head)
    metric = per_pair_logit_diff
    for layer, pos, head in cells:
        want = ref.query_view_reference(gqa, CORRUPTED, CLEAN, metric, target, layer, head, pos)
        if pos is None:
            got = patch(gqa, CLEAN, CORRUPTED, metric, target=target, kv_heads="query",
                        cells=[[layer, head]])
            assert_close(got.per_pair[layer, head], want, atol=ATOL, rtol=0)
        else:
            got = patch(gqa, CLEAN, CORRUPTED, metric, target=target, kv_heads="query",
                        by_pos=True, cells=[[layer, pos, head]])
            assert_close(got.per_pair[layer, pos, head], want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("target", ["k", "v"])
def test_query_view_is_group_view_without_gqa(tiny, target):
    kw = {"target": target, "by_pos": True, "answer": ANSWER, "wrong": WRONG}
    query = patch(tiny, CLEAN, CORRUPTED, "logit_diff", kv_heads="query", **kw)
    group = patch(tiny, CLEAN, CORRUPTED, "logit_diff", **kw)
    assert query.axes == ("layer", "pos", "head")
    assert query.values.shape == (2, N_POS, tiny.n_heads)
    if tiny.group_size == 1:
        assert group.axes == query.axes
        assert_close(query.per_pair, group.per_pair, atol=ATOL, rtol=0)
    else:
        assert group.axes == ("layer", "pos", "kv_head")
        assert group.values.shape == (2, N_POS, tiny.n_kv_heads)


# --------------------------------------------------------------------------------------------
# 6. Cell subsets
# --------------------------------------------------------------------------------------------


def _check_subset(sub: PatchResult, full: PatchResult, cells: torch.Tensor):
    mask = torch.zeros(full.values.shape, dtype=torch.bool)
    mask[tuple(cells.T)] = True
    assert sub.values.shape == full.values.shape and sub.axes == full.axes
    assert_close(sub.values[mask], full.values[mask], atol=ATOL, rtol=0)
    assert torch.isnan(sub.values[~mask]).all()
    if sub.per_pair is not None:
        assert_close(sub.per_pair[mask], full.per_pair[mask], atol=ATOL, rtol=0)
        assert torch.isnan(sub.per_pair[~mask]).all()
    assert sub.params["n_cells"] == len(torch.unique(cells, dim=0))
    if sub.metric == full.metric:
        assert_close(sub.clean, full.clean)
        assert_close(sub.corrupted, full.corrupted)


@pytest.mark.parametrize("target,by_pos,kv_heads,cells", [
    ("head_out", True, "group", [[0, 1, 2], [1, 5, 3], [1, 0, 0]]),
    ("resid_mid", False, "group", [[1]]),
    ("mlp_out", True, "group", [[1, 5], [0, 2]]),
    ("pattern", True, "group", [[1, 3, 5], [0, 0, 4]]),
    ("k", False, "group", [[1, 1]]),
    ("v", True, "query", [[0, 2, 3], [1, 4, 0], [1, 4, 1]]),
])
def test_cells_tensor_subset(tiny_llama, target, by_pos, kv_heads, cells):
    kw = {"target": target, "by_pos": by_pos, "kv_heads": kv_heads, "answer": ANSWER,
          "wrong": WRONG}
    full = patch(tiny_llama, CLEAN, CORRUPTED, "logit_diff", **kw)
    cells = torch.tensor(cells)
    sub = patch(tiny_llama, CLEAN, CORRUPTED, "logit_diff", cells=cells, **kw)
    _check_subset(sub, full, cells)
    # nested lists work too, and a scalar callable metric
    sub = patch(tiny_llama, CLEAN, CORRUPTED, mean_logit_diff, cells=cells.tolist(),
                **{k: v for k, v in kw.items() if k not in ("answer", "wrong")})
    _check_subset(sub, full, cells)


@pytest.mark.parametrize("target,by_pos,columns", [
    ("head_out", True, ["layer", "pos", "head_index"]),
    ("pattern", True, ["layer", "head_index", "dest_pos"]),
    ("q", False, ["layer", "head_index"]),
    ("k", True, ["layer", "pos", "head_index"]),  # GQA: TL's head_index is the KV head
    ("v", False, ["layer", "head"]),
])
def test_cells_transformerlens_dataframe(tiny_llama, target, by_pos, columns):
    sizes = dict(zip(expected_axes(tiny_llama, target, by_pos),
                     target_axes(tiny_llama, target, by_pos=by_pos, n_pos=N_POS)[1],
                     strict=True))
    g = torch.Generator().manual_seed(5)
    rows = torch.stack([torch.randint(s, (4,), generator=g) for s in sizes.values()], dim=1)
    rows = torch.unique(rows, dim=0)
    df = pd.DataFrame(rows.numpy(), columns=columns)
    sub = patch(tiny_llama, CLEAN, CORRUPTED, mean_logit_diff, target=target, by_pos=by_pos,
                cells=df)
    tl = ref.tl_patch(tiny_llama, CORRUPTED, CLEAN, mean_logit_diff, target, by_pos,
                      index_df=df)
    assert_close(sub.values[tuple(rows.T)], tl, atol=ATOL, rtol=0)
    assert sub.values.shape == tuple(sizes.values())
    assert int((~torch.isnan(sub.values)).sum()) == len(rows)
    # column order does not matter, mechicl's own names work
    own = df[columns[::-1]].rename(columns={"head_index": "head", "dest_pos": "pos"})
    again = patch(tiny_llama, CLEAN, CORRUPTED, mean_logit_diff, target=target, by_pos=by_pos,
                  cells=own)
    assert_close(again.values, sub.values, equal_nan=True)


def test_bad_cells(tiny_llama):
    kw = {"answer": ANSWER, "wrong": WRONG}
    with pytest.raises(ValueError, match="layer=2"):
        patch(tiny_llama, CLEAN, CORRUPTED, target="head_out", cells=[[0, 1], [2, 0]], **kw)
    with pytest.raises(ValueError, match="head=4"):
        patch(tiny_llama, CLEAN, CORRUPTED, target="head_out", cells=[[0, 4]], **kw)
    with pytest.raises(ValueError, match="kv_head=2"):
        patch(tiny_llama, CLEAN, CORRUPTED, target="k", cells=[[0, 2]], **kw)
    with pytest.raises(ValueError, match="pos=6"):
        patch(tiny_llama, CLEAN, CORRUPTED, target="resid_pre", by_pos=True, cells=[[0, 6]],
              **kw)
    with pytest.raises(ValueError, match="pos=-1"):
        patch(tiny_llama, CLEAN, CORRUPTED, target="resid_pre", by_pos=True, cells=[[0, -1]],
              **kw)
    with pytest.raises(ValueError, match="cells must be"):  # 2 indices for 3 axes
        patch(tiny_llama, CLEAN, CORRUPTED, target="head_out", by_pos=True, cells=[[0, 1]],
              **kw)
    with pytest.raises(ValueError, match="cells must be"):
        patch(tiny_llama, CLEAN, CORRUPTED, target="head_out", cells=[0, 1], **kw)
    with pytest.raises(ValueError, match="pos"):  # a DataFrame without the pos column
        patch(tiny_llama, CLEAN, CORRUPTED, target="head_out", by_pos=True,
              cells=pd.DataFrame({"layer": [0], "head_index": [1]}), **kw)


# --------------------------------------------------------------------------------------------
# 7. Batching and input forms
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target,by_pos,kv_heads", [
    ("head_out", True, "group"), ("v", True, "query"), ("k", False, "query"),
])
def test_batch_size_does_not_matter(tiny_llama, target, by_pos, kv_heads):
    """One patched copy per forward pass, three per pass (passes that mix layers) and everything
    in one pass give the same values."""
    kw = {"target": target, "by_pos": by_pos, "kv_heads": kv_heads}
    shape = target_axes(tiny_llama, target, by_pos=by_pos, kv_heads=kv_heads, n_pos=N_POS)[1]
    cells = torch.cat([_some_cells(shape, 4, seed=1), _some_cells(shape, 4, seed=2)])
    cells = torch.unique(cells, dim=0)
    n_layer0 = int((cells[:, 0] == 0).sum())
    assert 0 < n_layer0 < len(cells) and n_layer0 % 3  # a pass of three mixes the layers
    answers = {"answer": ANSWER, "wrong": WRONG}
    many = patch(tiny_llama, CLEAN, CORRUPTED, "logit_diff", batch_tokens=1 << 20, **kw,
                 **answers)
    for metric, batch_tokens in (("logit_diff", 1), ("logit_diff", 3 * N_POS),
                                 (per_pair_logit_diff, 1), (mean_logit_diff, 3 * N_POS)):
        few = patch(tiny_llama, CLEAN, CORRUPTED, metric, batch_tokens=batch_tokens,
                    cells=cells, **kw, **(answers if metric == "logit_diff" else {}))
        _check_subset(few, many, cells)


def _pairs_object(clean, corrupted, answer, wrong, lengths=None, pad=2):
    n = len(clean)
    lengths = torch.full((n,), clean.shape[1]) if lengths is None else torch.tensor(lengths)
    return PromptPairs(
        name="toy", clean=clean, corrupted=corrupted, lengths=lengths.long(), answer=answer,
        wrong=wrong, clean_text=("",) * n, corrupted_text=("",) * n, answer_text=("",) * n,
        wrong_text=("",) * n, params={"pad_id": pad})


def test_prompt_pairs_input_equals_tensors(tiny_llama):
    tiny = tiny_llama
    pairs = _pairs_object(CLEAN, CORRUPTED, ANSWER, WRONG)
    for target, by_pos in (("head_out", False), ("resid_post", True), ("v", True)):
        kw = {"target": target, "by_pos": by_pos}
        a = patch(tiny, pairs, metric="logit_diff", **kw)
        b = patch(tiny, CLEAN, CORRUPTED, "logit_diff", answer=ANSWER, wrong=WRONG, **kw)
        assert_close(a.values, b.values, atol=1e-6, rtol=0)
        assert_close(a.per_pair, b.per_pair, atol=1e-6, rtol=0)
        assert a.params["pairs"] == "toy" and a.params["n_pairs"] == N_PAIRS
        assert b.params["pairs"] == "tokens"
    # a callable metric sees the same logits
    a = patch(tiny, pairs, metric=per_pair_logit_diff, target="q")
    b = patch(tiny, CLEAN, CORRUPTED, per_pair_logit_diff, target="q")
    assert_close(a.per_pair, b.per_pair, atol=1e-6, rtol=0)


def test_text_input_equals_tokens(tiny_gpt2):
    words = lambda row: " ".join(f"w{int(t) - FIRST_WORD_ID}" for t in row[1:])  # noqa: E731
    clean_text = [words(r) for r in CLEAN]
    corrupted_text = [words(r) for r in CORRUPTED]
    answer_text = [f"w{int(t) - FIRST_WORD_ID}" for t in ANSWER]
    wrong_text = [f"w{int(t) - FIRST_WORD_ID}" for t in WRONG]
    inputs = as_inputs(tiny_gpt2, clean_text, corrupted_text, answer_text, wrong_text)
    assert [t.tolist() for t in inputs.clean] == CLEAN.tolist()
    assert inputs.answer.tolist() == ANSWER.tolist()
    a = patch(tiny_gpt2, clean_text, corrupted_text, "logit_diff", target="attn_out",
              by_pos=True, answer=answer_text, wrong=wrong_text)
    b = patch(tiny_gpt2, CLEAN, CORRUPTED, "logit_diff", target="attn_out", by_pos=True,
              answer=ANSWER, wrong=WRONG)
    assert_close(a.per_pair, b.per_pair, atol=1e-6, rtol=0)
    # one prompt as a string, one answer for all
    one = patch(tiny_gpt2, clean_text[0], corrupted_text[0], "logit_diff", target="head_out",
                answer=answer_text[0], wrong=int(WRONG[0]))
    b = patch(tiny_gpt2, CLEAN[:1], CORRUPTED[:1], "logit_diff", target="head_out",
              answer=ANSWER[:1], wrong=WRONG[:1])
    assert one.per_pair.shape == (2, 4, 1)
    assert_close(one.per_pair, b.per_pair, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def mixed_pairs():
    """Three pairs of lengths 6, 4 and 5 (padded PromptPairs), corrupted at position 2."""
    lengths = [6, 4, 5]
    clean = CLEAN.clone()
    corrupted = CORRUPTED.clone()
    corrupted[1, 4] = clean[1, 4]
    for i, n in enumerate(lengths):
        clean[i, n:] = 2
        corrupted[i, n:] = 2
    return _pairs_object(clean, corrupted, ANSWER, WRONG, lengths), lengths


@pytest.mark.parametrize("target", ["head_out", "resid_pre"])
def test_pairs_of_different_lengths(tiny, mixed_pairs, target):
    """All-position patching of pairs of different lengths: each pair's values are those of
    that pair patched alone (TransformerLens, batch of one)."""
    pairs, lengths = mixed_pairs
    got = patch(tiny, pairs, metric="logit_diff", target=target)
    for i, n in enumerate(lengths):
        one = (pairs.clean[i:i + 1, :n], pairs.corrupted[i:i + 1, :n])
        answer, wrong = ANSWER[i:i + 1], WRONG[i:i + 1]

        def metric(logits, answer=answer, wrong=wrong):
            return ref.logit_diff(logits, answer, wrong)

        want = expected(tiny, one[1], one[0], metric, target, False, reduce="none")[..., 0]
        assert_close(got.per_pair[..., i], want, atol=ATOL, rtol=0)
    assert_close(got.values, got.per_pair.mean(-1))
    # a callable metric sees each pair's logits right-padded: it reads its own answer position
    last = torch.tensor(lengths) - 1

    def at_answer(logits):
        rows = logits[torch.arange(len(lengths)), last]
        return (rows.gather(-1, ANSWER[:, None]) - rows.gather(-1, WRONG[:, None]))[:, 0]

    call = patch(tiny, pairs, metric=at_answer, target=target)
    assert_close(call.per_pair, got.per_pair, atol=ATOL, rtol=0)
    assert_close(call.clean, got.clean, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="by_pos=True needs prompts of one length"):
        patch(tiny, pairs, metric="logit_diff", target=target, by_pos=True)


# --------------------------------------------------------------------------------------------
# 8. Baselines and normalisation
# --------------------------------------------------------------------------------------------


def test_baselines_are_plain_forward_passes(tiny):
    want_clean = ref.run_metric(tiny, CLEAN, per_pair_logit_diff)
    want_corrupted = ref.run_metric(tiny, CORRUPTED, per_pair_logit_diff)
    got = patch(tiny, CLEAN, CORRUPTED, "logit_diff", answer=ANSWER, wrong=WRONG,
                target="resid_post")
    assert got.clean.shape == got.corrupted.shape == (N_PAIRS,)
    assert_close(got.clean, want_clean, atol=ATOL, rtol=0)
    assert_close(got.corrupted, want_corrupted, atol=ATOL, rtol=0)
    got = patch(tiny, CLEAN, CORRUPTED, mean_logit_diff, target="resid_post")
    assert got.clean.shape == ()
    assert_close(got.clean, want_clean.mean(), atol=ATOL, rtol=0)
    assert_close(got.corrupted, want_corrupted.mean(), atol=ATOL, rtol=0)
    got = patch(tiny, CLEAN, CORRUPTED, per_pair_logit_diff, target="resid_post",
                direction="noising")
    assert_close(got.clean, want_clean, atol=ATOL, rtol=0)
    assert_close(got.corrupted, want_corrupted, atol=ATOL, rtol=0)
    # the last layer's resid_post over all positions is the other run itself
    assert_close(got.per_pair[-1], want_corrupted, atol=ATOL, rtol=0)


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_normalisation(tiny_llama, direction):
    tiny = tiny_llama
    kw = {"target": "head_out", "by_pos": True, "direction": direction, "answer": ANSWER,
          "wrong": WRONG}
    raw = patch(tiny, CLEAN, CORRUPTED, "logit_diff", **kw)
    norm = patch(tiny, CLEAN, CORRUPTED, "logit_diff_normalized", **kw)
    c, k = raw.clean.mean(), raw.corrupted.mean()
    assert_close(norm.values, (raw.values - k) / (c - k), atol=ATOL, rtol=1e-5)
    assert_close(norm.per_pair, raw.per_pair, atol=1e-6, rtol=0)  # raw per pair
    assert_close(norm.clean, raw.clean)
    assert_close(norm.corrupted, raw.corrupted)
    assert norm.normalized and not raw.normalized
    assert norm.metric == "logit_diff_normalized"
    # normalize=True does the same for any metric
    again = patch(tiny, CLEAN, CORRUPTED, "logit_diff", normalize=True, **kw)
    assert_close(again.values, norm.values, atol=1e-6, rtol=0)
    call = patch(tiny, CLEAN, CORRUPTED, mean_logit_diff, normalize=True,
                 **{k: v for k, v in kw.items() if k not in ("answer", "wrong")})
    assert call.normalized
    assert_close(call.values, norm.values, atol=1e-4, rtol=0)
    prob = patch(tiny, CLEAN, CORRUPTED, "prob", normalize=True, **kw)
    praw = patch(tiny, CLEAN, CORRUPTED, "prob", **kw)
    pc, pk = praw.clean.mean(), praw.corrupted.mean()
    assert_close(prob.values, (praw.values - pk) / (pc - pk), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="cannot normalise"):
        patch(tiny, CLEAN, CLEAN, "logit_diff_normalized", target="head_out", answer=ANSWER,
              wrong=WRONG)


def test_other_builtin_metrics(tiny_llama):
    """logprob / prob / loss at the answer position, vs a plain forward pass."""
    def logprob(logits):
        lp = torch.log_softmax(logits[:, -1], dim=-1)
        return torch.stack([lp[i, int(ANSWER[i])] for i in range(len(lp))])

    want = ref.tl_patch(tiny_llama, CORRUPTED, CLEAN, logprob, "head_out", False, reduce="none")
    for name, fn in (("logprob", lambda x: x), ("prob", torch.exp), ("loss", lambda x: -x)):
        got = patch(tiny_llama, CLEAN, CORRUPTED, name, target="head_out", answer=ANSWER,
                    wrong=WRONG)
        assert_close(got.per_pair, fn(want), atol=ATOL, rtol=1e-4)
        # only the logit difference reads the competing token
        alone = patch(tiny_llama, CLEAN, CORRUPTED, name, target="head_out", answer=ANSWER)
        assert_close(alone.values, got.values)
    with pytest.raises(ValueError, match="needs answer and wrong"):
        patch(tiny_llama, CLEAN, CORRUPTED, "logit_diff", target="head_out", answer=ANSWER)


# --------------------------------------------------------------------------------------------
# 9. PatchResult
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def head_result(tiny_llama):
    return patch(tiny_llama, CLEAN, CORRUPTED, "logit_diff", target="head_out", answer=ANSWER,
                 wrong=WRONG)


def test_to_dataframe(head_result, tiny_llama):
    r = head_result
    df = r.to_dataframe()
    assert list(df.columns) == ["target", "layer", "head", "value", "effect", "std"]
    assert len(df) == 2 * 4 and (df["target"] == "head_out").all()
    for row in df.itertuples():
        assert row.value == pytest.approx(float(r.values[row.layer, row.head]))
        assert row.effect == pytest.approx(row.value - float(r.corrupted.mean()), abs=1e-6)
        assert row.std == pytest.approx(float(r.per_pair[row.layer, row.head].std()), abs=1e-6)
    # by position, a subset of cells, a scalar metric (no std)
    cells = torch.tensor([[0, 3, 1], [1, 5, 0]])
    sub = patch(tiny_llama, CLEAN, CORRUPTED, mean_logit_diff, target="q", by_pos=True,
                cells=cells, direction="noising")
    df = sub.to_dataframe()
    assert list(df.columns) == ["target", "layer", "pos", "head", "value", "effect"]
    assert df[["layer", "pos", "head"]].to_numpy().tolist() == cells.tolist()
    assert_close(torch.tensor(df["effect"].to_numpy()), sub.values[tuple(cells.T)] -
                 sub.clean, atol=1e-6, rtol=0)


def test_effect_and_baseline(head_result, tiny_llama):
    r = head_result
    assert r.baseline == pytest.approx(float(r.corrupted.mean()))
    assert_close(r.effect(), r.values - r.corrupted.mean())
    kw = {"target": "resid_pre", "answer": ANSWER, "wrong": WRONG}
    for direction, base in (("denoising", 0.0), ("noising", 1.0)):
        n = patch(tiny_llama, CLEAN, CORRUPTED, "logit_diff_normalized", direction=direction,
                  **kw)
        assert n.baseline == base
        assert_close(n.effect(), n.values - base)
    n = patch(tiny_llama, CLEAN, CORRUPTED, "logit_diff", direction="noising", **kw)
    assert n.baseline == pytest.approx(float(n.clean.mean()))


def test_top(head_result):
    r = head_result
    top = r.top(3)
    eff = r.effect()
    assert len(top) == 3
    order = torch.argsort(eff.abs().flatten(), descending=True)[:3]
    assert [idx for idx, _ in top] == [tuple(divmod(int(i), 4)) for i in order]
    for idx, value in top:
        assert value == pytest.approx(float(r.values[idx]))
    by_effect = r.top(8, by="effect")
    effects = [float(eff[idx]) for idx, _ in by_effect]
    assert effects == sorted(effects, reverse=True) and len(by_effect) == 8
    with pytest.raises((ValueError, TypeError), match="by"):
        r.top(2, by="value")


def test_top_on_known_values():
    values = torch.tensor([[0.5, -3.0, float("nan")], [2.0, 0.1, -0.2]])
    r = PatchResult(target="head_out", axes=("layer", "head"), values=values, per_pair=None,
                    clean=torch.tensor(4.0), corrupted=torch.tensor(0.0), metric="m",
                    normalized=False, direction="denoising")
    assert r.top(3) == [((0, 1), -3.0), ((1, 0), 2.0), ((0, 0), 0.5)]
    assert [i for i, _ in r.top(2, by="effect")] == [(1, 0), (0, 0)]
    assert len(r.top(5)) == 5 and (0, 2) not in [i for i, _ in r.top(5)]
    noising = PatchResult(target="head_out", axes=("layer", "head"), values=values,
                          per_pair=None, clean=torch.tensor(2.0), corrupted=torch.tensor(0.0),
                          metric="m", normalized=False, direction="noising")
    # effects relative to the clean run: -1.5, -5, 0, -1.9, -2.2
    assert [i for i, _ in noising.top(2)] == [(0, 1), (1, 2)]
    assert [i for i, _ in noising.top(1, by="effect")] == [(1, 0)]
    df = noising.to_dataframe()
    assert len(df) == 5 and "std" not in df.columns
    assert df["effect"].tolist() == pytest.approx([-1.5, -5.0, 0.0, -1.9, -2.2])


def test_top_skips_cells_not_computed(tiny_llama):
    r = patch(tiny_llama, CLEAN, CORRUPTED, mean_logit_diff, target="head_out",
              cells=[[1, 2], [0, 3]])
    assert sorted(idx for idx, _ in r.top(2)) == [(0, 3), (1, 2)]


def test_head_scores(head_result, tiny_llama):
    r = head_result
    hs = r.head_scores()
    assert isinstance(hs, HeadScores) and hs.name == "patch_head_out"
    assert_close(hs.mean, r.values.double())
    assert_close(hs.per_seed, r.per_pair.permute(2, 0, 1).double())
    assert_close(hs.var, r.per_pair.double().var(-1))
    assert r.head_scores("mine").name == "mine"
    # normalised: the reported values, no spread
    n = patch(tiny_llama, CLEAN, CORRUPTED, "logit_diff_normalized", target="pattern",
              answer=ANSWER, wrong=WRONG)
    hs = n.head_scores()
    assert_close(hs.mean, n.values.double())
    assert (hs.var == 0).all()
    # k in the group view: [layer, kv_head]
    k = patch(tiny_llama, CLEAN, CORRUPTED, mean_logit_diff, target="k")
    assert k.head_scores().mean.shape == (2, 2)
    for target, by_pos in (("head_out", True), ("resid_pre", False), ("pattern", True)):
        other = patch(tiny_llama, CLEAN, CORRUPTED, mean_logit_diff, target=target,
                      by_pos=by_pos, cells=[[0] * len(AXES[(target, by_pos)])])
        with pytest.raises(ValueError, match="head_scores needs a"):
            other.head_scores()


def test_save_load_round_trip(head_result, tiny_llama, tmp_path):
    sub = patch(tiny_llama, CLEAN, CORRUPTED, mean_logit_diff, target="pattern", by_pos=True,
                cells=[[0, 1, 2]], direction="noising", normalize=True)
    for r in (head_result, sub):
        path = r.save(tmp_path / r.target)
        back = PatchResult.load(path)
        for f in ("target", "axes", "metric", "normalized", "direction", "method", "labels",
                  "params", "model"):
            assert getattr(back, f) == getattr(r, f), f
        assert_close(back.values, r.values, equal_nan=True, atol=0, rtol=0)
        assert_close(back.clean, r.clean, atol=0, rtol=0)
        assert_close(back.corrupted, r.corrupted, atol=0, rtol=0)
        if r.per_pair is None:
            assert back.per_pair is None
        else:
            assert_close(back.per_pair, r.per_pair, equal_nan=True, atol=0, rtol=0)
        assert [i for i, _ in back.top(3)] == [i for i, _ in r.top(3)]
    assert head_result.model["name"] == "tiny-llama" and head_result.params["n_pairs"] == 3
    assert sub.labels["pos"] == tiny_llama.to_str_tokens(CLEAN[0])


# --------------------------------------------------------------------------------------------
# 10. Errors
# --------------------------------------------------------------------------------------------


def test_bad_choices(tiny_gpt2):
    kw = {"answer": ANSWER, "wrong": WRONG}
    with pytest.raises((ValueError, TypeError), match="target"):
        patch(tiny_gpt2, CLEAN, CORRUPTED, target="resid", **kw)
    with pytest.raises((ValueError, TypeError), match="direction"):
        patch(tiny_gpt2, CLEAN, CORRUPTED, direction="sideways", **kw)
    with pytest.raises((ValueError, TypeError), match="kv_heads"):
        patch(tiny_gpt2, CLEAN, CORRUPTED, target="k", kv_heads="all", **kw)
    with pytest.raises((ValueError, TypeError), match="metric"):
        patch(tiny_gpt2, CLEAN, CORRUPTED, "accuracy", **kw)
    with pytest.raises(ValueError, match="batch_tokens"):
        patch(tiny_gpt2, CLEAN, CORRUPTED, batch_tokens=0, **kw)


def test_bad_inputs(tiny_gpt2, induction_toy):
    kw = {"answer": ANSWER, "wrong": WRONG}
    with pytest.raises(ValueError, match="pair 1: clean has 3 tokens, corrupted 4"):
        patch(tiny_gpt2, ["w1 w2", "w3 w4"], ["w5 w6", "w7 w8 w9"], "logit_diff",
              answer=[5, 6], wrong=[7, 8])
    # tensors of different shapes (the test session's jaxtyping hook may see them first)
    with pytest.raises((ValueError, TypeError), match="pair 0|pair pos"):
        patch(tiny_gpt2, CLEAN, CORRUPTED[:, :-1], **kw)
    with pytest.raises((ValueError, TypeError), match="3 clean prompts but 2 corrupted|pair pos"):
        patch(tiny_gpt2, CLEAN, CORRUPTED[:2], **kw)
    with pytest.raises(ValueError, match="2 clean prompts but 1 corrupted"):
        patch(tiny_gpt2, ["w1 w2", "w3 w4"], ["w5 w6"], "logit_diff", answer=[5, 6], wrong=[7, 8])
    with pytest.raises(ValueError, match="corrupted prompts are missing"):
        patch(tiny_gpt2, CLEAN, **kw)
    with pytest.raises(ValueError, match="single token"):
        patch(tiny_gpt2, CLEAN, CORRUPTED, answer="w3 w4", wrong=WRONG)
    with pytest.raises(ValueError, match="'w1 w2'"):
        patch(tiny_gpt2, CLEAN, CORRUPTED, answer=ANSWER, wrong=["w3", "w1 w2", "w4"])
    with pytest.raises(ValueError, match="2 entries for 3 prompt pairs"):
        patch(tiny_gpt2, CLEAN, CORRUPTED, answer=ANSWER[:2], wrong=WRONG)
    pairs = _pairs_object(CLEAN, CORRUPTED, ANSWER, WRONG)
    with pytest.raises(ValueError, match="corrupted=None"):
        patch(tiny_gpt2, pairs, CORRUPTED)
    with pytest.raises(ValueError, match="answer/wrong come from the PromptPairs"):
        patch(tiny_gpt2, pairs, answer=ANSWER)
    with pytest.raises(ValueError, match="needs answer and wrong"):
        patch(tiny_gpt2, CLEAN, CORRUPTED, "logit_diff")
    with pytest.raises(ValueError, match="needs answer and wrong"):
        patch(tiny_gpt2, CLEAN, CORRUPTED, "logit_diff_normalized", answer=ANSWER)
    with pytest.raises((ValueError, TypeError)):
        patch(tiny_gpt2, CLEAN.float(), CORRUPTED.float(), **kw)
    # attention-only models have no MLP output
    with pytest.raises(ValueError, match="no MLPs"):
        patch(induction_toy, CLEAN, CORRUPTED, target="mlp_out", **kw)
    assert patch(induction_toy, CLEAN, CORRUPTED, target="attn_out", **kw).values.shape == (2,)
