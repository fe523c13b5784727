"""Toy models for tests: an offline word tokenizer, tiny random transformers, and a
hand-built induction circuit.

Everything here is built in code, offline and in well under a second per model
(after the 5-7 s import of torch + TransformerLens): no Hugging Face hub access
is needed or attempted.

* :func:`toy_tokenizer` -- a ``tokenizers`` WordLevel tokenizer over the words
  ``w0 ... w{n_words-1}`` plus four special tokens (ids in :data:`SPECIAL_TOKEN_IDS`).
* :func:`tiny_model` -- tiny *random* ``TransformerBridge`` models covering the
  architecture axes that analysis code must handle: GPT-2-like (multi-head
  attention, LayerNorm, learned absolute positions, biases), Llama-like with
  grouped-query attention (RMSNorm, rotary), and Llama-like with multi-head
  attention.
* :func:`induction_model` -- a 2-layer attention-only model whose weights are set
  by hand so that one layer-0 head is an exact previous-token head and one
  layer-1 head is an exact induction head (Olsson et al. 2022, "In-context
  Learning and Induction Heads"). It is the ground truth for induction-head
  scans; which heads are special is recorded in :data:`INDUCTION_MODEL_HEADS`.

Axis names are the package's (see :mod:`mechicl`): ``layer head batch pos query_pos
key_pos d_model d_head d_vocab``.
"""

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Final, Literal, get_args

import torch
from einops import rearrange
from tokenizers import Tokenizer, models, pre_tokenizers
from transformer_lens.model_bridge import TransformerBridge
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

__all__ = [
    "FIRST_WORD_ID",
    "INDUCTION_MODEL_HEADS",
    "SPECIAL_TOKEN_IDS",
    "TINY_ARCHS",
    "TinyArch",
    "induction_model",
    "tiny_hf_model",
    "tiny_model",
    "toy_tokenizer",
]

SPECIAL_TOKEN_IDS: Final[Mapping[str, int]] = MappingProxyType(
    {"<bos>": 0, "<eos>": 1, "<pad>": 2, "<unk>": 3}
)
"""Ids of the toy tokenizer's special tokens; word ``wk`` has id ``FIRST_WORD_ID + k``."""

FIRST_WORD_ID: Final[int] = len(SPECIAL_TOKEN_IDS)
"""Id of ``w0``; random sequences should draw from ``FIRST_WORD_ID .. d_vocab - 1``."""

TOY_TOKENIZER_NAME: Final[str] = "mechicl-toy"
"""``name_or_path`` recorded on the toy tokenizer (the bridge pops it; see toy_tokenizer)."""

INDUCTION_MODEL_HEADS: Final[Mapping[str, tuple[int, int]]] = MappingProxyType(
    {"previous_token": (0, 1), "induction": (1, 2)}
)
"""``(layer, head)`` of the hand-built heads in :func:`induction_model`.

All other heads are distractors with weak random attention whose outputs are read
by nothing. The special heads are deliberately not head 0.
"""

TinyArch = Literal["gpt2", "llama", "llama-mha"]
TINY_ARCHS: Final[tuple[str, ...]] = get_args(TinyArch)


def toy_tokenizer(n_words: int = 96) -> PreTrainedTokenizerFast:
    """Build a whitespace word-level tokenizer in code, with no files or network.

    The vocabulary is ``<bos>``=0, ``<eos>``=1, ``<pad>``=2, ``<unk>``=3 (see
    :data:`SPECIAL_TOKEN_IDS`), then ``w0 ... w{n_words-1}`` with ids
    ``4 ... n_words+3``; unknown words map to ``<unk>``. Encoding prepends
    ``<bos>`` (``add_bos_token=True``), which ``TransformerBridge`` requires: without
    it the bridge reloads the tokenizer by name from the hub. ``init_kwargs
    ["name_or_path"]`` is set to ``"mechicl-toy"`` because the bridge pops that key.

    Args:
        n_words: Number of ordinary word tokens.

    Returns:
        A fast tokenizer with ``len(tokenizer) == n_words + 4``.

    Examples:
        >>> tok = toy_tokenizer()
        >>> tok("w3 w5")["input_ids"]
        [0, 7, 9]
        >>> len(tok)
        100
    """
    if n_words < 1:
        raise ValueError(f"n_words must be >= 1, got {n_words}.")
    vocab = dict(SPECIAL_TOKEN_IDS)
    vocab.update({f"w{k}": FIRST_WORD_ID + k for k in range(n_words)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos_token=True,
    )
    tokenizer.init_kwargs["name_or_path"] = TOY_TOKENIZER_NAME
    return tokenizer


def _perturb_biases_and_norms(model: torch.nn.Module, std: float) -> None:
    """Give every bias N(0, std) and every norm gain 1 + N(0, std), in place.

    HF initialises biases to 0 and norm gains to 1, which would hide mistakes in
    bias handling and norm folding.
    """
    with torch.no_grad():
        for module in model.modules():
            is_norm = isinstance(module, torch.nn.LayerNorm) or "RMSNorm" in type(module).__name__
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.nn.Parameter):
                bias.normal_(0.0, std)
            weight = getattr(module, "weight", None)
            if is_norm and isinstance(weight, torch.nn.Parameter):
                weight.normal_(1.0, std)


def _gpt2(
    *, vocab_size: int, n_layers: int, d_model: int, n_heads: int, n_ctx: int, init_std: float
) -> PreTrainedModel:
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_ctx,
        n_embd=d_model,
        n_layer=n_layers,
        n_head=n_heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        initializer_range=init_std,
        bos_token_id=SPECIAL_TOKEN_IDS["<bos>"],
        eos_token_id=SPECIAL_TOKEN_IDS["<eos>"],
        pad_token_id=SPECIAL_TOKEN_IDS["<pad>"],
    )
    return GPT2LMHeadModel(config)


def _llama(
    *,
    vocab_size: int,
    n_layers: int,
    d_model: int,
    n_heads: int,
    n_ctx: int,
    init_std: float,
    n_key_value_heads: int,
) -> PreTrainedModel:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_key_value_heads,
        head_dim=d_model // n_heads,
        max_position_embeddings=n_ctx,
        rms_norm_eps=1e-5,
        initializer_range=init_std,
        bos_token_id=SPECIAL_TOKEN_IDS["<bos>"],
        eos_token_id=SPECIAL_TOKEN_IDS["<eos>"],
        pad_token_id=SPECIAL_TOKEN_IDS["<pad>"],
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def _llama_gqa(*, n_heads: int, **kwargs: Any) -> PreTrainedModel:
    return _llama(n_heads=n_heads, n_key_value_heads=n_heads // 2, **kwargs)


def _llama_mha(*, n_heads: int, **kwargs: Any) -> PreTrainedModel:
    return _llama(n_heads=n_heads, n_key_value_heads=n_heads, **kwargs)


# Registry of tiny architectures: name -> builder of a random HF model (same keys as TinyArch).
_TINY_BUILDERS: Final[Mapping[str, Callable[..., PreTrainedModel]]] = MappingProxyType(
    {"gpt2": _gpt2, "llama": _llama_gqa, "llama-mha": _llama_mha}
)


def tiny_model(
    arch: str = "llama",
    *,
    seed: int = 0,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_ctx: int = 512,
    n_words: int = 96,
    init_std: float = 0.1,
) -> TransformerBridge:
    """Build a tiny random HF model in code and wrap it in a ``TransformerBridge``.

    Architectures (all float32, on CPU, with :func:`toy_tokenizer` and
    ``d_vocab = n_words + 4``, ``d_head = d_model // n_heads``):

    * ``"gpt2"``: ``GPT2LMHeadModel`` -- multi-head attention, LayerNorm, learned
      absolute positions, biases everywhere, tied embeddings.
    * ``"llama"``: ``LlamaForCausalLM`` -- grouped-query attention with
      ``n_heads // 2`` key/value heads, RMSNorm, rotary positions, gated MLP.
    * ``"llama-mha"``: the same with as many key/value heads as query heads.

    Weights are drawn with ``init_std`` (larger than HF's 0.02 so attention is not
    uniform); biases get N(0, 0.1) and norm gains 1 + N(0, 0.1) so bias handling
    and norm folding are exercised. Initialisation is seeded by ``seed`` without
    touching the caller's global RNG state. Dropout is off and the model is in
    eval mode. The bridge is booted with ``boot_transformers("mechicl-toy-<arch>",
    hf_model=..., tokenizer=...)``: with both given, the name is only a label.

    Args:
        arch: One of :data:`TINY_ARCHS` (the :data:`TinyArch` literal). Typed ``str``
            so that a runtime type checker does not pre-empt the ``ValueError``.
        seed: Seed for the random weights.
        n_layers: Number of transformer blocks.
        d_model: Residual stream width.
        n_heads: Number of query heads (even, for the GQA variant).
        n_ctx: Maximum context (positional table size / ``max_position_embeddings``).
        n_words: Number of word tokens in the tokenizer.
        init_std: Standard deviation of the random weight matrices.

    Returns:
        The bridge, with ``bridge.cfg.model_name == "mechicl-toy-<arch>"``.

    Raises:
        ValueError: if ``arch`` is unknown or the shapes are inconsistent.

    Examples:
        >>> bridge = tiny_model("llama")
        >>> (bridge.cfg.n_heads, bridge.cfg.n_key_value_heads, bridge.cfg.d_vocab)
        (4, 2, 100)
    """
    hf_model, tokenizer = tiny_hf_model(arch, seed=seed, n_layers=n_layers, d_model=d_model,
                                        n_heads=n_heads, n_ctx=n_ctx, n_words=n_words,
                                        init_std=init_std)
    return TransformerBridge.boot_transformers(
        f"mechicl-toy-{arch}", hf_model=hf_model, tokenizer=tokenizer, device="cpu"
    )


def tiny_hf_model(
    arch: str = "llama",
    *,
    seed: int = 0,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_ctx: int = 512,
    n_words: int = 96,
    init_std: float = 0.1,
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """The Hugging Face model and tokenizer behind :func:`tiny_model` (same arguments), before
    the bridge wraps them, e.g. to ``save_pretrained`` a local model folder.

    Examples:
        >>> hf, tok = tiny_hf_model("gpt2")
        >>> type(hf).__name__, len(tok)
        ('GPT2LMHeadModel', 100)
    """
    if arch not in _TINY_BUILDERS:
        raise ValueError(f"Unknown arch {arch!r}; expected one of {sorted(_TINY_BUILDERS)}.")
    if d_model % n_heads != 0:
        raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads}).")
    if arch == "llama" and n_heads % 2 != 0:
        raise ValueError(f"arch 'llama' (GQA) needs an even n_heads, got {n_heads}.")
    tokenizer = toy_tokenizer(n_words)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf_model = _TINY_BUILDERS[arch](
            vocab_size=len(tokenizer),
            n_layers=n_layers,
            d_model=d_model,
            n_heads=n_heads,
            n_ctx=n_ctx,
            init_std=init_std,
        )
        _perturb_biases_and_norms(hf_model, std=0.1)
    return hf_model.to(torch.float32).eval(), tokenizer


def _position_code(n_ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary-frequency sinusoidal positions and the rotation that shifts them by one.

    Frequencies are ``theta_f = pi / 2**f`` for ``f = 1..F`` with ``2**F >= n_ctx``.
    For a distance ``d = 2**m * odd`` with ``0 < |d| < 2**F``, frequency ``m + 1`` gives
    ``cos(theta d) = 0``, so ``sum_f cos(theta_f d) <= F - 1``: the dot product
    ``code[i] . (shift @ code[j]) = sum_f cos(theta_f (i - j - 1))`` equals F at
    ``j = i - 1`` and is at least 1 lower at every other key position.

    Returns:
        code: ``[n_ctx, 2F]``, rows ``(cos theta_f i, sin theta_f i)`` per frequency.
        shift: ``[2F, 2F]`` block rotation with ``shift @ code[j] = code[j + 1]``.
    """
    n_freq = max(1, math.ceil(math.log2(n_ctx)))
    theta = math.pi / 2.0 ** torch.arange(1, n_freq + 1, dtype=torch.float64)  # [F]
    angle = torch.arange(n_ctx, dtype=torch.float64)[:, None] * theta  # [n_ctx, F]
    code = torch.stack([angle.cos(), angle.sin()], dim=-1).reshape(n_ctx, 2 * n_freq)
    shift = torch.zeros(2 * n_freq, 2 * n_freq, dtype=torch.float64)
    cos, sin = theta.cos(), theta.sin()
    idx = torch.arange(n_freq)
    shift[2 * idx, 2 * idx] = cos
    shift[2 * idx, 2 * idx + 1] = -sin
    shift[2 * idx + 1, 2 * idx] = sin
    shift[2 * idx + 1, 2 * idx + 1] = cos
    return code, shift


def induction_model(
    n_words: int = 96,
    *,
    n_ctx: int = 512,
    n_heads: int = 4,
    attn_sharpness: float = 30.0,
    logit_scale: float = 10.0,
    seed: int = 0,
) -> TransformerBridge:
    """Build a 2-layer attention-only model with a hand-set induction circuit.

    The residual stream (no LayerNorm, ``normalization_type=None``, so the hand-set
    geometry is not rescaled) is a direct sum of orthogonal subspaces:

    ``tok`` (``d_vocab``, one-hot token, from ``W_E``) | ``pos`` (``2F``, sinusoidal
    code from ``W_pos``, see below) | ``prev`` (``d_vocab``, written by the
    previous-token head) | ``out`` (``d_vocab``, written by the induction head, read
    by ``W_U``) | ``scratch`` (8 dims, written by distractor heads, read by nothing).

    * Previous-token head, :data:`INDUCTION_MODEL_HEADS` ``["previous_token"]``
      = (0, 1): the query reads ``pos[i]``, the key reads ``pos[j]`` rotated one step
      forward, so the score is ``attn_sharpness * sum_f cos(theta_f (i - j - 1))``:
      maximal at ``j = i - 1`` and at least ``attn_sharpness`` lower elsewhere
      (binary frequencies ``theta_f = pi / 2**f``; a one-hot position code would
      need ``d_head >= n_ctx``). OV copies ``tok[j]`` into ``prev``.
    * Induction head, ``["induction"]`` = (1, 2): the query reads ``tok[i]``, the key
      reads ``prev[j]``, score ``attn_sharpness`` where the previous token of ``j``
      equals the current token; a query bias plus a key reading ``tok == <bos>``
      add ``attn_sharpness / 2`` on BOS, so queries with no earlier match sink
      onto BOS. OV copies ``tok[j]`` into ``out``.
    * ``W_U`` maps ``out[w]`` to ``logit_scale`` on word ``w`` (special tokens are
      never predicted): on a repeated sequence, second-copy positions predict the
      next token with loss ~ ``d_vocab * exp(-logit_scale)``, while unmatched
      positions attend to BOS and give uniform logits (loss ``log d_vocab``).
    * Every other head is a distractor: weak random Q/K (diffuse attention) and a
      random OV that writes only into ``scratch``, so it has no effect on logits.

    Built with ``TransformerBridge.boot_native`` (a TL-native model, which supports
    ``normalization_type=None`` and ``attn_only=True``; HF GPT-2 would force
    LayerNorm and MLPs), then every weight is overwritten. ``d_head =
    max(d_vocab + 1, 2F)`` exceeds ``d_model / n_heads``: the heads copy full one-hot
    tokens.

    Args:
        n_words: Number of word tokens in the tokenizer (``d_vocab = n_words + 4``).
        n_ctx: Maximum context; must be > 1.
        n_heads: Heads per layer; >= 3 so both special heads exist.
        attn_sharpness: Attention-logit gap between the intended key and the others.
        logit_scale: Logit given to the copied token.
        seed: Seed for the distractor heads' random weights.

    Returns:
        The bridge, with ``bridge.cfg.model_name == "mechicl-toy-induction"``.

    Examples:
        >>> bridge = induction_model()
        >>> (bridge.cfg.n_layers, bridge.cfg.n_heads, bridge.cfg.attn_only)
        (2, 4, True)
    """
    if n_heads < 3:
        raise ValueError(f"n_heads must be >= 3 (special heads are 1 and 2), got {n_heads}.")
    if n_ctx < 2:
        raise ValueError(f"n_ctx must be >= 2, got {n_ctx}.")
    tokenizer = toy_tokenizer(n_words)
    d_vocab = len(tokenizer)
    code, shift = _position_code(n_ctx)
    d_pos = code.shape[1]
    d_scratch = 8
    # Residual subspaces: slices of d_model.
    tok = slice(0, d_vocab)
    pos = slice(tok.stop, tok.stop + d_pos)
    prev = slice(pos.stop, pos.stop + d_vocab)
    out = slice(prev.stop, prev.stop + d_vocab)
    scratch = slice(out.stop, out.stop + d_scratch)
    d_model = scratch.stop
    d_head = max(d_vocab + 1, d_pos)
    # Scores are divided by sqrt(d_head) inside attention; pre-multiply queries.
    q_gain = attn_sharpness * math.sqrt(d_head)

    bridge = TransformerBridge.boot_native(
        {
            "d_model": d_model,
            "d_head": d_head,
            "n_heads": n_heads,
            "n_layers": 2,
            "n_ctx": n_ctx,
            "d_vocab": d_vocab,
            "act_fn": "gelu",
            "attn_only": True,
            "normalization_type": None,
            "positional_embedding_type": "standard",
            "seed": seed,
        },
        tokenizer=tokenizer,
        device="cpu",
        dtype=torch.float32,
        model_name="mechicl-toy-induction",
    )

    eye = torch.eye(d_vocab, dtype=torch.float32)
    # Per layer: W_Q/W_K/W_V [head, d_model, d_head] (resid @ W), b_Q [head, d_head],
    # W_O [head, d_head, d_model]; other biases stay zero.
    W_Q = torch.zeros(2, n_heads, d_model, d_head, dtype=torch.float32)
    W_K, W_V = torch.zeros_like(W_Q), torch.zeros_like(W_Q)
    b_Q = torch.zeros(2, n_heads, d_head, dtype=torch.float32)
    W_O = torch.zeros(2, n_heads, d_head, d_model, dtype=torch.float32)

    generator = torch.Generator().manual_seed(seed)
    # Distractors: weak random attention, output only to scratch. With entries of std
    # qk_std, a score q.k / sqrt(d_head) has std ~ qk_std**2 * |resid|**2, where
    # |resid|**2 ~ 3 (tok, prev, out one-hots) + d_pos / 2 (unit cos/sin pairs): ~0.5.
    qk_std = math.sqrt(0.5 / (3 + d_pos / 2))
    for layer in range(2):
        for head in range(n_heads):
            if (layer, head) in INDUCTION_MODEL_HEADS.values():
                continue
            for W in (W_Q[layer, head], W_K[layer, head]):
                W.copy_(qk_std * torch.randn(d_model, d_head, generator=generator, dtype=W.dtype))
            W_V[layer, head] = torch.randn(
                d_model, d_head, generator=generator, dtype=torch.float32
            ) / math.sqrt(d_model)
            W_O[layer, head][:, scratch] = torch.randn(
                d_head, d_scratch, generator=generator, dtype=torch.float32
            ) / math.sqrt(d_head)

    layer, head = INDUCTION_MODEL_HEADS["previous_token"]
    W_Q[layer, head][pos, :d_pos] = q_gain * torch.eye(d_pos, dtype=torch.float32)
    # k_j = shift @ code[j] = code[j + 1]; as a row-vector map: code[j] @ shift.T.
    W_K[layer, head][pos, :d_pos] = shift.T
    W_V[layer, head][tok, :d_vocab] = eye
    W_O[layer, head][:d_vocab, prev] = eye

    layer, head = INDUCTION_MODEL_HEADS["induction"]
    W_Q[layer, head][tok, :d_vocab] = q_gain * eye
    b_Q[layer, head][d_vocab] = q_gain / 2
    W_K[layer, head][prev, :d_vocab] = eye
    W_K[layer, head][SPECIAL_TOKEN_IDS["<bos>"], d_vocab] = 1.0
    W_V[layer, head][tok, :d_vocab] = eye
    W_O[layer, head][:d_vocab, out] = eye

    W_E = torch.zeros(d_vocab, d_model, dtype=torch.float32)
    W_E[:, tok] = eye
    W_pos = torch.zeros(n_ctx, d_model, dtype=torch.float32)
    W_pos[:, pos] = code
    # Only words are predicted: out[<bos>] (the sink) and other specials map to nothing.
    W_U = torch.zeros(d_model, d_vocab, dtype=torch.float32)
    W_U[out.start + FIRST_WORD_ID : out.stop, FIRST_WORD_ID:] = logit_scale * torch.eye(
        n_words, dtype=torch.float32
    )

    # NativeModel parameter names (nn.Linear weights are [out_features, in_features]).
    weights: dict[str, torch.Tensor] = {
        "tok_embed.weight": W_E,
        "pos.weight": W_pos,
        "head.weight": W_U.T,
    }
    for layer in range(2):
        prefix = f"layers.{layer}.attn"
        for name, W in (("q", W_Q), ("k", W_K), ("v", W_V)):
            weights[f"{prefix}.{name}.weight"] = rearrange(
                W[layer], "head d_model d_head -> (head d_head) d_model"
            )
            weights[f"{prefix}.{name}.bias"] = torch.zeros(n_heads * d_head, dtype=torch.float32)
        weights[f"{prefix}.q.bias"] = rearrange(b_Q[layer], "head d_head -> (head d_head)")
        weights[f"{prefix}.o.weight"] = rearrange(
            W_O[layer], "head d_head d_model -> d_model (head d_head)"
        )
        weights[f"{prefix}.o.bias"] = torch.zeros(d_model, dtype=torch.float32)
    _load_native_weights(bridge, weights)
    return bridge


def _load_native_weights(bridge: TransformerBridge, weights: Mapping[str, torch.Tensor]) -> None:
    """Copy ``weights`` (keyed by plain NativeModel names) into a booted bridge.

    The bridge wraps each native submodule, so parameter names gain
    ``._original_component`` segments; strip them to match. Every parameter must be
    set exactly once, so a change in TL's native layout fails loudly here.
    """
    params = {
        name.replace("._original_component", ""): param
        for name, param in bridge.original_model.named_parameters()
    }
    if set(params) != set(weights):
        raise RuntimeError(
            "TL native model layout changed: missing "
            f"{sorted(set(params) - set(weights))}, unexpected {sorted(set(weights) - set(params))}."
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name].to(param.dtype))
