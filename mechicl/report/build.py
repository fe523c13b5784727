"""The paper report: every figure type of Bansal et al. (2023) for one model, with a summary.

The report is an analysis like the others (``report`` in the registry, so grids run it too)
whose inputs are the results it shows: one induction scan, ICL accuracy and head importance per
task x shot count, FFN knock-out importance, head and FFN pruning curves (by the task's own
importance, by another task's, with the highest induction scores first, random), computed as
jobs of their own through the result store (:func:`report_jobs`). :func:`build_report` runs
them (what is stored already is reused, in this folder, in ``reuse`` folders or in the store),
renders the report and writes, into one folder::

    report.md, report.html      the summary (tables + figures; the HTML is interactive)
    result.json                 the settings and provenance (a result folder: checksummed)
    img/<figure>.png            every figure (other formats on request), and its plotly JSON
    tables/<table>.csv          every table (and .parquet)
    results/<kind>/<name>/      every result it shows, with results/index.json (their keys)

``sections`` chooses what the report shows: ``paper`` (all of the above, the default) and the
sections beyond the paper of :mod:`mechicl.report.sections` (in-context vs memorised answers,
weight sparsity, circuit reuse), in one report or alone.

Prompt split per task and shot count (one seeded list of k-shot prompts): the first ``n`` give
the importance maps (and so the pruning rankings); the next ``eval_n`` give the accuracies and
the pruning curves, so rankings are never evaluated on their own prompts.
"""

import base64
import dataclasses
import datetime
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.offline
import torch
from torch import Tensor

from mechicl._io import atomic_path
from mechicl._version import __version__
from mechicl.analyses import Analysis, Call, Job, Option, batch_tokens_option, register_analysis
from mechicl.analyses.causal import (
    DEFAULT_KS,
    INDUCTION_ABLATION,
    INDUCTION_ABLATION_TASK,
    MIN_DRAWS,
    InductionAblation,
)
from mechicl.analyses.evaluation import ACCURACY, EvalResult
from mechicl.analyses.icl import icl_validity, task_classes
from mechicl.analyses.importance import (
    FFN_IMPORTANCE,
    HEAD_IMPORTANCE,
    IMPORTANCE_LABELS,
    IMPORTANCE_METHODS,
    compare_methods,
    importance_label,
    is_signed,
    parse_importance_label,
    resampled_maps,
)
from mechicl.analyses.induction import SCAN, SCORES
from mechicl.analyses.overlap import (
    OVERLAP,
    overlap_matrix,
    overlap_table,
    percentile_interval,
    permutation_pvalue,
    spearman,
    spearman_rows,
    top_k,
    within_layer_spearman,
)
from mechicl.analyses.pruning import (
    PRUNING,
    PruneCurve,
    split_prompts,
)
from mechicl.experiments.grid import ModelEntry
from mechicl.experiments.runner import LocalExecutor, run_jobs
from mechicl.experiments.store import ResultStore, as_store, index_text
from mechicl.inputs.tasks import BUILTIN_TASKS, TASKS
from mechicl.model.hooked import HookedModel, as_hooked_model, weights_description
from mechicl.plotting import (
    FORMATS,
    ablation_figure,
    accuracy_figure,
    check_formats,
    head_heatmap,
    kv_group_size,
    layer_bars,
    loss_curve,
    matrix_heatmap,
    prune_curve_figure,
    save_figure,
    score_scatter,
)
from mechicl.report.claims import (
    Claim,
    agreement_claims,
    causal_claims,
    claims_table,
    icl_claims,
    method_claims,
    overlap_claims,
    pruning_claims,
)
from mechicl.report.render import Document
from mechicl.report.sections import SECTIONS, render_sections, section_jobs
from mechicl.results import HeadScores, LayerScores, read_result, result_type, write_result
from mechicl.stats import bootstrap_weights

__all__ = ["REPORT", "Report", "ReportConfig", "build_report", "render_report", "report_jobs"]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Settings: the report's options, declared once (the registry record, ReportConfig, the CLI)
# --------------------------------------------------------------------------------------------

REPORT_OPTIONS: tuple[Option, ...] = (
    Option(name="sections", type=list, item=str, default=["paper"], choices=SECTIONS,
           help="what the report shows: paper (Bansal et al.'s report), in-context-vs-memorised, "
                "sparsity, circuit-reuse (mechicl.report.sections)"),
    Option(name="tasks", type=list, item=str, default=None, nullable=True,
           choices=lambda: list(TASKS), registry="task",
           help="tasks for importance, accuracy and overlap (default: the shipped tasks, BUILTIN_TASKS)"),
    Option(name="shots", type=list, item=int, default=[0, 1, 5], minimum=0,
           help="shot counts (the paper's 0, 1, 5)"),
    Option(name="n", type=int, default=HEAD_IMPORTANCE.option("n").default, minimum=1,
           help="importance prompts per task and shot count"),
    Option(name="eval_n", type=int, default=PRUNING.option("eval_n").default, minimum=1,
           help="further prompts per task and shot count for accuracy and pruning curves"),
    Option(name="method", type=str, default="bansal", choices=IMPORTANCE_METHODS,
           help="importance method"),
    Option(name="scores", type=list, item=str, default=["prefix_matching", "copying"],
           choices=SCORES, parse=SCAN.option("scores").parse,
           help="induction scores shown (the first ranks the pruning curves, both directions)"),
    Option(name="scan_seeds", type=int, default=SCAN.option("n_seeds").default, minimum=1,
           help="random sequences of the induction scan"),
    Option(name="scan_length", type=int, default=None, nullable=True, minimum=2,
           help="one length L for every scan sequence (default: 2s + 25)"),
    Option(name="prune_tasks", type=list, item=str, default=["country_capital", "antonyms"],
           non_empty=False, choices=lambda: list(TASKS), registry="task",
           help="tasks with pruning curves and FFN knock-out (a subset of tasks)"),
    Option(name="prune_shots", type=list, item=int, default=[1], minimum=0,
           help="shot counts of the pruning curves (a subset of shots)"),
    dataclasses.replace(PRUNING.option("percents"),
                        default=[0.0, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 70.0, 90.0],
                        help="percentages of heads removed along the head pruning curves "
                             "(dense where accuracy collapses)"),
    dataclasses.replace(PRUNING.option("ffn_percents"),
                        default=[0.0, 10.0, 20.0, 30.0, 40.0, 50.0],
                        help="percentages of FFNs removed along the FFN pruning curves"),
    Option(name="draws", type=int, default=PRUNING.option("draws").default, minimum=0,
           help="random pruning orders per curve"),
    Option(name="ffn", type=bool, default=True, help="FFN knock-out and FFN pruning curves"),
    dataclasses.replace(PRUNING.option("ablation"),
                        help="how the pruning curves, FFN knock-out and the causal check "
                             "remove a head or FFN: zero its output, or replace it by its mean "
                             "over the evaluated inputs (mean: advised for models that "
                             "normalise a block's output, e.g. Gemma)"),
    Option(name="compare_methods", type=list, item=str,
           default=["michel", "ablation", "ablation-mean", "attribution", "attribution-mean"],
           non_empty=False, choices=IMPORTANCE_LABELS,
           help="importance methods shown next to `method` for the prune tasks at the prune "
                "shots (-mean: mean ablation; empty: none)"),
    Option(name="causal_ks", type=list, item=int, default=list(DEFAULT_KS), non_empty=False,
           minimum=1, help="the causal check: the top k heads of the first induction score "
                           "ablated vs k random heads, on repeated random sequences and on the "
                           "prune tasks at the prune shots (empty: no check)"),
    Option(name="importance_scale", type=str, default="log", choices=("linear", "per_layer", "log"),
           help="colour scale of the importance heatmaps (log: middle layers readable)"),
    # the overlap statistics are the overlap analysis's
    *(OVERLAP.option(name) for name in ("top_k_percent", "n_permutations", "n_resamples")),
    Option(name="formats", type=list, item=str, default=["png"], choices=FORMATS,
           help="figure formats written to img/ (PNG always: report.md embeds it)"),
    batch_tokens_option(
        help="rows x longest row per forward pass (scan, accuracy, FFNs, pruning)"),
    Option(name="importance_batch_tokens", type=int, default=None, nullable=True, minimum=1,
           role="execution", help="the same for head importance (default: its own, 2048)"),
)


def _check(options: dict[str, Any], tasks: Sequence[str], shots: Sequence[int]) -> None:
    chosen = options["tasks"] if options["tasks"] is not None else list(BUILTIN_TASKS)
    assert OVERLAP.check is not None
    OVERLAP.check(options, tasks, shots)  # its statistics are the overlap analysis's
    missing = [t for t in options["prune_tasks"] if t not in chosen]
    if missing:
        raise ValueError(f"prune_tasks {missing} are not in tasks={chosen}")
    missing_shots = [s for s in options["prune_shots"] if s not in options["shots"]]
    if missing_shots:
        raise ValueError(f"prune_shots {missing_shots} are not in shots={options['shots']}")


_STRING_OPTIONS = frozenset(o.name for o in REPORT_OPTIONS if o.type is str)
"""The options whose value is one string (every other str value is a list given as a string)."""


def _default(name: str) -> Any:
    value = next(o for o in REPORT_OPTIONS if o.name == name).default
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True, kw_only=True)
class ReportConfig:
    """What the report computes: the ``report`` analysis's options (their defaults and checks
    are the registry's, :data:`REPORT`) plus the seed. The defaults give the committed report
    of the default model.

    Attributes:
        sections: what the report shows (:data:`~mechicl.report.sections.SECTIONS`):
            ``paper`` (Bansal et al.'s report, the default; every option below is its) and
            the sections of :mod:`mechicl.report.sections`, each computed at its analyses'
            registered defaults.
        tasks: tasks for importance, accuracy and overlap (default: the shipped tasks, :data:`~mechicl.inputs.tasks.BUILTIN_TASKS`).
        shots: shot counts (default 0, 1, 5 as the paper).
        n: prompts per task and shot count for the importance maps.
        eval_n: further prompts per task and shot count for accuracy and pruning curves.
        method: importance method (``bansal``, ``michel`` or ``ablation``).
        scores: induction scores shown (from one scan of every score).
        scan_seeds: random sequences of the scan.
        scan_length: one length L for every scan sequence (default: Bansal et al.'s
            L = 2s + 25 for seed index s); small vocabularies need a short one.
        prune_tasks: tasks with pruning curves and FFN knock-out (a subset of ``tasks``).
        prune_shots: shot counts of the pruning curves and FFN knock-out (a subset of ``shots``).
        percents: percentages of heads removed along the head pruning curves.
        ffn_percents: percentages of FFNs removed along the FFN pruning curves.
        draws: random-ranking draws per pruning curve.
        ffn: compute FFN knock-out importance and FFN pruning curves.
        ablation: how the pruning curves, FFN knock-out and the causal check remove a head or
            an FFN: ``zero`` (its output zeroed, as Bansal et al. and Michel et al. mask) or
            ``mean`` (replaced by its mean over the evaluated prompts or sequences). Models that
            normalise a block's output before the residual stream (Gemma's post-attention
            RMSNorm) shift more under zero ablation: docs/concepts/causal.md measures how
            much.
        compare_methods: importance methods (labels of
            :data:`~mechicl.analyses.importance.IMPORTANCE_LABELS`) mapped next to ``method``
            for the prune tasks at the prune shots: their agreement and their overlap with the
            induction heads.
        causal_ks: head counts of the causal check (top-k heads of the first induction score
            ablated vs ``max(draws, 20)`` sets of k random heads; on repeated random sequences
            and on the prune tasks at the prune shots); empty: no check.
        importance_scale: colour scale of the importance heatmaps: ``linear`` (each map divided
            by its maximum), ``per_layer`` (each layer by its own maximum) or ``log`` (log10 of
            the map divided by its maximum; the default, so that the middle layers are
            readable next to the dominant first and last layers).
        top_k_percent: "top heads" for the overlap statistics: this percentage of all heads.
        n_permutations: permutations of the permutation p-values.
        n_resamples: bootstrap resamples of the confidence intervals.
        formats: figure formats written to ``img/`` (PNG is always written: report.md embeds it).
        batch_tokens: rows x longest row per forward pass (scans, accuracy, FFN knock-out,
            pruning curves).
        importance_batch_tokens: the same for head importance (None: its default, 2048 for
            gradients). A memory budget (:func:`build_report`) sizes every job instead.
        seed: seeds prompts, scans, random rankings, permutations and resamples.
    """

    sections: tuple[str, ...] = _default("sections")
    tasks: tuple[str, ...] = BUILTIN_TASKS
    shots: tuple[int, ...] = _default("shots")
    n: int = _default("n")
    eval_n: int = _default("eval_n")
    method: str = _default("method")
    scores: tuple[str, ...] = _default("scores")
    scan_seeds: int = _default("scan_seeds")
    scan_length: int | None = _default("scan_length")
    prune_tasks: tuple[str, ...] = _default("prune_tasks")
    prune_shots: tuple[int, ...] = _default("prune_shots")
    percents: tuple[int | float, ...] = _default("percents")
    ffn_percents: tuple[int | float, ...] = _default("ffn_percents")
    draws: int = _default("draws")
    ffn: bool = _default("ffn")
    ablation: str = _default("ablation")
    compare_methods: tuple[str, ...] = _default("compare_methods")
    causal_ks: tuple[int, ...] = _default("causal_ks")
    importance_scale: str = _default("importance_scale")
    top_k_percent: int | float = _default("top_k_percent")
    n_permutations: int = _default("n_permutations")
    n_resamples: int = _default("n_resamples")
    formats: tuple[str, ...] = _default("formats")
    batch_tokens: int = _default("batch_tokens")
    importance_batch_tokens: int | None = _default("importance_batch_tokens")
    seed: int = 0

    def __post_init__(self) -> None:
        for name, value in self.options().items():
            if isinstance(value, str | bytes) and name not in _STRING_OPTIONS:
                raise ValueError(f"{name}={value!r} must be a sequence (e.g. a tuple)")
        if not self.tasks:
            raise ValueError("tasks=() is empty: give at least one task")
        resolved = REPORT.resolve(self.options(), where="report")
        for name, value in resolved.items():
            object.__setattr__(self, name, tuple(value) if isinstance(value, list) else value)

    def options(self) -> dict[str, Any]:
        """The ``report`` analysis's options (everything but the seed), lists for tuples."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items() if k != "seed"}

    def to_dict(self) -> dict[str, Any]:
        return {**self.options(), "seed": self.seed}

    @classmethod
    def unchecked(cls, data: Mapping[str, Any]) -> "ReportConfig":
        """The settings of a stored report (``to_dict()``'s output), as they were: not
        validated again, so that a report whose tasks are not registered in this process
        still loads."""
        config = object.__new__(cls)
        for name, spec in cls.__dataclass_fields__.items():
            if name in data:
                value = data[name]
            elif name in _ADDED_LATER:  # a report written before the option existed
                value = _ADDED_LATER[name]
            elif spec.default_factory is not dataclasses.MISSING:
                value = spec.default_factory()
            else:
                value = spec.default
            object.__setattr__(config, name, tuple(value) if isinstance(value, list) else value)
        return config

    @classmethod
    def from_job(cls, job: Job) -> "ReportConfig":
        """The settings of a ``report`` job."""
        options = dict(job.options)
        if options.get("tasks") is None:
            options["tasks"] = list(BUILTIN_TASKS)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()},
                   seed=job.seed)


_ADDED_LATER: dict[str, Any] = {"compare_methods": (), "causal_ks": (), "sections": ("paper",),
                                "ablation": "zero"}
"""Options a stored report may lack, with the value that reproduces it (mechicl 0.3 added
them)."""

# --------------------------------------------------------------------------------------------
# The report's jobs
# --------------------------------------------------------------------------------------------


def report_jobs(config: ReportConfig, model: str) -> dict[str, Job]:
    """Every result the report shows, as jobs of their analyses, by the name of its folder
    under ``results/``: for the ``paper`` section the scan (every score), accuracy on the
    ``eval_n`` prompts after the ``n`` importance prompts, head importance, FFN knock-out
    importance, the head and FFN pruning curves of the prune tasks (whose rankings are the
    importance jobs and the scan) and the causal check; then the other sections' jobs
    (:func:`~mechicl.report.sections.section_jobs`)."""
    jobs = _paper_jobs(config, model) if "paper" in config.sections else {}
    return {**jobs, **section_jobs(config.sections, model, config.seed)}


def _paper_jobs(config: ReportConfig, model: str) -> dict[str, Job]:
    seed, batch = config.seed, config.batch_tokens
    jobs = {"scan": SCAN.job(model, {"n_seeds": config.scan_seeds, "length": config.scan_length,
                                     "batch_tokens": batch}, seed=seed)}
    for task in config.tasks:
        for shots in config.shots:
            cell = dict(seed=seed, task=task, shots=shots)
            jobs[f"accuracy/{task}-{shots}shot"] = ACCURACY.job(
                model, {"n": config.eval_n, "skip": config.n, "batch_tokens": batch}, **cell)
            jobs[f"importance/{task}-{shots}shot-{config.method}"] = HEAD_IMPORTANCE.job(
                model, {"method": config.method, "n": config.n,
                        "batch_tokens": config.importance_batch_tokens}, **cell)
    common = dict(draws=config.draws, method=config.method, n=config.n, eval_n=config.eval_n,
                  scan_seeds=config.scan_seeds, scan_length=config.scan_length,
                  ablation=config.ablation, batch_tokens=batch)
    for i, task in enumerate(config.prune_tasks):
        other = config.prune_tasks[(i + 1) % len(config.prune_tasks)]
        for shots in config.prune_shots:
            cell = dict(seed=seed, task=task, shots=shots)
            rankings = ["same", *([other] if other != task else []),
                        f"{config.scores[0]}:high-first", f"{config.scores[0]}:low-first"]
            jobs[f"pruning/{task}-{shots}shot-heads"] = PRUNING.job(model, {
                "rankings": rankings, "percents": list(config.percents),
                "ffn_percents": [0.0], **common}, **cell)
            if config.ffn:
                jobs[f"ffn/{task}-{shots}shot"] = FFN_IMPORTANCE.job(
                    model, {"n": config.n, "ablation": config.ablation, "batch_tokens": batch},
                    **cell)
                jobs[f"pruning/{task}-{shots}shot-ffn"] = PRUNING.job(model, {
                    "rankings": [], "ffn_rankings": ["same"], "percents": [0.0],
                    "ffn_percents": list(config.ffn_percents), **common}, **cell)
            for label in _other_methods(config):
                method, ablation = parse_importance_label(label)
                jobs[f"importance/{task}-{shots}shot-{label}"] = HEAD_IMPORTANCE.job(
                    model, {"method": method, "ablation": ablation, "n": config.n,
                            "batch_tokens": config.importance_batch_tokens}, **cell)
    if config.causal_ks:
        causal = dict(score=config.scores[0], ks=list(config.causal_ks),
                      draws=max(config.draws, MIN_DRAWS), scan_seeds=config.scan_seeds,
                      scan_length=config.scan_length, ablation=config.ablation,
                      batch_tokens=batch)
        # its sequences as long as the scan's when the report fixes one length (small models)
        jobs["causal/repeated-sequences"] = INDUCTION_ABLATION.job(
            model, {**causal, **({"length": config.scan_length} if config.scan_length else {})},
            seed=seed)
        for task in config.prune_tasks:
            for shots in config.prune_shots:
                jobs[f"causal/{task}-{shots}shot"] = INDUCTION_ABLATION_TASK.job(
                    model, {**causal, "n": config.n, "eval_n": config.eval_n}, seed=seed,
                    task=task, shots=shots)
    return jobs


def _other_methods(config: "ReportConfig") -> list[str]:
    """The compared methods' labels other than the report's own method."""
    return [m for m in config.compare_methods if m != importance_label(config.method)]


# --------------------------------------------------------------------------------------------
# The report as a result
# --------------------------------------------------------------------------------------------


@result_type
@dataclass(frozen=True, kw_only=True)
class Report:
    """A rendered report.

    Attributes:
        config: the settings.
        tables: every table by name (written as ``tables/<name>.csv`` and ``.parquet``).
        figures: every figure by name (written as ``img/<name>.png`` and its plotly JSON).
        results: every result shown, by its name under ``results/`` (not loaded back by
            :meth:`load`: ``mechicl.load_result(folder / "results" / name)`` reads one).
        sources: name -> the job, key and seconds of each
            result when the report was rendered.
        model: the model's provenance.
        params: the settings as a dict (``config.to_dict()``).
        out: the folder it was written to (:func:`build_report`), if any.
        seconds: wall time of :func:`build_report` per stage (``total`` included).
        reused: per analysis, how many results :func:`build_report` found stored.
        computed: per analysis, how many it computed.
    """

    config: ReportConfig
    tables: dict[str, pd.DataFrame] = field(repr=False)
    figures: dict[str, go.Figure] = field(repr=False)
    results: dict[str, Any] = field(default_factory=dict, repr=False)
    sources: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    model: dict[str, Any] = field(default_factory=dict, repr=False)
    out: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    reused: dict[str, int] = field(default_factory=dict)
    computed: dict[str, int] = field(default_factory=dict)
    document: Document | None = field(default=None, repr=False, compare=False)

    @property
    def params(self) -> dict[str, Any]:
        return self.config.to_dict()

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the report folder (see the module docstring), atomically."""
        def pages(folder: Path) -> None:
            if self.document is not None:
                _write_pages(folder, self.document, self.config, self.model, self.sources)
            for name, fig in self.figures.items():
                (folder / "img").mkdir(exist_ok=True)
                (folder / "img" / f"{name}.json").write_text(fig.to_json(), encoding="utf-8")
            for name, table in self.tables.items():
                (folder / "tables").mkdir(exist_ok=True)
                (folder / "tables" / f"{name}.csv").write_text(table.to_csv(index=False),
                                                                encoding="utf-8")
            (folder / "results").mkdir(exist_ok=True)
            (folder / "results" / "index.json").write_text(index_text({
                name: {"key": s["key"], "job": s.get("job"), "seconds": s.get("seconds"),
                       "mechicl": __version__}
                for name, s in self.sources.items() if name in self.results}), encoding="utf-8")

        return write_result(path, kind="Report", params=self.params, model=self.model,
                            fields={"tables": list(self.tables), "figures": list(self.figures),
                                    "sources": self.sources},
                            tables={f"tables/{n}": t for n, t in self.tables.items()},
                            parts={f"results/{n}": r for n, r in self.results.items()},
                            extra=pages)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Report":
        """The report's settings, tables and figures (the results it shows stay on disk)."""
        folder = read_result(path, "Report")
        figures = {name: _figure_from_json((folder.path / "img" / f"{name}.json").read_text(
            encoding="utf-8")) for name in folder.fields["figures"]}
        tables = {name: folder.tables[f"tables/{name}"] for name in folder.fields["tables"]}
        config = ReportConfig.unchecked(folder.params)  # its tasks need not be registered here
        return cls(config=config, tables=tables, figures=figures, model=folder.model,
                   sources=folder.fields["sources"], out=folder.path)


def _decode_arrays(value: Any) -> Any:
    """plotly's JSON encodes arrays as ``{"dtype", "bdata" (base64), "shape"}``, which
    ``plotly.io.from_json`` leaves as dicts: back to numpy arrays."""
    if isinstance(value, dict):
        if set(value) <= {"dtype", "bdata", "shape"} and {"dtype", "bdata"} <= set(value):
            array = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
            if "shape" in value:
                array = array.reshape([int(n) for n in str(value["shape"]).split(",")])
            return array
        return {k: _decode_arrays(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_arrays(v) for v in value]
    return value


def _figure_from_json(text: str) -> go.Figure:
    return go.Figure(_decode_arrays(json.loads(text)), skip_invalid=False)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ModelView:
    """What the document says about the model, from the results' provenance."""

    info: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.info.get("name"))

    @property
    def n_layers(self) -> int:
        return int(self.info["shape"]["n_layers"])

    @property
    def n_heads(self) -> int:
        return int(self.info["shape"]["n_heads"])

    @property
    def n_kv_heads(self) -> int:
        return int(self.info["shape"]["n_kv_heads"])

    @property
    def group_size(self) -> int:
        return kv_group_size(self.info)


def _relative(scores: HeadScores) -> Any:
    """The map divided by its largest value (importance maps share one 0-1 colour scale)."""
    top = scores.mean.max()
    return scores.mean / top if float(top) > 0 else scores.mean


def _provenance(info: Mapping[str, Any], results: Any) -> dict[str, Any]:
    """The model provenance of ``info``, with the weights' format from any shown result of the
    same weights (results stored before mechicl recorded the format lack it)."""
    out = dict(info)
    if "weights" not in out:
        for r in results:
            other = getattr(r, "model", None) or {}
            if other.get("weights_sha256") == out.get("weights_sha256") and "weights" in other:
                out["weights"] = other["weights"]
                break
    return out


def render_report(config: ReportConfig, results: Mapping[str, Any],
                  sources: Mapping[str, Mapping[str, Any]] | None = None) -> Report:
    """The report of ``results`` (:func:`report_jobs`'s names -> loaded results): every table
    and figure, and the document. Overlap statistics are computed here (they are cheap)."""
    first = results["scan"] if "scan" in results else next(
        r for r in results.values() if "shape" in (getattr(r, "model", None) or {}))
    view = _ModelView(_provenance(first.model, results.values()))
    doc, claims = Document(), []
    paper = "paper" in config.sections
    doc.text(_model_text(view) + (_paper_text(config) if paper else " Sections: " + ", ".join(
        config.sections) + " (seed " + str(config.seed) + ").") + " Heatmaps put layer 0 at "
        "the bottom" + ("; white lines separate the KV groups." if view.group_size > 1 else "."))
    if paper:
        _paper(doc, claims, view, config, results)
    render_sections(doc, claims, config.sections, results, kv_group_size=view.group_size)
    doc.tables["claims"] = claims_table(claims)
    doc.text(f"Every finding stated above is one row of `tables/claims.csv` ({len(claims)} "
             "claims), with the statistic, interval and p-value it was computed from; "
             "significance level 0.05 throughout.")
    return Report(config=config, tables=doc.tables, figures=doc.figures,
                  results=dict(results), sources={k: dict(v) for k, v in (sources or {}).items()},
                  model=view.info, document=doc)


def _model_text(model: "_ModelView") -> str:
    """The report's first sentences: the model, its weights (quantised: said in bold)."""
    n_total = model.n_layers * model.n_heads
    info = model.info
    weights = weights_description(info)
    if (info.get("weights") or {}).get("quantised"):
        weights = f"**{weights}: every number in this report is of the quantised model**"
    return (f"Model `{model.name}` ({model.n_layers} layers x {model.n_heads} query heads"
            + (f", {model.n_kv_heads} KV heads" if model.n_kv_heads != model.n_heads else "")
            + f" = {n_total} heads; weights sha256 `{str(info['weights_sha256'])[:12]}`). "
            f"Weights: {weights}.")


def _paper_text(config: "ReportConfig") -> str:
    return (f" Tasks: {', '.join(config.tasks)}; shots {', '.join(map(str, config.shots))}. "
            f"Importance method `{config.method}` on {config.n} prompts per task and shot "
            f"count; accuracy and pruning curves on the next {config.eval_n} prompts of the "
            f"same seeded list (disjoint from the importance prompts). Induction scans: "
            f"{config.scan_seeds} random sequences per score. Pruning, FFN knock-out and the "
            f"causal check remove a head or FFN by **{config.ablation} ablation**.")


def _paper(doc: Document, claims: list[Claim], view: "_ModelView", config: "ReportConfig",
           results: Mapping[str, Any]) -> None:
    """Bansal et al.'s report: the ``paper`` section's results into ``doc`` and ``claims``."""
    scans = {s: results["scan"].scores[s] for s in config.scores}
    accuracy = {(t, s): results[f"accuracy/{t}-{s}shot"] for t in config.tasks
                for s in config.shots}
    importance = {(t, s): results[f"importance/{t}-{s}shot-{config.method}"]
                  for t in config.tasks for s in config.shots}
    ffn, head_curves, ffn_curves = {}, {}, {}
    for t in config.prune_tasks:
        for s in config.prune_shots:
            head_curves[t, s] = results[f"pruning/{t}-{s}shot-heads"]
            if config.ffn:
                ffn[t, s] = results[f"ffn/{t}-{s}shot"]
                ffn_curves[t, s] = results[f"pruning/{t}-{s}shot-ffn"]
    methods = {cell: {importance_label(config.method): importance[cell], **{
        label: results[f"importance/{cell[0]}-{cell[1]}shot-{label}"]
        for label in _other_methods(config)}} for cell in head_curves}
    causal_names = (["repeated-sequences"] + [f"{t}-{s}shot" for t in config.prune_tasks
                                              for s in config.prune_shots]
                    if config.causal_ks else [])  # report_jobs' order, whatever the input order
    causal = {name: results[f"causal/{name}"] for name in causal_names}
    k = top_k(view.n_layers * view.n_heads, percentile=config.top_k_percent)
    overlap = overlap_table(importance, scans, k=k, n_permutations=config.n_permutations,
                            n_resamples=config.n_resamples, seed=config.seed)
    _paper_sections(doc, claims, view, config, scans, accuracy, importance, ffn, head_curves,
                    ffn_curves, overlap, k, methods, causal)


def _write_pages(out: Path, doc: Document, config: ReportConfig, model: Mapping[str, Any],
                 sources: Mapping[str, Mapping[str, Any]]) -> None:
    """Figures, report.md and report.html into the folder being written."""
    formats = list(dict.fromkeys(["png", *config.formats]))
    for name, fig in doc.figures.items():
        save_figure(fig, out / "img" / name, formats)
    work: dict[str, float] = {}
    for s in sources.values():
        if s.get("seconds") is not None:
            work[s["analysis"]] = work.get(s["analysis"], 0.0) + float(s["seconds"])
    cost = ", ".join(f"{k} {v / 60:.1f} min" for k, v in work.items())
    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    title = f"mechicl report: {Path(str(model.get('name'))).name}"
    blocks = list(doc.blocks)
    doc.blocks.insert(0, ("text", (
        f"Rendered {created} by mechicl {__version__} from {len(sources)} results of the result "
        f"store. Computing them took {sum(work.values()) / 60:.0f} min on the machines that made "
        f"them ({cost}; results without a recorded time not counted). Settings and provenance: "
        "`result.json`. Interactive version: `report.html`; static figures: `img/`; tables: "
        "`tables/`; the results themselves: `results/`.")))
    try:
        (out / "report.md").write_text(f"# {title}\n\n" + doc.markdown(), encoding="utf-8")
        (out / "plotly.min.js").write_text(plotly.offline.get_plotlyjs(), encoding="utf-8")
        (out / "report.html").write_text(doc.html(title), encoding="utf-8")
    finally:
        doc.blocks[:] = blocks




def _paper_sections(doc: Document, claims: list[Claim], model: "_ModelView",
                    config: "ReportConfig", scans: dict[str, HeadScores],
                    accuracy: dict[tuple[str, int], EvalResult],
                    importance: dict[tuple[str, int], HeadScores],
                    ffn: dict[tuple[str, int], LayerScores],
                    head_curves: dict[tuple[str, int], PruneCurve],
                    ffn_curves: dict[tuple[str, int], PruneCurve], overlap: pd.DataFrame,
                    k: int, methods: dict[tuple[str, int], dict[str, HeadScores]],
                    causal: dict[str, InductionAblation]) -> None:
    group = model.group_size
    n_total = model.n_layers * model.n_heads

    # 1. accuracy
    doc.heading(2, "ICL accuracy")
    acc = pd.DataFrame([r.summary() for r in accuracy.values()])
    wide = acc.pivot(index="task", columns="shots", values="accuracy").reindex(config.tasks)
    wide.columns = [f"{s}-shot" for s in wide.columns]
    wide.insert(0, "chance", acc.groupby("task").chance.first().reindex(config.tasks))
    doc.table("accuracy", wide.reset_index(), f"Accuracy on {config.eval_n} prompts per cell "
              "(95% Wilson intervals in accuracy-long.csv)")
    doc.tables["accuracy-long"] = acc
    doc.figures_row([("accuracy", accuracy_figure(
        acc, title="accuracy by shot count (95% Wilson intervals)"))],
        "Accuracy per task against the number of demonstrations; dashed: chance.")
    validity = icl_validity(accuracy, n_resamples=config.n_resamples, seed=config.seed)
    classes = task_classes(validity)
    doc.tables["icl-validity"] = validity
    doc.table("task-classes", classes[["task", "class", "shots", "gain", "gain_low",
                                       "gain_high", "holm_p"]],
              "Is each task in-context learning? In-context: a k-shot accuracy above chance "
              "(95% Wilson lower bound) with a significant gain over 0-shot on the same "
              "prompts (paired bootstrap interval, exact McNemar test, Holm-corrected over "
              "the task's k > 0, alpha 0.05); recall only: above chance without a significant "
              "gain; at / below chance: no Wilson bound above / one below chance. Per-shot "
              "tests in icl-validity.csv")
    icl = icl_claims(validity, classes)
    claims += icl
    doc.text("\n".join(f"- {c.text}" for c in icl))
    in_context = [t for t in config.tasks
                  if classes.set_index("task")["class"].get(t) == "in-context"]
    doc.text("Conclusions about in-context learning below use the in-context tasks only ("
             + (", ".join(in_context) if in_context else "none") + "); the other tasks are "
             "shown, marked by their class.")

    # 2. induction heads
    doc.heading(2, "Induction heads: prefix matching and copying")
    doc.figures_row([(f"scan-{s}", head_heatmap(
        v, title=f"{s.replace('_', ' ')}", kv_group_size=group, colorbar_title="score"))
        for s, v in scans.items()],
        "Per-head induction scores (Bansal et al. Fig. 6 type). Prefix matching: attention from "
        "each token to the token after its previous occurrence on repeated random tokens; "
        "copying: the head's OV circuit raising the logits of the tokens it attends to.")
    top_rows = []
    for s, v in scans.items():
        top_rows.append({"score": s, "top heads (layer.head)": " ".join(
            f"{a}.{b}" for a, b in v.top_heads(min(10, n_total))),
            "max": float(v.mean.max()), "mean": float(v.mean.mean())})
    doc.table("induction-top-heads", pd.DataFrame(top_rows), "Top 10 heads per induction score")
    if "prefix_matching" in scans and "loss_per_position" in scans["prefix_matching"].extras:
        doc.figures_row([("loss-curve", loss_curve(
            scans["prefix_matching"], title="next-token loss on repeated random tokens"))],
            "The loss falls after the first copy: the model predicts repeated tokens in context.")

    # 3. importance heatmaps
    doc.heading(2, "Head importance per task and shot count")
    scale_text = {
        "linear": "Each map is divided by its own maximum (one 0-1 colour scale)",
        "per_layer": "Each layer of each map is divided by that layer's maximum, so the colours "
                     "compare heads within a layer, not across layers",
        "log": "Colours are log10 of each map divided by its maximum (values below 1e-4 of "
               "the maximum drawn at -4), so the middle layers are readable next to the "
               "dominant first and last layers"}[config.importance_scale]
    doc.text(f"`{config.method}` importance of every head for the answer loss (Bansal et al. "
             f"Fig. 2 type). {scale_text}; rankings, and every statistic below, are "
             "unaffected. Tasks that are not in-context (see above) are marked in the headings.")
    cls = classes.set_index("task")["class"]
    for task_name in config.tasks:
        mark = "" if cls.get(task_name) == "in-context" else f" ({cls.get(task_name)})"
        doc.heading(3, task_name + mark)
        doc.figures_row([(f"importance-{task_name}-{s}shot", head_heatmap(
            _relative(importance[task_name, s]), title=f"{task_name} {s}-shot",
            kv_group_size=group, colorbar_title="importance / max",
            scale=config.importance_scale, signed=False,
            **({"zmin": 0.0, "zmax": 1.0} if config.importance_scale == "linear" else {})))
            for s in config.shots])

    if any(len(maps) > 1 for maps in methods.values()):
        _methods_section(doc, claims, methods, scans, config, k, group)

    # 4. cross-task / cross-shot correlation
    doc.heading(2, "Cross-task and cross-shot correlation of importance")
    doc.text("Spearman rank correlation between importance maps (on the scores, not on argsort "
             "permutations: see docs/concepts/overlap.md).")
    matrices = []
    for s in config.shots:
        maps = {t: importance[t, s] for t in config.tasks}
        if len(maps) > 1:
            m = overlap_matrix(maps, statistic="spearman")
            doc.tables[f"cross-task-{s}shot"] = m.reset_index(names="task")
            matrices.append((f"cross-task-{s}shot", matrix_heatmap(
                m, title=f"{s}-shot: Spearman across tasks", colorbar_title="rho")))
    if matrices:
        resampled = _resampled_importance(importance, config)
        pairs = _agreement_pairs(importance, config, resampled)
        doc.table("cross-task-pairs", pairs,
                  "Each pair of tasks' importance maps: Spearman on the whole map (with its "
                  "95% percentile bootstrap interval, each task's prompts resampled "
                  "independently, each map recomputed by its method's aggregation), the "
                  "Spearman a map of one task's per-layer means alone reaches against the "
                  "other's map, the within-layer rank correlation (ranks centred within each "
                  "layer), and the p-value of Spearman under the layer-preserving null "
                  f"({config.n_permutations} permutations of heads within layers)")
        agreement = agreement_claims(pairs, in_context,
                                     _median_intervals(resampled, config, in_context))
        claims += agreement
        doc.text("\n".join(f"- {c.text}" for c in agreement))
        doc.figures_row(matrices, "Importance maps of different tasks agree when the same heads "
                        "matter for them (Bansal et al. Fig. 3 type); much of it is which "
                        "layers matter (cross-task-pairs.csv).")
    if len(config.shots) > 1:
        pairs = [(a, b) for i, a in enumerate(config.shots) for b in config.shots[i + 1:]]
        cross = pd.DataFrame(
            [[spearman(importance[t, a], importance[t, b]) for a, b in pairs]
             for t in config.tasks], index=list(config.tasks),
            columns=[f"{a} vs {b} shots" for a, b in pairs])
        doc.tables["cross-shot"] = cross.reset_index(names="task")
        doc.figures_row([("cross-shot", matrix_heatmap(
            cross, title="Spearman across shot counts", colorbar_title="rho"))],
            "Per task: how stable the importance ranking is across shot counts.")

    # 5. pruning
    if head_curves:
        doc.heading(2, "Pruning heads")
        doc.text("Accuracy while removing a growing share of heads ("
                 + _removal_text(config.ablation, "the head's output before W_O") + "): "
                 "least important first by the task's own importance "
                 "ranking and by another task's ranking, and by the first induction score in "
                 "both directions (highest first: induction heads first; lowest first); "
                 f"{config.draws} random orders as the baseline (mean, band: 5-95% quantiles of "
                 "the draws). Error bars and intervals: 95% paired percentile bootstrap over "
                 f"the {config.eval_n} evaluation prompts ({config.n_resamples} resamples). "
                 "Bansal et al. Figs. 4 and 8 type.")
        doc.figures_row([(f"prune-heads-{t}-{s}shot", prune_curve_figure(c, x="head_percent"))
                         for (t, s), c in head_curves.items()])
        _pruning_section(doc, claims, head_curves, config, "heads")
    if ffn:
        doc.heading(2, "FFN importance and pruning FFNs")
        doc.figures_row([(f"ffn-importance-{t}-{s}shot", layer_bars(
            v, title=f"{t} {s}-shot: FFN knock-out", yaxis_title="accuracy drop"))
            for (t, s), v in ffn.items()],
            "Accuracy drop when each layer's FFN is removed ("
            + _removal_text(config.ablation, "its output", "the importance prompts")
            + "; Bansal et al. Fig. 5 type); "
            "error bars: one standard error over prompts.")
        if ffn_curves:
            doc.figures_row([(f"prune-ffn-{t}-{s}shot", prune_curve_figure(c, x="ffn_percent"))
                             for (t, s), c in ffn_curves.items()])
            _pruning_section(doc, claims, ffn_curves, config, "ffn")

    # 6. overlap
    doc.heading(2, "Overlap: induction heads vs task-important heads")
    chance = k * k / n_total
    doc.text(f"Top-k statistics use the top {config.top_k_percent:g}% of heads (k = {k} of "
             f"{n_total}; a random pair of sets shares {chance:.1f} heads on average). "
             "`hypergeom p`: exact one-sided p-value of the top-k overlap; `permutation p`: of "
             f"Spearman, {config.n_permutations} relabellings of the heads; `spearman ci`: 95% "
             f"percentile bootstrap ({config.n_resamples} resamples) over scan sequences and "
             "importance prompts, of the unweighted per-prompt mean maps (the reported "
             "importance is token-weighted, so the estimate can sit slightly off-centre).")
    lines = []
    for score in scans:
        rows = overlap[overlap["induction score"] == score]
        significant = int((rows["hypergeom p"] < 0.05).sum())
        lines.append(f"- {score.replace('_', ' ')}: median Spearman with importance "
                     f"{rows.spearman.median():+.2f} (range {rows.spearman.min():+.2f} to "
                     f"{rows.spearman.max():+.2f}); top-{k} overlap median "
                     f"{rows[f'top-{k} overlap'].median():.2f} (chance {k / n_total:.2f}), "
                     f"larger than chance (hypergeometric p < 0.05) in {significant} of "
                     f"{len(rows)} task x shot maps.")
    doc.text("\n".join(lines))
    found = overlap_claims(overlap, in_context, k)
    claims += found
    doc.text("Controlled for layer structure (`layer-null` columns: heads permuted within "
             "their layers):\n" + "\n".join(f"- {c.text}" for c in found))
    doc.table("overlap", overlap, "Induction score vs importance per task and shot count, "
              "raw statistics and their layer-structure controls side by side")
    columns = [(s, shots) for s in scans for shots in config.shots]
    for stat, title, zmin in (("spearman", "Spearman", -1.0), (f"top-{k} overlap",
                                                                  f"top-{k} overlap", 0.0)):
        mat = overlap.pivot_table(index="task", columns=["induction score", "shots"],
                                  values=stat).reindex(index=list(config.tasks), columns=columns)
        mat.columns = [f"{s.replace('_', ' ')} {shots}-shot" for s, shots in mat.columns]
        doc.figures_row([(f"overlap-{'topk' if stat != 'spearman' else stat}", matrix_heatmap(
            mat, title=f"{title}: induction score vs importance", zmin=zmin, zmax=1.0,
            colorscale="RdBu_r" if stat == "spearman" else "Blues",
            colorbar_title="rho" if stat == "spearman" else "share of top heads",
            **({} if stat == "spearman" else {"chance": k / n_total})))])
    last = max(config.shots)
    first_score = next(iter(scans))
    doc.text(f"Each head's {first_score.replace('_', ' ')} score against its importance at "
             f"{last} shots; the 5 highest heads of either score are labelled.")
    for i in range(0, len(config.tasks), 3):
        doc.figures_row([(f"scatter-{first_score}-{t}-{last}shot", score_scatter(
            scans[first_score], importance[t, last], x_title=first_score.replace("_", " "),
            y_title="importance", title=f"{t} {last}-shot")) for t in config.tasks[i:i + 3]])
    if causal:
        _causal_section(doc, claims, causal, config, dict(cls))
    _widths_section(doc, config)


def _resampled_importance(importance: dict[tuple[str, int], HeadScores],
                          config: "ReportConfig") -> dict[tuple[str, int], Tensor]:
    """Every importance map on ``config.n_resamples`` bootstrap resamples of its own prompts
    (``[resample, layer, head]``; each task's draws independent of the other tasks')."""
    out = {}
    for i, task_name in enumerate(config.tasks):
        for shots in config.shots:
            scores = importance[task_name, shots]
            weights = bootstrap_weights(scores.per_seed.shape[0], config.n_resamples,
                                        seed=config.seed + 1 + i)
            out[task_name, shots] = resampled_maps(scores, torch.as_tensor(weights))
    return out


def _median_intervals(resampled: dict[tuple[str, int], Tensor], config: "ReportConfig",
                      in_context: Sequence[str]) -> dict[tuple[int, str], tuple[float, float]]:
    """95% percentile bootstrap intervals of the median cross-task Spearman, per shot count and
    scope (``"all tasks"``, ``"in-context tasks"``): every task's prompts resampled
    independently (:func:`_resampled_importance`), the median over pairs recomputed on each
    resample."""
    out = {}
    for shots in config.shots:
        for scope, tasks in (("all tasks", list(config.tasks)),
                             ("in-context tasks", [t for t in config.tasks if t in in_context])):
            pairs = [(a, b) for i, a in enumerate(tasks) for b in tasks[i + 1:]]
            if not pairs:
                continue
            rhos = torch.stack([spearman_rows(resampled[a, shots], resampled[b, shots])
                                for a, b in pairs])  # [pair, resample]
            out[shots, scope] = percentile_interval(rhos.nanmedian(0).values)
    return out


def _agreement_pairs(importance: dict[tuple[str, int], HeadScores], config: "ReportConfig",
                     resampled: dict[tuple[str, int], Tensor]) -> pd.DataFrame:
    """One row per shot count and pair of tasks: raw, layer-means-only and within-layer
    agreement of their importance maps, and the layer-preserving null's p-value."""
    rows = []
    for shots in config.shots:
        for i, a in enumerate(config.tasks):
            for b in config.tasks[i + 1:]:
                x, y = importance[a, shots], importance[b, shots]
                layer_means = x.mean.mean(-1, keepdim=True).expand_as(x.mean)
                rhos = spearman_rows(resampled[a, shots], resampled[b, shots])
                low, high = percentile_interval(rhos)
                rows.append({"shots": shots, "task_a": a, "task_b": b,
                             "spearman": spearman(x, y), "spearman low": low,
                             "spearman high": high,
                             "layer-means spearman": spearman(layer_means, y.mean),
                             "within-layer spearman": within_layer_spearman(x, y),
                             "layer-null p": permutation_pvalue(
                                 x, y, n_permutations=config.n_permutations, seed=config.seed,
                                 within_layers=True)})
    return pd.DataFrame(rows)


def _methods_section(doc: Document, claims: list[Claim],
                     methods: dict[tuple[str, int], dict[str, HeadScores]],
                     scans: dict[str, HeadScores], config: "ReportConfig", k: int,
                     group: int) -> None:
    """Importance methods side by side for the prune tasks: their maps, their agreement with
    the report's method (magnitudes; raw, within layers, layer-preserving null) and their
    overlap with the induction heads."""
    reference = importance_label(config.method)
    doc.heading(3, "Importance methods side by side")
    doc.text(f"For the prune tasks: `{reference}` next to "
             + ", ".join(f"`{m}`" for m in _other_methods(config)) + " (gradient magnitudes: "
             "bansal, michel; signed: exact ablation of each head, zero or mean, and its "
             "first-order estimate, attribution patching). Signed maps are drawn on a diverging "
             "scale centred at zero (red: removing the head raises the answer loss; blue: "
             "removing it helps); magnitude maps from 0. Agreement compares magnitudes "
             "(|signed map|), the like-for-like comparison with a gradient magnitude; the "
             "layer-null p permutes heads within layers "
             f"({config.n_permutations} permutations).")
    agreement, induction = [], []
    for (task_name, shots), maps in methods.items():
        figures = []
        for label, scores in maps.items():
            signed = is_signed(scores)
            top = float(scores.mean.abs().max()) or 1.0
            figures.append((f"method-{task_name}-{shots}shot-{label}", head_heatmap(
                scores.mean / top, title=f"{task_name} {shots}-shot: {label}",
                kv_group_size=group, signed=signed,
                colorbar_title="score / max |score|" if signed else "score / max",
                **({"zmin": -1.0, "zmax": 1.0} if signed else {"zmin": 0.0, "zmax": 1.0}))))
        doc.figures_row(figures)
        table = compare_methods(maps, scans, k=k)
        for _, row in table[(table.kind == "method") & (table.a == reference)].iterrows():
            a, b = maps[row.a].mean.abs(), maps[row.b].mean.abs()
            low, high = _agreement_interval(maps[row.a], maps[row.b], config)
            agreement.append({
                "task": task_name, "shots": shots, "a": row.a, "b": row.b,
                "spearman": row.spearman, "spearman |.|": row["spearman |.|"],
                "spearman |.| low": low, "spearman |.| high": high,
                "within-layer spearman |.|": within_layer_spearman(a, b),
                "layer-null p": permutation_pvalue(a, b, n_permutations=config.n_permutations,
                                                   seed=config.seed, within_layers=True)})
        # each map by magnitude (one row per map: no bootstrap interval is computed)
        magnitudes = {(label, shots): dataclasses.replace(
            v, mean=v.mean.abs(), var=v.mean.abs() * 0, per_seed=v.mean.abs()[None])
            for label, v in maps.items()}
        rows = overlap_table(magnitudes, scans, k=k, n_permutations=config.n_permutations,
                             n_resamples=config.n_resamples, seed=config.seed)
        induction.append(rows.rename(columns={"task": "method"}).assign(task=task_name))
    agreement_table = pd.DataFrame(agreement)
    induction_table = pd.concat(induction, ignore_index=True)
    doc.table("methods-agreement", agreement_table,
              f"Each method's map against `{reference}`'s on the same prompts: Spearman of "
              "the raw maps and of their magnitudes (with its 95% paired percentile bootstrap "
              f"interval over prompts, {config.n_resamples} resamples, each map recomputed with "
              "its method's own aggregation), within-layer Spearman of the magnitudes, and the "
              "layer-preserving null's p-value of the magnitudes' Spearman")
    columns = ["task", "shots", "method", "induction score", f"top-{k} overlap",
               f"layer-null top-{k} overlap", "hypergeom p", "layer-null p (top-k)"]
    doc.table("methods-induction", induction_table[columns],
              f"Which methods rank the induction heads high: overlap of each map's top {k} "
              f"heads (by magnitude) with the top {k} of each induction score, what layer "
              "structure alone gives, and the two p-values")
    found = method_claims(agreement_table, induction_table[columns], k)
    claims += found
    doc.text("\n".join(f"- {c.text}" for c in found))


def _agreement_interval(a: HeadScores, b: HeadScores, config: "ReportConfig"
                        ) -> tuple[float, float]:
    """95% paired percentile bootstrap interval of the Spearman of two maps' magnitudes: the
    same prompt resamples for both maps, each recomputed with its own method's aggregation
    (:func:`~mechicl.analyses.importance.resampled_maps`). NaN when the maps were not computed
    on the same prompts (no pairing)."""
    ids = a.params.get("prompt_ids"), b.params.get("prompt_ids")
    if ids[0] is None or ids[0] != ids[1]:
        return float("nan"), float("nan")
    weights = torch.as_tensor(bootstrap_weights(len(ids[0]), config.n_resamples,
                                                seed=config.seed))
    return percentile_interval(spearman_rows(resampled_maps(a, weights).abs(),
                                      resampled_maps(b, weights).abs()))


def _causal_section(doc: Document, claims: list[Claim],
                    causal: dict[str, InductionAblation], config: "ReportConfig",
                    classes: dict[str, str]) -> None:
    """The causal check: top-k induction heads ablated vs k random heads, on repeated random
    sequences (later-copy loss) and on the prune tasks (accuracy)."""
    score = config.scores[0].replace("_", " ")
    doc.heading(2, f"Causal check: the top {score} heads ablated vs random heads")
    tables = []
    for result in causal.values():
        t = result.table(n_resamples=config.n_resamples, seed=config.seed)
        params = result.params
        t.insert(0, "shots", params.get("shots", np.nan) if result.measure == "accuracy"
                 else np.nan)
        t.insert(0, "subject", params.get("task") if result.measure == "accuracy"
                 else "repeated sequences")
        tables.append(t)
    table = pd.concat(tables, ignore_index=True)
    loss, acc = table[table.measure != "accuracy"], table[table.measure == "accuracy"]
    first = next(iter(causal.values()))
    doc.text(f"Removing the k heads with the highest {score} scores ("
             + _removal_text(config.ablation, "their outputs before W_O",
                           "the evaluated sequences / prompts") + "; k = "
             + ", ".join(map(str, config.causal_ks)) + f") against {first.params['draws']} "
             "sets of k heads drawn at random from all heads (the null: any k heads removed "
             "cost something). Repeated random sequences (4 copies, sequences not used by the "
             "scan): mean next-token loss on the later copies; the prune tasks: accuracy on "
             "the evaluation prompts of the pruning curves. Intervals: 95% paired percentile "
             f"bootstrap over sequences / prompts of top-k minus the mean of the random draws "
             f"({config.n_resamples} resamples); band: 5-95% of the draws' means.")
    figures = []
    if len(loss):
        figures.append(("causal-loss", ablation_figure(
            loss, title="later-copy loss on repeated random sequences",
            y_title="later-copy loss")))
    if len(acc):
        chance = float(np.mean([r.params["chance"] for r in causal.values()
                                if r.measure == "accuracy"]))
        figures.append(("causal-accuracy", ablation_figure(
            acc, title="accuracy on the prune tasks", y_title="accuracy", chance=chance)))
    doc.figures_row(figures, "Black: unablated; grey: k random heads (5-95% of draws); red: "
                    "the top-k heads (95% interval).")
    doc.table("causal", table, "Top-k induction heads ablated vs k random heads: means, the "
              "random band, the paired difference with its interval and p-value")
    found = causal_claims(table, classes)
    claims += found
    doc.text("\n".join(f"- {c.text}" for c in found))


def _removal_text(ablation: str, what: str, over: str = "the evaluated prompts") -> str:
    """How the report removes a head or FFN, in words: ``"zero ablation of <what>"`` or its
    mean-ablation counterpart, whose mean is taken ``over`` these inputs.

    >>> _removal_text("mean", "its output", "the importance prompts")
    'mean ablation: its output replaced by the mean output over the importance prompts'
    """
    if ablation == "mean":
        return f"mean ablation: {what} replaced by the mean output over {over}"
    return f"zero ablation of {what}"


def _widths_section(doc: Document, config: "ReportConfig") -> None:
    """What the sample sizes resolve: the median width of each kind of interval the report
    shows, from its own tables (``interval-widths.csv``)."""
    t = doc.tables
    kinds = [("accuracy (95% Wilson)", "accuracy-long", "ci_low", "ci_high", None),
             ("in-context gain, k-shot minus 0-shot (95% paired bootstrap)", "icl-validity",
              "gain_low", "gain_high", None),
             ("pruned accuracy (95% bootstrap)", "prune-heads-points", "acc_low", "acc_high",
              None),
             ("pruning: a ranking minus random orders (95% paired bootstrap)",
              "prune-heads-points", "vs_random_low", "vs_random_high", None),
             ("share of heads removable (90% bootstrap, percentage points)",
              "prune-heads-summary", "low", "high", None),
             ("causal check: top-k minus random, accuracy (95% paired bootstrap)", "causal",
              "diff_low", "diff_high", "accuracy"),
             ("causal check: top-k minus random, later-copy loss (95% paired bootstrap)",
              "causal", "diff_low", "diff_high", "later_copy_loss")]
    rows = []
    for label, name, low, high, measure in kinds:
        table = t.get(name)
        if table is None or low not in table:
            continue
        if measure is not None:
            table = table[table.measure == measure]
        width = (table[high] - table[low]).dropna()
        if len(width):
            rows.append({"interval": label, "median width": float(width.median()),
                         "largest width": float(width.max()), "intervals": len(width)})
    if not rows:
        return
    doc.heading(2, "Sample sizes and what they resolve")
    widths = pd.DataFrame(rows)
    doc.text(f"Accuracies and pruning curves use {config.eval_n} prompts per task and shot "
             f"count, importance maps {config.n}, pruning baselines {config.draws} random "
             "orders. The median width of each kind of interval shown above: a difference "
             "smaller than about half of it cannot be told from zero at these sizes (the "
             "width shrinks with the square root of the prompts: four times the prompts halve "
             "it).\n" + "\n".join(
                 f"- {r['interval']}: median {r['median width']:.3g} (largest "
                 f"{r['largest width']:.3g}, {r['intervals']} intervals)"
                 for r in rows))
    doc.tables["interval-widths"] = widths


TOLERANCE = 0.05
"""The accuracy drop (a proportion) that still counts as 'removable' in the report."""


def _pruning_section(doc: Document, claims: list[Claim],
                     curves: dict[tuple[str, int], PruneCurve], config: "ReportConfig",
                     unit: str) -> None:
    """The tables and claims of one kind of pruning curve (``unit``: heads or ffn)."""
    stem = "prune-heads" if unit == "heads" else "prune-ffn"
    key = "head_ranking" if unit == "heads" else "ffn_ranking"
    x = "head_percent" if unit == "heads" else "ffn_percent"
    points, summaries = [], []
    for (task_name, shots), curve in curves.items():
        pts = curve.points(n_resamples=config.n_resamples, seed=config.seed)
        pts = pts[(pts[key] != "none") & (pts["ffn_percent" if unit == "heads"
                                                  else "head_percent"] == 0)]
        summary = curve.summary(TOLERANCE, n_resamples=config.n_resamples, seed=config.seed)
        for frame in (pts, summary):
            frame.insert(0, "shots", shots)
            frame.insert(0, "task", task_name)
        points.append(pts)
        summaries.append(summary[summary.unit == unit])
    table = pd.concat(points, ignore_index=True)
    summary = pd.concat(summaries, ignore_index=True)
    doc.tables[f"{stem}-points"] = table
    wide = table.assign(cell=[f"{a:.2f} [{lo:.2f}, {hi:.2f}]" for a, lo, hi in
                              zip(table.accuracy, table.acc_low, table.acc_high, strict=True)])
    wide = wide.pivot_table(index=["task", "shots", key], columns=x, values="cell",
                            aggfunc="first", sort=False)
    wide.columns = [f"{p:g}%" for p in wide.columns]
    doc.table(f"{stem}-accuracy", wide.reset_index().rename(columns={key: "ranking"}),
              f"Accuracy by share of {'heads' if unit == 'heads' else 'FFNs'} removed, with "
              "its 95% percentile bootstrap interval over prompts (random: mean of the "
              "per-prompt accuracy over draws). Differences from unpruned and from random, "
              f"paired: {stem}-points.csv")
    doc.table(f"{stem}-summary", summary[["task", "shots", key, "baseline", "removable",
                                          "estimate", "low", "high", "draws", "n"]].rename(
        columns={key: "ranking"}),
        f"Share removable: the largest share such that at it and at every smaller share the "
        f"accuracy drop from the unpruned model is below {TOLERANCE:.2f} by a one-sided paired "
        "bootstrap test (alpha 0.05); estimate: the same rule on the observed drops, with its "
        "90% bootstrap interval")
    new = pruning_claims(table, summary, unit=unit)
    claims += new
    doc.text("\n".join(f"- {c.text}" for c in new))


# --------------------------------------------------------------------------------------------
# The registered analysis, and building a report for a loaded model
# --------------------------------------------------------------------------------------------


def _run(call: Call) -> Report:
    return render_report(ReportConfig.from_job(call.job), call.inputs, call.provenance)


REPORT = register_analysis(Analysis(
    name="report", help="the paper report: scans, importance, pruning, FFNs, overlap; figures "
                        "+ report.md / report.html",
    run=_run, result_type=Report, needs_model=False, memory=None, check=_check,
    inputs=lambda job: report_jobs(ReportConfig.from_job(job), job.model),
    options=REPORT_OPTIONS,
    # 1: issue 21's rendering (claims, methods side by side, causal check, interval widths)
    # 2: the methods' agreement with its paired bootstrap interval over prompts
    # 3: bootstrap intervals of the cross-task agreement (per pair and of the median)
    # 4: sections beyond the paper (mechicl.report.sections), their claims and figures
    # 5: a determinant with too few events or constant resamples is not tested
    # 6: unique claim subjects (score, direction); heatmaps wide enough for their titles
    # 7: the ablation option (zero or mean removal), said in the text and cross-model; pruning
    #    bands without corner markers
    code_version=7,
))


def _copy_into(source: Path, out: Path) -> None:
    """Copy a report folder's files into ``out``, each atomically and ``result.json`` last
    (until it is in place the folder fails its checksum, never passes it half-copied); other
    files of ``out`` are left alone (``out`` may hold other outputs too)."""
    files = sorted((p for p in source.rglob("*") if p.is_file()),
                   key=lambda p: p == source / "result.json")
    for path in files:
        target = out / path.relative_to(source)
        with atomic_path(target) as tmp:
            shutil.copyfile(path, tmp)


def build_report(
    model: HookedModel, out: str | os.PathLike[str], config: ReportConfig | None = None, *,
    store: ResultStore | str | os.PathLike[str] | None = None,
    reuse: Sequence[str | os.PathLike[str]] = (), force: bool = False,
    memory_budget: str | int | None = None, progress: bool = False,
) -> Report:
    """Compute (or reuse) everything the report needs, render it and write it into ``out``.

    Every result is a job of its analysis (:func:`report_jobs`) run through the result
    ``store``: results stored already (by this report, a grid or the command line, for the
    same model weights, options and task data) are reused; so are results in ``out`` and in
    the ``reuse`` folders (report folders or command-line output folders: their
    ``results/index.json``), copied into the store after their checksums are verified.

    Args:
        model: the model.
        out: the report folder (created; other files in it are left alone).
        config: what to compute (default :class:`ReportConfig`).
        store: the result store (default :func:`~mechicl.experiments.store.default_store`).
        reuse: more folders whose results may be reused.
        force: compute every result again (and replace them in the store).
        memory_budget: choose every job's batch size so its estimated peak memory fits this
            (e.g. ``"8GB"``), instead of the configured ``batch_tokens``.
        progress: show progress bars.

    Returns:
        The :class:`Report`, with what this build computed and reused.

    Raises:
        ValueError: bad settings, or an analysis failed (its own error is raised).
    """
    start = time.perf_counter()
    model = as_hooked_model(model)
    config = config or ReportConfig()
    out = Path(out)
    check_formats(["png", *config.formats])  # before any work: kaleido for the static ones
    for folder in map(Path, reuse):
        if not folder.is_dir():
            raise ValueError(f"reuse folder {folder} does not exist")
    paper = config.tasks if "paper" in config.sections else ()
    for task in paper:  # every task has prompts left for evaluation: check before work
        for shots in config.shots:
            split_prompts(task, shots=shots, n_rank=config.n, n_eval=config.eval_n,
                          seed=config.seed)
    store = as_store(store)
    job = REPORT.job(model.name, config.options(), seed=config.seed)
    entry = ModelEntry(name=model.name, spec=model.name, memory_budget=memory_budget)
    summary = run_jobs([job], store, entries={model.name: entry},
                       executor=LocalExecutor(models={model.name: model}, progress=progress),
                       progress=progress, seed_from=[out, *reuse], force=force)
    summary.raise_first()
    stored = store.get(summary.asked_rows()[0]["key"])
    _copy_into(stored.result_path, out)
    report = Report.load(out)
    reused: dict[str, int] = {}
    computed: dict[str, int] = {}
    for row in summary.jobs[1:]:  # the report's results; not computed: stored, or not
        # needed (the rendered report was stored)
        counts = computed if row["status"] == "computed" else reused
        counts[row["analysis"]] = counts.get(row["analysis"], 0) + 1
    return dataclasses.replace(report, out=out, reused=reused, computed=computed,
                               seconds={"total": round(time.perf_counter() - start, 1)})
