"""Generation-free evaluation of in-context learning: choice log-likelihoods, accuracy, answer masks.

Each choice is scored by the log-likelihood of its continuation given the prompt, summed over
its tokens (optionally divided by the number of tokens); the prediction is the argmax, as in
lm-evaluation-harness's multiple-choice scoring. Prompts are batched with right padding and an
attention mask, which under causal attention leaves every real position's logits unchanged.
When every choice of a prompt is a single token, one forward pass of the prompt scores all of
them (the next-token distribution at the prompt's last position); otherwise each choice gets
its own row.

:func:`answer_batch` gives tokens plus the mask of the answer (continuation) tokens, for
analyses that need the loss on exactly those tokens (head importance).

Axis names: ``example choice batch pos``.
"""

import functools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from einops import repeat
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechicl._batching import length_batches, pad_right
from mechicl.analyses._registry import (
    Analysis,
    Call,
    Job,
    Option,
    Outputs,
    job_stem,
    register_analysis,
)
from mechicl.inputs.tasks import Prompt, Task, build_prompts, load_task
from mechicl.model.hooked import HookedModel, as_hooked_model
from mechicl.model.masks import Mask, masked_logits
from mechicl.results import read_result, result_type, write_result

__all__ = ["AnswerBatch", "EvalResult", "answer_batch", "answer_losses", "choice_logprobs",
           "encode_prompt", "evaluate", "longest_prompt", "masked_choice_logprobs",
           "wilson_interval"]


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default).

    >>> [round(x, 3) for x in wilson_interval(8, 10)]
    [0.49, 0.943]
    """
    if n <= 0:
        return (float("nan"), float("nan"))
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


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


@dataclass(frozen=True)
class _Row:
    tokens: list[int]
    targets: list[tuple[int, int, int, int]]  # (prompt index, choice, position, token id)


def _rows(model: HookedModel, prompts: Sequence[Prompt]) -> list[_Row]:
    rows = []
    for p_idx, prompt in enumerate(prompts):
        context, conts = encode_prompt(model, prompt)
        last = len(context) - 1
        if all(len(ids) == 1 for ids in conts):
            # One pass scores every single-token choice: the next-token distribution at `last`.
            rows.append(_Row(context, [(p_idx, c, last, ids[0]) for c, ids in enumerate(conts)]))
            continue
        for c, ids in enumerate(conts):
            # position last + t predicts continuation token t
            rows.append(_Row(context + ids, [(p_idx, c, last + t, tok)
                                             for t, tok in enumerate(ids)]))
    return rows


def choice_logprobs(
    model: HookedModel, prompts: Sequence[Prompt], *, mask: Mask | None = None,
    batch_tokens: int = 4096, progress: bool = False,
) -> tuple[Float[Tensor, "example choice"], Int[Tensor, "example choice"]]:
    """Summed log-probability of each prompt's continuations, and their token counts.

    Args:
        model: the model.
        prompts: the prompts.
        mask: run under this head / FFN mask.
        batch_tokens: rows x longest row per forward pass.
        progress: show a progress bar.

    Returns:
        ``(loglik, n_tokens)``, both ``[example, max_choices]``; missing choices (prompts with
        fewer choices) hold ``-inf`` and 0.
    """
    loglik, n_tokens = masked_choice_logprobs(model, prompts, [mask] if mask is not None else None,
                                              batch_tokens=batch_tokens, progress=progress)
    return loglik[0], n_tokens


def masked_choice_logprobs(
    model: HookedModel, prompts: Sequence[Prompt], masks: Sequence[Mask | None] | None, *,
    batch_tokens: int = 4096, progress: bool = False,
) -> tuple[Float[Tensor, "mask example choice"], Int[Tensor, "example choice"]]:
    """:func:`choice_logprobs` under each of several masks, many masked copies per forward pass.

    Args:
        masks: the masks (``None``: the unmasked model only, as one mask).
        batch_tokens: rows x longest row per forward pass, counting every masked copy.

    Returns:
        ``(loglik [mask, example, choice], n_tokens [example, choice])``.
    """
    model = as_hooked_model(model)
    if not prompts:
        raise ValueError("no prompts to score")
    mask_list = _mask_list(model, masks)
    if not mask_list:
        raise ValueError("no masks to score under")
    n_masks = len(mask_list)
    n_choices = max(len(p.continuations) for p in prompts)
    loglik = torch.full((n_masks, len(prompts), n_choices), float("-inf"), dtype=torch.float64)
    n_tokens = torch.zeros((len(prompts), n_choices), dtype=torch.long)
    for p_idx, p in enumerate(prompts):
        loglik[:, p_idx, : len(p.continuations)] = 0.0
    rows = _rows(model, prompts)
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
        n_tokens.index_put_((idx[:, 3], idx[:, 4]), torch.ones(len(idx), dtype=torch.long),
                            accumulate=True)
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
            ``predicted_answer``, ``gold_answer``, ``loglik`` (per choice), ``n_tokens``,
            ``demo_ids``, and the examples' metadata columns.
        params: the evaluation settings (shots, n, seed, prompt ids, mask, template, ...).
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

    def summary(self) -> dict[str, Any]:
        return {"task": self.task, "shots": self.shots, "accuracy": self.accuracy,
                "ci_low": self.ci_low, "ci_high": self.ci_high, "n": self.n,
                "chance": self.chance}

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
    length_normalize: bool = False, mask: Mask | None = None, batch_tokens: int = 4096,
    progress: bool = False, prompts: Sequence[Prompt] | None = None, **prompt_options: Any,
) -> EvalResult:
    """Evaluate ``model`` on ``task`` with ``shots`` demonstrations per prompt.

    Args:
        model: a :class:`~mechicl.HookedModel` or bridge.
        task: a :class:`~mechicl.inputs.tasks.Task` or a registered task name.
        shots: demonstrations per prompt.
        n: number of evaluation examples (default: the whole evaluation pool).
        seed: seeds example selection and demonstrations.
        length_normalize: rank choices by mean log-probability per token instead of the sum.
        mask: evaluate with these heads / FFNs masked (:class:`~mechicl.model.masks.Mask`).
        batch_tokens: rows x longest row per forward pass.
        progress: show a progress bar.
        prompts: evaluate these prompts of ``task`` (e.g. a slice of
            :func:`~mechicl.inputs.tasks.build_prompts`) instead of building them; ``n``, ``seed`` and
            prompt options then do not apply.
        **prompt_options: passed to :func:`~mechicl.inputs.tasks.build_prompts` (``balanced``,
            ``order``, ``corruption``, ``corruption_rate``, ``unrelated_labels``).
    """
    model = as_hooked_model(model)
    task_obj = load_task(task) if isinstance(task, str) else task
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
    loglik, n_tok = choice_logprobs(model, prompts, mask=mask, batch_tokens=batch_tokens,
                                    progress=progress)
    score = loglik / n_tok.clamp(min=1) if length_normalize else loglik
    pred = score.argmax(-1)
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
            "demo_ids": list(p.demo_ids),
            **{f"meta.{k}": v for k, v in ex.meta.items()},
        })
    config = {"shots": shots, "n": len(prompts), "seed": seed, "length_normalize": length_normalize,
              "prompt_ids": [p.id for p in prompts],
              "mask": None if mask is None else mask.to_dict(),
              **prompt_options, "template": task_obj.template, "separator": task_obj.separator,
              "source": task_obj.source, "licence": task_obj.licence}
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
                    length_normalize=call.options["length_normalize"], progress=call.progress,
                    **call.batch())


def _outputs(pairs: Sequence[tuple[Job, EvalResult]], options: Mapping[str, Any]) -> Outputs:
    return Outputs(results={job_stem(job): result for job, result in pairs},
                   rows=[result.summary() for _, result in pairs])


ACCURACY = register_analysis(Analysis(
    name="accuracy", command="eval", help="k-shot accuracy of a model on ICL tasks",
    run=_run, result_type=EvalResult, per_task=True, memory="choices",
    sequence_length=lambda model, job, task: longest_prompt(model, task_prompts(task, job)),
    outputs=_outputs,
    options=(
        Option(name="n", type=int, default=None, nullable=True, minimum=1,
               help="evaluated prompts per task and shot count (default: the whole pool)"),
        Option(name="skip", type=int, default=0, minimum=0,
               help="leave out the first prompts of the seeded list (e.g. those an importance "
                    "map was computed on)"),
        Option(name="length_normalize", type=bool, default=False,
               help="rank choices by mean log-probability per token"),
        Option(name="batch_tokens", type=int, default=4096, minimum=1, role="execution",
               help="rows x longest row per forward pass"),
    ),
))
