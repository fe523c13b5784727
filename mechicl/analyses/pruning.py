"""Pruning curves: accuracy as the least important heads and FFNs are removed.

As in Bansal et al. 2023 (llm-interpret ``lm_eval/models/opt.py``): heads are sorted by an
importance score, ascending, and the first ``floor(p * n_heads_total / 100)`` are masked, for
``p = 0, 10, ..., 90``; FFNs likewise (``floor(p * n_layers / 100)`` layers). The scores are not
recomputed after each step (the paper's "iterative" pruning is a sweep over percentages of one
ranking). The ranking can come from the same task, from another task (cross-task transfer), from
induction scores (prefix matching or copying: pruning by induction score), or be random (several
seeded draws as a baseline). Heads and FFNs can be pruned together on a grid of percentages.

Every distinct mask of the sweep is evaluated once; many masked copies share forward passes.

Axis names: ``mask example choice layer head``.
"""

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

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
from mechicl.analyses.evaluation import (
    NormalizationChoice,
    choice_chars,
    choice_scores,
    longest_choice_row,
    masked_choice_logprobs,
    prompt_means,
    resolve_normalization,
)
from mechicl.analyses.importance import FFN_IMPORTANCE, HEAD_IMPORTANCE, IMPORTANCE_METHODS
from mechicl.analyses.induction import SCAN, SCORE_ALIASES, SCORES
from mechicl.inputs.tasks import TASKS, Prompt, Task, build_prompts, load_task, resolve_prompts
from mechicl.model.hooked import HookedModel, as_hooked_model
from mechicl.model.masks import Ablation, ActivationMeans, Mask
from mechicl.plotting import prune_curve_figure
from mechicl.results import (
    HeadScores,
    LayerScores,
    ResultError,
    read_result,
    result_type,
    write_result,
)
from mechicl.stats import paired_bootstrap, removable_fraction, wilson_interval

__all__ = ["DEFAULT_PERCENTS", "PruneCurve", "curve_summaries", "parse_ranking", "prune_curve",
           "prune_order", "pruning_mask", "ranking_inputs", "split_prompts"]

DEFAULT_PERCENTS: tuple[int, ...] = tuple(range(0, 100, 10))
RANDOM = "random"

Ranking = HeadScores | LayerScores | Tensor


def prune_order(scores: Float[Tensor, "layer head"] | Float[Tensor, " layer"]) -> Int[Tensor, " n"]:
    """Flat indices from least to most important (stable: ties keep index order).

    >>> prune_order(torch.tensor([[0.5, 0.1], [0.9, 0.2]])).tolist()
    [1, 3, 0, 2]
    """
    flat = torch.as_tensor(scores).flatten()
    if not torch.isfinite(flat).all():
        raise ValueError("importance scores contain NaN or inf; cannot rank them")
    return torch.argsort(flat, stable=True)


def _n_removed(percent: int | float, total: int) -> int:
    if not 0 <= percent <= 100:
        raise ValueError(f"percent={percent} must be in [0, 100]")
    return int(percent * total // 100)


def split_prompts(task: Task | str, *, shots: int, n_rank: int, n_eval: int | None = None,
                  seed: int = 0) -> tuple[list[Prompt], list[Prompt]]:
    """One seeded list of k-shot prompts, split into ranking prompts (the first ``n_rank``) and
    evaluation prompts (the next ``n_eval``, default all the rest), so that a ranking is never
    evaluated on the prompts it was computed from."""
    task_obj = load_task(task) if isinstance(task, str) else task
    prompts = build_prompts(task_obj, shots=shots, seed=seed)
    if len(prompts) < n_rank + 1:
        raise ValueError(f"task {task_obj.name!r} has {len(prompts)} evaluation examples; "
                         f"n_rank={n_rank} ranking prompts leaves none for evaluation")
    end = None if n_eval is None else n_rank + n_eval
    return prompts[:n_rank], prompts[n_rank:end]


def pruning_mask(
    model: HookedModel | tuple[int, int], *, head_order: Tensor | None = None,
    head_percent: int | float = 0, ffn_order: Tensor | None = None, ffn_percent: int | float = 0,
    ablation: Ablation = "zero", means: ActivationMeans | None = None,
) -> Mask:
    """The mask removing the first ``head_percent`` % of ``head_order`` (flat ``layer * n_heads +
    head`` indices, least important first) and the first ``ffn_percent`` % of ``ffn_order``."""
    keep = Mask.keep_all(model, ablation=ablation, means=means)
    n_layers, n_heads = keep.n_layers, keep.n_heads
    heads = keep.heads.clone().flatten()
    ffn = keep.ffn.clone()
    k = _n_removed(head_percent, n_layers * n_heads)
    if k:
        if head_order is None or head_order.numel() != n_layers * n_heads:
            raise ValueError(f"head_percent={head_percent} needs a head_order of "
                             f"{n_layers * n_heads} indices")
        heads[head_order[:k]] = 0.0
    k = _n_removed(ffn_percent, n_layers)
    if k:
        if ffn_order is None or ffn_order.numel() != n_layers:
            raise ValueError(f"ffn_percent={ffn_percent} needs an ffn_order of {n_layers} indices")
        ffn[ffn_order[:k]] = 0.0
    return Mask(heads=heads.reshape(n_layers, n_heads), ffn=ffn, ablation=ablation, means=means)


def _as_rankings(rankings: Ranking | Mapping[str, Ranking] | None, expected: int,
                 kind: str) -> dict[str, Tensor]:
    if rankings is None:
        return {}
    if not isinstance(rankings, Mapping):
        name = getattr(rankings, "name", "custom")
        task = getattr(rankings, "params", {}).get("task")
        rankings = {f"{name}:{task}" if task else name: rankings}
    out = {}
    for name, r in rankings.items():
        if name == RANDOM:
            raise ValueError(f"the ranking name {RANDOM!r} is reserved for random draws")
        scores = r.mean if isinstance(r, (HeadScores, LayerScores)) else torch.as_tensor(r)
        if scores.numel() != expected:
            raise ValueError(f"{kind} ranking {name!r} has {scores.numel()} scores, the model has "
                             f"{expected} {kind}")
        out[name] = prune_order(scores)
    return out


@result_type
@dataclass(frozen=True, kw_only=True)
class PruneCurve:
    """Accuracy after pruning, one row per (ranking, draw, head %, FFN %), with every prompt's
    correctness so that comparisons are paired over prompts.

    Attributes:
        data: columns ``task, shots, head_ranking, ffn_ranking, draw, head_percent,
            ffn_percent, heads_removed, ffns_removed, accuracy, ci_low, ci_high`` (95% Wilson),
            ``gold_logprob`` (mean log-likelihood of the gold answer), ``n``, ``chance``.
        correct: ``[row, example]`` 0/1 correctness of each evaluated prompt at each row of
            ``data`` (``None`` for curves written before mechicl 0.3: their statistics need a
            recomputation).
        params: the run's settings.
        model: the model's provenance.
    """

    data: pd.DataFrame = field(repr=False)
    correct: Int[Tensor, "row example"] | None = field(default=None, repr=False)
    params: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def baseline(self) -> float:
        """Accuracy with nothing removed."""
        return float(self.data.accuracy.iloc[self._unpruned_row()])

    def _unpruned_row(self) -> int:
        rows = np.flatnonzero((self.data.heads_removed == 0) & (self.data.ffns_removed == 0))
        if not len(rows):
            raise ValueError("the curve has no unpruned point")
        return int(rows[0])

    def _per_prompt(self) -> np.ndarray:
        if self.correct is None:
            raise ValueError("this curve has no per-prompt correctness (written before mechicl "
                             "0.3); recompute it to get intervals and tests")
        return self.correct.numpy().astype(np.float64)

    def to_dataframe(self) -> pd.DataFrame:
        return self.data.copy()

    def points(self, *, n_resamples: int = 2000, seed: int = 0, level: float = 0.95,
               band: tuple[float, float] = (0.05, 0.95)) -> pd.DataFrame:
        """One row per (ranking, head %, FFN %): accuracy with its interval, the drop from the
        unpruned model and the difference from random orders, each with a paired interval.

        Columns: ``head_ranking, ffn_ranking, head_percent, ffn_percent, heads_removed,
        ffns_removed, draws, accuracy`` (random: the mean over draws) ``acc_low, acc_high``
        (percentile bootstrap over prompts of the per-prompt correctness, averaged over draws),
        ``band_low, band_high`` (random: the ``band`` quantiles of the draws' accuracies; NaN for
        a single order), ``drop, drop_low, drop_high`` (unpruned minus pruned, paired bootstrap),
        ``vs_random, vs_random_low, vs_random_high, vs_random_p`` (this ranking minus the mean of
        the random orders at the same point, paired bootstrap; two-sided bootstrap p-value; NaN
        without random orders or for the random rows themselves), ``n``, ``n_resamples``,
        ``level``. All intervals share one resampling of the prompts (``seed``).
        """
        c = self._per_prompt()
        d = self.data
        keys = ["head_ranking", "ffn_ranking", "head_percent", "ffn_percent"]
        groups = list(d.groupby(keys, sort=False).indices.items())
        mean_c = np.stack([c[rows].mean(0) for _, rows in groups])  # [point, example]
        unpruned = c[self._unpruned_row()]
        acc = paired_bootstrap(mean_c, n_resamples=n_resamples, seed=seed, level=level)
        drop = paired_bootstrap(unpruned[None], mean_c, n_resamples=n_resamples, seed=seed,
                                level=level)
        random_at = {(h, f): i for i, ((hr, fr, h, f), _) in enumerate(groups)
                     if RANDOM in (hr, fr)}
        out = []
        for i, ((hr, fr, hp, fp), rows) in enumerate(groups):
            accs = d.accuracy.to_numpy()[rows]
            row = {"head_ranking": hr, "ffn_ranking": fr, "head_percent": hp, "ffn_percent": fp,
                   "heads_removed": int(d.heads_removed.iloc[rows[0]]),
                   "ffns_removed": int(d.ffns_removed.iloc[rows[0]]), "draws": len(rows),
                   "accuracy": float(acc.estimate[i]), "acc_low": float(acc.low[i]),
                   "acc_high": float(acc.high[i]),
                   "band_low": float(np.quantile(accs, band[0])) if len(rows) > 1 else np.nan,
                   "band_high": float(np.quantile(accs, band[1])) if len(rows) > 1 else np.nan,
                   "drop": float(drop.estimate[i]), "drop_low": float(drop.low[i]),
                   "drop_high": float(drop.high[i]),
                   "vs_random": np.nan, "vs_random_low": np.nan, "vs_random_high": np.nan,
                   "vs_random_p": np.nan}
            j = random_at.get((hp, fp))
            if j is not None and RANDOM not in (hr, fr) and (hp, fp) != (0.0, 0.0):
                vs = paired_bootstrap(mean_c[i], mean_c[j], n_resamples=n_resamples, seed=seed,
                                      level=level)
                row.update(vs_random=float(vs.estimate[0]), vs_random_low=float(vs.low[0]),
                           vs_random_high=float(vs.high[0]),
                           vs_random_p=float(vs.p_two_sided[0]))
            out.append(row)
        table = pd.DataFrame(out)
        table["n"], table["n_resamples"], table["level"] = c.shape[1], n_resamples, level
        return table

    def summary(self, tolerance: float = 0.05, *, alpha: float = 0.05, level: float = 0.90,
                n_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
        """Per ranking and unit (heads along ``ffn_percent == 0``, FFNs along
        ``head_percent == 0``): the share removable (:func:`~mechicl.stats.removable_fraction`:
        the largest share such that at it and every smaller share the accuracy drop from the
        unpruned model is below ``tolerance`` by a one-sided paired bootstrap test at
        ``alpha``), the point estimate of that share and its ``level`` bootstrap interval.
        Random orders are averaged per prompt over their draws first.

        Columns: ``unit, head_ranking, ffn_ranking, baseline, tolerance, alpha, removable,
        estimate, low, high, level, draws, n``.
        """
        c = self._per_prompt()
        d = self.data
        unpruned = c[self._unpruned_row()]
        rows = []
        for unit, axis, other in (("heads", "head_percent", "ffn_percent"),
                                  ("ffn", "ffn_percent", "head_percent")):
            line = d[(d[other] == 0) & (d[axis] > 0)]
            for (hr, fr), g in line.groupby(["head_ranking", "ffn_ranking"], sort=False):
                by_share = g.groupby(axis).indices
                shares = np.array(sorted(by_share))
                per = np.stack([c[g.index.to_numpy()[by_share[s]]].mean(0) for s in shares])
                r = removable_fraction(shares, per, unpruned, tolerance=tolerance, alpha=alpha,
                                       level=level, n_resamples=n_resamples, seed=seed)
                rows.append({"unit": unit, "head_ranking": hr, "ffn_ranking": fr,
                             "baseline": self.baseline, **r.to_dict(),
                             "draws": int(g.draw.nunique()), "n": c.shape[1]})
        return pd.DataFrame(rows)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write as a folder (:func:`~mechicl.results.write_result`, the data as
        ``curve.parquet``, per-prompt correctness as a tensor), atomically."""
        tensors = None if self.correct is None else {"correct": self.correct.to(torch.uint8)}
        return write_result(path, kind="PruneCurve", params=self.params, model=self.model,
                            tables={"curve": self.data}, tensors=tensors)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "PruneCurve":
        """Read a result written by :meth:`save`, verified
        (:func:`~mechicl.results.read_result`)."""
        folder = read_result(path, "PruneCurve")
        correct = folder.tensors.get("correct")
        if correct is not None and correct.shape[0] != len(folder.tables["curve"]):
            raise ResultError(f"{path}: per-prompt correctness has {correct.shape[0]} rows, the "
                              f"curve {len(folder.tables['curve'])}; recompute the result")
        return cls(data=folder.tables["curve"],
                   correct=None if correct is None else correct.to(torch.int64),
                   params=folder.params, model=folder.model)


def prune_curve(
    model: HookedModel, task: Task | str | None = None, *, shots: int = 5,
    head_rankings: Ranking | Mapping[str, Ranking] | None = None,
    ffn_rankings: Ranking | Mapping[str, Ranking] | None = None,
    head_percents: Sequence[int | float] = DEFAULT_PERCENTS,
    ffn_percents: Sequence[int | float] = (0,),
    random_draws: int = 20, n: int | None = None, seed: int = 0,
    prompts: Sequence[Prompt] | None = None, ablation: Ablation = "zero",
    means: ActivationMeans | None = None, normalization: NormalizationChoice = "task",
    batch_tokens: int = 4096, progress: bool = False, **prompt_options: Any,
) -> PruneCurve:
    """Accuracy on ``task`` at ``shots`` while removing the least important heads / FFNs.

    Args:
        model: the model.
        task: the task (or give ``prompts``).
        shots: demonstrations per prompt.
        head_rankings: importance scores (higher = more important) to prune heads by: one
            :class:`~mechicl.HeadScores` / ``[layer, head]`` tensor, or a mapping name -> scores
            (e.g. ``{"same task": imp, "other task": imp2, "prefix matching": scan["prefix_matching"]}``).
        ffn_rankings: the same for FFNs (``[layer]`` scores, e.g. :func:`~mechicl.ffn_importance`).
        head_percents: percentages of heads to remove (default 0, 10, ..., 90).
        ffn_percents: percentages of FFNs to remove (default only 0); giving both lists prunes
            heads and FFNs together on their grid.
        random_draws: random rankings added as a baseline (seeded by ``seed`` and the draw);
            with random head and FFN rankings both, draw ``d`` of one pairs with draw ``d`` of
            the other.
        n, seed, prompts, **prompt_options: which prompts (see :func:`~mechicl.evaluate`).
        ablation: ``"zero"`` or ``"mean"``: what a removed head's or FFN's output becomes.
        means: the means of ``ablation="mean"`` (default: over the evaluated prompts, each
            with its gold answer: :func:`~mechicl.analyses.evaluation.prompt_means`).
        normalization: how the choices are ranked, as in :func:`~mechicl.evaluate`: ``"task"``
            (the task's :attr:`~mechicl.inputs.tasks.Task.normalization`; ``"none"`` without a
            registered task), ``"none"``, ``"tokens"`` or ``"chars"``.
        batch_tokens: rows x longest row per forward pass, counting every masked copy.
        progress: show a progress bar.
    """
    model = as_hooked_model(model)
    rule = resolve_normalization(normalization, task)
    if random_draws < 0:
        raise ValueError(f"random_draws={random_draws} must be >= 0")
    head_percents = sorted({float(p) for p in head_percents})
    ffn_percents = sorted({float(p) for p in ffn_percents})
    for p in [*head_percents, *ffn_percents]:
        _n_removed(p, 1)  # validates the range
    n_heads_total = model.n_layers * model.n_heads
    head_orders = _as_rankings(head_rankings, n_heads_total, "heads")
    ffn_orders = _as_rankings(ffn_rankings, model.n_layers, "layers")

    def specs(orders: dict[str, Tensor], total: int, percents: list[float], salt: int,
              ) -> list[tuple[str, int, Tensor | None]]:
        if percents == [0.0]:
            return [("none", 0, None)]
        out: list[tuple[str, int, Tensor | None]] = [(k, 0, v) for k, v in orders.items()]
        for d in range(random_draws):
            rng = np.random.default_rng([seed, d, salt])
            out.append((RANDOM, d, torch.from_numpy(rng.permutation(total))))
        if not out:
            raise ValueError("nothing to prune by: give rankings or random_draws > 0")
        return out

    head_specs = specs(head_orders, n_heads_total, head_percents, 0)
    ffn_specs = specs(ffn_orders, model.n_layers, ffn_percents, 1)
    task_name, prompt_list = resolve_prompts(task, prompts, shots=shots, n=n, seed=seed, prompt_options=prompt_options)
    if ablation == "mean" and means is None:
        means = prompt_means(model, prompt_list, batch_tokens=batch_tokens)

    masks: list[Mask] = []
    index: dict[bytes, int] = {}
    rows = []
    for h_name, h_draw, h_order in head_specs:
        for f_name, f_draw, f_order in ffn_specs:
            if h_name == RANDOM and f_name == RANDOM and h_draw != f_draw:
                continue
            draw = h_draw if h_name == RANDOM else f_draw
            for hp in head_percents:
                for fp in ffn_percents:
                    mask = pruning_mask(model, head_order=h_order, head_percent=hp,
                                        ffn_order=f_order, ffn_percent=fp, ablation=ablation,
                                        means=means)
                    key = mask.key()
                    if key not in index:
                        index[key] = len(masks)
                        masks.append(mask)
                    rows.append({"head_ranking": h_name, "ffn_ranking": f_name, "draw": draw,
                                 "head_percent": hp, "ffn_percent": fp,
                                 "heads_removed": _n_removed(hp, n_heads_total),
                                 "ffns_removed": _n_removed(fp, model.n_layers),
                                 "_mask": index[key]})
    loglik, n_tok = masked_choice_logprobs(model, prompt_list, masks, batch_tokens=batch_tokens,
                                           progress=progress)
    score = choice_scores(loglik, n_tok, choice_chars(prompt_list), rule)
    gold = torch.tensor([p.gold for p in prompt_list])
    correct = (score.argmax(-1) == gold)  # [mask, example]
    gold_lp = loglik.gather(-1, gold[None, :, None].expand(len(masks), -1, 1))[..., 0]
    n_correct = correct.sum(-1).tolist()
    mean_gold = gold_lp.mean(-1).tolist()
    chance = float(np.mean([1.0 / len(p.continuations) for p in prompt_list]))
    n_ex = len(prompt_list)
    mask_of_row: list[int] = []
    for row in rows:
        m = row.pop("_mask")
        mask_of_row.append(m)
        low, high = wilson_interval(n_correct[m], n_ex)
        row.update(accuracy=n_correct[m] / n_ex, ci_low=low, ci_high=high,
                   gold_logprob=mean_gold[m])
    data = pd.DataFrame(rows)
    data.insert(0, "shots", shots)
    data.insert(0, "task", task_name)
    data["n"] = n_ex
    data["chance"] = chance
    per_row = correct[torch.tensor(mask_of_row, dtype=torch.long)].to(torch.int64)
    params = {"task": task_name, "shots": shots, "n": n_ex, "seed": seed, "ablation": ablation,
              "random_draws": random_draws, "head_percents": head_percents,
              "ffn_percents": ffn_percents, "normalization": rule,
              "head_rankings": sorted(head_orders), "ffn_rankings": sorted(ffn_orders),
              "distinct_masks": len(masks), "prompt_ids": [p.id for p in prompt_list],
              **prompt_options}
    return PruneCurve(data=data, correct=per_row, params=params, model=model.info())


def curve_summaries(curves: dict[tuple[str, int], PruneCurve]) -> pd.DataFrame:
    """:meth:`PruneCurve.summary` of each (task, shots) curve, stacked, with task and shots
    columns first."""
    frames = []
    for (task_name, shots), curve in curves.items():
        s = curve.summary()
        s.insert(0, "shots", shots)
        s.insert(0, "task", task_name)
        frames.append(s)
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------------------------
# The registered analysis: importance / induction scores -> rankings -> the pruning curve
# --------------------------------------------------------------------------------------------

DIRECTIONS: tuple[str, ...] = ("low-first", "high-first")
"""How a ranking prunes: the lowest scores first (least important first: the paper's protocol
for importance maps), or the highest first (e.g. induction heads first)."""


def parse_ranking(spec: str, *, heads: bool = True) -> tuple[str, str]:
    """A ranking spec -> ``(source, direction)``.

    ``source`` is ``"same"`` (the task's own importance), another registered task's name (its
    importance at the same shot count), or, for heads, an induction score (aliases allowed);
    ``:low-first`` (the default) or ``:high-first`` says which end is pruned first.

    >>> parse_ranking("prefix:high-first")
    ('prefix_matching', 'high-first')
    >>> parse_ranking("same")
    ('same', 'low-first')
    """
    source, _, direction = spec.partition(":")
    direction = direction or "low-first"
    if direction not in DIRECTIONS:
        raise ValueError(f"ranking {spec!r}: direction {direction!r} is not one of "
                         f"{list(DIRECTIONS)}")
    if heads and source in SCORE_ALIASES:
        return SCORE_ALIASES[source], direction
    if source == "same" or source in TASKS:
        return source, direction
    allowed = "'same', a task name" + (", an induction score" if heads else "")
    raise ValueError(f"unknown {'head' if heads else 'FFN'} ranking {spec!r}: use {allowed} "
                     f"(registered tasks: {sorted(TASKS)}; scores: {sorted(SCORE_ALIASES)}), "
                     "optionally followed by :low-first or :high-first")


def _label(source: str, direction: str, task: str) -> str:
    if source in SCORES:
        end = "highest" if direction == "high-first" else "lowest"
        return f"{source.replace('_', ' ')}, {end} first"
    name = f"same task ({task})" if source == "same" else f"other task ({source})"
    return name + (", most important first" if direction == "high-first" else "")


def ranking_inputs(job: Job) -> dict[str, Job]:
    """The jobs whose results a pruning job ranks by: per head ranking, the task's (or another
    task's) head importance on its ranking prompts, or an induction scan; per FFN ranking, FFN
    knock-out importance. Named ``heads:<spec>`` / ``ffn:<spec>``."""
    o = job.options
    out: dict[str, Job] = {}
    scores = list(dict.fromkeys(s for s in (parse_ranking(r)[0] for r in o["rankings"])
                                if s in SCORES))
    for kind, specs in _used_rankings(o):
        for spec in specs:
            source, _ = parse_ranking(spec, heads=kind == "heads")
            if source in SCORES:  # one scan of the scores the rankings use
                out[f"{kind}:{spec}"] = SCAN.job(
                    job.model, {"scores": scores, "n_seeds": o["scan_seeds"],
                                "length": o["scan_length"]}, seed=job.seed)
                continue
            task = job.task if source == "same" else source
            if kind == "heads":
                out[f"{kind}:{spec}"] = HEAD_IMPORTANCE.job(
                    job.model, {"method": o["method"], "n": o["n"]}, seed=job.seed, task=task,
                    shots=job.shots)
            else:
                out[f"{kind}:{spec}"] = FFN_IMPORTANCE.job(
                    job.model, {"n": o["n"], "ablation": o["ablation"]}, seed=job.seed,
                    task=task, shots=job.shots)
    return out


def _used_rankings(options: Mapping[str, Any]) -> list[tuple[str, list[str]]]:
    """The head and FFN ranking specs a curve uses: none for a unit pruned at 0% only."""
    return [(kind, options[key] if any(p > 0 for p in options[percents]) else [])
            for kind, key, percents in (("heads", "rankings", "percents"),
                                        ("ffn", "ffn_rankings", "ffn_percents"))]


def _rankings(call: Call, kind: str) -> dict[str, Tensor]:
    """Label -> scores whose ascending order is the pruning order."""
    specs = dict(_used_rankings(call.options))[kind]
    out = {}
    for spec in specs:
        source, direction = parse_ranking(spec, heads=kind == "heads")
        result = call.inputs[f"{kind}:{spec}"]
        scores = result.scores[source].mean if source in SCORES else result.mean
        out[_label(source, direction, call.job.task or "")] = (
            -scores if direction == "high-first" else scores)
    return out


def evaluation_prompts(task: Task, job: Job) -> list[Prompt]:
    """A pruning job's evaluated prompts: the ``eval_n`` after its ``n`` ranking prompts."""
    return split_prompts(task, shots=job.shots or 0, n_rank=job.options["n"],
                         n_eval=job.options["eval_n"], seed=job.seed)[1]


def _run(call: Call) -> PruneCurve:
    o = call.options
    heads, ffns = _rankings(call, "heads"), _rankings(call, "ffn")
    return prune_curve(call.model, call.task, shots=call.shots,
                       prompts=evaluation_prompts(call.task, call.job),
                       head_rankings=heads or None, ffn_rankings=ffns or None,
                       head_percents=o["percents"], ffn_percents=o["ffn_percents"],
                       random_draws=o["draws"], seed=call.seed, ablation=o["ablation"],
                       progress=call.progress, **call.batch())


def _check(options: dict[str, Any], tasks: Sequence[str], shots: Sequence[int]) -> None:
    for spec in options["rankings"]:
        parse_ranking(spec)
    for spec in options["ffn_rankings"]:
        parse_ranking(spec, heads=False)
    for unit, key, percents in (("heads", "rankings", "percents"),
                                ("FFNs", "ffn_rankings", "ffn_percents")):
        if any(p > 0 for p in options[percents]) and not options[key] and not options["draws"]:
            raise ValueError(f"{percents}={options[percents]} removes {unit}, but there is "
                             f"nothing to order them by: give {key} or draws > 0")


def _outputs(pairs: Sequence[tuple[Job, PruneCurve]], options: Mapping[str, Any]) -> Outputs:
    results, figures, rows = {}, {}, []
    for job, curve in pairs:
        stem = job_stem(job)
        results[f"{stem}-prune"] = curve
        for x, unit in (("head_percent", "heads"), ("ffn_percent", "ffn")):
            if curve.data[x].max() > 0:
                figures[f"{stem}-prune-{unit}"] = prune_curve_figure(curve, x=x)
        rows += curve_summaries({(job.task or "", job.shots or 0): curve}).to_dict("records")
    return Outputs(results=results, figures=figures, rows=rows)


PERCENT = dict(type=list, item=float, minimum=0, below=100, must_contain=0, sort=True)

PRUNING = register_analysis(Analysis(
    name="pruning", command="prune",
    help="accuracy while pruning heads / FFNs by importance, induction scores or at random",
    run=_run, result_type=PruneCurve, per_task=True, shots=(5,), memory="choices",
    inputs=ranking_inputs,
    check=_check, outputs=_outputs,
    sequence_length=lambda model, job, task: longest_choice_row(model, evaluation_prompts(task, job)),
    options=(
        Option(name="rankings", type=list, item=str, default=["same"], non_empty=False,
               help="head rankings: same (this task's importance), another task's name, an "
                    "induction score (prefix, copying, ...); each optionally :low-first "
                    "(default) or :high-first; random orders come from --draws"),
        Option(name="ffn_rankings", type=list, item=str, default=[], non_empty=False,
               help="FFN rankings: same (FFN knock-out importance) or another task"),
        Option(name="percents", default=[float(p) for p in DEFAULT_PERCENTS],
               help="percentages of heads removed (0 included)", **PERCENT),
        Option(name="ffn_percents", default=[0.0],
               help="percentages of FFNs removed (with percents: a combined grid)", **PERCENT),
        Option(name="draws", type=int, default=20, minimum=0,
               help="random orders, the baseline"),
        Option(name="method", type=str, default="bansal", choices=IMPORTANCE_METHODS,
               help="importance method of the task rankings"),
        Option(name="n", type=int, default=50, minimum=1,
               help="ranking prompts per task (the first of the seeded list)"),
        Option(name="eval_n", type=int, default=50, minimum=1,
               help="evaluated prompts (the next ones: never those a ranking saw)"),
        Option(name="scan_seeds", type=int, default=100, minimum=1,
               help="random sequences of the scan behind induction-score rankings"),
        Option(name="scan_length", type=int, default=None, nullable=True, minimum=2,
               help="one sequence length for that scan (default 2s + 25)"),
        Option(name="ablation", type=str, default="zero", choices=("zero", "mean"),
               help="how pruned heads / FFNs are removed"),
        batch_tokens_option(
            help="rows x longest row per forward pass, counting every masked copy"),
    ),
))
