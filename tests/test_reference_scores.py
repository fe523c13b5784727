"""Sanity tests of the slow reference scores in tests/reference_scores.py.

They check the references themselves (hand-computed values on synthetic attention patterns,
the hand-built induction model's known heads, identities such as eig(AB) = eig(BA)), so that the
fast scores in mechicl.analyses.induction can then be trusted when they agree with them.
"""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from reference_scores import (
    _copying_layer_scores,
    _last_argmax,
    _layer_pattern_and_v,
    _raised_ratio,
    ref_copying,
    ref_duplicate_token,
    ref_ov_eigen_copying,
    ref_per_position_loss,
    ref_prefix_matching,
    ref_previous_token,
)

from mechicl.testing import FIRST_WORD_ID, INDUCTION_MODEL_HEADS

L = 6
N_COPIES = 4


def random_words(model, n: int, seed: int) -> torch.Tensor:
    """``n`` distinct word ids (never special tokens), reproducibly."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(model.d_vocab - FIRST_WORD_ID, generator=generator)[:n] + FIRST_WORD_ID


def repeated_sequence(model, L: int, n_copies: int, seed: int = 0) -> torch.Tensor:
    """``[BOS, x_1..x_L] + (n_copies - 1)`` more copies of ``x_1..x_L``: ``[n_copies * L + 1]``."""
    words = random_words(model, L, seed)
    return torch.cat([torch.tensor([model.bos_token_id]), words.repeat(n_copies)])


def plain_sequence(model, n: int, seed: int = 0) -> torch.Tensor:
    """``[BOS, t_1..t_n]`` with distinct words: ``[n + 1]``."""
    return torch.cat([torch.tensor([model.bos_token_id]), random_words(model, n, seed)])


class PatternModel:
    """Stands in for a HookedModel with 1 layer, 1 head and a fixed attention pattern."""

    n_layers = 1
    n_heads = 1
    device = torch.device("cpu")

    def __init__(self, pattern: torch.Tensor) -> None:
        self.pattern = pattern  # [query_pos, key_pos]

    def run_with_cache(self, tokens, names_filter):
        name = "blocks.0.attn.hook_pattern"
        assert names_filter(name)
        assert tokens.shape == (1, self.pattern.shape[0])
        return None, {name: self.pattern[None, None]}


def uniform_causal(T: int) -> torch.Tensor:
    """pattern[q, k] = 1 / (q + 1) for k <= q."""
    q = torch.arange(T, dtype=torch.float64)[:, None]
    return torch.tril(torch.ones(T, T, dtype=torch.float64)) / (q + 1)


def one_hot_pattern(T: int, target) -> torch.Tensor:
    """pattern[q, target(q)] = 1 (target(q) in 0..q), else 0."""
    pattern = torch.zeros(T, T, dtype=torch.float64)
    for q in range(T):
        pattern[q, target(q)] = 1.0
    return pattern


# --------------------------------------------------------------------------------------------
# Attention-pattern scores on synthetic patterns (hand-computed values)
# --------------------------------------------------------------------------------------------


def test_uniform_pattern_hand_computed() -> None:
    T = N_COPIES * L + 1
    tokens = torch.cat([torch.tensor([0]), torch.arange(10, 10 + L).repeat(N_COPIES)])
    model = PatternModel(uniform_causal(T))
    queries = [(c, r) for c in range(1, N_COPIES) for r in range(1, L + 1)]
    # Each query q = cL + r has c targets (prefix and duplicate alike), each with mass 1/(q+1).
    expected = sum(c / (c * L + r + 1) for c, r in queries) / len(queries)
    # The reference loop also adds key 1 for the queries j = 2L, 3L, 4L.
    extra = sum(1 / (j + 1) for j in (2 * L, 3 * L, 4 * L)) / len(queries)
    exact = ref_prefix_matching(model, tokens, L, N_COPIES, indexing="exact")
    reference = ref_prefix_matching(model, tokens, L, N_COPIES, indexing="reference")
    assert exact.dtype == torch.float64 and exact.shape == (1, 1)
    assert exact.item() == pytest.approx(expected, abs=1e-12)
    assert reference.item() == pytest.approx(expected + extra, abs=1e-12)
    assert ref_duplicate_token(model, tokens, L, N_COPIES).item() == pytest.approx(
        expected, abs=1e-12
    )
    previous = sum(1 / (q + 1) for q in range(1, T)) / (T - 1)
    assert ref_previous_token(model, tokens).item() == pytest.approx(previous, abs=1e-12)


def test_ideal_heads_score_one_on_their_own_score_only() -> None:
    T = N_COPIES * L + 1
    tokens = torch.cat([torch.tensor([0]), torch.arange(10, 10 + L).repeat(N_COPIES)])

    def scores(pattern):
        model = PatternModel(pattern)
        return (
            ref_prefix_matching(model, tokens, L, N_COPIES).item(),
            ref_prefix_matching(model, tokens, L, N_COPIES, indexing="reference").item(),
            ref_duplicate_token(model, tokens, L, N_COPIES).item(),
            ref_previous_token(model, tokens).item(),
        )

    # Queries of the first copy attend to themselves (no score counts that).
    induction = one_hot_pattern(T, lambda q: q - L + 1 if q > L else q)
    duplicate = one_hot_pattern(T, lambda q: q - L if q > L else q)
    previous = one_hot_pattern(T, lambda q: max(q - 1, 0))
    assert scores(induction) == pytest.approx((1.0, 1.0, 0.0, 0.0))
    assert scores(duplicate) == pytest.approx((0.0, 0.0, 1.0, 0.0))
    # Previous-token score averages q = 1..T-1; q = 0 -> key 0 is not counted.
    assert scores(previous) == pytest.approx((0.0, 0.0, 0.0, 1.0))
    # All mass on key 1: only the reference loop sees it, on 3 of the 3L queries.
    on_key_one = one_hot_pattern(T, lambda q: min(q, 1))
    assert scores(on_key_one)[:2] == pytest.approx((0.0, 3 / (3 * L)))


def test_exact_sums_over_all_earlier_copies() -> None:
    # Spread each query's attention evenly over ALL its targets: the summed score is 1.
    T = N_COPIES * L + 1
    tokens = torch.cat([torch.tensor([0]), torch.arange(10, 10 + L).repeat(N_COPIES)])
    pattern = torch.zeros(T, T, dtype=torch.float64)
    pattern[: L + 1, 0] = 1.0
    for c in range(1, N_COPIES):
        for r in range(1, L + 1):
            for k in range(c):
                pattern[c * L + r, k * L + r + 1] = 1.0 / c
    assert ref_prefix_matching(PatternModel(pattern), tokens, L, N_COPIES).item() == (
        pytest.approx(1.0, abs=1e-12)
    )


def test_repeated_sequence_is_validated() -> None:
    T = N_COPIES * L + 1
    model = PatternModel(uniform_causal(T))
    good = torch.cat([torch.tensor([0]), torch.arange(10, 10 + L).repeat(N_COPIES)])
    with pytest.raises(ValueError, match="tokens"):
        ref_prefix_matching(model, good[:-1], L, N_COPIES)
    broken = good.clone()
    broken[2 * L + 3] = 99
    with pytest.raises(ValueError, match="does not repeat"):
        ref_duplicate_token(model, broken, L, N_COPIES)
    twice = torch.cat([torch.tensor([0]), torch.tensor([10, 10, 11, 12, 13, 14]).repeat(N_COPIES)])
    with pytest.raises(ValueError, match="distinct"):
        ref_prefix_matching(model, twice, L, N_COPIES)
    with pytest.raises(ValueError, match="indexing"):
        ref_prefix_matching(model, good, L, N_COPIES, indexing="bansal")


# --------------------------------------------------------------------------------------------
# Attention-pattern scores on the hand-built induction model
# --------------------------------------------------------------------------------------------


def test_induction_model_heads(induction_toy) -> None:
    tokens = repeated_sequence(induction_toy, 12, N_COPIES, seed=1)
    prefix = ref_prefix_matching(induction_toy, tokens, 12, N_COPIES)
    assert prefix.shape == (induction_toy.n_layers, induction_toy.n_heads)
    induction = INDUCTION_MODEL_HEADS["induction"]
    previous_token = INDUCTION_MODEL_HEADS["previous_token"]
    assert prefix[induction] > 0.9
    others = torch.ones_like(prefix, dtype=torch.bool)
    others[induction] = False
    assert (prefix[others] < 0.5).all(), prefix
    previous = ref_previous_token(induction_toy, tokens)
    assert previous[previous_token] > 0.9
    assert previous[induction] < 0.1
    duplicate = ref_duplicate_token(induction_toy, tokens, 12, N_COPIES)
    assert duplicate[induction] < 0.1
    assert duplicate[previous_token] < 0.1


def test_reference_indexing_adds_key_one_mass_of_three_queries(induction_toy) -> None:
    tokens = repeated_sequence(induction_toy, L, N_COPIES, seed=2)
    exact = ref_prefix_matching(induction_toy, tokens, L, N_COPIES, indexing="exact")
    reference = ref_prefix_matching(induction_toy, tokens, L, N_COPIES, indexing="reference")
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(induction_toy.n_layers)]
    with torch.no_grad():
        _, cache = induction_toy.run_with_cache(tokens[None], names_filter=lambda n: n in names)
    for layer in range(induction_toy.n_layers):
        pattern = cache[names[layer]][0].to(torch.float64)  # [head, query_pos, key_pos]
        key_one_mass = sum(pattern[:, c * L, 1] for c in range(2, N_COPIES + 1))  # [head]
        expected = exact[layer] + key_one_mass / ((N_COPIES - 1) * L)
        torch.testing.assert_close(reference[layer], expected, rtol=0, atol=1e-12)
    assert (reference >= exact).all()
    assert (reference - exact).max() <= 3 / ((N_COPIES - 1) * L) + 1e-12


# --------------------------------------------------------------------------------------------
# Copying score
# --------------------------------------------------------------------------------------------


def test_raised_ratio_and_argmax_by_hand() -> None:
    assert _raised_ratio([0.1, 0.5, 0.3], 1) == pytest.approx(1.0)  # mean 0.3: r = (0, .2, 0)
    assert _raised_ratio([0.1, 0.5, 0.3], 2) == 0.0
    assert _raised_ratio([0.1, 0.4, 0.4, 0.1], 2) == pytest.approx(0.5)
    assert _raised_ratio([0.25] * 4, 0) == 0.0  # all raised values 0
    assert _last_argmax([0.2, 0.4, 0.4, 0.1]) == 2
    assert _last_argmax([0.9, 0.05, 0.05]) == 0


@pytest.mark.parametrize("stream", ["embeddings", "residual"])
def test_copying_in_unit_interval(tiny, stream) -> None:
    tokens = plain_sequence(tiny, 16, seed=3)
    scores = ref_copying(tiny, tokens, stream=stream)
    assert scores.dtype == torch.float64
    assert scores.shape == (tiny.n_layers, tiny.n_heads)
    assert torch.isfinite(scores).all()
    assert ((scores >= 0) & (scores <= 1)).all(), scores


def test_copying_streams_agree_on_layer_zero_only(tiny) -> None:
    tokens = plain_sequence(tiny, 16, seed=4)
    embeddings = ref_copying(tiny, tokens, stream="embeddings")
    residual = ref_copying(tiny, tokens, stream="residual")
    torch.testing.assert_close(embeddings[0], residual[0], rtol=0, atol=1e-12)
    # The replacement must take effect at later layers.
    _, v_embed = _layer_pattern_and_v(tiny, tokens, 1, "embeddings")
    _, v_resid = _layer_pattern_and_v(tiny, tokens, 1, "residual")
    assert not torch.allclose(v_embed, v_resid)


def test_copying_formula_by_hand_gpt2(tiny_gpt2) -> None:
    """Layer 0 (embedding stream = residual stream), written out with tensor ops per position."""
    model, layer = tiny_gpt2, 0
    assert model.b_O[layer].abs().max() > 0  # the output bias must be included
    tokens = plain_sequence(model, 16, seed=9)
    names = (f"blocks.{layer}.attn.hook_pattern", f"blocks.{layer}.attn.hook_v")
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens[None], names_filter=lambda n: n in names)
    pattern = cache[names[0]][0].to(torch.float64)  # [head, query_pos, key_pos]
    v = cache[names[1]][0].to(torch.float64)  # [pos, head, d_head] (MHA)
    W_O, b_O = model.W_O[layer].to(torch.float64), model.b_O[layer].to(torch.float64)
    W_U, b_U = model.W_U.to(torch.float64), model.b_U.to(torch.float64)
    expected = torch.zeros(model.n_heads, dtype=torch.float64)
    for head in range(model.n_heads):
        per_position = []
        for j in range(1, len(tokens)):
            probs = torch.softmax((v[j, head] @ W_O[head] + b_O) @ W_U + b_U, dim=-1)
            row = pattern[head, j, : j + 1]
            a = j - int(row.flip(0).argmax())  # last maximum
            raised = torch.relu(probs[tokens[: j + 1]] - probs[tokens[: j + 1]].mean())
            per_position.append(raised[a] / raised.sum() if raised.sum() > 0 else 0.0)
        expected[head] = sum(per_position) / len(per_position)
    for stream in ("embeddings", "residual"):
        got = ref_copying(model, tokens, stream=stream)[layer]
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)


def test_copying_embedding_stream_by_hand_gpt2(tiny_gpt2) -> None:
    """Recompute layer 1's pattern and values from the embeddings with the HookedModel weights."""
    model, layer = tiny_gpt2, 1
    tokens = plain_sequence(model, 16, seed=5)
    T = len(tokens)
    with torch.no_grad():
        _, cache = model.run_with_cache(
            tokens[None], names_filter=lambda n: n == "blocks.0.hook_resid_pre"
        )
        embeddings = cache["blocks.0.hook_resid_pre"][0]  # [pos, d_model]
        # Learned positions are part of the embedding stream.
        torch.testing.assert_close(
            embeddings, model.W_E[tokens] + model.bridge.W_pos[:T], rtol=0, atol=1e-6
        )
        x = model.bridge.blocks[layer].ln1(embeddings[None])[0].to(torch.float64)
    W = {name: getattr(model, name)[layer].to(torch.float64) for name in ("W_Q", "W_K", "W_V")}
    b = {name: getattr(model, name)[layer].to(torch.float64) for name in ("b_Q", "b_K", "b_V")}
    pattern = torch.zeros(model.n_heads, T, T, dtype=torch.float64)
    v_per_head = torch.zeros(T, model.n_heads, model.d_head, dtype=torch.float64)
    for head in range(model.n_heads):
        q = x @ W["W_Q"][head] + b["b_Q"][head]
        k = x @ W["W_K"][head] + b["b_K"][head]
        v_per_head[:, head] = x @ W["W_V"][head] + b["b_V"][head]
        scores = q @ k.T / math.sqrt(model.d_head)
        scores = scores.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool)), -math.inf)
        pattern[head] = torch.softmax(scores, dim=-1)
    hooked_pattern, hooked_v = _layer_pattern_and_v(model, tokens, layer, "embeddings")
    torch.testing.assert_close(hooked_pattern.to(torch.float64), pattern, rtol=0, atol=1e-5)
    torch.testing.assert_close(hooked_v.to(torch.float64), v_per_head, rtol=0, atol=1e-5)
    expected = _copying_layer_scores(model, tokens, layer, pattern, v_per_head)
    got = ref_copying(model, tokens, stream="embeddings")[layer]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_copying_gqa_value_heads_by_hand(tiny_llama) -> None:
    """GQA: query head h must use KV head h // group (checked via the per-query-head W_V)."""
    model, layer = tiny_llama, 1
    assert model.n_kv_heads < model.n_heads
    tokens = plain_sequence(model, 16, seed=6)
    names = (f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.attn.hook_pattern")
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens[None], names_filter=lambda n: n in names)
        x = model.bridge.blocks[layer].ln1(cache[names[0]])[0].to(torch.float64)
    pattern = cache[names[1]][0]
    v_per_head = torch.stack(
        [
            x @ model.W_V[layer, head].to(torch.float64) + model.b_V[layer, head].to(torch.float64)
            for head in range(model.n_heads)
        ],
        dim=1,
    )  # [pos, head, d_head]
    expected = _copying_layer_scores(model, tokens, layer, pattern, v_per_head)
    got = ref_copying(model, tokens, stream="residual")[layer]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# OV eigenvalue copying score
# --------------------------------------------------------------------------------------------


def test_ov_eigen_copying_range_and_small_product(tiny) -> None:
    scores = ref_ov_eigen_copying(tiny)
    assert scores.dtype == torch.float64
    assert scores.shape == (tiny.n_layers, tiny.n_heads)
    assert ((scores >= -1 - 1e-12) & (scores <= 1 + 1e-12)).all(), scores
    # Nonzero eigenvalues of (W_E W_V)(W_O W_U) equal those of (W_O W_U)(W_E W_V) [d_head^2].
    weights = tiny.folded_weights()
    W_E, W_U = weights.W_E.to(torch.float64), weights.W_U.to(torch.float64)
    for layer in range(tiny.n_layers):
        for head in range(tiny.n_heads):
            W_V = weights.W_V[layer, head].to(torch.float64)
            W_O = weights.W_O[layer, head].to(torch.float64)
            eigenvalues = torch.linalg.eigvals(W_O @ W_U @ W_E @ W_V)
            small = eigenvalues.sum().real / eigenvalues.abs().sum()
            assert scores[layer, head].item() == pytest.approx(small.item(), abs=1e-6)


def test_ov_eigen_copying_induction_model(induction_toy) -> None:
    scores = ref_ov_eigen_copying(induction_toy)
    induction = INDUCTION_MODEL_HEADS["induction"]
    assert scores[induction] > 0.9  # copies every word into its own logit
    others = torch.ones_like(scores, dtype=torch.bool)
    others[induction] = False
    # The other heads write nothing W_U reads: a zero matrix scores 0 by convention.
    assert (scores[others] == 0).all(), scores


# --------------------------------------------------------------------------------------------
# Per-position loss
# --------------------------------------------------------------------------------------------


def test_per_position_loss_matches_cross_entropy(tiny) -> None:
    tokens = plain_sequence(tiny, 20, seed=7)
    losses = ref_per_position_loss(tiny, tokens)
    assert losses.dtype == torch.float64 and losses.shape == (len(tokens) - 1,)
    with torch.no_grad():
        logits = tiny(tokens[None])[0]
    expected = torch.nn.functional.cross_entropy(logits[:-1], tokens[1:], reduction="none")
    torch.testing.assert_close(losses, expected.to(torch.float64), rtol=0, atol=1e-5)


def test_per_position_loss_induction_model(induction_toy) -> None:
    tokens = repeated_sequence(induction_toy, 10, 2, seed=8)
    losses = ref_per_position_loss(induction_toy, tokens)
    # Positions 0..L predict from no earlier match: uniform logits, loss log(d_vocab).
    first = losses[: 10 + 1]
    assert torch.allclose(first, torch.full_like(first, math.log(induction_toy.d_vocab)), atol=0.05)
    # Later positions are predicted by the induction head.
    assert (losses[10 + 1 :] < 0.05).all(), losses
