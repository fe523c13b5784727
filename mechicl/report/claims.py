"""The report's findings, computed from its tables: every sentence that states a finding is a
:class:`Claim` carrying the statistic behind it, its interval and p-value, and says "not
significant" when it is not. The report renders the sentences and stores every claim in
``tables/claims.csv``; a test recomputes them from the stored results.

Each function takes the tables the report shows (DataFrames) and returns claims; none reads a
model or a file.
"""

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from mechicl.stats import holm

__all__ = ["ALPHA", "MIN_EVENTS", "Claim", "agreement_claims", "attribution_claims", "causal_claims",
           "causal_verdict", "claims_table", "determinant_claims", "icl_claims", "method_claims",
           "overlap_claims", "pruning_claims", "reuse_claims", "scaling_claims",
           "sparsity_claims"]

ALPHA = 0.05
"""The significance level of every claim."""

MIN_EVENTS = 10
"""The fewest examples of a 0/1 outcome's rarer value with which a determinant is tested (the
usual minimum of events per variable: Peduzzi et al. 1996)."""


@dataclass(frozen=True, kw_only=True)
class Claim:
    """One finding.

    Attributes:
        section: the report section it belongs to.
        subject: what it is about (a task, a ranking, an induction score).
        text: the sentence, numbers included.
        statistic: the name of the statistic.
        estimate, low, high: its value and interval (NaN where not applicable).
        p: its p-value (NaN where not applicable).
        significant: whether the finding passes its test at :data:`ALPHA`.
        method: how the interval / p-value was computed.
    """

    section: str
    subject: str
    text: str
    statistic: str
    estimate: float = np.nan
    low: float = np.nan
    high: float = np.nan
    p: float = np.nan
    significant: bool = False
    method: str = ""


def claims_table(claims: Sequence[Claim]) -> pd.DataFrame:
    """The claims as a table (one row each, :class:`Claim`'s fields as columns)."""
    return pd.DataFrame([asdict(c) for c in claims],
                        columns=list(Claim.__dataclass_fields__))


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def icl_claims(validity: pd.DataFrame, classes: pd.DataFrame) -> list[Claim]:
    """Per task: its class (in-context, recall only, at chance, below chance) with the
    evidence: the largest significant in-context gain, or the gains that were not
    significant, or the Wilson bounds against chance."""
    out = []
    for _, row in classes.iterrows():
        cls = row["class"]
        v = validity[validity.task == row.task]
        k = v[v.shots > 0]
        if cls == "in-context":
            text = (f"{row.task} learns in context: {int(row.shots)}-shot accuracy exceeds 0-shot by "
                    f"{row.gain:+.2f} [{row.gain_low:+.2f}, {row.gain_high:+.2f}] "
                    f"(paired over the same prompts; Holm-corrected McNemar {_p(row.holm_p)}).")
            out.append(Claim(section="icl", subject=row.task, text=text, statistic="icl gain",
                             estimate=row.gain, low=row.gain_low, high=row.gain_high,
                             p=row.holm_p, significant=True,
                             method="paired percentile bootstrap; exact McNemar, Holm"))
            continue
        best = k.loc[k.gain.idxmax()] if len(k) and k.gain.notna().any() else None
        if cls == "recall only":
            gain = "" if best is None else (
                f"; the largest gain, {int(best.shots)}-shot {best.gain:+.2f} "
                f"[{best.gain_low:+.2f}, {best.gain_high:+.2f}], is not significant "
                f"(Holm {_p(best.holm_p)})")
            text = (f"{row.task} is above chance without demonstrations (0-shot "
                    f"{_acc(v, 0)}){gain}: recall, not in-context learning.")
        elif cls == "untested":
            text = (f"{row.task}: in-context gain not tested (it needs a 0-shot and a k > 0 "
                    f"result); best accuracy {_best(v)}, chance {v.chance.iloc[0]:.2f}.")
        elif cls == "at chance":
            text = (f"{row.task} is at chance at every shot count (no 95% Wilson lower bound "
                    f"above chance {v.chance.iloc[0]:.2f}; best {_best(v)}): its importance maps "
                    "describe the answer loss, not a task the model does.")
        else:  # below chance
            shots = ", ".join(str(s) for s in row.below_chance_shots)
            text = (f"{row.task} is significantly below chance (at {shots} shots; chance "
                    f"{v.chance.iloc[0]:.2f}, best {_best(v)}): a sign of a scoring problem "
                    "(e.g. choices of different lengths without normalisation) rather than of "
                    "a skill.")
        out.append(Claim(section="icl", subject=row.task, text=text, statistic=cls,
                         estimate=np.nan if best is None else float(best.gain),
                         low=np.nan if best is None else float(best.gain_low),
                         high=np.nan if best is None else float(best.gain_high),
                         p=np.nan if best is None else float(best.holm_p), significant=False,
                         method="Wilson 95%; paired percentile bootstrap; exact McNemar, Holm"))
    return out


def _acc(v: pd.DataFrame, shots: int) -> str:
    r = v[v.shots == shots].iloc[0]
    return f"{r.accuracy:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}]"


def _best(v: pd.DataFrame) -> str:
    r = v.loc[v.accuracy.idxmax()]
    return f"{int(r.shots)}-shot {r.accuracy:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}]"


def _vs_random(r: Any, section: str, subject: str, text: str, significant: bool) -> Claim:
    """The claim comparing one point of a pruning curve (a ``points()`` row) with random
    orders; ``subject`` names the curve and the direction (``"... worse than random"``)."""
    return Claim(section=section, subject=subject, text=text,
                 statistic="accuracy minus random", estimate=r.vs_random, low=r.vs_random_low,
                 high=r.vs_random_high, p=r.vs_random_p, significant=significant,
                 method="paired percentile bootstrap over prompts")


def pruning_claims(points: pd.DataFrame, summary: pd.DataFrame, *, unit: str) -> list[Claim]:
    """Per task and ranking: the share removable with its interval; and per ranking other than
    random, the smallest share at which it is significantly worse (or better) than random
    orders, or that it never differs significantly.

    Args:
        points: stacked :meth:`~mechicl.analyses.pruning.PruneCurve.points` with ``task``,
            ``shots`` columns.
        summary: stacked :meth:`~mechicl.analyses.pruning.PruneCurve.summary` likewise.
        unit: ``"heads"`` or ``"ffn"``.
    """
    key = "head_ranking" if unit == "heads" else "ffn_ranking"
    x = "head_percent" if unit == "heads" else "ffn_percent"
    name = "heads" if unit == "heads" else "FFNs"
    out = []
    for row in summary[summary.unit == unit].itertuples(index=False):
        ranking = getattr(row, key)
        text = (f"{row.task} {int(row.shots)}-shot, pruning {name} by {ranking}: "
                f"{row.removable:g}% removable (accuracy drop below {row.tolerance:.2f} by a "
                f"one-sided paired bootstrap test at {row.alpha:g}, at that share and every "
                f"smaller one; the untested estimate is {row.estimate:g}%, "
                f"{row.level:.0%} interval [{row.low:g}%, {row.high:g}%], n = {row.n}"
                + (f", random: per-prompt mean of {row.draws} orders" if ranking == "random"
                   else "") + ").")
        out.append(Claim(section=f"pruning {unit}", subject=f"{row.task} {ranking}", text=text,
                         statistic="share removable", estimate=row.estimate, low=row.low,
                         high=row.high, significant=row.removable > 0,
                         method="one-sided paired bootstrap over prompts"))
    pts = points[(points[key] != "random") & points.vs_random.notna()]
    for (task, shots, ranking), g in pts.groupby(["task", "shots", key], sort=False):
        g = g.sort_values(x)
        worse = g[(g.vs_random_high < 0)]
        better = g[(g.vs_random_low > 0)]
        if len(worse):
            r = worse.iloc[0]
            text = (f"{task} {shots}-shot: pruning {name} by {ranking} is worse than random "
                    f"orders from {r[x]:g}% on: accuracy {r.vs_random:+.2f} "
                    f"[{r.vs_random_low:+.2f}, {r.vs_random_high:+.2f}] against their mean "
                    f"(paired bootstrap, {_p(r.vs_random_p)}); significantly worse at "
                    f"{len(worse)} of {len(g)} shares (per-share 95% intervals, uncorrected).")
            out.append(_vs_random(r, f"pruning {unit}", f"{task} {ranking} worse than random",
                                  text, True))
        if len(better):
            r = better.iloc[0]
            text = (f"{task} {shots}-shot: pruning {name} by {ranking} keeps more accuracy "
                    f"than random orders from {r[x]:g}% on: {r.vs_random:+.2f} "
                    f"[{r.vs_random_low:+.2f}, {r.vs_random_high:+.2f}] "
                    f"({_p(r.vs_random_p)}); significantly better at {len(better)} of "
                    f"{len(g)} shares (per-share 95% intervals, uncorrected).")
            out.append(_vs_random(r, f"pruning {unit}", f"{task} {ranking} better than random",
                                  text, True))
        if not len(worse) and not len(better):
            r = g.loc[g.vs_random.abs().idxmax()]
            text = (f"{task} {shots}-shot: pruning {name} by {ranking} does not differ "
                    f"significantly from random orders at any share (largest difference "
                    f"{r.vs_random:+.2f} [{r.vs_random_low:+.2f}, {r.vs_random_high:+.2f}] at "
                    f"{r[x]:g}%; not significant).")
            out.append(_vs_random(r, f"pruning {unit}", f"{task} {ranking} vs random", text,
                                  False))
    return out


def agreement_claims(pairs: pd.DataFrame, in_context: Sequence[str],
                     median_intervals: dict[tuple[int, str], tuple[float, float]] | None = None
                     ) -> list[Claim]:
    """Per shot count: how much of the cross-task agreement of importance maps is layer
    structure. ``pairs`` has one row per (shots, task_a, task_b) with ``spearman``,
    ``within-layer spearman``, ``layer-means spearman`` and ``layer-null p``;
    ``median_intervals`` the bootstrap interval of the median Spearman per (shots, scope)."""
    out = []
    for shots, g in pairs.groupby("shots", sort=True):
        for scope, rows in (("all tasks", g), ("in-context tasks",
                                               g[g.task_a.isin(in_context)
                                                 & g.task_b.isin(in_context)])):
            if rows.empty:
                continue
            sig = int((rows["layer-null p"] < ALPHA).sum())
            median = rows.spearman.median()
            low, high = (median_intervals or {}).get((int(shots), scope), (math.nan, math.nan))
            interval = "" if math.isnan(low) else f" [{low:.2f}, {high:.2f}]"
            if not math.isnan(low) and not low <= median <= high:
                interval = (f" (bootstrap interval [{low:.2f}, {high:.2f}] excludes it: it "
                            "depends on the number of prompts, a biased estimate)")
            text = (f"{shots}-shot, {scope} ({len(rows)} pairs): median Spearman between two "
                    f"tasks' importance maps {median:.2f}{interval} (range "
                    f"{rows.spearman.min():.2f} to {rows.spearman.max():.2f}); a map of one "
                    f"task's per-layer means alone reaches {rows['layer-means spearman'].median():.2f}"
                    f"; within layers the median is {rows['within-layer spearman'].median():.2f}"
                    f", and {sig} of {len(rows)} pairs agree more than a layer-preserving null "
                    f"(heads permuted within layers, p < {ALPHA})"
                    + ("" if sig else ": not significant for any pair") + ".")
            out.append(Claim(section="agreement", subject=f"{shots}-shot {scope}", text=text,
                             statistic="pairs beyond the layer-preserving null",
                             estimate=float(sig) / len(rows), significant=sig > 0,
                             method="permutation within layers, one-sided; median Spearman: "
                                    "percentile bootstrap over each task's prompts, 95%"))
    return out


def overlap_claims(overlap: pd.DataFrame, in_context: Sequence[str], k: int) -> list[Claim]:
    """Per induction score: in how many in-context task x shot maps its top-k heads overlap the
    top-k important heads more than chance (hypergeometric) and more than layer structure
    alone gives (layer-preserving null)."""
    out = []
    column = f"top-{k} overlap"
    null_column = f"layer-null top-{k} overlap"
    for score, g in overlap.groupby("induction score", sort=False):
        for scope, rows in (("in-context tasks", g[g.task.isin(in_context)]), ("all tasks", g)):
            if rows.empty:
                continue
            hyper = int((rows["hypergeom p"] < ALPHA).sum())
            layer = int((rows["layer-null p (top-k)"] < ALPHA).sum())
            text = (f"{score.replace('_', ' ')} vs importance, {scope} ({len(rows)} task x shot "
                    f"maps): median top-{k} overlap {rows[column].median():.2f}, against "
                    f"{rows[null_column].median():.2f} expected from layer structure alone; "
                    f"larger than chance (hypergeometric p < {ALPHA}) in {hyper} maps and "
                    f"larger than the layer-preserving null in {layer}"
                    + (" (not significant in any map once layers are controlled)"
                       if hyper and not layer else "") + ".")
            out.append(Claim(section="overlap", subject=f"{score} {scope}", text=text,
                             statistic="maps beyond the layer-preserving null",
                             estimate=float(layer) / len(rows), significant=layer > 0,
                             method="hypergeometric; permutation within layers, one-sided"))
    return out


def method_claims(agreement: pd.DataFrame, induction: pd.DataFrame, k: int) -> list[Claim]:
    """Importance methods side by side. Per task, shot count and method: its agreement with the
    report's method (``agreement``: ``task, shots, a, b, spearman |.|, within-layer spearman
    |.|, layer-null p``, magnitudes compared, since signed and magnitude maps rank in different
    directions), and whether its top-k heads overlap the top-k induction heads beyond layer
    structure (``induction``: ``task, shots, method, induction score, top-{k} overlap,
    layer-null top-{k} overlap, hypergeom p, layer-null p (top-k)``, as
    :func:`~mechicl.analyses.overlap.overlap_table`)."""
    out = []
    for _, r in agreement.iterrows():
        p, rho = float(r["layer-null p"]), float(r["spearman |.|"])
        low, high = (float(r.get("spearman |.| low", math.nan)),
                     float(r.get("spearman |.| high", math.nan)))
        interval = "" if math.isnan(low) else f" [{low:.2f}, {high:.2f}]"
        if not math.isnan(low) and not low <= rho <= high:
            # the resamples (prompts drawn with repeats: fewer distinct ones) agree more or less
            # than the full sample: the statistic depends on the number of prompts
            interval = (f" (bootstrap interval [{low:.2f}, {high:.2f}] excludes it: the "
                        "agreement depends on the number of prompts, a biased estimate)")
        sig = bool(p < ALPHA)
        text = (f"{r.task} {int(r.shots)}-shot, {r.b} vs {r.a} maps: Spearman of the magnitudes "
                f"{rho:.2f}{interval}, within layers {r['within-layer spearman |.|']:.2f}; "
                f"agreement beyond the layer-preserving null: {_p(p)}"
                + ("" if sig else " (not significant)") + ".")
        out.append(Claim(section="methods", subject=f"{r.task} {int(r.shots)}-shot {r.b} vs {r.a}",
                         text=text, statistic="spearman |.| (layer-null p)", estimate=rho,
                         low=low, high=high, p=p, significant=sig,
                         method="paired percentile bootstrap over prompts, 95%; permutation "
                                "within layers, one-sided"))
    for _, r in induction.iterrows():
        overlap, null = float(r[f"top-{k} overlap"]), float(r[f"layer-null top-{k} overlap"])
        p, hyper = float(r["layer-null p (top-k)"]), float(r["hypergeom p"])
        sig = bool(p < ALPHA)
        text = (f"{r.task} {int(r.shots)}-shot, {r.method}: {overlap * k:.0f} of its top {k} heads "
                f"are among the top {k} by {str(r['induction score']).replace('_', ' ')} "
                f"(overlap {overlap:.2f}; {null:.2f} expected from layer structure alone; "
                f"hypergeometric {_p(hyper)}, layer-preserving null {_p(p)}"
                + ("" if sig else ": not significant once layers are controlled") + ").")
        out.append(Claim(section="methods",
                         subject=f"{r.task} {int(r.shots)}-shot {r.method} vs {r['induction score']}",
                         text=text, statistic="top-k overlap with induction heads",
                         estimate=overlap, p=p, significant=sig,
                         method="hypergeometric; permutation within layers, one-sided"))
    return out


def causal_verdict(measure: str, diff: float, low: float, high: float) -> str:
    """``"more harmful"``, ``"less harmful"`` or ``"no difference"``: the top-k ablation against
    random heads, from the interval of ``top - random`` (harmful: a higher loss, or for
    ``measure="accuracy"`` a lower accuracy).

    >>> causal_verdict("accuracy", -0.2, -0.3, -0.1), causal_verdict("later_copy_loss", 1.0, -1.0, 2.0)
    ('more harmful', 'no difference')
    """
    if low <= 0 <= high:
        return "no difference"
    return "more harmful" if (diff > 0) == (measure != "accuracy") else "less harmful"


def causal_claims(table: pd.DataFrame, classes: dict[str, str]) -> list[Claim]:
    """The causal check: per subject (repeated random sequences, or a task) and ``k``, the
    top-k induction heads ablated against k random heads (``table``: stacked
    :meth:`~mechicl.analyses.causal.InductionAblation.table` rows with ``subject`` and
    ``shots``). A task that is not in-context (``classes``: task -> class) says so."""
    out = []
    for r in table.itertuples(index=False):
        loss = r.measure != "accuracy"
        found = causal_verdict(r.measure, r.diff, r.diff_low, r.diff_high)
        sig = found != "no difference"
        verdict = (f"{found} than random heads" if sig
                   else "not significantly different from random heads")
        what = "later-copy loss" if loss else "accuracy"
        where = ("repeated random sequences" if loss else f"{r.subject} {int(r.shots)}-shot")
        cls = classes.get(str(r.subject), "in-context") if not loss else "in-context"
        note = "" if cls == "in-context" else f" ({r.subject} is {cls}: not evidence about ICL)"
        text = (f"{where}: ablating the top {r.k} {str(r.score).replace('_', ' ')} heads moves "
                f"the {what} from {r.unablated:.2f} to {r.top:.2f}; {r.k} random heads: "
                f"{r.random_mean:.2f} (5-95% of {r.draws} draws {r.random_low:.2f} to "
                f"{r.random_high:.2f}); top minus random {r.diff:+.2f} [{r.diff_low:+.2f}, "
                f"{r.diff_high:+.2f}], {_p(r.p)}, n = {r.n}: {verdict}{note}.")
        out.append(Claim(section="causal", subject=f"{where} k={r.k}", text=text,
                         statistic=f"{what}: top-k minus random", estimate=float(r.diff),
                         low=float(r.diff_low), high=float(r.diff_high), p=float(r.p),
                         significant=sig, method="paired percentile bootstrap over "
                         + ("sequences" if loss else "prompts")))
    return out


# --------------------------------------------------------------------------------------------
# Issue 23's sections: in-context vs memorised answers, weight sparsity, circuit reuse
# --------------------------------------------------------------------------------------------


def _heads(text: str) -> str:
    return text.replace("_", " ")


def attribution_claims(heads: pd.DataFrame, agreement: pd.DataFrame) -> list[Claim]:
    """In-context vs memorised answers, attributed to components (``heads``:
    :meth:`~mechicl.analyses.recall.AnswerAttribution.table`; ``agreement``: one row of its
    :meth:`~mechicl.analyses.recall.AnswerAttribution.agreement`).

    For each direction, the head whose mean direct logit attribution (DLA) most favours the
    in-context answer (and the memorised one), and the FFN likewise, with the percentile
    bootstrap interval over prompt pairs; significant when the interval excludes 0. The
    interval is per component and does not correct for choosing the extreme of all
    components (stated in the sentence). Then the agreement of DLA with the exact direct
    effect: Spearman with its paired interval, top-k overlap against the layer-preserving null.
    """
    out = []
    for component, rows in (("head", heads[heads.component == "head"]),
                            ("FFN", heads[heads.component == "ffn"])):
        if rows.empty:
            continue
        for sign, pick in (("in-context", rows.dla_mean.idxmax()),
                           ("memorised", rows.dla_mean.idxmin())):
            r = rows.loc[pick]
            name = (f"head {int(r['layer'])}.{int(r['head'])}" if component == "head"
                    else f"the layer-{int(r['layer'])} FFN")
            low, high = float(r.dla_low), float(r.dla_high)
            sig = bool(low > 0 or high < 0)
            toward = "in-context" if r.dla_mean > 0 else "memorised"
            extreme = "largest" if sign == "in-context" else "smallest"
            text = (f"The {component} with the {extreme} direct logit attribution to "
                    f"logit(in-context) - logit(memorised) is {name}: {r.dla_mean:+.2f} "
                    f"[{low:+.2f}, {high:+.2f}] (exact direct effect {r.exact_mean:+.2f}), "
                    f"n = {int(r.n)} pairs; "
                    + (f"it favours the {toward} answer" if sig else "not significant")
                    + f" (a per-component interval: not corrected for choosing the extreme of "
                    f"{len(rows)} {component}s).")
            out.append(Claim(section="memorised", subject=f"{component} toward {sign}", text=text,
                             statistic="direct logit attribution", estimate=float(r.dla_mean),
                             low=low, high=high, significant=sig,
                             method="percentile bootstrap over prompt pairs, 95%"))
    for _, r in agreement.iterrows():
        p = float(r.top_k_p)
        sig = bool(p < ALPHA)
        text = (f"DLA (final norm frozen) and the exact direct effect (norm recomputed) rank the "
                f"heads alike: Spearman {r.spearman:.2f} [{r.spearman_low:.2f}, "
                f"{r.spearman_high:.2f}]; their top {int(r.k)} heads share {r.top_k_overlap:.2f} "
                f"against {r.top_k_null_mean:.2f} expected from layer structure alone ({_p(p)}"
                + ("" if sig else ", not significant") + ").")
        out.append(Claim(section="memorised", subject="dla vs exact", text=text,
                         statistic="spearman (top-k layer-null p)", estimate=float(r.spearman),
                         low=float(r.spearman_low), high=float(r.spearman_high), p=p,
                         significant=sig, method="paired percentile bootstrap over pairs; "
                                                 "permutation within layers, one-sided"))
    return out


def scaling_claims(table: pd.DataFrame) -> list[Claim]:
    """Value scaling (``table``: :meth:`~mechicl.analyses.recall.ValueScaling.table`): for each
    head set (the top heads favouring the in-context answer, and the memorised one) at the
    smallest and the largest factor other than 1, the share of in-context answers against
    random head sets of the same size: the paired difference to the random sets' mean with
    its bootstrap interval and p-value, Holm-corrected over these claims."""
    factors = sorted(f for f in table.factor.unique() if f != 1.0)
    picks = list(dict.fromkeys([factors[0], factors[-1]])) if factors else []
    rows = table[table.condition.isin(["top_positive", "top_negative"])
                 & table.factor.isin(picks)].reset_index(drop=True)
    adjusted = holm(rows.p.astype(float).tolist())
    toward = {"top_positive": "in-context", "top_negative": "memorised"}
    out = []
    for r, p in zip(rows.itertuples(index=False), adjusted, strict=True):
        sig = bool(p < ALPHA)
        verb = "removing" if r.factor == 0 else f"scaling by {r.factor:g}"
        text = (f"{verb.capitalize()} the outputs of the heads that most favour the "
                f"{toward[r.condition]} answer: in-context share {r.share:.2f} [{r.low:.2f}, "
                f"{r.high:.2f}] against {r.random_mean:.2f} with random heads of the same count "
                f"(5-95% of {int(r.draws)} draws {r.band_low:.2f} to {r.band_high:.2f}); "
                f"paired difference {r.vs_random:+.2f} [{r.vs_random_low:+.2f}, "
                f"{r.vs_random_high:+.2f}], Holm {_p(p)}, n = {int(r.n)}"
                + ("" if sig else ": not significant") + ".")
        out.append(Claim(section="memorised", subject=f"{r.condition} x{r.factor:g}", text=text,
                         statistic="in-context share minus random heads",
                         estimate=float(r.vs_random), low=float(r.vs_random_low),
                         high=float(r.vs_random_high), p=float(p), significant=sig,
                         method="paired percentile bootstrap over prompts; Holm over the "
                                f"{len(rows)} claims"))
    return out


def determinant_claims(statistics: pd.DataFrame) -> list[Claim]:
    """What the in-context rate depends on (``statistics``:
    :meth:`~mechicl.analyses.recall.AnswerDeterminants.statistics`): per determinant, Spearman
    between it and the 0/1 in-context outcome with its bootstrap interval and permutation
    p-value, Holm-corrected over the determinants; proxies are named as such.

    A determinant is not tested (and left out of the Holm family) when rho is undefined (a
    constant determinant or outcome), when the outcome's rarer value has fewer than
    :data:`MIN_EVENTS` examples, or when bootstrap resamples are constant (no interval):
    with, say, one example answered from memory in 170, no rank statistic can say what
    the rate depends on."""
    rows = statistics[statistics.outcome == "in_context"].reset_index(drop=True)
    events = rows.events.astype(float) if "events" in rows else pd.Series(math.inf, rows.index)
    tested = rows.spearman.notna() & (events >= MIN_EVENTS) & rows.low.notna()
    adjusted = holm(rows.p.where(tested).astype(float).tolist())
    out = []
    for r, p, k, ok in zip(rows.itertuples(index=False), adjusted, events, tested, strict=True):
        sig = bool(p < ALPHA)
        what = _heads(r.determinant) + (" (a tokenizer proxy of frequency)" if r.proxy else "")
        if math.isnan(r.spearman):
            text = (f"In-context rate vs {what}: not tested, not significant (the determinant or "
                    f"the outcome is constant over the n = {int(r.n)} examples).")
        elif not ok and k < MIN_EVENTS:
            text = (f"In-context rate vs {what}: not tested, not significant (the outcome takes "
                    f"its rarer value in only {k:.0f} of the n = {int(r.n)} examples, fewer "
                    f"than {MIN_EVENTS}: too few events to relate to any determinant).")
        elif not ok:
            constant = getattr(r, "constant_resamples", 0)
            text = (f"In-context rate vs {what}: not tested, not significant (the determinant "
                    f"or the outcome is constant in {constant:.0f} bootstrap resamples of the "
                    f"n = {int(r.n)} examples: no interval).")
        else:
            text = (f"In-context rate vs {what}: Spearman {r.spearman:+.2f} [{r.low:+.2f}, "
                    f"{r.high:+.2f}] (interval not corrected), Holm-corrected permutation "
                    f"{_p(p)}, n = {int(r.n)}"
                    + ("" if sig else ": not significant") + ".")
        out.append(Claim(section="memorised", subject=str(r.determinant), text=text,
                         statistic="spearman with the in-context outcome",
                         estimate=float(r.spearman), low=float(r.low), high=float(r.high),
                         p=float(p), significant=sig,
                         method="percentile bootstrap over examples; permutation, Holm"))
    return out


def _sparsity(value: float) -> str:
    return "beyond the grid" if value >= 100 else f"{value:.0f}%"


def sparsity_claims(thresholds: pd.DataFrame, comparison: pd.DataFrame) -> list[Claim]:
    """Weight sparsity (``thresholds`` and ``comparison``:
    :meth:`~mechicl.analyses.sparsity.SparsityCurves.thresholds` and ``.comparison``): per
    method and task group, where accuracy falls; per method, Jin et al.'s comparison (recall
    falls before in-context processing) with its verdict."""
    out = []
    for r in thresholds.itertuples(index=False):
        grid_end = bool(r.falls_at >= 100)
        sig = not grid_end
        chance = "" if r.above_chance else " (not above chance unpruned: uninformative)"
        group = {"in_context": "in-context"}.get(r.group, _heads(r.group))
        text = (f"{r.method} pruning, {group} tasks: accuracy {r.unpruned:.2f} "
                f"[{r.unpruned_low:.2f}, {r.unpruned_high:.2f}] unpruned{chance}; holds (drop "
                f"below {r.tolerance:.0%}) to {_sparsity(r.holds_to)} sparsity "
                f"[{_sparsity(r.holds_low)}, {_sparsity(r.holds_high)}]; "
                + ("falls nowhere within the grid (not significant)" if grid_end else
                   f"falls at {_sparsity(r.falls_at)} [{_sparsity(r.falls_low)}, "
                   f"{_sparsity(r.falls_high)}]")
                + f", n = {int(r.n)} prompts.")
        out.append(Claim(section="sparsity", subject=f"{r.method} {r.group}", text=text,
                         statistic="falls at (% sparsity)", estimate=float(r.falls_at),
                         low=float(r.falls_low), high=float(r.falls_high), significant=sig,
                         method="one-sided paired bootstrap over prompts per sparsity; "
                                "percentile bootstrap of the threshold"))
    for r in comparison.itertuples(index=False):
        sig = r.verdict in ("supported", "contradicted")
        text = str(r.sentence) + ("" if sig else " Not significant.")
        out.append(Claim(section="sparsity", subject=f"{r.method} recall vs in-context",
                         text=text, statistic="falls at: in-context minus recall (points)",
                         estimate=float(r.difference), low=float(r.difference_low),
                         high=float(r.difference_high), significant=sig,
                         method="percentile bootstrap, groups resampled independently"))
    return out


def reuse_claims(overlap: pd.DataFrame, roles: pd.DataFrame, tasks: Sequence[str]) -> list[Claim]:
    """Circuit reuse (``overlap`` and ``roles``: :class:`~mechicl.analyses.circuit_reuse.
    CircuitReuse`'s tables): how far the two tasks' head-effect maps agree, against random
    heads and against the layer-preserving null (Holm over the statistics), and which roles
    the same heads hold in both (Holm over the roles held on both tasks)."""
    a, b = (_heads(t) for t in tasks)
    out = []
    adjusted = holm(overlap["layer-null p"].astype(float).tolist())
    for r, p in zip(overlap.to_dict("records"), adjusted, strict=True):
        sig = bool(p < ALPHA)
        stat = (f"top-{int(r['k'])} overlap of |effect|" if r["statistic"] == "top_k" else
                {"spearman": "Spearman",
                 "within_layer_spearman": "within-layer Spearman"}[r["statistic"]])
        interval = f"[{r['low']:.2f}, {r['high']:.2f}]"
        if not r["low"] <= r["value"] <= r["high"]:
            # resampled pairs (drawn with repeats: fewer distinct ones) give noisier maps
            interval = (f"(bootstrap interval {interval} excludes it: the statistic depends on "
                        "the number of pairs, a biased estimate)")
        text = (f"{r['effect']} effects, {a} vs {b}: {stat} {r['value']:.2f} {interval}; "
                f"{r['plain-null expected']:.2f} expected for random heads, "
                f"{r['layer-null expected']:.2f} from layer structure alone (Holm {_p(p)}"
                + ("" if sig else ", not significant") + ").")
        out.append(Claim(section="circuit-reuse", subject=str(r["quantity"]), text=text,
                         statistic=stat, estimate=float(r["value"]), low=float(r["low"]),
                         high=float(r["high"]), p=float(p), significant=sig,
                         method="percentile bootstrap over pairs; permutation within layers, "
                                "one-sided, Holm"))
    held = roles[(roles[f"{tasks[0]} count"] > 0) & (roles[f"{tasks[1]} count"] > 0)]
    adjusted = holm(held["layer-null p"].astype(float).tolist())
    for r, p in zip(held.to_dict("records"), adjusted, strict=True):
        sig = bool(p < ALPHA)
        heads = f" ({r['heads']})" if r["heads"] else ""
        text = (f"{_heads(r['role'])} heads: {r[f'{tasks[0]} count']} on {a}, "
                f"{r[f'{tasks[1]} count']} on {b}, {r['value']:.0f} on both{heads}; "
                f"{r['layer-null expected']:.2f} shared expected from layer structure alone "
                f"(Holm {_p(p)}" + ("" if sig else ", not significant") + ").")
        out.append(Claim(section="circuit-reuse", subject=f"shared {r['role']}", text=text,
                         statistic="heads holding the role on both tasks",
                         estimate=float(r["value"]), low=float(r["low"]), high=float(r["high"]),
                         p=float(p), significant=sig,
                         method="percentile bootstrap over pairs; permutation within layers, "
                                "one-sided, Holm"))
    absent = [_heads(r) for r in roles.role[~roles.index.isin(held.index)]]
    if absent:
        out.append(Claim(section="circuit-reuse", subject="roles not held on both",
                         text=f"No head holds the {', '.join(absent)} role on both tasks "
                              "(a role is only compared when both tasks have it).",
                         statistic="roles held on one task or none",
                         estimate=float(len(absent)), method="role thresholds"))
    return out
