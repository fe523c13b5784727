"""Activation patching: which activations carry the information that changes the answer.

Run a prompt pair: a *clean* prompt and a *corrupted* one that differs in a key detail (e.g. IOI
names, Wang et al. 2022). Replace one activation of one run by its value in the other run and
score the output with a metric. *Denoising* (the default, as TransformerLens's ``patching``)
runs the corrupted prompt with a clean activation patched in: a large effect means the activation
suffices to restore the clean behaviour. *Noising* runs the clean prompt with a corrupted
activation: a large effect means the activation is necessary.

Targets (``target=``), each by layer (``by_pos=False``, every position at once) or by layer and
position (``by_pos=True``):

==================  ============================  ==================================
target              all positions                 by position
==================  ============================  ==================================
``resid_pre``,      ``[layer]``                   ``[layer, pos]``
``resid_mid``,
``resid_post``,
``attn_out``,
``mlp_out``
``head_out`` (z),   ``[layer, head]``             ``[layer, pos, head]``
``q``, ``k``, ``v``
``pattern``         ``[layer, head]``             ``[layer, head, pos]`` (pos = query/dest)
==================  ============================  ==================================

The axis orders match TransformerLens's ``get_act_patch_*`` functions, and the numbers equal
theirs (tested to 1e-4 on tiny models and on SmolLM2). One caveat: in the bridge,
``blocks.L.hook_resid_mid`` is the MLP norm's input (``ln2.hook_in``), so a value returned there
reaches the MLP but not the skip connection around it. mechicl patches the residual stream
itself (the MLP input and, by the same change, ``hook_resid_post``); TransformerLens's
``get_act_patch_resid_mid`` on a bridge does so only under ``torch.no_grad()`` (with autograd on
it copies the activation and patches the MLP input alone).

Grouped-query attention: ``hook_k``/``hook_v`` hold one key/value vector per KV head, shared by
the query heads of its group. With ``kv_heads="group"`` (the default, TransformerLens's
behaviour) ``k``/``v`` results are ``[layer, kv_head]``: patching a KV head changes what every
query head of its group reads. With ``kv_heads="query"`` they are ``[layer, head]`` over *query*
heads: only the patched query head sees the other run's keys/values; the others of its group keep
theirs. mechicl computes that view exactly from the hooks (the query head's attention scores
``scale * q . k`` and its output ``pattern @ v``); for multi-head attention both views coincide.

Speed: TransformerLens runs one full forward pass per patched cell. mechicl runs many patched
copies of a prompt in one pass, and runs the layers below the lowest patched layer once for all
copies (:mod:`mechicl.analyses._engine`); built-in metrics unembed only the answer position.

Axis names: ``layer head kv_head pos pair copy d_head d_model``.
"""

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechicl._checks import check_choice
from mechicl.analyses._engine import (
    TARGETS,
    Direction,
    Hook,
    KVHeads,
    Target,
    baselines,
    capture,
    grid_cells,
    normalise,
    patch_hooks,
    prefix_reusable,
    prepare,
    prepare_target,
    run_cells,
    source_names,
    target_axes,
    user_cells,
)
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
from mechicl.analyses.metrics import METRICS, MetricFn
from mechicl.inputs.pairs import PAIR_GENERATORS, PromptPairs, make_pairs
from mechicl.model.hooked import HookedModel
from mechicl.plotting import patch_heatmap
from mechicl.results import HeadScores, read_result, result_type, write_result

logger = logging.getLogger(__name__)

__all__ = ["CELL_OPTIONS", "PAIR_OPTIONS", "TARGETS", "PatchResult", "Target", "job_pairs", "patch",
           "patch_figures", "patch_summary", "target_axes"]



# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@result_type
@dataclass(frozen=True, kw_only=True)
class PatchResult:
    """The result of activation, path or attribution patching.

    Attributes:
        target: what was patched (``"head_out"``, ``"resid_pre"``, ... or ``"path:q"``).
        axes: names of the result axes, e.g. ``("layer", "head")`` or ``("layer", "pos", "head")``.
        values: the score of each cell: the metric averaged over pairs (normalised if
            ``normalized``); NaN for cells not computed (see ``cells=``) or that cannot have an
            effect (path patching).
        per_pair: ``[*axes, pair]`` the raw metric of each cell for each pair (None when a user
            metric returns one number for the whole batch).
        clean: the unpatched clean run's metric (``[pair]``, or a scalar).
        corrupted: the unpatched corrupted run's metric (same shape).
        metric: the metric's name.
        normalized: whether ``values`` are ``(patched - corrupted) / (clean - corrupted)``.
        direction: ``"denoising"`` (corrupted run, clean activations patched in) or
            ``"noising"`` (clean run, corrupted activations patched in).
        method: ``"activation"``, ``"path"`` or ``"attribution"``.
        labels: per-axis tick labels, e.g. ``{"pos": [tokens of the first clean prompt]}``.
        params: the protocol (JSON-serialisable).
        model: the model's provenance.
    """

    target: str
    axes: tuple[str, ...]
    values: Float[Tensor, "..."]
    per_pair: Float[Tensor, "... pair"] | None
    clean: Float[Tensor, "..."]
    corrupted: Float[Tensor, "..."]
    metric: str
    normalized: bool
    direction: str
    method: str = "activation"
    labels: dict[str, list[str]] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def baseline(self) -> float:
        """The score of an unpatched run in this direction (0 denoising / 1 noising when
        normalised; the raw corrupted or clean metric otherwise)."""
        if self.normalized:
            return 0.0 if self.direction == "denoising" else 1.0
        base = self.corrupted if self.direction == "denoising" else self.clean
        return float(base.float().mean())

    def effect(self) -> Float[Tensor, "..."]:
        """``values - baseline``: what each patch changes."""
        return self.values - self.baseline

    def to_dataframe(self) -> pd.DataFrame:
        """One row per computed cell: the axis indices, ``value``, ``effect`` and, with
        per-pair values, ``std`` over pairs."""
        idx = torch.nonzero(~torch.isnan(self.values))
        data: dict[str, Any] = {a: idx[:, i].numpy() for i, a in enumerate(self.axes)}
        flat = self.values[tuple(idx.T)]
        data["value"] = flat.numpy()
        data["effect"] = (flat - self.baseline).numpy()
        if self.per_pair is not None and self.per_pair.shape[-1] > 1:
            data["std"] = self.per_pair[tuple(idx.T)].float().std(-1).numpy()
        df = pd.DataFrame(data)
        df.insert(0, "target", self.target)
        return df

    def top(self, k: int = 10, *, by: Literal["effect", "abs_effect"] = "abs_effect"
            ) -> list[tuple[tuple[int, ...], float]]:
        """The ``k`` cells with the largest (absolute) effect, as ``(index tuple, value)``."""
        check_choice("by", by, ("effect", "abs_effect"))
        eff = self.effect()
        key = eff.abs() if by == "abs_effect" else eff
        key = torch.nan_to_num(key, nan=-float("inf"))
        order = torch.argsort(key.flatten(), descending=True, stable=True)[:k]
        out = []
        for flat in order.tolist():
            index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), self.values.shape))
            out.append((index, float(self.values[index])))
        return out

    def head_scores(self, name: str | None = None) -> HeadScores:
        """The result as :class:`~mechicl.results.HeadScores` (``[layer, head]`` results only),
        per-pair rows as "seeds", for heatmaps and overlap analysis."""
        if self.axes not in (("layer", "head"), ("layer", "kv_head")):
            raise ValueError(f"head_scores needs a [layer, head] result, this one is {self.axes}")
        name = name or f"patch_{self.target}"
        if self.per_pair is None or self.normalized:
            per = self.values[None]
        else:
            per = self.per_pair.permute(2, 0, 1)
        scores = HeadScores.from_per_seed(name, per, params=self.params, model=self.model)
        # the reported values (normalised or mean) are the mean
        return HeadScores(name=name, mean=self.values.double(), var=scores.var,
                          per_seed=scores.per_seed, params=self.params, model=self.model)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write as a folder (:func:`~mechicl.results.write_result`), atomically."""
        tensors = {"values": self.values, "clean": self.clean, "corrupted": self.corrupted}
        if self.per_pair is not None:
            tensors["per_pair"] = self.per_pair
        fields = {"target": self.target, "axes": list(self.axes), "metric": self.metric,
                  "normalized": self.normalized, "direction": self.direction,
                  "method": self.method, "labels": self.labels}
        return write_result(path, kind="PatchResult", params=self.params, model=self.model,
                            fields=fields, tensors=tensors)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "PatchResult":
        """Read a result written by :meth:`save`, verified
        (:func:`~mechicl.results.read_result`)."""
        folder = read_result(path, "PatchResult")
        t, f = folder.tensors, folder.fields
        return cls(target=f["target"], axes=tuple(f["axes"]), values=t["values"],
                   per_pair=t.get("per_pair"), clean=t["clean"], corrupted=t["corrupted"],
                   metric=f["metric"], normalized=f["normalized"], direction=f["direction"],
                   method=f["method"], labels=f["labels"], params=folder.params,
                   model=folder.model)


# --------------------------------------------------------------------------------------------
# Activation patching
# --------------------------------------------------------------------------------------------


def patch(
    model: HookedModel,
    clean: PromptPairs | str | Sequence[str] | Int[Tensor, "pair pos"],
    corrupted: str | Sequence[str] | Int[Tensor, "pair pos"] | None = None,
    metric: str | MetricFn = "logit_diff",
    *,
    target: Target = "head_out",
    by_pos: bool = False,
    direction: Direction = "denoising",
    kv_heads: KVHeads = "group",
    normalize: bool = False,
    answer: Any = None,
    wrong: Any = None,
    cells: Any = None,
    batch_tokens: int = 8192,
    progress: bool = False,
) -> PatchResult:
    """Activation patching of every cell of ``target`` (see the module docstring).

    Args:
        model: the model.
        clean: a :class:`~mechicl.inputs.pairs.PromptPairs` (holding both prompts and the answer
            tokens), or clean prompts (strings or a ``[pair, pos]`` token tensor, BOS
            included).
        corrupted: the corrupted prompts, token-aligned with the clean ones (None with
            PromptPairs).
        metric: a built-in metric name (:data:`mechicl.analyses.metrics.METRICS`) or a callable
            ``logits [pair, pos, vocab] -> scalar or [pair]`` (TransformerLens style).
        target: what to patch (:data:`TARGETS`).
        by_pos: one cell per position as well (otherwise all positions at once).
        direction: ``"denoising"`` (run corrupted, patch clean in) or ``"noising"``.
        kv_heads: for ``k``/``v`` of grouped-query models: ``"group"`` (per KV head) or
            ``"query"`` (per query head).
        normalize: report ``(patched - corrupted) / (clean - corrupted)`` (pair means).
        answer: the correct tokens (ids or single-token strings) for built-in metrics when
            ``clean`` is not a PromptPairs.
        wrong: the competing tokens, likewise.
        cells: only these cells (``[n, n_axes]`` indices or a DataFrame with the axis names as
            columns, TransformerLens's ``index_df`` accepted); others are NaN.
        batch_tokens: patched copies x prompt length per forward pass (memory budget).
        progress: show a progress bar.

    Returns:
        A :class:`PatchResult` with ``[layer, head]``-like values (TransformerLens's axis order).

    >>> result = patch(model, pairs, metric="logit_diff_normalized")  # 2 layers, 4 heads
    >>> result.axes, result.values.shape
    (('layer', 'head'), torch.Size([2, 4]))
    """
    model, resolved, inputs = prepare(model, clean, corrupted, metric, direction, normalize,
                                      answer, wrong)
    axes, sizes = prepare_target(model, inputs, resolved, target, by_pos, kv_heads)
    all_cells = grid_cells(sizes) if cells is None else user_cells(cells, axes, sizes)

    denoise = direction == "denoising"
    names = source_names(model, target, range(model.n_layers), kv_heads)
    sources, logits_clean, logits_corrupted = [], [], []
    for c, k in zip(inputs.clean, inputs.corrupted, strict=True):
        lc, cache_c = capture(model, c, names if denoise else set())
        lk, cache_k = capture(model, k, set() if denoise else names)
        sources.append(cache_c if denoise else cache_k)
        logits_clean.append(lc)
        logits_corrupted.append(lk)
    clean_metric, corrupted_metric = baselines(model, inputs, resolved, logits_clean,
                                               logits_corrupted)
    base = inputs.corrupted if denoise else inputs.clean

    def hooks_for(p: int, chunk_cells: Tensor, start_pos: int = 0) -> list[tuple[str, Hook]]:
        return patch_hooks(model, target, axes, chunk_cells, by_pos, kv_heads, sources[p],
                           len(base[p]), start_pos=start_pos)

    # By position, a copy patched at position p equals the unpatched prompt before p: the
    # passes reuse a cached prefix (a pattern's position is its query position).
    reuse = by_pos and prefix_reusable(target, kv_heads)
    per_cell, per_pair = run_cells(
        model, inputs, resolved, cells=all_cells, base=base, hooks_for=hooks_for,
        start_layers=all_cells[:, 0], batch_tokens=batch_tokens,
        progress=progress, desc=f"patch {target}",
        start_positions=all_cells[:, axes.index("pos")] if reuse else None)
    if resolved.normalize:
        per_cell = normalise(per_cell, clean_metric, corrupted_metric)
    values = torch.full(sizes, float("nan"))
    values[tuple(all_cells.T)] = per_cell
    grid_pairs = None
    if per_pair is not None:
        grid_pairs = torch.full((*sizes, len(inputs)), float("nan"))
        grid_pairs[tuple(all_cells.T)] = per_pair
    labels: dict[str, list[str]] = {}
    if "pos" in axes:
        labels["pos"] = model.to_str_tokens(inputs.clean[0])
    params = {"target": target, "by_pos": by_pos, "direction": direction, "kv_heads": kv_heads,
              "metric": resolved.name, "normalize": resolved.normalize,
              "n_cells": len(all_cells), **inputs.describe()}
    return PatchResult(target=target, axes=axes, values=values, per_pair=grid_pairs,
                       clean=clean_metric, corrupted=corrupted_metric, metric=resolved.name,
                       normalized=resolved.normalize, direction=direction, method="activation",
                       labels=labels, params=params, model=model.info())


# --------------------------------------------------------------------------------------------
# The registered analysis (path and attribution patching reuse its pair options)
# --------------------------------------------------------------------------------------------


def job_pairs(model: HookedModel, job: Job) -> PromptPairs:
    """A patching job's prompt pairs: ``n`` pairs of the generator ``prompts`` (seeded by the
    job's seed); with ``by_pos``, the largest group of pairs of one length (positions must
    line up)."""
    o = job.options
    pairs = make_pairs(o["prompts"], model, n=o["n"], seed=job.seed)
    if o.get("by_pos") and not pairs.same_length:
        groups = pairs.by_length()
        length = max(groups, key=lambda k: (len(groups[k]), k))
        logger.info("by_pos: using the %d pairs of length %d (of %d)", len(groups[length]),
                    length, len(pairs))
        pairs = groups[length]
    return pairs


def pair_length(model: HookedModel, job: Job, task: Any) -> int:
    """The longest row a patching job feeds the model (for memory budgets)."""
    return max(job_pairs(model, job).lengths)


def patch_summary(result: PatchResult) -> dict[str, Any]:
    """One summary row: axes, the unpatched metrics and the ten cells of largest effect."""
    return {"target": result.target, "method": result.method, "axes": " x ".join(result.axes),
            "clean": float(result.clean.float().mean()),
            "corrupted": float(result.corrupted.float().mean()),
            "top cells": " ".join(".".join(map(str, cell)) for cell, _ in result.top(10))}


def patch_figures(stem: str, result: PatchResult) -> dict[str, Any]:
    """Heatmaps of a result (three-axis results: summed over positions and over heads)."""
    if len(result.axes) != 3:
        return {stem: patch_heatmap(result)}
    return {f"{stem}-sum-over-{over}": patch_heatmap(result, sum_over=over)
            for over in ("pos", "head")}


def _stem(job: Job) -> str:
    o = job.options
    return job_stem(job, o["prompts"], o["target"]) + ("-by-pos" if o["by_pos"] else "")


def _run(call: Call) -> PatchResult:
    o = call.options
    return patch(call.model, job_pairs(call.model, call.job), metric=o["metric"],
                 target=o["target"], by_pos=o["by_pos"], direction=o["direction"],
                 kv_heads=o["kv_heads"], progress=call.progress, **call.batch())


def _outputs(pairs: Sequence[tuple[Job, PatchResult]], options: Mapping[str, Any]) -> Outputs:
    results, figures, rows = {}, {}, []
    for job, result in pairs:
        stem = _stem(job)
        results[stem] = result
        figures |= patch_figures(stem, result)
        rows.append({"prompts": job.options["prompts"], **patch_summary(result)})
    return Outputs(results=results, figures=figures, rows=rows)


PAIR_OPTIONS: tuple[Option, ...] = (
    Option(name="prompts", type=str, default="ioi", choices=lambda: sorted(PAIR_GENERATORS),
           registry="prompt-pair generator",
           help="prompt-pair generator (ioi, colored_objects, capitals, repeated_tokens, ...)"),
    Option(name="n", type=int, default=32, minimum=1, help="prompt pairs"),
    Option(name="metric", type=str, default="logit_diff", choices=METRICS,
           help="what is measured at the answer position (logit_diff_normalized: 0 at the "
                "corrupted run, 1 at the clean one)"),
)
"""Options of every patching analysis: which pairs, how many, which metric."""

CELL_OPTIONS: tuple[Option, ...] = (
    Option(name="target", type=str, default="head_out", choices=TARGETS, sweep=True,
           help="what is patched; the CLI takes several, comma-separated"),
    Option(name="by_pos", type=bool, default=False,
           help="one cell per position too (uses the largest group of pairs of one length)"),
    Option(name="direction", type=str, default="denoising", choices=("denoising", "noising"),
           help="denoising (patch clean into corrupted) or noising"),
    Option(name="kv_heads", type=str, default="group", choices=("group", "query"),
           help="k / v of grouped-query models: per KV head or per query head"),
)
"""Options of activation and attribution patching: which cells."""

PATCHING = register_analysis(Analysis(
    name="patching", command="patch",
    help="activation patching on prompt pairs (every cell of a target)",
    run=_run, result_type=PatchResult, memory="forward", sequence_length=pair_length,
    outputs=_outputs,
    options=(*PAIR_OPTIONS, *CELL_OPTIONS,
             batch_tokens_option(8192, "patched copies x prompt length per forward pass")),
))
