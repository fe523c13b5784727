"""Accuracy against weight sparsity: closed-book recall vs in-context processing (issue 23 §2).

Jin et al. (ICLR 2024, "The Cost of Down-Scaling Language Models: Fact Recall Deteriorates
before In-Context Learning") prune LLMs' weights (SparseGPT, Wanda) and report that closed-book
fact recall degrades from about 30% sparsity while in-context information processing holds up
to 60-70%. :func:`sparsity_curves` measures both on one model:

* **Pruning.** For each method (``"magnitude"``, ``"wanda"``; :func:`mechicl.model.sparsity.pruned`,
  in place and restored) and each sparsity (percent of each output row of every block linear
  layer, 0 .. 90), a Python loop (each sparsity is a weight change); the prompts of every task
  are scored together in batched passes within it. Wanda's calibration text is BoolQ's
  Wikipedia passages (:func:`mechicl.inputs.variants.calibration_text`), cut into
  ``calibration_sequences`` windows of ``calibration_length`` tokens (16 x 128 by default:
  2032 tokens after the BOS of each window); no task of the curves reads them.
* **Tasks.** Recall: ``country_capital``, ``country_currency`` at 0 shots; in context:
  ``capital_in_context``, ``counterfactual_capital`` (0 shots), ``sentiment_unrelated`` (8
  shots), ``repeated_words`` (0 shots) (:mod:`mechicl.inputs.variants`). A task is written
  ``name`` (0 shots) or ``name:k``. Each task scores its first ``n`` seeded prompts
  (:func:`~mechicl.inputs.tasks.build_prompts`), the same prompts at every sparsity, by the
  task's own choice ranking (:func:`~mechicl.analyses.evaluation.choice_scores`).
* **Statistics** (:class:`SparsityCurves`). Each accuracy has its 95% Wilson interval; each
  drop from the unpruned model (per prompt: unpruned - pruned correctness) a 95% percentile
  paired bootstrap interval over prompts (:func:`~mechicl.stats.paired_bootstrap`). A group
  (recall, in context) pools its tasks' prompts. Per method and group:

  - ``holds_to``: the largest sparsity such that at it and at every smaller one the drop is
    below ``tolerance``, by a one-sided paired bootstrap test at 5%
    (:func:`~mechicl.stats.removable_fraction`, the rule of the heads' pruning curves), with
    the percentile interval of the same rule applied to each resample's drops;
  - ``falls_at``: the first sparsity whose drop is above ``tolerance`` by a one-sided paired
    bootstrap test at 5% (``p`` of "drop <= tolerance" below 0.05), with the interval of the
    first sparsity whose resampled drop exceeds ``tolerance``; 100 when it never falls within
    the grid (censored).

  The comparison (:meth:`SparsityCurves.comparison`) is ``falls_at(in context) -
  falls_at(recall)`` with a bootstrap interval (the groups' prompts resampled independently):
  the paper's pattern is *supported* when the interval is above 0, *contradicted* when below,
  else *inconclusive*; a group whose unpruned accuracy is not above chance (Wilson interval)
  makes it *uninformative*. Nothing is assumed: the sentence is computed from the data.

Axis names: ``share example resample``.
"""

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from mechicl.analyses._registry import (
    Analysis,
    Call,
    Job,
    Option,
    Outputs,
    batch_tokens_option,
    register_analysis,
)
from mechicl.analyses.evaluation import (
    choice_chars,
    choice_scores,
    longest_choice_row,
    masked_choice_logprobs,
)
from mechicl.inputs.tasks import TASKS, Prompt, build_prompts, load_task
from mechicl.inputs.variants import CLOSED_BOOK_TASKS, calibration_text
from mechicl.model.hooked import HookedModel, as_hooked_model
from mechicl.model.sparsity import MAX_SPARSITY, PRUNING_METHODS, calibration_batch, pruned
from mechicl.results import ResultError, read_result, result_type, write_result
from mechicl.stats import paired_bootstrap, removable_fraction, wilson_interval

__all__ = [
    "DEFAULT_ICL_TASKS",
    "DEFAULT_RECALL_TASKS",
    "DEFAULT_SPARSITIES",
    "GROUPS",
    "SPARSITY_CURVES",
    "SparsityCurves",
    "parse_task_spec",
    "sparsity_curves",
    "sparsity_figure",
]

DEFAULT_SPARSITIES: tuple[float, ...] = tuple(float(s) for s in range(0, 100, 10))
"""Percent of each output row's weights removed: 0, 10, ..., 90."""

DEFAULT_RECALL_TASKS: tuple[str, ...] = CLOSED_BOOK_TASKS
"""Closed-book recall, 0 shots."""

DEFAULT_ICL_TASKS: tuple[str, ...] = ("capital_in_context", "counterfactual_capital",
                                      "sentiment_unrelated:8", "repeated_words")
"""In-context processing (``name:k`` = k shots)."""

GROUPS: tuple[str, ...] = ("recall", "in_context")
"""The task groups compared."""

CALIBRATION_TASK = "boolq"
"""The task whose passages calibrate Wanda: it may not be one of the curves' tasks."""

_NEVER = 100.0  # falls_at when the drop never exceeds the tolerance within the grid


def parse_task_spec(spec: str) -> tuple[str, int]:
    """``"name"`` -> ``(name, 0)``; ``"name:k"`` -> ``(name, k)``.

    >>> parse_task_spec("sentiment_unrelated:8"), parse_task_spec("country_capital")
    (('sentiment_unrelated', 8), ('country_capital', 0))
    """
    name, _, shots = spec.partition(":")
    if not name or (shots and not shots.isdigit()):
        raise ValueError(f"task {spec!r}: write a task name, optionally :k shots (e.g. "
                         "sentiment_unrelated:8)")
    return name, int(shots or 0)


def _task_specs(recall_tasks: Sequence[str], icl_tasks: Sequence[str],
                ) -> list[tuple[str, str, int]]:
    """``(group, task, shots)`` of every task, checked."""
    out = [(g, *parse_task_spec(s)) for g, specs in (("recall", recall_tasks),
                                                     ("in_context", icl_tasks)) for s in specs]
    for group, name, _ in out:
        if name not in TASKS:
            raise ValueError(f"{group} task {name!r} is not registered; registered tasks: "
                             f"{sorted(TASKS)}")
        if name == CALIBRATION_TASK:
            raise ValueError(f"task {name!r} calibrates Wanda's pruning: it cannot be one of "
                             "the curves' tasks")
    names = [name for _, name, _ in out]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"tasks {repeated} are given twice (a task belongs to one group)")
    for group, specs in (("recall", recall_tasks), ("in_context", icl_tasks)):
        if not specs:
            raise ValueError(f"no {group} tasks: give at least one")
    return out


# --------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------


@result_type
@dataclass(frozen=True, kw_only=True)
class SparsityCurves:
    """Per-prompt correctness on recall and in-context tasks at each weight sparsity.

    Attributes:
        correct: one row per ``(method, sparsity, task, prompt)``: ``method, sparsity``
            (percent), ``group`` (:data:`GROUPS`), ``task, shots, prompt_id, correct`` (bool),
            ``chance`` (1 / choices). Sparsity 0 (the unpruned model, computed once) is
            repeated under each method.
        pruning: one row per ``(method, sparsity)``: what was pruned (``n_weights,
            n_pruned, achieved, calibration_tokens, n_layers_pruned``).
        params: the protocol.
        model: the model's provenance (unpruned).
    """

    correct: pd.DataFrame = field(repr=False)
    pruning: pd.DataFrame = field(repr=False)
    params: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(self.correct["method"]))

    @property
    def sparsities(self) -> list[float]:
        return sorted(set(self.correct["sparsity"].astype(float)))

    def _matrix(self, method: str, by: str, key: str) -> tuple[np.ndarray, list[float], float]:
        """``[sparsity, example]`` correctness of one task / group under ``method`` (prompts
        in a fixed order), the sparsities, and the mean chance."""
        sub = self.correct[(self.correct["method"] == method) & (self.correct[by] == key)]
        wide = sub.pivot_table(index="sparsity", columns=["task", "prompt_id"], values="correct",
                               aggfunc="first").sort_index()
        if wide.isna().any().any():
            raise ResultError(f"{method} {key}: prompts are missing at some sparsities")
        chance = float(sub.groupby(["task", "prompt_id"])["chance"].first().mean())
        return wide.to_numpy(dtype=np.float64), [float(s) for s in wide.index], chance

    def _rows(self, by: str, *, n_resamples: int, seed: int) -> pd.DataFrame:
        rows = []
        for method in self.methods:
            for key in dict.fromkeys(self.correct[by]):
                c, shares, chance = self._matrix(method, by, key)
                base = c[shares.index(0.0)]
                drop = paired_bootstrap(base[None], c, n_resamples=n_resamples, seed=seed,
                                        threshold=0.0)  # unpruned - pruned
                for i, s in enumerate(shares):
                    k, n = int(c[i].sum()), c.shape[1]
                    low, high = wilson_interval(k, n)
                    rows.append({"method": method, by: key, "sparsity": s,
                                 "accuracy": k / n, "ci_low": low, "ci_high": high, "n": n,
                                 "chance": chance, "drop": float(drop.estimate[i]),
                                 "drop_low": float(drop.low[i]),
                                 "drop_high": float(drop.high[i]),
                                 "p_drop": float(drop.p_greater[i]) if s > 0 else 1.0})
        return pd.DataFrame(rows)

    def tasks(self, *, n_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
        """One row per ``(method, task, sparsity)``: ``accuracy, ci_low, ci_high`` (95%
        Wilson), ``n, chance``, ``drop`` (unpruned - pruned accuracy) with ``drop_low,
        drop_high`` (95% paired percentile bootstrap over prompts) and ``p_drop`` (one-sided
        bootstrap p of "no drop")."""
        return self._rows("task", n_resamples=n_resamples, seed=seed)

    def groups(self, *, n_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
        """:meth:`tasks` per ``(method, group, sparsity)``, the group's prompts pooled."""
        return self._rows("group", n_resamples=n_resamples, seed=seed)

    def thresholds(self, *, tolerance: float | None = None, alpha: float = 0.05,
                   n_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
        """One row per ``(method, group)``: where accuracy holds and where it falls.

        Columns: ``unpruned`` (accuracy), ``unpruned_low, unpruned_high`` (Wilson),
        ``chance``, ``above_chance`` (Wilson low > chance), ``holds_to, holds_low,
        holds_high`` (:func:`~mechicl.stats.removable_fraction`; interval at 90%, its
        default), ``falls_at, falls_low, falls_high`` (95%; 100 = not within the grid),
        ``tolerance, alpha, n``. See the module docstring.
        """
        tol = float(self.params.get("tolerance", 0.05) if tolerance is None else tolerance)
        rows = []
        for method in self.methods:
            for g, group in enumerate(dict.fromkeys(self.correct["group"])):
                c, shares, chance = self._matrix(method, "group", group)
                i0 = shares.index(0.0)
                base, rest = c[i0], np.delete(c, i0, axis=0)
                pos = np.array([s for s in shares if s > 0])
                k, n = int(base.sum()), base.size
                low, high = wilson_interval(k, n)
                row = {"method": method, "group": group, "unpruned": k / n,
                       "unpruned_low": low, "unpruned_high": high, "chance": chance,
                       "above_chance": bool(low > chance), "tolerance": tol, "alpha": alpha,
                       "n": n}
                if pos.size:
                    hold = removable_fraction(pos, rest, base, tolerance=tol, alpha=alpha,
                                              n_resamples=n_resamples, seed=seed + g)
                    falls, f_low, f_high, _ = _falls_at(pos, rest, base, tol, alpha,
                                                        n_resamples, seed + g)
                    row |= {"holds_to": hold.removable, "holds_low": hold.low,
                            "holds_high": hold.high, "falls_at": falls, "falls_low": f_low,
                            "falls_high": f_high}
                rows.append(row)
        return pd.DataFrame(rows)

    def comparison(self, *, tolerance: float | None = None, alpha: float = 0.05,
                   n_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
        """One row per method: ``falls_recall, falls_in_context``, ``difference`` (in
        context - recall) with its 95% bootstrap interval ``difference_low,
        difference_high`` (the groups resampled independently), ``verdict`` (``supported``,
        ``contradicted``, ``inconclusive`` or ``uninformative``) and ``sentence``."""
        tol = float(self.params.get("tolerance", 0.05) if tolerance is None else tolerance)
        table = self.thresholds(tolerance=tol, alpha=alpha, n_resamples=n_resamples, seed=seed)
        rows = []
        for method in self.methods:
            draws, falls = {}, {}
            for g, group in enumerate(GROUPS):
                c, shares, _ = self._matrix(method, "group", group)
                i0 = shares.index(0.0)
                pos = np.array([s for s in shares if s > 0])
                falls[group], _, _, draws[group] = _falls_at(
                    pos, np.delete(c, i0, axis=0), c[i0], tol, alpha, n_resamples, seed + g)
            diff = draws["in_context"] - draws["recall"]  # [resample]
            lo, hi = np.quantile(diff, [0.025, 0.975])
            t = table[table["method"] == method].set_index("group")
            if not bool(t["above_chance"].all()):
                verdict = "uninformative"
            elif lo > 0:
                verdict = "supported"
            elif hi < 0:
                verdict = "contradicted"
            else:
                verdict = "inconclusive"
            d = falls["in_context"] - falls["recall"]
            sentence = (
                f"{method}: recall falls {_pct(falls['recall'])}, in-context processing "
                f"{_pct(falls['in_context'])} (first sparsity whose accuracy drop exceeds "
                f"{tol:.0%} at p < {alpha}); difference {d:+.0f} points, 95% bootstrap "
                f"[{lo:+.0f}, {hi:+.0f}]: Jin et al.'s pattern (recall falls first) is "
                f"{verdict}" + (" (a group is not above chance unpruned)"
                                if verdict == "uninformative" else "") + ".")
            rows.append({"method": method, "falls_recall": falls["recall"],
                         "falls_in_context": falls["in_context"], "difference": d,
                         "difference_low": float(lo), "difference_high": float(hi),
                         "verdict": verdict, "sentence": sentence})
        return pd.DataFrame(rows)

    def to_dataframe(self) -> pd.DataFrame:
        """:meth:`groups` with its defaults."""
        return self.groups()

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write as a folder (:func:`~mechicl.results.write_result`), atomically."""
        return write_result(path, kind="SparsityCurves", params=self.params, model=self.model,
                            tables={"correct": self.correct, "pruning": self.pruning})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "SparsityCurves":
        """Read a result written by :meth:`save`, verified."""
        folder = read_result(path, "SparsityCurves")
        missing = [t for t in ("correct", "pruning") if t not in folder.tables]
        if missing:
            raise ResultError(f"{path}: tables {missing} are missing; recompute the result")
        return cls(correct=folder.tables["correct"], pruning=folder.tables["pruning"],
                   params=folder.params, model=folder.model)


def _pct(value: float) -> str:
    return "beyond the grid" if value >= _NEVER else f"at {value:.0f}%"


def _falls_at(shares: np.ndarray, correct: np.ndarray, unpruned: np.ndarray, tolerance: float,
              alpha: float, n_resamples: int, seed: int,
              ) -> tuple[float, float, float, np.ndarray]:
    """The first share whose drop exceeds ``tolerance`` by a one-sided paired bootstrap test at
    ``alpha`` (:data:`_NEVER` if none), the 95% interval of the first share whose resampled
    drop exceeds it, and those per-resample shares ``[resample]``."""
    drop = paired_bootstrap(unpruned[None], correct, n_resamples=n_resamples, seed=seed,
                            threshold=tolerance)  # unpruned - pruned, [share]
    shown = drop.p_greater < alpha  # [share]
    tested = float(shares[np.argmax(shown)]) if shown.any() else _NEVER
    over = drop.draws > tolerance  # [share, resample]
    first = np.where(over.any(0), shares[np.argmax(over, axis=0)], _NEVER)  # [resample]
    low, high = np.quantile(first, [0.025, 0.975])
    return tested, float(low), float(high), first


# --------------------------------------------------------------------------------------------
# Computing it
# --------------------------------------------------------------------------------------------


def _correct(model: HookedModel, prompts: Sequence[Prompt], rules: Sequence[str],
             batch_tokens: int, progress: bool) -> np.ndarray:
    """Per-prompt correctness ``[example]`` (each prompt ranked by its task's rule)."""
    loglik, n_tok = masked_choice_logprobs(model, prompts, None, batch_tokens=batch_tokens,
                                           progress=progress)  # [1, example, choice]
    n_chars = choice_chars(prompts)
    gold = torch.tensor([p.gold for p in prompts])
    out = np.zeros(len(prompts), dtype=bool)
    for rule in set(rules):
        idx = torch.tensor([i for i, r in enumerate(rules) if r == rule])
        score = choice_scores(loglik[0, idx], n_tok[idx], n_chars[idx], rule)
        out[idx.numpy()] = (score.argmax(-1) == gold[idx]).numpy()
    return out


def sparsity_curves(
    model: HookedModel, *, methods: Sequence[str] = PRUNING_METHODS,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    recall_tasks: Sequence[str] = DEFAULT_RECALL_TASKS,
    icl_tasks: Sequence[str] = DEFAULT_ICL_TASKS, n: int = 50, seed: int = 0,
    tolerance: float = 0.05, calibration_sequences: int = 16, calibration_length: int = 128,
    batch_tokens: int = 4096, progress: bool = False,
) -> SparsityCurves:
    """Accuracy of recall and in-context tasks as the model's weights are pruned.

    Args:
        model: a :class:`~mechicl.HookedModel` or bridge (pruned in place for each point and
            restored after it).
        methods: pruning criteria (``"magnitude"``, ``"wanda"``).
        sparsities: percents of each output row's weights removed (0 .. 90, 0 included).
        recall_tasks: closed-book tasks, ``name`` or ``name:k``.
        icl_tasks: in-context tasks, ``name`` or ``name:k``.
        n: prompts per task (the first of the seeded list; fewer if the pool is smaller).
        seed: seeds the prompts and the bootstrap.
        tolerance: the accuracy drop (a proportion) that counts as falling.
        calibration_sequences, calibration_length: Wanda's calibration windows (tokens per
            window, BOS included).
        batch_tokens: rows x longest row per forward pass.
        progress: show a progress bar.

    Returns:
        A :class:`SparsityCurves`.

    >>> curves = sparsity_curves(model, methods=["magnitude"], sparsities=[0.0, 50.0],
    ...                          recall_tasks=["country_capital"], icl_tasks=["repeated_words"],
    ...                          n=4)
    >>> sorted(set(curves.correct["sparsity"])), len(curves.correct)
    ([0.0, 50.0], 16)
    """
    model = as_hooked_model(model)
    methods = list(dict.fromkeys(methods))
    bad = [m for m in methods if m not in PRUNING_METHODS]
    if bad or not methods:
        raise ValueError(f"methods={list(methods)!r}: choose from {list(PRUNING_METHODS)}")
    shares = sorted({float(s) for s in sparsities})
    if 0.0 not in shares or any(not 0 <= s <= 100 * MAX_SPARSITY for s in shares):
        raise ValueError(f"sparsities={list(sparsities)!r}: need percents from 0 to "
                         f"{100 * MAX_SPARSITY:g}, 0 included")
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    specs = _task_specs(recall_tasks, icl_tasks)
    prompts: list[Prompt] = []
    rows_meta: list[dict[str, Any]] = []
    rules: list[str] = []
    for group, name, shots in specs:
        task = load_task(name)
        for p in build_prompts(task, shots=shots, n=n, seed=seed):
            prompts.append(p)
            rules.append(task.normalization)
            rows_meta.append({"group": group, "task": name, "shots": shots, "prompt_id": p.id,
                              "chance": 1.0 / len(p.continuations)})
    calibration = None
    if "wanda" in methods and any(s > 0 for s in shares):
        calibration = calibration_batch(model, calibration_text(), n_sequences=calibration_sequences,
                                        length=calibration_length)
    points = [(m, s) for m in methods for s in shares if s > 0]
    bar = tqdm(total=1 + len(points), desc="sparsity", disable=not progress, unit="point")
    unpruned = _correct(model, prompts, rules, batch_tokens, False)
    bar.update()
    frames, pruning_rows = [], []
    for method in methods:
        frames.append(pd.DataFrame([{"method": method, "sparsity": 0.0, **meta, "correct": bool(c)}
                                    for meta, c in zip(rows_meta, unpruned, strict=True)]))
        pruning_rows.append({"method": method, "sparsity": 0.0, "n_weights": 0, "n_pruned": 0,
                             "achieved": 0.0, "calibration_tokens": 0, "n_layers_pruned": 0})
    for method, share in points:
        with pruned(model, share / 100, method,
                    calibration=calibration if method == "wanda" else None) as record:
            ok = _correct(model, prompts, rules, batch_tokens, False)
        info = record.to_dict()
        pruning_rows.append({"method": method, "sparsity": share,
                             **{k: info[k] for k in ("n_weights", "n_pruned", "achieved",
                                                     "calibration_tokens", "n_layers_pruned")}})
        frames.append(pd.DataFrame([{"method": method, "sparsity": share, **meta,
                                     "correct": bool(c)}
                                    for meta, c in zip(rows_meta, ok, strict=True)]))
        bar.update()
    bar.close()
    params = {"methods": methods, "sparsities": shares,
              "recall_tasks": list(recall_tasks), "icl_tasks": list(icl_tasks), "n": n,
              "seed": seed, "tolerance": tolerance, "alpha": 0.05,
              "group": "output row", "weights": "linear layers of the transformer blocks "
              "(attention q/k/v/o, MLP); embeddings, unembedding, norms and biases kept",
              "calibration": None if calibration is None else {
                  "text": f"{CALIBRATION_TASK} passages (English Wikipedia, CC BY-SA 3.0)",
                  "sequences": calibration_sequences, "length": calibration_length,
                  "tokens_without_bos": int(calibration.shape[0] * (calibration.shape[1] - 1))}}
    return SparsityCurves(correct=pd.concat(frames, ignore_index=True),
                          pruning=pd.DataFrame(pruning_rows), params=params, model=model.info())


# --------------------------------------------------------------------------------------------
# The figure
# --------------------------------------------------------------------------------------------


def sparsity_figure(curves: SparsityCurves) -> Any:
    """Accuracy against sparsity, recall vs in-context groups, one panel per method: lines with
    95% Wilson bands, and each group's chance level dotted. Returns a plotly figure."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    table = curves.groups()
    methods = curves.methods
    fig = make_subplots(rows=1, cols=len(methods), subplot_titles=methods, shared_yaxes=True)
    colours = {"recall": "#d62728", "in_context": "#1f77b4"}
    fills = {"recall": "rgba(214,39,40,0.18)", "in_context": "rgba(31,119,180,0.18)"}
    for col, method in enumerate(methods, start=1):
        for group in GROUPS:
            t = table[(table["method"] == method) & (table["group"] == group)]
            if t.empty:
                continue
            x = t["sparsity"].tolist()
            name = "recall (closed book)" if group == "recall" else "in context"
            fig.add_trace(go.Scatter(x=x + x[::-1], y=t["ci_high"].tolist() +
                                     t["ci_low"].tolist()[::-1], fill="toself",
                                     fillcolor=fills[group], line={"width": 0},
                                     hoverinfo="skip", showlegend=False,
                                     legendgroup=group), row=1, col=col)
            fig.add_trace(go.Scatter(x=x, y=t["accuracy"], mode="lines+markers", name=name,
                                     line={"color": colours[group]}, legendgroup=group,
                                     showlegend=col == 1), row=1, col=col)
            fig.add_trace(go.Scatter(x=[x[0], x[-1]], y=[t["chance"].iloc[0]] * 2,
                                     mode="lines", line={"color": colours[group], "dash": "dot",
                                                         "width": 1},
                                     name=f"{name}: chance", legendgroup=group,
                                     showlegend=col == 1), row=1, col=col)
        fig.update_xaxes(title_text="sparsity (%)", range=[-3, 93], row=1, col=col)
    fig.update_yaxes(title_text="accuracy (95% Wilson band)", range=[0, 1], row=1, col=1)
    name = curves.model.get("name", "model")
    fig.update_layout(title=f"{name}: accuracy vs weight sparsity (n = "
                            f"{curves.params.get('n')} prompts per task)<br><sup>sparsity: share "
                            "of each output row's weights removed</sup>",
                      template="plotly_white")
    return fig


# --------------------------------------------------------------------------------------------
# The registered analysis
# --------------------------------------------------------------------------------------------


def _run(call: Call) -> SparsityCurves:
    o = call.options
    return sparsity_curves(call.model, methods=o["methods"], sparsities=o["sparsities"],
                           recall_tasks=o["recall_tasks"], icl_tasks=o["icl_tasks"], n=o["n"],
                           seed=call.seed, tolerance=o["tolerance"],
                           calibration_sequences=o["calibration_sequences"],
                           calibration_length=o["calibration_length"], progress=call.progress,
                           **call.batch())


def _check(options: dict[str, Any], tasks: Sequence[str], shots: Sequence[int]) -> None:
    _task_specs(options["recall_tasks"], options["icl_tasks"])


def _sequence_length(model: Any, job: Job, task: Any) -> int:
    o = job.options
    longest = 1
    for _, name, k in _task_specs(o["recall_tasks"], o["icl_tasks"]):
        longest = max(longest, longest_choice_row(model, build_prompts(load_task(name), shots=k,
                                                                   n=o["n"], seed=job.seed)))
    return longest


def _outputs(pairs: Sequence[tuple[Job, SparsityCurves]], options: Mapping[str, Any]) -> Outputs:
    results, figures, rows = {}, {}, []
    for job, curves in pairs:
        stem = Path(job.model).name.replace("/", "_") + "-sparsity"
        results[stem] = curves
        figures[f"{stem}-curves"] = sparsity_figure(curves)
        comparison = curves.comparison().set_index("method")
        for row in curves.thresholds().to_dict("records"):
            c = comparison.loc[row["method"]]
            rows.append({**row, "verdict": c["verdict"], "difference": c["difference"],
                         "difference_low": c["difference_low"],
                         "difference_high": c["difference_high"]})
    return Outputs(results=results, figures=figures, rows=rows)


SPARSITY_CURVES = register_analysis(Analysis(
    name="sparsity_curves", command="sparsity",
    help="accuracy vs weight sparsity (magnitude, Wanda): closed-book recall vs in-context tasks",
    run=_run, result_type=SparsityCurves, memory="choices", check=_check, outputs=_outputs,
    sequence_length=_sequence_length, code_version=1,
    options=(
        Option(name="methods", type=list, item=str, default=list(PRUNING_METHODS),
               choices=PRUNING_METHODS, sort=True,
               help="pruning criteria: magnitude (|W|), wanda (|W| x input norm)"),
        Option(name="sparsities", type=list, item=float, default=list(DEFAULT_SPARSITIES),
               minimum=0, maximum=100 * MAX_SPARSITY, must_contain=0.0, sort=True,
               help="percent of each output row's weights removed (0 included)"),
        Option(name="recall_tasks", type=list, item=str, default=list(DEFAULT_RECALL_TASKS),
               registry="task", help="closed-book tasks, each name or name:shots"),
        Option(name="icl_tasks", type=list, item=str, default=list(DEFAULT_ICL_TASKS),
               registry="task", help="in-context tasks, each name or name:shots"),
        Option(name="n", type=int, default=50, minimum=1, help="prompts per task"),
        Option(name="tolerance", type=float, default=0.05, minimum=0, maximum=1,
               help="the accuracy drop (a proportion) that counts as falling"),
        Option(name="calibration_sequences", type=int, default=16, minimum=1,
               help="Wanda's calibration windows (BoolQ passages)"),
        Option(name="calibration_length", type=int, default=128, minimum=2,
               help="tokens per calibration window, BOS included"),
        batch_tokens_option(help="rows x longest row per forward pass"),
    ),
))
