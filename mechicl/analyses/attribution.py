"""Attribution patching: a first-order estimate of every activation patch from one backward pass.

Nanda (2023, "Attribution Patching: Activation Patching At Industrial Scale") approximates the
metric after patching activation ``a`` from its base value to the other run's value ``a'`` by
the linearisation around the base run::

    M(patched) ~= M(base) + (a' - a) . dM/da

so one clean run, one corrupted run and one backward pass estimate every cell of a patching
grid. mechicl returns the estimate as a :class:`~mechicl.analyses.patching.PatchResult` laid out exactly
like :func:`mechicl.patch`'s (same targets, ``by_pos``, ``kv_heads``, direction and
normalisation), so the two can be compared cell by cell with :func:`agreement`. The estimate is
exact when the metric is linear in the patched activation (e.g. the last layer's head outputs of
a model without a final norm, under the logit difference), and degrades where attention
saturates or norms rescale (Nanda; Kramár et al. 2024, "AtP*").

Grouped-query attention with ``kv_heads="query"``: the gradient with respect to the key/value a
single query head reads is computed from hooks (``dM/dk_h = scale * sum_q dM/dscore_h[q] q_h[q]``,
``dM/dv_h = sum_q pattern_h[q] dM/dz_h[q]``).

Axis names: ``layer head kv_head pos pair d_head d_model``.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from einops import einsum, reduce, repeat
from jaxtyping import Int
from torch import Tensor

from mechicl.analyses._engine import (
    TARGET_SPECS,
    Direction,
    KVHeads,
    Target,
    attention_scale,
    capture,
    frozen_parameters,
    need_tokens,
    normalise,
    prepare,
    prepare_target,
    qk_kinds,
    source_names,
    wrong_tokens,
)
from mechicl.analyses._registry import Analysis, Call, Job, Outputs, job_stem, register_analysis
from mechicl.analyses.metrics import MetricFn
from mechicl.analyses.overlap import spearman, top_k_overlap
from mechicl.analyses.patching import (
    PATCHING,
    PatchResult,
    job_pairs,
    pair_length,
    patch_figures,
    patch_summary,
)
from mechicl.inputs.pairs import PromptPairs
from mechicl.model.hooked import HookedModel

__all__ = ["Agreement", "agreement", "attribution_patch"]


def attribution_patch(
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
) -> PatchResult:
    """Attribution-patching estimate of :func:`mechicl.patch` (same arguments and layout).

    Each pair costs one forward pass of the source prompt and one forward + backward pass of the
    base prompt (the corrupted one when denoising), whatever the number of cells.

    Returns:
        A :class:`~mechicl.analyses.patching.PatchResult` with ``method="attribution"``: the estimated
        metric after each patch (base metric + first-order change), normalised if asked.
    """
    model, resolved, inputs = prepare(model, clean, corrupted, metric, direction, normalize,
                                      answer, wrong)
    if not resolved.builtin and len(set(inputs.lengths)) > 1:
        raise ValueError(f"prompts have lengths {sorted(set(inputs.lengths))}: callable metrics "
                         "need one length (the pairs of a length run as one batch)")
    axes, sizes = prepare_target(model, inputs, resolved, target, by_pos, kv_heads)
    query_view = target in ("k", "v") and kv_heads == "query"
    layers = range(model.n_layers)
    names = source_names(model, target, layers, kv_heads)
    extra: set[str] = set()  # base-run activations the query view needs
    if query_view:
        kinds = (qk_kinds(model)[0], "attn_scores") if target == "k" else ("pattern", "z")
        extra = {model.hook_name(kind, layer) for kind in kinds for layer in layers}
    denoise = direction == "denoising"
    base = inputs.corrupted if denoise else inputs.clean
    other = inputs.clean if denoise else inputs.corrupted

    # Pairs of one length run as one batch (no padding): callables see the whole batch.
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(inputs.lengths):
        groups.setdefault(n, []).append(i)
    contrib = torch.zeros(*sizes, len(inputs))  # first-order change per cell and pair
    base_metric = torch.zeros(len(inputs))
    other_metric = torch.zeros(len(inputs))
    scalar_base: Tensor | None = None
    scalar_other: Tensor | None = None
    for idx in groups.values():
        src_tokens = torch.stack([other[i] for i in idx])
        base_tokens = torch.stack([base[i] for i in idx])
        src_logits, src = capture(model, src_tokens, names)
        acts: dict[str, Tensor] = {}

        def keep(name: str, store: dict[str, Tensor] = acts) -> Any:
            def hook(x: Tensor, hook: Any) -> Tensor:
                x.retain_grad()
                store[name] = x
                return x
            return hook

        def leaf(x: Tensor, hook: Any) -> Tensor:  # gradients start here, not at parameters
            return x.detach().requires_grad_(True)

        hooks = [(model.hook_name("resid_pre", 0), leaf)]
        hooks += [(n, keep(n)) for n in sorted(names | extra)]
        with frozen_parameters(model), torch.enable_grad():
            logits = model.run_with_hooks(base_tokens.to(model.device), fwd_hooks=hooks,
                                          return_type="logits")
            answer_pos = base_tokens.shape[1] - 1
            if resolved.builtin:
                sel = torch.tensor(idx)
                m_base = resolved.on_answer_logits(logits[:, answer_pos],
                                                   need_tokens(inputs.answer, resolved)[sel],
                                                   wrong_tokens(inputs, resolved)[sel])
                m_other = resolved.on_answer_logits(src_logits[:, answer_pos].to(logits.device),
                                                    inputs.answer[sel],
                                                    wrong_tokens(inputs, resolved)[sel])
                base_metric[idx] = m_base.detach().cpu()
                other_metric[idx] = m_other.cpu()
                total = m_base.sum()
            else:
                m_base = resolved.on_logits(logits[None])[0]
                m_other = resolved.on_logits(src_logits[None].to(logits.device))[0]
                if m_base.ndim == 0:
                    scalar_base, scalar_other = m_base.detach().cpu(), m_other.cpu()
                else:
                    base_metric[idx] = m_base.detach().cpu()
                    other_metric[idx] = m_other.cpu()
                total = m_base.sum()
            total.backward()
        grads = {n: acts[n].grad for n in names | extra}
        for layer in layers:
            c = _cell_contributions(model, target, layer, by_pos, query_view, src, acts, grads)
            contrib[layer][..., idx] = c.detach().cpu()  # [..., batch]

    if scalar_base is not None:
        est = scalar_base + contrib.sum(-1)
        clean_m, corrupted_m = (scalar_other, scalar_base) if denoise else (scalar_base, scalar_other)
        per_pair = None
        values = est
    else:
        per_pair = base_metric + contrib
        clean_m, corrupted_m = (other_metric, base_metric) if denoise else (base_metric, other_metric)
        values = per_pair.mean(-1)
    if resolved.normalize:
        values = normalise(values, clean_m, corrupted_m)
    labels = {"pos": model.to_str_tokens(inputs.clean[0])} if "pos" in axes else {}
    params = {"target": target, "by_pos": by_pos, "direction": direction, "kv_heads": kv_heads,
              "metric": resolved.name, "normalize": resolved.normalize, **inputs.describe()}
    return PatchResult(target=target, axes=axes, values=values, per_pair=per_pair,
                       clean=clean_m, corrupted=corrupted_m, metric=resolved.name,
                       normalized=resolved.normalize, direction=direction, method="attribution",
                       labels=labels, params=params, model=model.info())


def _cell_contributions(model: HookedModel, target: str, layer: int, by_pos: bool,
                        query_view: bool, src: dict[str, Tensor], acts: dict[str, Tensor],
                        grads: dict[str, Tensor]) -> Tensor:
    """``(a' - a) . dM/da`` of one layer, summed over everything but the cell axes; the batch
    axis goes last: ``[..., batch]``."""
    layout = TARGET_SPECS[target][1]
    if query_view:
        g = model.group_size
        if target == "v":
            v_name = model.hook_name("v", layer)
            delta = repeat(src[v_name] - acts[v_name].detach(), "b pos kv d -> b pos (kv g) d", g=g)
            pattern = acts[model.hook_name("pattern", layer)].detach()
            grad_z = grads[model.hook_name("z", layer)]
            grad = einsum(pattern, grad_z, "b h qp kp, b qp h d -> b kp h d")  # dM/dv per query head
        else:
            q_kind, k_kind = qk_kinds(model)
            k_name = model.hook_name(k_kind, layer)
            delta = repeat(src[k_name] - acts[k_name].detach(), "b pos kv d -> b pos (kv g) d", g=g)
            q = acts[model.hook_name(q_kind, layer)].detach()
            grad_s = grads[model.hook_name("attn_scores", layer)]
            grad = attention_scale(model, layer) * einsum(grad_s, q, "b h qp kp, b qp h d -> b kp h d")
        prod = (delta * grad).sum(-1)  # [batch, pos, head]
        return reduce(prod, "b pos h -> pos h b" if by_pos else "b pos h -> h b", "sum")
    name = model.hook_name(TARGET_SPECS[target][0], layer)
    prod = (src[name] - acts[name].detach()) * grads[name]
    if layout == "resid":  # [batch, pos, d_model]
        return reduce(prod, "b pos d -> pos b" if by_pos else "b pos d -> b", "sum")
    if layout == "head":  # [batch, pos, head, d_head]
        return reduce(prod, "b pos h d -> pos h b" if by_pos else "b pos h d -> h b", "sum")
    # pattern [batch, head, query_pos, key_pos]
    return reduce(prod, "b h qp kp -> h qp b" if by_pos else "b h qp kp -> h b", "sum")


@dataclass(frozen=True, kw_only=True)
class Agreement:
    """How well an attribution estimate matches exact patching on the same cells.

    Attributes:
        n_cells: cells compared (computed in both).
        pearson: correlation of the effects.
        spearman: rank correlation of the effects.
        top_k: share of the ``k`` largest-|effect| cells found by both.
        k: the ``k`` of ``top_k``.
        max_abs_error: largest ``|estimate - exact|``.
        sign_agreement: share of cells whose effects have the same sign.
    """

    n_cells: int
    pearson: float
    spearman: float
    top_k: float
    k: int
    max_abs_error: float
    sign_agreement: float

    def to_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


def agreement(exact: PatchResult, estimate: PatchResult, *, k: int = 10) -> Agreement:
    """Compare an attribution estimate with exact patching of the same target and prompts."""
    if exact.axes != estimate.axes or exact.values.shape != estimate.values.shape:
        raise ValueError(f"results differ in layout: {exact.axes} {tuple(exact.values.shape)} vs "
                         f"{estimate.axes} {tuple(estimate.values.shape)}")
    if exact.normalized != estimate.normalized or exact.direction != estimate.direction:
        raise ValueError("results differ in normalisation or direction")
    a, b = exact.effect().flatten(), estimate.effect().flatten()
    ok = ~(torch.isnan(a) | torch.isnan(b))
    a, b = a[ok].double(), b[ok].double()
    if a.numel() < 2:
        raise ValueError("fewer than two cells computed in both results")
    k = min(k, a.numel())
    pearson = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    return Agreement(n_cells=int(a.numel()), pearson=pearson, spearman=spearman(a, b),
                     top_k=top_k_overlap(a.abs(), b.abs(), k), k=k,
                     max_abs_error=float((a - b).abs().max()),
                     sign_agreement=float(((a > 0) == (b > 0)).double().mean()))


# --------------------------------------------------------------------------------------------
# The registered analysis
# --------------------------------------------------------------------------------------------


def _exact(job: Job) -> dict[str, Job]:
    return {"exact": PATCHING.job(job.model, job.options, seed=job.seed)}


def _run(call: Call) -> PatchResult:
    o = call.options
    estimate = attribution_patch(call.model, job_pairs(call.model, call.job), metric=o["metric"],
                                 target=o["target"], by_pos=o["by_pos"],
                                 direction=o["direction"], kv_heads=o["kv_heads"])
    found = agreement(call.inputs["exact"], estimate)
    return dataclasses.replace(estimate, params={**estimate.params,
                                                 "agreement": found.to_dict()})


def _outputs(pairs: Sequence[tuple[Job, PatchResult]], options: Mapping[str, Any]) -> Outputs:
    results, figures, rows = {}, {}, []
    for job, result in pairs:
        o = job.options
        stem = job_stem(job, o["prompts"], o["target"]) + ("-by-pos" if o["by_pos"] else "")
        stem += "-attribution"
        results[stem] = result
        figures |= patch_figures(stem, result)
        agree = result.params["agreement"]
        rows.append({"prompts": o["prompts"], **patch_summary(result),
                     **{f"agreement {k}": v for k, v in agree.items()}})
    return Outputs(results=results, figures=figures, rows=rows)


ATTRIBUTION = register_analysis(Analysis(
    name="attribution", help="attribution patching (one backward pass) and its agreement with "
                             "exact activation patching",
    # no batches to size: one forward + backward per pair (its exact input is sized as patching)
    run=_run, result_type=PatchResult, memory=None, inputs=_exact,
    sequence_length=pair_length, outputs=_outputs,
    # activation patching's options (its batch size aside: one backward pass per pair): the
    # estimate is compared with that job's result
    options=tuple(o for o in PATCHING.options if o.name != "batch_tokens"),
))
