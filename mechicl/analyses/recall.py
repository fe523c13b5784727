"""Memorised vs in-context answers (Yu, Merullo & Pavlick 2023, "Characterizing Mechanisms for
Factual Recall in Language Models").

A prompt states a counterfactual fact ("The capital of Afghanistan is Freetown. Q: What is the
capital of Afghanistan? A:"); the model answers with the capital it read in the context (the
*in-context* answer, `` Freetown``) or with the one it memorised (`` Kabul``). Three analyses:

* ``answer_attribution`` (:func:`answer_attribution`): per head and per FFN, the *direct*
  contribution to ``logit(in-context) - logit(memorised)`` at the answer (last) position, by
  direct logit attribution through the final norm with the norm's scale **frozen at its clean
  value** (RMSNorm: ``x / rms(x)``; LayerNorm: ``(x - mean x) / std(x)``; the scale ``1 / rms``
  or ``1 / std`` is the clean run's), and its exact counterpart: the change of the logit
  difference when the component's direct path to the logits is removed (its output subtracted
  from the final residual stream), the final norm **recomputed**. Per prompt, so intervals over
  prompts come out (percentile bootstrap); the embeddings and biases are the remainder, so the
  components sum to the logit difference.
* ``value_scaling`` (:func:`value_scaling`): the chosen heads' outputs (``hook_z``; equivalently
  their value vectors, since ``z = A v`` is linear in ``v``) multiplied by each factor, and the
  share of prompts answered with the in-context capital (full answers compared by summed
  log-likelihood), for the top heads of each sign of the attribution against random heads of
  the same count.
* ``answer_determinants`` (:func:`answer_determinants`): per example, whether the model takes
  the in-context answer, against a tokenizer frequency-rank *proxy* of the country and of the
  in-context city, and against the model's own closed-book (0-shot, no context) log-probability
  of the memorised answer.

Axis names: ``pair prompt factor condition layer head component resample d_model``.
"""

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from einops import einsum, rearrange
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechicl._batching import device_batch_tokens
from mechicl._checks import check_choice
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
from mechicl.analyses.causal import MIN_DRAWS, random_heads, top_heads
from mechicl.analyses.evaluation import choice_logprobs, longest_choice_row, masked_choice_logprobs
from mechicl.analyses.overlap import (
    bootstrap_ci,
    percentile_interval,
    percentile_intervals,
    permutation_null,
    spearman,
    spearman_rows,
    top_k,
    top_k_overlap,
)
from mechicl.inputs.pairs import PAIR_GENERATORS, PromptPairs, make_pairs
from mechicl.inputs.tasks import Prompt, Task, build_prompts, load_task
from mechicl.model.hooked import HookedModel, as_hooked_model
from mechicl.model.masks import Mask
from mechicl.plotting import head_heatmap, layer_bars
from mechicl.results import (
    HeadScores,
    LayerScores,
    ResultError,
    read_result,
    result_type,
    write_result,
)
from mechicl.stats import bootstrap_weights, paired_bootstrap, wilson_interval

logger = logging.getLogger(__name__)

__all__ = [
    "ANSWER_ATTRIBUTION",
    "ANSWER_DETERMINANTS",
    "CLOSED_BOOK",
    "CONDITIONS",
    "DEFAULT_FACTORS",
    "DETERMINANTS",
    "FINAL_NORMS",
    "SCORE_KINDS",
    "VALUE_SCALING",
    "AnswerAttribution",
    "AnswerDeterminants",
    "DirectEffects",
    "ResidualComponents",
    "ValueScaling",
    "answer_attribution",
    "answer_determinants",
    "direct_effects",
    "residual_components",
    "scaling_masks",
    "value_scaling",
]

SCORE_KINDS: tuple[str, ...] = ("dla", "exact")
"""The two per-component scores: direct logit attribution with the final norm's scale frozen
(``"dla"``) and the exact change when the component's direct path is removed (``"exact"``)."""

FINAL_NORMS: tuple[str, ...] = ("recomputed", "frozen")
"""How :func:`direct_effects` treats the final norm after a direct path is removed."""

DEFAULT_FACTORS: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0)
"""Factors the chosen heads' outputs are multiplied by (1: the unchanged model)."""

CLOSED_BOOK = "Q: What is the capital of {country}? A:"
"""The closed-book prompt of :func:`answer_determinants` (no context statement)."""

CONDITIONS = ("top_positive", "top_negative")
"""The two head sets chosen by the attribution; conditions ``2..`` are random draws."""

_INTERVAL = "percentile bootstrap over prompts"


# --------------------------------------------------------------------------------------------
# The residual stream at the answer position, split into components
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ResidualComponents:
    """What each component writes into the residual stream at the answer position.

    Attributes:
        heads: ``[pair, layer, head, d_model]`` each head's output ``z_h W_O^h`` (times the
            post-attention norm's frozen scale and gain, for models that have one: Gemma).
        ffn: ``[pair, layer, d_model]`` each FFN's output as added to the residual stream.
        rest: ``[pair, d_model]`` the embeddings (token and position) plus the attention
            output biases: everything else.
        final: ``[pair, d_model]`` the final residual stream (the final norm's input), as the
            model computed it.
    """

    heads: Float[Tensor, "pair layer head d_model"]
    ffn: Float[Tensor, "pair layer d_model"]
    rest: Float[Tensor, "pair d_model"]
    final: Float[Tensor, "pair d_model"]

    def closure(self) -> float:
        """The largest ``|final - (rest + heads + ffn)|`` over pairs and dimensions, relative
        to the largest ``|final|``: ~1e-7 when the components add up to the stream."""
        total = self.rest + self.heads.sum((1, 2)) + self.ffn.sum(1)
        return float((self.final - total).abs().max() / self.final.abs().max().clamp(min=1e-30))


def residual_components(model: HookedModel, tokens: Int[Tensor, "pair pos"],
                        positions: Int[Tensor, " pair"], *, batch_tokens: int = 4096,
                        progress: bool = False) -> ResidualComponents:
    """Split the residual stream at ``positions`` into per-head, per-FFN and remaining parts,
    from one cached forward pass per batch (float64).

    Each layer's attention writes ``resid_mid - resid_pre``: the sum of the heads' outputs
    ``z_h W_O^h`` plus ``b_O`` (for a model with a post-attention RMSNorm, that sum divided by
    its rms and times the norm's gain; the rms is frozen at this run's, so the split stays
    exact). The FFN writes ``resid_post - resid_mid``.

    Args:
        model: the model.
        tokens: ``[pair, pos]`` right-padded prompts.
        positions: ``[pair]`` the position read in each row.
        batch_tokens: rows x width per forward pass.
        progress: show a progress bar.

    >>> comps = residual_components(model, pairs.clean, pairs.answer_pos)
    >>> tuple(comps.heads.shape), comps.closure() < 1e-5
    ((2, 2, 4, 64), True)
    """
    model = as_hooked_model(model)
    n_rows, width = tokens.shape
    if tuple(positions.shape) != (n_rows,):
        raise ValueError(f"positions has shape {tuple(positions.shape)}; expected ({n_rows},)")
    kinds = ("resid_pre", "resid_mid", "resid_post", "z")
    names = {model.hook_name(k, layer): (k, layer) for layer in range(model.n_layers)
             for k in kinds}
    store: dict[tuple[str, int], list[Tensor]] = {key: [] for key in names.values()}
    rows_per_pass = max(1, device_batch_tokens(model.device, batch_tokens) // width)
    starts = range(0, n_rows, rows_per_pass)
    for lo in tqdm(starts, desc="residual", disable=not progress, unit="pass"):
        batch = tokens[lo: lo + rows_per_pass].to(model.device)
        pos = positions[lo: lo + rows_per_pass].to(model.device)
        rows = torch.arange(batch.shape[0], device=model.device)

        def save(act: Tensor, hook: Any, rows: Tensor = rows, pos: Tensor = pos) -> Tensor:
            key = names[model.canonical_hook_name(hook.name)]
            store[key].append(act[rows, pos].detach().to("cpu", torch.float64))
            return act

        with torch.no_grad():
            model.run_with_hooks(batch, fwd_hooks=[(n, save) for n in names],
                                 return_type="logits", logits_to_keep=1)
    acts = {key: torch.cat(v) for key, v in store.items()}
    n_layers = model.n_layers
    w_o = model.W_O.detach().to("cpu", torch.float64)
    b_o = model.b_O.detach().to("cpu", torch.float64)
    gain = model.norm_affines()["ln1_post"].detach().to("cpu", torch.float64)  # [layer, d_model]
    post_norm = any(getattr(b, "ln1_post", None) is not None for b in model.bridge.blocks)
    heads, ffn, rest = [], [], acts[("resid_pre", 0)].clone()
    for layer in range(n_layers):
        raw = einsum(acts[("z", layer)], w_o[layer],
                     "pair head d_head, head d_head d_model -> pair head d_model")
        written = acts[("resid_mid", layer)] - acts[("resid_pre", layer)]
        bias = b_o[layer].expand_as(written)
        if post_norm:  # written = (sum of heads + b_O) * gain / rms: read 1 / rms off the run
            pre = (raw.sum(1) + bias) * gain[layer]
            inv = (written * pre).sum(-1) / (pre * pre).sum(-1).clamp(min=1e-30)  # [pair]
            raw = raw * (inv[:, None, None] * gain[layer])
            bias = bias * (inv[:, None] * gain[layer])
        heads.append(raw)
        rest = rest + bias
        ffn.append(acts[("resid_post", layer)] - acts[("resid_mid", layer)])
    return ResidualComponents(heads=torch.stack(heads, 1), ffn=torch.stack(ffn, 1), rest=rest,
                              final=acts[("resid_post", n_layers - 1)])


@dataclass(frozen=True, kw_only=True)
class _FinalNorm:
    scale: Tensor  # [pair] the frozen 1 / rms (or 1 / std) of the clean run
    bias: Tensor  # [d_model] the norm's bias (zeros for RMSNorm)
    gain: Tensor  # [d_model]
    centres: bool  # LayerNorm subtracts the mean


def _final_norm(model: HookedModel, final: Tensor) -> _FinalNorm:
    """The final norm's parts at ``final`` ``[pair, d_model]``: since a norm N has
    ``N(x) = c(x) * g * s(x) + b`` with ``s(-x) = s(x)``, ``(N(x) - N(-x)) / 2 = c(x) * g * s(x)``
    and ``(N(x) + N(-x)) / 2 = b``, read from the model's own norm (its eps included)."""
    norm = model.bridge.ln_final
    affine = model.norm_affines()
    gain = affine["ln_final"].detach().to("cpu", torch.float64)
    centres = bool(affine["ln_final_centres"])
    x = final.to(model.device, model.dtype)[:, None, :]
    with torch.no_grad():
        plus = norm(x)[:, 0].to("cpu", torch.float64)
        minus = norm(-x)[:, 0].to("cpu", torch.float64)
    centred = final - final.mean(-1, keepdim=True) if centres else final
    v = centred * gain
    scale = ((plus - minus) / 2 * v).sum(-1) / (v * v).sum(-1).clamp(min=1e-30)
    return _FinalNorm(scale=scale, bias=((plus + minus) / 2).mean(0), gain=gain, centres=centres)


def _unembed_difference(model: HookedModel, answer: Tensor, wrong: Tensor,
                        ) -> tuple[Tensor, Tensor]:
    """``W_U[:, answer] - W_U[:, wrong]`` ``[pair, d_model]`` and the bias difference ``[pair]``."""
    w_u = model.W_U.detach()
    b_u = model.b_U.detach()
    a, w = answer.to(w_u.device), wrong.to(w_u.device)
    d_w = (w_u[:, a] - w_u[:, w]).T.to("cpu", torch.float64)
    d_b = (b_u[a] - b_u[w]).to("cpu", torch.float64)
    return d_w, d_b


def _logit_difference(model: HookedModel, resid: Tensor, d_w: Tensor, d_b: Tensor,
                      norm: _FinalNorm | None) -> Tensor:
    """The logit difference from final residual vectors ``[pair, *rest, d_model]``: through the
    model's final norm (``norm=None``) or the frozen affine map of ``norm``."""
    if norm is None:
        flat = rearrange(resid, "pair ... d_model -> pair (...) d_model")
        with torch.no_grad():
            out = model.bridge.ln_final(flat.to(model.device, model.dtype)).to("cpu",
                                                                               torch.float64)
        out = out.reshape(resid.shape)
    else:
        centred = resid - resid.mean(-1, keepdim=True) if norm.centres else resid
        scale = norm.scale.reshape(-1, *([1] * (resid.ndim - 1)))
        out = centred * norm.gain * scale + norm.bias
    extra = [1] * (resid.ndim - 2)
    return (out * d_w.reshape(d_w.shape[0], *extra, -1)).sum(-1) + d_b.reshape(-1, *extra)


@dataclass(frozen=True, kw_only=True)
class DirectEffects:
    """Per-pair direct effects of every head and FFN on the logit difference.

    Attributes:
        heads: ``[pair, layer, head]``.
        ffn: ``[pair, layer]``.
        rest: ``[pair]`` the embeddings, biases and unembedding bias (DLA only; zeros for the
            exact effects).
        total: ``[pair]`` the logit difference itself.
        scale: ``[pair]`` the final norm's frozen scale (1 / rms, or 1 / std).
    """

    heads: Float[Tensor, "pair layer head"]
    ffn: Float[Tensor, "pair layer"]
    rest: Float[Tensor, " pair"]
    total: Float[Tensor, " pair"]
    scale: Float[Tensor, " pair"]


def direct_effects(model: HookedModel, comps: ResidualComponents, answer: Int[Tensor, " pair"],
                   wrong: Int[Tensor, " pair"], *, kind: str = "dla",
                   final_norm: str = "recomputed") -> DirectEffects:
    """Each component's direct effect on ``logit(answer) - logit(wrong)``.

    ``kind="dla"``: direct logit attribution, ``s * (c(x_i) * g) . (W_U[:, a] - W_U[:, w])``
    for a component's output ``x_i``, with the final norm's scale ``s`` frozen at the clean
    run's, ``g`` its gain and ``c`` LayerNorm's centring (identity for RMSNorm); ``rest``
    holds the embeddings, biases, the norm's bias and ``b_U``, so the parts sum to ``total``
    exactly. ``kind="exact"``: ``LD(x) - LD(x - x_i)``, the final norm recomputed on the
    residual stream without the component's direct path (``final_norm="recomputed"``) or
    frozen (``"frozen"``: then it equals the DLA).

    Args:
        model: the model.
        comps: the residual stream split (:func:`residual_components`).
        answer: ``[pair]`` the in-context answer's token.
        wrong: ``[pair]`` the memorised answer's token.
        kind: ``"dla"`` or ``"exact"``.
        final_norm: for ``"exact"``: ``"recomputed"`` or ``"frozen"``.

    >>> comps = residual_components(model, pairs.clean, pairs.answer_pos)
    >>> dla = direct_effects(model, comps, pairs.answer, pairs.wrong)
    >>> parts = dla.heads.sum((1, 2)) + dla.ffn.sum(1) + dla.rest
    >>> bool(torch.allclose(parts, dla.total, atol=1e-4))
    True
    """
    check_choice("kind", kind, SCORE_KINDS)
    check_choice("final_norm", final_norm, FINAL_NORMS)
    model = as_hooked_model(model)
    d_w, d_b = _unembed_difference(model, answer, wrong)
    norm = _final_norm(model, comps.final)
    total = _logit_difference(model, comps.final, d_w, d_b, None)
    n_pair, n_layers, n_heads, _ = comps.heads.shape
    if kind == "dla":
        u = d_w * norm.gain
        if norm.centres:  # c(x) . u == x . c(u)
            u = u - u.mean(-1, keepdim=True)
        u = u * norm.scale[:, None]  # [pair, d_model]
        heads = einsum(comps.heads, u, "pair layer head d_model, pair d_model -> pair layer head")
        ffn = einsum(comps.ffn, u, "pair layer d_model, pair d_model -> pair layer")
        rest = (comps.rest * u).sum(-1) + (norm.bias * d_w).sum(-1) + d_b
        return DirectEffects(heads=heads, ffn=ffn, rest=rest, total=total, scale=norm.scale)
    parts = torch.cat([rearrange(comps.heads, "pair layer head d -> pair (layer head) d"),
                       comps.ffn], 1)  # [pair, component, d_model]
    frozen = norm if final_norm == "frozen" else None
    clean = total if frozen is None else _logit_difference(model, comps.final, d_w, d_b, frozen)
    removed = _logit_difference(model, comps.final[:, None] - parts, d_w, d_b, frozen)
    effect = clean[:, None] - removed  # [pair, component]
    heads = rearrange(effect[:, : n_layers * n_heads], "pair (layer head) -> pair layer head",
                      layer=n_layers)
    return DirectEffects(heads=heads, ffn=effect[:, n_layers * n_heads:],
                         rest=torch.zeros(n_pair, dtype=torch.float64), total=total,
                         scale=norm.scale)


# --------------------------------------------------------------------------------------------
# Head attribution
# --------------------------------------------------------------------------------------------


def _bootstrap_means(values: Tensor, n_resamples: int, seed: int, level: float
                     ) -> tuple[Tensor, Tensor]:
    """Percentile bootstrap interval over the first axis of the mean of ``values``."""
    n = values.shape[0]
    w = torch.from_numpy(bootstrap_weights(n, n_resamples, seed))  # [resample, pair]
    means = (w @ values.double().reshape(n, -1) / n).reshape(n_resamples, *values.shape[1:])
    return percentile_intervals(means, level)


@result_type
@dataclass(frozen=True, kw_only=True)
class AnswerAttribution:
    """Per-prompt direct effects of every head and FFN on ``logit(in-context) -
    logit(memorised)`` at the answer position.

    Attributes:
        dla: ``[pair, layer, head]`` direct logit attribution, final norm's scale frozen.
        exact: ``[pair, layer, head]`` the change when the head's direct path to the logits is
            removed, the final norm recomputed.
        ffn_dla: ``[pair, layer]`` the FFNs' DLA.
        ffn_exact: ``[pair, layer]`` the FFNs' exact direct effects.
        rest: ``[pair]`` the DLA of the embeddings and biases (the remainder).
        total: ``[pair]`` the logit difference.
        scale: ``[pair]`` the final norm's frozen scale.
        params: the protocol (pairs, bootstrap and permutation settings, the closure error).
        model: the model's provenance.
    """

    dla: Float[Tensor, "pair layer head"] = field(repr=False)
    exact: Float[Tensor, "pair layer head"] = field(repr=False)
    ffn_dla: Float[Tensor, "pair layer"] = field(repr=False)
    ffn_exact: Float[Tensor, "pair layer"] = field(repr=False)
    rest: Float[Tensor, " pair"] = field(repr=False)
    total: Float[Tensor, " pair"] = field(repr=False)
    scale: Float[Tensor, " pair"] = field(repr=False)
    params: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict, repr=False)

    TENSORS = ("dla", "exact", "ffn_dla", "ffn_exact", "rest", "total", "scale")

    @property
    def n(self) -> int:
        """Prompt pairs."""
        return int(self.total.shape[0])

    def head_scores(self, kind: str = "dla") -> HeadScores:
        """The ``[layer, head]`` map of ``kind`` (``"dla"`` or ``"exact"``), one row per pair."""
        check_choice("kind", kind, SCORE_KINDS)
        return HeadScores.from_per_seed(f"answer_{kind}", getattr(self, kind),
                                        params=self.params, model=self.model)

    def ffn_scores(self, kind: str = "dla") -> LayerScores:
        """The per-layer FFN scores of ``kind``, one row per pair."""
        check_choice("kind", kind, SCORE_KINDS)
        return LayerScores.from_per_seed(f"answer_ffn_{kind}", getattr(self, f"ffn_{kind}"),
                                         params=self.params, model=self.model)

    def table(self) -> pd.DataFrame:
        """One row per head and FFN: ``component`` (``head`` / ``ffn``), ``layer``, ``head``
        (-1 for FFNs), and for each kind the mean over pairs with its percentile bootstrap
        interval over pairs (``dla_low`` ...); ``interval`` names the method."""
        p = self.params
        level, n_res, seed = p.get("level", 0.95), p.get("n_resamples", 1000), p.get("seed", 0)
        n_layers, n_heads = self.dla.shape[1:]
        layer, head = torch.meshgrid(torch.arange(n_layers), torch.arange(n_heads),
                                     indexing="ij")
        frame = pd.DataFrame({
            "component": ["head"] * (n_layers * n_heads) + ["ffn"] * n_layers,
            "layer": layer.flatten().tolist() + list(range(n_layers)),
            "head": head.flatten().tolist() + [-1] * n_layers})
        for kind in SCORE_KINDS:
            values = torch.cat([getattr(self, kind).flatten(1), getattr(self, f"ffn_{kind}")], 1)
            low, high = _bootstrap_means(values, n_res, seed, level)
            frame[f"{kind}_mean"] = values.mean(0).numpy()
            frame[f"{kind}_low"] = low.numpy()
            frame[f"{kind}_high"] = high.numpy()
        frame["interval"] = f"{_INTERVAL} ({n_res} resamples, {level:.0%})"
        frame["n"] = self.n
        return frame

    def agreement(self, k: int | None = None) -> dict[str, Any]:
        """How far the DLA and the exact head maps agree: Spearman's rho of the means with a
        paired percentile bootstrap interval over pairs, and the overlap of their top-``k``
        heads (default 10% of the heads) against the layer-preserving null (heads permuted
        within their layers, :func:`~mechicl.analyses.overlap.permutation_null`)."""
        p = self.params
        n_res, n_perm, seed = p.get("n_resamples", 1000), p.get("n_permutations", 1000), \
            p.get("seed", 0)
        a, b = self.head_scores("dla"), self.head_scores("exact")
        k = top_k(a.mean.numel(), percentile=10.0) if k is None else top_k(a.mean.numel(), k=k)
        rho, rho_low, rho_high = bootstrap_ci(a, b, statistic="spearman", n_resamples=n_res,
                                              seed=seed, paired=True,
                                              confidence=p.get("level", 0.95))
        overlap, null = permutation_null(a.mean, b.mean, statistic="top_k", k=k,
                                         n_permutations=n_perm, seed=seed, within_layers=True)
        p_value = (1 + int((null >= overlap - 1e-12).sum())) / (1 + null.numel())
        null_low, null_high = percentile_interval(null, 0.9)
        return {"spearman": rho, "spearman_low": rho_low, "spearman_high": rho_high,
                "spearman_interval": f"paired {_INTERVAL} ({n_res} resamples)",
                "k": k, "top_k_overlap": top_k_overlap(a.mean, b.mean, k),
                "top_k_null_mean": float(null.nanmean()), "top_k_null_low": null_low,
                "top_k_null_high": null_high, "top_k_p": p_value,
                "null": f"heads permuted within layers ({n_perm} permutations; band 5-95%)",
                "n": self.n}

    def closure(self) -> float:
        """The largest ``|total - (heads + FFNs + rest)|`` of the DLA over pairs (~1e-6: the
        frozen-norm decomposition is exact)."""
        parts = self.dla.sum((1, 2)) + self.ffn_dla.sum(1) + self.rest
        return float((self.total - parts).abs().max())

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write as a result folder (:func:`~mechicl.results.write_result`), atomically."""
        return write_result(path, kind="AnswerAttribution", params=self.params, model=self.model,
                            tensors={k: getattr(self, k) for k in self.TENSORS})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "AnswerAttribution":
        """Read a folder written by :meth:`save` (verified)."""
        folder = read_result(path, "AnswerAttribution")
        missing = [k for k in cls.TENSORS if k not in folder.tensors]
        if missing:
            raise ResultError(f"{path}: tensors {missing} are missing")
        return cls(**{k: folder.tensors[k] for k in cls.TENSORS}, params=folder.params,
                   model=folder.model)


def answer_attribution(
    model: HookedModel, pairs: PromptPairs | str = "capitals", *, n: int = 32, seed: int = 0,
    n_resamples: int = 1000, n_permutations: int = 1000, level: float = 0.95,
    batch_tokens: int = 4096, progress: bool = False,
) -> AnswerAttribution:
    """Direct effects of every head and FFN on ``logit(in-context) - logit(memorised)``.

    On ``pairs`` (the clean prompts: the counterfactual capital in the context; ``answer``
    the in-context capital's first token, ``wrong`` the memorised one's), at each prompt's last
    position: the DLA with the final norm's scale frozen at its clean value, and the exact
    effect of removing each component's direct path with the norm recomputed
    (:func:`direct_effects`). One cached forward pass per batch of prompts: no further passes,
    since a direct path reaches only the final norm.

    Args:
        model: a :class:`~mechicl.HookedModel` or bridge.
        pairs: prompt pairs, or the name of a registered generator (default ``"capitals"``,
            :func:`~mechicl.inputs.pairs.capital_pairs`) called with ``n`` and ``seed``.
        n: pairs to generate (with a generator name).
        seed: seeds the pairs and the bootstrap and permutations of the result's statistics.
        n_resamples: bootstrap resamples of the intervals over prompts.
        n_permutations: permutations of the layer-preserving null of the agreement.
        level: coverage of the intervals.
        batch_tokens: rows x width per forward pass.
        progress: show a progress bar.

    >>> result = answer_attribution(model, pairs)
    >>> tuple(result.dla.shape), result.closure() < 1e-4
    ((2, 2, 4), True)
    """
    model = as_hooked_model(model)
    if isinstance(pairs, str):
        pairs = make_pairs(pairs, model, n=n, seed=seed)
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1)")
    comps = residual_components(model, pairs.clean, pairs.answer_pos, batch_tokens=batch_tokens,
                                progress=progress)
    dla = direct_effects(model, comps, pairs.answer, pairs.wrong, kind="dla")
    exact = direct_effects(model, comps, pairs.answer, pairs.wrong, kind="exact")
    closure = comps.closure()
    if closure > 1e-4:
        logger.warning("the components add up to the final residual stream only to %.2g "
                       "(relative): this model's blocks are not split exactly", closure)
    params = {"pairs": pairs.name, "n": len(pairs), "seed": seed,
              "pair_params": dict(pairs.params), "answer_text": list(pairs.answer_text),
              "wrong_text": list(pairs.wrong_text), "position": "last (answer) position",
              "n_resamples": n_resamples, "n_permutations": n_permutations, "level": level,
              "final_norm": {"dla": "scale frozen at the clean run",
                             "exact": "recomputed without the direct path"},
              "residual_closure": closure}
    return AnswerAttribution(dla=dla.heads, exact=exact.heads, ffn_dla=dla.ffn,
                             ffn_exact=exact.ffn, rest=dla.rest, total=dla.total,
                             scale=dla.scale, params=params, model=model.info())


# --------------------------------------------------------------------------------------------
# Value scaling
# --------------------------------------------------------------------------------------------


def scaling_masks(shape: tuple[int, int], sets: Int[Tensor, "condition slot"],
                  factors: Sequence[float]) -> tuple[list[Mask], Int[Tensor, "factor condition"]]:
    """The distinct masks multiplying each condition's heads by each factor, and which mask
    each ``(factor, condition)`` uses (equal masks, e.g. every condition at factor 1, share).

    Args:
        shape: ``(n_layers, n_heads)``.
        sets: flat head indices per condition (-1: unused slot).
        factors: the factors.

    >>> masks, index = scaling_masks((2, 2), torch.tensor([[3], [0]]), [0.0, 1.0])
    >>> len(masks), index.tolist(), masks[index[0, 0]].heads.tolist()
    (3, [[0, 1], [2, 2]], [[1.0, 1.0], [1.0, 0.0]])
    """
    n_layers, n_heads = shape
    masks: list[Mask] = []
    seen: dict[bytes, int] = {}
    index = torch.zeros(len(factors), sets.shape[0], dtype=torch.long)
    for i, factor in enumerate(factors):
        for c in range(sets.shape[0]):
            heads = torch.ones(n_layers * n_heads)
            heads[sets[c][sets[c] >= 0]] = float(factor)
            mask = Mask(heads=heads.reshape(n_layers, n_heads), ffn=torch.ones(n_layers))
            key = mask.key()
            if key not in seen:
                seen[key] = len(masks)
                masks.append(mask)
            index[i, c] = seen[key]
    return masks, index


def _check_factors(factors: Sequence[float]) -> list[float]:
    out = [float(f) for f in factors]
    if not out or any(not math.isfinite(f) or f < 0 for f in out) or len(set(out)) != len(out):
        raise ValueError(f"factors={list(factors)}: need distinct finite numbers >= 0")
    return out


def _memorised_index(prompts: Sequence[Prompt], task: Task | None) -> list[int]:
    """For each two-choice prompt, the index of the memorised (non-gold) choice; checked
    against the task's ``meta["memorised_answer"]`` where it has one."""
    examples = {ex.id: ex for ex in task.examples} if task is not None else {}
    out = []
    for p in prompts:
        if len(p.continuations) != 2:
            raise ValueError(f"prompt {p.id!r} has {len(p.continuations)} choices; in-context vs "
                             "memorised answers need exactly 2")
        other = 1 - p.gold
        ex = examples.get(p.id)
        if ex is not None and "memorised_answer" in ex.meta and \
                ex.choices[other] != str(ex.meta["memorised_answer"]):
            raise ValueError(f"example {p.id!r}: the non-gold choice {ex.choices[other]!r} is not "
                             f"its memorised_answer {ex.meta['memorised_answer']!r}")
        out.append(other)
    return out


def _scores_map(scores: Any, kind: str, model: HookedModel) -> tuple[Tensor, dict[str, Any]]:
    if isinstance(scores, AnswerAttribution):
        return scores.head_scores(kind).mean, {"kind": kind, **scores.params}
    if isinstance(scores, HeadScores):
        return scores.mean.double(), dict(scores.params)
    t = torch.as_tensor(scores).detach().cpu().double()
    if tuple(t.shape) != (model.n_layers, model.n_heads):
        raise ValueError(f"scores have shape {tuple(t.shape)}, the model has "
                         f"[{model.n_layers}, {model.n_heads}] heads")
    return t, {}


@result_type
@dataclass(frozen=True, kw_only=True)
class ValueScaling:
    """Answers under the chosen heads' outputs multiplied by each factor.

    Attributes:
        factors: the factors, in the order of the first axis.
        in_context: ``[factor, condition, prompt]`` 1 where the in-context answer's summed
            log-likelihood is strictly higher than the memorised one's.
        margin: ``[factor, condition, prompt]`` that log-likelihood difference.
        heads: ``[condition, slot]`` flat head indices (``layer * n_heads + head``): condition 0
            the top-``n`` heads of the attribution (pushing towards the in-context answer),
            1 the bottom-``n`` (towards the memorised one), ``2..`` random draws of ``n``.
        scores: ``[layer, head]`` the attribution the heads were chosen by.
        params: the protocol.
        model: the model's provenance.
    """

    factors: tuple[float, ...]
    in_context: Float[Tensor, "factor condition prompt"] = field(repr=False)
    margin: Float[Tensor, "factor condition prompt"] = field(repr=False)
    heads: Int[Tensor, "condition slot"] = field(repr=False)
    scores: Float[Tensor, "layer head"] = field(repr=False)
    params: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "factors", tuple(float(f) for f in self.factors))
        if self.in_context.shape != self.margin.shape or \
                self.in_context.shape[:2] != (len(self.factors), self.heads.shape[0]):
            raise ValueError(f"in_context {tuple(self.in_context.shape)}, margin "
                             f"{tuple(self.margin.shape)} and heads {tuple(self.heads.shape)} do "
                             f"not match {len(self.factors)} factors")

    @property
    def draws(self) -> int:
        """Random head sets."""
        return int(self.heads.shape[0]) - len(CONDITIONS)

    @property
    def n(self) -> int:
        """Prompts."""
        return int(self.in_context.shape[2])

    def head_list(self, condition: int) -> list[tuple[int, int]]:
        """The ``(layer, head)`` pairs scaled in ``condition``."""
        n_heads = int(self.scores.shape[1])
        flat = self.heads[condition]
        return [(int(i) // n_heads, int(i) % n_heads) for i in flat[flat >= 0]]

    def table(self, *, n_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
        """One row per factor and condition (``top_positive``, ``top_negative``, ``random``):
        the share of in-context answers with its Wilson 95% interval (for ``random``: the mean
        of the draws' shares, with their 5-95% band as ``band_low`` / ``band_high``), the mean
        log-likelihood margin, and for the top conditions the paired difference to the random
        draws' mean per prompt with a percentile bootstrap interval and two-sided p-value;
        ``outside_band`` says whether the share leaves the random band."""
        rows = []
        ic = self.in_context.double().numpy()
        margin = self.margin.double().numpy()
        n = self.n
        for i, factor in enumerate(self.factors):
            random_ic = ic[i, len(CONDITIONS):]  # [draw, prompt]
            shares = random_ic.mean(-1)
            band_low, band_high = np.quantile(shares, [0.05, 0.95])
            base = {"factor": factor, "n": n, "draws": self.draws,
                    "band_low": float(band_low), "band_high": float(band_high),
                    "random_mean": float(shares.mean())}
            for c, name in enumerate(CONDITIONS):
                share = float(ic[i, c].mean())
                low, high = wilson_interval(int(ic[i, c].sum()), n)
                boot = paired_bootstrap(ic[i, c], random_ic.mean(0), n_resamples=n_resamples,
                                        seed=seed)
                p = min(1.0, 2 * float(min(boot.p_greater[0], boot.p_less[0])))
                rows.append({**base, "condition": name, "share": share, "low": low,
                             "high": high, "interval": "Wilson 95%",
                             "margin": float(margin[i, c].mean()),
                             "vs_random": float(boot.estimate[0]),
                             "vs_random_low": float(boot.low[0]),
                             "vs_random_high": float(boot.high[0]), "p": p,
                             "test": f"paired percentile bootstrap over prompts "
                                     f"({n_resamples} resamples), top vs mean of draws",
                             "outside_band": bool(share < band_low or share > band_high)})
            rows.append({**base, "condition": "random", "share": float(shares.mean()),
                         "low": float(band_low), "high": float(band_high),
                         "interval": "5-95% of the draws' shares",
                         "margin": float(margin[i, len(CONDITIONS):].mean()),
                         "vs_random": 0.0, "vs_random_low": float("nan"),
                         "vs_random_high": float("nan"), "p": float("nan"),
                         "test": "", "outside_band": False})
        return pd.DataFrame(rows)

    def figure(self, title: str = "") -> go.Figure:
        """Share of in-context answers against the factor: the top heads of each sign (Wilson
        95% error bars) and the random heads' 5-95% band and mean."""
        t = self.table()
        fig = go.Figure()
        rnd = t[t.condition == "random"]
        x = rnd.factor.tolist()
        band = rnd.band_high.tolist() + rnd.band_low.tolist()[::-1]
        fig.add_trace(go.Scatter(x=x + x[::-1], y=band,
                                 fill="toself", fillcolor="rgba(128,128,128,0.25)",
                                 line={"width": 0}, name=f"{self.draws} random sets (5-95%)",
                                 hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=x, y=rnd.share, mode="lines", name="random mean",
                                 line={"color": "gray", "dash": "dash"}))
        for name, color in zip(CONDITIONS, ("crimson", "royalblue"), strict=True):
            rows = t[t.condition == name]
            fig.add_trace(go.Scatter(
                x=rows.factor, y=rows.share, mode="lines+markers", name=name.replace("_", " "),
                line={"color": color},
                error_y={"type": "data", "symmetric": False,
                         "array": (rows.high - rows.share).to_numpy(float),
                         "arrayminus": (rows.share - rows.low).to_numpy(float)}))
        n_heads = int((self.heads[0] >= 0).sum())
        fig.update_layout(title=title or f"value scaling of {n_heads} heads (n = {self.n})",
                          xaxis_title="factor on the heads' outputs",
                          yaxis_title="share of in-context answers", yaxis_range=[-0.02, 1.02],
                          width=640, height=440)
        return fig

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write as a result folder, atomically."""
        return write_result(path, kind="ValueScaling", params=self.params, model=self.model,
                            fields={"factors": list(self.factors)},
                            tensors={"in_context": self.in_context, "margin": self.margin,
                                     "heads": self.heads, "scores": self.scores})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "ValueScaling":
        """Read a folder written by :meth:`save` (verified)."""
        folder = read_result(path, "ValueScaling")
        t = folder.tensors
        return cls(factors=tuple(folder.fields["factors"]), in_context=t["in_context"],
                   margin=t["margin"], heads=t["heads"], scores=t["scores"],
                   params=folder.params, model=folder.model)


def _task_prompts(task: Task | str | None, prompts: Sequence[Prompt] | None, *, shots: int,
                  n: int | None, seed: int, exclude: Sequence[str] = (),
                  ) -> tuple[Task | None, list[Prompt]]:
    task_obj = load_task(task) if isinstance(task, str) else task
    if prompts is None:
        if task_obj is None:
            raise ValueError("give a task (or explicit prompts=)")
        skip = set(exclude)
        prompts = [p for p in build_prompts(task_obj, shots=shots, seed=seed)
                   if p.id not in skip]
    out = list(prompts)[: n if n is not None else None]
    if not out:
        raise ValueError("no prompts to evaluate (after leaving out the attribution's examples)")
    return task_obj, out


def value_scaling(
    model: HookedModel, scores: AnswerAttribution | HeadScores | Float[Tensor, "layer head"],
    task: Task | str | None = "counterfactual_capital", *, prompts: Sequence[Prompt] | None = None,
    shots: int = 0, n: int | None = None, n_heads: int = 5,
    factors: Sequence[float] = DEFAULT_FACTORS, draws: int = 20, kind: str = "dla",
    exclude: Sequence[str] | None = None, seed: int = 0, batch_tokens: int = 4096,
    progress: bool = False,
) -> ValueScaling:
    """Which answer the model gives with chosen heads' outputs scaled by each factor.

    Conditions: the ``n_heads`` heads with the highest attribution (towards the in-context
    answer), the ``n_heads`` with the lowest (towards the memorised one), and ``draws`` sets of
    ``n_heads`` heads drawn uniformly from all heads
    (:func:`~mechicl.analyses.causal.random_heads`, seeded). Each condition's heads have
    ``hook_z`` multiplied by each factor (a :class:`~mechicl.model.masks.Mask`); every mask
    shares the forward passes (:func:`~mechicl.analyses.evaluation.masked_choice_logprobs`).
    A prompt is answered in context when its in-context choice's summed log-likelihood (full
    answer) is strictly above the memorised choice's.

    Args:
        model: a :class:`~mechicl.HookedModel` or bridge.
        scores: the attribution ranking the heads (an :class:`AnswerAttribution`, whose
            ``kind`` map is used, or any ``[layer, head]`` scores).
        task: a task whose examples have two choices, gold the in-context answer (default
            ``counterfactual_capital``).
        prompts: explicit prompts instead of the task's.
        shots: demonstrations per prompt.
        n: evaluate the first ``n`` prompts (default all).
        n_heads: heads per condition.
        factors: the factors (>= 0).
        draws: random head sets (at least 20).
        kind: ``"dla"`` or ``"exact"``: which map of an :class:`AnswerAttribution`.
        exclude: example ids left out (default: the attribution's own examples, so that heads
            are not chosen and tested on the same prompts).
        seed: seeds the prompts and the random head sets.
        batch_tokens: tokens per forward pass, counting every masked copy.
        progress: show a progress bar.
    """
    model = as_hooked_model(model)
    check_choice("kind", kind, SCORE_KINDS)
    factors = _check_factors(factors)
    if isinstance(draws, bool) or draws < MIN_DRAWS:
        raise ValueError(f"draws={draws!r}: need an integer >= {MIN_DRAWS} (random head sets, "
                         "the null and its 5-95% band)")
    table, score_params = _scores_map(scores, kind, model)
    n_total = table.numel()
    if not 1 <= n_heads <= n_total // 2:
        raise ValueError(f"n_heads={n_heads} must be in 1..{n_total // 2} (half the model's "
                         f"{n_total} heads: the top and bottom sets must not overlap)")
    if exclude is None:
        exclude = score_params.get("pair_params", {}).get("example_ids", [])
    task_obj, prompt_list = _task_prompts(task, prompts, shots=shots, n=n, seed=seed,
                                          exclude=exclude)
    other = torch.tensor(_memorised_index(prompt_list, task_obj))
    gold = torch.tensor([p.gold for p in prompt_list])
    sets = torch.cat([top_heads(table, n_heads)[None], top_heads(-table, n_heads)[None],
                      random_heads(n_total, n_heads, draws, seed)])
    masks, index = scaling_masks((model.n_layers, model.n_heads), sets, factors)
    loglik, _ = masked_choice_logprobs(model, prompt_list, masks, batch_tokens=batch_tokens,
                                       progress=progress)  # [mask, prompt, choice]
    rows = torch.arange(len(prompt_list))
    margin = (loglik[:, rows, gold] - loglik[:, rows, other]).double()[index]  # [f, c, prompt]
    params = {"task": task_obj.name if task_obj is not None else "custom", "shots": shots,
              "n": len(prompt_list), "prompt_ids": [p.id for p in prompt_list],
              "n_heads": n_heads, "factors": factors, "draws": draws, "seed": seed,
              "kind": kind, "excluded": len(exclude), "hook": "hook_z (z = A v: the values)",
              "answer": "summed log-likelihood of the full answers, in-context > memorised",
              "scores_params": {k: v for k, v in score_params.items()
                                if k in ("pairs", "n", "seed", "kind")}}
    return ValueScaling(factors=tuple(factors), in_context=(margin > 0).double(), margin=margin,
                        heads=sets, scores=table, params=params, model=model.info())


# --------------------------------------------------------------------------------------------
# Distributional determinants
# --------------------------------------------------------------------------------------------

DETERMINANTS: tuple[str, ...] = ("country_rank", "country_tokens", "city_rank", "city_tokens",
                                 "closed_book_logprob")
"""Columns of :class:`AnswerDeterminants`' table that the in-context rate is compared with."""


@result_type
@dataclass(frozen=True, kw_only=True)
class AnswerDeterminants:
    """Per example: the answer taken, and what might determine it.

    Attributes:
        data: one row per example: ``id``, ``country``, ``city`` (in context), ``memorised``,
            ``in_context`` (0/1), ``margin`` (log-likelihood of the in-context minus the
            memorised answer), ``country_rank`` / ``city_rank`` (the first token's rank in the
            tokenizer's frequency ranking, a *proxy* of frequency: 0 = most frequent),
            ``country_tokens`` / ``city_tokens``, ``closed_book_logprob`` (the memorised
            answer's log-probability with no context statement).
        params: the protocol (the ranking method among them).
        model: the model's provenance.
    """

    data: pd.DataFrame = field(repr=False)
    params: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict, repr=False)

    def statistics(self, *, n_resamples: int | None = None, seed: int | None = None,
                   ) -> pd.DataFrame:
        """Per determinant and outcome (``in_context``, ``margin``): Spearman's rho with a
        percentile bootstrap interval over examples, and a two-sided permutation p-value
        (outcome shuffled over examples).

        ``events``: for the 0/1 ``in_context`` outcome, the examples of its rarer value (NaN
        for ``margin``). ``constant_resamples``: bootstrap resamples in which the determinant
        or the outcome is constant, so that rho is undefined; when there are any, the interval
        is NaN (percentiles of the other resamples would be conditional on, e.g., the one
        example answered from memory being drawn, and biased)."""
        n_resamples = n_resamples or int(self.params.get("n_resamples", 1000))
        seed = int(self.params.get("seed", 0)) if seed is None else seed
        n = len(self.data)
        counts = bootstrap_weights(n, n_resamples, seed).astype(int)
        idx = torch.from_numpy(np.stack([np.repeat(np.arange(n), c) for c in counts]))
        gen = torch.Generator().manual_seed(seed)
        perm = torch.argsort(torch.rand(n_resamples, n, generator=gen), dim=-1)
        rows = []
        for det in DETERMINANTS:
            x = torch.tensor(self.data[det].to_numpy(float))
            for outcome in ("in_context", "margin"):
                y = torch.tensor(self.data[outcome].to_numpy(float))
                rho = spearman(x, y) if n > 1 else float("nan")
                boot = spearman_rows(x[idx], y[idx])
                null = spearman_rows(x.expand(n_resamples, n), y[perm])
                constant = int(boot.isnan().sum())
                low, high = percentile_interval(boot) if not constant else (
                    float("nan"), float("nan"))
                ones = int((y == 1).sum())
                events = min(ones, n - ones) if outcome == "in_context" else float("nan")
                p = float("nan") if math.isnan(rho) else \
                    (1 + int((null.abs() >= abs(rho) - 1e-12).sum())) / (1 + n_resamples)
                rows.append({"determinant": det, "outcome": outcome, "spearman": rho,
                             "low": low, "high": high, "p": p, "n": n, "events": events,
                             "constant_resamples": constant,
                             "interval": f"{_INTERVAL} ({n_resamples} resamples)",
                             "null": f"outcome permuted over examples ({n_resamples})",
                             "proxy": det.endswith("_rank") or det.endswith("_tokens")})
        return pd.DataFrame(rows)

    def terciles(self) -> pd.DataFrame:
        """Per determinant, the examples split into three equal groups by its value (ties in
        example order): each group's range, size and in-context rate with a Wilson 95%
        interval."""
        rows = []
        for det in DETERMINANTS:
            order = np.argsort(self.data[det].to_numpy(float), kind="stable")
            for g, part in enumerate(np.array_split(order, 3)):
                if len(part) == 0:
                    continue
                sub = self.data.iloc[part]
                k = int(sub.in_context.sum())
                low, high = wilson_interval(k, len(sub))
                rows.append({"determinant": det, "tercile": ("low", "middle", "high")[g],
                             "from": float(sub[det].min()), "to": float(sub[det].max()),
                             "n": len(sub), "in_context_rate": k / len(sub), "low": low,
                             "high": high, "interval": "Wilson 95%"})
        return pd.DataFrame(rows)

    def figure(self, title: str = "") -> go.Figure:
        """In-context rate by tercile of each determinant, with Wilson 95% error bars."""
        t = self.terciles()
        fig = go.Figure()
        for name in ("low", "middle", "high"):
            rows = t[t.tercile == name]
            rate = rows.in_context_rate
            fig.add_trace(go.Bar(x=rows.determinant, y=rate, name=f"{name} tercile",
                                 error_y={"type": "data", "symmetric": False,
                                          "array": (rows.high - rate).to_numpy(float),
                                          "arrayminus": (rate - rows.low).to_numpy(float)}))
        fig.update_layout(barmode="group", title=title or "in-context rate by tercile of each "
                          "determinant<br><sup>ranks and token counts: tokenizer proxies of "
                          "frequency</sup>",
                          yaxis_title="share of in-context answers", yaxis_range=[0, 1.05],
                          width=720, height=440)
        return fig

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write as a result folder, atomically."""
        return write_result(path, kind="AnswerDeterminants", params=self.params,
                            model=self.model, tables={"examples": self.data})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "AnswerDeterminants":
        """Read a folder written by :meth:`save` (verified)."""
        folder = read_result(path, "AnswerDeterminants")
        return cls(data=folder.tables["examples"], params=folder.params, model=folder.model)


def answer_determinants(
    model: HookedModel, task: Task | str = "counterfactual_capital", *, shots: int = 0,
    n: int | None = None, seed: int = 0, closed_book: str = CLOSED_BOOK,
    subject_field: str = "country", context_field: str = "context_capital",
    n_resamples: int = 1000, batch_tokens: int = 4096, progress: bool = False,
) -> AnswerDeterminants:
    """Per example: the answer taken in context, and its candidate determinants.

    The in-context prompt is the task's (``shots`` demonstrations); the answer is taken in
    context when the in-context choice's summed log-likelihood is strictly above the memorised
    one's. The closed-book prompt is ``closed_book`` filled with the example's fields (no
    context statement), scored on the memorised answer. Frequency: the rank of the first token
    of ``" " + word`` in the tokenizer's frequency ranking
    (:attr:`~mechicl.HookedModel.frequency_ranking`: BPE merge order, unigram scores or, for
    tokenizers without either, vocabulary order): a proxy, since no training data is
    available.

    Args:
        model: a :class:`~mechicl.HookedModel` or bridge.
        task: the task (fields ``subject_field`` and ``context_field``, two choices, gold the
            in-context answer).
        shots: demonstrations per in-context prompt.
        n: the first ``n`` seeded prompts (default all).
        seed: seeds the prompts and the statistics' resamples.
        closed_book: the closed-book template.
        subject_field: the field naming the subject (the country).
        context_field: the field holding the in-context answer (the city).
        n_resamples: resamples of the bootstrap intervals and permutation nulls.
        batch_tokens: tokens per forward pass.
        progress: show a progress bar.
    """
    model = as_hooked_model(model)
    task_obj, prompts = _task_prompts(task, None, shots=shots, n=n, seed=seed)
    assert task_obj is not None
    other = _memorised_index(prompts, task_obj)
    examples = {ex.id: ex for ex in task_obj.examples}
    for name in (subject_field, context_field):
        if name not in examples[prompts[0].id].fields:
            raise ValueError(f"task {task_obj.name!r} has no field {name!r}; its fields are "
                             f"{sorted(examples[prompts[0].id].fields)}")
    loglik, _ = choice_logprobs(model, prompts, batch_tokens=batch_tokens, progress=progress)
    rows = torch.arange(len(prompts))
    gold = torch.tensor([p.gold for p in prompts])
    margin = (loglik[rows, gold] - loglik[rows, torch.tensor(other)]).double()
    try:
        closed = [Prompt(id=p.id, text=closed_book.format(**examples[p.id].fields),
                         continuations=(p.continuations[o],), gold=0)
                  for p, o in zip(prompts, other, strict=True)]
    except (KeyError, IndexError) as err:
        raise ValueError(f"closed_book={closed_book!r} names a field the examples lack: "
                         f"{err}") from None
    closed_ll, _ = choice_logprobs(model, closed, batch_tokens=batch_tokens, progress=progress)
    ranking = model.frequency_ranking
    rank_of = torch.full((max(len(model.tokenizer), int(ranking.token_ids.max()) + 1),),
                         len(ranking), dtype=torch.long)
    rank_of[ranking.token_ids] = torch.arange(len(ranking))

    def proxy(word: str) -> tuple[int, int]:
        ids = model.encode(" " + word, prepend_bos=False)
        return int(rank_of[ids[0]]), len(ids)

    records = []
    for i, p in enumerate(prompts):
        fields = examples[p.id].fields
        country_rank, country_tokens = proxy(fields[subject_field])
        city_rank, city_tokens = proxy(fields[context_field])
        records.append({"id": p.id, "country": fields[subject_field],
                        "city": fields[context_field],
                        "memorised": p.continuations[other[i]].strip(),
                        "in_context": int(margin[i] > 0), "margin": float(margin[i]),
                        "country_rank": country_rank, "country_tokens": country_tokens,
                        "city_rank": city_rank, "city_tokens": city_tokens,
                        "closed_book_logprob": float(closed_ll[i, 0])})
    params = {"task": task_obj.name, "shots": shots, "n": len(prompts), "seed": seed,
              "closed_book": closed_book, "n_resamples": n_resamples,
              "frequency_proxy": f"rank of the first token in the tokenizer's ranking "
                                 f"({ranking.method}); a proxy, not corpus frequency",
              "answer": "summed log-likelihood of the full answers, in-context > memorised"}
    return AnswerDeterminants(data=pd.DataFrame(records), params=params, model=model.info())


# --------------------------------------------------------------------------------------------
# The registered analyses
# --------------------------------------------------------------------------------------------


def _attribution_pairs(model: HookedModel, job: Job) -> PromptPairs:
    return make_pairs(job.options["prompts"], model, n=job.options["n"], seed=job.seed)


def _run_attribution(call: Call) -> AnswerAttribution:
    o = call.options
    return answer_attribution(call.model, _attribution_pairs(call.model, call.job),
                              seed=call.seed, n_resamples=o["n_resamples"],
                              n_permutations=o["n_permutations"], progress=call.progress,
                              **call.batch())


def _attribution_outputs(pairs: Sequence[tuple[Job, AnswerAttribution]],
                         options: Mapping[str, Any]) -> Outputs:
    results, figures, rows = {}, {}, []
    for job, result in pairs:
        stem = job_stem(job, job.options["prompts"], "answer-attribution")
        results[stem] = result
        for kind in SCORE_KINDS:
            figures[f"{stem}-{kind}"] = head_heatmap(
                result.head_scores(kind), signed=True, colorbar_title="logit diff",
                title=f"{kind.upper()} on logit(in-context) - logit(memorised)")
            figures[f"{stem}-ffn-{kind}"] = layer_bars(result.ffn_scores(kind),
                                                       yaxis_title=f"FFN {kind}")
        agree = result.agreement()
        rows.append({"prompts": job.options["prompts"], "n": result.n,
                     "logit_diff": float(result.total.mean()), "closure": result.closure(),
                     **{k: v for k, v in agree.items() if k not in ("null",
                                                                    "spearman_interval")}})
    return Outputs(results=results, figures=figures, rows=rows)


_BATCH = batch_tokens_option(
    help="rows x longest row per forward pass, counting every masked copy")

ANSWER_ATTRIBUTION = register_analysis(Analysis(
    name="answer_attribution", command="answer-attribution",
    help="per head and FFN: direct effect on logit(in-context) - logit(memorised), by DLA "
         "(frozen final norm) and exactly (norm recomputed)",
    run=_run_attribution, result_type=AnswerAttribution, memory="forward",
    sequence_length=lambda model, job, task: int(_attribution_pairs(model, job).clean.shape[1]),
    outputs=_attribution_outputs,
    options=(Option(name="prompts", type=str, default="capitals",
                    choices=lambda: sorted(PAIR_GENERATORS), registry="prompt-pair generator",
                    help="prompt pairs: answer = in-context token, wrong = memorised token"),
             Option(name="n", type=int, default=32, minimum=1, help="prompt pairs"),
             Option(name="n_resamples", type=int, default=1000, minimum=1,
                    help="bootstrap resamples of the intervals over prompts"),
             Option(name="n_permutations", type=int, default=1000, minimum=1,
                    help="within-layer permutations of the agreement's null"),
             _BATCH),
))


def _attribution_input(job: Job) -> dict[str, Job]:
    o = job.options
    return {"attribution": ANSWER_ATTRIBUTION.job(
        job.model, {"prompts": o["attribution_prompts"], "n": o["attribution_n"]},
        seed=job.seed)}


def _run_scaling(call: Call) -> ValueScaling:
    o = call.options
    return value_scaling(call.model, call.inputs["attribution"], call.task, shots=call.shots,
                         n=o["n"], n_heads=o["n_heads"], factors=o["factors"],
                         draws=o["draws"], kind=o["kind"], seed=call.seed,
                         progress=call.progress, **call.batch())


def _task_outputs(command: str, table: Callable[[Any], pd.DataFrame]
                  ) -> Callable[[Sequence[tuple[Job, Any]], Mapping[str, Any]], Outputs]:
    """The outputs of a per-task analysis: each result, its figure, and the rows of
    ``table(result)`` with the job's task and shots."""

    def outputs(pairs: Sequence[tuple[Job, Any]], options: Mapping[str, Any]) -> Outputs:
        results, figures, rows = {}, {}, []
        for job, result in pairs:
            stem = job_stem(job, command)
            results[stem] = result
            figures[stem] = result.figure()
            rows += [{"task": job.task, "shots": job.shots, **r}
                     for r in table(result).to_dict("records")]
        return Outputs(results=results, figures=figures, rows=rows)

    return outputs


def _task_length(model: HookedModel, job: Job, task: Any) -> int:
    _, prompts = _task_prompts(task, None, shots=job.shots or 0, n=job.options["n"],
                               seed=job.seed)
    return longest_choice_row(model, prompts)


VALUE_SCALING = register_analysis(Analysis(
    name="value_scaling", command="value-scaling",
    help="share of in-context vs memorised answers with the top attribution heads' outputs "
         "scaled, against random heads",
    run=_run_scaling, result_type=ValueScaling, per_task=True, shots=(0,), memory="choices",
    inputs=_attribution_input, outputs=_task_outputs(
        "value-scaling", lambda r: r.table().drop(columns=["test", "interval"])), sequence_length=_task_length,
    options=(Option(name="n_heads", type=int, default=5, minimum=1,
                    help="heads per condition (top positive, top negative, each random draw)"),
             Option(name="factors", type=list, item=float, default=list(DEFAULT_FACTORS),
                    minimum=0, sort=True, help="factors on the heads' outputs"),
             Option(name="draws", type=int, default=20, minimum=MIN_DRAWS,
                    help="random head sets: the null"),
             Option(name="kind", type=str, default="dla", choices=SCORE_KINDS,
                    help="the attribution map that ranks the heads"),
             Option(name="n", type=int, default=50, minimum=1, nullable=True,
                    help="prompts evaluated (after leaving out the attribution's)"),
             Option(name="attribution_prompts", type=str, default="capitals",
                    choices=lambda: sorted(PAIR_GENERATORS), registry="prompt-pair generator",
                    help="the attribution's prompt pairs"),
             Option(name="attribution_n", type=int, default=32, minimum=1,
                    help="the attribution's prompt pairs"),
             _BATCH),
))


def _run_determinants(call: Call) -> AnswerDeterminants:
    o = call.options
    return answer_determinants(call.model, call.task, shots=call.shots, n=o["n"],
                               seed=call.seed, closed_book=o["closed_book"],
                               n_resamples=o["n_resamples"], progress=call.progress,
                               **call.batch())


ANSWER_DETERMINANTS = register_analysis(Analysis(
    name="answer_determinants", command="answer-determinants",
    help="in-context rate against a tokenizer frequency proxy and the closed-book confidence",
    run=_run_determinants, result_type=AnswerDeterminants, per_task=True, shots=(0,),
    memory="choices", outputs=_task_outputs(
        "answer-determinants", lambda r: r.statistics().drop(columns=["interval", "null"])), sequence_length=_task_length,
    options=(Option(name="n", type=int, default=None, minimum=1, nullable=True,
                    help="examples (default all of the evaluation pool)"),
             Option(name="closed_book", type=str, default=CLOSED_BOOK,
                    help="the closed-book prompt, with the task's fields"),
             Option(name="n_resamples", type=int, default=1000, minimum=1,
                    help="bootstrap resamples and permutations"),
             _BATCH),
))

