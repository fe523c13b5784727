"""Tests for mechicl.testing: toy tokenizer, tiny random bridges, hand-built induction model."""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from mechicl.testing import (
    FIRST_WORD_ID,
    INDUCTION_MODEL_HEADS,
    SPECIAL_TOKEN_IDS,
    TINY_ARCHS,
    induction_model,
    tiny_model,
    toy_tokenizer,
)

N_WORDS = 96
D_VOCAB = N_WORDS + len(SPECIAL_TOKEN_IDS)
SEQ_LEN = 20
BOS = SPECIAL_TOKEN_IDS["<bos>"]


def is_pattern(name: str) -> bool:
    return name.endswith("hook_pattern")


def repeated_tokens(
    seq_len: int, *, batch: int = 8, repeats: int = 2, seed: int = 0
) -> torch.Tensor:
    """BOS followed by `repeats` copies of a random sequence of distinct word tokens.

    Returns [batch, 1 + repeats * seq_len]; copy r (0-based) occupies positions
    1 + r * seq_len .. (r + 1) * seq_len.
    """
    generator = torch.Generator().manual_seed(seed)
    words = torch.stack(
        [
            torch.randperm(N_WORDS, generator=generator)[:seq_len] + FIRST_WORD_ID
            for _ in range(batch)
        ]
    )
    bos = torch.full((batch, 1), BOS, dtype=torch.long)
    return torch.cat([bos, words.repeat(1, repeats)], dim=1)


def next_token_nll(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[batch, pos - 1]: -log p(tokens[:, i + 1] | tokens[:, : i + 1])."""
    log_probs = logits[:, :-1].log_softmax(dim=-1)
    return -log_probs.gather(-1, tokens[:, 1:, None])[..., 0]


def previous_token_mass(pattern: torch.Tensor) -> torch.Tensor:
    """[batch, head, query_pos, key_pos] -> [batch, head, pos - 1]: mass on key i - 1 at query i."""
    query = torch.arange(1, pattern.shape[-1])
    return pattern[:, :, query, query - 1]


def induction_mass(pattern: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Mass at second-copy queries on the key after the earlier occurrence of the query token.

    Query i in seq_len + 1 .. 2 seq_len repeats the token at i - seq_len, so the
    induction target is key i - seq_len + 1. Returns [batch, head, seq_len].
    """
    query = torch.arange(seq_len + 1, 2 * seq_len + 1)
    return pattern[:, :, query, query - seq_len + 1]


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tokenizer():
    return toy_tokenizer(N_WORDS)


@pytest.fixture(scope="session", params=TINY_ARCHS)
def tiny(request):
    return request.param, tiny_model(request.param)


@pytest.fixture(scope="session")
def induction():
    return induction_model(N_WORDS)


@pytest.fixture(scope="session")
def repeated():
    return repeated_tokens(SEQ_LEN)


@pytest.fixture(scope="session")
def induction_run(induction, repeated):
    logits, cache = induction.run_with_cache(repeated, names_filter=is_pattern)
    return logits, cache


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def test_tokenizer_vocab_and_special_ids(tokenizer):
    assert len(tokenizer) == D_VOCAB
    assert tokenizer.bos_token_id == SPECIAL_TOKEN_IDS["<bos>"] == 0
    assert tokenizer.eos_token_id == SPECIAL_TOKEN_IDS["<eos>"] == 1
    assert tokenizer.pad_token_id == SPECIAL_TOKEN_IDS["<pad>"] == 2
    assert tokenizer.unk_token_id == SPECIAL_TOKEN_IDS["<unk>"] == 3
    assert tokenizer.convert_tokens_to_ids(["w0", f"w{N_WORDS - 1}"]) == [
        FIRST_WORD_ID,
        FIRST_WORD_ID + N_WORDS - 1,
    ]
    assert tokenizer.init_kwargs["name_or_path"] == "mechicl-toy"


def test_tokenizer_round_trip(tokenizer):
    ids = tokenizer("w3 w5  w95")["input_ids"]
    assert ids == [BOS, FIRST_WORD_ID + 3, FIRST_WORD_ID + 5, FIRST_WORD_ID + 95]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "w3 w5 w95"
    assert tokenizer.convert_ids_to_tokens(ids) == ["<bos>", "w3", "w5", "w95"]
    # Unknown words map to <unk>; n_words controls the vocabulary.
    assert tokenizer("w96 hello")["input_ids"][1:] == [SPECIAL_TOKEN_IDS["<unk>"]] * 2
    assert len(toy_tokenizer(10)) == 14


def test_tokenizer_rejects_empty_vocab():
    with pytest.raises(ValueError, match="n_words"):
        toy_tokenizer(0)


@pytest.mark.parametrize("builder", ["tiny", "induction"])
def test_bridge_prepends_bos_exactly_once(builder, tiny, induction):
    bridge = tiny[1] if builder == "tiny" else induction
    expected = [BOS, FIRST_WORD_ID + 1, FIRST_WORD_ID + 2]
    assert bridge.to_tokens("w1 w2").tolist() == [expected]
    assert bridge.to_tokens("w1 w2", prepend_bos=False).tolist() == [expected[1:]]
    assert bridge.to_str_tokens("w1 w2") == ["<bos>", "w1", "w2"]
    assert bridge.cfg.tokenizer_prepends_bos
    batch = bridge.to_tokens(["w7 w8 w9", "w10 w11 w12"])
    assert batch.shape == (2, 4)
    assert (batch == BOS).sum(dim=1).tolist() == [1, 1]


# ---------------------------------------------------------------------------------------------
# Tiny random models
# ---------------------------------------------------------------------------------------------

EXPECTED_CFG = {
    "gpt2": {"normalization_type": "LN", "positional_embedding_type": "standard", "n_kv": 4},
    "llama": {"normalization_type": "RMS", "positional_embedding_type": "rotary", "n_kv": 2},
    "llama-mha": {"normalization_type": "RMS", "positional_embedding_type": "rotary", "n_kv": 4},
}


def test_tiny_config_shapes(tiny):
    arch, bridge = tiny
    cfg = bridge.cfg
    expected = EXPECTED_CFG[arch]
    assert (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head) == (2, 4, 64, 16)
    assert cfg.d_vocab == D_VOCAB
    assert cfg.n_ctx >= 512
    assert cfg.normalization_type == expected["normalization_type"]
    assert cfg.positional_embedding_type == expected["positional_embedding_type"]
    assert (cfg.n_key_value_heads or cfg.n_heads) == expected["n_kv"]
    assert cfg.model_name == f"mechicl-toy-{arch}"
    assert bridge.W_E.dtype == torch.float32


def test_tiny_forward_finite_and_hook_shapes(tiny):
    arch, bridge = tiny
    tokens = repeated_tokens(SEQ_LEN, batch=3)
    logits, cache = bridge.run_with_cache(
        tokens, names_filter=lambda n: n.endswith(("hook_pattern", "hook_k", "hook_q"))
    )
    n_pos = tokens.shape[1]
    assert logits.shape == (3, n_pos, D_VOCAB)
    assert torch.isfinite(logits).all()
    n_kv = EXPECTED_CFG[arch]["n_kv"]
    assert cache["blocks.1.attn.hook_pattern"].shape == (3, 4, n_pos, n_pos)
    assert cache["blocks.1.attn.hook_q"].shape == (3, n_pos, 4, 16)
    assert cache["blocks.1.attn.hook_k"].shape == (3, n_pos, n_kv, 16)


def test_tiny_long_context(tiny):
    _, bridge = tiny
    tokens = repeated_tokens(96, batch=1, repeats=4)  # 4 L + 1 = 385 positions
    logits = bridge(tokens)
    assert logits.shape == (1, 385, D_VOCAB)
    assert torch.isfinite(logits).all()


def test_tiny_gpt2_biases_and_norms_are_not_default():
    bridge = tiny_model("gpt2")
    params = dict(bridge.original_model.named_parameters())
    biases = {n: p for n, p in params.items() if n.endswith("bias")}
    assert len(biases) > 0
    assert all(p.abs().max() > 0 for p in biases.values()), "some bias is still zero"
    ln_gains = [p for n, p in params.items() if "ln" in n and n.endswith("weight")]
    assert ln_gains and all(not torch.allclose(p, torch.ones_like(p)) for p in ln_gains)


def test_tiny_seeding_is_deterministic_and_isolated():
    tokens = repeated_tokens(5, batch=1)
    rng_before = torch.get_rng_state()
    first = tiny_model("llama", seed=3)(tokens)
    assert torch.equal(torch.get_rng_state(), rng_before), "tiny_model changed the global RNG"
    again = tiny_model("llama", seed=3)(tokens)
    other = tiny_model("llama", seed=4)(tokens)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, other)


def test_tiny_unknown_arch_lists_allowed():
    with pytest.raises(ValueError, match="gpt2.*llama.*llama-mha"):
        tiny_model("mamba")


def test_random_model_heads_are_not_induction_heads(tiny, repeated):
    """Negative control: the induction-mass measure is not satisfied by chance."""
    _, bridge = tiny
    _, cache = bridge.run_with_cache(repeated, names_filter=is_pattern)
    for layer in range(2):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        assert induction_mass(pattern, SEQ_LEN).mean(dim=(0, 2)).max() < 0.5


# ---------------------------------------------------------------------------------------------
# Hand-built induction model
# ---------------------------------------------------------------------------------------------


def test_induction_model_config(induction):
    cfg = induction.cfg
    assert (cfg.n_layers, cfg.n_heads) == (2, 4)
    assert cfg.attn_only
    assert cfg.normalization_type is None
    assert cfg.positional_embedding_type == "standard"
    assert cfg.d_vocab == D_VOCAB
    assert cfg.n_ctx >= 512
    assert INDUCTION_MODEL_HEADS["previous_token"][0] == 0
    assert INDUCTION_MODEL_HEADS["induction"][0] == 1
    assert all(head != 0 for _, head in INDUCTION_MODEL_HEADS.values())


def test_induction_model_predicts_second_copy(induction_run, repeated):
    logits, _ = induction_run
    nll = next_token_nll(logits, repeated)  # nll[:, i] is the prediction made at position i
    # Positions 0 .. L-1 predict the first copy; L+1 .. 2L-1 predict the second copy
    # from inside it (position L predicts the first token of the copy: unpredictable).
    first = nll[:, :SEQ_LEN]
    second = nll[:, SEQ_LEN + 1 :]
    assert second.shape[1] == SEQ_LEN - 1
    assert first.mean() > 0.9 * math.log(D_VOCAB)
    assert second.mean() < 0.05
    assert second.mean() < first.mean() / 50
    predictions = logits[:, SEQ_LEN + 1 : 2 * SEQ_LEN].argmax(dim=-1)
    assert (predictions == repeated[:, SEQ_LEN + 2 :]).all()


def test_previous_token_head_pattern(induction_run):
    _, cache = induction_run
    layer, head = INDUCTION_MODEL_HEADS["previous_token"]
    mass = previous_token_mass(cache[f"blocks.{layer}.attn.hook_pattern"])  # [batch, head, pos-1]
    assert mass[:, head].min() > 0.9
    others = [h for h in range(4) if h != head]
    # Query i >= 5 has at least 6 keys; a head that is not a previous-token head spreads out.
    assert mass[:, others, 4:].mean(dim=(0, 2)).max() < 0.3
    # The layer-1 heads are not previous-token heads either.
    mass_1 = previous_token_mass(cache[f"blocks.{1 - layer}.attn.hook_pattern"])
    assert mass_1[:, :, 4:].mean(dim=(0, 2)).max() < 0.3


def test_induction_head_pattern(induction_run):
    _, cache = induction_run
    layer, head = INDUCTION_MODEL_HEADS["induction"]
    mass = induction_mass(cache[f"blocks.{layer}.attn.hook_pattern"], SEQ_LEN)
    assert mass[:, head].min() > 0.9
    others = [h for h in range(4) if h != head]
    assert mass[:, others].mean(dim=(0, 2)).max() < 0.2
    assert mass[:, others].max() < 0.6
    mass_0 = induction_mass(cache[f"blocks.{1 - layer}.attn.hook_pattern"], SEQ_LEN)
    assert mass_0.mean(dim=(0, 2)).max() < 0.2


def test_induction_head_sinks_to_bos_without_match(induction_run):
    _, cache = induction_run
    layer, head = INDUCTION_MODEL_HEADS["induction"]
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
    # First-copy queries have no earlier occurrence of their token.
    assert pattern[:, head, 1 : SEQ_LEN + 1, 0].min() > 0.9


def _ablate_heads(heads: list[tuple[int, int]]):
    def hook_for(layer: int):
        def hook(z, hook):
            z = z.clone()
            for lay, head in heads:
                if lay == layer:
                    z[:, :, head] = 0.0
            return z

        return hook

    return [(f"blocks.{layer}.attn.hook_z", hook_for(layer)) for layer in range(2)]


def test_only_special_heads_matter(induction, induction_run, repeated):
    clean_logits, _ = induction_run
    special = list(INDUCTION_MODEL_HEADS.values())
    distractors = [(layer, h) for layer in range(2) for h in range(4) if (layer, h) not in special]
    logits = induction.run_with_hooks(repeated, fwd_hooks=_ablate_heads(distractors))
    torch.testing.assert_close(logits, clean_logits)
    for knocked_out in special:
        logits = induction.run_with_hooks(repeated, fwd_hooks=_ablate_heads([knocked_out]))
        second = next_token_nll(logits, repeated)[:, SEQ_LEN + 1 :]
        assert second.mean() > 0.9 * math.log(D_VOCAB), f"ablating {knocked_out} kept induction"


def test_induction_model_long_context(induction):
    """Previous-token attention stays sharp over 4 L + 1 positions; later copies are predicted."""
    tokens = repeated_tokens(N_WORDS, batch=2, repeats=4, seed=1)  # 385 positions
    logits, cache = induction.run_with_cache(tokens, names_filter=is_pattern)
    layer, head = INDUCTION_MODEL_HEADS["previous_token"]
    assert previous_token_mass(cache[f"blocks.{layer}.attn.hook_pattern"])[:, head].min() > 0.99
    predictions = logits[:, N_WORDS + 1 : -1].argmax(dim=-1)
    assert (predictions == tokens[:, N_WORDS + 2 :]).all()


def test_induction_model_small_variant():
    bridge = induction_model(n_words=12, n_ctx=40, n_heads=3)
    assert (bridge.cfg.n_heads, bridge.cfg.n_ctx, bridge.cfg.d_vocab) == (3, 40, 16)
    generator = torch.Generator().manual_seed(0)
    words = torch.randperm(12, generator=generator)[:10] + FIRST_WORD_ID
    tokens = torch.cat([torch.tensor([BOS]), words, words])[None]
    predictions = bridge(tokens)[0, 11:-1].argmax(dim=-1)
    assert (predictions == tokens[0, 12:]).all()


def test_induction_model_rejects_too_few_heads():
    with pytest.raises(ValueError, match="n_heads"):
        induction_model(n_heads=2)


@pytest.mark.parametrize("builder", ["induction", *TINY_ARCHS])
def test_compatibility_mode_keeps_predictions(builder, repeated):
    """Folded/centred compat mode must not change log-probs or patterns (norm-free model too)."""
    bridge = induction_model() if builder == "induction" else tiny_model(builder)
    logits, cache = bridge.run_with_cache(repeated, names_filter=is_pattern)
    bridge.enable_compatibility_mode()
    compat_logits, compat_cache = bridge.run_with_cache(repeated, names_filter=is_pattern)
    torch.testing.assert_close(
        compat_logits.log_softmax(-1), logits.log_softmax(-1), atol=1e-4, rtol=1e-4
    )
    for name in cache:
        torch.testing.assert_close(compat_cache[name], cache[name], atol=1e-5, rtol=1e-4)
