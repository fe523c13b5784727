"""Activation patching on the real default model (SmolLM2-135M: 30 layers, 9 query heads, 3 KV
heads, rotary, RMSNorm) on an IOI prompt pair: mechicl equals TransformerLens's
``get_act_patch_*`` on a few cells spread over the layers (``cells=`` / ``index_df``), and the
per-query-head k/v view equals a hand-written one-head reference (tests/reference_patching.py).

Kept cheap: TransformerLens takes ~0.2 s per cell here, so every comparison uses six cells.
The tiny-model tests are in tests/test_patching.py.
"""

import pandas as pd
import pytest
import reference_patching as ref  # tests/reference_patching.py: slow, plain references
import torch
from torch.testing import assert_close

from mechicl.analyses.patching import patch
from mechicl.inputs.pairs import PromptPairs

pytestmark = pytest.mark.slow

ATOL = 1e-4
CLEAN_TEXT = "When Mary and John went to the store, John gave a drink to"
CORRUPTED_TEXT = "When Alice and Bob went to the store, Carol gave a drink to"
N_POS = 15


@pytest.fixture(scope="module")
def ioi(smollm2):
    """Clean / corrupted tokens ``[1, 15]``, the answer / wrong ids, and the clean cache."""
    clean, corrupted = smollm2.to_tokens(CLEAN_TEXT), smollm2.to_tokens(CORRUPTED_TEXT)
    assert clean.shape == corrupted.shape == (1, N_POS)
    assert (clean != corrupted).nonzero()[:, 1].tolist() == [2, 4, 10]
    answer = smollm2.encode(" Mary", prepend_bos=False)
    wrong = smollm2.encode(" John", prepend_bos=False)
    assert len(answer) == len(wrong) == 1
    with torch.no_grad():
        _, cache = smollm2.run_with_cache(clean)
    return {"clean": clean, "corrupted": corrupted, "answer": torch.tensor(answer),
            "wrong": torch.tensor(wrong), "cache": cache}


def _metric(ioi):
    answer, wrong = int(ioi["answer"]), int(ioi["wrong"])

    def ioi_logit_diff(logits):
        return (logits[:, -1, answer] - logits[:, -1, wrong]).mean()

    return ioi_logit_diff


# (target, by_pos, TransformerLens's index_df columns, six cells across the layers)
CASES = [
    ("head_out", False, ["layer", "head"],
     [[0, 3], [5, 8], [11, 0], [17, 4], [23, 7], [29, 1]]),
    ("head_out", True, ["layer", "pos", "head"],
     [[1, 2, 5], [8, 4, 0], [14, 10, 3], [20, 14, 8], [26, 10, 6], [29, 14, 2]]),
    ("q", False, ["layer", "head"],
     [[2, 1], [9, 6], [14, 4], [19, 2], [24, 8], [28, 0]]),
    ("k", False, ["layer", "head"],  # the group view: head = KV head, 0..2
     [[3, 0], [10, 2], [15, 1], [21, 0], [25, 2], [29, 1]]),
    ("v", True, ["layer", "pos", "head"],
     [[4, 2, 1], [9, 4, 0], [13, 10, 2], [18, 2, 0], [22, 4, 1], [27, 10, 2]]),
    ("pattern", False, ["layer", "head_index"],
     [[0, 0], [7, 5], [12, 3], [18, 8], [23, 1], [28, 6]]),
    ("resid_pre", True, ["layer", "pos"],
     [[0, 2], [6, 4], [12, 10], [18, 10], [24, 14], [29, 2]]),
    ("mlp_out", True, ["layer", "pos"],
     [[0, 2], [5, 10], [11, 4], [17, 14], [23, 10], [29, 14]]),
]


# (target, by_pos) -> result axes and shape (k / v in the group view: 3 KV heads)
EXPECTED = {
    ("head_out", False): (("layer", "head"), (30, 9)),
    ("head_out", True): (("layer", "pos", "head"), (30, N_POS, 9)),
    ("q", False): (("layer", "head"), (30, 9)),
    ("k", False): (("layer", "kv_head"), (30, 3)),
    ("v", True): (("layer", "pos", "kv_head"), (30, N_POS, 3)),
    ("pattern", False): (("layer", "head"), (30, 9)),
    ("resid_pre", True): (("layer", "pos"), (30, N_POS)),
    ("mlp_out", True): (("layer", "pos"), (30, N_POS)),
}


@pytest.mark.parametrize("target,by_pos,columns,cells", CASES,
                         ids=[f"{c[0]}-{'by_pos' if c[1] else 'all_pos'}" for c in CASES])
def test_matches_transformerlens(smollm2, ioi, target, by_pos, columns, cells):
    df = pd.DataFrame(cells, columns=columns)
    metric = _metric(ioi)
    want = ref.tl_patch(smollm2, ioi["corrupted"], ioi["clean"], metric, target, by_pos,
                        index_df=df, cache=ioi["cache"])
    assert want.shape == (len(cells),)
    # the built-in metric (answer logits only), cells as TransformerLens's index_df
    got = patch(smollm2, ioi["clean"], ioi["corrupted"], "logit_diff", target=target,
                by_pos=by_pos, answer=ioi["answer"], wrong=ioi["wrong"], cells=df)
    index = tuple(torch.tensor(cells).T)
    assert_close(got.values[index], want, atol=ATOL, rtol=0)
    assert int((~torch.isnan(got.values)).sum()) == len(cells)
    axes, shape = EXPECTED[(target, by_pos)]
    assert got.axes == axes and got.values.shape == shape
    if target in ("head_out", "v"):  # a TransformerLens-style callable too (full logits)
        call = patch(smollm2, ioi["clean"], ioi["corrupted"], metric, target=target,
                     by_pos=by_pos, cells=torch.tensor(cells))
        assert_close(call.values[index], want, atol=ATOL, rtol=0)
    # the IOI baselines: the model prefers the indirect object on the clean prompt only
    assert float(got.clean) > float(got.corrupted) + 1.0


@pytest.mark.parametrize("target", ["k", "v"])
def test_query_view_equals_hand_written_reference(smollm2, ioi, target):
    """``kv_heads="query"``: only one query head reads the other run's keys / values."""
    metric = _metric(ioi)
    all_pos = [[5, 4], [20, 7]]  # (layer, query head)
    by_pos = [[12, 10, 2], [25, 4, 5]]  # (layer, key position, query head)
    kw = {"target": target, "kv_heads": "query", "answer": ioi["answer"], "wrong": ioi["wrong"]}
    got = patch(smollm2, ioi["clean"], ioi["corrupted"], "logit_diff", cells=all_pos, **kw)
    got_pos = patch(smollm2, ioi["clean"], ioi["corrupted"], "logit_diff", by_pos=True,
                    cells=by_pos, **kw)
    assert got.axes == ("layer", "head") and got.values.shape == (30, 9)
    assert got_pos.axes == ("layer", "pos", "head") and got_pos.values.shape == (30, N_POS, 9)
    for layer, head in all_pos:
        want = ref.query_view_reference(smollm2, ioi["corrupted"], ioi["clean"], metric, target,
                                        layer, head)
        assert float(got.values[layer, head]) == pytest.approx(float(want), abs=ATOL)
    for layer, pos, head in by_pos:
        want = ref.query_view_reference(smollm2, ioi["corrupted"], ioi["clean"], metric, target,
                                        layer, head, pos)
        assert float(got_pos.values[layer, pos, head]) == pytest.approx(float(want), abs=ATOL)
    # the group view of the same KV heads (query head h reads KV head h // 3) is different
    group = patch(smollm2, ioi["clean"], ioi["corrupted"], "logit_diff", target=target,
                  answer=ioi["answer"], wrong=ioi["wrong"],
                  cells=[[layer, head // 3] for layer, head in all_pos])
    query = torch.stack([got.values[layer, head] for layer, head in all_pos])
    grouped = torch.stack([group.values[layer, head // 3] for layer, head in all_pos])
    assert not torch.allclose(query, grouped, atol=1e-3)


def test_prompt_pairs_from_texts(smollm2, ioi):
    """Two IOI pairs as PromptPairs equal the token tensors with answers, and TransformerLens
    with a batch of two (per pair)."""
    clean = [CLEAN_TEXT, "When Tom and Anna went to the park, Anna gave a ball to"]
    corrupted = [CORRUPTED_TEXT, "When Kate and Mike went to the park, Paul gave a ball to"]
    pairs = PromptPairs.from_texts(smollm2, clean, corrupted, [" Mary", " Tom"],
                                   [" John", " Anna"], name="ioi-two")
    assert pairs.same_length and pairs.length == N_POS
    cells = [[3, 2, 5], [14, 10, 3], [24, 14, 8]]
    got = patch(smollm2, pairs, metric="logit_diff", target="head_out", by_pos=True,
                cells=cells)
    tokens = patch(smollm2, pairs.clean, pairs.corrupted, "logit_diff", target="head_out",
                   by_pos=True, cells=cells, answer=pairs.answer, wrong=pairs.wrong)
    assert_close(got.per_pair, tokens.per_pair, atol=1e-5, rtol=0, equal_nan=True)
    assert got.params["pairs"] == "ioi-two" and got.params["n_pairs"] == 2

    def per_pair(logits):
        return ref.logit_diff(logits, pairs.answer, pairs.wrong)

    df = pd.DataFrame(cells, columns=["layer", "pos", "head"])
    want = ref.tl_patch(smollm2, pairs.corrupted, pairs.clean, per_pair, "head_out", True,
                        reduce="none", index_df=df)  # [cell, pair]
    assert_close(got.per_pair[tuple(torch.tensor(cells).T)], want, atol=ATOL, rtol=0)
    assert_close(got.clean, ref.run_metric(smollm2, pairs.clean, per_pair), atol=ATOL, rtol=0)
    assert_close(got.corrupted, ref.run_metric(smollm2, pairs.corrupted, per_pair), atol=ATOL,
                 rtol=0)
