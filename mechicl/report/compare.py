"""Two models' reports side by side: where they agree, computed from their stored results.

:func:`compare_reports` reads two (or more) rendered reports (:class:`~mechicl.report.Report`
folders) of the same tasks and shot counts and puts their findings next to each other:

* **accuracy**: per task and shot count, each model's accuracy with its Wilson interval and the
  paired difference on the same prompts (the reports build the same seeded prompts for every
  model), with a percentile bootstrap interval over prompts and an exact McNemar test;
* **task classes** (in-context, recall only, at chance, below chance): whether both models put
  each task in the same class;
* **agreement of importance maps** across tasks: per model and shot count the median Spearman,
  what per-layer means alone give, within layers, and how many task pairs agree beyond the
  layer-preserving null;
* **induction heads vs importance**: per model and induction score, in how many task x shot
  maps the top-k overlap exceeds the layer-preserving null;
* **pruning**: the share of heads (and FFNs) removable per task and ranking, with intervals;
* **the causal check**: top-k induction heads vs random heads, per model.

Each model's pruning and causal rows name how its report removed a head or FFN (its
``ablation``: zero or mean), since the two can differ and matter on post-norm models.

Every sentence is a :class:`~mechicl.report.claims.Claim`; "the models agree" is said only of
a test both models pass or both fail, and a difference of accuracy only when its interval
excludes zero. Models differ in their number of heads, so pruning is compared in shares and the
causal check at each model's own ``k``.
"""

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mechicl._io import atomic_path
from mechicl.model.hooked import weights_description
from mechicl.report.build import Report
from mechicl.report.claims import ALPHA, Claim, causal_verdict, claims_table
from mechicl.report.render import Document
from mechicl.results import load_result
from mechicl.stats import mcnemar_exact, paired_bootstrap

__all__ = ["Comparison", "compare_reports"]

_TITLES = {"accuracy": "Accuracy on the same prompts", "classes": "Task classes",
           "agreement": "Agreement of importance maps across tasks",
           "overlap": "Induction heads vs importance", "pruning": "Pruning",
           "causal": "Causal check"}


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """Reports side by side.

    Attributes:
        models: the reports' model names, in order.
        tables: every table by name (``accuracy``, ``classes``, ``agreement``, ``overlap``,
            ``pruning``, ``causal``, ``claims``).
        claims: the findings.
        weights: per model, its weights' description (format, quantisation).
        ablations: per model, how its report removed heads and FFNs (``zero`` or ``mean``).
    """

    models: tuple[str, ...]
    tables: dict[str, pd.DataFrame] = field(repr=False)
    claims: list[Claim] = field(repr=False)
    weights: dict[str, str] = field(default_factory=dict, repr=False)
    ablations: dict[str, str] = field(default_factory=dict, repr=False)

    def markdown(self) -> str:
        """The comparison as a Markdown page: the claims by section, then the tables."""
        names = " and ".join(f"`{m}`" for m in self.models)
        doc = Document()
        doc.heading(1, f"Cross-model comparison: {names}")
        doc.text("Computed by `mechicl.report.compare_reports` from the two committed reports "
                 f"({datetime.date.today().isoformat()}). Weights: "
                 + "; ".join(f"`{m}`: {w}" for m, w in self.weights.items())
                 + ". Significance level 0.05 throughout; every sentence is a row of "
                 "`tables/claims.csv`." + _ablation_text(self.ablations))
        for section, title in _TITLES.items():
            found = [c for c in self.claims if c.section == section]
            table = self.tables.get(section)
            if not found and (table is None or table.empty):
                continue
            doc.heading(2, title)
            if found:
                doc.text("\n".join(f"- {c.text}" for c in found))
            if table is not None and not table.empty:
                doc.table(section, table)
        return doc.markdown()

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``cross-model.md`` and ``tables/<name>.csv`` into ``folder``, each file
        atomically."""
        out = Path(folder)
        for name, table in {**self.tables, "claims": claims_table(self.claims)}.items():
            with atomic_path(out / "tables" / f"{name}.csv") as tmp:
                tmp.write_text(table.to_csv(index=False), encoding="utf-8")
        with atomic_path(out / "cross-model.md") as tmp:
            tmp.write_text(self.markdown(), encoding="utf-8")
        return out


def _ablation_text(ablations: Mapping[str, str]) -> str:
    """The header's sentence on how each report removed heads and FFNs; a warning when they
    differ (pruning and causal rows are then not like for like).

    >>> print(_ablation_text({"a": "zero", "b": "mean"}))
     Heads and FFNs removed (pruning, FFN knock-out, causal check) by `a`: zero ablation; `b`: mean ablation. **The ablations differ, ...**
    """
    if not ablations:
        return ""
    text = (" Heads and FFNs removed (pruning, FFN knock-out, causal check) by "
            + "; ".join(f"`{m}`: {a} ablation" for m, a in ablations.items()) + ".")
    if len(set(ablations.values())) > 1:
        text += (" **The ablations differ, so the pruning and causal rows compare different "
                 "interventions as well as different models.**")
    return text


def _same_verdict(passed: list[bool]) -> bool:
    """Whether every model passed the test, or none did."""
    return all(passed) or not any(passed)


def compare_reports(reports: Mapping[str, Report | str | os.PathLike[str]], *,
                    n_resamples: int = 2000, seed: int = 0) -> Comparison:
    """Compare rendered reports of different models on the same tasks.

    Args:
        reports: model label -> a :class:`~mechicl.report.Report` or its folder (two or more;
            the first is the reference of the paired accuracy differences).
        n_resamples: bootstrap resamples of the paired accuracy differences.
        seed: seeds the resamples.

    Raises:
        ValueError: for fewer than two reports, or reports without a shared task and shot
            count.
    """
    loaded = {name: r if isinstance(r, Report) else Report.load(r) for name, r in reports.items()}
    if len(loaded) < 2:
        raise ValueError(f"compare_reports needs at least two reports, got {len(loaded)}")
    names = list(loaded)
    tasks = [t for t in loaded[names[0]].config.tasks
             if all(t in r.config.tasks for r in loaded.values())]
    shots = [s for s in loaded[names[0]].config.shots
             if all(s in r.config.shots for r in loaded.values())]
    if not tasks or not shots:
        raise ValueError("the reports share no task and shot count: nothing to compare")
    claims: list[Claim] = []
    tables = {"accuracy": _accuracy(loaded, tasks, shots, claims, n_resamples, seed),
              "classes": _classes(loaded, tasks, claims),
              "agreement": _agreement(loaded, claims),
              "overlap": _overlap(loaded, claims),
              "pruning": _pruning(loaded, claims),
              "causal": _causal(loaded, claims)}
    weights = {n: weights_description(r.model) for n, r in loaded.items()}
    ablations = {n: r.config.ablation for n, r in loaded.items()}
    return Comparison(models=tuple(names), tables=tables, claims=claims, weights=weights,
                      ablations=ablations)


def _correct(report: Report, task: str, shots: int) -> pd.Series:
    """Per-prompt correctness of one accuracy cell, by prompt id, from the stored result."""
    if report.out is None:
        result = report.results[f"accuracy/{task}-{shots}shot"]
    else:
        result = load_result(Path(report.out) / "results" / "accuracy" / f"{task}-{shots}shot")
    preds = result.predictions
    return pd.Series(preds["correct"].astype(float).to_numpy(), index=preds["id"].astype(str))


def _accuracy(reports: Mapping[str, Report], tasks: list[str], shots: list[int],
              claims: list[Claim], n_resamples: int, seed: int) -> pd.DataFrame:
    names = list(reports)
    ref, rows = names[0], []
    for other in names[1:]:
        diffs = []
        for task in tasks:
            for s in shots:
                a, b = _correct(reports[ref], task, s), _correct(reports[other], task, s)
                ids = a.index.intersection(b.index)
                if len(ids) == 0:
                    continue
                x, y = a.loc[ids].to_numpy(), b.loc[ids].to_numpy()
                boot = paired_bootstrap(x[None], y[None], n_resamples=n_resamples, seed=seed)
                p = mcnemar_exact(x, y)
                row = {"task": task, "shots": s, "n": len(ids), f"{ref}": float(x.mean()),
                       f"{other}": float(y.mean()), "difference": float(boot.estimate[0]),
                       "low": float(boot.low[0]), "high": float(boot.high[0]), "mcnemar p": p,
                       "a": ref, "b": other}
                rows.append(row)
                diffs.append(row)
        if not diffs:
            continue
        frame = pd.DataFrame(diffs)
        better = frame[frame.low > 0]
        worse = frame[frame.high < 0]
        cells = len(frame)
        same = cells - len(better) - len(worse)
        text = (f"Accuracy, {ref} minus {other} on the same prompts: {ref} is higher in "
                f"{len(better)} of {cells} task x shot cells, lower in {len(worse)}, and not "
                f"significantly different in {same} (paired percentile bootstrap 95% "
                f"intervals over prompts, uncorrected); median difference "
                f"{frame.difference.median():+.2f}.")
        claims.append(Claim(section="accuracy", subject=f"{ref} vs {other}", text=text,
                            statistic="cells with a significant difference",
                            estimate=float(len(better) + len(worse)) / cells,
                            significant=bool(len(better) + len(worse)),
                            method="paired percentile bootstrap over prompts; exact McNemar"))
    return pd.DataFrame(rows)


def _classes(reports: Mapping[str, Report], tasks: list[str],
             claims: list[Claim]) -> pd.DataFrame:
    names = list(reports)
    by_model = {n: r.tables["task-classes"].set_index("task")["class"]
                for n, r in reports.items() if "task-classes" in r.tables}
    if len(by_model) < 2:
        return pd.DataFrame()
    table = pd.DataFrame({"task": tasks, **{n: [by_model[n].get(t, "") for t in tasks]
                                             for n in by_model}})
    table["same class"] = table[list(by_model)].nunique(axis=1) == 1
    same = table[table["same class"]]
    both_icl = same[same[names[0]] == "in-context"].task.tolist()
    text = (f"Task classes agree for {len(same)} of {len(table)} tasks"
            + (f"; in-context in every model: {', '.join(both_icl)}" if both_icl
               else "; no task is in-context in every model")
            + "; classes differ for "
            + (", ".join(f"{r.task} ({', '.join(str(r[n]) for n in by_model)})"
                         for _, r in table[~table['same class']].iterrows()) or "none") + ".")
    claims.append(Claim(section="classes", subject="task classes", text=text,
                        statistic="tasks with the same class",
                        estimate=float(len(same)) / len(table), significant=False,
                        method="each model's classes (Wilson bounds; paired gain, McNemar, Holm)"))
    return table


def _agreement(reports: Mapping[str, Report], claims: list[Claim]) -> pd.DataFrame:
    rows = []
    for name, report in reports.items():
        pairs = report.tables.get("cross-task-pairs")
        if pairs is None or pairs.empty:
            continue
        for s, g in pairs.groupby("shots", sort=True):
            rows.append({"model": name, "shots": s, "pairs": len(g),
                         "median spearman": g.spearman.median(),
                         "median layer-means spearman": g["layer-means spearman"].median(),
                         "median within-layer spearman": g["within-layer spearman"].median(),
                         "pairs beyond layer null": int((g["layer-null p"] < ALPHA).sum())})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    for s, g in table.groupby("shots", sort=True):
        if len(g) < 2:
            continue
        layered = bool((g["median layer-means spearman"] >= 0.5 * g["median spearman"]).all())
        beyond = (g["pairs beyond layer null"] > 0).tolist()
        agree = _same_verdict(beyond)
        parts = "; ".join(
            f"{r.model}: median {r['median spearman']:.2f}, layer means alone "
            f"{r['median layer-means spearman']:.2f}, within layers "
            f"{r['median within-layer spearman']:.2f}, {r['pairs beyond layer null']} of "
            f"{r.pairs} pairs beyond the layer-preserving null" for _, r in g.iterrows())
        verdict = ("the models agree: " + ("in both, some task pairs agree beyond layer "
                                           "structure" if all(beyond) else
                                           "in neither does any pair agree beyond layer "
                                           "structure")) if agree else (
            "the models disagree on whether any pair agrees beyond layer structure")
        text = (f"{s}-shot importance maps across tasks ({parts}): {verdict}"
                + ("; in both, per-layer means alone give at least half of the whole-map "
                   "median" if layered else "") + ".")
        claims.append(Claim(section="agreement", subject=f"{s}-shot", text=text,
                            statistic="models with pairs beyond the layer-preserving null",
                            estimate=float(sum(beyond)) / len(beyond), significant=agree,
                            method="each model: permutation within layers, one-sided"))
    return table


def _overlap(reports: Mapping[str, Report], claims: list[Claim]) -> pd.DataFrame:
    rows = []
    for name, report in reports.items():
        overlap, classes = report.tables.get("overlap"), report.tables.get("task-classes")
        if overlap is None or overlap.empty:
            continue
        icl = set() if classes is None else set(
            classes[classes["class"] == "in-context"].task)
        topk = next(c for c in overlap.columns if c.startswith("top-") and c.endswith("overlap"))
        for score, g in overlap.groupby("induction score", sort=False):
            for scope, rows_ in (("in-context tasks", g[g.task.isin(icl)]), ("all tasks", g)):
                if rows_.empty:
                    continue
                rows.append({"model": name, "induction score": score, "scope": scope,
                             "maps": len(rows_), f"median {topk}": rows_[topk].median(),
                             "beyond chance": int((rows_["hypergeom p"] < ALPHA).sum()),
                             "beyond layer null": int((rows_["layer-null p (top-k)"]
                                                       < ALPHA).sum())})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    for (score, scope), g in table.groupby(["induction score", "scope"], sort=False):
        if len(g) < 2:
            continue
        beyond = (g["beyond layer null"] > 0).tolist()
        agree = _same_verdict(beyond)
        parts = "; ".join(f"{r.model}: {r['beyond layer null']} of {r.maps} maps beyond the "
                          f"layer-preserving null ({r['beyond chance']} beyond chance)"
                          for _, r in g.iterrows())
        verdict = (("the models agree" + (": the overlap survives the layer control in both"
                                          if all(beyond) else ": in neither does it survive "
                                          "the layer control")) if agree
                   else "the models disagree")
        text = f"{str(score).replace('_', ' ')} vs importance, {scope} ({parts}): {verdict}."
        claims.append(Claim(section="overlap", subject=f"{score} {scope}", text=text,
                            statistic="models with maps beyond the layer-preserving null",
                            estimate=float(sum(beyond)) / len(beyond), significant=agree,
                            method="each model: permutation within layers, one-sided"))
    return table


def _pruning(reports: Mapping[str, Report], claims: list[Claim]) -> pd.DataFrame:
    rows = []
    for name, report in reports.items():
        for unit, stem in (("heads", "prune-heads-summary"), ("FFNs", "prune-ffn-summary")):
            summary = report.tables.get(stem)
            if summary is None or summary.empty:
                continue
            for _, r in summary.iterrows():
                ranking = str(r["ranking"])
                rows.append({"model": name, "ablation": report.config.ablation, "unit": unit,
                             "task": r.task, "shots": r.shots,
                             # the task's own / another task's ranking, by kind (labels
                             # name the tasks)
                             "ranking": ranking.split(" (", 1)[0] + (
                                 ", most important first" if ranking.endswith(
                                     "most important first") else ""),
                             "label": ranking, "removable %": r.removable,
                             "estimate %": r.estimate, "low %": r.low, "high %": r.high,
                             "n": r.n})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    for (unit, task, s, ranking), g in table.groupby(["unit", "task", "shots", "ranking"],
                                                     sort=False):
        if len(g) < 2:
            continue
        removable = (g["removable %"] > 0).tolist()
        agree = _same_verdict(removable)
        parts = "; ".join(f"{r.model} ({r.ablation} ablation): {r['removable %']:g}% "
                          f"removable (estimate "
                          f"{r['estimate %']:g}%, 90% interval [{r['low %']:g}%, "
                          f"{r['high %']:g}%])" for _, r in g.iterrows())
        text = (f"{task} {s}-shot, pruning {unit} by {ranking} ({parts}): "
                + ("the models agree that some share is removable" if agree and all(removable)
                   else "the models agree that no share passes the test" if agree
                   else "the models disagree on whether any share is removable") + ".")
        claims.append(Claim(section="pruning", subject=f"{task} {unit} {ranking}", text=text,
                            statistic="models with a removable share",
                            estimate=float(sum(removable)) / len(removable), significant=agree,
                            method="each model: one-sided paired bootstrap over prompts"))
    return table


def _causal(reports: Mapping[str, Report], claims: list[Claim]) -> pd.DataFrame:
    frames = []
    for name, report in reports.items():
        causal = report.tables.get("causal")
        if causal is not None and not causal.empty:
            frames.append(causal.assign(model=name, ablation=report.config.ablation))
    if not frames:
        return pd.DataFrame()
    table = pd.concat(frames, ignore_index=True)

    table["verdict"] = [causal_verdict(r.measure, r.diff, r.diff_low, r.diff_high)
                        for r in table.itertuples(index=False)]
    columns = ["model", "ablation", "subject", "shots", "k", "measure", "unablated", "top",
               "random_mean", "diff", "diff_low", "diff_high", "p", "verdict"]
    table = table[columns]
    for subject, g in table.groupby("subject", sort=False):
        if g.model.nunique() < 2:
            continue
        parts = "; ".join(f"{r.model} ({r.ablation} ablation) k = {r.k}: top minus random "
                          f"{r.diff:+.2f} [{r.diff_low:+.2f}, {r.diff_high:+.2f}] ({r.verdict})"
                          for r in g.itertuples(index=False))
        verdicts = set(g.verdict)
        agree = len(verdicts) == 1
        text = (f"Causal check on {subject} ({parts}): "
                + (f"the models agree at every k ({next(iter(verdicts))} than random heads)"
                   if agree and verdicts != {"no difference"} else
                   "the models agree at every k: not significantly different from random heads"
                   if agree else "the verdicts differ between models or k") + ".")
        claims.append(Claim(section="causal", subject=str(subject), text=text,
                            statistic="same verdict in every model and k",
                            estimate=float(agree), significant=agree,
                            method="each model: paired percentile bootstrap"))
    return table
