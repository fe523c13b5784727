"""Convert result folders written by mechicl < 0.2 (``meta.json``, ``curve.json`` or an
unchecksummed ``result.json``) to the one result protocol of :mod:`mechicl.results`
(``result.json`` with format, kind, params, model, checksums), in place and atomically.

    python scripts/migrate_results.py [FOLDER ...]        # default: figures

The numbers are copied bit for bit (tensors and tables are read and written back); what
changes is the metadata layout: ``EvalResult.config`` becomes ``params`` like every other
result, and the ``seconds`` the old report cache added to a result's ``params`` moves out of
the result (it is how long computing took, not what was computed).

Two folders are also given the index (``results/index.json``: each result's job and key) that
lets a result store reuse them, so that ``make scan`` and ``mechicl report`` find them on a
fresh clone:

* ``mechicl scan`` output (``results/<model>-<score>`` for the five scores of one default scan)
  becomes one :class:`~mechicl.analyses.induction.ScanResult`, ``results/<model>-scan``;
* a report folder (``report.json`` + ``results/``) gets the keys of the results that the
  current ``report`` analysis, with that report's settings, would compute identically (its
  accuracy, importance and FFN results, and the combined scan above); results whose options
  changed since (the pruning curves: the default number of random draws and the ranking
  labels) are not indexed and are computed again. ``report.json`` becomes
  ``report.legacy.json`` (``mechicl report`` writes ``result.json``).

Run it again on a converted tree: it changes nothing. ``--rekey`` recomputes the keys of every
``results/index.json`` from the jobs they name, after a change of the key scheme (for results
that are still what their jobs compute).
"""

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

import mechicl
from mechicl._io import atomic_path
from mechicl.analyses.evaluation import EvalResult, task_prompts
from mechicl.analyses.induction import SCAN, SCORES, ScanResult
from mechicl.analyses.patching import PatchResult
from mechicl.analyses.pruning import PruneCurve
from mechicl.experiments.runner import job_keys
from mechicl.experiments.store import read_index, write_index
from mechicl.inputs.tasks import load_task
from mechicl.report.build import ReportConfig, report_jobs
from mechicl.results import HeadScores, LayerScores, load_result, unpad_sequences

log = logging.getLogger("migrate")


def _clean(params: dict[str, Any]) -> tuple[dict[str, Any], float | None]:
    params = dict(params)
    return params, params.pop("seconds", None)


def _legacy(folder: Path) -> Any | None:
    """The result held by a legacy folder (None if it is not one), and how long it took."""
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        t = load_file(str(folder / "tensors.safetensors"))
        kind = meta.get("kind")
        if kind == "HeadScores":
            tokens = unpad_sequences(t["tokens"], t["token_lengths"]) if "tokens" in t else []
            extras = {k.removeprefix("extra."): v for k, v in t.items()
                      if k.startswith("extra.")}
            params, seconds = _clean(meta["params"])
            return HeadScores(name=meta["name"], mean=t["mean"], var=t["var"],
                              per_seed=t["per_seed"], params=params, model=meta["model"],
                              tokens=tokens, extras=extras), seconds
        if kind == "LayerScores":
            params, seconds = _clean(meta["params"])
            return LayerScores(name=meta["name"], mean=t["mean"], var=t["var"],
                               per_seed=t["per_seed"], params=params,
                               model=meta["model"]), seconds
        if kind == "PatchResult":
            p = meta["params"]
            return PatchResult(target=p["target"], axes=tuple(p["axes"]), values=t["values"],
                               per_pair=t.get("per_pair"), clean=t["clean"],
                               corrupted=t["corrupted"], metric=p["metric"],
                               normalized=p["normalized"], direction=p["direction"],
                               method=p["method"], labels=p["labels"], params=p["protocol"],
                               model=meta["model"]), None
        raise ValueError(f"{meta_path}: unknown legacy kind {kind!r}")
    curve_path = folder / "curve.json"
    if curve_path.is_file():
        import pandas as pd

        meta = json.loads(curve_path.read_text(encoding="utf-8"))
        params, seconds = _clean(meta["params"])
        return PruneCurve(data=pd.read_parquet(folder / "curve.parquet"), params=params,
                          model=meta["model"]), seconds
    result_path = folder / "result.json"
    if result_path.is_file():
        meta = json.loads(result_path.read_text(encoding="utf-8"))
        if meta.get("kind") == "EvalResult" and "checksum" not in meta:
            import numpy as np
            import pandas as pd

            preds = pd.read_parquet(folder / "predictions.parquet")
            for column in preds.columns:
                if len(preds) and isinstance(preds[column].iloc[0], np.ndarray):
                    preds[column] = preds[column].map(lambda a: a.tolist())
            params, seconds = _clean(meta["config"])
            return EvalResult(task=meta["task"], shots=meta["shots"], accuracy=meta["accuracy"],
                              ci_low=meta["ci_low"], ci_high=meta["ci_high"], n=meta["n"],
                              chance=meta["chance"], predictions=preds, params=params,
                              model=meta["model"]), seconds
    return None


def convert_tree(root: Path) -> dict[Path, float | None]:
    """Convert every legacy result folder under ``root``; folder -> its recorded seconds."""
    converted: dict[Path, float | None] = {}
    candidates = sorted({p.parent for name in ("meta.json", "curve.json", "result.json")
                         for p in root.rglob(name)})
    for folder in candidates:
        found = _legacy(folder)
        if found is None:
            continue
        result, seconds = found
        with atomic_path(folder) as tmp:  # replaces the folder only once the new one exists
            result.save(tmp)
        converted[folder] = seconds
        log.info("converted %s", folder)
    return converted


def _losses(prefix: HeadScores) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss on the first copy and on later ones, from the per-position losses (as
    :func:`mechicl.induction_scan` computes them)."""
    loss, block = prefix.extras["loss_per_position"], prefix.extras["block_length"]
    pos = torch.arange(loss.shape[1])
    first = (pos[None] >= 1) & (pos[None] < block[:, None])
    later = pos[None] > block[:, None]
    valid = ~loss.isnan()
    return (torch.where(first & valid, loss, 0).sum(1) / (first & valid).sum(1),
            torch.where(later & valid, loss, 0).sum(1) / (later & valid).sum(1))


def scan_job_key(scan: ScanResult, model_name: str) -> tuple[dict[str, Any], str]:
    """The job (default options but for those the scan's params give) and its key."""
    p = scan.params
    options = {"scores": list(scan.scores), "n_seeds": p["n_seeds"],
               "length": None if p["length"] == "2*s+25" else p["length"],
               "indexing": p["indexing"], "stream": p["stream"]}
    job = SCAN.job(model_name, options, seed=p["seed"])
    defaults = {"n_copies": 4, "exclude_top": 0.04, "exclude_bottom": 0.04}
    if any(p[k] != v for k, v in defaults.items()) or options["length"] is not None:
        raise ValueError(f"scan params {p} are not those of a scan job")
    return job.to_dict(), job.key(scan.model, mechicl.__version__)


def combine_scan(results: Path, model_name: str) -> Path | None:
    """``results/<model>-<score>`` of all five scores -> ``results/<model>-scan`` (indexed)."""
    parts = {s: results / f"{model_name}-{s}" for s in SCORES}
    if not all(p.is_dir() for p in parts.values()):
        return None
    scores = {s: load_result(p) for s, p in parts.items()}
    prefix = scores["prefix_matching"]
    first, later = _losses(prefix)
    pp, cp = prefix.params, scores["copying"].params
    params = {"scores": list(SCORES), "n_seeds": pp["n_seeds"], "seed": pp["seed"],
              "n_copies": pp["n_copies"], "exclude_top": pp["exclude_top"],
              "exclude_bottom": pp["exclude_bottom"], "indexing": pp["indexing"],
              "stream": cp["stream"], "length": pp["length"], "tokens": "random"}
    scan = ScanResult(scores=scores, loss_first_copy=first, loss_later_copies=later,
                      params=params, model=prefix.model)
    target = results / f"{model_name}-scan"
    scan.save(target)
    job, key = scan_job_key(scan, model_name)
    entries = read_index(results)
    entries[target.name] = {"key": key, "job": job, "seconds": None,
                            "mechicl": mechicl.__version__}
    write_index(results, entries)
    for path in parts.values():
        shutil.rmtree(path)
    log.info("combined the five scores into %s (key %s)", target, key[:12])
    return target


def _expected_prompt_ids(job: mechicl.Job) -> list[str] | None:
    """The prompt ids the job runs on (tasks' prompts), or None if it has none."""
    if job.task is None:
        return None
    return [p.id for p in task_prompts(load_task(job.task), job)]


def index_report(folder: Path, scan: Path | None, seconds: dict[Path, float | None]) -> int:
    """Index the results of a legacy report folder that the current report computes
    identically (same job, and for task results the same prompts); returns how many."""
    config_data = json.loads((folder / "report.json").read_text(encoding="utf-8"))["config"]
    seed = config_data.pop("seed", 0)
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in config_data.items()
              if k in ReportConfig.__dataclass_fields__}
    fields.pop("draws", None)  # the default changed: the curves are computed again
    config = ReportConfig(**fields, seed=seed)
    results = folder / "results"
    first = next(p for p in sorted(results.glob("*/*")) if (p / "result.json").is_file())
    identity = load_result(first).model
    jobs = report_jobs(config, identity["name"])
    names = list(jobs)
    keys = dict(zip(names, (key for _, key in job_keys([jobs[n] for n in names], identity)),
                    strict=False))  # the asked jobs come first, in order
    entries = read_index(results)
    count = 0
    for name, job in jobs.items():
        if job.analysis == "pruning":  # options changed since: computed again
            continue
        path = results / name
        if name == "scan":
            if scan is None:
                continue
            if path.exists():
                shutil.rmtree(path)
            shutil.copytree(scan, path)
        elif not (path / "result.json").is_file():
            continue
        ids = _expected_prompt_ids(job)
        if ids is not None and load_result(path).params.get("prompt_ids") != ids:
            log.warning("not indexing %s: it was computed on other prompts", path)
            continue
        entries[name] = {"key": keys[name], "job": job.to_dict(),
                         "seconds": seconds.get(path), "mechicl": mechicl.__version__}
        count += 1
    write_index(results, entries)
    for old in ("smollm2-135m-prefix_matching", "smollm2-135m-copying"):
        if (results / old).is_dir():  # the report's scan is results/scan now
            shutil.rmtree(results / old)
    # its settings and provenance live in result.json once the report is built again
    (folder / "report.json").rename(folder / "report.legacy.json")
    return count


def rekey(results: Path) -> int:
    """Recompute the key of every entry of ``results/index.json`` from its job (e.g. after the
    key scheme changed), for results that are still what the job computes. Entries without a
    job are left alone. Returns how many keys changed."""
    entries = read_index(results)
    report = results.parent / "result.json"
    if report.is_file() and json.loads(report.read_text(encoding="utf-8"))["kind"] == "Report":
        # a report's results are the jobs of its settings, by name
        stored = load_result(results.parent)
        for name, job in report_jobs(stored.config, stored.model["name"]).items():
            if name in entries and not entries[name].get("job"):
                entries[name]["job"] = job.to_dict()
    changed = 0
    for name, entry in entries.items():
        if not entry.get("job") or not (results / name / "result.json").is_file():
            continue
        job = mechicl.Job.from_dict(entry["job"])
        identity = load_result(results / name).model
        key = job_keys([job], identity)[0][1]
        if key != entry["key"]:
            entry["key"] = key
            changed += 1
    write_index(results, entries)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", type=Path, default=[Path("figures")])
    parser.add_argument("--model", default="smollm2-135m",
                        help="the model name of `mechicl scan` output (results/<model>-<score>)")
    parser.add_argument("--report", type=Path, action="append", default=[],
                        help="a legacy report folder to index (default: FOLDER/report)")
    parser.add_argument("--rekey", action="store_true",
                        help="only recompute the keys of every results/index.json from its "
                             "jobs (after a change of the key scheme)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.rekey:
        for folder in args.folders:
            for index in sorted(folder.rglob("index.json")):
                log.info("%s: %d keys changed", index, rekey(index.parent))
        return 0
    for folder in args.folders:
        seconds = convert_tree(folder)
        scan = combine_scan(folder / "results", args.model)
        if scan is None and (folder / "results" / f"{args.model}-scan").is_dir():
            scan = folder / "results" / f"{args.model}-scan"
        for report in args.report or [folder / "report"]:
            if (report / "report.json").is_file():  # converted once: renamed afterwards
                n = index_report(report, scan, seconds)
                log.info("indexed %d results of %s", n, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
