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
* ``method="ablation"``: the exact counterpart: the change of the answer loss (or the drop of
  accuracy) when each head is removed (zero or mean ablation); the masked copies for many
  heads share a forward pass.

``normalize_layers=True`` divides every layer's scores by their L2 norm over heads, as Michel
et al. do. :func:`ffn_importance` knocks out each layer's MLP and reports the accuracy drop
(Bansal et al.'s FFN ranking) or the loss increase.

Axis names: ``example layer head batch pos``.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mechicl._batching import length_batches
from mechicl._checks import check_choice
from mechicl._forward import frozen_parameters
from mechicl.evaluation import (
    AnswerBatch,
    answer_batch,
    answer_losses,
    masked_choice_logprobs,
)
from mechicl.masks import Ablation, ActivationMeans, Mask, mean_activations
from mechicl.models import HookedModel, as_hooked_model
from mechicl.results import HeadScores, LayerScores
from mechicl.tasks import Prompt, Task, build_prompts, load_task

__all__ = ["IMPORTANCE_METHODS", "ffn_importance", "head_importance", "importance_prompts",
           "token_gate_grads"]

log = logging.getLogger(__name__)

Method = Literal["bansal", "michel", "ablation"]
IMPORTANCE_METHODS: tuple[str, ...] = ("bansal", "michel", "ablation")
Metric = Literal["loss", "accuracy"]


def importance_prompts(task: Task | str, *, shots: int, n: int | None = None, seed: int = 0,
                       **prompt_options: Any) -> list[Prompt]:
    """The k-shot prompts an importance run uses (:func:`mechicl.tasks.build_prompts`)."""
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
    mask: Mask | None = None,
) -> GateGrads:
    """One forward + backward: ``dL_b/dg[b, t, l, h]`` for a gate on every head at every token.

    ``L_b`` is the mean cross-entropy over example ``b``'s answer tokens (``answer_mask``); the
    batch loss is the sum of the examples' losses, so each row's gradient is its own.
    """
    model = as_hooked_model(model)
    n_batch, n_pos = tokens.shape
    target = answer_mask.clone().bool()
    target[:, 0] = False
    b_idx, pos = torch.nonzero(target, as_tuple=True)
    counts = target.sum(-1)
    if bool((counts == 0).any()):
        raise ValueError("every example needs at least one answer token after position 0")
    gate = torch.ones(model.n_layers, n_batch, n_pos, model.n_heads, device=model.device,
                      dtype=model.dtype, requires_grad=True)

    def gate_hook(z: Tensor, hook: Any, layer: int) -> Tensor:  # z: [batch, pos, head, d_head]
        return z * gate[layer][..., None]

    hooks = mask.hooks(model) if mask is not None else []
    hooks += [(name, (lambda layer: lambda z, hook: gate_hook(z, hook, layer))(i))
              for i, name in enumerate(model.hook_names("z"))]
    with frozen_parameters(model), torch.enable_grad():
        logits = model.run_with_hooks(tokens, attention_mask=attention_mask, fwd_hooks=hooks,
                                      return_type="logits")
        picked = logits[b_idx, pos - 1]  # [target, d_vocab]
        nll = torch.logsumexp(picked, -1) - picked.gather(-1, tokens[b_idx, pos][:, None])[:, 0]
        per_example = torch.zeros(n_batch, dtype=nll.dtype, device=nll.device)
        per_example = per_example.index_add(0, b_idx, nll / counts[b_idx].to(nll.dtype))
        (grad,) = torch.autograd.grad(per_example.sum(), gate)
    grads = grad.detach().permute(1, 2, 0, 3)  # [batch, pos, layer, head]
    return GateGrads(grads=grads, n_real=attention_mask.sum(-1), n_answer=counts,
                     loss=per_example.detach())


def _gradient_importance(model: HookedModel, batch: AnswerBatch, method: str, mask: Mask | None,
                         batch_tokens: int, progress: bool, token_normalization: str = "reference",
                         ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(aggregate [layer, head], per-example [example, layer, head], extras)."""
    n_ex = batch.tokens.shape[0]
    per_token_sum = torch.zeros(n_ex, model.n_layers, model.n_heads, dtype=torch.float64)
    signed_sum = torch.zeros_like(per_token_sum)
    n_real = torch.zeros(n_ex, dtype=torch.long)
    n_answer = torch.zeros(n_ex, dtype=torch.long)
    loss = torch.zeros(n_ex, dtype=torch.float64)
    lengths = batch.attention_mask.sum(-1).tolist()
    for rows in tqdm(length_batches(lengths, batch_tokens), desc=f"importance ({method})",
                     disable=not progress, unit="batch"):
        width = max(lengths[i] for i in rows)
        g = token_gate_grads(model, batch.tokens[rows, :width], batch.attention_mask[rows, :width],
                             batch.answer_mask[rows, :width], mask=mask)
        grads = g.grads.double().cpu()
        per_token_sum[rows] = grads.abs().sum(1)
        signed_sum[rows] = grads.sum(1)
        n_real[rows] = g.n_real.cpu()
        n_answer[rows] = g.n_answer.cpu()
        loss[rows] = g.loss.double().cpu()
    extras = {"n_real": n_real, "n_answer": n_answer, "loss": loss}
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
                      metric: str, length_normalize: bool, batch_tokens: int, progress: bool,
                      ) -> Tensor:
    """``[example, mask-1]``: effect of each knockout mask (masks[1:]) vs masks[0], per
    example: loss increase, or correct(base) - correct(knocked out)."""
    if metric == "loss":
        batch = answer_batch(model, prompts)
        losses = answer_losses(model, batch, masks, batch_tokens=batch_tokens, progress=progress)
        return (losses[1:] - losses[0]).T
    loglik, n_tok = masked_choice_logprobs(model, prompts, masks, batch_tokens=batch_tokens,
                                           progress=progress)
    score = loglik / n_tok.clamp(min=1) if length_normalize else loglik
    gold = torch.tensor([p.gold for p in prompts])
    correct = (score.argmax(-1) == gold).double()  # [mask, example]
    return (correct[0] - correct[1:]).T


def _means_for(model: HookedModel, prompts: Sequence[Prompt], ablation: str,
               means: ActivationMeans | None, batch_tokens: int) -> ActivationMeans | None:
    if ablation != "mean" or means is not None:
        return means
    batch = answer_batch(model, prompts)
    return mean_activations(model, batch.tokens, attention_mask=batch.attention_mask,
                            batch_tokens=batch_tokens)


def _prompts(task: Task | str | None, prompts: Sequence[Prompt] | None, shots: int, n: int | None,
             seed: int, prompt_options: dict[str, Any]) -> tuple[str, list[Prompt]]:
    if prompts is not None:
        if task is not None and not isinstance(task, (str, Task)):
            raise TypeError(f"task must be a Task, a task name or None, got {type(task).__name__}")
        name = task if isinstance(task, str) else (task.name if task is not None else "custom")
        if prompt_options:
            raise ValueError(f"prompt options {sorted(prompt_options)} need task=, not prompts=")
        return name, list(prompts)
    if task is None:
        raise ValueError("give a task (or explicit prompts=)")
    task_obj = load_task(task) if isinstance(task, str) else task
    return task_obj.name, build_prompts(task_obj, shots=shots, n=n, seed=seed, **prompt_options)


def head_importance(
    model: HookedModel, task: Task | str | None = None, *, shots: int = 5,
    method: Method = "bansal", n: int | None = None, seed: int = 0,
    prompts: Sequence[Prompt] | None = None, normalize_layers: bool = False,
    ablation: Ablation = "zero", metric: Metric = "loss", means: ActivationMeans | None = None,
    mask: Mask | None = None, length_normalize: bool = False,
    token_normalization: Literal["reference", "uniform"] = "reference",
    batch_tokens: int | None = None, progress: bool = False, **prompt_options: Any,
) -> HeadScores:
    """Importance of every attention head for a task at ``shots`` demonstrations.

    Args:
        model: the model.
        task: a :class:`~mechicl.tasks.Task` or registered task name.
        shots: demonstrations per prompt.
        method: ``"bansal"`` or ``"michel"`` (gradient; one forward + backward per batch) or
            ``"ablation"`` (remove each head; one masked copy of the data per head).
        n: evaluation examples (default all); ``seed`` seeds their choice and demonstrations.
        prompts: explicit prompts instead of building them from ``task``.
        normalize_layers: divide each layer's scores by their L2 norm over heads (Michel et al.).
        ablation: ``"zero"`` or ``"mean"`` (only for ``method="ablation"``).
        metric: ``"loss"`` (answer loss increase) or ``"accuracy"`` (accuracy drop); gradient
            methods use the loss.
        means: mean activations for mean ablation (default: computed on the same prompts).
        mask: compute importance with this mask applied (e.g. after pruning).
        length_normalize: accuracy by mean log-probability per token (``metric="accuracy"``).
        token_normalization: ``"bansal"`` only: ``"reference"`` divides the last layer by the
            answer-token count and the others by ``N - 1`` (as llm-interpret); ``"uniform"``
            divides every layer by ``N - 1``, so that layers are comparable (the reference's
            last layer is inflated by ``(N - 1) / answer tokens``).
        batch_tokens: rows x longest row per pass (default 2048 for gradients, 4096 otherwise).
        progress: show a progress bar.
        **prompt_options: passed to :func:`~mechicl.tasks.build_prompts`.

    Returns:
        :class:`~mechicl.HeadScores` named ``importance_<method>``: ``mean`` is the importance
        (higher = more important), ``per_seed`` holds one row per example (the per-example
        score; ``mean`` is their average, token-weighted for ``"bansal"``), ``extras`` the
        per-example token counts and answer losses.
    """
    model = as_hooked_model(model)
    check_choice("method", method, IMPORTANCE_METHODS)
    check_choice("ablation", ablation, ("zero", "mean"))
    check_choice("metric", metric, ("loss", "accuracy"))
    check_choice("token_normalization", token_normalization, ("reference", "uniform"))
    if method != "ablation" and (metric != "loss" or ablation != "zero"):
        raise ValueError(f"method={method!r} is a gradient of the answer loss: metric={metric!r} "
                         f"and ablation={ablation!r} only apply to method='ablation'")
    name, prompt_list = _prompts(task, prompts, shots, n, seed, prompt_options)
    if not prompt_list:
        raise ValueError("no prompts")
    budget = batch_tokens or (2048 if method != "ablation" else 4096)
    batch = answer_batch(model, prompt_list)
    extras: dict[str, Tensor] = {}
    if method == "ablation":
        means = _means_for(model, prompt_list, ablation, means, budget)
        masks = _ablation_masks(model, mask, ablation, means, "heads")
        effects = _knockout_effects(model, prompt_list, masks, metric, length_normalize, budget,
                                    progress)
        per_example = effects.reshape(len(prompt_list), model.n_layers, model.n_heads)
        aggregate = per_example.mean(0)
    else:
        aggregate, per_example, extras = _gradient_importance(model, batch, method, mask, budget,
                                                              progress, token_normalization)
    if normalize_layers:
        norms = aggregate.norm(dim=-1, keepdim=True).clamp(min=1e-30)  # [layer, 1]
        aggregate = aggregate / norms
        per_example = per_example / norms
    var = per_example.var(0) if per_example.shape[0] > 1 else torch.zeros_like(aggregate)
    lengths = batch.attention_mask.sum(-1).tolist()
    params = {"task": name, "shots": shots, "method": method, "n": len(prompt_list), "seed": seed,
              "normalize_layers": normalize_layers, "metric": metric, "ablation": ablation,
              "token_normalization": token_normalization,
              "mask": None if mask is None else mask.to_dict(),
              "prompt_ids": [p.id for p in prompt_list], **prompt_options}
    return HeadScores(name=f"importance_{method}", mean=aggregate.double(), var=var.double(),
                      per_seed=per_example.double(), params=params, model=model.info(),
                      tokens=[batch.tokens[i, :n_].cpu() for i, n_ in enumerate(lengths)],
                      extras=extras)


def ffn_importance(
    model: HookedModel, task: Task | str | None = None, *, shots: int = 5,
    metric: Metric = "accuracy", n: int | None = None, seed: int = 0,
    prompts: Sequence[Prompt] | None = None, ablation: Ablation = "zero",
    means: ActivationMeans | None = None, mask: Mask | None = None,
    length_normalize: bool = False, batch_tokens: int = 4096, progress: bool = False,
    **prompt_options: Any,
) -> LayerScores:
    """Importance of each layer's MLP: the accuracy drop (or loss increase) when it is knocked out.

    Bansal et al. rank FFNs by ``baseline accuracy - accuracy with FFN i removed``. All
    ``n_layers`` knocked-out copies are batched through shared forward passes.

    Returns:
        :class:`~mechicl.results.LayerScores` named ``ffn_importance``: ``mean`` ``[layer]``,
        ``per_seed`` ``[example, layer]``.
    """
    model = as_hooked_model(model)
    check_choice("metric", metric, ("loss", "accuracy"))
    check_choice("ablation", ablation, ("zero", "mean"))
    name, prompt_list = _prompts(task, prompts, shots, n, seed, prompt_options)
    means = _means_for(model, prompt_list, ablation, means, batch_tokens)
    masks = _ablation_masks(model, mask, ablation, means, "ffn")
    effects = _knockout_effects(model, prompt_list, masks, metric, length_normalize, batch_tokens,
                                progress)  # [example, layer]
    params = {"task": name, "shots": shots, "metric": metric, "n": len(prompt_list), "seed": seed,
              "ablation": ablation, "mask": None if mask is None else mask.to_dict(),
              "prompt_ids": [p.id for p in prompt_list], **prompt_options}
    return LayerScores.from_per_seed("ffn_importance", effects, params=params, model=model.info())
