"""The ``mechicl`` command line: a thin layer over the library.

``mechicl scan --model smollm2-135m --scores prefix,copying,ov,previous,duplicate --seeds 100
--out DIR`` scores every head, and writes per score a result folder (safetensors + JSON), a
heatmap (PNG + HTML) and a summary table, plus ``summary.json``.

``mechicl eval --model smollm2-135m --task sentiment,boolq --shots 0,1,5 --n 100 --out DIR``
evaluates k-shot accuracy and writes one result folder per task and shot count plus
``eval-summary.csv`` / ``.md``.

``mechicl importance --model smollm2-135m --task country_capital --shots 0,1,5 --method bansal
--out DIR`` computes head importance (and ``--ffn``: FFN knock-out importance) per task and shot
count: result folders, layer x head heatmaps, ``importance-summary.md``.

``mechicl prune --model smollm2-135m --task country_capital --shots 5 --rankings
same,antonyms,prefix,copying --draws 3 --out DIR`` computes the rankings (importance on prompts
disjoint from the evaluated ones, induction scores from a scan) and writes the pruning curves
(parquet + JSON), their figures and ``prune-summary.md``.

``mechicl report --model smollm2-135m --out DIR`` runs (or reuses) everything of the paper
report (:mod:`mechicl.report`) and writes its figures, tables, ``report.md`` and
``report.html``.

``mechicl run GRID.toml`` runs an experiment grid (:mod:`mechicl.grid`, :mod:`mechicl.runner`)
into the content-addressed result store, locally or ``--executor ray``; finished jobs are never
recomputed, so a killed run is resumed by running it again. ``mechicl runs`` lists the store.

``mechicl patch --model smollm2-135m --prompts ioi --target head_out --out DIR`` runs activation
patching (``--attribution``: also attribution patching and its agreement with exact patching)
on generated clean/corrupted pairs and writes result folders, heatmaps and
``patch-summary.json``.
"""

import argparse
import functools
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main", "parse_scores"]

SCORE_ALIASES = {
    "prefix": "prefix_matching", "prefix_matching": "prefix_matching",
    "copying": "copying", "copy": "copying",
    "ov": "ov_eigen", "ov_eigen": "ov_eigen",
    "previous": "previous_token", "previous_token": "previous_token", "prev": "previous_token",
    "duplicate": "duplicate_token", "duplicate_token": "duplicate_token", "dup": "duplicate_token",
}
DEFAULT_SCORES = "prefix,copying,ov,previous,duplicate"


def parse_scores(text: str) -> list[str]:
    """``"prefix,ov"`` -> ``["prefix_matching", "ov_eigen"]``; unknown names raise."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in SCORE_ALIASES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown score names {unknown or [text]}; allowed: {sorted(set(SCORE_ALIASES))}")
    out: list[str] = []
    for n in names:
        if SCORE_ALIASES[n] not in out:
            out.append(SCORE_ALIASES[n])
    return out


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def parse_int_list(text: str) -> list[int]:
    """``"0,1,5"`` -> ``[0, 1, 5]`` (non-negative integers)."""
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: need one or more integers >= 0")
    return values


def parse_tasks(text: str) -> list[str]:
    """``"sentiment,boolq"`` or ``"all"`` -> task names; unknown names raise."""
    from mechicl.tasks import TASKS

    names = sorted(TASKS) if text == "all" else [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in TASKS and not n.endswith((".jsonl", ".csv", ".tsv"))]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown tasks {unknown or [text]}; registered: {sorted(TASKS)} (or a .jsonl/.csv "
            "task file, or 'all')")
    return names


def parse_methods(text: str) -> list[str]:
    """``"bansal,ablation"`` -> ``["bansal", "ablation"]``; unknown names raise."""
    from mechicl.importance import IMPORTANCE_METHODS

    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in IMPORTANCE_METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown importance methods {unknown or [text]}; allowed: {list(IMPORTANCE_METHODS)}")
    return list(dict.fromkeys(names))


def parse_max_memory(text: str) -> dict[str, str]:
    """``"0=20GiB,1=20GiB,cpu=60GiB"`` -> ``{"0": "20GiB", ...}`` (checked by load_model)."""
    out: dict[str, str] = {}
    for item in (t.strip() for t in text.split(",")):
        device, sep, size = item.partition("=")
        if not sep or not device.strip() or not size.strip():
            raise argparse.ArgumentTypeError(
                f"{item!r} in --max-memory is not DEVICE=SIZE; e.g. '0=20GiB,1=20GiB,cpu=60GiB'")
        out[device.strip()] = size.strip()
    return out


def _add_load_options(sub: argparse.ArgumentParser) -> None:
    """How the model is loaded: dtype and placement (passed to :func:`mechicl.load_model`)."""
    group = sub.add_argument_group("model loading (big models: docs/concepts/big-models.md)")
    group.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "bf16", "fp16"),
                       default=None, help="parameter dtype (default float32)")
    group.add_argument("--device", default=None, help="one device for the whole model "
                       "(default cpu; e.g. cuda:0)")
    group.add_argument("--device-map", default=None,
                       help="split the model with accelerate: auto, balanced, balanced_low_0, "
                       "sequential, or one device")
    group.add_argument("--n-devices", type=_positive, default=None,
                       help="split the model over this many CUDA GPUs")
    group.add_argument("--max-memory", type=parse_max_memory, default=None,
                       help="with --device-map / --n-devices: DEVICE=SIZE,... e.g. "
                       "'0=20GiB,1=20GiB,cpu=60GiB'")
    group.add_argument("--revision", default=None, help="hub revision (branch, tag, commit; "
                       "e.g. step1000 for Pythia checkpoints)")


def parse_budget(text: str) -> str:
    """A memory size such as ``8GB`` or ``24GiB`` (checked, returned as given)."""
    from mechicl.memory import parse_bytes

    try:
        parse_bytes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _add_batch_options(sub: argparse.ArgumentParser, default: int | None) -> None:
    """``--batch-tokens`` (fixed) or ``--memory-budget`` (batch size from a budget)."""
    group = sub.add_mutually_exclusive_group()
    group.add_argument("--batch-tokens", type=_positive, default=None,
                       help="rows x longest row per forward pass (default "
                            f"{default if default is not None else 'the analysis default'})")
    group.add_argument("--memory-budget", type=parse_budget, default=None,
                       help="choose --batch-tokens so the estimated peak memory (weights "
                            "included) fits this size, e.g. 8GB or 24GiB (see "
                            "docs/concepts/big-models.md)")
    sub.set_defaults(default_batch_tokens=default)


def _batch_tokens(args: argparse.Namespace, model: Any,
                  needs: Sequence[tuple[str, Callable[[], int]]]) -> int | None:
    """``--batch-tokens``, or the largest that fits ``--memory-budget`` for every
    ``(memory analysis, longest sequence)`` in ``needs``; else the command's default."""
    if args.memory_budget is None:
        return args.default_batch_tokens if args.batch_tokens is None else args.batch_tokens
    from mechicl.memory import batch_tokens_for_budget

    try:
        tokens = min(batch_tokens_for_budget(model, args.memory_budget, seq_len=seq_len(),
                                             analysis=analysis)
                     for analysis, seq_len in needs)
    except ValueError as err:
        raise SystemExit(f"mechicl {args.command}: --memory-budget {args.memory_budget}: "
                         f"{err}") from None
    logging.getLogger(__name__).info("--memory-budget %s: batch_tokens %d",
                                     args.memory_budget, tokens)
    return tokens


def _load(args: argparse.Namespace) -> Any:
    import mechicl

    options = {k: getattr(args, k) for k in ("dtype", "device", "device_map", "n_devices",
                                              "max_memory", "revision")
               if getattr(args, k) is not None}
    try:
        return mechicl.load_model(args.model, **options)
    except ValueError as err:
        raise SystemExit(f"mechicl {args.command}: {err}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mechicl", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    scan = sub.add_parser("scan", help="induction-head scan of every attention head")
    scan.add_argument("--model", default="smollm2-135m",
                      help="built-in name, hub id, local folder or .gguf (default smollm2-135m)")
    _add_load_options(scan)
    scan.add_argument("--scores", type=parse_scores, default=parse_scores(DEFAULT_SCORES),
                      help=f"comma-separated, from {DEFAULT_SCORES} (default: all)")
    scan.add_argument("--seeds", type=_positive, default=100,
                      help="number of random sequences (seed index s has L = 2s + 25 tokens)")
    scan.add_argument("--seed", type=int, default=0, help="RNG seed of the token draws")
    scan.add_argument("--indexing", choices=("exact", "reference"), default="exact",
                      help="prefix-matching targets: exact, or llm-interpret's indexing")
    scan.add_argument("--stream", choices=("embeddings", "residual"), default="embeddings",
                      help="copying-score input stream (default: embeddings, as the reference)")
    _add_batch_options(scan, 4096)
    scan.add_argument("--formats", default="png,html",
                      help="figure formats, comma-separated from png,svg,pdf,html")
    scan.add_argument("--out", type=Path, required=True, help="output folder")
    scan.add_argument("--no-progress", action="store_true", help="hide progress bars")

    ev = sub.add_parser("eval", help="k-shot accuracy of a model on ICL tasks")
    ev.add_argument("--model", default="smollm2-135m")
    _add_load_options(ev)
    ev.add_argument("--task", type=parse_tasks, required=True,
                    help="comma-separated task names, task files (.jsonl/.csv), or 'all'")
    ev.add_argument("--shots", type=parse_int_list, default=[0, 1, 5],
                    help="comma-separated shot counts (default 0,1,5)")
    ev.add_argument("--n", type=_positive, default=None,
                    help="evaluation examples per task (default: the whole evaluation pool)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--length-normalize", action="store_true",
                    help="rank choices by mean log-probability per token")
    ev.add_argument("--template", default="{input}",
                    help="prompt template for task files (built-in tasks have their own)")
    ev.add_argument("--out", type=Path, required=True, help="output folder")
    ev.add_argument("--no-progress", action="store_true")

    imp = sub.add_parser("importance", help="head (and FFN) importance on ICL tasks")
    imp.add_argument("--model", default="smollm2-135m")
    _add_load_options(imp)
    imp.add_argument("--task", type=parse_tasks, required=True, help="comma-separated task names")
    imp.add_argument("--shots", type=parse_int_list, default=[0, 1, 5])
    imp.add_argument("--method", type=parse_methods, default=["bansal"],
                     help="comma-separated from bansal,michel,ablation (default bansal); with "
                          "several, the summary adds their rank correlations")
    imp.add_argument("--ablation", choices=("zero", "mean"), default="zero",
                     help="for --method ablation and --ffn")
    imp.add_argument("--metric", choices=("loss", "accuracy"), default="loss",
                     help="for --method ablation")
    imp.add_argument("--normalize-layers", action="store_true",
                     help="divide each layer by its L2 norm (Michel et al.)")
    imp.add_argument("--token-normalization", choices=("reference", "uniform"),
                     default="reference",
                     help="bansal: last layer / answer tokens as llm-interpret (reference), or "
                          "every layer / (N-1) tokens (uniform)")
    imp.add_argument("--ffn", action="store_true", help="also FFN knock-out importance (accuracy)")
    imp.add_argument("--n", type=_positive, default=100, help="prompts per task and shot count")
    imp.add_argument("--seed", type=int, default=0)
    _add_batch_options(imp, None)
    imp.add_argument("--shared-scale", action="store_true",
                     help="one colour scale for all shot counts of a task and method")
    imp.add_argument("--formats", default="png,html")
    imp.add_argument("--out", type=Path, required=True)
    imp.add_argument("--no-progress", action="store_true")

    pr = sub.add_parser("prune", help="accuracy while pruning heads / FFNs by a ranking")
    pr.add_argument("--model", default="smollm2-135m")
    _add_load_options(pr)
    pr.add_argument("--task", type=parse_tasks, required=True, help="comma-separated task names")
    pr.add_argument("--shots", type=parse_int_list, default=[5])
    pr.add_argument("--rankings", default="same",
                    help="comma-separated head rankings: 'same' (importance on this task), "
                         "another task's name, an induction score (prefix, copying, ov, previous, "
                         "duplicate) or a saved HeadScores folder; random draws via --draws")
    pr.add_argument("--ffn-rankings", default="",
                    help="FFN rankings: 'same' (FFN knock-out importance) and/or other tasks")
    pr.add_argument("--percents", type=parse_int_list, default=list(range(0, 100, 10)),
                    help="head percentages (default 0,10,...,90)")
    pr.add_argument("--ffn-percents", type=parse_int_list, default=[0],
                    help="FFN percentages (default 0; with --percents: a combined grid)")
    pr.add_argument("--draws", type=int, default=3, help="random-ranking draws (default 3)")
    pr.add_argument("--method", choices=("bansal", "michel", "ablation"), default="bansal",
                    help="importance method for task rankings (default bansal)")
    pr.add_argument("--n", type=_positive, default=100, help="evaluated prompts")
    pr.add_argument("--importance-n", type=_positive, default=50,
                    help="prompts for the importance ranking (disjoint from the evaluated ones)")
    pr.add_argument("--scan-seeds", type=_positive, default=20,
                    help="random sequences for induction-score rankings")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--ablation", choices=("zero", "mean"), default="zero")
    _add_batch_options(pr, 4096)
    pr.add_argument("--formats", default="png,html")
    pr.add_argument("--out", type=Path, required=True)
    pr.add_argument("--no-progress", action="store_true")

    pa = sub.add_parser("patch", help="activation (and attribution) patching on prompt pairs")
    pa.add_argument("--model", default="smollm2-135m")
    _add_load_options(pa)
    pa.add_argument("--prompts", default="ioi",
                    help="pair generator: ioi, colored_objects, capitals, repeated_tokens")
    pa.add_argument("--n", type=_positive, default=32, help="prompt pairs")
    pa.add_argument("--seed", type=int, default=0)
    pa.add_argument("--target", type=parse_targets, default=["head_out"],
                    help="comma-separated from " + ",".join(_TARGETS) + "; path patching "
                         "(every sender head -> --receivers): path:q, path:k, path:v, "
                         "path:logits")
    pa.add_argument("--receivers", type=parse_heads, default=None,
                    help="receiver heads for path:* targets, e.g. 23.3,24.4")
    pa.add_argument("--path-direction", choices=("denoising", "noising"), default="noising",
                    help="direction of path:* targets (default noising, as Wang et al.)")
    pa.add_argument("--by-pos", action="store_true",
                    help="one cell per position too (uses the largest group of pairs of one "
                         "length)")
    pa.add_argument("--direction", choices=("denoising", "noising"), default="denoising")
    pa.add_argument("--kv-heads", choices=("group", "query"), default="group",
                    help="k/v of grouped-query models: per KV head or per query head")
    pa.add_argument("--metric", choices=("logit_diff", "logit_diff_normalized", "logprob",
                                         "prob", "loss"), default="logit_diff_normalized")
    pa.add_argument("--attribution", action="store_true",
                    help="also attribution patching, with its agreement with exact patching")
    _add_batch_options(pa, 8192)
    pa.add_argument("--formats", default="png,html")
    pa.add_argument("--out", type=Path, required=True)
    pa.add_argument("--no-progress", action="store_true")
    rep = sub.add_parser("report", help="the paper report: scans, importance, pruning, FFNs, "
                                        "overlap; figures + report.md / report.html")
    rep.add_argument("--model", default="smollm2-135m")
    _add_load_options(rep)
    rep.add_argument("--tasks", type=parse_tasks, default=None,
                     help="comma-separated task names (default: every built-in task)")
    rep.add_argument("--shots", type=parse_int_list, default=[0, 1, 5])
    rep.add_argument("--n", type=_positive, default=50, help="importance prompts per task/shots")
    rep.add_argument("--eval-n", type=_positive, default=50,
                     help="further prompts per task/shots for accuracy and pruning curves")
    rep.add_argument("--method", type=parse_methods, default=["bansal"],
                     help="importance method (one of bansal, michel, ablation)")
    rep.add_argument("--scores", type=parse_scores, default=parse_scores("prefix,copying"),
                     help="induction scores (default prefix,copying; the first ranks the "
                          "'induction heads first' pruning curve)")
    rep.add_argument("--scan-seeds", type=_positive, default=100)
    rep.add_argument("--scan-length", type=_positive, default=None,
                     help="one length L for every scan sequence (default: 2s + 25)")
    rep.add_argument("--prune-tasks", type=parse_tasks, default=["country_capital", "antonyms"],
                     help="tasks with pruning curves and FFN knock-out")
    rep.add_argument("--prune-shots", type=parse_int_list, default=[1])
    rep.add_argument("--percents", type=parse_int_list, default=list(range(0, 100, 10)))
    rep.add_argument("--ffn-percents", type=parse_int_list, default=list(range(0, 60, 10)))
    rep.add_argument("--draws", type=int, default=2, help="random pruning orders per curve")
    rep.add_argument("--no-ffn", action="store_true", help="skip FFN knock-out and FFN pruning")
    rep.add_argument("--top-k-percent", type=float, default=10.0,
                     help="top heads for the overlap statistics, in %% of all heads")
    rep.add_argument("--seed", type=int, default=0)
    _add_batch_options(rep, 4096)
    rep.add_argument("--formats", default="png", help="figure formats (png always written)")
    rep.add_argument("--reuse", type=Path, action="append", default=[],
                     help="another output folder whose results/ may be reused (repeatable)")
    rep.add_argument("--force", action="store_true", help="recompute every result")
    rep.add_argument("--out", type=Path, required=True)
    rep.add_argument("--no-progress", action="store_true")
    run = sub.add_parser("run", help="run an experiment grid (TOML or YAML) into the result store; "
                                     "finished jobs are never recomputed")
    run.add_argument("grid", type=Path, help="the grid file (see docs: experiment grids)")
    run.add_argument("--store", type=Path, default=None,
                     help="result store folder (default $MECHICL_CACHE/runs)")
    run.add_argument("--executor", choices=["local", "ray"], default="local")
    run.add_argument("--ray-address", default=None,
                     help="Ray cluster address (e.g. auto, ray://head:10001); default: local Ray")
    run.add_argument("--ray-num-cpus", type=float, default=1.0,
                     help="CPUs reserved per model worker on Ray")
    run.add_argument("--ray-num-gpus", type=float, default=0.0,
                     help="GPUs reserved per model worker on Ray")
    run.add_argument("--threads", type=_positive, default=None,
                     help="torch threads per worker (default: torch's own / Ray's CPUs)")
    run.add_argument("--dry-run", action="store_true",
                     help="list the grid's jobs and exit without loading anything")
    run.add_argument("--out", type=Path, default=None,
                     help="also write jobs.csv (job -> key, status) and, for checkpoint "
                          "sweeps, score-vs-step figures here")
    run.add_argument("--formats", default="png,html")
    run.add_argument("--no-progress", action="store_true")
    runs = sub.add_parser("runs", help="list the result store's finished jobs and provenance")
    runs.add_argument("--store", type=Path, default=None,
                      help="result store folder (default $MECHICL_CACHE/runs)")
    runs.add_argument("--analysis", default=None, help="only this analysis")
    runs.add_argument("--model", default=None, help="only this model (grid name)")
    runs.add_argument("--key", default=None, help="show one result's full provenance (key "
                                                  "or a unique prefix) as JSON")
    runs.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    return parser


_TARGETS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "head_out", "q", "k",
            "v", "pattern")


_PATH_TARGETS = ("path:q", "path:k", "path:v", "path:logits")


def parse_heads(text: str) -> list[tuple[int, int]]:
    """``"23.3,24.4"`` -> ``[(23, 3), (24, 4)]``."""
    heads = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        try:
            layer, head = (int(x) for x in item.split("."))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{item!r} is not a head: write layer.head, e.g. 23.3") from None
        heads.append((layer, head))
    if not heads:
        raise argparse.ArgumentTypeError(f"{text!r}: no heads")
    return heads


def parse_targets(text: str) -> list[str]:
    """``"head_out,v"`` -> ``["head_out", "v"]``; unknown names raise."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in _TARGETS + _PATH_TARGETS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown patching targets {unknown or [text]}; allowed: "
            f"{list(_TARGETS + _PATH_TARGETS)}")
    return list(dict.fromkeys(names))


def run_scan(args: argparse.Namespace) -> dict:
    from mechicl.induction import induction_scan
    from mechicl.memory import longest_scan_sequence
    from mechicl.plotting import head_heatmap, save_figure

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    start = time.perf_counter()
    model = _load(args)
    loaded = time.perf_counter()
    batch_tokens = _batch_tokens(args, model,
                                 [("scan", lambda: longest_scan_sequence(args.seeds))])
    result = induction_scan(model, scores=args.scores, n_seeds=args.seeds, seed=args.seed,
                            indexing=args.indexing, stream=args.stream,
                            batch_tokens=batch_tokens, progress=not args.no_progress)
    scanned = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    slug = Path(model.name).name.replace("/", "_")
    summary: dict = {"model": model.info(), "batch_tokens": batch_tokens, "scores": {}, "seconds": {
        "load": round(loaded - start, 2), "scan": round(scanned - loaded, 2)}}
    for name, scores in result.scores.items():
        scores.save(out / "results" / f"{slug}-{name}")
        fig = head_heatmap(scores, title=f"{slug}: {name.replace('_', ' ')}",
                           kv_group_size=model.group_size)
        save_figure(fig, out / f"{slug}-{name}", formats)
        summary["scores"][name] = {
            "top_heads": scores.top_heads(min(10, scores.mean.numel())),
            "max": float(scores.mean.max()), "mean": float(scores.mean.mean()),
            "params": scores.params,
        }
    if result.loss_first_copy is not None:
        summary["loss"] = {"first_copy": float(result.loss_first_copy.mean()),
                           "later_copies": float(result.loss_later_copies.mean())}
    from mechicl._io import atomic_write_text

    atomic_write_text(out / f"{slug}-summary.json", json.dumps(summary, indent=2))
    return summary


def markdown_table(table: "Any") -> str:
    """A DataFrame as a GitHub markdown table (floats with 3 decimals)."""
    from mechicl.report import markdown_table as render

    return render(table)


def run_eval(args: argparse.Namespace) -> list[dict]:
    import pandas as pd

    import mechicl
    from mechicl._io import atomic_write_text
    from mechicl.tasks import load_task, task_from_file

    model = _load(args)
    rows = []
    out: Path = args.out
    for name in args.task:
        task = (task_from_file(name, template=args.template)
                if name.endswith((".jsonl", ".csv", ".tsv")) else load_task(name))
        for shots in args.shots:
            result = mechicl.evaluate(model, task, shots=shots, n=args.n, seed=args.seed,
                                      length_normalize=args.length_normalize,
                                      progress=not args.no_progress)
            result.save(out / "results" / f"{task.name}-{shots}shot")
            rows.append(result.summary())
    table = pd.DataFrame(rows)
    atomic_write_text(out / "eval-summary.csv", table.to_csv(index=False))
    atomic_write_text(out / "eval-summary.md", markdown_table(table))
    return rows


def _formats(text: str) -> list[str]:
    return [f.strip() for f in text.split(",") if f.strip()]


def _load_task(name: str, template: str = "{input}") -> Any:
    from mechicl.tasks import load_task, task_from_file

    if name.endswith((".jsonl", ".csv", ".tsv")):
        return task_from_file(name, template=template)
    return load_task(name)


def _slug(task_name: str) -> str:
    return Path(task_name).stem if task_name.endswith((".jsonl", ".csv", ".tsv")) else task_name


def run_importance(args: argparse.Namespace) -> list[dict]:
    """Importance per task x shots x method; heatmaps share one colour scale per task and
    method; with several methods, rank correlations against the first one."""
    import pandas as pd

    import mechicl
    from mechicl._io import atomic_write_text
    from mechicl.memory import longest_prompt
    from mechicl.overlap import kendall, spearman, top_k_overlap
    from mechicl.plotting import head_heatmap, layer_bars, save_figure
    from mechicl.tasks import build_prompts

    model = _load(args)
    out: Path = args.out
    formats = _formats(args.formats)
    tasks = [_load_task(name) for name in args.task]
    batch_tokens = _batch_tokens(args, model, [("importance", lambda: longest_prompt(model, [
        p for t in tasks for k in args.shots
        for p in build_prompts(t, shots=k, n=args.n, seed=args.seed)]))])
    rows = []
    for task in tasks:
        results: dict[tuple[str, int], Any] = {}
        for shots in args.shots:
            for method in args.method:
                start = time.perf_counter()
                scores = mechicl.head_importance(
                    model, task, shots=shots, method=method, n=args.n, seed=args.seed,
                    normalize_layers=args.normalize_layers,
                    ablation=args.ablation if method == "ablation" else "zero",
                    metric=args.metric if method == "ablation" else "loss",
                    token_normalization=args.token_normalization,
                    batch_tokens=batch_tokens, progress=not args.no_progress)
                seconds = time.perf_counter() - start
                scores.save(out / "results" / f"{task.name}-{shots}shot-{method}")
                results[method, shots] = scores
                row = {"task": task.name, "shots": shots, "method": method,
                       "n": scores.params["n"], "seconds": round(seconds, 1),
                       "top_heads": " ".join(f"{a}.{b}" for a, b in scores.top_heads(5))}
                first = results[args.method[0], shots]
                if method != args.method[0]:
                    row |= {"vs": args.method[0], "spearman": spearman(scores, first),
                            "kendall": kendall(scores, first),
                            "top10_overlap": top_k_overlap(scores, first,
                                                           min(10, scores.mean.numel()))}
                rows.append(row)
            if args.ffn:
                ffn = mechicl.ffn_importance(model, task, shots=shots, n=args.n, seed=args.seed,
                                             ablation=args.ablation,
                                             progress=not args.no_progress)
                ffn.save(out / "results" / f"{task.name}-{shots}shot-ffn")
                save_figure(layer_bars(ffn, title=f"{task.name} {shots}-shot: FFN knock-out",
                                       yaxis_title="accuracy drop"),
                            out / f"{task.name}-{shots}shot-ffn", formats)
                order = mechicl.pruning.prune_order(ffn.mean).tolist()
                rows.append({"task": task.name, "shots": shots, "method": "ffn knock-out",
                             "n": ffn.params["n"],
                             "top_heads": "layers " + " ".join(map(str, order[::-1][:5]))})
        for method in args.method:
            maps = [s for (m, _), s in results.items() if m == method]
            # Token-normalised scores shrink with prompt length, so one scale across shot counts
            # would leave the many-shot maps dark: each map gets its own unless asked.
            shared = (min(0.0, min(float(s.mean.min()) for s in maps)),
                      max(float(s.mean.max()) for s in maps))
            for shots in args.shots:
                scores = results[method, shots]
                zmin, zmax = shared if args.shared_scale else (min(0.0, float(scores.mean.min())),
                                                                float(scores.mean.max()))
                fig = head_heatmap(scores, title=f"{task.name} {shots}-shot: {method} importance",
                                   zmin=zmin, zmax=zmax, kv_group_size=model.group_size,
                                   colorbar_title="importance")
                save_figure(fig, out / f"{task.name}-{shots}shot-{method}", formats)
    table = pd.DataFrame(rows)
    atomic_write_text(out / "importance-summary.csv", table.to_csv(index=False))
    atomic_write_text(out / "importance-summary.md", markdown_table(table.astype(object).fillna("")))
    return rows


def run_prune(args: argparse.Namespace) -> list[dict]:
    """Pruning curves per task x shots for the requested rankings."""
    import pandas as pd

    import mechicl
    from mechicl._io import atomic_write_text
    from mechicl.memory import longest_prompt
    from mechicl.plotting import prune_curve_figure, save_figure
    from mechicl.pruning import split_prompts
    from mechicl.report import curve_summaries
    from mechicl.results import HeadScores

    model = _load(args)
    out: Path = args.out
    formats = _formats(args.formats)
    head_specs = [r.strip() for r in args.rankings.split(",") if r.strip()]
    ffn_specs = [r.strip() for r in args.ffn_rankings.split(",") if r.strip()]
    scan_cache: dict[str, Any] = {}
    imp_cache: dict[tuple[str, int, str], Any] = {}

    @functools.cache  # built once per task and shot count: the budget, rankings and curves
    def prompts_of(task_name: str, shots: int) -> tuple[list, list]:
        try:
            return split_prompts(_load_task(task_name), shots=shots, n_rank=args.importance_n,
                                 n_eval=args.n, seed=args.seed)
        except ValueError as err:
            raise SystemExit(f"--importance-n {args.importance_n}: {err}") from None

    def importance(task_name: str, shots: int, kind: str) -> Any:
        key = (task_name, shots, kind)
        if key not in imp_cache:
            imp_prompts, _ = prompts_of(task_name, shots)
            # Rankings run at their analyses' default batch sizes unless a budget is given.
            batch = {} if args.memory_budget is None else {"batch_tokens": _batch_tokens(
                args, model, [("choices" if kind == "ffn" else "importance",
                               lambda: longest_prompt(model, imp_prompts))])}
            if kind == "ffn":
                imp_cache[key] = mechicl.ffn_importance(model, task_name, shots=shots,
                                                        prompts=imp_prompts,
                                                        ablation=args.ablation,
                                                        progress=not args.no_progress, **batch)
            else:
                imp_cache[key] = mechicl.head_importance(model, task_name, shots=shots,
                                                         prompts=imp_prompts, method=args.method,
                                                         progress=not args.no_progress, **batch)
            stem = f"{_slug(task_name)}-{shots}shot-{'ffn' if kind == 'ffn' else args.method}"
            imp_cache[key].save(out / "rankings" / stem)
        return imp_cache[key]

    def resolve(spec: str, task_name: str, shots: int, kind: str) -> tuple[str, Any]:
        from mechicl.tasks import TASKS

        if spec == "same":
            return f"same task ({task_name})", importance(task_name, shots, kind)
        if spec in TASKS:
            return f"other task ({spec})", importance(spec, shots, kind)
        if kind == "heads" and spec in SCORE_ALIASES:
            score = SCORE_ALIASES[spec]
            if score not in scan_cache:
                scan = mechicl.induction_scan(model, scores=(score,), n_seeds=args.scan_seeds,
                                              seed=args.seed, progress=not args.no_progress)
                scan_cache[score] = scan.scores[score]
                scan_cache[score].save(out / "rankings" / f"scan-{score}")
            return score.replace("_", " "), scan_cache[score]
        path = Path(spec)
        if kind == "heads" and (path / "meta.json").exists():
            return path.name, HeadScores.load(path)
        raise SystemExit(f"unknown {kind} ranking {spec!r}: use 'same', a task name "
                         f"{sorted(TASKS)}, an induction score {sorted(set(SCORE_ALIASES))} or "
                         "a saved HeadScores folder")

    batch_tokens = _batch_tokens(args, model, [("choices", lambda: longest_prompt(model, [
        p for t in args.task for k in args.shots for p in prompts_of(t, k)[1]]))])
    rows = []
    for task_name in args.task:
        for shots in args.shots:
            _, eval_prompts = prompts_of(task_name, shots)
            heads = dict(resolve(s, task_name, shots, "heads") for s in head_specs)
            ffns = dict(resolve(s, task_name, shots, "ffn") for s in ffn_specs)
            start = time.perf_counter()
            curve = mechicl.prune_curve(
                model, task_name, shots=shots, prompts=eval_prompts, head_rankings=heads or None,
                ffn_rankings=ffns or None, head_percents=args.percents,
                ffn_percents=args.ffn_percents, random_draws=args.draws, seed=args.seed,
                ablation=args.ablation, batch_tokens=batch_tokens,
                progress=not args.no_progress)
            seconds = time.perf_counter() - start
            stem = f"{_slug(task_name)}-{shots}shot"
            curve.save(out / "results" / f"{stem}-prune")
            if any(p > 0 for p in args.percents):
                save_figure(prune_curve_figure(curve, x="head_percent"),
                            out / f"{stem}-prune-heads", formats)
            if any(p > 0 for p in args.ffn_percents):
                save_figure(prune_curve_figure(curve, x="ffn_percent"),
                            out / f"{stem}-prune-ffn", formats)
            summary = curve_summaries({(task_name, shots): curve})
            summary["seconds"] = round(seconds, 1)
            rows.extend(summary.to_dict("records"))
    table = pd.DataFrame(rows)
    atomic_write_text(out / "prune-summary.csv", table.to_csv(index=False))
    atomic_write_text(out / "prune-summary.md", markdown_table(table))
    return rows


def run_patch(args: argparse.Namespace) -> dict:
    import mechicl
    from mechicl._io import atomic_write_text
    from mechicl.pairs import PAIR_GENERATORS
    from mechicl.plotting import patch_heatmap, save_figure

    if args.prompts not in PAIR_GENERATORS:
        raise SystemExit(f"unknown --prompts {args.prompts!r}; known: {sorted(PAIR_GENERATORS)}")
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    model = _load(args)
    pairs = mechicl.make_pairs(args.prompts, model, n=args.n, seed=args.seed)
    if args.by_pos and not pairs.same_length:
        groups = pairs.by_length()
        length = max(groups, key=lambda k: (len(groups[k]), k))
        logging.getLogger(__name__).info("--by-pos: using the %d pairs of length %d (of %d)",
                                         len(groups[length]), length, len(pairs))
        pairs = groups[length]
    batch_tokens = _batch_tokens(args, model, [("forward", lambda: int(pairs.clean.shape[1]))])
    out: Path = args.out
    slug = Path(model.name).name.replace("/", "_")
    summary: dict = {"model": model.info(), "prompts": args.prompts, "n_pairs": len(pairs),
                     "pairs": pairs.to_dict(), "results": {}}
    for target in args.target:
        path = target.startswith("path:")
        if path and target != "path:logits" and not args.receivers:
            raise SystemExit(f"--target {target} needs --receivers (e.g. 23.3,24.4)")
        stem = f"{slug}-{args.prompts}-{target.replace(':', '-')}"
        if path and target != "path:logits":
            stem += "-to-" + "_".join(f"{a}.{b}" for a, b in args.receivers)
        stem += "-by-pos" if args.by_pos and not path else ""
        start = time.perf_counter()
        if path:
            result = mechicl.path_patch(
                model, pairs, metric=args.metric,
                receivers="logits" if target == "path:logits" else args.receivers,
                receiver_input=target.removeprefix("path:") if target != "path:logits" else "q",
                direction=args.path_direction, batch_tokens=batch_tokens,
                progress=not args.no_progress)
        else:
            result = mechicl.patch(model, pairs, metric=args.metric, target=target,
                                   by_pos=args.by_pos, direction=args.direction,
                                   kv_heads=args.kv_heads, batch_tokens=batch_tokens,
                                   progress=not args.no_progress)
        seconds = time.perf_counter() - start
        result.save(out / "results" / stem)
        sums = ["pos", "head"] if len(result.axes) == 3 else [None]
        for over in sums:
            suffix = f"-sum-over-{over}" if over else ""
            save_figure(patch_heatmap(result, sum_over=over), out / f"{stem}{suffix}", formats)
        entry: dict[str, Any] = {
            "axes": list(result.axes), "seconds": round(seconds, 2),
            "clean": float(result.clean.float().mean()),
            "corrupted": float(result.corrupted.float().mean()),
            "top": [{"cell": list(c), "value": v} for c, v in result.top(10)]}
        if args.attribution and not path:
            start = time.perf_counter()
            approx = mechicl.attribution_patch(model, pairs, metric=args.metric, target=target,
                                               by_pos=args.by_pos, direction=args.direction,
                                               kv_heads=args.kv_heads)
            entry["attribution_seconds"] = round(time.perf_counter() - start, 2)
            approx.save(out / "results" / f"{stem}-attribution")
            save_figure(patch_heatmap(approx, sum_over=sums[0]), out / f"{stem}-attribution",
                        formats)
            entry["agreement"] = mechicl.agreement(result, approx).to_dict()
        summary["results"][target] = entry
    atomic_write_text(out / "patch-summary.json", json.dumps(summary, indent=2))
    return summary


def run_report(args: argparse.Namespace) -> Any:
    from mechicl.report import ReportConfig, build_report, fit_memory_budget
    from mechicl.tasks import TASKS

    if len(args.method) != 1:
        raise SystemExit(f"--method takes one method, got {args.method}")
    try:
        config = ReportConfig(
            tasks=tuple(args.tasks or TASKS), shots=tuple(args.shots), n=args.n,
            eval_n=args.eval_n, method=args.method[0], scores=tuple(args.scores),
            scan_seeds=args.scan_seeds, scan_length=args.scan_length, prune_tasks=tuple(args.prune_tasks),
            prune_shots=tuple(args.prune_shots), percents=tuple(args.percents),
            ffn_percents=tuple(args.ffn_percents),
            draws=args.draws, ffn=not args.no_ffn, top_k_percent=args.top_k_percent,
            seed=args.seed, batch_tokens=args.batch_tokens or args.default_batch_tokens,
            formats=tuple(_formats(args.formats)))
    except ValueError as err:
        raise SystemExit(f"mechicl report: {err}") from None
    model = _load(args)
    if args.memory_budget is not None:
        try:
            config = fit_memory_budget(model, config, args.memory_budget)
        except ValueError as err:
            raise SystemExit(f"mechicl report: --memory-budget {args.memory_budget}: "
                             f"{err}") from None
        logging.getLogger(__name__).info(
            "--memory-budget %s: batch_tokens %d, importance batch_tokens %d",
            args.memory_budget, config.batch_tokens, config.importance_batch_tokens)
    return build_report(model, args.out, config, reuse=args.reuse, force=args.force,
                        progress=not args.no_progress)


def run_run(args: argparse.Namespace) -> Any:
    from mechicl.grid import GridError, load_grid
    from mechicl.runner import run_grid, write_run_outputs
    from mechicl.store import ResultStore, default_store

    try:
        grid = load_grid(args.grid)
    except GridError as err:
        raise SystemExit(f"mechicl run: {err}") from None
    if args.dry_run:
        return grid
    options: dict[str, Any] = {"threads": args.threads}
    if args.executor == "ray":
        options |= {"address": args.ray_address, "num_cpus": args.ray_num_cpus,
                    "num_gpus": args.ray_num_gpus}
    store = ResultStore(args.store or default_store())
    summary = run_grid(grid, store, executor=args.executor, executor_options=options,
                       progress=not args.no_progress)
    if args.out is not None:
        write_run_outputs(grid, store, summary, args.out, formats=_formats(args.formats))
    return summary


def run_runs(args: argparse.Namespace) -> Any:
    from mechicl.store import ResultStore, default_store

    store = ResultStore(args.store or default_store())
    if args.key is not None:
        matches = [k for k in store.keys() if k.startswith(args.key)]
        if len(matches) != 1:
            raise SystemExit(f"--key {args.key!r} matches {len(matches)} results in "
                             f"{store.root}; give a longer prefix")
        return store.get(matches[0]).manifest
    table = store.table()
    if args.analysis is not None:
        table = table[table.analysis == args.analysis]
    if args.model is not None:
        table = table[table.model == args.model]
    return table


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "scan":
        summary = run_scan(args)
        for name, s in summary["scores"].items():
            print(f"{name:16s} top heads (layer, head): {s['top_heads'][:5]}")
        if "loss" in summary:
            print(f"loss first copy {summary['loss']['first_copy']:.3f}, "
                  f"later copies {summary['loss']['later_copies']:.3f}")
        print(f"wrote {args.out}/ (load {summary['seconds']['load']} s, "
              f"scan {summary['seconds']['scan']} s)")
    elif args.command == "eval":
        for row in run_eval(args):
            print(f"{row['task']:24s} {row['shots']}-shot  accuracy {row['accuracy']:.3f} "
                  f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}]  chance {row['chance']:.3f}  "
                  f"n={row['n']}")
        print(f"wrote {args.out}/")
    elif args.command == "importance":
        for row in run_importance(args):
            extra = (f"  spearman vs {row['vs']} {row['spearman']:.3f}" if "vs" in row else "")
            print(f"{row['task']:24s} {row['shots']}-shot {row['method']:14s} top "
                  f"{row['top_heads']}{extra}")
        print(f"wrote {args.out}/")
    elif args.command == "prune":
        for row in run_prune(args):
            print(f"{row['task']:24s} {row['shots']}-shot  {row['head_ranking']:28s} "
                  f"{row['ffn_ranking']:20s} baseline {row['baseline']:.3f}  keeps accuracy "
                  f"(-{row['tolerance']}) up to {row['max_head_percent']:.0f}% heads, "
                  f"{row['max_ffn_percent']:.0f}% FFNs")
        print(f"wrote {args.out}/")
    elif args.command == "patch":
        summary = run_patch(args)
        for target, entry in summary["results"].items():
            agree = entry.get("agreement")
            extra = (f"  attribution pearson {agree['pearson']:.3f} top-{agree['k']} "
                     f"{agree['top_k']:.2f}" if agree else "")
            print(f"{target:10s} clean {entry['clean']:.3f} corrupted {entry['corrupted']:.3f} "
                  f"top cells {[tuple(t['cell']) for t in entry['top'][:5]]} "
                  f"({entry['seconds']} s){extra}")
        print(f"wrote {args.out}/")
    elif args.command == "report":
        report = run_report(args)
        overlap = report.tables["overlap"]
        for score, g in overlap.groupby("induction score"):
            print(f"{score:16s} spearman with importance: median {g.spearman.median():.3f} "
                  f"(range {g.spearman.min():.3f} .. {g.spearman.max():.3f}) over "
                  f"{len(g)} task x shot maps")
        print(f"computed {sum(report.computed.values())} results, reused "
              f"{sum(report.reused.values())}; {report.seconds['total'] / 60:.1f} min")
        print(f"wrote {args.out}/report.md and report.html")
    elif args.command == "run":
        result = run_run(args)
        if args.dry_run:
            jobs = result.jobs()
            for job in jobs:
                print(job.describe())
            print(f"{len(jobs)} jobs over {len(result.models)} models")
            return 0
        counts = result.counts
        print(f"{len(result.jobs)} jobs: {counts['computed']} computed, {counts['cached']} "
              f"already in the store, {counts['failed']} failed ({result.seconds:.1f} s, "
              f"{result.executor} executor); store {result.store}")
        for job, error in result.errors.items():
            print(f"FAILED {job}: {error}")
        if args.out is not None:
            print(f"wrote {args.out}/")
        return 0 if result.ok else 1
    elif args.command == "runs":
        result = run_runs(args)
        if isinstance(result, dict):
            print(json.dumps(result, indent=2, sort_keys=True))
        elif args.csv:
            print(result.to_csv(index=False), end="")
        elif result.empty:
            print("no results")
        else:
            print(result.drop(columns=["options"]).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
