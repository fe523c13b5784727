"""What the command line writes for an analysis's results, and how such output folders (and
report folders) seed a result store.

An output folder holds one folder per model, so that evaluating a second model into the same
``--out`` never overwrites the first (:func:`model_folder` names it after the model spec)::

    OUT/<model>/results/<stem>/          each job's result (a result folder, :mod:`mechicl.results`)
    OUT/<model>/results/index.json       stem -> the job and its key (checksummed)
    OUT/<model>/<stem>.<format>          figures (PNG, HTML, ...)
    OUT/<model>/<command>-summary.csv    one row per result (and .md)
    OUT/<model>/lm-eval/                 evaluations in lm-evaluation-harness's layout:
        results_<k>shot.json             acc, acc_stderr, acc_norm, acc_norm_stderr per task
        samples_<task>_<k>shot.jsonl     one line per prompt (as lm-eval's --log_samples)

Because ``index.json`` names each result's key, a later run can take the results from the
folder instead of computing them (``run_jobs(seed_from=[OUT/<model>])``): a command run again
into the same ``--out``, ``mechicl report --reuse DIR`` and a report rebuilt from its own folder
work this way, also on a fresh clone without a store. Folders written before the nesting (one
model, ``OUT/results/index.json``) keep seeding: :func:`run_analysis` reads both.
"""

import functools
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from mechicl._io import atomic_write_text
from mechicl.analyses import Analysis, Job, Outputs, get_analysis, job_stem, task_slug
from mechicl.analyses.evaluation import ACCURACY, EvalResult, task_prompts
from mechicl.experiments.grid import ModelEntry
from mechicl.experiments.runner import LocalExecutor, run_jobs
from mechicl.experiments.store import ResultStore, as_store, read_index, write_index
from mechicl.inputs.tasks import (
    TASK_FILE_SUFFIXES,
    Errors,
    load_task,
    task_from_file,
    tasks_registered,
)
from mechicl.interop.lm_eval import lm_eval_results, lm_eval_samples
from mechicl.plotting import save_figure
from mechicl.results import ResultError, load_result

__all__ = ["LM_EVAL_DIR", "markdown_table", "model_folder", "run_analysis",
           "write_lm_eval_outputs", "write_outputs", "write_summary"]

log = logging.getLogger(__name__)

LM_EVAL_DIR = "lm-eval"
"""The sub-folder of a model's output folder with its evaluations in lm-eval's layout."""

_UNSAFE = re.compile(r"[\"<>:/|\\?*\[\]]+")  # lm_eval.utils.sanitize_model_name's characters
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MAX_NAME = 120


def model_folder(spec: str | os.PathLike[str]) -> str:
    """The folder name of a model's outputs in an output folder: the model spec as given, with
    runs of ``"<>:/|\\?*[]`` replaced by ``__`` (lm-evaluation-harness's
    ``model_name_sanitized``), control characters by ``_``, and leading dots dropped (no
    hidden or relative folder); a name longer than 120 characters is cut and ends with a hash
    of the spec, so different specs keep different folders.

    >>> model_folder("smollm2-135m"), model_folder("facebook/opt-6.7b")
    ('smollm2-135m', 'facebook__opt-6.7b')
    >>> model_folder("./models/tiny"), model_folder("/data/m.gguf")
    ('__models__tiny', '__data__m.gguf')
    """
    text = os.fspath(spec)
    name = _CONTROL.sub("_", _UNSAFE.sub("__", text)).lstrip(".")
    if not text.strip():
        raise ValueError(f"model spec {text!r} is empty: give a model name, folder or file")
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    if not name or len(name) > _MAX_NAME:
        name = f"{name[: _MAX_NAME - 13]}-{digest}".lstrip("-")
    return name


def write_summary(table: pd.DataFrame, out: str | os.PathLike[str], command: str) -> str:
    """``OUT/<command>-summary.csv`` and ``.md`` (every command writes its summary this way);
    returns the markdown."""
    text = markdown_table(table.astype(object).fillna(""))
    atomic_write_text(Path(out) / f"{command}-summary.csv", table.to_csv(index=False))
    atomic_write_text(Path(out) / f"{command}-summary.md", text)
    return text


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


def write_outputs(spec: Analysis, done: Sequence[tuple[Job, Any, str, Mapping[str, Any]]],
                  out: str | os.PathLike[str], *, formats: Sequence[str] = ("png", "html"),
                  options: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Write an invocation's results into ``out``, one model's output folder (see the module
    docstring): each job's result, its figures, a summary table and, for evaluations, the
    lm-eval files (:func:`write_lm_eval_outputs`), each file atomically.

    Args:
        spec: the analysis.
        done: ``(job, result, key, manifest)`` of every job run.
        out: the output folder.
        formats: figure formats.
        options: the invocation's options (output options such as ``shared_scale``).

    Returns:
        The summary table (one row per result).
    """
    out = Path(out)
    pairs = [(job, result) for job, result, _, _ in done]
    if spec.outputs is not None:
        outputs = spec.outputs(pairs, dict(options or {}))
    else:
        outputs = Outputs(results={job_stem(job, spec.name): r for job, r in pairs},
                          rows=[{"job": job.describe()} for job, _ in pairs])
    by_result = {id(result): (job, key, manifest) for job, result, key, manifest in done}
    try:  # earlier commands into the same folder stay indexed
        index = {name: entry for name, entry in read_index(out / "results").items()
                 if (out / "results" / name).is_dir()}
    except ResultError:
        index = {}
    for stem, result in outputs.results.items():
        if id(result) not in by_result:
            raise ValueError(f"{spec.name}'s outputs() gave results/{stem} a result that is not "
                             "one of the jobs' results: it must return them as they are")
        result.save(out / "results" / stem)
        job, key, manifest = by_result[id(result)]
        index[stem] = {"key": key, "job": job.to_dict(), "seconds": manifest.get("seconds"),
                       "mechicl": manifest.get("mechicl")}
    write_index(out / "results", index)
    for stem, fig in outputs.figures.items():
        save_figure(fig, out / stem, list(formats))
    table = pd.DataFrame(outputs.rows)
    write_summary(table, out, spec.cli_name)
    write_lm_eval_outputs(out, [(job, result) for job, result, _, _ in done])
    return table


def write_lm_eval_outputs(folder: str | os.PathLike[str], pairs: Sequence[tuple[Job, Any]], *,
                          model: str | None = None) -> list[Path]:
    """Write the evaluations of one model's output folder in lm-evaluation-harness's layout
    (:mod:`mechicl.interop.lm_eval`), each file atomically, into ``folder/lm-eval/``:

    * ``samples_<task>_<k>shot.jsonl`` for each :class:`EvalResult` of ``pairs``: one line
      per prompt (its prompts rebuilt from the job, checked against the result's ids);
    * ``results_<k>shot.json`` for each shot count of the evaluations indexed in
      ``folder/results/index.json`` (this run's and earlier ones'): every task's ``acc``,
      ``acc_norm`` and their standard errors. A result without character counts (written by
      mechicl < 0.2) is left out with a logged warning.

    Args:
        folder: the model's output folder (``OUT/<model>``).
        pairs: ``(job, result)`` of this run; results of other types are ignored.
        model: the model's name in ``config.model`` (default: the jobs' model spec).

    Returns:
        The files written (none if there are no evaluations).
    """
    folder = Path(folder)
    target = folder / LM_EVAL_DIR
    written = []
    for job, result in pairs:
        if not isinstance(result, EvalResult) or job.task is None:
            continue
        model = model or job.model
        records = lm_eval_samples(result, task_prompts(load_task(job.task), job))
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        written.append(atomic_write_text(
            target / f"samples_{task_slug(job.task)}_{job.shots}shot.jsonl", text))
    by_shots: dict[int, list[EvalResult]] = {}
    pools: dict[str, int] = {}
    for stem, entry in sorted(read_index(folder / "results").items()):
        job_dict = entry.get("job") or {}
        if job_dict.get("analysis") != ACCURACY.name or not (folder / "results" / stem).is_dir():
            continue
        result = load_result(folder / "results" / stem)
        if not isinstance(result, EvalResult):
            continue
        if "n_chars" not in result.predictions:
            log.warning("%s: no character counts (written by an older mechicl), left out of "
                        "the lm-eval results; compute it again with --force", stem)
            continue
        model = model or str(job_dict.get("model"))
        try:
            pools[result.task] = len(load_task(str(job_dict.get("task"))).pools()[1])
        except (KeyError, ValueError):  # a task file of an earlier run, not registered now
            pass
        by_shots.setdefault(result.shots, []).append(result)
    for shots, results in sorted(by_shots.items()):
        data = lm_eval_results(results, model=model or "", pool_sizes=pools)
        written.append(atomic_write_text(target / f"results_{shots}shot.json",
                                         json.dumps(data, indent=2, sort_keys=False,
                                                    default=str) + "\n"))
    return written


def run_analysis(
    name: str, *, model: str = "smollm2-135m", load: Mapping[str, Any] | None = None,
    tasks: Sequence[str] = (), shots: Sequence[int] = (), seed: int = 0,
    options: Mapping[str, Any] | None = None, out: str | os.PathLike[str] | None = None,
    store: ResultStore | str | os.PathLike[str] | None = None, force: bool = False,
    memory_budget: str | int | None = None, formats: Sequence[str] = ("png", "html"),
    template: str = "{input}", task_errors: Errors = "strict", progress: bool = True,
) -> pd.DataFrame:
    """Run the registered analysis ``name`` on one model over tasks x shot counts (if it runs
    per task) and the values of its sweep options, through the result store, and write its
    outputs into ``out`` (:func:`write_outputs`): what ``mechicl <command>`` does.

    Args:
        name: the analysis (:data:`mechicl.analyses.ANALYSES`).
        model: what to load (a built-in name, folder, ``.gguf`` or hub id).
        load: further :func:`mechicl.load_model` arguments (dtype, device, ...).
        tasks: task names or task files (``.jsonl`` / ``.csv`` / ``.tsv``, read with
            ``template``), for analyses that run per task.
        shots: shot counts (default: the analysis's).
        seed: the jobs' seed.
        options: the analysis's options; a sweep option may be a list (one job per value).
        out: the output folder (None: write nothing, return the summary); the outputs go
            into its sub-folder :func:`model_folder` of ``model``.
        store: the result store (default :func:`~mechicl.experiments.store.default_store`).
        force: compute the jobs again, replacing their stored results.
        memory_budget: size batches to fit this much memory (e.g. ``"8GB"``).
        formats: figure formats.
        task_errors: bad records of task files: ``"strict"`` raises, ``"skip"`` drops each
            and records it (:func:`~mechicl.inputs.tasks.task_from_file`).
        progress: show progress bars.

    Returns:
        The summary table (one row per result).
    """
    spec = get_analysis(name)
    given = dict(options or {})
    files = {str(task): functools.partial(task_from_file, task, template=template,
                                          errors=task_errors)
             for task in tasks if str(task).endswith(TASK_FILE_SUFFIXES)}
    with tasks_registered(files):  # task files are tasks named by their path, for this run
        roles = {o.name: o.role for o in spec.options}
        run_options = {k: v for k, v in given.items() if roles.get(k) != "output"}
        cells = ([(t, s) for t in tasks for s in (shots or spec.shots)] if spec.per_task
                 else [(None, None)])
        if spec.per_task and not tasks:
            raise ValueError(f"{spec.cli_name} runs per task: give tasks")
        jobs = [spec.job(model, variant, seed=seed, task=task, shots=k)
                for variant in spec.variants(run_options) for task, k in cells]
        store = as_store(store)
        entry = ModelEntry(name=model, spec=model, load=dict(load or {}), memory_budget=memory_budget)
        folder = None if out is None else Path(out) / model_folder(model)
        # the model's folder, and OUT itself: the flat layout of mechicl before the nesting
        summary = run_jobs(jobs, store, entries={model: entry},
                           executor=LocalExecutor(progress=progress), progress=progress,
                           seed_from=[] if folder is None else [folder, Path(out)], force=force)
        summary.raise_first()
        done = []
        for job, row in zip(jobs, summary.asked_rows(), strict=True):
            stored = store.get(row["key"])
            done.append((job, stored.load(), row["key"], stored.manifest))
        if folder is None:
            pairs = [(job, result) for job, result, _, _ in done]
            outputs = spec.outputs(pairs, given) if spec.outputs else Outputs()
            return pd.DataFrame(outputs.rows)
        return write_outputs(spec, done, folder, formats=formats, options=given)
