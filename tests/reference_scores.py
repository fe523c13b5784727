"""Slow, plain reference implementations of the induction-head scores, for testing.

Every function here is written directly from its definition, with explicit Python loops over
layers, heads and positions, ONE token sequence at a time (no batching) and float64 arithmetic.
They are deliberately independent of :mod:`mechicl.analyses.induction` (never imported here): tests compare
the fast vectorised scores against these to ~1e-5.

Each score takes a :class:`mechicl.model.HookedModel` and one sequence ``tokens``
(``LongTensor [pos]``, starting with BOS) and returns a float64 tensor ``[layer, head]`` for that
sequence; callers average over sequences / seeds themselves.

Repeated sequences (prefix matching, duplicate token) are
``[BOS, x_1..x_L, x_1..x_L, ...]`` with ``n_copies`` copies of ``L`` distinct tokens: token
``x_r`` of copy ``c`` (``c = 0..n_copies-1``, ``r = 1..L``) sits at position ``c * L + r``.

The prefix-matching and copying scores follow Bansal et al., "Rethinking the Role of Scale for
In-Context Learning" (ACL 2023), code: amazon-science/llm-interpret,
``lm_eval/prefix_matching_copying.py``.
"""

from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "ref_copying",
    "ref_copying_ties",
    "ref_duplicate_token",
    "ref_ov_eigen_copying",
    "ref_per_position_loss",
    "ref_prefix_matching",
    "ref_previous_token",
]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _as_tokens(tokens: Tensor) -> Tensor:
    tokens = torch.as_tensor(tokens, dtype=torch.long).cpu()
    if tokens.ndim != 1:
        raise ValueError(f"expected ONE sequence of shape [pos], got shape {tuple(tokens.shape)}")
    return tokens


def _all_patterns(model, tokens: Tensor) -> list[list[list[list[float]]]]:
    """Attention patterns of every layer as nested Python lists of floats (float64).

    Returns ``patterns[layer][head][query_pos][key_pos]``.
    """
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(
            tokens[None].to(model.device), names_filter=lambda name: name in names
        )
    patterns = []
    for layer in range(model.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0]  # [head, query_pos, key_pos]
        patterns.append(pattern.to(torch.float64).tolist())
    return patterns


def _check_repeated(tokens: Tensor, L: int, n_copies: int) -> None:
    """Raise unless tokens == [BOS, x_1..x_L] + (n_copies - 1) more copies of x_1..x_L, distinct."""
    if L < 1 or n_copies < 2:
        raise ValueError(f"need L >= 1 and n_copies >= 2, got L={L}, n_copies={n_copies}")
    if len(tokens) != n_copies * L + 1:
        raise ValueError(
            f"expected n_copies * L + 1 = {n_copies * L + 1} tokens, got {len(tokens)}"
        )
    seq = tokens.tolist()
    first_copy = seq[1 : L + 1]
    if len(set(first_copy)) != L:
        raise ValueError("the repeated tokens x_1..x_L must be distinct")
    for c in range(n_copies):
        for r in range(1, L + 1):
            if seq[c * L + r] != seq[r]:
                raise ValueError(f"position {c * L + r} (copy {c}, r={r}) does not repeat x_{r}")


def _last_argmax(values: list[float]) -> int:
    """Index of the maximum; among tied maxima the LAST one (like ``sort()[1][-1]``)."""
    best = 0
    for i in range(len(values)):
        if values[i] >= values[best]:
            best = i
    return best


def _raised_ratio(probs: list[float], a: int) -> float:
    """Bansal et al.'s raised-probability ratio: ``relu(p - mean(p))[a] / sum(relu(p - mean(p)))``.

    Returns 0 when every raised value is 0 (all ``probs`` equal).
    """
    mean = sum(probs) / len(probs)
    raised = [max(p - mean, 0.0) for p in probs]
    total = sum(raised)
    if total == 0:
        return 0.0
    return raised[a] / total


# --------------------------------------------------------------------------------------------
# Attention-pattern scores
# --------------------------------------------------------------------------------------------


def ref_prefix_matching(
    model,
    tokens: Tensor,
    L: int,
    n_copies: int = 4,
    indexing: Literal["exact", "reference"] = "exact",
) -> Tensor:
    """Prefix-matching score: attention from a repeated token to what followed its earlier copies.

    ``"exact"``: for each query ``q = c*L + r`` in copies ``c = 1..n_copies-1`` the targets are
    ``k*L + r + 1`` for every earlier copy ``k < c``; score = mean over the ``(n_copies-1)*L``
    queries of the summed attention on the targets.

    ``"reference"``: Bansal et al.'s double loop verbatim (for ``j % L == 0`` it also adds the
    attention on key position 1).

    Returns:
        float64 ``[layer, head]``.
    """
    if indexing not in ("exact", "reference"):
        raise ValueError(f"indexing must be 'exact' or 'reference', got {indexing!r}")
    tokens = _as_tokens(tokens)
    _check_repeated(tokens, L, n_copies)
    patterns = _all_patterns(model, tokens)
    scores = torch.zeros(model.n_layers, model.n_heads, dtype=torch.float64)
    for layer in range(model.n_layers):
        for head in range(model.n_heads):
            attn = patterns[layer][head]
            total = 0.0
            n_queries = 0
            if indexing == "exact":
                for c in range(1, n_copies):
                    for r in range(1, L + 1):
                        q = c * L + r
                        for k in range(c):
                            total += attn[q][k * L + r + 1]
                        n_queries += 1
            else:
                for j in range(L + 1, n_copies * L + 1):
                    for num in range(j // L):
                        total += attn[j][num * L + (j % L) + 1]
                    n_queries += 1
            scores[layer, head] = total / n_queries
    return scores


def ref_previous_token(model, tokens: Tensor) -> Tensor:
    """Previous-token score: mean over queries ``q = 1..T-1`` of the attention on key ``q - 1``.

    Returns:
        float64 ``[layer, head]``.
    """
    tokens = _as_tokens(tokens)
    T = len(tokens)
    if T < 2:
        raise ValueError("need at least 2 tokens")
    patterns = _all_patterns(model, tokens)
    scores = torch.zeros(model.n_layers, model.n_heads, dtype=torch.float64)
    for layer in range(model.n_layers):
        for head in range(model.n_heads):
            attn = patterns[layer][head]
            total = 0.0
            for q in range(1, T):
                total += attn[q][q - 1]
            scores[layer, head] = total / (T - 1)
    return scores


def ref_duplicate_token(model, tokens: Tensor, L: int, n_copies: int = 4) -> Tensor:
    """Duplicate-token score: attention from a repeated token to its own earlier occurrences.

    For each query ``q = c*L + r`` in copies ``c = 1..n_copies-1``: the summed attention on
    ``k*L + r`` for ``k < c``; score = mean over those ``(n_copies-1)*L`` queries.

    Returns:
        float64 ``[layer, head]``.
    """
    tokens = _as_tokens(tokens)
    _check_repeated(tokens, L, n_copies)
    patterns = _all_patterns(model, tokens)
    scores = torch.zeros(model.n_layers, model.n_heads, dtype=torch.float64)
    for layer in range(model.n_layers):
        for head in range(model.n_heads):
            attn = patterns[layer][head]
            total = 0.0
            n_queries = 0
            for c in range(1, n_copies):
                for r in range(1, L + 1):
                    q = c * L + r
                    for k in range(c):
                        total += attn[q][k * L + r]
                    n_queries += 1
            scores[layer, head] = total / n_queries
    return scores


# --------------------------------------------------------------------------------------------
# Copying (raised-probability ratio)
# --------------------------------------------------------------------------------------------


def _layer_pattern_and_v(
    model, tokens: Tensor, layer: int, stream: Literal["embeddings", "residual"]
) -> tuple[Tensor, Tensor]:
    """Layer ``layer``'s pattern ``[head, query_pos, key_pos]`` and hook_v ``[pos, kv_head, d_head]``.

    ``"embeddings"``: one forward pass in which layer ``layer``'s input ``hook_resid_pre`` is
    REPLACED by ``blocks.0.hook_resid_pre`` of the same tokens. ``"residual"``: a normal pass.
    """
    pattern_name = f"blocks.{layer}.attn.hook_pattern"
    v_name = f"blocks.{layer}.attn.hook_v"
    saved: dict[str, Tensor] = {}

    def save_pattern(activation: Tensor, hook) -> Tensor:
        saved["pattern"] = activation.detach().clone()
        return activation

    def save_v(activation: Tensor, hook) -> Tensor:
        saved["v"] = activation.detach().clone()
        return activation

    fwd_hooks = []
    with torch.no_grad():
        if stream == "embeddings":
            _, cache = model.run_with_cache(
                tokens[None].to(model.device),
                names_filter=lambda name: name == "blocks.0.hook_resid_pre",
            )
            embeddings = cache["blocks.0.hook_resid_pre"].detach().clone()  # [1, pos, d_model]

            def replace(activation: Tensor, hook) -> Tensor:
                return embeddings.to(activation.dtype)

            fwd_hooks.append((f"blocks.{layer}.hook_resid_pre", replace))
        fwd_hooks.append((pattern_name, save_pattern))
        fwd_hooks.append((v_name, save_v))
        model.run_with_hooks(tokens[None].to(model.device), fwd_hooks=fwd_hooks)
    return saved["pattern"][0], saved["v"][0]


def _copying_layer_scores(
    model, tokens: Tensor, layer: int, pattern: Tensor, v_per_head: Tensor
) -> Tensor:
    """Copying scores of one layer's heads, given its pattern and per-QUERY-head values.

    Args:
        pattern: ``[head, query_pos, key_pos]``.
        v_per_head: ``[pos, head, d_head]`` (value vectors already mapped to query heads).

    Returns:
        float64 ``[head]``.
    """
    T = len(tokens)
    seq = tokens.tolist()
    W_O = model.W_O[layer].to(torch.float64).cpu()  # [head, d_head, d_model]
    b_O = model.b_O[layer].to(torch.float64).cpu()  # [d_model]
    W_U = model.W_U.to(torch.float64).cpu()  # [d_model, d_vocab]
    b_U = model.b_U.to(torch.float64).cpu()  # [d_vocab]
    scores = torch.zeros(model.n_heads, dtype=torch.float64)
    for head in range(model.n_heads):
        # The head's output at each position if it attended only to that position's own value,
        # plus the full output bias (as the reference code does): [pos, d_model].
        values = v_per_head[:, head, :].to(torch.float64).cpu()  # [pos, d_head]
        outputs = values @ W_O[head] + b_O  # [pos, d_model]
        logits = outputs @ W_U + b_U  # [pos, d_vocab]
        probs = torch.softmax(logits, dim=-1)  # [pos, d_vocab]
        rows = pattern[head].to(torch.float64).tolist()
        total = 0.0
        for j in range(1, T):
            a = _last_argmax(rows[j][: j + 1])
            attendable = [probs[j, seq[i]].item() for i in range(j + 1)]
            total += _raised_ratio(attendable, a)
        scores[head] = total / (T - 1)
    return scores


def ref_copying(
    model, tokens: Tensor, stream: Literal["embeddings", "residual"] = "embeddings"
) -> Tensor:
    """Bansal et al.'s copying score (raised-probability ratio), one forward pass per layer.

    For each layer ``l``, head ``h`` and query ``j = 1..T-1``: ``o = v[j, kv(h)] @ W_O[l, h] +
    b_O[l]`` (position ``j``'s own value, not attention-weighted), ``p = softmax(o @ W_U + b_U)``
    over the full vocabulary (no final norm); ``a`` = the (last) argmax of the attention row
    ``pattern[h, j, :j+1]``; with ``r_i = relu(p[x_i] - mean_i p[x_i])`` over ``i = 0..j``,
    ``score_j = r_a / sum_i r_i`` (0 if the sum is 0). Head score = mean over ``j``.

    Args:
        tokens: ``[BOS, t_1..t_N]`` with distinct tokens.
        stream: ``"embeddings"`` replaces layer ``l``'s ``hook_resid_pre`` by the embedding
            stream ``blocks.0.hook_resid_pre``; ``"residual"`` runs the model normally.

    Returns:
        float64 ``[layer, head]``.
    """
    if stream not in ("embeddings", "residual"):
        raise ValueError(f"stream must be 'embeddings' or 'residual', got {stream!r}")
    tokens = _as_tokens(tokens)
    if len(tokens) < 2:
        raise ValueError("need at least 2 tokens")
    group = model.n_heads // model.n_kv_heads
    scores = torch.zeros(model.n_layers, model.n_heads, dtype=torch.float64)
    for layer in range(model.n_layers):
        pattern, v = _layer_pattern_and_v(model, tokens, layer, stream)
        # v: [pos, kv_head, d_head] -> per query head h: kv head h // group.
        v_per_head = torch.stack([v[:, head // group, :] for head in range(model.n_heads)], dim=1)
        scores[layer] = _copying_layer_scores(model, tokens, layer, pattern, v_per_head)
    return scores


def ref_copying_ties(
    model,
    tokens: Tensor,
    stream: Literal["embeddings", "residual"] = "embeddings",
    tolerance: float = 1e-4,
) -> Tensor:
    """Share of the copying score's queries whose attention argmax is near-tied.

    For each layer ``l``, head ``h`` and query ``j = 1..T-1``: sort the attendable weights
    ``pattern[h, j, :j+1]`` (the same patterns as :func:`ref_copying`) in decreasing order; the
    query is near-tied when ``first - second <= tolerance`` (computed in float64 from the
    model's float32 weights). Head score = number of near-tied queries / (T - 1).

    Returns:
        float64 ``[layer, head]`` in ``[0, 1]``.
    """
    if stream not in ("embeddings", "residual"):
        raise ValueError(f"stream must be 'embeddings' or 'residual', got {stream!r}")
    tokens = _as_tokens(tokens)
    T = len(tokens)
    if T < 2:
        raise ValueError("need at least 2 tokens")
    shares = torch.zeros(model.n_layers, model.n_heads, dtype=torch.float64)
    for layer in range(model.n_layers):
        pattern, _ = _layer_pattern_and_v(model, tokens, layer, stream)
        for head in range(model.n_heads):
            rows = pattern[head].to(torch.float64).tolist()
            n_tied = 0
            for j in range(1, T):
                weights = sorted(rows[j][: j + 1], reverse=True)
                if weights[0] - weights[1] <= tolerance:
                    n_tied += 1
            shares[layer, head] = n_tied / (T - 1)
    return shares


# --------------------------------------------------------------------------------------------
# OV eigenvalue copying score
# --------------------------------------------------------------------------------------------


def ref_ov_eigen_copying(model) -> Tensor:
    """``sum(eig).real / sum(|eig|)`` of the full ``[d_vocab, d_vocab]`` matrix
    ``W_E @ W_V[l, h] @ W_O[l, h] @ W_U`` (folded weights, float64), per head.

    A head whose matrix is exactly zero (all eigenvalues 0) scores 0. Only feasible for tiny
    vocabularies.

    Returns:
        float64 ``[layer, head]`` in ``[-1, 1]``.
    """
    weights = model.folded_weights()
    W_E = weights.W_E.detach().to(torch.float64).cpu()
    W_U = weights.W_U.detach().to(torch.float64).cpu()
    scores = torch.zeros(model.n_layers, model.n_heads, dtype=torch.float64)
    for layer in range(model.n_layers):
        for head in range(model.n_heads):
            W_V = weights.W_V[layer, head].detach().to(torch.float64).cpu()
            W_O = weights.W_O[layer, head].detach().to(torch.float64).cpu()
            full = W_E @ W_V @ W_O @ W_U  # [d_vocab, d_vocab]
            eigenvalues = torch.linalg.eigvals(full)
            total_abs = eigenvalues.abs().sum().item()
            if total_abs == 0:
                scores[layer, head] = 0.0
            else:
                scores[layer, head] = eigenvalues.sum().real.item() / total_abs
    return scores


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


def ref_per_position_loss(model, tokens: Tensor) -> Tensor:
    """Next-token cross-entropy at each position ``i = 0..T-2`` (predicting ``tokens[i + 1]``).

    Returns:
        float64 ``[pos - 1]``.
    """
    tokens = _as_tokens(tokens)
    T = len(tokens)
    with torch.no_grad():
        logits = model(tokens[None].to(model.device))[0].to(torch.float64).cpu()  # [pos, d_vocab]
    losses = torch.zeros(T - 1, dtype=torch.float64)
    for i in range(T - 1):
        log_probs = torch.log_softmax(logits[i], dim=-1)
        losses[i] = -log_probs[int(tokens[i + 1])]
    return losses
