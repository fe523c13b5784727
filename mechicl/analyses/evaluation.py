"""Generation-free evaluation of in-context learning: choice log-likelihoods, accuracy, answer masks.

Each choice is scored by the log-likelihood of its continuation given the prompt, summed over
its tokens; the prediction is the argmax, as in lm-evaluation-harness's multiple-choice scoring.
The task's :attr:`~mechicl.inputs.tasks.Task.normalization` (or an override) may divide the sum
by the continuation's number of tokens or by the answer's number of characters (lm-evaluation-
harness's ``acc_norm``): :func:`choice_scores`.

Shared-context scoring (the default where the model takes packed rows): each prompt is one
row, its context followed by every choice's tokens but the last, under a block attention mask
(a choice sees the context and its own earlier tokens, no other choice) with position ids that
continue the context in every choice; one pass computes the context once, not once per choice,
and unembeds only the positions whose next token is scored. Models that mix sliding-window and
full attention layers get one mask per layer type, the window counted in positions. Under
several masks, each masked copy of the row joins the pass at the first layer its mask touches
(below it, it equals the unmasked row), so a mask of layer ``L`` costs ``n_layers - L`` blocks.
A pass holds one prompt (unpadded, the batch growing between layers) or several short ones
(left-padded; the masked copies then run every layer), up to
:func:`~mechicl._batching.device_batch_tokens` tokens of packed rows, counting every masked
copy (on a CPU, 1024 tokens of unmasked rows, or 2048 for a pass of masked copies; masks that
leave the lowest layers alone run one prompt per pass, so that their copies share those
layers). The reference, ``scoring="rows"``, gives each choice its own row (context + choice),
batched with right padding, full logits.

:func:`answer_batch` gives tokens plus the mask of the answer (continuation) tokens, for
analyses that need the loss on exactly those tokens (head importance).

Axis names: ``example choice batch pos``.
"""

import functools
import math
import os
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import pandas as pd
import torch
from einops import rearrange, repeat
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechicl._batching import device_batch_tokens, length_batches, pad_right
from mechicl._checks import check_choice
from mechicl.analyses._engine import checked_once, close_to, grow_hook
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
from mechicl.analyses.metrics import logsumexp_slices
from mechicl.inputs.tasks import (
    NORMALIZATIONS,
    TASKS,
    Normalization,
    Prompt,
    Task,
    build_prompts,
    load_task,
)
from mechicl.model.hooked import HookedModel, as_hooked_model
from mechicl.model.masks import ActivationMeans, Mask, masked_logits, mean_activations, stack_hooks
from mechicl.results import read_result, result_type, write_result
from mechicl.stats import wilson_interval

__all__ = ["NORMALIZATION_CHOICES", "SCORINGS", "AnswerBatch", "EvalResult",
           "NormalizationChoice", "answer_batch", "answer_losses", "choice_chars",
           "choice_logprobs", "choice_scores", "encode_prompt", "evaluate", "evaluate_masks",
           "longest_choice_row", "longest_prompt", "masked_choice_logprobs", "packed_length",
           "prompt_means", "resolve_normalization", "shared_context_scores",
           "shared_context_supported"]


# --------------------------------------------------------------------------------------------
# Tokenisation of prompt + continuations
# --------------------------------------------------------------------------------------------


def encode_prompt(model: HookedModel, prompt: Prompt) -> tuple[list[int], list[list[int]]]:
    """The token ids of a prompt's context (BOS first) and of each of its continuations, as
    the scoring sees them: trailing whitespace of the context moves to the continuations, as
    in lm-evaluation-harness. Raises if a continuation is empty or the prompt does not fit the
    model's context."""
    text, conts = prompt.text, list(prompt.continuations)
    # As lm-evaluation-harness: trailing whitespace of the context belongs to the continuation.
    stripped = text.rstrip()
    if stripped != text:
        conts = [text[len(stripped):] + c for c in conts]
        text = stripped
    context = model.encode(text, prepend_bos=True)
    tokenizer = model.tokenizer
    cont_ids = [list(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in conts]
    for choice, ids in zip(conts, cont_ids, strict=True):
        if not ids:
            raise ValueError(f"choice {choice!r} of prompt {prompt.id!r} tokenises to nothing")
    longest = len(context) + max(len(ids) for ids in cont_ids) - 1
    if longest > model.n_ctx:
        raise ValueError(f"prompt {prompt.id!r} needs {longest} tokens, {longest - model.n_ctx} "
                         f"more than the model's context of {model.n_ctx}; use fewer shots")
    return context, cont_ids


def longest_prompt(model: HookedModel, prompts: Sequence[Prompt]) -> int:
    """Tokens in the longest prompt plus answer (the ``seq_len`` for a budget).

    Args:
        model: the model whose tokenizer counts the tokens.
        prompts: :class:`~mechicl.inputs.tasks.Prompt` objects, e.g. from
            :func:`mechicl.inputs.tasks.build_prompts`.
    """
    if not prompts:
        raise ValueError("prompts is empty: need at least one prompt")
    model = as_hooked_model(model)
    # The analyses' own tokenisation (context, then each answer); the longest answer in
    # characters need not be the longest in tokens, so every answer is counted.
    return max(len(context) + max(map(len, answers))
               for context, answers in map(functools.partial(encode_prompt, model), prompts))


def longest_choice_row(model: HookedModel, prompts: Sequence[Prompt]) -> int:
    """Tokens in the longest row that choice scoring runs (the ``seq_len`` of the ``"choices"``
    memory model): a prompt's packed row under shared-context scoring (:func:`packed_length`)
    or its context plus its longest continuation under ``scoring="rows"``, whichever is longer.

    >>> from mechicl.testing import tiny_model
    >>> model = as_hooked_model(tiny_model())
    >>> prompt = Prompt(id="q", text="w1 w2 w3",
    ...                 continuations=(" w4 w5", " w6 w7 w8", " w9 w1"), gold=0)
    >>> longest_prompt(model, [prompt]), longest_choice_row(model, [prompt])
    (7, 8)
    """
    if not prompts:
        raise ValueError("prompts is empty: need at least one prompt")
    model = as_hooked_model(model)
    return max(max(packed_length(enc), len(enc[0]) + max(map(len, enc[1])))
               for enc in map(functools.partial(encode_prompt, model), prompts))


@dataclass(frozen=True)
class _Row:
    tokens: list[int]
    targets: list[tuple[int, int, int, int]]  # (prompt index, choice, position, token id)


Encoded = tuple[Sequence[int], Sequence[Sequence[int]]]  # (context, continuations), token ids


def _rows(encoded: Sequence[Encoded]) -> list[_Row]:
    rows = []
    for p_idx, (context, conts) in enumerate(encoded):
        context = list(context)
        last = len(context) - 1
        if all(len(ids) == 1 for ids in conts):
            # One pass scores every single-token choice: the next-token distribution at `last`.
            rows.append(_Row(context, [(p_idx, c, last, ids[0]) for c, ids in enumerate(conts)]))
            continue
        for c, ids in enumerate(conts):
            # position last + t predicts continuation token t
            rows.append(_Row(context + list(ids), [(p_idx, c, last + t, tok)
                                                   for t, tok in enumerate(ids)]))
    return rows


Scoring = Literal["auto", "shared", "rows"]
SCORINGS: tuple[str, ...] = ("auto", "shared", "rows")


def choice_logprobs(
    model: HookedModel, prompts: Sequence[Prompt], *, mask: Mask | None = None,
    batch_tokens: int = 4096, progress: bool = False, scoring: Scoring = "auto",
) -> tuple[Float[Tensor, "example choice"], Int[Tensor, "example choice"]]:
    """Summed log-probability of each prompt's continuations, and their token counts.

    Args:
        model: the model.
        prompts: the prompts.
        mask: run under this head / FFN mask.
        batch_tokens: tokens per forward pass (rows x longest row).
        progress: show a progress bar.
        scoring: ``"shared"`` (one pass over the shared context, see the module docstring),
            ``"rows"`` (each choice its own row: the reference) or ``"auto"`` (shared where
            the model supports it).

    Returns:
        ``(loglik, n_tokens)``, both ``[example, max_choices]``; missing choices (prompts with
        fewer choices) hold ``-inf`` and 0.
    """
    loglik, n_tokens = masked_choice_logprobs(model, prompts, [mask] if mask is not None else None,
                                              batch_tokens=batch_tokens, progress=progress,
                                              scoring=scoring)
    return loglik[0], n_tokens


def masked_choice_logprobs(
    model: HookedModel, prompts: Sequence[Prompt], masks: Sequence[Mask | None] | None, *,
    batch_tokens: int = 4096, progress: bool = False, scoring: Scoring = "auto",
) -> tuple[Float[Tensor, "mask example choice"], Int[Tensor, "example choice"]]:
    """:func:`choice_logprobs` under each of several masks, many masked copies per forward pass.

    Args:
        masks: the masks (``None``: the unmasked model only, as one mask).
        batch_tokens: tokens per forward pass, counting every masked copy.
        scoring: as in :func:`choice_logprobs`.

    Returns:
        ``(loglik [mask, example, choice], n_tokens [example, choice])``.

    >>> from mechicl.inputs.tasks import Prompt
    >>> prompts = [Prompt(id="q", text="w1 w2 w3", continuations=(" w4 w5", " w6"), gold=0)]
    >>> masks = [None, Mask.remove(model, ffns=[1])]
    >>> shared, n = masked_choice_logprobs(model, prompts, masks)
    >>> rows, _ = masked_choice_logprobs(model, prompts, masks, scoring="rows")
    >>> n.tolist(), bool(torch.allclose(shared, rows, atol=1e-5))
    ([[2, 1]], True)
    """
    model = as_hooked_model(model)
    check_choice("scoring", scoring, SCORINGS)
    if not prompts:
        raise ValueError("no prompts to score")
    mask_list = _mask_list(model, masks)
    if not mask_list:
        raise ValueError("no masks to score under")
    if scoring == "auto":
        scoring = "shared" if shared_context_supported(model) else "rows"
    encoded = [encode_prompt(model, p) for p in prompts]
    score = _shared_logprobs if scoring == "shared" else _row_logprobs
    return score(model, encoded, mask_list, batch_tokens, progress)


def _empty_scores(encoded: Sequence[Encoded], n_masks: int) -> tuple[Tensor, Tensor]:
    """``loglik [mask, example, choice]`` (0 for real choices, -inf for missing ones) and
    ``n_tokens [example, choice]`` (each choice's token count, 0 for missing ones)."""
    n_choices = max(len(conts) for _, conts in encoded)
    loglik = torch.full((n_masks, len(encoded), n_choices), float("-inf"), dtype=torch.float64)
    n_tokens = torch.zeros((len(encoded), n_choices), dtype=torch.long)
    for p_idx, (_, conts) in enumerate(encoded):
        loglik[:, p_idx, : len(conts)] = 0.0
        n_tokens[p_idx, : len(conts)] = torch.tensor([len(ids) for ids in conts])
    return loglik, n_tokens


def _shared_logprobs(model: HookedModel, encoded: Sequence[Encoded],
                     mask_list: list[Mask | None], batch_tokens: int,
                     progress: bool) -> tuple[Tensor, Tensor]:
    """Shared-context scoring in passes of at most ``batch_tokens`` tokens of packed rows
    (counting every masked copy): short prompts are packed several per pass, a long prompt's
    masks are split over several passes."""
    loglik, n_tokens = _empty_scores(encoded, len(mask_list))
    # Masks that change nothing are answered by the unmasked row every pass has; the others
    # go in order of the first layer they touch, so copies in one pass share the most layers.
    plain = [i for i, m in enumerate(mask_list) if m is None or m.is_identity]
    masked = sorted((i for i, m in enumerate(mask_list) if m is not None and not m.is_identity),
                    key=lambda i: mask_list[i].first_layer)  # type: ignore[union-attr]
    # Masks below which copies share layers are run one prompt per pass (only one prompt's
    # copies can join mid-pass); on a CPU passes of masked copies may be larger (no padding).
    shares_layers = any(mask_list[i].first_layer > 0 for i in masked)  # type: ignore[union-attr]
    passes = _shared_passes([packed_length(enc) for enc in encoded], len(masked),
                            device_batch_tokens(model.device, batch_tokens,
                                                kind="copies" if masked else "choices"),
                            alone=shares_layers)
    bar = tqdm(total=len(passes), desc="scoring", disable=not progress, unit="pass")
    for group, (lo, hi) in passes:
        chunk = masked[lo:hi]
        lp = shared_context_scores(model, [encoded[i] for i in group],  # [prompt, row, choice]
                                   [mask_list[i] for i in chunk])
        for j, p_idx in enumerate(group):
            n_ch = len(encoded[p_idx][1])
            if chunk:
                loglik[torch.tensor(chunk), p_idx, :n_ch] = lp[j, 1:, :n_ch]
            if plain:
                loglik[torch.tensor(plain), p_idx, :n_ch] = lp[j, 0, :n_ch]
        bar.update(1)
    bar.close()
    return loglik, n_tokens


def packed_length(encoded: Encoded) -> int:
    """Tokens in a prompt's packed row for shared-context scoring: its context, then every
    continuation's tokens but the last.

    >>> packed_length(([0, 5, 6], [[7, 8], [9], [10, 11, 12]]))
    6
    """
    context, conts = encoded
    return len(context) + sum(len(ids) - 1 for ids in conts)


def _shared_passes(lengths: Sequence[int], n_masked: int, batch_tokens: int, *,
                   alone: bool = False) -> list[tuple[list[int], tuple[int, int]]]:
    """Passes of shared-context scoring: (prompt indices, slice of the ordered masks). A pass
    holds ``prompts x (1 + masks)`` rows of its longest packed row, at most ``batch_tokens``
    tokens; prompts are packed in order of length, and a prompt whose masked copies do not fit
    (or every prompt, with ``alone``) gets passes of its own, each with as many masks as fit
    (at least one)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows = 1 + n_masked
    passes: list[tuple[list[int], tuple[int, int]]] = []
    group: list[int] = []
    for i in order:
        if alone or rows * lengths[i] > batch_tokens:  # alone, masks split over passes
            per_pass = max(1, batch_tokens // lengths[i] - 1)
            passes += [([i], (lo, min(lo + per_pass, n_masked)))
                       for lo in range(0, max(n_masked, 1), per_pass)]
            continue
        width = lengths[group[0]] if group else lengths[i]  # the group's longest row
        if group and rows * width * (len(group) + 1) > batch_tokens:
            passes.append((group, (0, n_masked)))
            group = []
        group.append(i)
    if group:
        passes.append((group, (0, n_masked)))
    return passes


@dataclass(frozen=True)
class _Packed:
    """Prompts packed one per row for shared-context scoring, left-padded to a common width:
    each row holds its context, then every continuation's tokens but the last, each
    continuation attending to the context and to its own earlier tokens only."""

    tokens: Int[Tensor, "prompt pos"]
    segment: Int[Tensor, "prompt pos"]  # -1 padding, 0 the context, 1 + c continuation c
    position: Int[Tensor, "prompt pos"]  # continuations continue their context's positions
    targets: Int[Tensor, "target 4"]  # prompt, kept position, token id, prompt * choices + choice
    keep: int  # positions unembedded, counted from the end: the contexts' last and after

    @classmethod
    def of(cls, prompts: Sequence[Encoded], pad: int) -> "_Packed":
        n_ch = max(len(conts) for _, conts in prompts)
        lengths = [packed_length(enc) for enc in prompts]
        width = max(lengths)
        keep = 1 + max(n - len(context) for n, (context, _) in zip(lengths, prompts, strict=True))
        tokens = torch.full((len(prompts), width), pad, dtype=torch.long)
        segment = torch.full((len(prompts), width), -1, dtype=torch.long)
        position = torch.zeros((len(prompts), width), dtype=torch.long)
        targets = []
        for p, ((context, conts), n) in enumerate(zip(prompts, lengths, strict=True)):
            row, seg, pos = list(context), [0] * len(context), list(range(len(context)))
            start = width - n  # left padding: every row ends at `width`
            last = start + len(context) - 1  # predicts every continuation's first token
            for c, ids in enumerate(conts):
                # continuation token t >= 1 is predicted by token t - 1, placed at the row's end
                at = [last] + [start + len(row) + t for t in range(len(ids) - 1)]
                targets += [(p, k - (width - keep), tok, p * n_ch + c)
                            for k, tok in zip(at, ids, strict=True)]
                row += ids[:-1]
                seg += [1 + c] * (len(ids) - 1)
                pos += range(len(context), len(context) + len(ids) - 1)
            tokens[p, start:] = torch.tensor(row)
            segment[p, start:] = torch.tensor(seg)
            position[p, start:] = torch.tensor(pos)
        return cls(tokens, segment, position, torch.tensor(targets, dtype=torch.long), keep)

    def visible(self, window: int | None = None) -> Bool[Tensor, "prompt 1 query key"]:
        """Which keys each query attends to (a padding query to itself only, so no softmax row
        is empty); with ``window``, only keys fewer than ``window`` positions back, as a
        sliding-window layer."""
        width = self.tokens.shape[1]
        q, k = self.segment[:, :, None], self.segment[:, None, :]
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        visible = causal & (k >= 0) & ((k == 0) | (k == q))  # the context, or the same segment
        if window is not None:
            visible &= (self.position[:, :, None] - self.position[:, None, :]) < window
        return (visible | torch.eye(width, dtype=torch.bool))[:, None]


def _attention_masks(model: HookedModel, packed: _Packed) -> Tensor | dict[str, Tensor]:
    """The packed rows' 4-d attention mask in the form the model's Hugging Face forward takes:
    one mask, or one per layer type where sliding-window layers are mixed with full ones."""
    config = model.bridge.original_model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(config, "sliding_window", None)
    kinds = set(getattr(config, "layer_types", None) or
                ["sliding_attention" if window is not None else "full_attention"])
    if not kinds <= {"full_attention", "sliding_attention"}:
        raise NotImplementedError(f"packed scoring has no mask for layer types {sorted(kinds)}")
    masks = {kind: packed.visible(window if kind == "sliding_attention" else None)
             for kind in kinds}
    return next(iter(masks.values())) if len(masks) == 1 else masks


def shared_context_scores(
    model: HookedModel, prompts: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
    masks: Sequence[Mask] = (),
) -> Float[Tensor, "prompt row choice"]:
    """Summed log-probability of each prompt's continuations after its context, for the
    unmasked model (row 0) and under each mask (row ``1 + i``), off one pass in which each
    prompt's context is computed once.

    Each prompt is one packed row: its context, then every continuation's tokens but the last,
    under a block attention mask (a continuation sees the context and its own earlier tokens)
    with position ids that continue the context in every continuation; only the positions
    whose next token is scored are unembedded. With one prompt the pass starts with the
    unmasked row alone and, at ``hook_resid_pre`` of the first layer a mask touches, a copy of
    that row joins (masks must then be ordered by
    :attr:`~mechicl.model.masks.Mask.first_layer`). Several prompts are left-padded and run
    every masked copy from the first layer.

    Args:
        model: a model whose bridge takes a 4-d attention mask and position ids (see
            :func:`shared_context_supported`).
        prompts: ``(context, continuations)`` token ids per prompt, as from
            :func:`encode_prompt` (BOS first; each continuation non-empty).
        masks: the masks (none: the unmasked row only).

    Returns:
        ``[prompt, 1 + len(masks), max_choices]`` float64 log-likelihoods (``-inf`` for a
        prompt's missing choices).
    """
    n_p, n_rows = len(prompts), 1 + len(masks)
    n_ch = max(len(conts) for _, conts in prompts)
    if any(not ids for _, conts in prompts for ids in conts):
        raise ValueError("every continuation needs at least one token")
    starts = [m.first_layer for m in masks]
    grow = n_p == 1
    if grow and starts != sorted(starts):
        raise ValueError(f"masks must be ordered by their first layer, got {starts}")
    packed = _Packed.of(prompts, model.pad_token_id)
    attn = _attention_masks(model, packed)
    if grow:  # one unpadded row; masked copies join at their first layer (the mask broadcasts)
        hooks = [(model.hook_name("resid_pre", layer), grow_hook(starts.count(layer)))
                 for layer in sorted(set(starts))]
        tokens, position = packed.tokens, packed.position
    else:
        hooks = []
        tokens, position = (repeat(x, "p pos -> (row p) pos", row=n_rows)
                            for x in (packed.tokens, packed.position))
        attn = _map_masks(attn, lambda m: repeat(m, "p 1 q k -> (row p) 1 q k", row=n_rows))
    if masks:
        hooks += stack_hooks(model, [Mask.keep_all(model), *masks], rows_per_mask=n_p)
    with torch.no_grad():
        logits = model.run_with_hooks(
            tokens.to(model.device), fwd_hooks=hooks, return_type="logits",
            attention_mask=_map_masks(attn, lambda m: m.to(model.device)),
            position_ids=position.to(model.device), logits_to_keep=packed.keep)
    if logits.shape[:2] != (n_rows * n_p, packed.keep):
        raise RuntimeError(f"the pass returned logits of shape {tuple(logits.shape)}, not "
                           f"[{n_rows * n_p}, {packed.keep}, vocab]")
    idx = packed.targets.to(logits.device)
    # one logsumexp per kept position, not per target (the context's last position predicts
    # every choice's first token), over slices, so that no copy of the logits is made and the
    # temporaries stay small; in float32 for float32 and half models (~1e-6 nats; in float64
    # it took 13% of a masked scoring's time), the difference in float64
    lse = logsumexp_slices(logits)  # [(row p), pos]
    logits = rearrange(logits, "(row p) pos vocab -> row p pos vocab", row=n_rows)
    lse = rearrange(lse, "(row p) pos -> row p pos", row=n_rows)
    prompt, pos, tok = idx[:, 0], idx[:, 1], idx[:, 2]
    lp = (logits[:, prompt, pos, tok].double()
          - lse[:, prompt, pos].double()).cpu()  # [row, target]
    out = torch.zeros((n_rows, n_p * n_ch), dtype=torch.float64)
    out.index_add_(1, packed.targets[:, 3], lp)
    out = rearrange(out, "row (p choice) -> p row choice", choice=n_ch)
    for p, (_, conts) in enumerate(prompts):
        out[p, :, len(conts):] = float("-inf")
    return out


def _map_masks(masks: Tensor | dict[str, Tensor], fn: Any) -> Tensor | dict[str, Tensor]:
    return {k: fn(v) for k, v in masks.items()} if isinstance(masks, dict) else fn(masks)


_SHARED_OK: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def shared_context_supported(model: HookedModel) -> bool:
    """Whether shared-context scoring reproduces per-choice rows on this model (checked once
    per model on a short probe under a mask, one prompt alone and two packed: False e.g. for
    models whose forward ignores a 4-d attention mask or position ids)."""
    model = as_hooked_model(model)
    context = list(range(3, 3 + min(8, model.d_vocab - 3)))
    conts = [[3, 4], [5], [6, 7, 8]]
    masks = [Mask.keep_all(model), Mask.remove(model, ffns=[model.n_layers - 1])
             if model.hook_name("mlp_out", 0) in model.hook_dict
             else Mask.remove(model, heads=[(model.n_layers - 1, 0)])]
    encoded = [(context, conts), (context[:4], conts)]

    def same() -> bool:
        alone = shared_context_scores(model, encoded[:1], masks[1:])
        packed = shared_context_scores(model, encoded, masks[1:])  # [prompt, row, choice]
        rows, _ = _row_logprobs(model, encoded, masks, 1 << 30, False)  # [row, prompt, choice]
        want = rearrange(rows, "row p choice -> p row choice")
        shared = torch.cat([alone, packed])
        return close_to(shared, torch.cat([want[:1], want]))

    return checked_once(_SHARED_OK, model, same, "shared-context scoring")


def _row_logprobs(model: HookedModel, encoded: Sequence[Encoded], mask_list: list[Mask | None],
                  batch_tokens: int, progress: bool) -> tuple[Tensor, Tensor]:
    """The reference scoring: every choice its own row (context + choice), batched with right
    padding, full logits."""
    n_masks = len(mask_list)
    loglik, n_tokens = _empty_scores(encoded, n_masks)
    rows = _rows(encoded)
    batches = length_batches([len(r.tokens) for r in rows], batch_tokens)
    total = sum(math.ceil(n_masks / _masks_per_pass(batch_tokens, len(b), len(rows[b[-1]].tokens)))
                for b in batches)
    bar = tqdm(total=total, desc="scoring", disable=not progress, unit="pass")
    for batch in batches:
        tokens, lengths = pad_right([rows[i].tokens for i in batch], model.pad_token_id)
        attn = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).long()
        flat = [(b, pos, tok, p_idx, c) for b, i in enumerate(batch)
                for p_idx, c, pos, tok in rows[i].targets]
        idx = torch.tensor(flat, dtype=torch.long)  # [target, 5]
        per_pass = _masks_per_pass(batch_tokens, *tokens.shape)
        for start in range(0, n_masks, per_pass):
            chunk = mask_list[start: start + per_pass]
            logits = _chunk_logits(model, tokens, attn, chunk)  # [mask, batch, pos, vocab]
            picked = logits[:, idx[:, 0], idx[:, 1]].double()  # [mask, target, d_vocab]
            tok = repeat(idx[:, 2], "target -> mask target 1", mask=len(chunk)).to(picked.device)
            lp = picked.gather(-1, tok)[..., 0] - torch.logsumexp(picked, -1)  # [mask, target]
            for m in range(len(chunk)):
                loglik[start + m].index_put_((idx[:, 3], idx[:, 4]), lp[m].cpu(), accumulate=True)
            bar.update(1)
    bar.close()
    return loglik, n_tokens


def _mask_list(model: HookedModel, masks: Sequence[Mask | None] | None) -> list[Mask | None]:
    """``[None]`` (one unmasked pass, no hooks) for ``None``; otherwise the masks, with any
    ``None`` among several replaced by the identity mask."""
    if masks is None:
        return [None]
    out = list(masks)
    if len(out) > 1:
        out = [Mask.keep_all(model) if m is None else m for m in out]
    return out


def _chunk_logits(model: HookedModel, tokens: Tensor, attn: Tensor,
                  chunk: Sequence[Mask | None]) -> Tensor:
    """``[mask, batch, pos, vocab]`` logits: ``[None]`` is one plain pass with no hooks."""
    tokens, attn = tokens.to(model.device), attn.to(model.device)
    with torch.no_grad():
        if chunk[0] is None:
            return model(tokens, attention_mask=attn, return_type="logits")[None]
        return masked_logits(model, tokens, attn, chunk)


def _masks_per_pass(batch_tokens: int, rows: int, length: int) -> int:
    return max(1, batch_tokens // max(1, rows * length))


# --------------------------------------------------------------------------------------------
# Ranking the choices: the task's normalization
# --------------------------------------------------------------------------------------------

NormalizationChoice = Literal["task", "none", "tokens", "chars"]
NORMALIZATION_CHOICES: tuple[str, ...] = ("task", *NORMALIZATIONS)
"""Values of the ``normalization`` argument of :func:`evaluate` and
:func:`~mechicl.analyses.pruning.prune_curve` (and of the ``accuracy`` analysis's option):
``"task"``, the task's own :attr:`~mechicl.inputs.tasks.Task.normalization`, or one of
:data:`~mechicl.inputs.tasks.NORMALIZATIONS` to override it."""


def resolve_normalization(normalization: str, task: Task | str | None) -> Normalization:
    """The rule that ranks the choices: ``normalization`` itself, or for ``"task"`` the task's
    own (a registered task's name is looked up; without a task, or for a name that is not
    registered, ``"none"``).

    >>> resolve_normalization("task", "openbookqa"), resolve_normalization("none", "openbookqa")
    ('chars', 'none')
    >>> resolve_normalization("task", "antonyms")
    'none'
    """
    check_choice("normalization", normalization, NORMALIZATION_CHOICES)
    if normalization != "task":
        return cast(Normalization, normalization)
    if isinstance(task, Task):
        return task.normalization
    if isinstance(task, str) and task in TASKS:
        return load_task(task).normalization
    return "none"


def choice_chars(prompts: Sequence[Prompt]) -> Int[Tensor, "example choice"]:
    """Each choice's number of characters, ``[example, max_choices]`` (0 for missing choices):
    its continuation without the leading whitespace (the task's ``answer_prefix``), as
    lm-evaluation-harness's ``acc_norm`` divides by ``len(choice)``, its ``target_delimiter``
    (a space) not counted.

    >>> choice_chars([Prompt(id="q", text="Q:", continuations=(" yes", " no way"), gold=0),
    ...               Prompt(id="r", text="Q:", continuations=(" a",), gold=0)]).tolist()
    [[3, 6], [1, 0]]
    """
    n_choices = max(len(p.continuations) for p in prompts)
    out = torch.zeros((len(prompts), n_choices), dtype=torch.long)
    for i, p in enumerate(prompts):
        out[i, : len(p.continuations)] = torch.tensor([len(c.lstrip())
                                                       for c in p.continuations])
    return out


def choice_scores(loglik: Float[Tensor, "*mask example choice"],
                  n_tokens: Int[Tensor, "example choice"], n_chars: Int[Tensor, "example choice"],
                  normalization: Normalization) -> Float[Tensor, "*mask example choice"]:
    """What the prediction is the argmax of: the summed log-likelihood (``"none"``), divided by
    the continuation's tokens (``"tokens"``) or by the answer's characters (``"chars"``,
    :func:`choice_chars`); counts below 1 count as 1, so missing choices stay ``-inf``.

    >>> loglik = torch.tensor([[-3.0, -4.0]])
    >>> [choice_scores(loglik, torch.tensor([[1, 4]]), torch.tensor([[2, 10]]), rule).argmax(-1)
    ...  .item() for rule in ("none", "tokens", "chars")]
    [0, 1, 1]
    """
    check_choice("normalization", normalization, NORMALIZATIONS)
    if normalization == "none":
        return loglik
    counts = n_tokens if normalization == "tokens" else n_chars
    return loglik / counts.clamp(min=1).to(loglik.dtype)


@dataclass(frozen=True, kw_only=True)
class AnswerBatch:
    """Prompt + answer tokens, padded, with the mask of the answer tokens.

    Attributes:
        tokens: ``[batch, pos]`` (BOS, prompt, continuation, right padding).
        attention_mask: ``[batch, pos]`` 1 for real tokens.
        answer_mask: ``[batch, pos]`` True at the continuation's tokens: the loss on exactly
            these is ``-log p(tokens[:, i] | tokens[:, :i])`` for ``answer_mask[:, i]``, i.e.
            the logits at ``i - 1``.
        prompt_ids: the prompt (query example) of each row.
    """

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    answer_mask: Bool[Tensor, "batch pos"]
    prompt_ids: tuple[str, ...]


def answer_batch(model: HookedModel, prompts: Sequence[Prompt],
                 which: Literal["gold"] | int = "gold") -> AnswerBatch:
    """Tokens of each prompt followed by its gold (or ``which``-th) continuation, with the
    answer-token mask."""
    model = as_hooked_model(model)
    seqs, masks = [], []
    for prompt in prompts:
        context, conts = encode_prompt(model, prompt)
        choice = prompt.gold if which == "gold" else int(which)
        if not 0 <= choice < len(conts):
            raise ValueError(f"which={which!r} is not a choice index of prompt {prompt.id!r}")
        seqs.append(context + conts[choice])
        masks.append([False] * len(context) + [True] * len(conts[choice]))
    tokens, lengths = pad_right(seqs, model.pad_token_id)
    attention = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).long()
    answer, _ = pad_right([[int(m) for m in row] for row in masks], 0)
    answer = answer.bool()
    return AnswerBatch(tokens=tokens.to(model.device), attention_mask=attention.to(model.device),
                       answer_mask=answer.to(model.device),
                       prompt_ids=tuple(p.id for p in prompts))


def prompt_means(model: HookedModel, prompts: Sequence[Prompt], *,
                 batch_tokens: int = 4096) -> ActivationMeans:
    """Mean head and MLP outputs over ``prompts``, each followed by its gold answer (the
    sequences of :func:`answer_batch`, padding left out): what mean ablation replaces a head or
    FFN with when an analysis is given no means.

    >>> from mechicl.testing import tiny_model
    >>> model = as_hooked_model(tiny_model("gpt2"))
    >>> means = prompt_means(model, [Prompt(id="a", text="w1 w2", continuations=(" w3",), gold=0)])
    >>> tuple(means.z.shape) == (model.n_layers, model.n_heads, model.d_head)
    True
    """
    batch = answer_batch(model, prompts)
    return mean_activations(model, batch.tokens, attention_mask=batch.attention_mask,
                            batch_tokens=batch_tokens)


def answer_losses(
    model: HookedModel, batch: AnswerBatch, masks: Sequence[Mask | None] | None = None, *,
    batch_tokens: int = 4096, progress: bool = False,
) -> Float[Tensor, "mask example"]:
    """Mean cross-entropy on each example's answer tokens, under each mask.

    The loss of example ``i`` is the mean of ``-log p(tokens[i, t] | tokens[i, :t])`` over its
    answer positions ``t`` (``batch.answer_mask``): the loss a lm-evaluation-harness style
    ``labels`` tensor gives for one example.

    Args:
        model: the model.
        batch: prompts + answers from :func:`answer_batch`.
        masks: the masks (``None``: the unmasked model only).
        batch_tokens: rows x longest row per forward pass, counting every masked copy.
        progress: show a progress bar.

    Returns:
        ``[mask, example]`` losses (float64).
    """
    model = as_hooked_model(model)
    mask_list = _mask_list(model, masks)
    n_masks, n_ex = len(mask_list), batch.tokens.shape[0]
    out = torch.zeros(n_masks, n_ex, dtype=torch.float64)
    lengths = batch.attention_mask.sum(-1).tolist()
    row_batches = length_batches(lengths, batch_tokens)
    bar = tqdm(total=len(row_batches) * n_masks, desc="loss", disable=not progress, unit="row")
    for rows in row_batches:
        width = max(lengths[i] for i in rows)
        tokens = batch.tokens[rows, :width]
        attn = batch.attention_mask[rows, :width]
        target = batch.answer_mask[rows, :width].clone()
        target[:, 0] = False
        b_idx, pos = torch.nonzero(target, as_tuple=True)  # answer token (b, pos), logits at pos-1
        counts = target.sum(-1).to(torch.float64).cpu()
        per_pass = _masks_per_pass(batch_tokens, *tokens.shape)
        for start in range(0, n_masks, per_pass):
            chunk = mask_list[start: start + per_pass]
            logits = _chunk_logits(model, tokens, attn, chunk)
            picked = logits[:, b_idx, pos - 1].double()  # [mask, target, d_vocab]
            tok = repeat(tokens[b_idx, pos], "target -> mask target 1", mask=len(chunk))
            nll = torch.logsumexp(picked, -1) - picked.gather(-1, tok)[..., 0]  # [mask, target]
            summed = torch.zeros(len(chunk), len(rows), dtype=torch.float64, device=nll.device)
            summed.index_add_(1, b_idx, nll)
            out[start: start + len(chunk), rows] = summed.cpu() / counts.clamp(min=1)
            bar.update(len(chunk))
    bar.close()
    return out


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@result_type
@dataclass(frozen=True, kw_only=True)
class EvalResult:
    """Accuracy of a model on a task at k shots.

    Attributes:
        task: task name.
        shots: demonstrations per prompt.
        accuracy: share of correct predictions.
        ci_low, ci_high: 95% Wilson confidence interval of the accuracy.
        n: number of evaluated examples.
        chance: accuracy of uniform guessing.
        predictions: one row per example: ``id``, ``gold``, ``prediction``, ``correct``,
            ``predicted_answer``, ``gold_answer``, ``loglik`` (summed, per choice),
            ``n_tokens`` and ``n_chars`` (per choice: what ``"tokens"`` and ``"chars"`` divide
            by), ``demo_ids``, and the examples' metadata columns; any rule's accuracy can be
            recomputed from them (:meth:`accuracy_with`).
        params: the evaluation settings (shots, n, seed, ``normalization``: the rule that
            ranked the choices, prompt ids, mask, template, ...).
        model: the model's provenance.
    """

    task: str
    shots: int
    accuracy: float
    ci_low: float
    ci_high: float
    n: int
    chance: float
    predictions: pd.DataFrame = field(repr=False)
    params: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def normalization(self) -> str:
        """The rule that ranked the choices (:data:`~mechicl.inputs.tasks.NORMALIZATIONS`; for
        results written before it was recorded, ``"tokens"`` if they were length-normalised,
        else ``"none"``)."""
        if "normalization" in self.params:
            return str(self.params["normalization"])
        return "tokens" if self.params.get("length_normalize") else "none"

    def accuracy_with(self, normalization: Normalization) -> float:
        """The accuracy had the choices been ranked by ``normalization``, recomputed from the
        stored per-choice log-likelihoods and lengths: e.g. lm-evaluation-harness's ``acc``
        (``"none"``) and ``acc_norm`` (``"chars"``) of one result.

        >>> from mechicl.inputs.tasks import Example
        >>> task = Task(name="toy", template="{input} w7", normalization="chars", examples=tuple(
        ...     Example(id=str(i), input=f"w{10 + i}", choices=("w1 w2 w3", "w4"), gold=i % 2)
        ...     for i in range(8)))
        >>> result = evaluate(model, task, shots=1, n=4)
        >>> result.normalization, result.accuracy_with("chars") == result.accuracy
        ('chars', True)
        """
        check_choice("normalization", normalization, NORMALIZATIONS)
        preds = self.predictions
        if normalization == "chars" and "n_chars" not in preds:
            raise ValueError("this result has no character counts (written before mechicl "
                             "recorded them): recompute it to rank by characters")
        correct = 0
        for row in preds.itertuples(index=False):
            loglik = torch.tensor(list(row.loglik), dtype=torch.float64)[None]
            n_tok = torch.tensor(list(row.n_tokens), dtype=torch.long)[None]
            n_chars = (torch.tensor(list(row.n_chars), dtype=torch.long)[None]
                       if normalization == "chars" else n_tok)
            pred = int(choice_scores(loglik, n_tok, n_chars, normalization).argmax(-1))
            correct += pred == int(row.gold)
        return correct / len(preds) if len(preds) else float("nan")

    def summary(self) -> dict[str, Any]:
        return {"task": self.task, "shots": self.shots, "accuracy": self.accuracy,
                "ci_low": self.ci_low, "ci_high": self.ci_high, "n": self.n,
                "chance": self.chance, "normalization": self.normalization}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write as a folder (:func:`~mechicl.results.write_result`: the summary as fields, the
        predictions as ``predictions.parquet``), atomically."""
        return write_result(path, kind="EvalResult", params=self.params, model=self.model,
                            fields=self.summary(), tables={"predictions": self.predictions})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "EvalResult":
        """Read a result written by :meth:`save`, verified
        (:func:`~mechicl.results.read_result`)."""
        folder = read_result(path, "EvalResult")
        preds = folder.tables["predictions"]
        for column in preds.columns:  # parquet gives list columns back as numpy arrays
            if len(preds) and isinstance(preds[column].iloc[0], np.ndarray):
                preds[column] = preds[column].map(lambda a: a.tolist())
        f = folder.fields
        return cls(task=f["task"], shots=f["shots"], accuracy=f["accuracy"],
                   ci_low=f["ci_low"], ci_high=f["ci_high"], n=f["n"], chance=f["chance"],
                   predictions=preds, params=folder.params, model=folder.model)


def evaluate(
    model: HookedModel, task: Task | str, *, shots: int = 5, n: int | None = None, seed: int = 0,
    normalization: NormalizationChoice = "task", mask: Mask | None = None,
    batch_tokens: int = 4096, progress: bool = False, prompts: Sequence[Prompt] | None = None,
    **prompt_options: Any,
) -> EvalResult:
    """Evaluate ``model`` on ``task`` with ``shots`` demonstrations per prompt.

    Args:
        model: a :class:`~mechicl.HookedModel` or bridge.
        task: a :class:`~mechicl.inputs.tasks.Task` or a registered task name.
        shots: demonstrations per prompt.
        n: number of evaluation examples (default: the whole evaluation pool).
        seed: seeds example selection and demonstrations.
        normalization: how the choices are ranked (:func:`choice_scores`): ``"task"`` (the
            task's :attr:`~mechicl.inputs.tasks.Task.normalization`), or ``"none"`` (summed
            log-likelihood, lm-evaluation-harness's ``acc``), ``"tokens"`` (per token) or
            ``"chars"`` (per character of the answer, lm-evaluation-harness's ``acc_norm``).
        mask: evaluate with these heads / FFNs masked (:class:`~mechicl.model.masks.Mask`).
        batch_tokens: rows x longest row per forward pass.
        progress: show a progress bar.
        prompts: evaluate these prompts of ``task`` (e.g. a slice of
            :func:`~mechicl.inputs.tasks.build_prompts`) instead of building them; ``n``, ``seed`` and
            prompt options then do not apply.
        **prompt_options: passed to :func:`~mechicl.inputs.tasks.build_prompts` (``balanced``,
            ``order``, ``corruption``, ``corruption_rate``, ``unrelated_labels``).
    """
    return evaluate_masks(model, task, [mask], shots=shots, n=n, seed=seed,
                          normalization=normalization, batch_tokens=batch_tokens,
                          progress=progress, prompts=prompts, **prompt_options)[0]


def evaluate_masks(
    model: HookedModel, task: Task | str, masks: Sequence[Mask | None], *, shots: int = 5,
    n: int | None = None, seed: int = 0, normalization: NormalizationChoice = "task",
    batch_tokens: int = 4096, progress: bool = False, prompts: Sequence[Prompt] | None = None,
    **prompt_options: Any,
) -> list[EvalResult]:
    """:func:`evaluate` under each of several masks, all scored together: the masked copies
    of each prompt share its unmasked layers below the first layer their mask touches (see
    :func:`masked_choice_logprobs`). Equals one :func:`evaluate` call per mask.

    Args:
        model: a :class:`~mechicl.HookedModel` or bridge.
        task: a :class:`~mechicl.inputs.tasks.Task` or a registered task name.
        masks: the masks (``None``: the unmasked model).
        shots: demonstrations per prompt.
        n: number of evaluation examples (default: the whole evaluation pool).
        seed: seeds example selection and demonstrations.
        normalization: how the choices are ranked (``"task"``: the task's rule; see
            :func:`evaluate`).
        batch_tokens: tokens per forward pass, counting every masked copy.
        progress: show a progress bar.
        prompts: evaluate these prompts of ``task`` instead of building them.
        **prompt_options: passed to :func:`~mechicl.inputs.tasks.build_prompts`.

    Returns:
        One :class:`EvalResult` per mask, in order.

    >>> no_ffn0 = Mask.remove(model, ffns=[0])
    >>> results = evaluate_masks(model, "antonyms", [None, no_ffn0], shots=1, n=6)
    >>> [r.n for r in results]
    [6, 6]
    >>> results[1].accuracy == evaluate(model, "antonyms", shots=1, n=6, mask=no_ffn0).accuracy
    True
    """
    model = as_hooked_model(model)
    task_obj = load_task(task) if isinstance(task, str) else task
    rule = resolve_normalization(normalization, task_obj)
    if prompts is None:
        prompts = build_prompts(task_obj, shots=shots, n=n, seed=seed, **prompt_options)
    else:
        if prompt_options or n is not None:
            raise ValueError(f"n={n!r} and prompt options {sorted(prompt_options)} only apply "
                             "when building prompts; with prompts= give neither")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts= is empty")
        ids = {e.id for e in task_obj.examples}
        foreign = [p.id for p in prompts if p.id not in ids]
        if foreign:
            raise ValueError(f"prompts {foreign[:5]} are not examples of task {task_obj.name!r}")
    if not masks:
        raise ValueError("masks is empty: give at least one mask (None for the unmasked model)")
    loglik, n_tok = masked_choice_logprobs(model, prompts, list(masks), batch_tokens=batch_tokens,
                                           progress=progress)
    n_chars = choice_chars(prompts)
    return [_eval_result(model, task_obj, prompts, loglik[i], n_tok, n_chars, shots=shots,
                         seed=seed, normalization=rule, mask=mask,
                         prompt_options=prompt_options)
            for i, mask in enumerate(masks)]


def _eval_result(model: HookedModel, task_obj: Task, prompts: Sequence[Prompt], loglik: Tensor,
                 n_tok: Tensor, n_chars: Tensor, *, shots: int, seed: int,
                 normalization: Normalization, mask: Mask | None,
                 prompt_options: Mapping[str, Any]) -> EvalResult:
    """An :class:`EvalResult` from the choices' log-likelihoods ``[example, choice]``."""
    pred = choice_scores(loglik, n_tok, n_chars, normalization).argmax(-1)
    gold = torch.tensor([p.gold for p in prompts])
    correct = pred == gold
    k = int(correct.sum())
    low, high = wilson_interval(k, len(prompts))
    examples = {e.id: e for e in task_obj.examples}
    records = []
    for i, p in enumerate(prompts):
        ex = examples[p.id]
        n_ch = len(p.continuations)
        records.append({
            "id": p.id, "gold": p.gold, "prediction": int(pred[i]), "correct": bool(correct[i]),
            "gold_answer": ex.choices[p.gold], "predicted_answer": ex.choices[int(pred[i])],
            "loglik": loglik[i, :n_ch].tolist(), "n_tokens": n_tok[i, :n_ch].tolist(),
            "n_chars": n_chars[i, :n_ch].tolist(), "demo_ids": list(p.demo_ids),
            **{f"meta.{k}": v for k, v in ex.meta.items()},
        })
    config = {"shots": shots, "n": len(prompts), "seed": seed, "normalization": normalization,
              "prompt_ids": [p.id for p in prompts],
              "mask": None if mask is None else mask.to_dict(),
              **prompt_options, "template": task_obj.template, "separator": task_obj.separator,
              "source": task_obj.source, "licence": task_obj.licence}
    if task_obj.provenance:  # rows of a task file dropped with errors="skip", and why
        config["task_provenance"] = dict(task_obj.provenance)
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}
    chance = float(np.mean([1.0 / len(p.continuations) for p in prompts]))
    return EvalResult(task=task_obj.name, shots=shots, accuracy=k / len(prompts), ci_low=low,
                      ci_high=high, n=len(prompts), chance=chance,
                      predictions=pd.DataFrame.from_records(records), params=config,
                      model=model.info())


# --------------------------------------------------------------------------------------------
# The registered analysis
# --------------------------------------------------------------------------------------------


def task_prompts(task: Task, job: Job) -> list[Prompt]:
    """The prompts a per-task job scores: the seeded k-shot list of ``task``, without its first
    ``skip`` prompts, then ``n`` of them (all if ``n`` is None)."""
    n, skip = job.options.get("n"), job.options.get("skip", 0)
    prompts = build_prompts(task, shots=job.shots or 0, seed=job.seed,
                            n=None if n is None else skip + n)[skip:]
    if not prompts:
        raise ValueError(f"task {task.name!r} has {len(task.pools()[1])} evaluation examples: "
                         f"skip={skip} leaves none for evaluation")
    return prompts


def _run(call: Call) -> EvalResult:
    return evaluate(call.model, call.task, shots=call.shots, seed=call.seed,
                    prompts=task_prompts(call.task, call.job),
                    normalization=call.options["normalization"], progress=call.progress,
                    **call.batch())


def _outputs(pairs: Sequence[tuple[Job, EvalResult]], options: Mapping[str, Any]) -> Outputs:
    return Outputs(results={job_stem(job): result for job, result in pairs},
                   rows=[result.summary() for _, result in pairs])


ACCURACY = register_analysis(Analysis(
    name="accuracy", command="eval", help="k-shot accuracy of a model on ICL tasks",
    run=_run, result_type=EvalResult, per_task=True, memory="choices",
    sequence_length=lambda model, job, task: longest_choice_row(model, task_prompts(task, job)),
    outputs=_outputs,
    options=(
        Option(name="n", type=int, default=None, nullable=True, minimum=1,
               help="evaluated prompts per task and shot count (default: the whole pool)"),
        Option(name="skip", type=int, default=0, minimum=0,
               help="leave out the first prompts of the seeded list (e.g. those an importance "
                    "map was computed on)"),
        Option(name="normalization", type=str, default="task", choices=NORMALIZATION_CHOICES,
               help="how choices are ranked: task (the task's own rule), none (summed "
                    "log-likelihood, lm-eval acc), tokens (per token) or chars (per character "
                    "of the answer, lm-eval acc_norm)"),
        batch_tokens_option(help="rows x longest row per forward pass"),
    ),
))
