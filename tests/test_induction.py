"""Induction-head scans: fast vectorised scores equal slow per-head, per-position references."""

import functools
import json

import pytest
import reference_scores as ref  # tests/reference_scores.py: slow, plain loops
import torch
from torch.testing import assert_close

import mechicl
from mechicl.analyses.induction import (
    SCORES,
    TIE_TOLERANCE,
    ScanResult,
    copying_ties,
    induction_scan,
    ov_eigen_copying_scores,
    parse_scores,
    repeated_sequences,
)
from mechicl.cli import build_parser
from mechicl.results import HeadScores
from mechicl.testing import INDUCTION_MODEL_HEADS

N_SEEDS = 3


def short(s: int) -> int:
    """Sequence length per seed index for the tiny models (vocab of 96 words)."""
    return 5 + 3 * s


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def scanned(request):
    """A tiny MHA (LayerNorm, learned positions, biases) and a tiny GQA model, fully scanned."""
    from mechicl.model import as_hooked_model
    from mechicl.testing import tiny_model

    model = as_hooked_model(tiny_model(request.param), name=f"tiny-{request.param}")
    # batch_tokens small enough that the seeds go through several padded batches.
    result = induction_scan(model, n_seeds=N_SEEDS, length=short, batch_tokens=64,
                            progress=False)
    return model, result


@pytest.mark.parametrize("indexing", ["exact", "reference"])
def test_prefix_matching_equals_reference(scanned, indexing):
    model, result = scanned
    fast = mechicl.analyses.induction.prefix_matching_scores(model, n_seeds=N_SEEDS, length=short,
                                          indexing=indexing, progress=False)
    assert len(fast.tokens) == N_SEEDS
    for s, tokens in enumerate(fast.tokens):
        want = ref.ref_prefix_matching(model, tokens, short(s), indexing=indexing)
        assert_close(fast.per_seed[s], want, rtol=0, atol=1e-5)


def test_other_copy_counts_equal_reference(scanned):
    model, _ = scanned
    for n_copies in (2, 3, 5):
        result = induction_scan(model, scores=("prefix_matching", "duplicate_token"),
                                n_copies=n_copies, n_seeds=2, length=short, progress=False)
        pm, dup = result.scores["prefix_matching"], result.scores["duplicate_token"]
        for s, tokens in enumerate(pm.tokens):
            assert len(tokens) == n_copies * short(s) + 1
            assert_close(pm.per_seed[s], ref.ref_prefix_matching(model, tokens, short(s),
                                                                 n_copies=n_copies),
                         rtol=0, atol=1e-5)
            assert_close(dup.per_seed[s], ref.ref_duplicate_token(model, tokens, short(s),
                                                                  n_copies=n_copies),
                         rtol=0, atol=1e-5)


def test_reference_indexing_differs_from_exact(scanned):
    _, result = scanned
    model = scanned[0]
    exact = result.scores["prefix_matching"].mean
    literal = mechicl.analyses.induction.prefix_matching_scores(model, n_seeds=N_SEEDS, length=short,
                                             indexing="reference", progress=False).mean
    assert (literal >= exact - 1e-9).all() and (literal - exact).abs().max() > 1e-6


def test_previous_and_duplicate_equal_reference(scanned):
    model, result = scanned
    prev, dup = result.scores["previous_token"], result.scores["duplicate_token"]
    for s, tokens in enumerate(prev.tokens):
        assert_close(prev.per_seed[s], ref.ref_previous_token(model, tokens), rtol=0, atol=1e-5)
        assert_close(dup.per_seed[s], ref.ref_duplicate_token(model, tokens, short(s)),
                     rtol=0, atol=1e-5)


def test_per_position_loss_equals_reference(scanned):
    model, result = scanned
    scores = result.scores["prefix_matching"]
    loss = scores.extras["loss_per_position"]
    for s, tokens in enumerate(scores.tokens):
        want = ref.ref_per_position_loss(model, tokens)
        assert_close(loss[s, : len(want)], want, rtol=1e-5, atol=1e-5)
        assert loss[s, len(want):].isnan().all()


@pytest.mark.parametrize("stream", ["embeddings", "residual"])
def test_copying_equals_reference(scanned, stream):
    model, _ = scanned
    fast = mechicl.analyses.induction.copying_scores(model, n_seeds=N_SEEDS, length=short, stream=stream,
                                  batch_tokens=64, progress=False)
    for s, tokens in enumerate(fast.tokens):
        assert len(tokens) == 4 * short(s) + 1 and len(set(tokens.tolist())) == len(tokens)
        want = ref.ref_copying(model, tokens, stream=stream)
        assert_close(fast.per_seed[s], want, rtol=0, atol=1e-5)


def test_copying_in_query_blocks_equals_reference(scanned, monkeypatch):
    """Force the smallest query blocks (16 rows) so that sequences span several blocks."""
    model, _ = scanned
    monkeypatch.setattr(mechicl.analyses.induction, "_BLOCK_ELEMENTS", 1)
    fast = mechicl.analyses.induction.copying_scores(model, n_seeds=N_SEEDS, length=short, progress=False)
    assert max(len(t) for t in fast.tokens) > 32
    for s, tokens in enumerate(fast.tokens):
        assert_close(fast.per_seed[s], ref.ref_copying(model, tokens), rtol=0, atol=1e-5)


# ---- near-tied argmax shares of the copying score ---------------------------------------------

# On the tiny random models almost no gap is below the default 1e-4: a tolerance at which the
# shares differ between heads (checked below) makes the comparison with the reference bite.
WIDE_TOLERANCE = 0.02


def test_near_tied_rows_by_hand():
    from mechicl.analyses.induction import _near_tied

    rows = torch.tensor([[1.0, 0.0, 0.0, 0.0],      # one-hot: not tied
                         [0.25, 0.25, 0.25, 0.25],  # uniform: tied at any tolerance
                         [0.5, 0.25, 0.25, 0.0],    # gap 0.25 (the tied pair is not the top)
                         [0.375, 0.375, 0.25, 0.0],  # the two largest tie exactly
                         [0.625, 0.125, 0.125, 0.125]])
    assert _near_tied(rows, 0.0).tolist() == [False, True, False, True, False]
    assert _near_tied(rows, 0.25).tolist() == [False, True, True, True, False]  # gap <= tol
    assert _near_tied(rows, 0.2499).tolist() == [False, True, False, True, False]
    assert _near_tied(rows[None, None], 0.0).shape == (1, 1, 5)
    assert _near_tied(torch.ones(3, 1), 1.0).tolist() == [False, False, False]  # one key


@pytest.mark.parametrize("stream", ["embeddings", "residual"])
def test_copying_ties_equal_reference(scanned, stream, monkeypatch):
    """Per seed and head, the vectorised share equals a loop over positions; small query blocks
    so that the rows of a sequence span several blocks, all seeds in one right-padded batch
    (the padding rows must not count)."""
    model, _ = scanned
    monkeypatch.setattr(mechicl.analyses.induction, "_BLOCK_ELEMENTS", 1)
    fast = mechicl.analyses.induction.copying_scores(
        model, n_seeds=N_SEEDS, length=short, stream=stream, batch_tokens=200,
        tie_tolerance=WIDE_TOLERANCE, progress=False)
    ties = copying_ties(fast)
    assert ties.params["tie_tolerance"] == WIDE_TOLERANCE and ties.name == "copying_ties"
    assert ties.per_seed.shape == (N_SEEDS, model.n_layers, model.n_heads)
    assert max(len(t) for t in fast.tokens) > 32
    for s, tokens in enumerate(fast.tokens):
        want = ref.ref_copying_ties(model, tokens, stream=stream, tolerance=WIDE_TOLERANCE)
        assert_close(ties.per_seed[s], want, rtol=0, atol=1e-12)
    # the comparison is not vacuous: some heads have near-ties, and not at every query
    assert ((ties.mean > 0) & (ties.mean < 1)).any()
    assert_close(ties.mean, ties.per_seed.mean(0))


def test_copying_ties_default_tolerance(scanned):
    model, result = scanned
    copying = result.scores["copying"]
    assert copying.params["tie_tolerance"] == TIE_TOLERANCE
    ties = result.copying_ties
    assert ties is not None and ties.per_seed.shape == copying.per_seed.shape
    for s, tokens in enumerate(copying.tokens):
        assert_close(ties.per_seed[s], ref.ref_copying_ties(model, tokens), rtol=0, atol=1e-12)
    # a larger tolerance never finds fewer ties (the seeds are the same)
    wide = induction_scan(model, scores=("copying",), n_seeds=N_SEEDS, length=short,
                          tie_tolerance=WIDE_TOLERANCE, progress=False)
    assert (wide.copying_ties.per_seed >= ties.per_seed).all()
    assert (wide.copying_ties.per_seed > ties.per_seed).any()
    assert_close(wide.scores["copying"].per_seed, copying.per_seed, rtol=0, atol=1e-6)


def _head_model(zero: tuple[int, int], sharpen: tuple[int, int]):
    """A tiny GQA Llama whose query weights of head ``zero`` are 0 (its attention is exactly
    uniform over the attendable keys: every query tied) and of head ``sharpen`` x 1000 (its
    attention one-hot: no query tied)."""
    from transformer_lens.model_bridge import TransformerBridge

    from mechicl.model import as_hooked_model
    from mechicl.testing import tiny_hf_model

    hf_model, tokenizer = tiny_hf_model("llama")
    d_head = hf_model.config.hidden_size // hf_model.config.num_attention_heads
    with torch.no_grad():
        for (layer, head), factor in ((zero, 0.0), (sharpen, 1000.0)):
            q = hf_model.model.layers[layer].self_attn.q_proj.weight
            q[head * d_head : (head + 1) * d_head] *= factor
    bridge = TransformerBridge.boot_transformers("mechicl-toy-llama", hf_model=hf_model,
                                                 tokenizer=tokenizer, device="cpu")
    return as_hooked_model(bridge, name="tiny-llama-ties")


@pytest.mark.parametrize("stream", ["embeddings", "residual"])
def test_copying_ties_known_heads(stream):
    zero, sharp = (1, 2), (0, 1)
    model = _head_model(zero, sharp)
    scan = induction_scan(model, scores=("copying",), n_seeds=N_SEEDS, length=short,
                          stream=stream, batch_tokens=64, progress=False)
    ties = scan.copying_ties.per_seed
    assert (ties[:, zero[0], zero[1]] == 1.0).all()
    assert (ties[:, sharp[0], sharp[1]] == 0.0).all()
    others = torch.ones_like(ties[0], dtype=torch.bool)
    others[zero] = others[sharp] = False
    assert (ties[:, others] < 1.0).all()  # only the zero-query head is uniform


def test_copying_ties_survive_save_load_and_narrowing(scanned, tmp_path):
    _, result = scanned
    ties = result.copying_ties
    back = ScanResult.load(result.save(tmp_path / "scan"))
    assert_close(back.copying_ties.per_seed, ties.per_seed, rtol=0, atol=0)
    assert back.copying_ties.params == ties.params
    assert back.scores["copying"].extras.keys() == {"argmax_tie_share"}
    one = mechicl.load_result(result.scores["copying"].save(tmp_path / "copying"))
    assert_close(copying_ties(one).per_seed, ties.per_seed, rtol=0, atol=0)
    # narrowing: a scan asked for fewer scores; the shares come with the copying score only
    narrow = back.select(["copying"])
    assert list(narrow.scores) == ["copying"] and narrow.params["scores"] == ["copying"]
    assert_close(narrow.copying_ties.per_seed, ties.per_seed, rtol=0, atol=0)
    assert back.select(["prefix_matching", "ov_eigen"]).copying_ties is None
    assert "copying_ties" not in result.scores and list(result.scores) == list(SCORES)
    with pytest.raises(ValueError, match="no near-tie shares"):
        copying_ties(result.scores["prefix_matching"])


def test_scan_outputs_report_ties(scanned):
    from mechicl.analyses import ANALYSES

    model, result = scanned
    spec = ANALYSES["scan"]
    job = spec.job(model.info()["name"], {"n_seeds": N_SEEDS})
    out = spec.outputs([(job, result)], job.options)
    (row,) = [r for r in out.rows if r["score"] == "copying"]
    ties = result.copying_ties.mean
    assert row["near-tied argmax share (max)"] == pytest.approx(float(ties.max()))
    assert row["near-tied argmax share (mean)"] == pytest.approx(float(ties.mean()))
    assert any(name.endswith("-copying_ties") for name in out.figures)
    assert all("near-tied argmax share (max)" not in r for r in out.rows if r is not row)


def test_bad_tie_tolerance_raises(tiny_llama):
    for bad in (-1e-4, float("nan")):
        with pytest.raises(ValueError, match="tie_tolerance"):
            induction_scan(tiny_llama, scores=["copying"], n_seeds=1, length=5,
                           tie_tolerance=bad)


def test_scans_leave_no_hooks_behind(scanned):
    """The copying pass stops early by raising inside its last hook: hooks must still go."""
    model, _ = scanned
    mechicl.analyses.induction.copying_scores(model, n_seeds=1, length=short, progress=False)
    leftover = {name: len(hp._forward_hooks) for name, hp in model.bridge.hook_dict.items()
                if len(hp._forward_hooks)}
    assert not leftover
    tokens = torch.randint(4, model.d_vocab, (1, 8))
    _, cache = model.run_with_cache(tokens, names_filter=model.hook_name("resid_pre", 1))
    assert not torch.equal(cache[model.hook_name("resid_pre", 1)],
                           model.run_with_cache(tokens, names_filter=model.hook_name(
                               "resid_pre", 0))[1][model.hook_name("resid_pre", 0)])


def test_ov_eigen_equals_full_vocabulary_reference(scanned):
    model, result = scanned
    assert_close(result.scores["ov_eigen"].mean, ref.ref_ov_eigen_copying(model),
                 rtol=0, atol=1e-5)


def test_ov_eigen_in_vocabulary_slices_equals_the_full_reference(tiny, monkeypatch):
    """The tiny vocabularies fit one slice: with 7-token slices (the last one short) W_U W_E
    is summed over many, and the scores still equal the full-vocabulary reference."""
    from mechicl.analyses import induction

    monkeypatch.setattr(induction, "OV_VOCAB_SLICE", 7)
    assert tiny.d_vocab > 2 * 7 and tiny.d_vocab % 7
    assert_close(ov_eigen_copying_scores(tiny).mean, ref.ref_ov_eigen_copying(tiny),
                 rtol=0, atol=1e-6)


def test_ov_eigen_on_the_default_model_equals_one_unsliced_product(smollm2):
    """SmolLM2's 49152 tokens take 6 slices; against W_U W_E formed in one float64 product and
    every head's W_O (W_U W_E) W_V one at a time (the full 49152^2 circuit does not fit)."""
    w = smollm2.folded_weights()
    W_UE = w.W_U.double() @ w.W_E.double()
    want = torch.zeros(smollm2.n_layers, smollm2.n_heads, dtype=torch.float64)
    for layer in range(smollm2.n_layers):
        for head in range(smollm2.n_heads):
            eig = torch.linalg.eigvals(w.W_O[layer, head].double() @ W_UE
                                       @ w.W_V[layer, head].double())
            want[layer, head] = eig.sum().real / eig.abs().sum()
    assert_close(ov_eigen_copying_scores(smollm2).mean, want, rtol=0, atol=1e-10)


def test_scan_is_deterministic_and_batching_invariant(scanned):
    model, result = scanned
    again = induction_scan(model, scores=("prefix_matching", "copying"), n_seeds=N_SEEDS,
                           length=short, batch_tokens=10_000, progress=False)
    for name in ("prefix_matching", "copying"):
        assert_close(again.scores[name].per_seed, result.scores[name].per_seed,
                     rtol=0, atol=1e-6)
        assert all(torch.equal(a, b) for a, b in
                   zip(again.scores[name].tokens, result.scores[name].tokens, strict=True))
    other = repeated_sequences(model, n_seeds=N_SEEDS, seed=1, length=short)
    assert not torch.equal(other[0], result.scores["prefix_matching"].tokens[0])


def test_user_tokens_reproduce_the_scan(scanned):
    model, result = scanned
    pm = result.scores["prefix_matching"]
    bases = [t[1 : 1 + short(s)] for s, t in enumerate(pm.tokens)]
    mine = mechicl.analyses.induction.prefix_matching_scores(model, tokens=bases, progress=False)
    assert_close(mine.per_seed, pm.per_seed, rtol=0, atol=1e-7)


def test_hand_built_induction_model_is_found(induction_toy):
    result = induction_scan(induction_toy, scores=("prefix_matching", "previous_token"),
                            n_seeds=4, length=short, progress=False)
    pm, prev = result.scores["prefix_matching"].mean, result.scores["previous_token"].mean
    il, ih = INDUCTION_MODEL_HEADS["induction"]
    pl, ph = INDUCTION_MODEL_HEADS["previous_token"]
    assert pm[il, ih] > 0.9 and prev[pl, ph] > 0.9
    others_pm = pm.clone()
    others_pm[il, ih] = 0
    others_prev = prev.clone()
    others_prev[pl, ph] = 0
    assert others_pm.max() < 0.3 and others_prev.max() < 0.3
    assert (result.loss_later_copies < 0.5 * result.loss_first_copy).all()


def test_bad_inputs_raise_clear_errors(tiny_llama):
    with pytest.raises(ValueError, match=r"unknown score names \['bogus'\]"):
        induction_scan(tiny_llama, scores=["bogus"])
    with pytest.raises(ValueError, match="model's context is"):
        induction_scan(tiny_llama, scores=["prefix_matching"], n_seeds=2,
                       length=lambda s: 130)
    with pytest.raises(ValueError, match="need 200 distinct tokens"):
        induction_scan(tiny_llama, scores=["copying"], n_seeds=1, length=lambda s: 50)
    # Under pytest the jaxtyping/beartype hook rejects the Literal first (a TypeError naming the
    # value and the allowed ones); without it mechicl raises the ValueError.
    with pytest.raises((ValueError, TypeError), match="sideways"):
        induction_scan(tiny_llama, indexing="sideways")
    with pytest.raises(ValueError, match="distinct tokens"):
        induction_scan(tiny_llama, scores=["prefix_matching"], tokens=[torch.tensor([5, 5])])


def test_results_roundtrip(scanned, tmp_path):
    _, result = scanned
    scores = result.scores["prefix_matching"]
    path = scores.save(tmp_path / "pm")
    back = HeadScores.load(path)
    assert_close(back.per_seed, scores.per_seed) and back.params == scores.params
    assert all(torch.equal(a, b) for a, b in zip(back.tokens, scores.tokens, strict=True))
    assert_close(back.extras["loss_per_position"], scores.extras["loss_per_position"],
                 equal_nan=True)
    df = scores.to_dataframe()
    assert len(df) == scores.mean.numel() and df["rank"].min() == 1
    top = df.sort_values("rank").iloc[0]
    assert (int(top["layer"]), int(top["head"])) == scores.top_heads(1)[0]
    assert not list(tmp_path.glob("**/*.tmp"))


def test_cli_parsing():
    assert parse_scores("prefix,ov,prefix_matching") == ["prefix_matching", "ov_eigen"]
    args = build_parser().parse_args(["scan", "--out", "x", "--seeds", "7"])
    # --seeds is n_seeds; no --scores given: the registry's default (every score)
    assert args.n_seeds == 7 and args.scores is None
    from mechicl.analyses import ANALYSES

    assert ANALYSES["scan"].resolve({})["scores"] == list(SCORES)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["scan", "--out", "x", "--scores", "nope"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["scan", "--out", "x", "--seeds", "0"])


# ---- the real default model ----------------------------------------------------------------

@pytest.mark.slow
def test_default_model_scores_equal_reference(smollm2):
    """Fast scores equal the slow references on the real model (2 short seeds)."""
    def length(s):
        return 12 + 4 * s

    result = induction_scan(smollm2, scores=("prefix_matching", "previous_token"),
                            n_seeds=2, length=length, progress=False)
    pm, prev = result.scores["prefix_matching"], result.scores["previous_token"]
    for s, tokens in enumerate(pm.tokens):
        assert_close(pm.per_seed[s], ref.ref_prefix_matching(smollm2, tokens, length(s)),
                     rtol=0, atol=1e-5)
        assert_close(prev.per_seed[s], ref.ref_previous_token(smollm2, tokens), rtol=0, atol=1e-5)
    # The full-vocabulary float64 reference costs ~5 s per token here: one short sequence.
    base = pm.tokens[0][1:9]
    cp = mechicl.analyses.induction.copying_scores(smollm2, tokens=[base], progress=False)
    assert_close(cp.per_seed[0], ref.ref_copying(smollm2, cp.tokens[0]), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_default_model_copying_ties_equal_reference(smollm2):
    """Near-tie shares on the real model equal the position loop (one sequence of 61 tokens),
    at the default tolerance and at a wide one where many queries tie."""
    base = repeated_sequences(smollm2, n_seeds=1, length=lambda s: 60)[0][1:61]
    for tolerance in (TIE_TOLERANCE, 1e-2):
        scan = induction_scan(smollm2, scores=("copying",), tokens=[base],
                              tie_tolerance=tolerance, progress=False)
        ties, tokens = scan.copying_ties, scan.scores["copying"].tokens[0]
        want = ref.ref_copying_ties(smollm2, tokens, tolerance=tolerance)
        assert_close(ties.per_seed[0], want, rtol=0, atol=1e-12)
    assert 0 < ties.mean.mean() < 1


@pytest.mark.slow
def test_default_model_ablating_top_prefix_heads_hurts_induction(smollm2):
    """Zero-ablating the top-5 prefix-matching heads raises the loss on the repeated copies far
    more than ablating 5 random heads (mean over 5 random draws). Numbers: docs/benchmarks.md."""
    pm = mechicl.analyses.induction.prefix_matching_scores(smollm2, n_seeds=8, progress=False)
    # Fresh sequences (another seed), all with L = 25 so that they stack into one batch.
    tokens = torch.stack([repeated_sequences(smollm2, n_seeds=1, seed=100 + i)[0]
                          for i in range(4)])
    L = 25

    def later_loss(heads: list[tuple[int, int]]) -> float:
        by_layer: dict[int, list[int]] = {}
        for layer, head in heads:
            by_layer.setdefault(layer, []).append(head)

        def ablate(z, hook, heads):
            z[:, :, heads] = 0.0  # hook_z is [batch, pos, head, d_head]
            return z

        hooks = [(smollm2.hook_name("z", layer), functools.partial(ablate, heads=hs))
                 for layer, hs in by_layer.items()]
        with torch.no_grad():
            loss = smollm2.run_with_hooks(tokens, fwd_hooks=hooks, return_type="loss",
                                          loss_per_token=True)  # [batch, pos-1]
        return loss[:, L:].mean().item()

    base = later_loss([])
    top = later_loss(pm.top_heads(5))
    gen = torch.Generator().manual_seed(0)
    n = smollm2.n_layers * smollm2.n_heads
    rand = [later_loss([(int(i) // smollm2.n_heads, int(i) % smollm2.n_heads)
                        for i in torch.randperm(n, generator=gen)[:5]]) for _ in range(5)]
    rand_mean = sum(rand) / len(rand)
    record = {"base": base, "top5": top, "random5_mean": rand_mean, "random5": rand,
              "top_heads": pm.top_heads(5)}
    print(json.dumps(record))
    assert top - base > 3 * max(rand_mean - base, 0.05), record


def test_prefix_matching_equals_transformerlens_detect_head(tiny_gpt2):
    """On the same repeated sequence TL's detect_head("induction_head") ("mul", no exclusions)
    is sum(A * P) / T with P the induction targets: mechicl's exact score x 3L / (4L + 1)."""
    from transformer_lens.head_detector import detect_head

    L = 7
    words = [f"w{i}" for i in (11, 3, 40, 27, 8, 61, 19)]
    text = " ".join(words * 4)
    tokens = tiny_gpt2.to_tokens(text)[0]
    base = tokens[1 : L + 1]
    assert torch.equal(tokens[1:], base.repeat(4))
    ours = mechicl.analyses.induction.prefix_matching_scores(tiny_gpt2, tokens=[base], progress=False).mean
    tl = detect_head(tiny_gpt2.bridge, text, "induction_head").double()
    assert_close(tl * (4 * L + 1) / (3 * L), ours, rtol=0, atol=1e-5)
