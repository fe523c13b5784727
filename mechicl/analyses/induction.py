"""Induction-head scans: prefix-matching, copying, OV-eigenvalue, previous- and duplicate-token.

Scores every attention head of every layer at once (per query head for grouped-query models):

* **Prefix matching** (Bansal et al. 2023, after Olsson et al. 2022): on BOS + L random distinct
  tokens repeated to ``n_copies`` copies, the attention each position of copies 2.. puts on the
  tokens that FOLLOWED the earlier occurrences of its current token, summed over those targets
  and averaged over the queries. ``indexing="reference"`` reproduces the authors' code
  (amazon-science/llm-interpret, ``lm_eval/prefix_matching_copying.py``), whose index
  ``num*L + (j % L) + 1`` also counts key position 1 for the last token of each copy.
* **Copying, raised-logit ratio** (Bansal et al. 2023): every layer's attention is run on the
  embedding stream; each head's value vector at query j (its own token's, not attention-weighted,
  as the reference code does) goes through W_O (+ the full b_O) and the unembedding (no final
  norm); among the attendable tokens 0..j, subtract the mean of their softmax probabilities,
  ReLU, and take the share of the most-attended token. The softmax denominator cancels in that
  share, so only the unembedding columns of the sequence's tokens are gathered.
  The same pass records, per head, the share of queries whose most-attended key is near-tied
  (the two largest attention weights at most :data:`TIE_TOLERANCE` apart): there the argmax,
  and so the query's copying term, can flip with float rounding. See :func:`copying_ties`.
* **OV-circuit eigenvalue copying** (Olsson et al. 2022): sum(lambda) / sum(|lambda|) over the
  eigenvalues of W_E W_V W_O W_U, computed from the d_head x d_head matrix W_O W_U W_E W_V with
  the same nonzero eigenvalues.
* **Previous-token** (attention on position q-1) and **duplicate-token** (attention on earlier
  occurrences of the current token) scores, and the per-position loss on the repeated sequences.

Engineering: sequences of different lengths are batched (right padding is exact under causal
attention), hooks reduce each attention pattern to per-head numbers in place (the full
``[layer, head, query, key]`` tensor is never kept), no Python loop runs over heads or positions.

Axis names: ``seed batch layer head query_pos key_pos pos d_model d_head``.
"""

import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import einops
import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechicl._batching import device_batch_tokens, length_batches, pad_right
from mechicl._checks import check_choice, check_nonnegative, check_positive
from mechicl.analyses._registry import (
    Analysis,
    Call,
    Job,
    Option,
    Outputs,
    batch_tokens_option,
    job_stem,
    register_analysis,
)
from mechicl.analyses.metrics import next_token_nll
from mechicl.model.hooked import HookedModel, as_hooked_model
from mechicl.model.masks import Mask
from mechicl.plotting import head_heatmap, kv_group_size
from mechicl.results import HeadScores, read_result, result_type, write_result

logger = logging.getLogger(__name__)

__all__ = [
    "OV_VOCAB_SLICE",
    "SCORES",
    "SCORE_ALIASES",
    "TIE_TOLERANCE",
    "FixedLength",
    "ScanResult",
    "copying_scores",
    "copying_sequences",
    "copying_ties",
    "duplicate_token_scores",
    "induction_scan",
    "length_label",
    "longest_scan_sequence",
    "ov_eigen_copying_scores",
    "parse_scores",
    "prefix_matching_scores",
    "previous_token_scores",
    "repeated_sequences",
]

SCORES: tuple[str, ...] = ("prefix_matching", "copying", "ov_eigen", "previous_token",
                           "duplicate_token")
"""Score names accepted by :func:`induction_scan` and the ``mechicl scan`` CLI."""

TIE_TOLERANCE: float = 1e-4
"""Default absolute gap between a query's two largest attention weights at or below which the
copying score's argmax counts as near-tied (:func:`copying_ties`). Float32 rounding moves that
gap by up to ~5e-6 (measured against float64 on SmolLM2-135M, relative error ~1e-5 of the
weights), so two float32 implementations can disagree on gaps up to ~1e-5: 1e-4 leaves a
10x margin while staying far below a real preference (1e-4 of the attention mass). For
half-precision models it is far too small (see docs/concepts/induction.md)."""

_TIE_EXTRA = "argmax_tie_share"
"""Key of the per-seed near-tie shares in the copying :class:`~mechicl.results.HeadScores`'s
``extras`` (``[seed, layer, head]``)."""

Indexing = Literal["exact", "reference"]
Stream = Literal["embeddings", "residual"]


def bansal_length(seed_index: int) -> int:
    """L = 2 s + 25, the sequence length for seed index s in Bansal et al. (2023)."""
    return 2 * seed_index + 25


def longest_scan_sequence(n_seeds: int = 100, *, length: int | Callable[[int], int] | None = None,
                          n_copies: int = 4) -> int:
    """Tokens in the longest sequence :func:`induction_scan` runs: BOS + ``n_copies`` copies
    of the longest base sequence (the context the scan needs, and the ``seq_len`` for a
    memory budget; also exported by :mod:`mechicl.experiments.memory`).

    Args:
        n_seeds: random sequences of the scan.
        length: one length for every sequence, a function of the seed index, or None for
            Bansal et al.'s ``2 s + 25``.
        n_copies: copies of each base sequence.

    >>> longest_scan_sequence(100)  # 4 x (2 * 99 + 25) + 1
    893
    """
    check_positive("n_seeds", n_seeds)
    check_positive("n_copies", n_copies)
    return n_copies * _longest_base(as_length(length), n_seeds) + 1


def _longest_base(length: Callable[[int], int], n_seeds: int, limit: int | None = None) -> int:
    """The longest base sequence L(s) over seed indices ``0..n_seeds-1``, each checked to be
    an integer >= 1. Closed form for :func:`bansal_length` (increasing) and
    :class:`FixedLength`; a custom function is called per seed index, stopping at the first
    length above ``limit`` (so a huge ``n_seeds`` is rejected at once, not after a loop over
    every seed index)."""
    if length is bansal_length:
        return bansal_length(n_seeds - 1)
    if isinstance(length, FixedLength):
        check_positive("length", length.length)
        return length.length
    longest = 0
    for s in range(n_seeds):
        value = length(s)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"length({s}) = {value!r}: the length function must return an "
                             "integer >= 1")
        longest = max(longest, value)
        if limit is not None and longest > limit:
            break
    return longest


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _sample_distinct(pool: Tensor, n: int, seed: int, index: int) -> Tensor:
    if n > len(pool):
        raise ValueError(f"need {n} distinct tokens but the frequency ranking keeps only "
                         f"{len(pool)} after exclusions; use fewer seeds or exclude less")
    # One independent, reproducible stream per (seed, seed index).
    rng = np.random.default_rng([seed, index])
    return pool[torch.from_numpy(rng.choice(len(pool), size=n, replace=False))]


def _pool(model: HookedModel, exclude_top: float, exclude_bottom: float) -> Tensor:
    return model.frequency_ranking.middle(exclude_top, exclude_bottom)


def _check_context(model: HookedModel, longest: int, what: str) -> None:
    if longest > model.n_ctx:
        raise ValueError(f"{what} needs sequences of {longest} tokens but the model's context is "
                         f"{model.n_ctx}; use fewer seeds or shorter sequences")


def _check_random_sizes(model: HookedModel, n_seeds: int, n_copies: int,
                        length: Callable[[int], int], *, repeat: bool) -> None:
    """Sizes of a random-sequence scan, checked before anything is drawn or allocated: the
    longest sequence (BOS + ``n_copies`` x the longest base, repeated or not) must fit the
    model's context."""
    check_positive("n_seeds", n_seeds)
    check_positive("n_copies", n_copies)
    if repeat and n_copies < 2:
        raise ValueError(f"n_copies={n_copies}: the repeated-sequence scores need an integer "
                         ">= 2")
    limit = (model.n_ctx - 1) // n_copies
    longest = n_copies * _longest_base(length, n_seeds, limit=limit) + 1
    _check_context(model, longest, f"n_seeds={n_seeds}")


def _base_sequences(model: HookedModel, tokens: Sequence[Any] | Tensor, n_copies: int, *,
                    repeat: bool, copying: bool) -> list[Int[Tensor, " pos"]]:
    """User-supplied base sequences (``tokens=``) as 1-D int64 tensors on the CPU, each checked:
    integer ids (no floats, no bools) inside the vocabulary, distinct, non-empty, and short
    enough for the context (``1 + n_copies * len`` for the repeated scores, ``1 + len`` for
    copying)."""
    if isinstance(tokens, Tensor) and tokens.ndim < 2 or isinstance(tokens, (str, bytes)):
        raise ValueError("tokens= must be a sequence of base sequences (a list of 1-D tensors "
                         f"or lists of ids, or a [batch, pos] tensor), got {tokens!r:.60}; wrap "
                         "one sequence in a list")
    bases = []
    for i, base in enumerate(tokens):
        try:
            t = torch.as_tensor(base)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"tokens[{i}]={base!r:.60} is not a sequence of token ids") from None
        if t.ndim != 1 or len(t) == 0:
            raise ValueError(f"tokens[{i}] has shape {tuple(t.shape)}: each base sequence must "
                             "be a non-empty 1-D sequence of token ids (no BOS)")
        if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            raise ValueError(f"tokens[{i}] has dtype {t.dtype}: token ids must be integers "
                             "(floats and bools are not converted)")
        low, high = int(t.min()), int(t.max())
        if low < 0 or high >= model.d_vocab:
            bad = low if low < 0 else high
            raise ValueError(f"tokens[{i}] holds token id {bad}, outside the vocabulary: ids must "
                             f"be in 0..{model.d_vocab - 1}")
        if len(torch.unique(t)) != len(t):
            raise ValueError(f"tokens[{i}] repeats a token id: each base sequence in tokens= "
                             "must have distinct tokens (the repeat protocol needs unique "
                             "positions)")
        bases.append(t.to(torch.long).cpu())
    if not bases:
        raise ValueError("tokens= is empty: give at least one base sequence, or tokens=None for "
                         "random ones")
    longest = max(len(b) for b in bases)
    if repeat:
        if n_copies < 2:
            raise ValueError(f"n_copies={n_copies}: the repeated-sequence scores need an integer "
                             ">= 2")
        _check_context(model, 1 + n_copies * longest, "tokens=")
    if copying:
        _check_context(model, 1 + longest, "tokens= (copying)")
    return bases


def repeated_sequences(
    model: HookedModel, *, n_seeds: int = 100, seed: int = 0, n_copies: int = 4,
    exclude_top: float = 0.04, exclude_bottom: float = 0.04,
    length: Callable[[int], int] = bansal_length,
) -> list[Int[Tensor, " _pos"]]:
    """The prefix-matching inputs: for seed index s, BOS + L(s) distinct random tokens from the
    middle of the frequency ranking, the L tokens repeated to ``n_copies`` copies.

    Token draws use ``numpy.random.default_rng([seed, s])``: reproducible from ``seed``.
    """
    model = as_hooked_model(model)
    _check_random_sizes(model, n_seeds, n_copies, as_length(length), repeat=True)
    check_nonnegative("seed", seed)
    pool = _pool(model, exclude_top, exclude_bottom)
    bos = torch.tensor([model.bos_token_id])
    return [torch.cat([bos, _sample_distinct(pool, length(s), seed, s).repeat(n_copies)])
            for s in range(n_seeds)]


def copying_sequences(
    model: HookedModel, *, n_seeds: int = 100, seed: int = 0, n_copies: int = 4,
    exclude_top: float = 0.04, exclude_bottom: float = 0.04,
    length: Callable[[int], int] = bansal_length,
) -> list[Int[Tensor, " _pos"]]:
    """The copying-score inputs: BOS + ``n_copies * L(s)`` distinct random tokens, not repeated."""
    model = as_hooked_model(model)
    _check_random_sizes(model, n_seeds, n_copies, as_length(length), repeat=False)
    check_nonnegative("seed", seed)
    pool = _pool(model, exclude_top, exclude_bottom)
    bos = torch.tensor([model.bos_token_id])
    # Offset the stream so copying draws are independent of the prefix-matching draws.
    return [torch.cat([bos, _sample_distinct(pool, n_copies * length(s), seed + 1_000_003, s)])
            for s in range(n_seeds)]


def _pad(seqs: list[Tensor], pad: int, device: torch.device) -> tuple[Tensor, Tensor]:
    tokens, lengths = pad_right(seqs, pad)
    return tokens.to(device), lengths.to(device)


# --------------------------------------------------------------------------------------------
# Target masks for the repeated-sequence scores
# --------------------------------------------------------------------------------------------


def _repeat_targets(lengths: Tensor, block: Tensor, width: int, n_copies: int,
                    indexing: Indexing) -> tuple[Int[Tensor, "batch query_pos k"],
                                                 Float[Tensor, "batch 3 query_pos k"]]:
    """Key positions each query reads for the three repeated-sequence scores, and weights.

    The target sets are tiny (at most ``n_copies - 1`` keys per query and score), so instead of
    dense ``[query, key]`` masks the hook gathers these keys from the pattern. Returns
    ``(keys, weights)``: ``keys[b, q, k]`` a key position, ``weights[b, s, q, k]`` the weight of
    that key in score s (prefix-matching, previous-token, duplicate-token), divided by the number
    of queries of score s so that the weighted sum is the mean score; unused slots weigh 0.

    Row b is BOS + n_copies copies of block[b] tokens; its length is lengths[b].
    """
    device = lengths.device
    q = torch.arange(width, device=device)[None, :, None]  # [1, query, 1]
    L = block[:, None, None]  # [batch, 1, 1]
    n = lengths[:, None, None]
    earlier = torch.arange(n_copies - 1, device=device)[None, None, :]  # copy index c'
    real_q = (q >= 1) & (q < n)
    # Position p >= 1 holds token index r = (p - 1) % L of copy c = (p - 1) // L.
    qc, qr = (q - 1).div(L, rounding_mode="floor"), (q - 1) % L
    in_earlier = real_q & (qc >= 1) & (earlier < qc)  # [batch, query, c']
    # Duplicate: the same token in copy c' < c. Prefix: the token right after it.
    duplicate = earlier * L + qr + 1
    prefix = earlier * L + qr + 2
    previous = (q - 1).clamp(min=0)
    zeros = torch.zeros_like(in_earlier[..., :1])
    parts_keys = [prefix, previous.expand_as(zeros), duplicate]
    n_later = (n - 1 - L).clamp(min=1).to(torch.float64)
    n_prev = (n - 1).clamp(min=1).to(torch.float64)
    w_prefix = in_earlier / n_later
    w_prev = real_q / n_prev
    w_dup = in_earlier / n_later
    if indexing == "reference":
        # llm-interpret's num*L + (j % L) + 1 also hits key 1 when the query is a copy's last token.
        extra = real_q & (qc >= 1) & (qr == L - 1)
        parts_keys.append(torch.ones_like(previous).expand_as(zeros))
        w_extra = extra / n_later
    else:
        parts_keys.append(torch.zeros_like(previous).expand_as(zeros))
        w_extra = torch.zeros_like(w_prev).expand_as(zeros)
    keys = torch.cat([k.expand(len(block), width, -1) for k in parts_keys], dim=-1)
    k_pre, k_dup = prefix.shape[-1], duplicate.shape[-1]
    weights = torch.zeros(len(block), 3, width, keys.shape[-1], dtype=torch.float64,
                          device=device)
    weights[:, 0, :, :k_pre] = w_prefix
    weights[:, 0, :, -1:] = w_extra
    weights[:, 1, :, k_pre : k_pre + 1] = w_prev.expand(len(block), width, 1)
    weights[:, 2, :, k_pre + 1 : k_pre + 1 + k_dup] = w_dup
    # keys of unused slots may point past the row: clamp into range (their weight is 0)
    return keys.clamp(0, width - 1), weights


# --------------------------------------------------------------------------------------------
# The forward-pass engine
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _RepeatOutputs:
    scores: Float[Tensor, "seed 3 layer head"]
    loss: Float[Tensor, "seed pos"]  # NaN-padded per-position loss


def _repeat_batch(model: HookedModel, tokens: Tensor, lengths: Tensor, block: Tensor,
                  indexing: Indexing, want_loss: bool,
                  n_copies: int = 4) -> tuple[Tensor, Tensor | None]:
    """One forward pass: ([batch, 3, layer, head] scores, [batch, pos-1] loss or None)."""
    keys, weights = _repeat_targets(lengths, block, tokens.shape[1], n_copies, indexing)
    keys = einops.repeat(keys, "b query k -> b head query k", head=model.n_heads)
    acc = torch.zeros(len(tokens), 3, model.n_layers, model.n_heads, dtype=torch.float64,
                      device=model.device)

    def reduce_pattern(pattern: Tensor, hook: Any, layer: int) -> None:
        # pattern [batch, head, query, key] -> the few target keys per query -> [batch, score,
        # head]; nothing else is kept.
        picked = pattern.gather(-1, keys).double()  # [batch, head, query, k]
        acc[:, :, layer] = torch.einsum("bhqk,bsqk->bsh", picked, weights)

    hooks = [(model.hook_name("pattern", layer), functools.partial(reduce_pattern, layer=layer))
             for layer in range(model.n_layers)]
    with torch.no_grad():
        # without the loss, the unembedding is skipped but for one position
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks,
                                      return_type="logits" if want_loss else None,
                                      **({} if want_loss else {"logits_to_keep": 1}))
        if not want_loss:
            return acc, None
        # cross-entropy without log-probabilities or a float32 copy of the logits
        loss = next_token_nll(logits[:, :-1], tokens[:, 1:])
    return acc, loss


def _run_repeated(model: HookedModel, seqs: list[Tensor], blocks: list[int], *,
                  indexing: Indexing, batch_tokens: int, progress: bool,
                  want_loss: bool, n_copies: int = 4) -> _RepeatOutputs:
    out = torch.zeros(len(seqs), 3, model.n_layers, model.n_heads, dtype=torch.float64)
    width_all = max(len(s) for s in seqs)
    losses = torch.full((len(seqs), width_all - 1), float("nan"), dtype=torch.float64)
    batches = length_batches([len(s) for s in seqs], device_batch_tokens(model.device, batch_tokens))
    for idx in tqdm(batches, desc="prefix-matching", disable=not progress, unit="batch"):
        tokens, lengths = _pad([seqs[i] for i in idx], model.pad_token_id, model.device)
        block = torch.tensor([blocks[i] for i in idx], device=model.device)
        acc, loss = _repeat_batch(model, tokens, lengths, block, indexing, want_loss, n_copies)
        out[idx] = acc.cpu()
        if loss is not None:
            real = torch.arange(loss.shape[1], device=loss.device)[None] < (lengths[:, None] - 1)
            losses[idx, : loss.shape[1]] = torch.where(real, loss.double(), float("nan")).cpu()
    return _RepeatOutputs(scores=out, loss=losses)


_BLOCK_ELEMENTS = 1 << 21  # ~8 MB of float32 per [b, head, block, key] working tensor


class _StopForward(Exception):
    """Raised by the last hook a scan needs, to skip the rest of the forward pass."""


@dataclass(frozen=True, kw_only=True)
class _CopyingOutputs:
    scores: Float[Tensor, "seed layer head"]
    ties: Float[Tensor, "seed layer head"]  # share of queries with a near-tied argmax


def _near_tied(pattern: Float[Tensor, "... query_pos key_pos"],
               tolerance: float) -> Tensor:
    """Whether each attention row's two largest weights are at most ``tolerance`` apart
    (bool ``[..., query_pos]``; a row of one key is never tied).

    >>> _near_tied(torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.4, 0.35, 0.25]]), 0.1)
    tensor([False,  True,  True])
    """
    if pattern.shape[-1] < 2:
        return torch.zeros(pattern.shape[:-1], dtype=torch.bool, device=pattern.device)
    top2 = pattern.topk(2, dim=-1, sorted=True).values.double()  # exact gap, any dtype
    return (top2[..., 0] - top2[..., 1]) <= tolerance


def _copying_batch(model: HookedModel, tokens: Tensor, lengths: Tensor, stream: Stream,
                   W_O: Tensor, b_O: Tensor, W_U: Tensor, b_U: Tensor,
                   tie_tolerance: float = TIE_TOLERANCE) -> tuple[Tensor, Tensor]:
    """One forward pass: [batch, layer, head] copying scores and near-tie shares."""
    width = tokens.shape[1]
    U = W_U[:, tokens]  # [d_model, batch, key]: unembedding columns of the sequence's tokens
    bias_logit = einops.einsum(b_O, U, "layer d_model, d_model batch key -> layer batch key")
    bias_logit = bias_logit + b_U[tokens][None]
    pos = torch.arange(width, device=model.device)
    attendable = pos[None, :] <= pos[:, None]  # [query, key]
    real_q = (pos[None, :] >= 1) & (pos[None, :] < lengths[:, None])  # [batch, query]
    n_attend = (pos + 1).to(model.dtype)  # number of attendable tokens at query j
    block_rows = max(16, _BLOCK_ELEMENTS // max(1, len(tokens) * model.n_heads * width))
    state: dict[str, Tensor] = {}
    acc = torch.zeros(len(tokens), model.n_layers, model.n_heads, dtype=torch.float64,
                      device=model.device)
    ties = torch.zeros_like(acc)

    def keep_embeddings(resid: Tensor, hook: Any) -> None:
        state["embed"] = resid

    def use_embeddings(resid: Tensor, hook: Any) -> Tensor:
        return state["embed"]

    def keep_v(v: Tensor, hook: Any, layer: int) -> None:
        state[f"v{layer}"] = v

    def score(pattern: Tensor, hook: Any, layer: int) -> None:
        v = einops.repeat(state.pop(f"v{layer}"), "b pos kv d -> b pos (kv g) d",
                          g=model.group_size)
        wou = einops.einsum(W_O[layer], U, "head d_head d_model, d_model b key -> b head d_head key")
        v_q = einops.rearrange(v, "b query head d -> b head query d")
        share = torch.empty(v_q.shape[:3], dtype=v_q.dtype, device=v_q.device)
        tied = torch.empty(v_q.shape[:3], dtype=torch.bool, device=v_q.device)
        # Queries go in blocks: keys after a block's last query are causally masked, so each
        # block reads keys 0..stop only, and the [b, head, block, key] working set stays in
        # cache (3-4x faster than one [b, head, T, T] pass at T = 893). Loops over blocks of
        # ~block_rows queries, never over single positions.
        for start in range(0, width, block_rows):
            stop = min(width, start + block_rows)
            # logit of key token i from the head's output at query j: [b, head, block, key]
            logit = torch.matmul(v_q[:, :, start:stop], wou[..., :stop])
            logit.add_(bias_logit[layer][:, None, None, :stop])
            logit.masked_fill_(~attendable[start:stop, :stop], float("-inf"))
            # softmax over the vocabulary, restricted to the attendable keys: its denominator
            # cancels in the ratio below, so exp(logit - max) stands for the probability.
            e = logit.sub_(logit.amax(-1, keepdim=True)).exp_()
            raised = e.sub_(e.sum(-1, keepdim=True) / n_attend[start:stop, None]).relu_()
            # the most-attended key; ties -> the last maximum, as sort()[1][-1] in the reference
            rows = pattern[:, :, start:stop, :stop]
            top = stop - 1 - rows.flip(-1).argmax(-1)
            share[:, :, start:stop] = raised.gather(-1, top[..., None])[..., 0] / raised.sum(-1)
            # near-tied argmax: the runner-up within the tolerance of the top weight (causally
            # masked keys weigh 0, no more than any attendable key: the two largest values are
            # those of the attendable keys)
            tied[:, :, start:stop] = _near_tied(rows, tie_tolerance)
        share = torch.nan_to_num(share, nan=0.0) * real_q[:, None, :]
        acc[:, layer] = (share.sum(-1) / (lengths[:, None] - 1)).double()
        ties[:, layer] = ((tied & real_q[:, None, :]).sum(-1).double()
                          / (lengths[:, None] - 1).double())
        if layer == model.n_layers - 1:
            raise _StopForward  # the rest of the pass (last MLP, unembedding) is not needed

    hooks: list[tuple[str, Callable[..., Any]]] = []
    if stream == "embeddings":
        hooks.append((model.hook_name("resid_pre", 0), keep_embeddings))
        hooks += [(model.hook_name("resid_pre", layer), use_embeddings)
                  for layer in range(1, model.n_layers)]
    for layer in range(model.n_layers):
        hooks.append((model.hook_name("v", layer), functools.partial(keep_v, layer=layer)))
        hooks.append((model.hook_name("pattern", layer), functools.partial(score, layer=layer)))
    try:
        with torch.no_grad():
            model.run_with_hooks(tokens, fwd_hooks=hooks, return_type=None)
    except _StopForward:
        pass  # run_with_hooks removes its hooks in a finally clause
    return acc, ties


def _run_copying(model: HookedModel, seqs: list[Tensor], *, stream: Stream, batch_tokens: int,
                 progress: bool, tie_tolerance: float = TIE_TOLERANCE) -> _CopyingOutputs:
    weights = (model.W_O, model.b_O, model.W_U, model.b_U)
    out = torch.zeros(len(seqs), model.n_layers, model.n_heads, dtype=torch.float64)
    ties = torch.zeros_like(out)
    batches = length_batches([len(s) for s in seqs], device_batch_tokens(model.device, batch_tokens))
    for idx in tqdm(batches, desc="copying", disable=not progress, unit="batch"):
        tokens, lengths = _pad([seqs[i] for i in idx], model.pad_token_id, model.device)
        acc, tied = _copying_batch(model, tokens, lengths, stream, *weights,
                                   tie_tolerance=tie_tolerance)
        out[idx], ties[idx] = acc.cpu(), tied.cpu()
    return _CopyingOutputs(scores=out, ties=ties)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


@result_type
@dataclass(frozen=True, kw_only=True)
class ScanResult:
    """All scores of one scan, by name, plus the induction loss summary.

    Attributes:
        scores: score name -> :class:`~mechicl.results.HeadScores`. The copying score's
            ``extras["argmax_tie_share"]`` holds its near-tied argmax shares
            (:attr:`copying_ties`).
        loss_first_copy: ``[seed]`` mean next-token loss on the first copy (None if not run).
        loss_later_copies: ``[seed]`` mean loss on copies 2.. (induction makes it low).
        params: the scan's settings (scores, seeds, lengths, indexing, stream, mask).
        model: the model's provenance.
    """

    scores: dict[str, HeadScores]
    loss_first_copy: Float[Tensor, " seed"] | None = None
    loss_later_copies: Float[Tensor, " seed"] | None = None
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    model: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write as a folder (:func:`~mechicl.results.write_result`): one subfolder per score
        (a :class:`~mechicl.results.HeadScores` folder), the losses as tensors."""
        tensors = {}
        if self.loss_first_copy is not None and self.loss_later_copies is not None:
            tensors = {"loss_first_copy": self.loss_first_copy,
                       "loss_later_copies": self.loss_later_copies}
        return write_result(path, kind="ScanResult", params=self.params, model=self.model,
                            fields={"scores": list(self.scores)}, tensors=tensors,
                            parts=self.scores)

    def select(self, names: Sequence[str]) -> "ScanResult":
        """The result a scan of only ``names`` gives: each score is computed independently of
        the others (the per-position losses come with the repeated-sequence scores)."""
        missing = [n for n in names if n not in self.scores]
        if missing:
            raise ValueError(f"this scan has no {missing}; it has {list(self.scores)}")
        repeated = any(n in names for n in ("prefix_matching", "previous_token",
                                            "duplicate_token"))
        return dataclasses.replace(
            self, scores={n: s for n, s in self.scores.items() if n in names},
            loss_first_copy=self.loss_first_copy if repeated else None,
            loss_later_copies=self.loss_later_copies if repeated else None,
            params={**self.params, "scores": [n for n in self.scores if n in names]})

    @property
    def copying_ties(self) -> HeadScores | None:
        """Per head, the share of queries whose copying-score argmax is near-tied
        (:func:`copying_ties`); None when the scan has no copying score or was computed
        before mechicl recorded the shares."""
        copying = self.scores.get("copying")
        if copying is None or _TIE_EXTRA not in copying.extras:
            return None
        return copying_ties(copying)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "ScanResult":
        """Read a result written by :meth:`save`, verified
        (:func:`~mechicl.results.read_result`)."""
        folder = read_result(path, "ScanResult")
        scores = {name: HeadScores.load(folder.part(name)) for name in folder.fields["scores"]}
        t = folder.tensors
        return cls(scores=scores, loss_first_copy=t.get("loss_first_copy"),
                   loss_later_copies=t.get("loss_later_copies"), params=folder.params,
                   model=folder.model)


@dataclass(frozen=True)
class FixedLength:
    """One base-sequence length L for every seed index (a named callable, so that it pickles
    and its label is stable)."""

    length: int

    def __call__(self, seed_index: int) -> int:
        return self.length


def as_length(length: int | Callable[[int], int] | None) -> Callable[[int], int]:
    """``length`` as a function of the seed index: None -> :func:`bansal_length`, an integer
    -> :class:`FixedLength`."""
    if length is None:
        return bansal_length
    if isinstance(length, int) and not isinstance(length, bool):
        check_positive("length", length)
        return FixedLength(length)
    return length


def length_label(length: Callable[[int], int]) -> str:
    """How the scan's params record the sequence lengths."""
    return "2*s+25" if length is bansal_length else f"custom: {[length(s) for s in range(3)]}..."


def _repeated_inputs(model: HookedModel, tokens: list[Tensor] | None, n_seeds: int,
                     seed: int, n_copies: int, exclude_top: float, exclude_bottom: float,
                     length: Callable[[int], int],
                     ) -> tuple[list[Tensor], list[int], dict[str, Any]]:
    if tokens is None:
        seqs = repeated_sequences(model, n_seeds=n_seeds, seed=seed, n_copies=n_copies,
                                  exclude_top=exclude_top, exclude_bottom=exclude_bottom,
                                  length=length)
        params = {"n_seeds": n_seeds, "seed": seed, "n_copies": n_copies,
                  "exclude_top": exclude_top, "exclude_bottom": exclude_bottom,
                  "length": length_label(length), "ranking": model.frequency_ranking.method}
        return seqs, [length(s) for s in range(n_seeds)], params
    # User-supplied base sequences (checked by _base_sequences): BOS + base x n_copies.
    bos = torch.tensor([model.bos_token_id])
    seqs = [torch.cat([bos, base.repeat(n_copies)]) for base in tokens]
    return seqs, [len(base) for base in tokens], {"n_copies": n_copies, "tokens": "user-supplied"}


def induction_scan(
    model: HookedModel, *, scores: str | Sequence[str] = SCORES, n_seeds: int = 100,
    seed: int = 0, n_copies: int = 4, exclude_top: float = 0.04, exclude_bottom: float = 0.04,
    indexing: Indexing = "exact", stream: Stream = "embeddings",
    tokens: Sequence[Any] | Tensor | None = None,
    length: int | Callable[[int], int] | None = bansal_length,
    batch_tokens: int = 4096, mask: Mask | None = None, progress: bool = True,
    tie_tolerance: float = TIE_TOLERANCE,
) -> ScanResult:
    """Run the induction-head scores sharing forward passes (one pass over the repeated
    sequences serves prefix-matching, previous-token, duplicate-token and the loss).

    Args:
        model: a :class:`~mechicl.HookedModel` (or a bare ``TransformerBridge``).
        scores: names from :data:`SCORES` (one name alone may be a plain string).
        n_seeds: number of random sequences; seed index s has L = 2s + 25 tokens.
        seed: RNG seed of the token draws.
        n_copies: copies of the L tokens (4 in Bansal et al.); the copying sequences have
            ``n_copies * L`` distinct tokens.
        exclude_top: fraction of the frequency ranking left out at the frequent end.
        exclude_bottom: fraction left out at the rare end.
        indexing: ``"exact"`` targets, or ``"reference"`` for llm-interpret's indexing.
        stream: copying-score input: ``"embeddings"`` (the reference) or ``"residual"`` (each
            layer's real input).
        tokens: base sequences (1-D integer token ids inside the vocabulary, distinct
            within a sequence, no BOS) to use instead of random draws, for the repeated-sequence
            scores; the copying score then uses BOS + each base sequence.
        length: L as a function of the seed index, or one L for every sequence (default:
            Bansal et al.'s 2s + 25).
        batch_tokens: rows x longest sequence per forward pass (memory bound).
        mask: run every forward pass with these heads / FFNs masked
            (:class:`~mechicl.model.masks.Mask`); weight-only parts (the OV images of the copying
            score, ``ov_eigen``) read the unmasked weights. Recorded in each score's params.
        progress: show tqdm progress bars.
        tie_tolerance: the copying score's argmax at a query counts as near-tied when the two
            largest attention weights of its row are at most this far apart (absolute; default
            :data:`TIE_TOLERANCE`); per-head shares: :attr:`ScanResult.copying_ties`.

    Raises:
        ValueError: naming the bad argument and what is allowed, before any forward pass
            (sizes are checked before anything is drawn or allocated).
    """
    model = as_hooked_model(model)
    length = as_length(length)
    if isinstance(scores, str):
        scores = (scores,)
    unknown = [s for s in scores if s not in SCORES]
    if unknown or not scores:
        raise ValueError(f"unknown score names {unknown or list(scores)}; allowed: {list(SCORES)}")
    check_choice("indexing", indexing, ("exact", "reference"))
    check_choice("stream", stream, ("embeddings", "residual"))
    check_positive("batch_tokens", batch_tokens)
    if not tie_tolerance >= 0:  # also rejects NaN
        raise ValueError(f"tie_tolerance={tie_tolerance} must be >= 0")
    repeat_names = [s for s in ("prefix_matching", "previous_token", "duplicate_token")
                    if s in scores]
    bases = None
    if tokens is not None:
        bases = _base_sequences(model, tokens, n_copies, repeat=bool(repeat_names),
                                copying="copying" in scores)
    elif repeat_names or "copying" in scores:
        _check_random_sizes(model, n_seeds, n_copies, length, repeat=bool(repeat_names))
        check_nonnegative("seed", seed)
    if mask is not None:
        with mask.applied(model):
            result = induction_scan(
                model, scores=scores, n_seeds=n_seeds, seed=seed, n_copies=n_copies,
                exclude_top=exclude_top, exclude_bottom=exclude_bottom, indexing=indexing,
                stream=stream, tokens=bases, length=length, batch_tokens=batch_tokens,
                progress=progress, tie_tolerance=tie_tolerance)
        recorded = {name: dataclasses.replace(s, params={**s.params, "mask": mask.to_dict()})
                    for name, s in result.scores.items()}
        return dataclasses.replace(result, scores=recorded,
                                   params={**result.params, "mask": mask.to_dict()})
    if "copying" in scores and model.dtype in (torch.bfloat16, torch.float16):
        logger.warning("copying score in %s: half-precision rounding moves the gap between "
                       "the two largest attention weights by up to ~0.05, far above "
                       "tie_tolerance=%g, and flips argmaxes; the score and its near-tie shares "
                       "are not reproducible across implementations (use float32)",
                       model.dtype, tie_tolerance)
    info = model.info()
    results: dict[str, HeadScores] = {}
    loss_first = loss_later = None

    if "ov_eigen" in scores:  # first: its peak (weights only) then holds nothing else
        results["ov_eigen"] = ov_eigen_copying_scores(model)
    if repeat_names:
        seqs, blocks, params = _repeated_inputs(model, bases, n_seeds, seed, n_copies,
                                                exclude_top, exclude_bottom, length)
        run = _run_repeated(model, seqs, blocks, indexing=indexing, batch_tokens=batch_tokens,
                            progress=progress, want_loss=True, n_copies=n_copies)
        block = torch.tensor(blocks, dtype=torch.long)
        pos = torch.arange(run.loss.shape[1])
        # loss[:, i] predicts position i+1. First copy: i = 1..L-1 (predicting x_2..x_L).
        # Later copies: i >= L+1; the first token of copy 2 (i = L) is unpredictable, as x_L
        # has not been followed by anything yet.
        first = (pos[None] >= 1) & (pos[None] < block[:, None])
        later = pos[None] > block[:, None]
        valid = ~run.loss.isnan()
        loss_first = torch.where(first & valid, run.loss, 0).sum(1) / (first & valid).sum(1)
        loss_later = torch.where(later & valid, run.loss, 0).sum(1) / (later & valid).sum(1)
        extras = {"loss_per_position": run.loss, "block_length": block}
        for i, name in enumerate(("prefix_matching", "previous_token", "duplicate_token")):
            if name in scores:
                p = {**params, "indexing": indexing} if name == "prefix_matching" else params
                results[name] = HeadScores.from_per_seed(
                    name, run.scores[:, i], params={"score": name, **p}, model=info,
                    tokens=seqs, extras=extras)

    if "copying" in scores:
        if bases is None:
            seqs_c = copying_sequences(model, n_seeds=n_seeds, seed=seed, n_copies=n_copies,
                                       exclude_top=exclude_top, exclude_bottom=exclude_bottom,
                                       length=length)
            params_c = {"n_seeds": n_seeds, "seed": seed,
                        "n_tokens": f"{n_copies} * L, L = {length_label(length)}",
                        "exclude_top": exclude_top, "exclude_bottom": exclude_bottom,
                        "ranking": model.frequency_ranking.method}
        else:
            bos = torch.tensor([model.bos_token_id])
            seqs_c = [torch.cat([bos, base]) for base in bases]
            params_c = {"tokens": "user-supplied"}
        run_c = _run_copying(model, seqs_c, stream=stream, batch_tokens=batch_tokens,
                             progress=progress, tie_tolerance=tie_tolerance)
        results["copying"] = HeadScores.from_per_seed(
            "copying", run_c.scores, params={"score": "copying", "stream": stream, **params_c,
                                             "tie_tolerance": tie_tolerance},
            model=info, tokens=seqs_c, extras={_TIE_EXTRA: run_c.ties})

    ordered = {name: results[name] for name in SCORES if name in results}
    settings = {"scores": list(ordered), "n_seeds": n_seeds if bases is None else len(bases),
                "seed": seed, "n_copies": n_copies, "exclude_top": exclude_top,
                "exclude_bottom": exclude_bottom, "indexing": indexing, "stream": stream,
                "length": length_label(length) if bases is None else "user-supplied",
                "tokens": "random" if bases is None else "user-supplied"}
    return ScanResult(scores=ordered, loss_first_copy=loss_first, loss_later_copies=loss_later,
                      params=settings, model=info)


def prefix_matching_scores(model: HookedModel, *, n_seeds: int = 100, seed: int = 0,
                           indexing: Indexing = "exact", **kwargs: Any) -> HeadScores:
    """Prefix-matching score of every head (Bansal et al. 2023); see :func:`induction_scan`
    for the arguments. ``.extras["loss_per_position"]`` holds the per-position loss.

    >>> from mechicl.model import as_hooked_model
    >>> from mechicl.testing import INDUCTION_MODEL_HEADS, induction_model
    >>> s = prefix_matching_scores(as_hooked_model(induction_model()), n_seeds=3, progress=False)
    >>> s.top_heads(1) == [INDUCTION_MODEL_HEADS["induction"]]
    True
    """
    return induction_scan(model, scores=("prefix_matching",), n_seeds=n_seeds, seed=seed,
                          indexing=indexing, **kwargs).scores["prefix_matching"]


def previous_token_scores(model: HookedModel, *, n_seeds: int = 100, seed: int = 0,
                          **kwargs: Any) -> HeadScores:
    """Mean attention on the previous position, on the repeated random sequences."""
    return induction_scan(model, scores=("previous_token",), n_seeds=n_seeds, seed=seed,
                          **kwargs).scores["previous_token"]


def duplicate_token_scores(model: HookedModel, *, n_seeds: int = 100, seed: int = 0,
                           **kwargs: Any) -> HeadScores:
    """Attention on earlier occurrences of the current token (copies 2..), summed per query."""
    return induction_scan(model, scores=("duplicate_token",), n_seeds=n_seeds, seed=seed,
                          **kwargs).scores["duplicate_token"]


def copying_scores(model: HookedModel, *, n_seeds: int = 100, seed: int = 0,
                   stream: Stream = "embeddings", **kwargs: Any) -> HeadScores:
    """Bansal et al.'s raised-logit copying score of every head; see the module docstring.
    ``.extras["argmax_tie_share"]`` holds the near-tie shares (:func:`copying_ties`)."""
    return induction_scan(model, scores=("copying",), n_seeds=n_seeds, seed=seed, stream=stream,
                          **kwargs).scores["copying"]


def copying_ties(copying: HeadScores) -> HeadScores:
    """Per head, the share of the copying score's queries whose most-attended key is
    near-tied: the two largest attention weights of the query's row differ by at most
    ``copying.params["tie_tolerance"]`` (default :data:`TIE_TOLERANCE`).

    At such a query the argmax, and with it the query's term in the copying score (up to
    1/(T-1) of the seed's score), can change with float rounding, so rounding alone can move a
    head's copying score by at most its share (per seed, and so for the mean): a head with a
    high share has a copying score that may depend on the attention implementation. Per seed
    like the score (share of the seed's T-1 queries); ``mean``/``var`` over seeds. Docs:
    ``docs/concepts/induction.md``, "Near-tied argmax".

    Args:
        copying: the ``"copying"`` scores of :func:`induction_scan` or :func:`copying_scores`.

    Raises:
        ValueError: ``copying`` holds no shares (another score, or a result of a mechicl that
            did not record them: recompute it).

    >>> from mechicl.model import as_hooked_model
    >>> from mechicl.testing import tiny_model
    >>> scores = copying_scores(as_hooked_model(tiny_model("llama")), n_seeds=2,
    ...                         length=5, progress=False)
    >>> ties = copying_ties(scores)
    >>> ties.name, tuple(ties.per_seed.shape), bool(((ties.mean >= 0) & (ties.mean <= 1)).all())
    ('copying_ties', (2, 2, 4), True)
    """
    if _TIE_EXTRA not in copying.extras:
        raise ValueError(f"the {copying.name!r} scores hold no near-tie shares "
                         f"(extras[{_TIE_EXTRA!r}]): they come from the copying score of a scan "
                         "by this mechicl; recompute the scan")
    params = {**copying.params, "score": "copying_ties"}
    return HeadScores.from_per_seed("copying_ties", copying.extras[_TIE_EXTRA], params=params,
                                    model=copying.model, tokens=copying.tokens)


OV_VOCAB_SLICE = 8192
"""Vocabulary rows per float64 product when :func:`ov_eigen_copying_scores` forms W_U W_E."""


def ov_eigen_copying_scores(model: HookedModel) -> HeadScores:
    """Olsson et al.'s OV-circuit copying score sum(lambda)/sum(|lambda|) of W_E W_V W_O W_U.

    Uses the folded weights (:meth:`~mechicl.HookedModel.folded_weights`) and the d_head x d_head
    matrix W_O (W_U W_E) W_V, whose nonzero eigenvalues are those of the vocabulary-sized
    circuit; W_U W_E is formed once, in float64, summed over slices of the vocabulary (a
    float64 copy of W_U and W_E would be 2.7 GB for Gemma 3's 262k tokens), and the heads' small
    matrices one layer at a time. A head with a zero OV circuit (no eigenvalue mass) scores 0.
    """
    model = as_hooked_model(model)
    w = model.folded_weights(qk=False)  # the OV circuit only: W_Q, W_K not held
    W_UE = torch.zeros(model.d_model, model.d_model, dtype=torch.float64, device=w.W_U.device)
    for start in range(0, w.W_U.shape[-1], OV_VOCAB_SLICE):  # [d_model, d_model], once
        W_UE += (w.W_U[:, start:start + OV_VOCAB_SLICE].double()
                 @ w.W_E[start:start + OV_VOCAB_SLICE].double())
    # one layer at a time: float64 copies of every layer's W_O and W_V would need 24 bytes per
    # weight (130 GB for OPT-66B); per layer they are a few MB to a few GB
    small = torch.stack([einops.einsum(
        W_O.double(), W_UE, W_V.double(), "head d_head_out d_model_u, d_model_u d_model_e, "
        "head d_model_e d_head_in -> head d_head_out d_head_in")
        for W_O, W_V in zip(w.W_O, w.W_V, strict=True)])  # [layer, head, d_head, d_head]
    eig = torch.linalg.eigvals(small)  # [layer, head, d_head]
    total = eig.abs().sum(-1)
    # A head whose OV circuit is zero has no eigenvalue mass: it copies nothing, score 0.
    score = torch.where(total > 0, eig.sum(-1).real / total.clamp(min=1e-300), 0.0)
    return HeadScores.from_per_seed("ov_eigen", score[None].cpu(),
                                    params={"score": "ov_eigen", "weights": "folded"},
                                    model=model.info())


# --------------------------------------------------------------------------------------------
# The registered analysis
# --------------------------------------------------------------------------------------------

SCORE_ALIASES: dict[str, str] = {
    "prefix": "prefix_matching", "copy": "copying", "ov": "ov_eigen",
    "previous": "previous_token", "prev": "previous_token", "duplicate": "duplicate_token",
    "dup": "duplicate_token", **{name: name for name in SCORES},
}
"""Short names the command line accepts for the scores."""


def parse_scores(text: str) -> list[str]:
    """``"prefix,ov"`` -> ``["prefix_matching", "ov_eigen"]`` (aliases of
    :data:`SCORE_ALIASES`); unknown names raise.

    >>> parse_scores("prefix,copying,prev")
    ['prefix_matching', 'copying', 'previous_token']
    """
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in SCORE_ALIASES]
    if unknown or not names:
        raise ValueError(f"unknown score names {unknown or [text]}; allowed: "
                         f"{sorted(SCORE_ALIASES)}")
    return list(dict.fromkeys(SCORE_ALIASES[n] for n in names))


def _run(call: Call) -> ScanResult:
    o = call.options
    return induction_scan(call.model, scores=o["scores"], n_seeds=o["n_seeds"], seed=call.seed,
                          length=o["length"], indexing=o["indexing"], stream=o["stream"],
                          progress=call.progress, **call.batch())


def _outputs(pairs: Sequence[tuple[Job, ScanResult]], options: Mapping[str, Any]) -> Outputs:
    results, figures, rows = {}, {}, []
    for job, scan in pairs:
        slug = job_stem(job)
        results[f"{slug}-scan"] = scan
        group = kv_group_size(scan.model)
        for name, scores in scan.scores.items():
            figures[f"{slug}-{name}"] = head_heatmap(
                scores, title=f"{slug}: {name.replace('_', ' ')}", kv_group_size=group)
            row: dict[str, Any] = {
                "score": name, "top heads (layer.head)": " ".join(
                    f"{a}.{b}" for a, b in scores.top_heads(min(10, scores.mean.numel()))),
                "max": float(scores.mean.max()), "mean": float(scores.mean.mean())}
            if name == "prefix_matching" and scan.loss_first_copy is not None:
                assert scan.loss_later_copies is not None
                row |= {"loss first copy": float(scan.loss_first_copy.mean()),
                        "loss later copies": float(scan.loss_later_copies.mean())}
            ties = scan.copying_ties if name == "copying" else None
            if ties is not None:
                # how much of the copying score rests on near-tied argmaxes (docs: induction.md)
                row |= {"near-tied argmax share (mean)": float(ties.mean.mean()),
                        "near-tied argmax share (max)": float(ties.mean.max())}
                figures[f"{slug}-copying_ties"] = head_heatmap(
                    ties, title=f"{slug}: copying, share of near-tied argmax queries",
                    zmin=0.0, zmax=1.0, kv_group_size=group, colorbar_title="share")
            rows.append(row)
    return Outputs(results=results, figures=figures, rows=rows)


SCAN = register_analysis(Analysis(
    name="scan", help="induction-head scan of every attention head",
    run=_run, result_type=ScanResult, memory="scan", outputs=_outputs,
    narrow_option="scores", narrow=lambda scan, scores: scan.select(scores),
    sequence_length=lambda model, job, task: longest_scan_sequence(
        job.options["n_seeds"], length=job.options["length"]),
    options=(
        Option(name="scores", type=list, item=str, default=list(SCORES), choices=SCORES,
               sort=True, parse=parse_scores, help="scores, comma-separated (prefix, copying, ov, "
                                        "previous, duplicate; default all)"),
        Option(name="n_seeds", type=int, default=100, minimum=1, flags=("--seeds",),
               help="random sequences (seed index s has L = 2s + 25 tokens)"),
        Option(name="length", type=int, default=None, nullable=True, minimum=2,
               help="one length L for every sequence (default 2s + 25); small vocabularies "
                    "need a short one"),
        Option(name="indexing", type=str, default="exact", choices=("exact", "reference"),
               help="prefix-matching targets: exact, or llm-interpret's indexing"),
        Option(name="stream", type=str, default="embeddings",
               choices=("embeddings", "residual"),
               help="copying-score input stream (default: embeddings, as the reference)"),
        batch_tokens_option(help="rows x longest sequence per forward pass"),
    ),
))
