"""Path patching and attribution patching equal slow, textbook references
(tests/reference_path_attribution.py: one pair, one cell, explicit hooks), on tiny 3-layer models of
each architecture and on the real default model (slow).

* Path patching (Wang et al. 2022): every sender's grid cell equals the three-step reference, for
  q / k / v / k+v receivers, both directions, ``receivers="logits"``, explicit sender sets,
  ``freeze_mlps``; grouped-query k/v receivers equal the reference on the equivalent multi-head
  model; a last-layer sender to the logits is ordinary activation patching.
* Attribution patching (Nanda 2023): every cell equals the literal per-cell autograd estimate,
  for every target, by layer and by position, both directions; the per-query-head KV view equals
  the estimate on the equivalent multi-head model; on a model whose metric is linear in the
  patched activation the estimate equals exact patching.
* ``agreement`` equals numpy / scipy computations.

The last tests of the file pin down library bugs found on the way (``patch(target="resid_mid")``
patches only the MLP's input; empty receiver inputs / sender sets are not refused); they sit at
the end so that ``pytest -x`` runs everything else first.
"""

import numpy as np
import pytest
import reference_path_attribution as ref  # tests/reference_path_attribution.py
import torch
from scipy import stats
from torch.testing import assert_close

from mechicl import agreement, attribution_patch, patch, path_patch
from mechicl.model import as_hooked_model
from mechicl.testing import tiny_hf_model, tiny_model

# One thread for the whole module, the real-model tests too: on a busy 2-core machine a
# two-thread SmolLM2 forward pass measured 4 s against 0.2 s with one thread.
pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4
ARCHS = ("gpt2", "llama", "llama-mha")
DIRECTIONS = ("denoising", "noising")
N_LAYERS, N_HEADS = 3, 4

# Three prompt pairs of toy words (BOS is prepended by the tokenizer), two different lengths; each
# corrupted prompt differs from its clean one in two words. Answer/wrong are token ids.
CLEAN = ["w5 w17 w30 w8 w41 w2", "w9 w22 w61 w13 w70 w3 w55 w11", "w40 w4 w77 w19 w26 w33"]
CORRUPTED = ["w5 w17 w88 w8 w41 w60", "w9 w22 w61 w90 w70 w3 w55 w12", "w40 w50 w77 w19 w26 w81"]
ANSWER = [20, 35, 61]
WRONG = [47, 12, 90]
PAIRS = [0, 1]  # two pairs of different lengths
SAME_LENGTH = [0, 2]  # pairs of one length, for by_pos=True


def _subset(idx):
    return ([CLEAN[i] for i in idx], [CORRUPTED[i] for i in idx], [ANSWER[i] for i in idx],
            [WRONG[i] for i in idx])


def _tokens(model, texts):
    return [torch.tensor(model.encode(t), dtype=torch.long) for t in texts]


def _base_source(model, direction, idx):
    clean, corrupted = _tokens(model, [CLEAN[i] for i in idx]), _tokens(model, [CORRUPTED[i] for i in idx])
    return (corrupted, clean) if direction == "denoising" else (clean, corrupted)


def _metrics(model, texts, idx):
    out = []
    for p, tokens in zip(idx, _tokens(model, texts), strict=True):
        logits, _ = ref.cache_run(model, tokens, [])
        out.append(float(ref.logit_diff(logits, ANSWER[p], WRONG[p])))
    return torch.tensor(out)


@pytest.fixture(scope="module")
def models3():
    """A 3-layer tiny model of each architecture (4 query heads; llama: 2 KV heads)."""
    return {arch: as_hooked_model(tiny_model(arch, n_layers=N_LAYERS), name=f"tiny3-{arch}")
            for arch in ARCHS}


@pytest.fixture(scope="module")
def mha_of_llama(models3):
    """The multi-head model equivalent to the grouped-query tiny llama (checked below)."""
    return as_hooked_model(ref.mha_equivalent(models3["llama"]), name="tiny3-llama-as-mha")


def test_mha_equivalent_computes_the_same(models3, mha_of_llama):
    """The reference's GQA -> MHA conversion is exact: same logits, same per-query-head z, and
    each query head's k/v is its KV head's (HF repeat_kv order)."""
    gqa = models3["llama"]
    assert (mha_of_llama.n_kv_heads, gqa.n_kv_heads) == (N_HEADS, N_HEADS // 2)
    names = [ref.hook(gqa, kind, layer) for layer in range(N_LAYERS) for kind in ("z", "k", "v")]
    for tokens in _tokens(gqa, CLEAN):
        la, ca = ref.cache_run(gqa, tokens, names)
        lb, cb = ref.cache_run(mha_of_llama, tokens, names)
        assert_close(lb, la, atol=1e-5, rtol=1e-5)
        for layer in range(N_LAYERS):
            assert_close(cb[ref.hook(gqa, "z", layer)], ca[ref.hook(gqa, "z", layer)],
                         atol=1e-5, rtol=1e-5)
            for kind in ("k", "v"):
                name = ref.hook(gqa, kind, layer)
                assert_close(cb[name], ca[name].repeat_interleave(2, dim=2), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Path patching
# --------------------------------------------------------------------------------------------


def _path_reference(model, direction, sender_sets, idx=PAIRS, **kwargs):
    """``[sender set, pair]`` reference metrics."""
    base, src = _base_source(model, direction, idx)
    out = torch.zeros(len(sender_sets), len(base))
    for p, pair in enumerate(idx):
        caches = ref.path_caches(model, base[p], src[p])
        for i, senders in enumerate(sender_sets):
            out[i, p] = ref.path_patch_reference(model, base[p], src[p], ANSWER[pair], WRONG[pair],
                                                 senders=senders, caches=caches, **kwargs)
    return out


def _run_path(model, idx=PAIRS, **kwargs):
    clean, corrupted, answer, wrong = _subset(idx)
    return path_patch(model, clean, corrupted, "logit_diff", answer=answer, wrong=wrong, **kwargs)


# (arch, receiver inputs, direction): every input in both directions across the architectures,
# every input on the grouped-query model
PATH_CASES = [
    ("gpt2", ("q",), "noising"), ("gpt2", ("k", "v"), "denoising"),
    ("llama", ("q",), "denoising"), ("llama", ("k",), "noising"),
    ("llama", ("v",), "denoising"), ("llama", ("k", "v"), "noising"),
    ("llama-mha", ("k",), "denoising"), ("llama-mha", ("v",), "noising"),
]


@pytest.mark.parametrize(("arch", "kinds", "direction"), PATH_CASES)
def test_path_patch_grid_equals_reference(models3, mha_of_llama, arch, kinds, direction):
    """Each sender's cell is the mean over pairs of the three-step reference; heads at or above
    the receivers' layer are NaN. Grouped-query k/v receivers (the receiver query head alone
    reads the recorded keys/values) equal the reference on the equivalent multi-head model;
    receivers (2, 1) and (2, 2) sit in different KV groups, so each group keeps one unpatched
    query head."""
    model = models3[arch]
    receivers = [(2, 1), (2, 2)]
    res = _run_path(model, receivers=receivers, direction=direction,
                    receiver_input=kinds[0] if len(kinds) == 1 else list(kinds))
    ref_model = mha_of_llama if arch == "llama" and set(kinds) & {"k", "v"} else model
    senders = [[(layer, head)] for layer in range(2) for head in range(N_HEADS)]
    expected = _path_reference(ref_model, direction, senders, receivers=receivers,
                               receiver_input=kinds).reshape(2, N_HEADS, len(PAIRS))

    assert (res.axes, res.shape, res.method) == (("layer", "head"), (N_LAYERS, N_HEADS), "path")
    assert res.target == "path:" + "+".join(sorted(kinds))
    assert torch.isnan(res.values[2]).all() and torch.isnan(res.per_pair[2]).all()
    assert_close(res.per_pair[:2], expected, atol=TOL, rtol=TOL)
    assert_close(res.values[:2], expected.mean(-1), atol=TOL, rtol=TOL)
    clean, corrupted = _subset(PAIRS)[:2]
    assert_close(res.clean, _metrics(model, clean, PAIRS), atol=TOL, rtol=TOL)
    assert_close(res.corrupted, _metrics(model, corrupted, PAIRS), atol=TOL, rtol=TOL)
    assert float(expected.std()) > 1e-2  # the paths carry effects the check can see


def test_path_patch_gqa_query_view_is_not_the_group_view(models3):
    """The test can tell the views apart: patching the receivers' whole KV heads (their group
    partners read the recorded values too) gives other numbers than mechicl's per-query view."""
    model = models3["llama"]
    receivers = [(2, 1), (2, 2)]
    res = _run_path(model, receivers=receivers, receiver_input="v", direction="noising")
    senders = [[(layer, head)] for layer in range(2) for head in range(N_HEADS)]
    group = _path_reference(model, "noising", senders, receivers=receivers,
                            receiver_input=("v",), gqa_group_view=True).mean(-1)
    assert float((res.values[:2].flatten() - group).abs().max()) > 2e-3


def test_path_patch_freezing_matters(models3):
    """The test can fail: without freezing the other heads (plain activation patching of the
    sender, read at the receivers) the reference differs from path patching."""
    model = models3["llama"]
    receivers = [(2, 1), (2, 2)]
    res = _run_path(model, receivers=receivers, receiver_input="q", direction="noising")
    senders = [[(0, head)] for head in range(N_HEADS)]
    unfrozen = _path_reference(model, "noising", senders, receivers=receivers,
                               receiver_input=("q",), freeze=False).mean(-1)
    assert float((res.values[0] - unfrozen).abs().max()) > 2e-3


def test_path_patch_receivers_in_two_layers(models3):
    """Receivers in layers 1 and 2, patched together: senders in layers 0 and 1 reach them (a
    layer-1 sender only the layer-2 receiver), layer 2 cannot."""
    model = models3["llama-mha"]
    receivers = [(1, 0), (2, 3)]
    res = _run_path(model, receivers=receivers, receiver_input="q", direction="noising")
    senders = [[(layer, head)] for layer in range(2) for head in range(N_HEADS)]
    expected = _path_reference(model, "noising", senders, receivers=receivers,
                               receiver_input=("q",)).mean(-1).reshape(2, N_HEADS)
    assert torch.isnan(res.values[2]).all()
    assert_close(res.values[:2], expected, atol=TOL, rtol=TOL)
    # one copy per forward pass (many chunks, step 1 re-run per chunk): the same numbers
    small = _run_path(model, receivers=receivers, receiver_input="q", direction="noising",
                      batch_tokens=9)
    assert_close(small.values, res.values, atol=1e-5, rtol=1e-5, equal_nan=True)


def _last_position_logit_diff(answer, wrong):
    """A TransformerLens-style callable: logit(answer) - logit(wrong) at the last position, per
    pair."""
    a, w = torch.tensor(answer), torch.tensor(wrong)

    def per_pair(logits):
        rows = torch.arange(logits.shape[0])
        return logits[rows, -1, a] - logits[rows, -1, w]
    return per_pair


def test_path_patch_callable_metric(models3):
    """A callable metric (per pair) gives the built-in logit difference's values."""
    model = models3["llama"]
    clean, corrupted, answer, wrong = _subset(SAME_LENGTH)
    per_pair = _last_position_logit_diff(answer, wrong)

    kw = {"receivers": [(2, 0), (2, 3)], "receiver_input": ["k", "v"], "direction": "denoising"}
    builtin = path_patch(model, clean, corrupted, answer=answer, wrong=wrong, **kw)
    mine = path_patch(model, clean, corrupted, per_pair, **kw)
    assert_close(mine.per_pair, builtin.per_pair, atol=TOL, rtol=TOL, equal_nan=True)
    assert_close(mine.values, builtin.values, atol=TOL, rtol=TOL, equal_nan=True)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_path_patch_to_logits_equals_reference(models3, arch, direction):
    """receivers="logits": each sender's effect on the logits through no other attention head
    (all other heads frozen, MLPs recomputed); every head is a valid sender."""
    model = models3[arch]
    res = _run_path(model, receivers="logits", direction=direction)
    senders = [[(layer, head)] for layer in range(N_LAYERS) for head in range(N_HEADS)]
    expected = _path_reference(model, direction, senders, receivers="logits")
    assert res.target == "path:logits" and res.shape == (N_LAYERS, N_HEADS)
    assert_close(res.per_pair, expected.reshape(N_LAYERS, N_HEADS, -1), atol=TOL, rtol=TOL)
    assert_close(res.values, expected.mean(-1).reshape(N_LAYERS, N_HEADS), atol=TOL, rtol=TOL)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_last_layer_sender_to_logits_is_activation_patching(models3, arch, direction):
    """A last-layer sender has nothing downstream but its layer's MLP, which recomputes (as in
    activation patching): path patching to the logits equals patching that head's output."""
    model = models3[arch]
    last = N_LAYERS - 1
    res = _run_path(model, receivers="logits", direction=direction,
                    senders=[(last, head) for head in range(N_HEADS)])
    clean, corrupted, answer, wrong = _subset(PAIRS)
    act = patch(model, clean, corrupted, "logit_diff", answer=answer, wrong=wrong,
                target="head_out", direction=direction)
    assert res.axes == ("sender",)
    assert_close(res.values, act.values[last], atol=TOL, rtol=TOL)
    assert_close(res.per_pair, act.per_pair[last], atol=TOL, rtol=TOL)
    # and for an earlier layer the frozen heads make the two differ
    early = _run_path(model, receivers="logits", direction=direction,
                      senders=[(0, head) for head in range(N_HEADS)])
    assert float((early.values - act.values[0]).abs().max()) > 1e-3


@pytest.mark.parametrize(("arch", "kinds", "direction"),
                         [("gpt2", ("v",), "denoising"), ("llama", ("q",), "noising")])
def test_path_patch_sender_sets_equal_reference(models3, arch, kinds, direction):
    """Explicit senders: single heads and sets patched together, axis "sender"; a set may hold
    a head of the receivers' layer (it cannot act on them) as long as one head is below."""
    model = models3[arch]
    receivers = [(2, 0)]
    senders = [(0, 1), [(0, 2), (1, 3)], [(1, 0), (2, 1)], [(0, 0), (0, 3), (1, 1)]]
    res = _run_path(model, receivers=receivers, receiver_input=kinds[0], senders=senders,
                    direction=direction)
    sets = [[senders[0]], *senders[1:]]
    expected = _path_reference(model, direction, sets, receivers=receivers, receiver_input=kinds)
    assert res.axes == ("sender",) and res.shape == (len(senders),)
    assert res.labels == {"sender": ["0.1", "0.2 1.3", "1.0 2.1", "0.0 0.3 1.1"]}
    assert_close(res.per_pair, expected, atol=TOL, rtol=TOL)
    assert_close(res.values, expected.mean(-1), atol=TOL, rtol=TOL)


@pytest.mark.parametrize(("arch", "receivers", "direction"),
                         [("gpt2", [(2, 1)], "noising"), ("llama-mha", [(2, 3)], "denoising"),
                          ("gpt2", "logits", "denoising"), ("llama", "logits", "noising")])
def test_path_patch_freeze_mlps_equals_reference(models3, arch, receivers, direction):
    """freeze_mlps=True also holds every MLP at its base value; it changes the result."""
    model = models3[arch]
    res = _run_path(model, receivers=receivers, receiver_input="q", direction=direction,
                    freeze_mlps=True)
    top = N_LAYERS if receivers == "logits" else 2
    senders = [[(layer, head)] for layer in range(top) for head in range(N_HEADS)]
    expected = _path_reference(model, direction, senders, receivers=receivers,
                               receiver_input=("q",), freeze_mlps=True).mean(-1)
    assert_close(res.values[:top].flatten(), expected, atol=TOL, rtol=TOL)
    recomputed = _run_path(model, receivers=receivers, receiver_input="q", direction=direction)
    assert float((recomputed.values[:top] - res.values[:top]).abs().max()) > 1e-3
    assert res.params["freeze_mlps"] is True


def test_path_patch_normalize(models3):
    """normalize=True reports (value - corrupted) / (clean - corrupted), pair means."""
    model = models3["gpt2"]
    raw = _run_path(model, receivers=[(2, 0)], receiver_input="k", direction="noising")
    norm = _run_path(model, receivers=[(2, 0)], receiver_input="k", direction="noising",
                     normalize=True)
    c, k = raw.clean.mean(), raw.corrupted.mean()
    assert norm.normalized and norm.baseline == 1.0
    assert_close(norm.values, (raw.values - k) / (c - k), atol=1e-5, rtol=1e-5, equal_nan=True)


def test_path_patch_receivers_in_layer_zero_are_unreachable(models3):
    """Receivers in layer 0 have no possible sender: the grid is all NaN."""
    res = _run_path(models3["gpt2"], receivers=[(0, 1)], receiver_input="q")
    assert res.shape == (N_LAYERS, N_HEADS) and torch.isnan(res.values).all()


def test_path_patch_errors(models3, induction_toy):
    model = models3["gpt2"]
    for bad in ([(2, N_HEADS)], [(N_LAYERS, 0)], [(-1, 0)], [(2, -1)]):
        with pytest.raises(ValueError, match="outside"):
            _run_path(model, receivers=bad)
    with pytest.raises(ValueError, match="no receiver heads"):
        _run_path(model, receivers=[])
    for senders in ([(2, 0)], [[(2, 0), (2, 3)]], [(0, 1), (2, 2)]):
        with pytest.raises(ValueError, match="cannot reach"):
            _run_path(model, receivers=[(2, 1)], senders=senders)
    with pytest.raises(ValueError, match="outside"):
        _run_path(model, receivers=[(2, 1)], senders=[(0, N_HEADS)])
    for kinds in ("z", ["q", "pattern"]):
        with pytest.raises((ValueError, TypeError)):  # TypeError: runtime type checking
            _run_path(model, receivers=[(2, 1)], receiver_input=kinds)
    with pytest.raises((ValueError, TypeError)):
        _run_path(model, receivers="heads")
    with pytest.raises((ValueError, TypeError)):
        _run_path(model, receivers=[(2, 1)], direction="sideways")
    tokens = torch.tensor([model.encode("w1 w2 w3"), model.encode("w1 w9 w3")])
    with pytest.raises(ValueError, match="no MLPs"):
        path_patch(induction_toy, tokens[:1], tokens[1:], answer=[5], wrong=[6],
                   receivers=[(1, 2)], freeze_mlps=True)


# --------------------------------------------------------------------------------------------
# Attribution patching
# --------------------------------------------------------------------------------------------

HOOK_KIND = {"head_out": "z", "q": "q", "k": "k", "v": "v", "pattern": "pattern",
             "resid_pre": "resid_pre", "resid_mid": "resid_mid", "resid_post": "resid_post",
             "attn_out": "attn_out", "mlp_out": "mlp_out"}
ATTR_TARGETS = ("head_out", "q", "k", "v", "pattern", "resid_pre", "attn_out", "mlp_out")


def _index(target, rest, by_pos):
    """The activation slice (batch axis included) of a cell, given its indices after layer."""
    if target in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"):
        return (0, rest[0]) if by_pos else (0, slice(None))
    if target == "pattern":  # [batch, head, query_pos, key_pos]; cell (head[, query_pos])
        return (0, rest[0], rest[1]) if by_pos else (0, rest[0])
    # [batch, pos, head, d_head]; cell (pos, head) or (head,)
    return (0, rest[0], rest[1]) if by_pos else (0, slice(None), rest[0])


def _attribution_reference(model, target, direction, cells, by_pos, idx, *, kind=None):
    """``[cell, pair]`` literal per-cell estimates; ``cells`` are result indices (layer first)."""
    kind = kind or HOOK_KIND[target]
    base, src = _base_source(model, direction, idx)
    out = torch.zeros(len(cells), len(idx))
    for p, pair in enumerate(idx):
        names = [ref.hook(model, kind, layer) for layer in range(model.n_layers)]
        _, src_cache = ref.cache_run(model, src[p], names)
        for i, cell in enumerate(cells):
            name = ref.hook(model, kind, cell[0])
            out[i, p] = ref.attribution_cell_reference(
                model, base[p], src_cache[name], ANSWER[pair], WRONG[pair], name=name,
                index=_index(target, cell[1:], by_pos))
    return out


def _run_attr(model, idx, **kwargs):
    clean, corrupted, answer, wrong = _subset(idx)
    return attribution_patch(model, clean, corrupted, "logit_diff", answer=answer, wrong=wrong,
                             **kwargs)


def _check_attribution(model, target, direction, by_pos, idx, n_sample=None, ref_model=None,
                       **kwargs):
    res = _run_attr(model, idx, target=target, direction=direction, by_pos=by_pos, **kwargs)
    assert res.method == "attribution" and not torch.isnan(res.values).any()
    cells = [tuple(c) for c in torch.nonzero(torch.ones(res.shape, dtype=torch.bool)).tolist()]
    if n_sample is not None and n_sample < len(cells):
        # a seeded sample of cells, always with the first and last (layers 0 and 2)
        gen = torch.Generator().manual_seed(len(target) * 7 + by_pos)
        pick = torch.randperm(len(cells), generator=gen)[:n_sample].tolist()
        cells = sorted({cells[i] for i in pick} | {cells[0], cells[-1]})
    expected = _attribution_reference(ref_model or model, target, direction, cells, by_pos, idx)
    got = torch.stack([res.per_pair[c] for c in cells])
    assert_close(got, expected, atol=TOL, rtol=TOL, msg=lambda m: f"{target}: {m}")
    assert_close(res.values, res.per_pair.mean(-1))
    return res, expected


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_attribution_by_layer_equals_reference(models3, arch, direction):
    """Every target (k/v: the KV-head group view; a sample of head cells, every layer cell),
    pairs of two lengths."""
    model = models3[arch]
    for target in ATTR_TARGETS:
        res, expected = _check_attribution(model, target, direction, False, PAIRS, n_sample=3)
        heads = model.n_kv_heads if target in ("k", "v") else N_HEADS
        assert res.shape == ((N_LAYERS,) if res.axes == ("layer",) else (N_LAYERS, heads))
        assert float(expected.std()) > 1e-3, target
    # the base and other run's metrics are the real ones
    clean, corrupted = _subset(PAIRS)[:2]
    assert_close(res.clean, _metrics(model, clean, PAIRS), atol=TOL, rtol=TOL)
    assert_close(res.corrupted, _metrics(model, corrupted, PAIRS), atol=TOL, rtol=TOL)


@pytest.mark.parametrize(("arch", "direction"),
                         [("gpt2", "noising"), ("llama", "denoising"), ("llama-mha", "noising")])
def test_attribution_by_pos_equals_reference(models3, arch, direction):
    """by_pos=True, on a sample of cells of every target (both directions across the
    architectures)."""
    model = models3[arch]
    for target in ATTR_TARGETS:
        res, _ = _check_attribution(model, target, direction, True, SAME_LENGTH, n_sample=2)
        assert "pos" in res.axes


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("by_pos", [False, True])
def test_attribution_query_view_equals_mha_reference(models3, mha_of_llama, direction, by_pos):
    """kv_heads="query" on the grouped-query model: the estimate for query head h's view of
    its KV head equals the literal estimate for head h's own k/v on the equivalent multi-head
    model (and so does mechicl's group view there)."""
    gqa = models3["llama"]
    for target in ("k", "v"):
        res, _ = _check_attribution(gqa, target, direction, by_pos, SAME_LENGTH,
                                    n_sample=5, ref_model=mha_of_llama,
                                    kv_heads="query")
        assert res.axes[-1] == "head" and res.shape[-1] == N_HEADS
        on_mha = _run_attr(mha_of_llama, SAME_LENGTH, target=target, direction=direction,
                           by_pos=by_pos)
        assert_close(res.values, on_mha.values, atol=TOL, rtol=TOL)


def test_attribution_callable_metric(models3):
    """A callable metric (per pair, or one number for the batch) gives the built-in's values."""
    model = models3["llama"]
    clean, corrupted, answer, wrong = _subset(SAME_LENGTH)
    per_pair = _last_position_logit_diff(answer, wrong)

    def batch_mean(logits):
        return per_pair(logits).mean()

    builtin = attribution_patch(model, clean, corrupted, answer=answer, wrong=wrong,
                                target="v", by_pos=True)
    mine = attribution_patch(model, clean, corrupted, per_pair, target="v", by_pos=True)
    mean = attribution_patch(model, clean, corrupted, batch_mean, target="v", by_pos=True)
    assert_close(mine.per_pair, builtin.per_pair, atol=TOL, rtol=TOL)
    assert_close(mean.values, builtin.values, atol=TOL, rtol=TOL)
    assert mean.per_pair is None


# --- exactness where the metric is linear in the patched activation --------------------------


def _norm_free_llama(zero_last_mlp):
    """A 2-layer GQA llama with the final RMSNorm replaced by the identity, so the logits are a
    linear map of the final residual stream (the bridge runs a norm whose HF module is an
    Identity as a pass-through). With ``zero_last_mlp`` the last MLP's output weights are 0
    (Llama has no biases), so its output is 0 whatever it reads and the last layer's head
    outputs, values, pattern and attention output reach the logits linearly too.

    GPT-2 cannot serve: its bridge runs LayerNorm in Python from the module's weight, so an
    Identity ``ln_f`` does not boot (AttributeError: no attribute 'weight')."""
    from transformer_lens.model_bridge import TransformerBridge

    hf, tokenizer = tiny_hf_model("llama", n_layers=2, seed=3)
    hf.model.norm = torch.nn.Identity()
    if zero_last_mlp:
        with torch.no_grad():
            hf.model.layers[-1].mlp.down_proj.weight.zero_()
    bridge = TransformerBridge.boot_transformers("mechicl-toy-linear", hf_model=hf,
                                                 tokenizer=tokenizer, device="cpu")
    return as_hooked_model(bridge, name=f"tiny-llama-norm-free-{zero_last_mlp}")


@pytest.fixture(scope="module")
def linear_models():
    return {"mlp": _norm_free_llama(False), "no_last_mlp": _norm_free_llama(True)}


def test_norm_free_model_is_linear_in_the_final_residual(linear_models):
    for model in linear_models.values():
        tokens = _tokens(model, CLEAN[:1])[0]
        name = ref.hook(model, "resid_post", 1)
        logits, cache = ref.cache_run(model, tokens, [name])
        assert_close(logits[0], cache[name][0] @ model.W_U + model.b_U, atol=1e-5, rtol=1e-5)


# (model, target, kv view) whose last-layer cells are exactly linear under the logit difference.
# resid_mid (of "no_last_mlp") would be too, but patch(target="resid_mid") does not patch the
# residual stream: see test_patching_a_whole_residual_state_gives_the_source_run.
LINEAR_CASES = [
    ("no_last_mlp", "head_out", "group"), ("no_last_mlp", "attn_out", "group"),
    ("no_last_mlp", "resid_post", "group"),
    ("no_last_mlp", "v", "group"), ("no_last_mlp", "v", "query"),
    ("no_last_mlp", "pattern", "group"),  # z = pattern @ v
    ("mlp", "mlp_out", "group"), ("mlp", "resid_post", "group"),
]


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("by_pos", [False, True])
def test_attribution_is_exact_when_linear(linear_models, direction, by_pos):
    """Last-layer cells of a norm-free model: the first-order estimate is exact, so it equals
    activation patching; earlier layers and q (softmax) are not linear and differ."""
    clean, corrupted, answer, wrong = _subset(SAME_LENGTH)
    kw = {"answer": answer, "wrong": wrong, "direction": direction, "by_pos": by_pos}
    for which, target, view in LINEAR_CASES:
        model = linear_models[which]
        exact = patch(model, clean, corrupted, target=target, kv_heads=view, **kw)
        est = attribution_patch(model, clean, corrupted, target=target, kv_heads=view, **kw)
        assert exact.axes == est.axes and exact.shape == est.shape
        assert_close(est.values[-1], exact.values[-1], atol=TOL, rtol=TOL,
                     msg=lambda m, t=target: f"{t}: {m}")
        assert_close(est.per_pair[-1], exact.per_pair[-1], atol=TOL, rtol=TOL)
        assert float(exact.effect()[-1].abs().max()) > 1e-2, target  # non-trivial effects
    model = linear_models["no_last_mlp"]
    for target in ("head_out", "q"):
        exact = patch(model, clean, corrupted, target=target, **kw)
        est = attribution_patch(model, clean, corrupted, target=target, **kw)
        layers = slice(0, 1) if target == "head_out" else slice(None)
        assert float((est.values[layers] - exact.values[layers]).abs().max()) > 1e-3


# --- agreement ----------------------------------------------------------------------------------


def _direct_agreement(exact, estimate, k):
    a = (exact.values - exact.baseline).flatten().double().numpy()
    b = (estimate.values - estimate.baseline).flatten().double().numpy()
    ok = ~(np.isnan(a) | np.isnan(b))
    a, b = a[ok], b[ok]
    k = min(k, len(a))
    top_a = set(np.argsort(-np.abs(a), kind="stable")[:k].tolist())
    top_b = set(np.argsort(-np.abs(b), kind="stable")[:k].tolist())
    return {"n_cells": len(a), "pearson": float(np.corrcoef(a, b)[0, 1]),
            "spearman": float(stats.spearmanr(a, b).statistic),
            "top_k": len(top_a & top_b) / k, "k": k,
            "max_abs_error": float(np.abs(a - b).max()),
            "sign_agreement": float(np.mean((a > 0) == (b > 0)))}


def test_agreement_fields_equal_direct_computations(models3):
    model = models3["gpt2"]
    clean, corrupted, answer, wrong = _subset(SAME_LENGTH)
    kw = {"answer": answer, "wrong": wrong, "direction": "noising", "target": "head_out",
          "by_pos": True}
    exact = patch(model, clean, corrupted, **kw)
    estimate = attribution_patch(model, clean, corrupted, **kw)
    for k in (5, 10, 1000):
        got = agreement(exact, estimate, k=k).to_dict()
        want = _direct_agreement(exact, estimate, k)
        assert set(got) == set(want)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert got["n_cells"] == N_LAYERS * N_HEADS * len(model.encode(clean[0]))
    assert 0.0 < got["max_abs_error"] and got["pearson"] < 1.0  # not trivially identical

    # cells missing in one result (NaN) are left out
    cells = [[layer, pos, head] for layer in range(N_LAYERS) for pos in (2, 4, 6)
             for head in (0, 3)]
    partial = patch(model, clean, corrupted, cells=cells, **kw)
    got = agreement(partial, estimate, k=4).to_dict()
    want = _direct_agreement(partial, estimate, 4)
    assert got["n_cells"] == len(cells)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_agreement_errors(models3):
    model = models3["gpt2"]
    clean, corrupted, answer, wrong = _subset(SAME_LENGTH)
    kw = {"answer": answer, "wrong": wrong}
    heads = patch(model, clean, corrupted, target="head_out", **kw)
    layers = attribution_patch(model, clean, corrupted, target="resid_pre", **kw)
    by_pos = attribution_patch(model, clean, corrupted, target="head_out", by_pos=True, **kw)
    with pytest.raises(ValueError, match="layout"):
        agreement(heads, layers)
    with pytest.raises(ValueError, match="layout"):
        agreement(heads, by_pos)
    noising = attribution_patch(model, clean, corrupted, target="head_out", direction="noising",
                                **kw)
    with pytest.raises(ValueError, match="direction"):
        agreement(heads, noising)
    normalised = attribution_patch(model, clean, corrupted, target="head_out", normalize=True,
                                   **kw)
    with pytest.raises(ValueError, match="normalisation"):
        agreement(heads, normalised)
    one = patch(model, clean, corrupted, target="head_out", cells=[[0, 0]], **kw)
    with pytest.raises(ValueError, match="fewer than two"):
        agreement(one, attribution_patch(model, clean, corrupted, target="head_out", **kw))


# --------------------------------------------------------------------------------------------
# The real default model (slow)
# --------------------------------------------------------------------------------------------

IOI_CLEAN = "When Mary and John went to the store, John gave a drink to"
IOI_CORRUPTED = "When Alice and Bob went to the store, Carol gave a drink to"


def _ioi(model):
    clean = torch.tensor(model.encode(IOI_CLEAN))
    corrupted = torch.tensor(model.encode(IOI_CORRUPTED))
    answer, wrong = model.encode(" Mary", prepend_bos=False), model.encode(" John", prepend_bos=False)
    assert len(clean) == len(corrupted) == 15 and len(answer) == len(wrong) == 1
    return clean, corrupted, answer[0], wrong[0]


@pytest.mark.slow
def test_smollm2_path_patch_equals_reference(smollm2):
    """Two receivers of one KV group (heads 3 and 5 of layer 20 read KV head 1; head 4 of that
    group keeps its own values), value input: the reference sets each receiver's hook_z to its
    own pattern times the recorded values. Also the query input, and a sender set."""
    clean, corrupted, answer, wrong = _ioi(smollm2)
    receivers = [(20, 3), (20, 5)]
    senders = [(5, 1), (9, 4), (14, 0), (18, 7), [(9, 4), (18, 7)]]
    sets = [[s] if isinstance(s, tuple) else s for s in senders]
    caches = ref.path_caches(smollm2, clean, corrupted)
    for kind in ("v", "q"):
        res = path_patch(smollm2, IOI_CLEAN, IOI_CORRUPTED, answer=" Mary", wrong=" John",
                         receivers=receivers, receiver_input=kind, senders=senders)
        expected = torch.tensor([
            ref.path_patch_reference(smollm2, clean, corrupted, answer, wrong, senders=s,
                                     receivers=receivers, receiver_input=(kind,),
                                     gqa_v_via_z=True, caches=caches)
            for s in sets])
        assert_close(res.values, expected, atol=TOL, rtol=TOL, msg=lambda m, k=kind: f"{k}: {m}")
        assert float((expected - res.clean).abs().max()) > 1e-3  # the paths do something


@pytest.mark.slow
def test_smollm2_attribution_equals_reference(smollm2):
    """head_out over all positions (denoising: corrupted run, clean z): five cells from layer 0
    to the last layer equal the literal per-cell autograd estimate."""
    clean, corrupted, answer, wrong = _ioi(smollm2)
    res = attribution_patch(smollm2, IOI_CLEAN, IOI_CORRUPTED, answer=" Mary", wrong=" John",
                            target="head_out")
    assert res.shape == (30, 9)
    cells = [(0, 0), (9, 4), (14, 0), (20, 3), (29, 8)]
    names = [ref.hook(smollm2, "z", layer) for layer, _ in cells]
    _, src = ref.cache_run(smollm2, clean, names)
    for layer, head in cells:
        name = ref.hook(smollm2, "z", layer)
        expected = ref.attribution_cell_reference(smollm2, corrupted, src[name], answer, wrong,
                                                  name=name, index=(0, slice(None), head))
        assert float(res.values[layer, head]) == pytest.approx(expected, rel=TOL, abs=TOL)


# --------------------------------------------------------------------------------------------
# Library bugs (kept last, so that `pytest -x` runs everything else first)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["resid_pre", "resid_mid", "resid_post"])
@pytest.mark.parametrize("arch", ARCHS)
def test_patching_a_whole_residual_state_gives_the_source_run(models3, arch, target):
    """Replacing the whole residual stream (every position) at any point with the source run's
    makes everything downstream the source run's: the metric must be the source run's, at
    every layer. Attribution patching assumes exactly this (its gradient is taken at the
    residual-stream tensor), and so does TransformerLens's resid_mid patching.

    Fails for resid_mid (every architecture, both directions): mechicl patches the hook
    ``blocks.L.hook_resid_mid`` (patching._SPECS / models.HOOK_KINDS), which in the TL 4
    bridge is an alias of ``blocks.L.ln2.hook_in``, the *input of the MLP's norm*; a replaced
    value reaches only the MLP, while the HF block's residual connection around the MLP keeps
    the unpatched stream. attribution_patch(target="resid_mid") does not share the problem (an
    unchanged hook tensor is the residual tensor itself, so its gradient covers both uses),
    so the two disagree on it even where the metric is linear."""
    model = models3[arch]
    clean, corrupted, answer, wrong = _subset(PAIRS)
    for direction in DIRECTIONS:
        res = patch(model, clean, corrupted, answer=answer, wrong=wrong, target=target,
                    direction=direction)
        source = res.clean if direction == "denoising" else res.corrupted
        assert_close(res.per_pair, source[None].expand(N_LAYERS, -1), atol=TOL, rtol=TOL,
                     msg=lambda m, d=direction: f"{target} {d}: {m}")


def test_path_patch_rejects_empty_inputs(models3):
    """An empty receiver_input patches nothing (every sender would score the unpatched run) and
    an empty sender set has no head: both should be refused with a ValueError.

    Fails: receiver_input=[] returns the base metric for every sender, silently; senders=[[]]
    raises IndexError (``s[0]`` in path_patch) instead of _heads' "no sender heads given"."""
    model = models3["gpt2"]
    with pytest.raises(ValueError):
        _run_path(model, receivers=[(2, 1)], receiver_input=[])
    with pytest.raises(ValueError, match="no sender heads"):
        _run_path(model, receivers=[(2, 1)], senders=[[]])
