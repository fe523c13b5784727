"""What the command line writes for an analysis's results, and how such output folders (and
report folders) seed a result store.

An output folder::

    OUT/results/<stem>/          each job's result (a result folder, :mod:`mechicl.results`)
    OUT/results/index.json       stem -> the job and its key (checksummed)
    OUT/<stem>.<format>          figures (PNG, HTML, ...)
    OUT/<command>-summary.csv    one row per result (and .md)

Because ``index.json`` names each result's key, a later run can take the results from the
folder instead of computing them (``run_jobs(seed_from=[DIR])``): a command run again into
the same ``--out``, ``mechicl report --reuse DIR`` and a report rebuilt from its own folder
work this way, also on a fresh clone without a store.
"""

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from mechicl._io import atomic_write_text
from mechicl.analyses import Analysis, Job, Outputs, get_analysis, job_stem
from mechicl.experiments.grid import ModelEntry
from mechicl.experiments.runner import LocalExecutor, run_jobs
from mechicl.experiments.store import ResultStore, as_store, read_index, write_index
from mechicl.inputs.tasks import TASK_FILE_SUFFIXES, register_task, task_from_file
from mechicl.plotting import save_figure
from mechicl.results import ResultError

__all__ = ["markdown_table", "run_analysis", "write_outputs"]

log = logging.getLogger(__name__)

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
    """Write an invocation's results into ``out`` (see the module docstring): each job's
    result, its figures and a summary table, each file atomically.

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
    atomic_write_text(out / f"{spec.cli_name}-summary.csv", table.to_csv(index=False))
    atomic_write_text(out / f"{spec.cli_name}-summary.md",
                      markdown_table(table.astype(object).fillna("")))
    return table


def run_analysis(
    name: str, *, model: str = "smollm2-135m", load: Mapping[str, Any] | None = None,
    tasks: Sequence[str] = (), shots: Sequence[int] = (), seed: int = 0,
    options: Mapping[str, Any] | None = None, out: str | os.PathLike[str] | None = None,
    store: ResultStore | str | os.PathLike[str] | None = None, force: bool = False,
    memory_budget: str | int | None = None, formats: Sequence[str] = ("png", "html"),
    template: str = "{input}", progress: bool = True,
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
        out: the output folder (None: write nothing, return the summary).
        store: the result store (default :func:`~mechicl.experiments.store.default_store`).
        force: compute the jobs again, replacing their stored results.
        memory_budget: size batches to fit this much memory (e.g. ``"8GB"``).
        formats: figure formats.
        progress: show progress bars.

    Returns:
        The summary table (one row per result).
    """
    spec = get_analysis(name)
    given = dict(options or {})
    roles = {o.name: o.role for o in spec.options}
    run_options = {k: v for k, v in given.items() if roles.get(k) != "output"}
    for task in tasks:  # task files become tasks named by their path
        if str(task).endswith(TASK_FILE_SUFFIXES):
            register_task(str(task), lambda task=task: task_from_file(task, template=template),
                          overwrite=True)
    cells = ([(t, s) for t in tasks for s in (shots or spec.shots)] if spec.per_task
             else [(None, None)])
    if spec.per_task and not tasks:
        raise ValueError(f"{spec.cli_name} runs per task: give tasks")
    jobs = [spec.job(model, variant, seed=seed, task=task, shots=k)
            for variant in spec.variants(run_options) for task, k in cells]
    store = as_store(store)
    entry = ModelEntry(name=model, spec=model, load=dict(load or {}), memory_budget=memory_budget)
    summary = run_jobs(jobs, store, entries={model: entry},
                       executor=LocalExecutor(progress=progress), progress=progress,
                       seed_from=[] if out is None else [out], force=force)
    summary.raise_first()
    done = []
    for job, row in zip(jobs, summary.asked_rows(), strict=True):
        stored = store.get(row["key"])
        done.append((job, stored.load(), row["key"], stored.manifest))
    if out is None:
        pairs = [(job, result) for job, result, _, _ in done]
        outputs = spec.outputs(pairs, given) if spec.outputs else Outputs()
        return pd.DataFrame(outputs.rows)
    return write_outputs(spec, done, out, formats=formats, options=given)
