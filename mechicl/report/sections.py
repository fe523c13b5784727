"""The report's sections beyond Bansal et al.'s (issue 23): what carries the answer read in the
context and what carries the memorised one.

``mechicl report --sections`` chooses them (:data:`SECTIONS`); each is the analyses of one
question, run at their registered defaults and seeded by the report's seed, shown with their own
figures and tables, and with findings computed from those tables (:mod:`mechicl.report.claims`):

- ``in-context-vs-memorised`` (Yu, Merullo & Pavlick 2023): per-head and per-FFN direct
  attribution to ``logit(in-context) - logit(memorised)`` on the capital prompt pairs, scaling
  the top heads' outputs against random heads, and what the in-context rate depends on
  (:mod:`mechicl.analyses.recall`), on :data:`SECTION_TASK`.
- ``sparsity`` (Jin et al. 2024): accuracy against unstructured weight sparsity (magnitude and
  Wanda) for closed-book recall vs in-context processing (:mod:`mechicl.analyses.sparsity`).
- ``circuit-reuse`` (Merullo, Eickhoff & Pavlick 2024): IOI vs Colored Objects head effects,
  their overlap against the layer-preserving null, and shared roles
  (:mod:`mechicl.analyses.circuit_reuse`).

Other settings: run the analyses' own commands (``mechicl answer-attribution`` ...).
"""

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from mechicl.analyses import Job
from mechicl.analyses.circuit_reuse import CIRCUIT_REUSE, CircuitReuse, reuse_figures
from mechicl.analyses.recall import (
    ANSWER_ATTRIBUTION,
    ANSWER_DETERMINANTS,
    SCORE_KINDS,
    VALUE_SCALING,
    AnswerAttribution,
    AnswerDeterminants,
    ValueScaling,
)
from mechicl.analyses.sparsity import SPARSITY_CURVES, SparsityCurves, sparsity_figure
from mechicl.plotting import head_heatmap, layer_bars
from mechicl.report.claims import (
    Claim,
    attribution_claims,
    determinant_claims,
    reuse_claims,
    scaling_claims,
    sparsity_claims,
)
from mechicl.report.render import Document

__all__ = ["SECTIONS", "SECTION_TASK", "render_sections", "section_jobs"]

SECTIONS: tuple[str, ...] = ("paper", "in-context-vs-memorised", "sparsity", "circuit-reuse")
"""The report's sections: ``paper`` is Bansal et al.'s report (accuracy, induction heads,
importance, pruning, overlap, the causal check); the others are this module's."""

SECTION_TASK = "counterfactual_capital"
"""The task of value scaling and of the answer determinants: a counterfactual capital stated in
the context against the memorised one."""

_TOP_ROWS = 10  # components listed in the attribution table (the full table is stored)

# the results' names under results/ (section_jobs' keys, render_sections' lookups)
_ATTRIBUTION, _SCALING, _DETERMINANTS = ("memorised/attribution", "memorised/value-scaling",
                                         "memorised/determinants")
_CURVES, _REUSE = "sparsity/curves", "circuit-reuse/ioi-colored-objects"


def section_jobs(sections: Sequence[str], model: str, seed: int) -> dict[str, Job]:
    """The jobs of the chosen sections other than ``paper``, by their name under
    ``results/``: each analysis at its registered defaults, seeded by ``seed``."""
    jobs: dict[str, Job] = {}
    if "in-context-vs-memorised" in sections:
        jobs[_ATTRIBUTION] = ANSWER_ATTRIBUTION.job(model, {}, seed=seed)
        jobs[_SCALING] = VALUE_SCALING.job(model, {}, seed=seed, task=SECTION_TASK, shots=0)
        jobs[_DETERMINANTS] = ANSWER_DETERMINANTS.job(model, {}, seed=seed, task=SECTION_TASK,
                                                      shots=0)
    if "sparsity" in sections:
        jobs[_CURVES] = SPARSITY_CURVES.job(model, {}, seed=seed)
    if "circuit-reuse" in sections:
        jobs[_REUSE] = CIRCUIT_REUSE.job(model, {}, seed=seed)
    return jobs


def render_sections(doc: Document, claims: list[Claim], sections: Sequence[str],
                    results: Mapping[str, Any], *, kv_group_size: int) -> None:
    """Append the chosen sections (other than ``paper``) to ``doc`` and their findings to
    ``claims``, from the results named as :func:`section_jobs` names them."""
    if "in-context-vs-memorised" in sections:
        _memorised(doc, claims, results[_ATTRIBUTION], results[_SCALING],
                   results[_DETERMINANTS], kv_group_size)
    if "sparsity" in sections:
        _sparsity(doc, claims, results[_CURVES])
    if "circuit-reuse" in sections:
        _reuse(doc, claims, results[_REUSE])


def _bullets(doc: Document, found: Sequence[Claim]) -> None:
    doc.text("\n".join(f"- {c.text}" for c in found))


def _memorised(doc: Document, claims: list[Claim], attribution: AnswerAttribution,
               scaling: ValueScaling, determinants: AnswerDeterminants, group: int) -> None:
    doc.heading(2, "In-context vs memorised answers")
    p = attribution.params
    doc.text(
        f"Yu, Merullo & Pavlick (2023). {attribution.n} prompt pairs (`{p.get('pairs')}`) "
        "state a counterfactual capital in the context; the in-context answer is that city, the "
        "memorised one the real capital. Each head's and FFN's direct logit attribution (DLA) to "
        "`logit(in-context) - logit(memorised)` at the answer position passes its output "
        "through the final norm with the norm's scale frozen at the clean run (the field's "
        "convention); the exact direct effect removes the component's direct path and "
        "recomputes the norm. Positive: favours the in-context answer. Intervals: "
        f"{attribution.table().interval.iloc[0]}, the prompt pairs resampled. The parts (heads, FFNs, "
        f"embeddings and biases) sum to the model's logit difference within "
        f"{attribution.closure():.1e}.")
    doc.figures_row([(f"memorised-heads-{kind}", head_heatmap(
        attribution.head_scores(kind), signed=True, kv_group_size=group,
        colorbar_title="logit diff",
        title=f"{kind.upper()}: in-context minus memorised")) for kind in SCORE_KINDS],
        "Per-head direct effect on the in-context minus memorised logit (mean over pairs; "
        "diverging scale centred at 0, red: favours the in-context answer).")
    doc.figures_row([(f"memorised-ffn-{kind}", layer_bars(
        attribution.ffn_scores(kind), yaxis_title=f"FFN {kind.upper()}",
        title=f"FFN {kind.upper()}: logit(in-context) - logit(memorised)"))
        for kind in SCORE_KINDS], "Per-layer FFN direct effect; error bars: one standard "
        "error over pairs.")
    table = attribution.table()
    doc.tables["memorised-components-all"] = table
    top = table.reindex(table.dla_mean.abs().sort_values(ascending=False).index[:_TOP_ROWS])
    doc.table("memorised-components", top.drop(columns=["interval"]),
              f"The {_TOP_ROWS} components with the largest |DLA| (every component in "
              "memorised-components-all.csv)")
    agreement = pd.DataFrame([{k: v for k, v in attribution.agreement().items()
                               if k not in ("null", "spearman_interval")}])
    doc.tables["memorised-agreement"] = agreement
    found = attribution_claims(table, agreement)
    claims += found
    _bullets(doc, found)

    doc.heading(3, "Scaling the top heads' outputs")
    sp = scaling.params
    doc.text(
        f"The outputs (`hook_z`) of the {sp.get('n_heads')} heads with the largest and the "
        f"smallest {str(sp.get('kind', 'dla')).upper()} are multiplied by each factor on "
        f"{scaling.n} prompts of `{sp.get('task', SECTION_TASK)}` at {sp.get('shots', 0)} shots "
        f"(not the attribution's prompts); the null: {scaling.draws} random sets of the same "
        "number of heads (band: 5-95% of their shares). Share: the prompts whose in-context "
        "answer's summed log-likelihood exceeds the memorised one's.")
    doc.figures_row([("memorised-value-scaling", scaling.figure())],
                    "Share of in-context answers against the factor (1: the unchanged model); "
                    "error bars: 95% Wilson intervals.")
    scaled = scaling.table()
    doc.table("memorised-value-scaling", scaled.drop(columns=["test", "interval"]),
              "Per factor and head set: share (Wilson 95%), and for the top sets the paired "
              "difference to the random sets' mean (percentile bootstrap over prompts)")
    found = scaling_claims(scaled)
    claims += found
    _bullets(doc, found)

    doc.heading(3, "What the in-context rate depends on")
    doc.text(
        "No training data are available offline: a name's frequency is proxied by (i) the "
        f"{determinants.params.get('frequency_proxy')}, and (ii) its number of tokens (both "
        "labelled as proxies); the model's own closed-book confidence is the log-probability "
        f"of the memorised capital after `{determinants.params.get('closed_book')}`. "
        f"{len(determinants.data)} examples of `{determinants.params.get('task')}` at "
        f"{determinants.params.get('shots')} shots.")
    stats = determinants.statistics()
    doc.figures_row([("memorised-determinants", determinants.figure())],
                    "In-context rate by tercile of each determinant (95% Wilson intervals).")
    doc.table("memorised-determinants", stats.drop(columns=["interval", "null"]),
              "Spearman of each determinant with the in-context outcome and with the margin "
              "(percentile bootstrap interval over examples, permutation p-value)")
    doc.tables["memorised-terciles"] = determinants.terciles()
    found = determinant_claims(stats)
    claims += found
    _bullets(doc, found)


def _sparsity(doc: Document, claims: list[Claim], curves: SparsityCurves) -> None:
    doc.heading(2, "Weight sparsity: recall vs in-context processing")
    p = curves.params
    calibration = p.get("calibration") or {}
    doc.text(
        "Jin et al. (2024): unstructured pruning of every linear layer in the blocks, per "
        f"output row ({', '.join(p.get('methods', []))}; magnitude: |W|; Wanda: |W| x the "
        "input feature's norm"
        + (f", calibrated block by block on {calibration.get('tokens_without_bos')} tokens of "
           f"{calibration.get('text')}" if calibration else "") + "). "
        f"Recall: closed-book facts at 0 shots ({', '.join(p.get('recall_tasks', []))}); "
        "in-context: the same facts stated in the context, counterfactual facts, labels "
        "unrelated to the task, repeated words "
        f"({', '.join(p.get('icl_tasks', []))}); {p.get('n')} prompts per task. A group "
        "'falls' at the first sparsity whose accuracy drop from unpruned exceeds "
        f"{float(p.get('tolerance', 0.05)):.0%} by a one-sided paired bootstrap test over "
        "prompts (alpha 0.05); its interval: the percentile bootstrap of that threshold.")
    doc.figures_row([("sparsity-curves", sparsity_figure(curves))],
                    "Accuracy against sparsity per group (95% intervals); dashed: chance.")
    thresholds, comparison = curves.thresholds(), curves.comparison()
    doc.table("sparsity-thresholds", thresholds, "Where each group holds and falls")
    doc.table("sparsity-comparison", comparison.drop(columns=["sentence"]),
              "Jin et al.'s comparison per method: in-context minus recall threshold")
    doc.tables["sparsity-tasks"] = curves.tasks()
    found = sparsity_claims(thresholds, comparison)
    claims += found
    _bullets(doc, found)


def _reuse(doc: Document, claims: list[Claim], reuse: CircuitReuse) -> None:
    doc.heading(2, "Circuit reuse: IOI vs Colored Objects")
    a, b = reuse.tasks
    doc.text(
        f"Merullo, Eickhoff & Pavlick (2024). Per head, on {reuse.circuits[0].n} {a} and "
        f"{reuse.circuits[1].n} {b} prompt pairs: the activation-patching effect (the head's "
        "output from the corrupted run) and the path-patching effect on the logits "
        "(direct), as shares of the clean-corrupted logit difference. The maps are compared "
        "by top-k overlap and rank correlations, against random heads and against the "
        "layer-preserving null (heads permuted within layers); roles (name movers, "
        "S-inhibition, duplicate-token, induction analogues) from the effects and attention "
        "patterns.")
    figures = reuse_figures(reuse, "circuit-reuse")
    for effect in ("activation", "direct"):
        doc.figures_row([(name, fig) for name, fig in figures.items()
                         if name.startswith(f"circuit-reuse-{effect}-")])
    doc.table("circuit-reuse-overlap", reuse.overlap, "The two tasks' head-effect maps compared")
    doc.table("circuit-reuse-roles", reuse.roles, "Heads holding each role on both tasks")
    found = reuse_claims(reuse.overlap, reuse.roles, reuse.tasks)
    claims += found
    _bullets(doc, found)
