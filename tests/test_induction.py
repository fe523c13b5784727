"""Induction-head scans: fast vectorised scores equal slow per-head, per-position references."""

import functools
import json

import pytest
import reference_scores as ref  # tests/reference_scores.py: slow, plain loops
import torch
from torch.testing import assert_close

import mechicl
from mechicl.analyses.induction import SCORES, induction_scan, parse_scores, repeated_sequences
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
