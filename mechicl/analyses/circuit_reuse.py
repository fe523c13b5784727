"""Circuit reuse across tasks: the IOI circuit's components on Colored Objects (issue 23 §3).

Merullo, Eickhoff & Pavlick (2024, "Circuit Component Reuse Across Tasks in Transformer Language
Models", ICLR) find that GPT-2 solves BIG-bench's "reasoning about colored objects" with largely
the same heads, in the same roles, as the indirect-object-identification (IOI) circuit of Wang
et al. (2022, "Interpretability in the Wild"). This module asks the same question of any model,
on the prompt pairs of :func:`~mechicl.inputs.pairs.ioi_pairs` and
:func:`~mechicl.inputs.pairs.colored_objects_pairs`:

1. **Per-head effects, per task**, each kept per prompt pair (metric: the clean answer's logit
   minus the wrong answer's, ``logit_diff``):

   - ``activation``: activation patching of each head's output (``hook_z``), denoising
     (:func:`~mechicl.analyses.patching.patch`); per pair ``patched - corrupted``.
   - ``direct``: path patching to the logits, noising, Wang et al.'s direction
     (:func:`~mechicl.analyses.path_patching.path_patch`, ``receivers="logits"``); per pair
     ``clean - patched``: positive where the head's direct path carries the clean answer.
   - ``inhibition``: path patching to the name movers' queries (``receiver_input="q"``), noising;
     per pair ``clean - patched`` (NaN for heads at or above the highest name mover's layer,
     and for every head when a task has no name mover).

   Each is normalised by the clean-corrupted gap as a ratio of means over pairs,
   ``effect = sum_p w_p e_p / sum_p w_p (clean_p - corrupted_p)`` (``w = 1``: the observed
   value, equal to :func:`~mechicl.analyses.patching.patch`'s ``normalize=True``), so the two
   tasks share a scale: 1 is the whole gap.

2. **Attention**, from the clean prompts' ``hook_pattern`` (one forward per prompt, every head
   at once), at four query -> key position pairs (:data:`ATTENTION`): end -> answer token,
   end -> second occurrence, second -> first occurrence, second -> token after the first.
   The positions per task (:func:`role_positions`): IOI's answer is IO, its repeated token S
   (S1 first, S2 second); in Colored Objects the answer is the queried object's colour in the
   list, the repeated token the queried object (first in the list, right after its colour;
   second in the question).

3. **Roles** (:func:`assign_roles`, thresholds ``tau_e`` = ``effect_threshold`` and ``tau_a``
   = ``attention_threshold``): name mover: ``direct >= tau_e`` and ``end_to_answer >= tau_a``;
   negative name mover: ``direct <= -tau_e`` and ``end_to_answer >= tau_a``; S-inhibition:
   ``inhibition >= tau_e``; duplicate token: ``second_to_first >= tau_a``; induction:
   ``second_to_after_first >= tau_a``. The name movers found on the full data are the receivers
   of the ``inhibition`` path patching.

4. **Reuse statistics** (:func:`reuse_tables`): for the ``activation`` and ``direct`` maps, the
   top-k overlap of ``|effect|`` (:func:`~mechicl.analyses.overlap.top_k_overlap`), Spearman's
   rho and the within-layer Spearman of the signed effects, each with its plain and its
   layer-preserving permutation null (:func:`~mechicl.analyses.overlap.permutation_null`); for
   each role, the number of heads holding it in both tasks against the count expected when the
   heads of the second task are relabelled within their layers
   (:func:`~mechicl.analyses.overlap.layer_permutations`) and against the hypergeometric count.
   Every number has a percentile bootstrap interval over prompt pairs
   (:func:`~mechicl.stats.bootstrap_weights`; the two tasks' pairs are resampled
   independently; the name movers that receive the inhibition paths stay fixed).

The registered analysis ``circuit_reuse`` (CLI ``circuit-reuse``) runs it on ``n`` pairs of
each task and writes the three tables, side-by-side heatmaps and a scatter of the two tasks'
effects with the roles marked.

Axis names: ``layer head pair resample effect kind role permutation``.
"""

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from einops import einsum, rearrange
from jaxtyping import Bool, Float, Int
from plotly.subplots import make_subplots
from torch import Tensor

from mechicl.analyses._engine import capture
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
from mechicl.analyses.overlap import (
    layer_permutations,
    percentile_intervals,
    permutation_null,
    permutation_pvalue,
    spearman,
    spearman_rows,
    top_k,
    top_k_overlap,
    top_k_overlap_rows,
    top_k_pvalue,
    within_layer_spearman,
    within_layer_spearman_rows,
)
from mechicl.analyses.patching import patch
from mechicl.analyses.path_patching import path_patch
from mechicl.inputs.pairs import PromptPairs, make_pairs
from mechicl.model.hooked import HookedModel, as_hooked_model
from mechicl.plotting import score_scatter
from mechicl.results import ResultError, read_result, result_type, write_result
from mechicl.stats import bootstrap_weights

logger = logging.getLogger(__name__)

__all__ = [
    "ATTENTION",
    "CIRCUIT_REUSE",
    "COMPARED",
    "EFFECTS",
    "ROLES",
    "TASK_NAMES",
    "CircuitReuse",
    "TaskCircuit",
    "assign_roles",
    "attention_scores",
    "circuit_reuse",
    "effect_draws",
    "reuse_figures",
    "reuse_tables",
    "role_positions",
    "task_circuit",
]

TASK_NAMES: tuple[str, ...] = ("ioi", "colored_objects")
"""The prompt-pair generators whose role analogues are defined (:func:`role_positions`)."""

EFFECTS: tuple[str, ...] = ("activation", "direct", "inhibition")
"""The per-head effects, in the order of :attr:`TaskCircuit.effects`' first axis."""

COMPARED: tuple[str, ...] = ("activation", "direct")
"""The effects whose maps are compared across tasks (``inhibition`` depends on each task's own
name movers, so its maps are not comparable)."""

ATTENTION: tuple[str, ...] = ("end_to_answer", "end_to_second", "second_to_first",
                              "second_to_after_first")
"""The attention probabilities read, as ``query_to_key`` (:func:`role_positions`' names)."""

ROLES: tuple[str, ...] = ("name_mover", "negative_name_mover", "s_inhibition",
                          "duplicate_token", "induction")
"""The roles of Wang et al.'s IOI circuit, in the order of :func:`assign_roles`' role axis."""

INTERVAL = "percentile bootstrap over prompt pairs (tasks resampled independently)"


# --------------------------------------------------------------------------------------------
# Positions and attention
# --------------------------------------------------------------------------------------------


def role_positions(pairs: PromptPairs) -> dict[str, Int[Tensor, " pair"]]:
    """The positions the role criteria read, per pair: ``end`` (the scored position),
    ``answer`` (the answer token in the context), ``first`` / ``second`` (the first and
    second occurrence of the repeated token) and ``after_first`` (``first + 1``).

    IOI (``"ioi"`` pairs): answer = IO, first = S1, second = S2. Colored Objects
    (``"colored_objects"``): answer = the queried object's colour in the list, first = the
    queried object in the list (the token after its colour), second = the object in the
    question.

    Raises:
        ValueError: pairs of another generator, without the named positions, or (Colored
            Objects) whose listed object is not the queried token.

    >>> pairs = mechicl.ioi_pairs(model, 2, templates="BABA", names=[f"w{i}" for i in range(9)])
    >>> pos = role_positions(pairs)
    >>> bool((pos["first"] == pairs.positions["S1"]).all()), sorted(pos)
    (True, ['after_first', 'answer', 'end', 'first', 'second'])
    """
    names = {"ioi": ("IO", "S1", "S2"), "colored_objects": ("answer_color", "queried")}
    if pairs.name not in names:
        raise ValueError(f"role analogues are defined for pairs named {list(TASK_NAMES)}; got "
                         f"pairs named {pairs.name!r}")
    missing = [k for k in names[pairs.name] if k not in pairs.positions]
    if missing:
        raise ValueError(f"{pairs.name} pairs lack the positions {missing}; they have "
                         f"{sorted(pairs.positions)}")
    p = pairs.positions
    if pairs.name == "ioi":
        answer, first, second = p["IO"], p["S1"], p["S2"]
    else:
        answer, second = p["answer_color"], p["queried"]
        first = answer + 1
        rows = torch.arange(len(pairs))
        bad = (first >= pairs.lengths) | (first >= second)
        same = torch.zeros_like(bad)
        same[~bad] = pairs.clean[rows[~bad], first[~bad]] == pairs.clean[rows[~bad], second[~bad]]
        wrong = (~same).nonzero().flatten().tolist()
        if wrong:
            raise ValueError(f"colored_objects pair {wrong[0]}: the token after the answer colour "
                             f"(position {int(first[wrong[0]])}) is not the queried object "
                             f"(position {int(second[wrong[0]])}): {pairs.clean_text[wrong[0]]!r}")
    after = first + 1
    if bool((after >= pairs.lengths).any()):
        raise ValueError(f"{pairs.name}: the token after the first occurrence is beyond a prompt")
    return {"end": pairs.answer_pos.clone(), "answer": answer.clone(), "first": first.clone(),
            "second": second.clone(), "after_first": after}


def attention_scores(model: HookedModel, pairs: PromptPairs,
                     positions: Mapping[str, Int[Tensor, " pair"]] | None = None,
                     ) -> Float[Tensor, "kind layer head pair"]:
    """Every head's attention probability at the :data:`ATTENTION` position pairs on each clean
    prompt: one forward pass per prompt with the ``hook_pattern`` of every layer, read at the
    four ``(query, key)`` positions for all layers and heads at once.

    Args:
        model: the model.
        pairs: the prompt pairs (their clean prompts are run).
        positions: :func:`role_positions` (computed if None).

    Returns:
        ``[kind, layer, head, pair]``, kinds in the order of :data:`ATTENTION`.

    >>> pairs = mechicl.ioi_pairs(model, 2, templates="BABA", names=[f"w{i}" for i in range(9)])
    >>> attention_scores(model, pairs).shape  # 2 layers, 4 heads
    torch.Size([4, 2, 4, 2])
    """
    model = as_hooked_model(model)
    pos = role_positions(pairs) if positions is None else positions
    names = [model.hook_name("pattern", layer) for layer in range(model.n_layers)]
    out = torch.empty(len(ATTENTION), model.n_layers, model.n_heads, len(pairs),
                      dtype=torch.float64)
    for i in range(len(pairs)):
        _, cache = capture(model, pairs.clean_tokens(i), set(names))
        pattern = torch.stack([cache[n][0] for n in names])  # [layer, head, query, key]
        query = torch.tensor([int(pos[q][i]) for q in ("end", "end", "second", "second")])
        key = torch.tensor([int(pos[k][i]) for k in ("answer", "second", "first", "after_first")])
        out[..., i] = rearrange(pattern[:, :, query, key].double().cpu(),
                                "layer head kind -> kind layer head")
    return out


# --------------------------------------------------------------------------------------------
# Effects, draws and roles
# --------------------------------------------------------------------------------------------


def effect_draws(per_pair: Float[Tensor, "effect layer head pair"], gap: Float[Tensor, " pair"],
                 weights: Float[Tensor, "resample pair"]) -> Float[Tensor, "resample effect layer head"]:
    """Normalised effects under pair weights: ``sum_p w_p e_p / sum_p w_p gap_p`` for every
    effect and head at once (a row of ones: the observed values; bootstrap counts: a resample).

    >>> per_pair = torch.tensor([1.0, 3.0]).reshape(1, 1, 1, 2)
    >>> effect_draws(per_pair, torch.tensor([2.0, 2.0]), torch.ones(1, 2)).flatten().tolist()
    [1.0]
    """
    num = einsum(per_pair.double(), weights.double(), "e l h p, r p -> r e l h")
    return num / (weights.double() @ gap.double())[:, None, None, None]


def attention_draws(attention: Float[Tensor, "kind layer head pair"],
                    weights: Float[Tensor, "resample pair"]) -> Float[Tensor, "resample kind layer head"]:
    """Mean attention under pair weights, ``sum_p w_p a_p / sum_p w_p``."""
    num = einsum(attention.double(), weights.double(), "k l h p, r p -> r k l h")
    return num / weights.double().sum(-1)[:, None, None, None]


def assign_roles(effects: Float[Tensor, "resample effect layer head"],
                 attention: Float[Tensor, "resample kind layer head"], *,
                 effect_threshold: float, attention_threshold: float,
                 ) -> Bool[Tensor, "resample role layer head"]:
    """The :data:`ROLES` of every head (see the module docstring for the criteria), for every
    row of effects and attention at once. NaN effects hold no role.

    >>> eff = torch.zeros(1, 3, 1, 2); eff[0, 1] = torch.tensor([[0.2, -0.2]])
    >>> att = torch.zeros(1, 4, 1, 2); att[0, 0] = 0.5
    >>> roles = assign_roles(eff, att, effect_threshold=0.1, attention_threshold=0.3)
    >>> roles[0, :2, 0].tolist()  # head 0 moves the answer, head 1 writes against it
    [[True, False], [False, True]]
    """
    _, direct, inhibition = effects.unbind(1)
    end_to_answer, _, second_to_first, second_to_after = attention.unbind(1)
    attends = end_to_answer >= attention_threshold
    return torch.stack([(direct >= effect_threshold) & attends,
                        (direct <= -effect_threshold) & attends,
                        inhibition >= effect_threshold,
                        second_to_first >= attention_threshold,
                        second_to_after >= attention_threshold], dim=1)


@dataclass(frozen=True, kw_only=True)
class TaskCircuit:
    """One task's per-pair measurements (part of :class:`CircuitReuse`).

    Attributes:
        task: the pairs' generator (``"ioi"`` or ``"colored_objects"``).
        clean: ``[pair]`` the clean runs' logit difference.
        corrupted: ``[pair]`` the corrupted runs' logit difference.
        effects: ``[effect, layer, head, pair]`` raw per-pair effects (:data:`EFFECTS`):
            activation ``patched - corrupted``, direct and inhibition ``clean - patched``.
        attention: ``[kind, layer, head, pair]`` (:data:`ATTENTION`).
        name_movers: the heads that received the inhibition paths (name movers on all pairs).
    """

    task: str
    clean: Float[Tensor, " pair"]
    corrupted: Float[Tensor, " pair"]
    effects: Float[Tensor, "effect layer head pair"]
    attention: Float[Tensor, "kind layer head pair"]
    name_movers: tuple[tuple[int, int], ...] = ()

    @property
    def n(self) -> int:
        """Prompt pairs."""
        return int(self.clean.shape[0])

    def weights(self, n_resamples: int, seed: int) -> Float[Tensor, "row pair"]:
        """Row 0: ones (the observed data); rows 1..: bootstrap counts
        (:func:`~mechicl.stats.bootstrap_weights` seeded by ``seed``)."""
        draws = torch.from_numpy(bootstrap_weights(self.n, n_resamples, seed))
        return torch.cat([torch.ones(1, self.n, dtype=torch.float64), draws])

    def draws(self, weights: Float[Tensor, "row pair"]
              ) -> tuple[Float[Tensor, "row effect layer head"], Float[Tensor, "row kind layer head"]]:
        """Normalised effects and mean attention under each row of ``weights``."""
        gap = self.clean.double() - self.corrupted.double()
        return effect_draws(self.effects, gap, weights), attention_draws(self.attention, weights)


def task_circuit(model: HookedModel, pairs: PromptPairs, *, effect_threshold: float = 0.05,
                 attention_threshold: float = 0.1, batch_tokens: int = 8192,
                 progress: bool = False) -> TaskCircuit:
    """Measure one task: activation patching of head outputs, path patching to the logits,
    attention at the role positions, then path patching to the name movers' queries.

    Args:
        model: the model.
        pairs: ``ioi`` or ``colored_objects`` prompt pairs.
        effect_threshold: ``tau_e`` of the name-mover criterion (which picks the receivers).
        attention_threshold: ``tau_a``, likewise.
        batch_tokens: patched copies x prompt length per forward pass.
        progress: show progress bars.
    """
    model = as_hooked_model(model)
    positions = role_positions(pairs)
    common = {"metric": "logit_diff", "batch_tokens": batch_tokens, "progress": progress}
    act = patch(model, pairs, target="head_out", direction="denoising", **common)
    direct = path_patch(model, pairs, receivers="logits", direction="noising", **common)
    assert act.per_pair is not None and direct.per_pair is not None  # built-in metric
    clean, corrupted = act.clean.double(), act.corrupted.double()
    attention = attention_scores(model, pairs, positions)
    nan = torch.full_like(act.per_pair, float("nan"), dtype=torch.float64)
    effects = torch.stack([act.per_pair.double() - corrupted,
                           direct.clean.double() - direct.per_pair.double(), nan])
    circuit = TaskCircuit(task=pairs.name, clean=clean, corrupted=corrupted, effects=effects,
                          attention=attention)
    eff, att = circuit.draws(torch.ones(1, len(pairs), dtype=torch.float64))
    roles = assign_roles(eff, att, effect_threshold=effect_threshold,
                         attention_threshold=attention_threshold)
    movers = tuple((int(a), int(b)) for a, b in roles[0, ROLES.index("name_mover")].nonzero())
    if movers and max(layer for layer, _ in movers) > 0:
        inhib = path_patch(model, pairs, receivers=list(movers), receiver_input="q",
                           direction="noising", **common)
        assert inhib.per_pair is not None
        effects[2] = inhib.clean.double() - inhib.per_pair.double()
    return TaskCircuit(task=pairs.name, clean=clean, corrupted=corrupted, effects=effects,
                       attention=attention, name_movers=movers)


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def _safe(fn: Any, *args: Any, **kwargs: Any) -> float:
    try:
        return float(fn(*args, **kwargs))
    except ValueError:  # a constant map: the statistic is undefined
        return float("nan")


def _hypergeom_tail(n: int, a: int, b: int, observed: int) -> float:
    """P(|A ∩ B| >= observed) for a random ``b``-subset against a fixed ``a``-subset of ``n``."""
    total = math.comb(n, b)
    return sum(math.comb(a, j) * math.comb(n - a, b - j)
               for j in range(observed, min(a, b) + 1)) / total


def reuse_tables(first: TaskCircuit, second: TaskCircuit, *, k: int,
                 effect_threshold: float = 0.05, attention_threshold: float = 0.1,
                 n_permutations: int = 1000, n_resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict[str, pd.DataFrame]:
    """The per-head table, the overlap of the two tasks' effect maps and the shared roles.

    Args:
        first, second: the two tasks' measurements.
        k: the number of top heads (by ``|effect|``) of the top-k overlap.
        effect_threshold, attention_threshold: the role thresholds (:func:`assign_roles`).
        n_permutations: relabellings of the permutation nulls (seeded by ``seed``).
        n_resamples: bootstrap resamples of each task's pairs (seeds ``seed`` and ``seed + 1``).
        level: coverage of the percentile intervals.

    Returns:
        ``{"heads": ..., "overlap": ..., "roles": ...}`` (see :class:`CircuitReuse`).
    """
    tasks = (first, second)
    if min(t.n for t in tasks) < 2:
        logger.warning("%s: a bootstrap over fewer than 2 prompt pairs gives zero-width "
                       "intervals", " / ".join(f"{t.task} {t.n} pairs" for t in tasks))
    draws = [t.draws(t.weights(n_resamples, seed + i)) for i, t in enumerate(tasks)]
    roles = [assign_roles(e, a, effect_threshold=effect_threshold,
                          attention_threshold=attention_threshold) for e, a in draws]
    n_layers, n_heads = first.effects.shape[1:3]
    heads = _heads_table(tasks, draws, roles, level)
    overlap = _overlap_table(tasks, draws, k=k, n_permutations=n_permutations, seed=seed,
                             level=level)
    shared = _roles_table(tasks, roles, n_layers=n_layers, n_heads=n_heads,
                          n_permutations=n_permutations, seed=seed, level=level)
    return {"heads": heads, "overlap": overlap, "roles": shared}


def _heads_table(tasks: Sequence[TaskCircuit], draws: Sequence[tuple[Tensor, Tensor]],
                 roles: Sequence[Tensor], level: float) -> pd.DataFrame:
    n_layers, n_heads = tasks[0].effects.shape[1:3]
    grid = torch.cartesian_prod(torch.arange(n_layers), torch.arange(n_heads))
    data: dict[str, Any] = {"layer": grid[:, 0].numpy(), "head": grid[:, 1].numpy()}
    for task, (eff, att), role in zip(tasks, draws, roles, strict=True):
        for values, names in ((eff, EFFECTS), (att, tuple(f"attention {a}" for a in ATTENTION))):
            low, high = percentile_intervals(values[1:], level)
            for i, name in enumerate(names):
                col = f"{task.task} {name}"
                data[col] = values[0, i].flatten().numpy()
                data[f"{col} low"] = low[i].flatten().numpy()
                data[f"{col} high"] = high[i].flatten().numpy()
        share = role[1:].double().mean(0)  # [role, layer, head]
        for i, name in enumerate(ROLES):
            data[f"{task.task} {name}"] = role[0, i].flatten().numpy()
            data[f"{task.task} {name} share"] = share[i].flatten().numpy()
    both = roles[0][0] & roles[1][0]  # [role, layer, head]
    data["shared roles"] = [" ".join(r for i, r in enumerate(ROLES) if both[i].flatten()[j])
                            for j in range(n_layers * n_heads)]
    return pd.DataFrame(data)


def _overlap_table(tasks: Sequence[TaskCircuit], draws: Sequence[tuple[Tensor, Tensor]], *,
                   k: int, n_permutations: int, seed: int, level: float) -> pd.DataFrame:
    rows = []
    for effect in COMPARED:
        e = EFFECTS.index(effect)
        a, b = draws[0][0][:, e], draws[1][0][:, e]  # [row, layer, head]
        statistics = {  # name: the two maps, the one-map statistic, its vectorised rows
            "top_k": (a.abs(), b.abs(), lambda x, y: top_k_overlap(x, y, k),
                      lambda x, y: top_k_overlap_rows(x, y, k)),
            "spearman": (a, b, spearman, spearman_rows),
            "within_layer_spearman": (a, b, within_layer_spearman, within_layer_spearman_rows),
        }
        for name, (x, y, fn, rows_fn) in statistics.items():
            boot = rows_fn(x[1:], y[1:])
            low, high = percentile_intervals(boot[:, None], level)
            row: dict[str, Any] = {
                "quantity": f"{effect} {name}", "effect": effect, "statistic": name,
                "map": "|effect|" if name == "top_k" else "effect",
                "k": k if name == "top_k" else None, "value": _safe(fn, x[0], y[0]),
                "low": float(low[0]), "high": float(high[0])}
            for label, within in (("plain", False), ("layer", True)):
                args = {"statistic": name, "k": k, "n_permutations": n_permutations,
                        "seed": seed, "within_layers": within}
                _, null = permutation_null(x[0], y[0], **args)
                row[f"{label}-null expected"] = float(null.nanmean())
                row[f"{label}-null p"] = permutation_pvalue(x[0], y[0], **args)
            row["hypergeometric p"] = top_k_pvalue(x[0], y[0], k) if name == "top_k" else None
            rows.append(row)
    return _common_columns(pd.DataFrame(rows), tasks, level, n_permutations,
                           n_resamples=int(draws[0][0].shape[0]) - 1)


def _roles_table(tasks: Sequence[TaskCircuit], roles: Sequence[Tensor], *, n_layers: int,
                 n_heads: int, n_permutations: int, seed: int, level: float) -> pd.DataFrame:
    perms = layer_permutations(n_layers, n_heads, n_permutations, seed=seed).flatten(1)
    n = n_layers * n_heads
    rows = []
    for i, role in enumerate(ROLES):
        a, b = roles[0][:, i].flatten(1), roles[1][:, i].flatten(1)  # [row, head]
        shared = a[0] & b[0]
        observed = int(shared.sum())
        null = (a[0][None] & b[0][perms]).sum(-1).double()  # [permutation]
        boot = (a[1:] & b[1:]).sum(-1).double()
        low, high = percentile_intervals(boot[:, None], level)
        count_a, count_b = int(a[0].sum()), int(b[0].sum())
        rows.append({
            "quantity": f"shared {role}", "role": role,
            f"{tasks[0].task} count": count_a, f"{tasks[1].task} count": count_b,
            "value": float(observed), "low": float(low[0]), "high": float(high[0]),
            "heads": " ".join(f"{j // n_heads}.{j % n_heads}" for j in shared.nonzero()[:, 0].tolist()),
            "plain-null expected": count_a * count_b / n,
            "plain-null p": _hypergeom_tail(n, count_a, count_b, observed),
            "layer-null expected": float(null.mean()),
            "layer-null p": (1 + int((null >= observed).sum())) / (1 + n_permutations)})
    return _common_columns(pd.DataFrame(rows), tasks, level, n_permutations,
                           n_resamples=int(roles[0].shape[0]) - 1)


def _common_columns(df: pd.DataFrame, tasks: Sequence[TaskCircuit], level: float,
                    n_permutations: int, n_resamples: int) -> pd.DataFrame:
    df[f"{tasks[0].task} pairs"] = tasks[0].n
    df[f"{tasks[1].task} pairs"] = tasks[1].n
    df["interval"] = f"{level:.0%} {INTERVAL}, {n_resamples} resamples"
    df["n_permutations"] = n_permutations
    return df


# --------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------


@result_type
@dataclass(frozen=True, kw_only=True)
class CircuitReuse:
    """Circuit reuse between two tasks on one model (see the module docstring).

    Attributes:
        circuits: the two tasks' :class:`TaskCircuit` (per-pair effects and attention), in
            order (IOI first in the registered analysis).
        heads: one row per head: ``layer, head``, per task each effect and attention value with
            its interval (``"<task> <effect>"``, ``... low``, ``... high``), each role (bool)
            and the share of bootstrap resamples in which the head holds it
            (``"<task> <role> share"``), and ``shared roles``.
        overlap: one row per compared effect x statistic (``top_k`` of ``|effect|``,
            ``spearman``, ``within_layer_spearman``): ``value, low, high`` and the plain and
            layer-preserving nulls (``... expected``, ``... p``).
        roles: one row per role: each task's count, the shared count ``value`` with its
            interval, the shared ``heads``, and its expectation and p-value under the plain
            (hypergeometric) and the layer-preserving null.
        params: the settings (thresholds, k, resamples, permutations, seed, the pairs).
        model: the model's provenance.
    """

    circuits: tuple[TaskCircuit, TaskCircuit]
    heads: pd.DataFrame = field(repr=False)
    overlap: pd.DataFrame = field(repr=False)
    roles: pd.DataFrame = field(repr=False)
    params: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def tasks(self) -> tuple[str, str]:
        """The two tasks' names."""
        return (self.circuits[0].task, self.circuits[1].task)

    def circuit(self, task: str) -> TaskCircuit:
        """The measurements of ``task``."""
        for c in self.circuits:
            if c.task == task:
                return c
        raise ValueError(f"task={task!r} is not one of this result's tasks {list(self.tasks)}")

    def effect_map(self, task: str, effect: str = "activation") -> Float[Tensor, "layer head"]:
        """The normalised ``effect`` of every head on ``task`` (the observed value)."""
        if effect not in EFFECTS:
            raise ValueError(f"effect={effect!r} is not allowed; choose one of {list(EFFECTS)}")
        c = self.circuit(task)
        eff, _ = c.draws(torch.ones(1, c.n, dtype=torch.float64))
        return eff[0, EFFECTS.index(effect)]

    def role_map(self, task: str) -> Bool[Tensor, "role layer head"]:
        """Which heads hold each of :data:`ROLES` on ``task`` (from :attr:`heads`)."""
        c = self.circuit(task)
        n_layers, n_heads = c.effects.shape[1:3]
        return torch.stack([torch.tensor(self.heads[f"{task} {r}"].to_numpy(dtype=bool))
                            .reshape(n_layers, n_heads) for r in ROLES])

    def to_dataframe(self) -> pd.DataFrame:
        """The per-head table."""
        return self.heads.copy()

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write as a folder (:func:`~mechicl.results.write_result`), atomically."""
        tensors: dict[str, Tensor] = {}
        for i, c in enumerate(self.circuits):
            for name in ("clean", "corrupted", "effects", "attention"):
                tensors[f"{i}.{name}"] = getattr(c, name).double()
        fields = {"tasks": list(self.tasks),
                  "name_movers": [[list(h) for h in c.name_movers] for c in self.circuits]}
        return write_result(path, kind="CircuitReuse", params=self.params, model=self.model,
                            fields=fields, tensors=tensors,
                            tables={"heads": self.heads, "overlap": self.overlap,
                                    "roles": self.roles})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "CircuitReuse":
        """Read a result written by :meth:`save`, verified
        (:func:`~mechicl.results.read_result`)."""
        folder = read_result(path, "CircuitReuse")
        t, f = folder.tensors, folder.fields
        try:
            circuits = tuple(
                TaskCircuit(task=task, clean=t[f"{i}.clean"], corrupted=t[f"{i}.corrupted"],
                            effects=t[f"{i}.effects"], attention=t[f"{i}.attention"],
                            name_movers=tuple((int(a), int(b)) for a, b in f["name_movers"][i]))
                for i, task in enumerate(f["tasks"]))
            return cls(circuits=circuits, heads=folder.tables["heads"],  # type: ignore[arg-type]
                       overlap=folder.tables["overlap"], roles=folder.tables["roles"],
                       params=folder.params, model=folder.model)
        except (KeyError, IndexError, ValueError) as err:
            raise ResultError(f"{path}: inconsistent CircuitReuse ({err}); recompute the "
                              "result") from None


def circuit_reuse(model: HookedModel, first: PromptPairs, second: PromptPairs, *,
                  top_k_percent: float = 10.0, effect_threshold: float = 0.05,
                  attention_threshold: float = 0.1, n_permutations: int = 1000,
                  n_resamples: int = 1000, seed: int = 0, batch_tokens: int = 8192,
                  progress: bool = False) -> CircuitReuse:
    """Circuit reuse between two tasks (IOI and Colored Objects) on one model.

    Args:
        model: the model.
        first: prompt pairs of one task (``ioi`` or ``colored_objects``).
        second: prompt pairs of the other.
        top_k_percent: the "top heads" of the top-k overlap: this percentage of all heads
            (:func:`~mechicl.analyses.overlap.top_k`).
        effect_threshold: ``tau_e``, the smallest normalised effect of a role (a share of the
            clean-corrupted logit-difference gap).
        attention_threshold: ``tau_a``, the smallest mean attention probability of a role.
        n_permutations: relabellings of the permutation nulls.
        n_resamples: bootstrap resamples of the pairs.
        seed: seeds the resamples and relabellings.
        batch_tokens: patched copies x prompt length per forward pass.
        progress: show progress bars.

    Returns:
        A :class:`CircuitReuse`.
    """
    model = as_hooked_model(model)
    if first.name == second.name:
        raise ValueError(f"both pair sets are {first.name!r}: give one of each of "
                         f"{list(TASK_NAMES)}")
    for pairs in (first, second):
        role_positions(pairs)  # fail before any forward pass
    if not 0 < top_k_percent <= 100:
        raise ValueError(f"top_k_percent={top_k_percent} must be in (0, 100]")
    for name, value in (("effect_threshold", effect_threshold),
                        ("attention_threshold", attention_threshold)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name}={value} must be a finite number > 0")
    k = top_k(model.n_layers * model.n_heads, percentile=top_k_percent)
    circuits = tuple(task_circuit(model, p, effect_threshold=effect_threshold,
                                  attention_threshold=attention_threshold,
                                  batch_tokens=batch_tokens, progress=progress)
                     for p in (first, second))
    tables = reuse_tables(*circuits, k=k, effect_threshold=effect_threshold,
                          attention_threshold=attention_threshold,
                          n_permutations=n_permutations, n_resamples=n_resamples, seed=seed)
    params = {"top_k_percent": top_k_percent, "k": k, "effect_threshold": effect_threshold,
              "attention_threshold": attention_threshold, "n_permutations": n_permutations,
              "n_resamples": n_resamples, "seed": seed, "metric": "logit_diff",
              "pairs": {p.name: dict(p.params) for p in (first, second)}}
    return CircuitReuse(circuits=circuits, params=params, model=model.info(),  # type: ignore[arg-type]
                        **tables)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------

_ROLE_SYMBOLS = dict(zip(ROLES, ("star", "x", "diamond", "triangle-up", "square"), strict=True))


def reuse_figures(result: CircuitReuse, stem: str = "circuit-reuse") -> dict[str, go.Figure]:
    """For each compared effect: the two tasks' layer x head maps side by side (one colour
    scale, centred on 0) and a scatter of the two tasks' effects with the roles marked (one
    marker per role, for heads holding it on either task; hover says which)."""
    a, b = result.tasks
    figures: dict[str, go.Figure] = {}
    for effect in COMPARED:
        maps = [result.effect_map(t, effect) for t in (a, b)]
        zmax = float(max(m.abs().max() for m in maps)) or 1.0
        fig = make_subplots(rows=1, cols=2, subplot_titles=[f"{a}", f"{b}"],
                            horizontal_spacing=0.08)
        for col, m in enumerate(maps, start=1):
            fig.add_trace(go.Heatmap(z=m.numpy(), zmid=0, zmin=-zmax, zmax=zmax,
                                     colorscale="RdBu_r", showscale=col == 2,
                                     colorbar={"title": "effect"},
                                     hovertemplate="layer %{y} head %{x}<br>%{z:.3f}"
                                                   "<extra></extra>"), row=1, col=col)
            fig.update_xaxes(title_text="head", row=1, col=col)
            fig.update_yaxes(title_text="layer" if col == 1 else None, row=1, col=col)
        fig.update_layout(title=f"{effect} effect (share of the clean-corrupted logit "
                                f"difference)")
        figures[f"{stem}-{effect}-heatmaps"] = fig
        scatter = score_scatter(maps[0], maps[1], x_title=f"{a} {effect} effect",
                                y_title=f"{b} {effect} effect",
                                title=f"{effect} effect per head: {a} vs {b}")
        ra, rb = result.role_map(a), result.role_map(b)
        n_heads = maps[0].shape[1]
        for i, role in enumerate(ROLES):
            held = (ra[i] | rb[i]).flatten().nonzero()[:, 0].tolist()
            if not held:
                continue
            where = ["both" if ra[i].flatten()[j] and rb[i].flatten()[j]
                     else (a if ra[i].flatten()[j] else b) for j in held]
            scatter.add_trace(go.Scatter(
                x=maps[0].flatten()[held].numpy(), y=maps[1].flatten()[held].numpy(),
                mode="markers", name=f"{role} ({where.count('both')} in both)",
                marker={"symbol": _ROLE_SYMBOLS[role], "size": 11,
                        "line": {"width": 1}, "opacity": 0.9},
                customdata=[f"{j // n_heads}.{j % n_heads}: {w}" for j, w in
                            zip(held, where, strict=True)],
                hovertemplate=f"{role} %{{customdata}}<extra></extra>"))
        scatter.data[0].name = "heads"
        scatter.update_layout(showlegend=True, height=560,
                              legend={"orientation": "h", "yanchor": "top", "y": -0.18,
                                      "x": 0, "font": {"size": 10}})
        figures[f"{stem}-{effect}-scatter"] = scatter
    return figures


# --------------------------------------------------------------------------------------------
# The registered analysis
# --------------------------------------------------------------------------------------------


def _pairs(model: HookedModel, job: Job) -> tuple[PromptPairs, PromptPairs]:
    n = job.options["n"]
    return tuple(make_pairs(name, model, n=n, seed=job.seed)  # type: ignore[return-value]
                 for name in TASK_NAMES)


def _run(call: Call) -> CircuitReuse:
    o = call.options
    first, second = _pairs(call.model, call.job)
    return circuit_reuse(call.model, first, second, top_k_percent=o["top_k_percent"],
                         effect_threshold=o["effect_threshold"],
                         attention_threshold=o["attention_threshold"],
                         n_permutations=o["n_permutations"], n_resamples=o["n_resamples"],
                         seed=call.seed, progress=call.progress, **call.batch())


def _length(model: HookedModel, job: Job, task: Any) -> int:
    return max(max(p.lengths.tolist()) for p in _pairs(model, job))


def _check(options: dict[str, Any], tasks: Sequence[str], shots: Sequence[int]) -> None:
    if options["top_k_percent"] <= 0:
        raise ValueError(f"top_k_percent={options['top_k_percent']!r} must be in (0, 100]")
    for name in ("effect_threshold", "attention_threshold"):
        if options[name] <= 0:
            raise ValueError(f"{name}={options[name]!r} must be > 0")


_SUMMARY = ("quantity", "value", "low", "high", "plain-null expected", "plain-null p",
            "layer-null expected", "layer-null p", "heads")


def _outputs(pairs: Sequence[tuple[Job, CircuitReuse]], options: Mapping[str, Any]) -> Outputs:
    results, figures, rows = {}, {}, []
    for job, result in pairs:
        stem = job_stem(job, "circuit-reuse")
        results[stem] = result
        figures |= reuse_figures(result, stem)
        for table in (result.overlap, result.roles):
            cols = [c for c in _SUMMARY if c in table.columns]
            rows += table[cols].replace({np.nan: None}).to_dict("records")
    return Outputs(results=results, figures=figures, rows=rows)


CIRCUIT_REUSE = register_analysis(Analysis(
    name="circuit_reuse", command="circuit-reuse",
    help="circuit reuse (Merullo et al. 2024): IOI vs Colored Objects head effects, overlap "
         "with the layer-preserving null, and shared roles",
    run=_run, result_type=CircuitReuse, memory="forward", sequence_length=_length,
    check=_check, outputs=_outputs,
    options=(
        Option(name="n", type=int, default=32, minimum=2,
               help="prompt pairs of each task (at least 2: intervals resample them)"),
        Option(name="top_k_percent", type=float, default=10.0, minimum=0, maximum=100,
               help="the 'top heads' of the top-k overlap: this percentage of all heads"),
        Option(name="effect_threshold", type=float, default=0.05, minimum=0,
               help="smallest normalised effect (share of the clean-corrupted logit "
                    "difference) of a role"),
        Option(name="attention_threshold", type=float, default=0.1, minimum=0, maximum=1,
               help="smallest mean attention probability of a role"),
        Option(name="n_permutations", type=int, default=1000, minimum=1,
               help="relabellings of the permutation nulls"),
        Option(name="n_resamples", type=int, default=1000, minimum=1,
               help="bootstrap resamples of the prompt pairs"),
        batch_tokens_option(8192, "patched copies x prompt length per forward pass"),
    ),
))
