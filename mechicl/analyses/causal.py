"""A causal check of induction-head scores: ablate the top-k heads against k random heads.

An induction score such as prefix matching (Bansal et al. 2023, after Olsson et al. 2022)
measures where a head *attends*; it is correlational. Whether the heads it ranks highest *do*
the work is a causal question, asked here by ablation (as in Olsson et al. 2022's knock-out
experiments and Bansal et al. 2023's pruning by induction score): remove the ``k``
highest-scoring heads and measure what breaks, against the right null, ``k`` heads drawn at
random (any ``k`` heads removed from a model cost something).

Two measures, two registered analyses with one result type, :class:`InductionAblation`:

* ``induction_ablation`` (CLI ``ablate-induction``, :func:`ablate_induction_loss`): on repeated
  random token sequences (BOS + L distinct tokens repeated to ``n_copies`` copies, as the
  prefix-matching scan), each sequence's mean next-token loss on the later copies: every token
  of copies 2.. except the first token of copy 2, which nothing earlier predicts (the scan's
  ``loss_later_copies``).
* ``induction_ablation_task`` (CLI ``ablate-induction-task``, per task and shot count,
  :func:`ablate_induction_accuracy`): per-prompt correctness on an in-context task, on the
  evaluation prompts of the pruning split (the ``eval_n`` prompts after the first ``n``:
  :func:`~mechicl.analyses.pruning.evaluation_prompts`), so the numbers pair with pruning
  curves.

Conditions, for each ``k`` of ``ks``: condition 0 removes the ``k`` heads with the highest
scores (ties: the lower flat index first, as :meth:`~mechicl.results.HeadScores.top_heads`);
conditions ``1..draws`` each remove ``k`` distinct heads drawn uniformly from *all* heads (the
top heads included: the null is "any k heads"), seeded by ``numpy.random.default_rng([seed, k,
draw, 7919])``; plus the unablated model. Heads are zero-ablated (their ``hook_z`` output set to
0, the output bias kept) or mean-ablated (replaced by their mean output over the evaluated
inputs). Every distinct mask of every ``k`` shares each forward pass: the masked copies of a
batch of inputs are row blocks of one pass (:func:`~mechicl.model.masks.stack_hooks`; for the
task, :func:`~mechicl.analyses.evaluation.masked_choice_logprobs`); Python loops only over
forward passes.

Statistics (:meth:`InductionAblation.table`): the random draws' means give a 5-95% band; the
paired difference "top-k minus the mean of the random draws" (per sequence or prompt, so input
difficulty cancels) gets a percentile bootstrap interval over sequences / prompts
(:func:`~mechicl.stats.paired_bootstrap`) and a two-sided bootstrap p-value; ``p_draws`` ranks
the top-k mean among the draws' means.

Axis names: ``k condition item slot layer head pos``.
"""

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from einops import rearrange, repeat
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
    OptionError,
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
from mechicl.analyses.induction import SCAN, SCORE_ALIASES, SCORES, FixedLength, repeated_sequences
from mechicl.analyses.metrics import next_token_nll
from mechicl.analyses.pruning import evaluation_prompts
from mechicl.inputs.tasks import Prompt, Task, resolve_prompts
from mechicl.model.hooked import HookedModel, as_hooked_model
from mechicl.model.masks import (
    ABLATIONS,
    ActivationMeans,
    Mask,
    mean_activations,
    stack_hooks,
)
from mechicl.results import HeadScores, ResultError, read_result, result_type, write_result
from mechicl.stats import paired_bootstrap

__all__ = [
    "DEFAULT_KS",
    "INDUCTION_ABLATION",
    "INDUCTION_ABLATION_TASK",
    "MEASURES",
    "MIN_DRAWS",
    "N_COPIES",
    "InductionAblation",
    "ablate_induction_accuracy",
    "ablate_induction_loss",
    "ablation_difference",
    "ablation_masks",
    "evaluation_sequences",
    "head_sets",
    "random_heads",
    "scan_input",
    "top_heads",
]

DEFAULT_KS: tuple[int, ...] = (5, 10, 27)
"""Head counts ablated by default (27 is 10% of SmolLM2-135M's 270 heads)."""

MIN_DRAWS = 20
"""The fewest random draws per ``k``: fewer make the 5-95% band of the null meaningless."""

MEASURES: tuple[str, ...] = ("later_copy_loss", "accuracy")
"""What an :class:`InductionAblation` holds per item: the mean loss on the later copies of a
repeated sequence (lower is better), or a prompt's 0/1 correctness (higher is better)."""

N_COPIES = 4
"""Copies per repeated sequence in the registered analysis (as the scan's)."""

_DRAW_SALT = 7919  # separates the head draws from other streams seeded by the job's seed


# --------------------------------------------------------------------------------------------
# Head sets
# --------------------------------------------------------------------------------------------


def _check_ks(ks: Sequence[int], n_total: int) -> list[int]:
    ks = [int(k) for k in ks]
    if not ks:
        raise ValueError("ks is empty: give at least one head count")
    bad = [k for k in ks if not 1 <= k <= n_total]
    if bad:
        raise ValueError(f"ks={ks}: {bad} not in 1..{n_total} (the model's number of heads)")
    if len(set(ks)) != len(ks):
        raise ValueError(f"ks={ks} has duplicates")
    return ks


def _check_draws(draws: int) -> None:
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < MIN_DRAWS:
        raise ValueError(f"draws={draws!r}: need an integer >= {MIN_DRAWS} (random head sets "
                         "per k, the null and its 5-95% band)")


def top_heads(scores: Float[Tensor, "layer head"], k: int) -> Int[Tensor, " slot"]:
    """Flat indices (``layer * n_heads + head``) of the ``k`` highest scores, highest first;
    among equal scores the lower index first.

    Args:
        scores: one score per head.
        k: how many heads.

    >>> top_heads(torch.tensor([[0.1, 0.9], [0.5, 0.9]]), 3).tolist()
    [1, 3, 2]
    """
    flat = torch.as_tensor(scores).detach().flatten().cpu()
    if not torch.isfinite(flat).all():
        raise ValueError("the scores contain NaN or inf; cannot rank heads by them")
    _check_ks([k], flat.numel())
    return torch.argsort(flat, descending=True, stable=True)[:k]


def random_heads(n_total: int, k: int, draws: int, seed: int = 0) -> Int[Tensor, "draw slot"]:
    """``draws`` sets of ``k`` distinct heads (flat indices, ascending), each drawn uniformly
    from all ``n_total`` heads by ``numpy.random.default_rng([seed, k, draw, 7919])``: the same
    set for the same arguments, independent across ``k`` and draws.

    Args:
        n_total: the number of heads (``n_layers * n_heads``).
        k: heads per set.
        draws: how many sets.
        seed: the seed.

    >>> random_heads(270, 5, 2, seed=0).shape
    torch.Size([2, 5])
    """
    _check_ks([k], n_total)
    if draws < 0:
        raise ValueError(f"draws={draws} must be >= 0")
    sets = [np.sort(np.random.default_rng([seed, k, d, _DRAW_SALT]).choice(
        n_total, size=k, replace=False)) for d in range(draws)]
    return torch.from_numpy(np.stack(sets) if sets else np.zeros((0, k), dtype=np.int64)).long()


def head_sets(scores: Float[Tensor, "layer head"], ks: Sequence[int], *, draws: int = 20,
              seed: int = 0) -> Int[Tensor, "k condition slot"]:
    """The heads each condition removes: per ``k`` (in the order of ``ks``), condition 0 the
    top ``k`` (:func:`top_heads`), conditions ``1..draws`` random sets (:func:`random_heads`).
    Flat indices; slots past ``k`` hold -1.

    Args:
        scores: one score per head.
        ks: head counts.
        draws: random sets per ``k`` (at least :data:`MIN_DRAWS`).
        seed: seeds the random sets.

    >>> sets = head_sets(torch.arange(8.0).reshape(2, 4), [1, 3], draws=20)
    >>> tuple(sets.shape), sets[0, 0].tolist(), sets[1, 0].tolist()
    ((2, 21, 3), [7, -1, -1], [7, 6, 5])
    """
    scores = torch.as_tensor(scores)
    n_total = scores.numel()
    ks = _check_ks(ks, n_total)
    _check_draws(draws)
    out = torch.full((len(ks), 1 + draws, max(ks)), -1, dtype=torch.long)
    for i, k in enumerate(ks):
        out[i, 0, :k] = top_heads(scores, k)
        out[i, 1:, :k] = random_heads(n_total, k, draws, seed)
    return out


def ablation_masks(model: HookedModel | tuple[int, int], sets: Int[Tensor, "k condition slot"],
                   *, ablation: str = "zero", means: ActivationMeans | None = None,
                   ) -> tuple[list[Mask], Int[Tensor, "k condition"]]:
    """The distinct masks that remove each condition's heads, and which mask each condition
    uses. Mask 0 is the identity (the unablated model); equal head sets share one mask.

    Args:
        model: the model (or its ``(n_layers, n_heads)``).
        sets: flat head indices per ``[k, condition]`` (-1: unused slot), from
            :func:`head_sets`.
        ablation: ``"zero"`` or ``"mean"`` (with ``means``; typed ``str`` so that a runtime
            type checker does not pre-empt the error listing the allowed values).
        means: mean activations for mean ablation.

    >>> masks, index = ablation_masks((2, 4), torch.tensor([[[7, -1], [7, -1]], [[7, 6], [0, 1]]]))
    >>> len(masks), index.tolist(), masks[index[1, 0]].removed_heads
    (4, [[1, 1], [2, 3]], [(1, 2), (1, 3)])
    """
    if not isinstance(model, tuple):
        model = as_hooked_model(model)
    shape = model if isinstance(model, tuple) else (model.n_layers, model.n_heads)
    n_layers, n_heads = shape
    check_choice("ablation", ablation, ABLATIONS)
    masks = [Mask.keep_all(shape, ablation=ablation, means=means)]
    seen = {masks[0].key(): 0}
    index = torch.zeros(sets.shape[:2], dtype=torch.long)
    for i in range(sets.shape[0]):
        for c in range(sets.shape[1]):
            heads = torch.ones(n_layers * n_heads)
            chosen = sets[i, c][sets[i, c] >= 0]
            heads[chosen] = 0.0
            mask = Mask(heads=heads.reshape(n_layers, n_heads), ffn=torch.ones(n_layers),
                        ablation=ablation, means=means)
            key = mask.key()
            if key not in seen:
                seen[key] = len(masks)
                masks.append(mask)
            index[i, c] = seen[key]
    return masks, index


def _as_scores(scores: HeadScores | Tensor, model: HookedModel,
               ) -> tuple[Tensor, str, dict[str, Any]]:
    """The ``[layer, head]`` score table (checked against the model), its name and params."""
    if isinstance(scores, HeadScores):
        t, name, params = scores.mean.double(), scores.name, dict(scores.params)
    else:
        t, name, params = torch.as_tensor(scores).detach().cpu().double(), "custom", {}
        if t.ndim != 2:
            raise ValueError(f"scores must be [layer, head], got shape {tuple(t.shape)}")
    if tuple(t.shape) != (model.n_layers, model.n_heads):
        raise ValueError(f"scores have shape {tuple(t.shape)}, the model has "
                         f"[{model.n_layers}, {model.n_heads}] heads")
    return t, name, params


# --------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------


@result_type
@dataclass(frozen=True, kw_only=True)
class InductionAblation:
    """Top-k vs random-k head ablation: one value per item (sequence or prompt) under each
    condition, for each ``k``.

    Attributes:
        measure: ``"later_copy_loss"`` (per-sequence mean next-token loss on the later copies;
            lower is better) or ``"accuracy"`` (per-prompt 0/1 correctness); see
            :data:`MEASURES`.
        score: the induction score that ranked the heads.
        ks: the head counts, in the order of the first axis.
        values: ``[k, condition, item]``: condition 0 removes the top ``k`` heads, conditions
            ``1..draws`` random sets of ``k``.
        unablated: ``[item]`` the value without ablation.
        heads: ``[k, condition, slot]`` the removed heads as flat indices ``layer * n_heads +
            head`` (-1 in slots past ``k``).
        scores: ``[layer, head]`` the scores the top heads were chosen by.
        tokens: ``[item, pos]`` the repeated sequences (``later_copy_loss`` only).
        params: the settings (score, ks, draws, ablation, seed, inputs).
        model: the model's provenance.
    """

    measure: str
    score: str
    ks: tuple[int, ...]
    values: Float[Tensor, "k condition item"] = field(repr=False)
    unablated: Float[Tensor, " item"] = field(repr=False)
    heads: Int[Tensor, "k condition slot"] = field(repr=False)
    scores: Float[Tensor, "layer head"] = field(repr=False)
    tokens: Int[Tensor, "item pos"] | None = field(default=None, repr=False)
    params: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        check_choice("measure", self.measure, MEASURES)
        object.__setattr__(self, "ks", tuple(int(k) for k in self.ks))
        if self.values.shape[0] != len(self.ks) or self.heads.shape[:2] != self.values.shape[:2]:
            raise ValueError(f"values {tuple(self.values.shape)} and heads "
                             f"{tuple(self.heads.shape)} do not match ks={list(self.ks)}")
        if self.values.shape[1] < 2:
            raise ValueError("values need the top-k condition and at least one random draw")

    @property
    def draws(self) -> int:
        """Random head sets per ``k``."""
        return int(self.values.shape[1]) - 1

    @property
    def n(self) -> int:
        """Items (sequences or prompts)."""
        return int(self.values.shape[2])

    @property
    def higher_is_worse(self) -> bool:
        """True for the loss, False for accuracy: the direction in which ablation hurts."""
        return self.measure == "later_copy_loss"

    def head_list(self, k: int, condition: int = 0) -> list[tuple[int, int]]:
        """The ``(layer, head)`` pairs condition ``condition`` removes at ``k`` (0: the top
        heads, best first; 1..: a random draw)."""
        if k not in self.ks:
            raise ValueError(f"k={k} is not one of this result's ks {list(self.ks)}")
        n_heads = int(self.scores.shape[1])
        flat = self.heads[self.ks.index(k), condition]
        return [(int(i) // n_heads, int(i) % n_heads) for i in flat[flat >= 0]]

    def conditions(self) -> pd.DataFrame:
        """One row per ``(k, condition)``: ``k, condition`` (0 top, 1.. draws), ``kind``
        (``"top"`` / ``"random"``), ``heads`` (``"layer.head"`` separated by spaces) and
        ``value`` (the mean over items)."""
        means = self.values.mean(-1)
        rows = []
        for i, k in enumerate(self.ks):
            for c in range(self.values.shape[1]):
                rows.append({"k": k, "condition": c, "kind": "top" if c == 0 else "random",
                             "heads": " ".join(f"{a}.{b}" for a, b in self.head_list(k, c)),
                             "value": float(means[i, c])})
        return pd.DataFrame(rows)

    def table(self, *, n_resamples: int = 2000, seed: int = 0, level: float = 0.95,
              band: tuple[float, float] = (0.05, 0.95)) -> pd.DataFrame:
        """One row per ``k``: the top-k ablation against the random null, with intervals.

        Columns: ``k, measure, score, unablated`` (the mean without ablation), ``top`` (the
        mean with the top ``k`` heads removed), ``random_mean`` (the mean over draws and items),
        ``random_low, random_high`` (the ``band`` quantiles of the draws' means: the spread of
        the null over head sets), ``diff`` (``top - random_mean``; per item the top value minus
        the mean over draws, so it is paired), ``diff_low, diff_high`` (its ``level`` percentile
        bootstrap interval over items), ``p`` (two-sided bootstrap p-value of ``diff = 0``),
        ``p_draws`` (``(1 + draws at least as harmful as the top heads) / (1 + draws)``, harmful
        meaning a higher loss or a lower accuracy), ``top_vs_unablated, top_vs_unablated_low,
        top_vs_unablated_high`` (``top - unablated``, paired, with its interval),
        ``random_vs_unablated``, ``draws, n, n_resamples, level``.

        Args:
            n_resamples: bootstrap resamples of the items (one resampling shared by every
                ``k``).
            seed: seeds the resamples (:func:`~mechicl.stats.bootstrap_weights`).
            level: coverage of the intervals.
            band: the quantiles of the draws' means that bound the null's band.
        """
        v = self.values.double().numpy()  # [k, condition, item]
        base = self.unablated.double().numpy()  # [item]
        top, rnd = v[:, 0], v[:, 1:].mean(1)  # [k, item] each
        draw_means = v[:, 1:].mean(-1)  # [k, draw]
        diff = paired_bootstrap(top, rnd, n_resamples=n_resamples, seed=seed, level=level)
        effect = paired_bootstrap(top, base[None], n_resamples=n_resamples, seed=seed,
                                  level=level)
        rows = []
        for i, k in enumerate(self.ks):
            top_mean = float(top[i].mean())
            harmful = (draw_means[i] >= top_mean - 1e-12 if self.higher_is_worse
                       else draw_means[i] <= top_mean + 1e-12)
            rows.append({
                "k": k, "measure": self.measure, "score": self.score,
                "unablated": float(base.mean()), "top": top_mean,
                "random_mean": float(rnd[i].mean()),
                "random_low": float(np.quantile(draw_means[i], band[0])),
                "random_high": float(np.quantile(draw_means[i], band[1])),
                "diff": float(diff.estimate[i]), "diff_low": float(diff.low[i]),
                "diff_high": float(diff.high[i]),
                "p": float(diff.p_two_sided[i]),
                "p_draws": float((1 + harmful.sum()) / (1 + self.draws)),
                "top_vs_unablated": float(effect.estimate[i]),
                "top_vs_unablated_low": float(effect.low[i]),
                "top_vs_unablated_high": float(effect.high[i]),
                "random_vs_unablated": float(rnd[i].mean() - base.mean()),
                "draws": self.draws, "n": self.n, "n_resamples": n_resamples, "level": level})
        return pd.DataFrame(rows)

    def to_dataframe(self) -> pd.DataFrame:
        """:meth:`table` with its defaults."""
        return self.table()

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write as a folder (:func:`~mechicl.results.write_result`: the tensors in
        ``tensors.safetensors``), atomically."""
        tensors = {"values": self.values.double(), "unablated": self.unablated.double(),
                   "heads": self.heads.long(), "scores": self.scores.double()}
        if self.tokens is not None:
            tensors["tokens"] = self.tokens.long()
        return write_result(path, kind="InductionAblation", params=self.params,
                            model=self.model, tensors=tensors,
                            fields={"measure": self.measure, "score": self.score,
                                    "ks": list(self.ks)})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "InductionAblation":
        """Read a result written by :meth:`save`, verified
        (:func:`~mechicl.results.read_result`)."""
        folder = read_result(path, "InductionAblation")
        t, f = folder.tensors, folder.fields
        missing = [n for n in ("values", "unablated", "heads", "scores") if n not in t]
        if missing:
            raise ResultError(f"{path}: tensors {missing} are missing; recompute the result")
        try:
            return cls(measure=f["measure"], score=f["score"], ks=tuple(f["ks"]),
                       values=t["values"], unablated=t["unablated"], heads=t["heads"],
                       scores=t["scores"], tokens=t.get("tokens"), params=folder.params,
                       model=folder.model)
        except (KeyError, ValueError) as err:
            raise ResultError(f"{path}: inconsistent InductionAblation ({err}); recompute the "
                              "result") from None


def ablation_difference(a: InductionAblation, b: InductionAblation, *,
                        n_resamples: int = 2000, seed: int = 0,
                        level: float = 0.95) -> pd.DataFrame:
    """Compare two runs of the same causal check on the same items, e.g. zero against mean
    ablation: per ``k``, ``a``'s value minus ``b``'s, paired over items.

    Both must have removed the same heads from the same items (the same ranking, ``ks``,
    draws, seed and inputs; only how a head is removed may differ), which is checked: the same
    ``heads``, ``tokens`` and unablated values.

    Columns: ``k, measure, top_a, top_b, top_diff, top_diff_low, top_diff_high, top_p`` (the
    top-``k`` heads removed: means under ``a`` and ``b``, the mean per-item difference
    ``a - b`` with its ``level`` percentile bootstrap interval over items and a two-sided
    bootstrap p-value), ``random_a, random_b, random_diff, random_diff_low, random_diff_high,
    random_p`` (the same for the per-item mean over the random draws), ``ablation_a,
    ablation_b, n, n_resamples, level``.

    Args:
        a, b: the two results.
        n_resamples: bootstrap resamples of the items (one resampling shared by every row).
        seed: seeds the resamples (:func:`~mechicl.stats.bootstrap_weights`).
        level: coverage of the intervals.

    Raises:
        ValueError: the two results did not remove the same heads from the same items.

    >>> import torch
    >>> def run(values, ablation):
    ...     return InductionAblation(
    ...         measure="later_copy_loss", score="prefix_matching", ks=(1,),
    ...         values=torch.tensor([[values, [1.0, 1.0, 1.0]]]), unablated=torch.ones(3),
    ...         heads=torch.tensor([[[0], [1]]]), scores=torch.zeros(1, 2),
    ...         params={"ablation": ablation})
    >>> t = ablation_difference(run([5.0, 6.0, 7.0], "zero"), run([2.0, 3.0, 4.0], "mean"))
    >>> t[["k", "top_a", "top_b", "top_diff", "random_diff"]].to_dict("records")
    [{'k': 1, 'top_a': 6.0, 'top_b': 3.0, 'top_diff': 3.0, 'random_diff': 0.0}]
    """
    if a.measure != b.measure or a.ks != b.ks or a.values.shape != b.values.shape:
        raise ValueError(f"the results measure different things: {a.measure} ks={a.ks} "
                         f"{tuple(a.values.shape)} against {b.measure} ks={b.ks} "
                         f"{tuple(b.values.shape)}")
    if not torch.equal(a.heads, b.heads):
        raise ValueError("the results removed different heads (another ranking, seed or "
                         "number of draws): not a paired comparison")
    if (a.tokens is None) != (b.tokens is None) or (
            a.tokens is not None and not torch.equal(a.tokens, b.tokens)):
        raise ValueError("the results were measured on different sequences")
    if not torch.allclose(a.unablated, b.unablated, rtol=1e-4, atol=1e-4):
        raise ValueError("the results' unablated values differ: not the same items")
    va, vb = a.values.double().numpy(), b.values.double().numpy()  # [k, condition, item]
    pairs = np.stack([va[:, 0], va[:, 1:].mean(1)]), np.stack([vb[:, 0], vb[:, 1:].mean(1)])
    boot = paired_bootstrap(pairs[0], pairs[1], n_resamples=n_resamples, seed=seed,
                            level=level)  # conditions: [top, random] x k, flattened
    n_k = len(a.ks)
    rows = []
    for i, k in enumerate(a.ks):
        row: dict[str, Any] = {"k": k, "measure": a.measure}
        for j, name in enumerate(("top", "random")):
            c = j * n_k + i
            row |= {f"{name}_a": float(pairs[0][j, i].mean()),
                    f"{name}_b": float(pairs[1][j, i].mean()),
                    f"{name}_diff": float(boot.estimate[c]),
                    f"{name}_diff_low": float(boot.low[c]),
                    f"{name}_diff_high": float(boot.high[c]),
                    f"{name}_p": float(boot.p_two_sided[c])}
        rows.append(row | {"ablation_a": a.params.get("ablation", "zero"),
                           "ablation_b": b.params.get("ablation", "zero"), "n": a.n,
                           "n_resamples": n_resamples, "level": level})
    return pd.DataFrame(rows)


def _result(model: HookedModel, per_mask: Tensor, index: Tensor, sets: Tensor, *,
            measure: str, score: str, ks: Sequence[int], scores: Tensor,
            tokens: Tensor | None, params: dict[str, Any]) -> InductionAblation:
    """Scatter per-mask values ``[mask, item]`` back to ``[k, condition, item]``."""
    return InductionAblation(measure=measure, score=score, ks=tuple(ks),
                             values=per_mask[index].double(), unablated=per_mask[0].double(),
                             heads=sets, scores=scores, tokens=tokens,
                             params={**params, "distinct_masks": int(per_mask.shape[0])},
                             model=model.info())


# --------------------------------------------------------------------------------------------
# Later-copy loss on repeated sequences
# --------------------------------------------------------------------------------------------


def evaluation_sequences(model: HookedModel, *, n_seeds: int = 20, length: int = 25,
                         n_copies: int = 4, skip: int = 0, seed: int = 0,
                         ) -> Int[Tensor, "item pos"]:
    """The repeated sequences the loss is measured on: those of
    :func:`~mechicl.analyses.induction.repeated_sequences` (same seed, same token pool) at seed
    indices ``skip .. skip + n_seeds - 1``, each with ``length`` distinct tokens, so that they
    are never the sequences a scan of ``skip`` seeds ranked the heads on.

    Args:
        model: the model (its BOS token and frequency ranking).
        n_seeds: how many sequences.
        length: L, distinct tokens per copy.
        n_copies: copies of the L tokens.
        skip: seed indices left out (a scan's ``n_seeds``).
        seed: the token draws' seed (the scan's).

    Returns:
        ``[item, 1 + n_copies * length]`` tokens.
    """
    if n_seeds < 1 or skip < 0 or length < 2:
        raise ValueError(f"n_seeds={n_seeds} must be >= 1, skip={skip} >= 0 and "
                         f"length={length} >= 2")
    seqs = repeated_sequences(model, n_seeds=skip + n_seeds, seed=seed, n_copies=n_copies,
                              length=FixedLength(length))[skip:]
    return torch.stack(seqs)


def _later_copy_losses(model: HookedModel, tokens: Tensor, length: int, masks: Sequence[Mask],
                       batch_tokens: int, progress: bool) -> Float[Tensor, "mask item"]:
    """Per sequence and mask, the mean loss on the later copies; each pass holds every mask's
    copy of a few sequences (or, when they do not fit, some masks' copies of one)."""
    n_items, width = tokens.shape
    start = length + 1  # logits at position i predict token i + 1; i = L predicts copy 2's first
    rows_per_pass = max(1, device_batch_tokens(model.device, batch_tokens) // width)
    items_per_pass = max(1, rows_per_pass // len(masks))
    passes = []  # (first item, first mask, end mask): every mask of the items, if they fit
    for lo in range(0, n_items, items_per_pass):
        per_pass = max(1, rows_per_pass // min(items_per_pass, n_items - lo))
        passes += [(lo, m, min(len(masks), m + per_pass)) for m in range(0, len(masks), per_pass)]
    out = torch.zeros(len(masks), n_items, dtype=torch.float64)
    for lo, m_lo, m_hi in tqdm(passes, desc="ablation", disable=not progress, unit="pass"):
        batch = tokens[lo: lo + items_per_pass].to(model.device)  # [item, pos]
        chunk = masks[m_lo:m_hi]
        rows = repeat(batch, "item pos -> (mask item) pos", mask=len(chunk))
        hooks = stack_hooks(model, chunk, rows_per_mask=batch.shape[0])
        with torch.no_grad():
            # only the positions that predict a later-copy token are unembedded
            logits = model.run_with_hooks(rows, fwd_hooks=hooks, return_type="logits",
                                          logits_to_keep=width - start)[:, :-1]
            nll = next_token_nll(logits, rows[:, start + 1:])  # [(mask item), later]
            del logits  # else this pass's logits stay alive through the next pass
        out[m_lo:m_hi, lo: lo + batch.shape[0]] = rearrange(
            nll.double().mean(-1).cpu(), "(mask item) -> mask item", mask=len(chunk))
    return out


def ablate_induction_loss(
    model: HookedModel, scores: HeadScores | Float[Tensor, "layer head"], *,
    ks: Sequence[int] = DEFAULT_KS, draws: int = 20, ablation: str = "zero",
    n_seeds: int = 20, length: int = 25, n_copies: int = 4, skip: int = 0, seed: int = 0,
    means: ActivationMeans | None = None, batch_tokens: int = 4096, progress: bool = False,
) -> InductionAblation:
    """Later-copy loss on repeated random sequences with the top-k heads of ``scores`` removed,
    and with ``draws`` random sets of k heads removed, for each k of ``ks``.

    Args:
        model: a :class:`~mechicl.HookedModel` or bridge.
        scores: the ranking: e.g. a scan's ``scores["prefix_matching"]``, or ``[layer,
            head]`` numbers (higher = more induction-like).
        ks: head counts.
        draws: random head sets per k (at least :data:`MIN_DRAWS`).
        ablation: ``"zero"`` or ``"mean"`` (means over the evaluated sequences unless
            ``means`` is given).
        n_seeds: repeated sequences (:func:`evaluation_sequences`).
        length: distinct tokens per copy.
        n_copies: copies per sequence.
        skip: sequence seed indices left out (the ranking scan's ``n_seeds``).
        seed: seeds the sequences and the random head sets.
        means: mean activations for mean ablation.
        batch_tokens: rows x sequence length per forward pass, counting every masked copy.
        progress: show a progress bar.

    Returns:
        An :class:`InductionAblation` with ``measure="later_copy_loss"``.

    >>> scan = mechicl.induction_scan(model, scores=["prefix_matching"], n_seeds=2, length=5,
    ...                               progress=False)
    >>> result = ablate_induction_loss(model, scan.scores["prefix_matching"], ks=[2], n_seeds=3,
    ...                                length=5, skip=2)
    >>> top = scan.scores["prefix_matching"].top_heads(2)
    >>> tuple(result.values.shape), result.head_list(2) == top
    ((1, 21, 3), True)
    """
    model = as_hooked_model(model)
    check_choice("ablation", ablation, ABLATIONS)
    table, name, score_params = _as_scores(scores, model)
    sets = head_sets(table, ks, draws=draws, seed=seed)
    tokens = evaluation_sequences(model, n_seeds=n_seeds, length=length, n_copies=n_copies,
                                  skip=skip, seed=seed)
    if ablation == "mean" and means is None:
        means = mean_activations(model, tokens, batch_tokens=batch_tokens)
    masks, index = ablation_masks(model, sets, ablation=ablation, means=means)
    per_mask = _later_copy_losses(model, tokens, length, masks, batch_tokens, progress)
    params = {"measure": "later_copy_loss", "score": name, "ks": [int(k) for k in ks],
              "draws": draws, "ablation": ablation, "seed": seed, "n_seeds": n_seeds,
              "length": length, "n_copies": n_copies, "skip": skip,
              "later_copies": "tokens of copies 2.., but the first of copy 2",
              "ranking": model.frequency_ranking.method, "scores_params": score_params}
    return _result(model, per_mask, index, sets, measure="later_copy_loss", score=name, ks=ks,
                   scores=table, tokens=tokens.cpu(), params=params)


# --------------------------------------------------------------------------------------------
# Accuracy on an in-context task
# --------------------------------------------------------------------------------------------


def ablate_induction_accuracy(
    model: HookedModel, scores: HeadScores | Float[Tensor, "layer head"],
    task: Task | str | None = None, *, shots: int = 5, prompts: Sequence[Prompt] | None = None,
    n: int | None = None, ks: Sequence[int] = DEFAULT_KS, draws: int = 20,
    ablation: str = "zero", seed: int = 0, means: ActivationMeans | None = None,
    normalization: NormalizationChoice = "task", batch_tokens: int = 4096,
    progress: bool = False,
) -> InductionAblation:
    """Per-prompt correctness on ``task`` at ``shots`` with the top-k heads of ``scores``
    removed, and with ``draws`` random sets of k heads removed, for each k of ``ks``.

    Choices are ranked as :func:`~mechicl.evaluate` ranks them (by default the task's own
    normalization: summed log-likelihood, or per character for ``acc_norm`` tasks), all masks
    together (:func:`~mechicl.analyses.evaluation.masked_choice_logprobs`).

    Args:
        model: a :class:`~mechicl.HookedModel` or bridge.
        scores: the ranking (see :func:`ablate_induction_loss`).
        task: the task (or give ``prompts``).
        shots: demonstrations per prompt.
        prompts: the prompts to evaluate (e.g. those of
            :func:`~mechicl.analyses.pruning.split_prompts`).
        n: without ``prompts``: the first ``n`` seeded prompts (default all).
        ks: head counts.
        draws: random head sets per k (at least :data:`MIN_DRAWS`).
        ablation: ``"zero"`` or ``"mean"`` (means over the prompts with their gold answers
            unless ``means`` is given).
        seed: seeds the prompts (without ``prompts``) and the random head sets.
        means: mean activations for mean ablation.
        normalization: how the choices are ranked (``"task"``, ``"none"``, ``"tokens"`` or
            ``"chars"``; see :func:`~mechicl.evaluate`).
        batch_tokens: tokens per forward pass, counting every masked copy.
        progress: show a progress bar.

    Returns:
        An :class:`InductionAblation` with ``measure="accuracy"``.
    """
    model = as_hooked_model(model)
    check_choice("ablation", ablation, ABLATIONS)
    rule = resolve_normalization(normalization, task)
    table, name, score_params = _as_scores(scores, model)
    sets = head_sets(table, ks, draws=draws, seed=seed)
    task_name, prompt_list = resolve_prompts(task, prompts, shots=shots, n=n, seed=seed)
    if not prompt_list:
        raise ValueError("no prompts to evaluate")
    if ablation == "mean" and means is None:
        means = prompt_means(model, prompt_list, batch_tokens=batch_tokens)
    masks, index = ablation_masks(model, sets, ablation=ablation, means=means)
    loglik, n_tok = masked_choice_logprobs(model, prompt_list, masks, batch_tokens=batch_tokens,
                                           progress=progress)  # [mask, example, choice]
    score = choice_scores(loglik, n_tok, choice_chars(prompt_list), rule)
    gold = torch.tensor([p.gold for p in prompt_list])
    correct = (score.argmax(-1) == gold).double()  # [mask, example]
    params = {"measure": "accuracy", "score": name, "ks": [int(k) for k in ks], "draws": draws,
              "ablation": ablation, "seed": seed, "task": task_name, "shots": shots,
              "normalization": rule,
              "n": len(prompt_list), "prompt_ids": [p.id for p in prompt_list],
              "chance": float(np.mean([1.0 / len(p.continuations) for p in prompt_list])),
              "scores_params": score_params}
    return _result(model, correct, index, sets, measure="accuracy", score=name, ks=ks,
                   scores=table, tokens=None, params=params)


# --------------------------------------------------------------------------------------------
# The registered analyses
# --------------------------------------------------------------------------------------------


def _parse_score(text: str) -> str:
    name = text.strip()
    if name not in SCORE_ALIASES:
        raise OptionError(f"--score {text!r} is not an induction score; allowed: "
                          f"{sorted(SCORE_ALIASES)}")
    return SCORE_ALIASES[name]


def scan_input(job: Job) -> dict[str, Job]:
    """The scan whose ``score`` ranks the heads (``scan_seeds`` sequences, ``scan_length``),
    with the job's seed: the scan a pruning job by that score reads too."""
    o = job.options
    return {"scan": SCAN.job(job.model, {"scores": [o["score"]], "n_seeds": o["scan_seeds"],
                                         "length": o["scan_length"]}, seed=job.seed)}


def _scores(call: Call) -> HeadScores:
    return call.inputs["scan"].scores[call.options["score"]]


def _run_loss(call: Call) -> InductionAblation:
    o = call.options
    return ablate_induction_loss(call.model, _scores(call), ks=o["ks"], draws=o["draws"],
                                 ablation=o["ablation"], n_seeds=o["n_seeds"],
                                 length=o["length"], skip=o["scan_seeds"], seed=call.seed,
                                 progress=call.progress, **call.batch())


def _run_task(call: Call) -> InductionAblation:
    o = call.options
    return ablate_induction_accuracy(call.model, _scores(call), call.task, shots=call.shots,
                                     prompts=evaluation_prompts(call.task, call.job),
                                     ks=o["ks"], draws=o["draws"], ablation=o["ablation"],
                                     seed=call.seed, progress=call.progress, **call.batch())


def _outputs(pairs: Sequence[tuple[Job, InductionAblation]],
             options: Mapping[str, Any]) -> Outputs:
    results, rows = {}, []
    for job, result in pairs:
        results[job_stem(job, "ablate", result.score)] = result
        where = {"task": job.task, "shots": job.shots} if job.task is not None else {}
        rows += [{**where, **row} for row in result.table().to_dict("records")]
    return Outputs(results=results, rows=rows)


_COMMON = (
    Option(name="score", type=str, default="prefix_matching", choices=SCORES,
           parse=_parse_score,
           help="the induction score whose top heads are ablated (aliases: prefix, copying, ...)"),
    Option(name="ks", type=list, item=int, default=list(DEFAULT_KS), minimum=1, sort=True,
           help="head counts k, comma-separated"),
    Option(name="draws", type=int, default=20, minimum=MIN_DRAWS,
           help="random sets of k heads per k: the null"),
    Option(name="ablation", type=str, default="zero", choices=ABLATIONS,
           help="zero the removed heads' outputs, or replace them by their mean"),
    Option(name="scan_seeds", type=int, default=100, minimum=1,
           help="random sequences of the scan that ranks the heads"),
    Option(name="scan_length", type=int, default=None, nullable=True, minimum=2,
           help="one sequence length for that scan (default 2s + 25)"),
)
_BATCH = batch_tokens_option(
    help="rows x longest row per forward pass, counting every masked copy")

INDUCTION_ABLATION = register_analysis(Analysis(
    name="induction_ablation", command="ablate-induction",
    help="later-copy loss on repeated sequences with the top-k induction heads ablated vs k "
         "random heads",
    run=_run_loss, result_type=InductionAblation, memory="forward", inputs=scan_input,
    outputs=_outputs,
    sequence_length=lambda model, job, task: 1 + N_COPIES * job.options["length"],
    options=(*_COMMON,
             Option(name="n_seeds", type=int, default=20, minimum=1,
                    help="repeated random sequences the loss is measured on (after the scan's)"),
             Option(name="length", type=int, default=25, minimum=2,
                    help="distinct tokens per copy of those sequences (4 copies)"),
             _BATCH),
))

INDUCTION_ABLATION_TASK = register_analysis(Analysis(
    name="induction_ablation_task", command="ablate-induction-task",
    help="ICL accuracy with the top-k induction heads ablated vs k random heads",
    run=_run_task, result_type=InductionAblation, per_task=True, shots=(5,), memory="choices",
    inputs=scan_input, outputs=_outputs,
    sequence_length=lambda model, job, task: longest_choice_row(model, evaluation_prompts(task, job)),
    options=(*_COMMON,
             Option(name="n", type=int, default=50, minimum=0,
                    help="prompts left out first (a pruning job's ranking prompts)"),
             Option(name="eval_n", type=int, default=50, minimum=1,
                    help="evaluated prompts (the next ones)"),
             _BATCH),
))
