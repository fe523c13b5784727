"""The paper report: every figure type of Bansal et al. (2023) for one model, with a summary.

:func:`build_report` runs (or reuses cached results of) the induction scans, head importance
for tasks x shot counts, ICL accuracy, pruning curves (by task importance, by induction score,
random), FFN knock-out importance and FFN pruning, and the overlap analysis between induction
heads and task-important heads. It writes, into one folder::

    report.md, report.html      the summary (tables + figures; the HTML is interactive)
    report.json                 settings, run times, which results were reused, the tables
    img/<figure>.png            every figure (other formats on request)
    tables/<table>.csv          every table
    results/<kind>/<name>/      every result (HeadScores / LayerScores / EvalResult / PruneCurve)

Results are cached: a result folder is reused when it was computed for the same model
(weights and tokenizer hashes) with the same settings and the same prompts; anything else is
recomputed. ``reuse=`` adds folders searched for results with the same relative names (e.g. the
output of ``mechicl scan``: ``DIR/results/<model>-<score>``).

Prompt split per task and shot count (one seeded list of k-shot prompts): the first ``n`` give
the importance maps (and so the pruning rankings); the next ``eval_n`` give the accuracies and
the pruning curves, so rankings are never evaluated on their own prompts.
"""

import dataclasses
import datetime
import html
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from mechicl._checks import check_positive
from mechicl._io import atomic_path, atomic_write_text
from mechicl.evaluation import EvalResult, evaluate, wilson_interval
from mechicl.importance import IMPORTANCE_METHODS, ffn_importance, head_importance
from mechicl.induction import SCORES, _length_label, bansal_length, induction_scan
from mechicl.models import HookedModel, as_hooked_model
from mechicl.overlap import (
    overlap_matrix,
    overlap_table,
    spearman,
    top_k,
)
from mechicl.plotting import (
    FORMATS,
    head_heatmap,
    layer_bars,
    loss_curve,
    matrix_heatmap,
    prune_curve_figure,
    save_figure,
    score_scatter,
)
from mechicl.pruning import PruneCurve, prune_curve, split_prompts
from mechicl.results import HeadScores, LayerScores
from mechicl.tasks import TASKS, Prompt

__all__ = [
    "Report",
    "ReportConfig",
    "build_report",
    "curve_summaries",
    "fit_memory_budget",
    "markdown_table",
    "report_prompts",
]

log = logging.getLogger(__name__)

R = TypeVar("R", HeadScores, LayerScores, EvalResult, PruneCurve)


def _default_tasks() -> tuple[str, ...]:
    return tuple(TASKS)


@dataclass(frozen=True, kw_only=True)
class ReportConfig:
    """What the report computes. The defaults give the committed report of the default model.

    Attributes:
        tasks: tasks for importance, accuracy and overlap (default: every built-in task).
        shots: shot counts (default 0, 1, 5 as the paper).
        n: prompts per task and shot count for the importance maps.
        eval_n: further prompts per task and shot count for accuracy and pruning curves.
        method: importance method (``bansal``, ``michel`` or ``ablation``).
        scores: induction scores of the scan (the paper's: prefix matching and copying).
        scan_seeds: random sequences per induction score.
        scan_length: one length L for every scan sequence (default: Bansal et al.'s
            L = 2s + 25 for seed index s); small vocabularies need a short one.
        prune_tasks: tasks with pruning curves and FFN knock-out (a subset of ``tasks``).
        prune_shots: shot counts of the pruning curves and FFN knock-out (a subset of ``shots``).
        percents: percentages of heads removed along the head pruning curves.
        ffn_percents: percentages of FFNs removed along the FFN pruning curves.
        draws: random-ranking draws per pruning curve.
        ffn: compute FFN knock-out importance and FFN pruning curves.
        top_k_percent: "top heads" for the overlap statistics: this percentage of all heads.
        n_permutations: permutations of the permutation p-values.
        n_resamples: bootstrap resamples of the confidence intervals.
        seed: seeds prompts, scans, random rankings, permutations and resamples.
        batch_tokens: rows x longest row per forward pass (scans, accuracy, FFN knock-out,
            pruning curves).
        importance_batch_tokens: the same for head importance (None: its default, 2048 for
            gradients). :func:`fit_memory_budget` sets both from a memory budget.
        formats: figure formats written to ``img/`` (PNG is always written: report.md embeds it).
    """

    tasks: tuple[str, ...] = field(default_factory=_default_tasks)
    shots: tuple[int, ...] = (0, 1, 5)
    n: int = 50
    eval_n: int = 50
    method: str = "bansal"
    scores: tuple[str, ...] = ("prefix_matching", "copying")
    scan_seeds: int = 100
    scan_length: int | None = None
    prune_tasks: tuple[str, ...] = ("country_capital", "antonyms")
    prune_shots: tuple[int, ...] = (1,)
    percents: tuple[int, ...] = (0, 10, 20, 30, 40, 50, 60, 70, 80, 90)
    ffn_percents: tuple[int, ...] = (0, 10, 20, 30, 40, 50)
    draws: int = 2
    ffn: bool = True
    top_k_percent: int | float = 10.0
    n_permutations: int = 1000
    n_resamples: int = 1000
    seed: int = 0
    batch_tokens: int = 4096
    importance_batch_tokens: int | None = None
    formats: tuple[str, ...] = ("png",)

    def __post_init__(self) -> None:
        for name in ("tasks", "shots", "scores", "prune_tasks", "prune_shots", "percents",
                     "ffn_percents", "formats"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise ValueError(f"{name}={value!r} must be a sequence (e.g. a tuple)")
            object.__setattr__(self, name, tuple(value))
        if not self.tasks:
            raise ValueError("tasks=() is empty: give at least one task")
        unknown = [t for t in (*self.tasks, *self.prune_tasks) if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; registered: {sorted(TASKS)}")
        missing = [t for t in self.prune_tasks if t not in self.tasks]
        if missing:
            raise ValueError(f"prune_tasks {missing} are not in tasks={list(self.tasks)}")
        if not self.shots or any(not isinstance(s, int) or s < 0 for s in self.shots):
            raise ValueError(f"shots={self.shots!r}: need one or more integers >= 0")
        missing_shots = [s for s in self.prune_shots if s not in self.shots]
        if missing_shots:
            raise ValueError(f"prune_shots {missing_shots} are not in shots={list(self.shots)}")
        bad_scores = [s for s in self.scores if s not in SCORES]
        if bad_scores or not self.scores:
            raise ValueError(f"unknown scores {bad_scores or list(self.scores)}; allowed: "
                             f"{list(SCORES)}")
        if self.method not in IMPORTANCE_METHODS:
            raise ValueError(f"method={self.method!r} is not allowed; choose one of "
                             f"{list(IMPORTANCE_METHODS)}")
        for name in ("n", "eval_n", "scan_seeds", "n_permutations", "n_resamples",
                     "batch_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.scan_length is not None and (not isinstance(self.scan_length, int)
                                             or self.scan_length < 2):
            raise ValueError(f"scan_length={self.scan_length!r} must be None or an integer >= 2")
        if self.importance_batch_tokens is not None:
            check_positive("importance_batch_tokens", self.importance_batch_tokens)
        if not isinstance(self.draws, int) or self.draws < 0:
            raise ValueError(f"draws={self.draws!r} must be an integer >= 0")
        for name in ("percents", "ffn_percents"):
            values = getattr(self, name)
            if any(not 0 <= p < 100 for p in values) or 0 not in values:
                raise ValueError(f"{name}={values!r}: need 0 and values in [0, 100)")
        if not 0 < self.top_k_percent <= 100:
            raise ValueError(f"top_k_percent={self.top_k_percent!r} must be in (0, 100]")
        bad_formats = [f for f in self.formats if f not in FORMATS]
        if bad_formats:
            raise ValueError(f"unknown formats {bad_formats}; allowed: {list(FORMATS)}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True, kw_only=True)
class Report:
    """What :func:`build_report` produced.

    Attributes:
        out: the report folder.
        config: the settings.
        tables: every table by name (also written as ``tables/<name>.csv``).
        figures: every figure by name (also written as ``img/<name>.png``).
        seconds: wall time per stage (``total`` included); reused results cost ~0.
        reused: per stage, how many results were loaded from the cache.
        computed: per stage, how many results were computed.
    """

    out: Path
    config: ReportConfig
    tables: dict[str, pd.DataFrame] = field(repr=False)
    figures: dict[str, go.Figure] = field(repr=False)
    seconds: dict[str, float]
    reused: dict[str, int]
    computed: dict[str, int]


def markdown_table(table: pd.DataFrame, *, digits: int = 3) -> str:
    """A DataFrame as a GitHub markdown table (floats rounded to ``digits`` decimals).

    >>> print(markdown_table(pd.DataFrame({"a": [1], "b": [0.5]})), end="")
    | a | b |
    |---|---|
    | 1 | 0.500 |
    """
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "" if v != v else f"{v:.{digits}f}"
        return str(v).replace("|", "\\|")

    header = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "---|" * len(table.columns)
    body = ["| " + " | ".join(cell(v) for v in row) + " |"
            for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


# --------------------------------------------------------------------------------------------
# Cache


def _json_normal(value: Any) -> Any:
    return json.loads(json.dumps(value))


class _Cache:
    """Result folders under ``root/results``, reused when model and settings match."""

    KINDS: dict[type, str] = {HeadScores: "meta.json", LayerScores: "meta.json",
                              EvalResult: "result.json", PruneCurve: "curve.json"}

    def __init__(self, root: Path, reuse: Sequence[Path], model: HookedModel, force: bool):
        self.root = root
        self.search = [root, *reuse]
        info = model.info()
        self.model_id = {k: info[k] for k in ("weights_sha256", "tokenizer_sha256")}
        self.force = force
        self.reused: dict[str, int] = {}
        self.computed: dict[str, int] = {}
        self.sources: dict[str, str] = {}
        self.compute_seconds: dict[str, float] = {}  # per stage, as recorded by the results

    def _count(self, stage: str, result: Any) -> None:
        recorded = self._settings(result).get("seconds")
        if recorded is not None:
            self.compute_seconds[stage] = round(self.compute_seconds.get(stage, 0.0)
                                                + float(recorded), 1)

    @staticmethod
    def _settings(result: Any) -> dict[str, Any]:
        return result.config if isinstance(result, EvalResult) else result.params

    def get(self, stage: str, name: str, cls: type[R], want: dict[str, Any],
            compute: Callable[[], R]) -> R:
        """The result ``results/<name>``: loaded if a stored one matches ``want``, else
        computed and saved."""
        want = _json_normal(want)
        target = self.root / "results" / name
        if not self.force:
            for base in self.search:
                path = base / "results" / name
                if not (path / self.KINDS[cls]).exists():
                    continue
                try:
                    result = cls.load(path)
                except (OSError, ValueError, KeyError) as err:
                    log.warning("ignoring unreadable cached result %s: %s", path, err)
                    continue
                settings = self._settings(result)
                same_model = all(result.model.get(k) == v for k, v in self.model_id.items())
                stale = [k for k, v in want.items() if settings.get(k) != v]
                if same_model and not stale:
                    if path != target:  # keep the report folder self-contained
                        with atomic_path(target) as tmp:
                            shutil.copytree(path, tmp)
                    self.reused[stage] = self.reused.get(stage, 0) + 1
                    self.sources[name] = str(path)
                    self._count(stage, result)
                    log.info("reusing %s", path)
                    return result
                log.info("not reusing %s (%s)", path,
                         "other model" if not same_model else f"settings differ: {stale}")
        start = time.perf_counter()
        result = compute()
        seconds = round(time.perf_counter() - start, 2)
        if isinstance(result, EvalResult):  # the time it took, kept with the result
            result = dataclasses.replace(result, config=result.config | {"seconds": seconds})
        else:
            result = dataclasses.replace(result, params=result.params | {"seconds": seconds})
        result.save(target)
        self.computed[stage] = self.computed.get(stage, 0) + 1
        self._count(stage, result)
        return result


# --------------------------------------------------------------------------------------------
# Document: one list of blocks rendered as markdown and as HTML


class _Doc:
    def __init__(self) -> None:
        self.blocks: list[tuple[str, Any]] = []
        self.figures: dict[str, go.Figure] = {}
        self.tables: dict[str, pd.DataFrame] = {}

    def heading(self, level: int, text: str) -> None:
        self.blocks.append(("heading", (level, text)))

    def text(self, text: str) -> None:
        self.blocks.append(("text", text))

    def table(self, name: str, table: pd.DataFrame, caption: str = "") -> None:
        self.tables[name] = table
        self.blocks.append(("table", (name, caption)))

    def figures_row(self, items: Sequence[tuple[str, go.Figure]], caption: str = "") -> None:
        for name, fig in items:
            if name in self.figures:
                raise ValueError(f"two figures named {name!r}")
            self.figures[name] = fig
        self.blocks.append(("figures", ([n for n, _ in items], caption)))

    def markdown(self) -> str:
        out = []
        for kind, value in self.blocks:
            if kind == "heading":
                out.append("#" * value[0] + " " + value[1] + "\n")
            elif kind == "text":
                out.append(value + "\n")
            elif kind == "table":
                name, caption = value
                out.append((f"*{caption}* (`tables/{name}.csv`)\n\n" if caption else "")
                           + markdown_table(self.tables[name]))
            else:
                names, caption = value
                imgs = " ".join(f'<img src="img/{n}.png" width="{_md_width(self.figures[n])}" '
                                f'alt="{n}">' for n in names)
                out.append(imgs + ("\n\n*" + caption + "*" if caption else "") + "\n")
        return "\n".join(out)

    def html(self, title: str) -> str:
        body = []
        toc = []
        for i, (kind, value) in enumerate(self.blocks):
            if kind == "heading":
                level, text = value
                anchor = f"s{i}"
                if level == 2:
                    toc.append(f'<li><a href="#{anchor}">{html.escape(text)}</a></li>')
                body.append(f'<h{level} id="{anchor}">{html.escape(text)}</h{level}>')
            elif kind == "text":
                body.append(_paragraphs(value))
            elif kind == "table":
                name, caption = value
                cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
                table = self.tables[name].to_html(index=False, float_format=lambda v: f"{v:.3f}",
                                                  na_rep="", border=0)
                body.append(table.replace("<table", "<table class=\"data\"", 1)
                            .replace("<thead>", cap + "<thead>", 1))
            else:
                names, caption = value
                divs = "".join(
                    '<div class="fig">' + self.figures[n].to_html(
                        full_html=False, include_plotlyjs=False, div_id=f"fig-{n}",
                        config={"displaylogo": False}) + "</div>" for n in names)
                cap = f'<p class="caption">{html.escape(caption)}</p>' if caption else ""
                body.append(f'<div class="row">{divs}</div>{cap}')
        return _HTML.format(title=html.escape(title), toc="".join(toc), body="\n".join(body))


def _md_width(fig: go.Figure) -> int:
    return int(min(fig.layout.width or 640, 640) * 0.75)


def _paragraphs(text: str) -> str:
    """Plain text with ``code`` and blank-line paragraphs as HTML (everything else escaped)."""
    out = []
    for para in text.strip().split("\n\n"):
        escaped = html.escape(para)
        parts = escaped.split("`")
        for i in range(1, len(parts), 2):
            parts[i] = f"<code>{parts[i]}</code>"
        lines = "`".join(parts) if len(parts) % 2 == 0 else "".join(parts)
        if lines.lstrip().startswith("- "):
            items = [li.strip()[2:] for li in lines.split("\n") if li.strip()]
            out.append("<ul>" + "".join(f"<li>{li}</li>" for li in items) + "</ul>")
        else:
            out.append(f"<p>{lines}</p>")
    return "\n".join(out)


_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<script src="plotly.min.js"></script>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1400px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }}
.row {{ display: flex; flex-wrap: wrap; gap: 8px; }}
.fig {{ flex: 0 0 auto; }}
.caption {{ color: #555; font-style: italic; }}
table.data {{ border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0 1.5em; }}
table.data th, table.data td {{ border-bottom: 1px solid #ddd; padding: 3px 8px; text-align: right; }}
table.data caption {{ caption-side: top; text-align: left; font-style: italic; color: #555; }}
code {{ background: #f3f3f3; padding: 0 3px; }}
nav ul {{ columns: 2; }}
</style></head>
<body>
<h1>{title}</h1>
<nav><ul>{toc}</ul></nav>
{body}
</body></html>
"""


# --------------------------------------------------------------------------------------------
# The report


def _stamp(seconds: dict[str, float], stage: str, start: float) -> None:
    seconds[stage] = round(seconds.get(stage, 0.0) + time.perf_counter() - start, 1)


def _relative(scores: HeadScores) -> Any:
    """The map divided by its largest value (importance maps share one 0-1 colour scale)."""
    top = scores.mean.max()
    return scores.mean / top if float(top) > 0 else scores.mean


def report_prompts(config: ReportConfig) -> dict[tuple[str, int], tuple[list[Prompt],
                                                                        list[Prompt]]]:
    """The report's prompts per ``(task, shots)``: one seeded list split into importance
    prompts (the first ``n``) and evaluation prompts (the next ``eval_n``)."""
    return {(task_name, shots): split_prompts(task_name, shots=shots, n_rank=config.n,
                                              n_eval=config.eval_n, seed=config.seed)
            for task_name in config.tasks for shots in config.shots}


def fit_memory_budget(model: HookedModel, config: ReportConfig,
                      budget: int | str) -> ReportConfig:
    """``config`` with ``batch_tokens`` and ``importance_batch_tokens`` the largest whose
    estimated peak memory (:mod:`mechicl.memory`) fits ``budget`` for the longest sequence each
    runs: the scan's repeated sequences and every prompt plus answer for the forward-only
    analyses (memory model ``choices``), the importance prompts for head importance.

    Raises:
        ValueError: the budget does not hold one sequence (the message says what is needed).
    """
    from mechicl.memory import batch_tokens_for_budget, longest_prompt, longest_scan_sequence

    model = as_hooked_model(model)
    prompts = report_prompts(config).values()

    def fit(analysis: str, seq_len: int) -> int:
        return batch_tokens_for_budget(model, budget, seq_len=seq_len, analysis=analysis)

    scan = fit("scan", longest_scan_sequence(config.scan_seeds, length=config.scan_length))
    choices = fit("choices", longest_prompt(model, [p for rank, ev in prompts
                                                    for p in (*rank, *ev)]))
    importance = fit("importance", longest_prompt(model, [p for rank, _ in prompts
                                                          for p in rank]))
    return dataclasses.replace(config, batch_tokens=min(scan, choices),
                               importance_batch_tokens=importance)


def build_report(
    model: HookedModel, out: str | Path, config: ReportConfig | None = None, *,
    reuse: Sequence[str | Path] = (), force: bool = False, progress: bool = False,
) -> Report:
    """Compute (or reuse) everything the report needs and write it into ``out``.

    Args:
        model: the model.
        out: the report folder (created; results already in ``out/results`` are reused).
        config: what to compute (default :class:`ReportConfig`).
        reuse: more folders whose ``results/`` are searched for reusable results.
        force: recompute everything.
        progress: show progress bars.

    Returns:
        A :class:`Report` with every table and figure.
    """
    model = as_hooked_model(model)
    config = config or ReportConfig()
    out = Path(out)
    for folder in map(Path, reuse):
        if not folder.is_dir():
            raise ValueError(f"reuse folder {folder} does not exist")
    start_all = time.perf_counter()
    cache = _Cache(out, [Path(r) for r in reuse], model, force)
    seconds: dict[str, float] = {}
    slug = Path(model.name).name.replace("/", "_")
    n_heads_total = model.n_layers * model.n_heads
    k_top = top_k(n_heads_total, percentile=config.top_k_percent)

    prompts = report_prompts(config)

    # -- induction scans
    t0 = time.perf_counter()
    scans: dict[str, HeadScores] = {}
    length = bansal_length if config.scan_length is None else _Constant(config.scan_length)
    for score in config.scores:
        want = {"n_seeds": config.scan_seeds, "seed": config.seed, "score": score,
                "mask": None}
        if score == "copying":
            want["n_tokens"] = f"4 * L, L = {_length_label(length)}"
        elif score == "ov_eigen":
            want = {"score": score, "mask": None}
        else:
            want["length"] = _length_label(length)

        def run_scan(score: str = score) -> HeadScores:
            return induction_scan(model, scores=(score,), n_seeds=config.scan_seeds,
                                  seed=config.seed, length=length,
                                  batch_tokens=config.batch_tokens,
                                  progress=progress).scores[score]

        scans[score] = cache.get("scan", f"{slug}-{score}", HeadScores, want, run_scan)
    _stamp(seconds, "scan", t0)

    # -- accuracy
    t0 = time.perf_counter()
    accuracy: dict[tuple[str, int], EvalResult] = {}
    for (task_name, shots), (_, eval_prompts) in prompts.items():
        want = {"shots": shots, "prompt_ids": [p.id for p in eval_prompts],
                "length_normalize": False, "mask": None}
        accuracy[task_name, shots] = cache.get(
            "accuracy", f"accuracy/{task_name}-{shots}shot", EvalResult, want,
            lambda task_name=task_name, shots=shots, ep=eval_prompts: evaluate(
                model, task_name, shots=shots, prompts=ep, batch_tokens=config.batch_tokens,
                progress=progress))
    _stamp(seconds, "accuracy", t0)

    # -- head importance
    t0 = time.perf_counter()
    importance: dict[tuple[str, int], HeadScores] = {}
    for (task_name, shots), (imp_prompts, _) in prompts.items():
        want = {"method": config.method, "shots": shots, "prompt_ids":
                [p.id for p in imp_prompts], "token_normalization": "reference",
                "normalize_layers": False, "mask": None}
        importance[task_name, shots] = cache.get(
            "importance", f"importance/{task_name}-{shots}shot-{config.method}", HeadScores,
            want, lambda task_name=task_name, shots=shots, ip=imp_prompts: head_importance(
                model, task_name, shots=shots, method=config.method, prompts=ip,
                batch_tokens=config.importance_batch_tokens, progress=progress))
    _stamp(seconds, "importance", t0)

    # -- FFN knock-out importance
    t0 = time.perf_counter()
    ffn: dict[tuple[str, int], LayerScores] = {}
    if config.ffn:
        for task_name in config.prune_tasks:
            for shots in config.prune_shots:
                imp_prompts = prompts[task_name, shots][0]
                want = {"shots": shots, "prompt_ids": [p.id for p in imp_prompts],
                        "metric": "accuracy", "ablation": "zero", "mask": None}
                ffn[task_name, shots] = cache.get(
                    "ffn_importance", f"ffn/{task_name}-{shots}shot", LayerScores, want,
                    lambda task_name=task_name, shots=shots, ip=imp_prompts: ffn_importance(
                        model, task_name, shots=shots, prompts=ip,
                        batch_tokens=config.batch_tokens, progress=progress))
    _stamp(seconds, "ffn_importance", t0)

    # -- pruning curves
    t0 = time.perf_counter()

    def curve(kind: str, task_name: str, shots: int, eval_prompts: list[Prompt],
              rankings: dict[str, Any]) -> PruneCurve:
        """A head (``kind="heads"``) or FFN pruning curve, cached."""
        percents = config.percents if kind == "heads" else config.ffn_percents
        swept, fixed = ("head", "ffn") if kind == "heads" else ("ffn", "head")
        want = {"shots": shots, "prompt_ids": [p.id for p in eval_prompts],
                "random_draws": config.draws, "seed": config.seed, "ablation": "zero",
                "length_normalize": False,
                f"{swept}_percents": [float(p) for p in sorted(set(percents))],
                f"{fixed}_percents": [0.0], f"{swept}_rankings": sorted(rankings),
                "ranking_sources": _ranking_sources(rankings)}
        return cache.get("pruning", f"pruning/{task_name}-{shots}shot-{kind}", PruneCurve, want,
                         lambda: _with(prune_curve(
                             model, task_name, shots=shots, prompts=eval_prompts,
                             **{f"{swept}_rankings": rankings, f"{swept}_percents": percents,
                                f"{fixed}_percents": (0,)},
                             random_draws=config.draws, seed=config.seed,
                             batch_tokens=config.batch_tokens, progress=progress),
                             ranking_sources=want["ranking_sources"]))

    head_curves: dict[tuple[str, int], PruneCurve] = {}
    ffn_curves: dict[tuple[str, int], PruneCurve] = {}
    first_score = config.scores[0]
    for i, task_name in enumerate(config.prune_tasks):
        other = config.prune_tasks[(i + 1) % len(config.prune_tasks)]
        for shots in config.prune_shots:
            eval_prompts = prompts[task_name, shots][1]
            rankings: dict[str, Any] = {f"same task ({task_name})": importance[task_name, shots]}
            if other != task_name:
                rankings[f"other task ({other})"] = importance[other, shots]
            induction_first = f"induction heads first ({first_score.replace('_', ' ')})"
            rankings[induction_first] = -scans[first_score].mean  # highest score pruned first
            head_curves[task_name, shots] = curve("heads", task_name, shots, eval_prompts,
                                                  rankings)
            if config.ffn:
                ffn_curves[task_name, shots] = curve(
                    "ffn", task_name, shots, eval_prompts,
                    {f"same task ({task_name})": ffn[task_name, shots].mean})
    _stamp(seconds, "pruning", t0)

    # -- overlap statistics (cheap: computed every time)
    t0 = time.perf_counter()
    overlap = overlap_table(importance, scans, k=k_top, n_permutations=config.n_permutations,
                            n_resamples=config.n_resamples, seed=config.seed)
    _stamp(seconds, "overlap", t0)

    t0 = time.perf_counter()
    doc = _document(model, config, scans, accuracy, importance, ffn, head_curves, ffn_curves,
                    overlap, k_top)
    seconds["total"] = round(time.perf_counter() - start_all, 1)
    meta = {"model": model.info(), "config": config.to_dict(), "seconds": seconds,
            "reused": cache.reused, "computed": cache.computed, "reused_from": cache.sources,
            "compute_seconds": cache.compute_seconds,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    _write(out, doc, meta, config.formats, f"mechicl report: {slug}")
    _stamp(seconds, "figures", t0)
    seconds["total"] = round(time.perf_counter() - start_all, 1)
    atomic_write_text(out / "report.json", json.dumps(
        meta | {"seconds": seconds, "tables": {k: v.to_dict("records")
                                               for k, v in doc.tables.items()}},
        indent=2, default=str))
    return Report(out=out, config=config, tables=doc.tables, figures=doc.figures,
                  seconds=seconds, reused=cache.reused, computed=cache.computed)


@dataclass(frozen=True)
class _Constant:
    """A fixed scan length (a named callable rather than a lambda: its label is stable)."""

    value: int

    def __call__(self, seed_index: int) -> int:
        return self.value


def _ranking_sources(rankings: dict[str, Any]) -> dict[str, str]:
    """A fingerprint of each ranking's values, so that a cached curve is only reused when its
    rankings are the same (their order is all that matters)."""
    from mechicl.pruning import prune_order

    out = {}
    for name, scores in rankings.items():
        values = scores.mean if isinstance(scores, (HeadScores, LayerScores)) else scores
        out[name] = ",".join(map(str, prune_order(values).tolist()))
    return out


def _with(curve: PruneCurve, **params: Any) -> PruneCurve:
    return dataclasses.replace(curve, params=curve.params | params)


def _document(model: HookedModel, config: ReportConfig, scans: dict[str, HeadScores],
              accuracy: dict[tuple[str, int], EvalResult],
              importance: dict[tuple[str, int], HeadScores],
              ffn: dict[tuple[str, int], LayerScores],
              head_curves: dict[tuple[str, int], PruneCurve],
              ffn_curves: dict[tuple[str, int], PruneCurve], overlap: pd.DataFrame,
              k: int) -> _Doc:
    doc = _Doc()
    group = model.group_size
    n_total = model.n_layers * model.n_heads
    info = model.info()
    doc.text(
        f"Model `{model.name}` ({model.n_layers} layers x {model.n_heads} query heads"
        + (f", {model.n_kv_heads} KV heads" if model.n_kv_heads != model.n_heads else "")
        + f" = {n_total} heads; weights sha256 `{str(info['weights_sha256'])[:12]}`). "
        f"Tasks: {', '.join(config.tasks)}; shots {', '.join(map(str, config.shots))}. "
        f"Importance method `{config.method}` on {config.n} prompts per task and shot count; "
        f"accuracy and pruning curves on the next {config.eval_n} prompts of the same seeded "
        f"list (disjoint from the importance prompts). Induction scans: {config.scan_seeds} "
        f"random sequences per score. Heatmaps put layer 0 at the bottom"
        + ("; white lines separate the KV groups." if group > 1 else "."))

    # 1. accuracy
    doc.heading(2, "ICL accuracy")
    acc = pd.DataFrame([r.summary() for r in accuracy.values()])
    wide = acc.pivot(index="task", columns="shots", values="accuracy").reindex(config.tasks)
    wide.columns = [f"{s}-shot" for s in wide.columns]
    wide.insert(0, "chance", acc.groupby("task").chance.first().reindex(config.tasks))
    doc.table("accuracy", wide.reset_index(), f"Accuracy on {config.eval_n} prompts per cell "
              "(95% Wilson intervals in accuracy-long.csv)")
    doc.tables["accuracy-long"] = acc
    weak = [t for t in config.tasks
            if acc[acc.task == t].accuracy.max() <= acc[acc.task == t].chance.iloc[0] + 0.05]
    if weak:
        doc.text(f"At or near chance at every shot count: {', '.join(weak)}. Their importance "
                 "maps say which heads carry the answer loss, not which heads do the task.")

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
    doc.text(f"`{config.method}` importance of every head for the answer loss (Bansal et al. "
             "Fig. 2 type). Each map is divided by its own maximum so that every heatmap "
             "shares one 0-1 colour scale; rankings, and every statistic below, are unaffected.")
    for task_name in config.tasks:
        doc.heading(3, task_name)
        doc.figures_row([(f"importance-{task_name}-{s}shot", head_heatmap(
            _relative(importance[task_name, s]), title=f"{task_name} {s}-shot",
            zmin=0.0, zmax=1.0, kv_group_size=group, colorbar_title="importance / max"))
            for s in config.shots])

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
        medians = []
        for name, _ in matrices:
            m = doc.tables[name].set_index("task").to_numpy()
            off = m[~np.eye(len(m), dtype=bool)]
            medians.append(f"{name.removeprefix('cross-task-')} {np.median(off):.2f}")
        doc.text("Median Spearman between two tasks' importance maps: " + ", ".join(medians)
                 + ".")
        doc.figures_row(matrices, "Importance maps of different tasks agree when the same heads "
                        "matter for them (Bansal et al. Fig. 3 type).")
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
        doc.text("Accuracy while removing a growing share of heads (zero ablation of the head's "
                 "output before W_O), least important first by the task's own importance "
                 "ranking, by another task's ranking, and with the highest induction (prefix "
                 "matching) scores first; random orders as the baseline (mean, band: min-max "
                 "of the draws). Bansal et al. Figs. 4 and 8 type.")
        doc.figures_row([(f"prune-heads-{t}-{s}shot", prune_curve_figure(c, x="head_percent"))
                         for (t, s), c in head_curves.items()])
        base = next(iter(head_curves.values()))
        low, high = wilson_interval(round(base.baseline * config.eval_n), config.eval_n)
        doc.text(f"Curves are evaluated on {config.eval_n} prompts: one prompt is "
                 f"{100 / config.eval_n:.0f} accuracy points, and the 95% interval of the first "
                 f"unpruned accuracy ({base.baseline:.2f}) is [{low:.2f}, {high:.2f}]; read "
                 "differences of a few points as noise.")
        doc.table("prune-heads-accuracy", _prune_accuracy(head_curves, "head"),
                  "Accuracy by share of heads removed (random: mean over draws)")
        doc.table("prune-heads-summary", _prune_summary(head_curves),
                  "Largest share of heads removable with accuracy within 5 points of the "
                  "unpruned model (and above chance)")
    if ffn:
        doc.heading(2, "FFN importance and pruning FFNs")
        doc.figures_row([(f"ffn-importance-{t}-{s}shot", layer_bars(
            v, title=f"{t} {s}-shot: FFN knock-out", yaxis_title="accuracy drop"))
            for (t, s), v in ffn.items()],
            "Accuracy drop when each layer's FFN is removed (Bansal et al. Fig. 5 type); error "
            "bars: one standard error over prompts.")
        if ffn_curves:
            doc.figures_row([(f"prune-ffn-{t}-{s}shot", prune_curve_figure(c, x="ffn_percent"))
                             for (t, s), c in ffn_curves.items()])
            doc.table("prune-ffn-accuracy", _prune_accuracy(ffn_curves, "ffn"),
                      "Accuracy by share of FFNs removed (random: mean over draws)")
            doc.table("prune-ffn-summary", _prune_summary(ffn_curves, unit="ffn"),
                      "Largest share of FFNs removable within 5 points")

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
    doc.table("overlap", overlap, "Induction score vs importance per task and shot count")
    columns = [(s, shots) for s in scans for shots in config.shots]
    for stat, title, zmin in (("spearman", "Spearman", -1.0), (f"top-{k} overlap",
                                                                  f"top-{k} overlap", 0.0)):
        mat = overlap.pivot_table(index="task", columns=["induction score", "shots"],
                                  values=stat).reindex(index=list(config.tasks), columns=columns)
        mat.columns = [f"{s.replace('_', ' ')} {shots}-shot" for s, shots in mat.columns]
        doc.figures_row([(f"overlap-{'topk' if stat != 'spearman' else stat}", matrix_heatmap(
            mat, title=f"{title}: induction score vs importance", zmin=zmin, zmax=1.0,
            colorscale="RdBu_r" if stat == "spearman" else "Blues",
            colorbar_title="rho" if stat == "spearman" else "share of top heads"))])
    last = max(config.shots)
    first_score = next(iter(scans))
    doc.text(f"Each head's {first_score.replace('_', ' ')} score against its importance at "
             f"{last} shots; the 5 highest heads of either score are labelled.")
    for i in range(0, len(config.tasks), 3):
        doc.figures_row([(f"scatter-{first_score}-{t}-{last}shot", score_scatter(
            scans[first_score], importance[t, last], x_title=first_score.replace("_", " "),
            y_title="importance", title=f"{t} {last}-shot")) for t in config.tasks[i:i + 3]])
    return doc


def _prune_accuracy(curves: dict[tuple[str, int], PruneCurve], unit: str) -> pd.DataFrame:
    """One row per task, shots and ranking; one column per percentage removed."""
    key, x = f"{unit}_ranking", f"{unit}_percent"
    frames = []
    for (task_name, shots), curve in curves.items():
        data = curve.data[curve.data[key] != "none"]
        wide = data.pivot_table(index=key, columns=x, values="accuracy", aggfunc="mean")
        wide.columns = [f"{p:g}%" for p in wide.columns]
        wide = wide.reset_index().rename(columns={key: "ranking"})
        wide.insert(0, "shots", shots)
        wide.insert(0, "task", task_name)
        frames.append(wide)
    return pd.concat(frames, ignore_index=True)


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


def _prune_summary(curves: dict[tuple[str, int], PruneCurve], unit: str = "head",
                   ) -> pd.DataFrame:
    table = curve_summaries(curves)
    key = "head_ranking" if unit == "head" else "ffn_ranking"
    value = "max_head_percent" if unit == "head" else "max_ffn_percent"
    return table[["task", "shots", key, "baseline", value, "draws"]].rename(
        columns={key: "ranking", value: f"max % {unit}s removed"})


def _write(out: Path, doc: _Doc, meta: dict[str, Any], formats: Sequence[str],
           title: str) -> None:
    """Figures, tables, report.md and report.html; each file atomically."""
    import plotly.offline

    formats = list(dict.fromkeys(["png", *formats]))
    for name, fig in doc.figures.items():
        save_figure(fig, out / "img" / name, formats)
    for name, table in doc.tables.items():
        atomic_write_text(out / "tables" / f"{name}.csv", table.to_csv(index=False))
    seconds = meta["seconds"]
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items() if k != "total")
    reused = sum(meta["reused"].values())
    computed = sum(meta["computed"].values())
    work = meta["compute_seconds"]
    cost = ", ".join(f"{k} {v / 60:.1f} min" for k, v in work.items())
    doc.blocks.insert(0, ("text", (
        f"Created {meta['created']} by mechicl {meta['model']['versions'].get('mechicl')} in "
        f"{seconds['total'] / 60:.1f} min ({timing}); {computed} results computed, {reused} "
        f"reused from the cache. Computing every result took {sum(work.values()) / 60:.0f} min "
        f"on the machine that made it ({cost}; results without a recorded time, such as scans "
        "reused from `mechicl scan`, not counted). Settings: `report.json`. Interactive "
        "version: `report.html`; static figures: `img/`; tables: `tables/`.")))
    atomic_write_text(out / "report.md", f"# {title}\n\n" + doc.markdown())
    js = out / "plotly.min.js"
    if not js.exists():
        atomic_write_text(js, plotly.offline.get_plotlyjs())
    atomic_write_text(out / "report.html", doc.html(title))

