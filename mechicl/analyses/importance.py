"""Head importance and FFN importance for in-context learning tasks.

Gradient importance of every attention head from one forward + backward pass per batch, with
the loss on the answer tokens only (the gold continuation of each k-shot prompt), parameters
frozen. A gate ``g`` multiplies each head's output ``z`` (``hook_z``, before ``W_O``; query heads
for grouped-query attention) at every token: ``dL/dg[b, t, l, h] = sum_d z[b,t,l,h,d] *
dL/dz[b,t,l,h,d]``, the per-token quantity both gradient methods need.

* ``method="bansal"`` (Bansal et al. 2023, llm-interpret ``calculate_importance``):
  ``I[l, h] = sum_b sum_t |dL_b/dg[b, t, l, h]| / sum_b (N_b - 1)``: the absolute value per
  token, summed over tokens and examples, divided by the number of positions that receive
  gradient (``N_b`` real tokens of example ``b``). The last layer is divided by the number of
  answer tokens instead, as in the reference (only answer-predicting positions of the last
  layer get gradient). ``L_b`` is the mean cross-entropy over example ``b``'s answer tokens,
  which is the reference's loss at its default batch size of 1; here examples are batched but
  their losses are summed, so every example keeps its own gradient.
* ``method="michel"`` (Michel et al. 2019): ``I[l, h] = mean_b |sum_t dL_b/dg[b, t, l, h]|``
  = the mean over examples of ``|dL_b / d mask[l, h]|`` for a multiplicative head mask.
* ``method="ablation"``: the exact counterpart, **signed**: the answer loss with the head
  removed minus the answer loss without (or the drop of accuracy), per example, averaged;
  positive = the head helps. ``ablation="zero"`` sets the head's ``z`` to 0, ``"mean"`` to its
  mean over the prompts' non-BOS positions. The masked copies for many heads share a forward
  pass.
* ``method="attribution"``: attribution patching towards the same ablation (Nanda 2023), the
  first-order Taylor estimate of ``method="ablation"``'s loss change, **signed**:
  ``I[l, h] = mean_b sum_t (a[l, h] - z[b, t, l, h]) . dL_b/dz[b, t, l, h]`` with ``a`` the
  ablated value (0, or the mean activation for ``ablation="mean"``). One forward + backward
  per batch: the gate ``g`` of the other methods becomes an interpolation
  ``z + g (a - z)`` at ``g = 0``, whose gradient is exactly that product.

``normalize_layers=True`` divides every layer's scores by their L2 norm over heads, as Michel
et al. do. :func:`ffn_importance` knocks out each layer's MLP and reports the accuracy drop
(Bansal et al.'s FFN ranking) or the loss increase. :func:`compare_methods` tabulates how far
maps of different methods agree and where each ranks the induction heads; :func:`is_signed`
says whether a map is signed (``params["signed"]``).

Axis names: ``example layer head batch pos``.
"""

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mechicl._batching import device_batch_tokens, length_batches
from mechicl._checks import check_choice
from mechicl.analyses._engine import frozen_parameters
from mechicl.analyses._registry import (
    Analysis,
    Call,
    Job,
    Option,
    Outputs,
    batch_tokens_option,
    job_stem,
    register_analysis,
    task_slug,
)
from mechicl.analyses.evaluation import (
    AnswerBatch,
    NormalizationChoice,
    answer_batch,
    choice_chars,
    choice_scores,
    longest_choice_row,
    longest_prompt,
    masked_choice_logprobs,
    prompt_means,
    resolve_normalization,
    task_prompts,
)
from mechicl.analyses.overlap import (
    kendall,
    rank,
    spearman,
    top_k,
    top_k_overlap,
    within_layer_spearman,
)
from mechicl.inputs.tasks import Prompt, Task, build_prompts, load_task, resolve_prompts
from mechicl.model.hooked import HookedModel, as_hooked_model
from mechicl.model.masks import Ablation, ActivationMeans, Mask
from mechicl.plotting import head_heatmap, kv_group_size, layer_bars
from mechicl.results import HeadScores, LayerScores

__all__ = ["IMPORTANCE_LABELS", "IMPORTANCE_METHODS", "SIGNED_METHODS", "compare_methods",
           "default_batch_tokens", "ffn_importance", "head_importance", "importance_label",
           "importance_prompts", "is_signed", "parse_importance_label", "resampled_maps",
           "token_gate_grads"]

log = logging.getLogger(__name__)

Method = Literal["bansal", "michel", "ablation", "attribution"]
IMPORTANCE_METHODS: tuple[str, ...] = ("bansal", "michel", "ablation", "attribution")
SIGNED_METHODS: tuple[str, ...] = ("ablation", "attribution")
"""Methods whose maps are signed (positive: the head helps; negative: removing it helps).
``bansal`` and ``michel`` are magnitudes (absolute values), never negative."""
Metric = Literal["loss", "accuracy"]


def importance_prompts(task: Task | str, *, shots: int, n: int | None = None, seed: int = 0,
                       **prompt_options: Any) -> list[Prompt]:
    """The k-shot prompts an importance run uses (:func:`mechicl.inputs.tasks.build_prompts`)."""
    task_obj = load_task(task) if isinstance(task, str) else task
    return build_prompts(task_obj, shots=shots, n=n, seed=seed, **prompt_options)


@dataclass(frozen=True, kw_only=True)
class GateGrads:
    """Per-token head-gate gradients of one batch.

    Attributes:
        grads: ``[batch, pos, layer, head]`` ``dL_b / dg`` (0 at padding).
        n_real: ``[batch]`` real tokens per example.
        n_answer: ``[batch]`` answer tokens per example.
        loss: ``[batch]`` mean answer cross-entropy per example.
    """

    grads: Float[Tensor, "batch pos layer head"]
    n_real: Tensor
    n_answer: Tensor
    loss: Float[Tensor, " batch"] = field(repr=False)


def token_gate_grads(
    model: HookedModel, tokens: Tensor, attention_mask: Tensor, answer_mask: Tensor, *,
    mask: Mask | None = None, towards: Float[Tensor, "layer head d_head"] | None = None,
) -> GateGrads:
    """One forward + backward: ``dL_b/dg[b, t, l, h]`` for a gate on every head at every token.

    ``L_b`` is the mean cross-entropy over example ``b``'s answer tokens (``answer_mask``); the
    batch loss is the sum of the examples' losses, so each row's gradient is its own.

    Without ``towards`` the gate multiplies the head's output, ``z -> g z`` at ``g = 1``, so
    ``dL/dg = z . dL/dz``. With ``towards`` (``a``: each head's ablated value, zeros or mean
    activations) it interpolates, ``z -> z + g (a - z)`` at ``g = 0``, so ``dL/dg = (a - z) .
    dL/dz``: attribution patching of every head and token towards ``a``. ``z`` is the head's
    output after ``mask``.
    """
    model = as_hooked_model(model)
    n_batch, n_pos = tokens.shape
    target = answer_mask.clone().bool()
    target[:, 0] = False
    b_idx, pos = torch.nonzero(target, as_tuple=True)
    counts = target.sum(-1)
    if bool((counts == 0).any()):
        raise ValueError("every example needs at least one answer token after position 0")
    fill = torch.ones if towards is None else torch.zeros
    gate = fill(model.n_layers, n_batch, n_pos, model.n_heads, device=model.device,
                dtype=model.dtype, requires_grad=True)
    ablated = None if towards is None else towards.to(model.device, model.dtype)

    def gate_hook(z: Tensor, hook: Any, layer: int) -> Tensor:  # z: [batch, pos, head, d_head]
        if ablated is None:
            return z * gate[layer][..., None]
        return z + gate[layer][..., None] * (ablated[layer] - z)

    hooks = mask.hooks(model) if mask is not None else []
    hooks += [(name, (lambda layer: lambda z, hook: gate_hook(z, hook, layer))(i))
              for i, name in enumerate(model.hook_names("z"))]
    # Unembed only the positions that predict an answer token (a position set shared by the
    # batch's rows); a model that ignores logits_to_keep returns every position.
    keep = torch.unique(pos - 1)
    with frozen_parameters(model), torch.enable_grad():
        logits = model.run_with_hooks(tokens, attention_mask=attention_mask, fwd_hooks=hooks,
                                      return_type="logits", logits_to_keep=keep)
        if logits.shape[1] == len(keep):
            picked = logits[b_idx, torch.searchsorted(keep, pos - 1)]  # [target, d_vocab]
        else:
            picked = logits[b_idx, pos - 1]
        nll = torch.logsumexp(picked, -1) - picked.gather(-1, tokens[b_idx, pos][:, None])[:, 0]
        per_example = torch.zeros(n_batch, dtype=nll.dtype, device=nll.device)
        per_example = per_example.index_add(0, b_idx, nll / counts[b_idx].to(nll.dtype))
        (grad,) = torch.autograd.grad(per_example.sum(), gate)
    grads = grad.detach().permute(1, 2, 0, 3)  # [batch, pos, layer, head]
    return GateGrads(grads=grads, n_real=attention_mask.sum(-1), n_answer=counts,
                     loss=per_example.detach())


def _gradient_importance(model: HookedModel, batch: AnswerBatch, method: str, mask: Mask | None,
                         batch_tokens: int, progress: bool, token_normalization: str = "reference",
                         towards: Tensor | None = None,
                         ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(aggregate [layer, head], per-example [example, layer, head], extras); ``towards``: the
    ablated values for ``method="attribution"``."""
    n_ex = batch.tokens.shape[0]
    per_token_sum = torch.zeros(n_ex, model.n_layers, model.n_heads, dtype=torch.float64)
    signed_sum = torch.zeros_like(per_token_sum)
    n_real = torch.zeros(n_ex, dtype=torch.long)
    n_answer = torch.zeros(n_ex, dtype=torch.long)
    loss = torch.zeros(n_ex, dtype=torch.float64)
    lengths = batch.attention_mask.sum(-1).tolist()
    # On a CPU, passes of at most CPU_PASS_TOKENS tokens (sentiment 5-shot, 12 prompts of
    # 160-250 tokens: 13.9 s in 2048-token batches, 11.1 s in 512-token ones).
    batches = length_batches(lengths, device_batch_tokens(model.device, batch_tokens))
    for rows in tqdm(batches, desc=f"importance ({method})",
                     disable=not progress, unit="batch"):
        width = max(lengths[i] for i in rows)
        g = token_gate_grads(model, batch.tokens[rows, :width], batch.attention_mask[rows, :width],
                             batch.answer_mask[rows, :width], mask=mask, towards=towards)
        grads = g.grads.double().cpu()
        per_token_sum[rows] = grads.abs().sum(1)
        signed_sum[rows] = grads.sum(1)
        n_real[rows] = g.n_real.cpu()
        n_answer[rows] = g.n_answer.cpu()
        loss[rows] = g.loss.double().cpu()
    extras = {"n_real": n_real, "n_answer": n_answer, "loss": loss}
    if method == "attribution":  # signed, per example, averaged as the ablation effects are
        return signed_sum.mean(0), signed_sum, extras
    if method == "michel":
        per_example = signed_sum.abs()
        return per_example.mean(0), per_example, extras
    # Bansal: positions that receive gradient = N - 1 (the last token predicts nothing); the last
    # layer only gets gradient at answer-predicting positions, so it is divided by those.
    denom = (n_real - 1).to(torch.float64)[:, None].expand(n_ex, model.n_layers).clone()
    if token_normalization == "reference":
        denom[:, -1] = n_answer.to(torch.float64)
    per_example = per_token_sum / denom[:, :, None]
    aggregate = per_token_sum.sum(0) / denom.sum(0)[:, None]
    return aggregate, per_example, extras


def _ablation_masks(model: HookedModel, base: Mask | None, ablation: str,
                    means: ActivationMeans | None, what: Literal["heads", "ffn"]) -> list[Mask]:
    kw = {"ablation": ablation, "means": means}
    base_mask = base if base is not None else Mask.keep_all(model)
    masks = [base_mask & Mask.keep_all(model, **kw)]
    if what == "heads":
        masks += [base_mask & Mask.remove(model, heads=[(layer, head)], **kw)
                  for layer in range(model.n_layers) for head in range(model.n_heads)]
    else:
        masks += [base_mask & Mask.remove(model, ffns=[layer], **kw)
                  for layer in range(model.n_layers)]
    return masks


def _knockout_effects(model: HookedModel, prompts: Sequence[Prompt], masks: list[Mask],
                      metric: str, normalization: str, batch_tokens: int, progress: bool,
                      ) -> Tensor:
    """``[example, mask-1]``: effect of each knockout mask (masks[1:]) vs masks[0], per
    example: loss increase, or correct(base) - correct(knocked out), the choices ranked by
    ``normalization`` (a resolved rule, as :func:`~mechicl.analyses.evaluation.evaluate`)."""
    if metric == "loss":  # mean cross-entropy on the gold answer's tokens
        gold_only = [dataclasses.replace(p, continuations=(p.continuations[p.gold],), gold=0)
                     for p in prompts]
        loglik, n_tok = masked_choice_logprobs(model, gold_only, masks, batch_tokens=batch_tokens,
                                               progress=progress)
        losses = -loglik[..., 0] / n_tok[:, 0].clamp(min=1)  # [mask, example]
        return (losses[1:] - losses[0]).T
    loglik, n_tok = masked_choice_logprobs(model, prompts, masks, batch_tokens=batch_tokens,
                                           progress=progress)
    score = choice_scores(loglik, n_tok, choice_chars(prompts), normalization)
    gold = torch.tensor([p.gold for p in prompts])
    correct = (score.argmax(-1) == gold).double()  # [mask, example]
    return (correct[0] - correct[1:]).T


def _means_for(model: HookedModel, prompts: Sequence[Prompt], ablation: str,
               means: ActivationMeans | None, batch_tokens: int) -> ActivationMeans | None:
    if ablation != "mean" or means is not None:
        return means
    return prompt_means(model, prompts, batch_tokens=batch_tokens)


def _check_method_options(method: str, metric: str, ablation: str) -> None:
    """``metric`` other than the loss needs ``method="ablation"``; ``ablation`` other than zero
    needs a method that ablates (``"ablation"``) or estimates an ablation (``"attribution"``)."""
    if method in ("bansal", "michel") and (metric != "loss" or ablation != "zero"):
        raise ValueError(f"method={method!r} is a gradient of the answer loss: metric={metric!r} "
                         f"and ablation={ablation!r} only apply to method='ablation' (the "
                         "ablation also to method='attribution')")
    if method == "attribution" and metric != "loss":
        raise ValueError(f"method='attribution' estimates the change of the answer loss: "
                         f"metric={metric!r} only applies to method='ablation'")


def head_importance(
    model: HookedModel, task: Task | str | None = None, *, shots: int = 5,
    method: Method = "bansal", n: int | None = 50, seed: int = 0,
    prompts: Sequence[Prompt] | None = None, normalize_layers: bool = False,
    ablation: Ablation = "zero", metric: Metric = "loss", means: ActivationMeans | None = None,
    mask: Mask | None = None, normalization: NormalizationChoice = "task",
    token_normalization: Literal["reference", "uniform"] = "reference",
    batch_tokens: int | None = None, progress: bool = False, **prompt_options: Any,
) -> HeadScores:
    """Importance of every attention head for a task at ``shots`` demonstrations.

    Args:
        model: the model.
        task: a :class:`~mechicl.inputs.tasks.Task` or registered task name.
        shots: demonstrations per prompt.
        method: ``"bansal"`` or ``"michel"`` (gradient magnitudes; one forward + backward
            per batch), ``"ablation"`` (remove each head; one masked copy of the data per head;
            signed) or ``"attribution"`` (its first-order estimate: one forward + backward per
            batch, plus one forward pass for the means of ``ablation="mean"``; signed).
        n: evaluation examples (default 50; None: all); ``seed`` seeds their choice and
            demonstrations.
        prompts: explicit prompts instead of building them from ``task``.
        normalize_layers: divide each layer's scores by their L2 norm over heads (Michel et al.).
        ablation: ``"zero"`` or ``"mean"``: what a removed head's output becomes (only for
            ``method="ablation"`` and ``"attribution"``, which estimates that ablation).
        metric: ``"loss"`` (answer loss increase) or ``"accuracy"`` (accuracy drop; only
            ``method="ablation"``); the other methods use the loss.
        means: mean activations for mean ablation (default: computed on the same prompts).
        mask: compute importance with this mask applied (e.g. after pruning).
        normalization: for ``metric="accuracy"``, how the choices are ranked, as
            :func:`~mechicl.analyses.evaluation.evaluate`: ``"task"`` (the task's own rule;
            ``"none"`` for explicit ``prompts`` without a task), ``"none"``, ``"tokens"`` or
            ``"chars"``.
        token_normalization: ``"bansal"`` only: ``"reference"`` divides the last layer by the
            answer-token count and the others by ``N - 1`` (as llm-interpret); ``"uniform"``
            divides every layer by ``N - 1``, so that layers are comparable (the reference's
            last layer is inflated by ``(N - 1) / answer tokens``).
        batch_tokens: rows x longest row per pass (default 2048 for the gradient methods
            bansal, michel and attribution, 4096 for ablation).
        progress: show a progress bar.
        **prompt_options: passed to :func:`~mechicl.inputs.tasks.build_prompts`.

    Returns:
        :class:`~mechicl.HeadScores` named ``importance_<method>``: ``mean`` is the importance
        (higher = more important; for the signed methods ``ablation`` and ``attribution``,
        negative = removing the head helps), ``per_seed`` holds one row per example (the
        per-example score; ``mean`` is their average, token-weighted for ``"bansal"``),
        ``extras`` the per-example token counts and answer losses (gradient methods),
        ``params["signed"]`` whether the map is signed (:func:`is_signed`).
    """
    model = as_hooked_model(model)
    check_choice("method", method, IMPORTANCE_METHODS)
    check_choice("ablation", ablation, ("zero", "mean"))
    check_choice("metric", metric, ("loss", "accuracy"))
    check_choice("token_normalization", token_normalization, ("reference", "uniform"))
    rule = resolve_normalization(normalization, task)  # checks the value
    _check_method_options(method, metric, ablation)
    name, prompt_list = resolve_prompts(task, prompts, shots=shots, n=n, seed=seed, prompt_options=prompt_options)
    if not prompt_list:
        raise ValueError("no prompts")
    budget = batch_tokens or default_batch_tokens(method)
    batch = answer_batch(model, prompt_list)
    extras: dict[str, Tensor] = {}
    if method == "ablation":
        means = _means_for(model, prompt_list, ablation, means, budget)
        masks = _ablation_masks(model, mask, ablation, means, "heads")
        effects = _knockout_effects(model, prompt_list, masks, metric, rule, budget, progress)
        per_example = effects.reshape(len(prompt_list), model.n_layers, model.n_heads)
        aggregate = per_example.mean(0)
    else:
        towards = None
        if method == "attribution":
            means = _means_for(model, prompt_list, ablation, means, budget)
            # the ablation being estimated, checked against the base mask as method="ablation"
            # would check it (one ablation kind, one set of means)
            removal = Mask.remove(model, heads=[(0, 0)], ablation=ablation, means=means)
            if mask is not None:
                _ = mask & removal  # raises for an incompatible base mask
            towards = (means.z if ablation == "mean" and means is not None
                       else torch.zeros(model.n_layers, model.n_heads, model.d_head))
        aggregate, per_example, extras = _gradient_importance(
            model, batch, method, mask, budget, progress, token_normalization, towards)
    if normalize_layers:
        norms = aggregate.norm(dim=-1, keepdim=True).clamp(min=1e-30)  # [layer, 1]
        aggregate = aggregate / norms
        per_example = per_example / norms
    var = per_example.var(0) if per_example.shape[0] > 1 else torch.zeros_like(aggregate)
    lengths = batch.attention_mask.sum(-1).tolist()
    params = {"task": name, "shots": shots, "method": method, "n": len(prompt_list), "seed": seed,
              "normalize_layers": normalize_layers, "metric": metric, "ablation": ablation,
              "token_normalization": token_normalization, "signed": method in SIGNED_METHODS,
              **({"normalization": rule} if metric == "accuracy" else {}),
              "mask": None if mask is None else mask.to_dict(),
              "prompt_ids": [p.id for p in prompt_list], **prompt_options}
    return HeadScores(name=f"importance_{method}", mean=aggregate.double(), var=var.double(),
                      per_seed=per_example.double(), params=params, model=model.info(),
                      tokens=[batch.tokens[i, :n_].cpu() for i, n_ in enumerate(lengths)],
                      extras=extras)


def ffn_importance(
    model: HookedModel, task: Task | str | None = None, *, shots: int = 5,
    metric: Metric = "accuracy", n: int | None = 50, seed: int = 0,
    prompts: Sequence[Prompt] | None = None, ablation: Ablation = "zero",
    means: ActivationMeans | None = None, mask: Mask | None = None,
    normalization: NormalizationChoice = "task", batch_tokens: int = 4096,
    progress: bool = False, **prompt_options: Any,
) -> LayerScores:
    """Importance of each layer's MLP: the accuracy drop (or loss increase) when it is knocked out.

    Bansal et al. rank FFNs by ``baseline accuracy - accuracy with FFN i removed``. All
    ``n_layers`` knocked-out copies are batched through shared forward passes. For
    ``metric="accuracy"`` the choices are ranked by ``normalization``, as
    :func:`~mechicl.analyses.evaluation.evaluate` ranks them (default: the task's own rule).

    Returns:
        :class:`~mechicl.results.LayerScores` named ``ffn_importance``: ``mean`` ``[layer]``,
        ``per_seed`` ``[example, layer]``.
    """
    model = as_hooked_model(model)
    check_choice("metric", metric, ("loss", "accuracy"))
    check_choice("ablation", ablation, ("zero", "mean"))
    rule = resolve_normalization(normalization, task)
    name, prompt_list = resolve_prompts(task, prompts, shots=shots, n=n, seed=seed, prompt_options=prompt_options)
    means = _means_for(model, prompt_list, ablation, means, batch_tokens)
    masks = _ablation_masks(model, mask, ablation, means, "ffn")
    effects = _knockout_effects(model, prompt_list, masks, metric, rule, batch_tokens,
                                progress)  # [example, layer]
    params = {"task": name, "shots": shots, "metric": metric, "n": len(prompt_list), "seed": seed,
              **({"normalization": rule} if metric == "accuracy" else {}),
              "ablation": ablation, "mask": None if mask is None else mask.to_dict(),
              "prompt_ids": [p.id for p in prompt_list], **prompt_options}
    return LayerScores.from_per_seed("ffn_importance", effects, params=params, model=model.info())


# --------------------------------------------------------------------------------------------
# Methods side by side
# --------------------------------------------------------------------------------------------


def resampled_maps(scores: HeadScores, weights: Float[Tensor, "resample example"] | Any
                   ) -> Float[Tensor, "resample layer head"]:
    """An importance map recomputed on resamples of its prompts, with the method's own
    aggregation: ``weights[r, b]`` is how often prompt ``b`` is drawn in resample ``r``
    (:func:`mechicl.stats.bootstrap_weights`; all ones gives ``scores.mean`` back).

    ``bansal`` pools token gradients over prompts (each layer's sum divided by its total number
    of positions, the last layer's by its answer positions with
    ``token_normalization="reference"``), so a prompt counts by its token count, read from
    ``scores.extras``; every other method averages prompts.

    >>> s = HeadScores.from_per_seed("x", torch.tensor([[[1.0]], [[3.0]]]),
    ...                              params={"method": "michel"})
    >>> resampled_maps(s, torch.tensor([[1.0, 1.0], [2.0, 0.0]])).flatten().tolist()
    [2.0, 1.0]
    """
    w = torch.as_tensor(weights, dtype=torch.float64)
    per = scores.per_seed.to(torch.float64)  # [example, layer, head]
    if w.ndim != 2 or w.shape[1] != per.shape[0]:
        raise ValueError(f"weights of shape {tuple(w.shape)} do not match the map's "
                         f"{per.shape[0]} prompts: need [resample, {per.shape[0]}]")
    if scores.params.get("method") != "bansal":
        return torch.einsum("rb,blh->rlh", w, per) / w.sum(1)[:, None, None]
    missing = {"n_real", "n_answer"} - set(scores.extras)
    if missing:
        raise ValueError(f"a bansal map without its token counts ({sorted(missing)} missing "
                         "from extras) cannot be resampled")
    n_layers = per.shape[1]
    denom = (scores.extras["n_real"].to(torch.float64) - 1)[:, None].repeat(1, n_layers)
    if scores.params.get("token_normalization", "reference") == "reference":
        denom[:, -1] = scores.extras["n_answer"].to(torch.float64)
    total = torch.einsum("rb,blh,bl->rlh", w, per, denom)  # summed token gradients
    return total / torch.einsum("rb,bl->rl", w, denom)[:, :, None]


def is_signed(scores: HeadScores) -> bool:
    """Is this importance map signed (values of both signs: ``ablation``, ``attribution``) rather
    than a magnitude (``bansal``, ``michel``)? Signed maps want a diverging colour scale
    centred at zero.

    Reads ``params["signed"]``; maps stored before that entry existed are judged by their
    ``params["method"]``.

    >>> from mechicl.results import HeadScores
    >>> is_signed(HeadScores.from_per_seed("x", torch.zeros(1, 2, 2),
    ...                                    params={"method": "ablation"}))
    True
    """
    if "signed" in scores.params:
        return bool(scores.params["signed"])
    return scores.params.get("method") in SIGNED_METHODS


IMPORTANCE_LABELS: tuple[str, ...] = tuple(
    f"{m}-mean" if mean else m for m in IMPORTANCE_METHODS for mean in (False, True)
    if not mean or m in SIGNED_METHODS)
"""Every map's label (:func:`importance_label`): the methods, and ``ablation-mean`` and
``attribution-mean`` for the two methods that ablate (or estimate an ablation)."""


def parse_importance_label(label: str) -> tuple[str, str]:
    """``(method, ablation)`` of a label of :data:`IMPORTANCE_LABELS` (the inverse of
    :func:`importance_label`).

    >>> parse_importance_label("ablation-mean"), parse_importance_label("bansal")
    (('ablation', 'mean'), ('bansal', 'zero'))
    """
    check_choice("importance label", label, IMPORTANCE_LABELS)
    method, _, ablation = label.partition("-")
    return method, ablation or "zero"


def importance_label(method: str, ablation: str = "zero") -> str:
    """A short name for a map of ``method`` with ``ablation``, as used in output stems:
    the method, with ``-mean`` for mean ablation (``ablation-mean``, ``attribution-mean``).

    >>> importance_label("ablation"), importance_label("attribution", "mean")
    ('ablation', 'attribution-mean')
    """
    return method if ablation == "zero" else f"{method}-{ablation}"


def _head_map(x: HeadScores | Tensor) -> Tensor:
    t = x.mean if isinstance(x, HeadScores) else torch.as_tensor(x)
    t = t.detach().to("cpu", torch.float64)
    if t.ndim != 2:
        raise ValueError(f"expected [layer, head] maps, got shape {tuple(t.shape)}")
    return t


def _within_layer(a: Tensor, b: Tensor) -> float:
    try:
        return within_layer_spearman(a, b)
    except ValueError:  # every layer of a map constant, or one head per layer
        return math.nan


def _median(x: Tensor) -> float:
    """The median (the mean of the middle two for an even count)."""
    return float(torch.quantile(x.double(), 0.5))


def _percentiles(x: Tensor) -> Tensor:
    """Percentile rank of every entry of ``x`` (flattened): 100 = highest, 0 = lowest; ties
    share their average rank."""
    return 100 * (rank(x) - 1) / (x.numel() - 1)


def compare_methods(maps: Mapping[str, HeadScores | Tensor],
                    scans: Mapping[str, HeadScores | Tensor] | None = None, *, k: int,
                    ) -> pd.DataFrame:
    """Agreement between importance maps of different methods, and where each ranks the
    induction heads.

    One row per unordered pair of ``maps`` (``kind="method"``; ``a``, ``b``: their names, in
    the order given) and, with ``scans``, one row per map and induction score
    (``kind="induction score"``; ``a``: the map, ``b``: the score's name). Columns:

    * ``spearman``: Spearman's rho of the raw maps (:func:`~mechicl.analyses.overlap.spearman`);
      for a signed map "raw" ranks the heads from "removing it hurts most" to "removing it
      helps most", for a magnitude map (bansal, michel) by magnitude.
    * ``spearman |.|``: the same on absolute values, ``|a|`` vs ``|b|`` (an induction score is
      compared as is with ``|a|``): whether the methods agree on which heads matter *at all*,
      whichever the direction; equal to ``spearman`` between two magnitude maps. This is the
      like-for-like comparison of a gradient magnitude with a signed map.
    * ``within-layer spearman``: rho with the layer means removed
      (:func:`~mechicl.analyses.overlap.within_layer_spearman`; NaN where undefined): agreement
      beyond "the same layers matter".
    * ``top-k overlap``: share of ``b``'s top ``k`` heads (highest raw scores: the ``k`` most
      important heads by ``b``, or the ``k`` strongest induction heads) that are among ``a``'s
      top ``k`` (:func:`~mechicl.analyses.overlap.top_k_overlap`; symmetric for two maps);
      ``top-k overlap |.|``: the same with ``a`` (and, for two maps, ``b``) by ``|score|``.
    * induction rows only (NaN for method pairs): ``median percentile``: the median over the
      ``k`` strongest induction heads of their percentile rank in ``a`` (100 = ``a``'s most
      important head, 0 = its least; ties share their average rank; about 50 by chance),
      ``median percentile |.|`` the same in ``|a|``, ``median rank``: the median of their
      ranks in ``a`` (1 = most important).
    * ``signed a``, ``signed b``: whether each map is signed (:func:`is_signed`; for a plain
      tensor: whether it has negative entries), and ``k``.

    Args:
        maps: method name -> ``[layer, head]`` importance map (``HeadScores`` or a tensor), all
            of one model, task and shot count.
        scans: induction score name -> ``[layer, head]`` score map (e.g.
            ``{"prefix_matching": scan.scores["prefix_matching"]}``).
        k: the number of "top heads".

    >>> a = torch.tensor([[4.0, 3.0], [2.0, 1.0]])
    >>> df = compare_methods({"x": a, "y": -a}, {"score": a}, k=1)
    >>> df[["a", "b", "kind", "spearman", "spearman |.|", "median percentile"]]
       a      b             kind  spearman  spearman |.|  median percentile
    0  x      y           method      -1.0           1.0                NaN
    1  x  score  induction score       1.0           1.0              100.0
    2  y  score  induction score      -1.0           1.0                0.0
    """
    heads = {name: _head_map(m) for name, m in maps.items()}
    induction = {name: _head_map(m) for name, m in (scans or {}).items()}
    shapes = {tuple(t.shape) for t in (*heads.values(), *induction.values())}
    if len(shapes) > 1:
        raise ValueError(f"maps differ in shape: {sorted(shapes)}")

    def signed(x: HeadScores | Tensor) -> bool:
        return is_signed(x) if isinstance(x, HeadScores) else bool((_head_map(x) < 0).any())

    rows: list[dict[str, Any]] = []
    names = list(heads)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            x, y = heads[a], heads[b]
            kk = top_k(x.numel(), k=k)
            rows.append({"a": a, "b": b, "kind": "method", "k": kk,
                         "signed a": signed(maps[a]), "signed b": signed(maps[b]),
                         "spearman": spearman(x, y), "spearman |.|": spearman(x.abs(), y.abs()),
                         "within-layer spearman": _within_layer(x, y),
                         "top-k overlap": top_k_overlap(y, x, kk),
                         "top-k overlap |.|": top_k_overlap(y.abs(), x.abs(), kk),
                         "median percentile": math.nan, "median percentile |.|": math.nan,
                         "median rank": math.nan})
    for a in names:
        x = heads[a]
        for score, s in induction.items():
            kk = top_k(x.numel(), k=k)
            top = torch.argsort(s.flatten(), descending=True, stable=True)[:kk]
            ranks_from_top = x.numel() + 1 - rank(x)
            rows.append({"a": a, "b": score, "kind": "induction score", "k": kk,
                         "signed a": signed(maps[a]), "signed b": signed(scans[score]),
                         "spearman": spearman(x, s), "spearman |.|": spearman(x.abs(), s),
                         "within-layer spearman": _within_layer(x, s),
                         "top-k overlap": top_k_overlap(s, x, kk),
                         "top-k overlap |.|": top_k_overlap(s, x.abs(), kk),
                         "median percentile": _median(_percentiles(x)[top]),
                         "median percentile |.|": _median(_percentiles(x.abs())[top]),
                         "median rank": _median(ranks_from_top[top])})
    return pd.DataFrame(rows, columns=[
        "a", "b", "kind", "k", "signed a", "signed b", "spearman", "spearman |.|",
        "within-layer spearman", "top-k overlap", "top-k overlap |.|", "median percentile",
        "median percentile |.|", "median rank"])


# --------------------------------------------------------------------------------------------
# The registered analyses
# --------------------------------------------------------------------------------------------


def _run_heads(call: Call) -> HeadScores:
    o = call.options
    return head_importance(
        call.model, call.task, shots=call.shots, method=o["method"], seed=call.seed,
        prompts=task_prompts(call.task, call.job), normalize_layers=o["normalize_layers"],
        ablation=o["ablation"], metric=o["metric"], token_normalization=o["token_normalization"],
        progress=call.progress, **call.batch())


def _check_heads(options: dict[str, Any], tasks: Sequence[str], shots: Sequence[int]) -> None:
    _check_method_options(options["method"], options["metric"], options["ablation"])


def _job_label(job: Job) -> str:
    return importance_label(job.options["method"], job.options["ablation"])


def _heads_outputs(pairs: Sequence[tuple[Job, HeadScores]], options: Mapping[str, Any]) -> Outputs:
    """One map per task, shot count and method; heatmaps (one colour scale per map, or per task
    and method with ``shared_scale``; signed maps on a diverging scale centred at zero); with
    several methods, their rank agreement with the first."""
    results, figures, rows = {}, {}, []
    by_key = {(job.task, job.shots, _job_label(job)): scores for job, scores in pairs}
    first_method = _job_label(pairs[0][0]) if pairs else None
    for job, scores in pairs:
        method = _job_label(job)
        stem = job_stem(job, method)
        results[stem] = scores
        group = [s for j, s in pairs if j.task == job.task and _job_label(j) == method]
        if not options.get("shared_scale"):  # token-normalised maps shrink with prompt length:
            group = [scores]                 # one scale each by default
        colorscale = "Viridis"
        if is_signed(scores):  # symmetric about 0: blue = removing the head helps, red = hurts
            zmax = max(float(s.mean.abs().max()) for s in group)
            zmin, colorscale = -zmax, "RdBu_r"
        else:
            zmin = min(0.0, min(float(s.mean.min()) for s in group))
            zmax = max(float(s.mean.max()) for s in group)
        figures[stem] = head_heatmap(scores, title=f"{task_slug(job.task)} {job.shots}-shot: "
                                     f"{method} importance", zmin=zmin, zmax=zmax,
                                     colorscale=colorscale,
                                     kv_group_size=kv_group_size(scores.model),
                                     colorbar_title="importance")
        row = {"task": job.task, "shots": job.shots, "method": method, "n": scores.params["n"],
               "top_heads": " ".join(f"{a}.{b}" for a, b in scores.top_heads(5))}
        first = by_key.get((job.task, job.shots, first_method))
        if method != first_method and first is not None:
            row |= {"vs": first_method, "spearman": spearman(scores, first),
                    "kendall": kendall(scores, first),
                    "top10_overlap": top_k_overlap(scores, first, min(10, scores.mean.numel()))}
        rows.append(row)
    return Outputs(results=results, figures=figures, rows=rows)


def default_batch_tokens(method: str) -> int:
    """``batch_tokens`` of :func:`head_importance` when none is given: 2048 for the gradient
    methods (their passes keep activations for the backward), 4096 for ablation.

    >>> default_batch_tokens("bansal"), default_batch_tokens("ablation")
    (2048, 4096)
    """
    return 4096 if method == "ablation" else 2048


def _importance_memory(job: Job) -> str:
    return "choices" if job.options["method"] == "ablation" else "importance"


def _prompt_length(model: Any, job: Job, task: Any) -> int:
    # the gradient methods run answer rows, ablation and FFN knock-out choice scoring
    longest = longest_choice_row if job.record().memory_model(job) == "choices" else longest_prompt
    return longest(model, task_prompts(task, job))


N_PROMPTS = Option(name="n", type=int, default=50, nullable=True, minimum=1,
                   help="prompts per task and shot count (none: the whole pool)")
ABLATION = Option(name="ablation", type=str, default="zero", choices=("zero", "mean"),
                  help="how a head / FFN is removed: zero or mean ablation")

HEAD_IMPORTANCE = register_analysis(Analysis(
    name="importance", help="head importance on ICL tasks (gradient or ablation)",
    run=_run_heads, result_type=HeadScores, per_task=True, memory=_importance_memory,
    sequence_length=_prompt_length, check=_check_heads, outputs=_heads_outputs,
    options=(
        Option(name="method", type=str, default="bansal", choices=IMPORTANCE_METHODS,
               sweep=True, help="bansal or michel (gradient magnitudes), ablation (exact, "
                                "signed) or attribution (its first-order estimate, signed); "
                                "the CLI takes several and compares them"),
        N_PROMPTS,
        dataclasses.replace(ABLATION, help="how a head / FFN is removed: zero or mean "
                                           "ablation (head importance: for methods ablation "
                                           "and attribution)"),
        Option(name="metric", type=str, default="loss", choices=("loss", "accuracy"),
               help="for method ablation: answer-loss increase or accuracy drop"),
        Option(name="normalize_layers", type=bool, default=False,
               help="divide each layer's scores by their L2 norm (Michel et al.)"),
        Option(name="token_normalization", type=str, default="reference",
               choices=("reference", "uniform"),
               help="bansal: last layer by answer tokens as llm-interpret (reference), or "
                    "every layer by N - 1 tokens (uniform)"),
        batch_tokens_option(None, "rows x longest row per pass (default 2048 for gradients and "
                                  "attribution, 4096 for ablation)"),
        Option(name="shared_scale", type=bool, default=False, role="output",
               help="one colour scale for all shot counts of a task and method"),
    ),
))


def _run_ffn(call: Call) -> LayerScores:
    o = call.options
    return ffn_importance(call.model, call.task, shots=call.shots, seed=call.seed,
                          prompts=task_prompts(call.task, call.job), metric=o["metric"],
                          ablation=o["ablation"], progress=call.progress, **call.batch())


def _ffn_outputs(pairs: Sequence[tuple[Job, LayerScores]], options: Mapping[str, Any]) -> Outputs:
    results, figures, rows = {}, {}, []
    for job, scores in pairs:
        stem = job_stem(job, "ffn")
        results[stem] = scores
        figures[stem] = layer_bars(scores, title=f"{task_slug(job.task)} {job.shots}-shot: FFN "
                                   "knock-out", yaxis_title=f"{job.options['metric']} change")
        order = torch.argsort(scores.mean, stable=True).tolist()  # least important first
        rows.append({"task": job.task, "shots": job.shots, "metric": job.options["metric"],
                     "n": scores.params["n"],
                     "top layers": " ".join(map(str, order[::-1][:5]))})
    return Outputs(results=results, figures=figures, rows=rows)


FFN_IMPORTANCE = register_analysis(Analysis(
    name="ffn_importance", command="ffn-importance",
    help="FFN importance: each layer's MLP knocked out (Bansal et al.)",
    run=_run_ffn, result_type=LayerScores, per_task=True, memory="choices",
    sequence_length=_prompt_length, outputs=_ffn_outputs,
    options=(
        N_PROMPTS,
        Option(name="metric", type=str, default="accuracy", choices=("loss", "accuracy"),
               help="accuracy drop (Bansal et al.'s ranking) or answer-loss increase"),
        ABLATION,
        batch_tokens_option(
            help="rows x longest row per forward pass, counting every knocked-out copy"),
    ),
))
