"""The ``mechicl`` command line: a thin layer over the library that parses and dispatches.

Every registered analysis (:data:`mechicl.analyses.ANALYSES`) is a subcommand whose flags are
generated from its options (``--name-with-dashes``; defaults, allowed values and help text are
the registry's), plus the model, the tasks and shot counts it runs over, the seed, batch sizes
(``--batch-tokens`` or ``--memory-budget``), the result store and the output folder::

    mechicl scan --model smollm2-135m --scores prefix,copying,ov --seeds 100 --out DIR
    mechicl eval --model smollm2-135m --tasks sentiment,boolq --shots 0,1,5 --n 100 --out DIR
    mechicl importance --tasks country_capital --method bansal,ablation --out DIR
    mechicl prune --tasks country_capital --shots 5 --rankings same,antonyms,prefix --out DIR
    mechicl patch --prompts ioi --target head_out,v --out DIR

Results go through the content-addressed result store (``--store``, default
``$MECHICL_CACHE/runs``): a result already computed for the same weights, options and task
data is reused (``--force`` computes it again). ``OUT/results/`` gets each result,
``OUT/<stem>.png|html`` its figures and ``OUT/<command>-summary.csv|md`` a summary, which is
printed.

``mechicl report`` writes the paper report (:mod:`mechicl.report`); ``mechicl run GRID`` runs an
experiment grid (:mod:`mechicl.experiments.grid`) locally or ``--executor ray``; ``mechicl runs``
lists the store.
"""

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mechicl._version import __version__
from mechicl.analyses import ANALYSES, Analysis, Option, OptionError
from mechicl.experiments.grid import GridError, load_grid
from mechicl.experiments.outputs import markdown_table, run_analysis
from mechicl.experiments.runner import run_grid, write_run_outputs
from mechicl.experiments.store import ResultStore, default_store
from mechicl.inputs.tasks import TASK_FILE_SUFFIXES, TASKS, TaskFileError
from mechicl.model.loading import ModelNotAvailableError, load_model, parse_bytes
from mechicl.plotting import FORMATS
from mechicl.report.build import REPORT, ReportConfig, build_report
from mechicl.results import ResultError

__all__ = ["COMMANDS", "build_parser", "main", "parse_int_list", "parse_tasks"]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Argument types
# --------------------------------------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def parse_int_list(text: str) -> list[int]:
    """``"0,1,5"`` -> ``[0, 1, 5]`` (non-negative integers).

    >>> parse_int_list("0,1,5")
    [0, 1, 5]
    """
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: need one or more integers >= 0")
    return values


def parse_tasks(text: str, *, files: bool = True) -> list[str]:
    """``"sentiment,boolq"`` or ``"all"`` -> task names; task files (``.jsonl``, ``.csv``,
    ``.tsv``) pass if ``files``; unknown names raise.

    >>> parse_tasks("boolq,my_task.jsonl")
    ['boolq', 'my_task.jsonl']
    """
    names = list(TASKS) if text == "all" else [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names
               if n not in TASKS and not (files and n.endswith(TASK_FILE_SUFFIXES))]
    if unknown or not names:
        also = " (or a .jsonl/.csv task file, or 'all')" if files else " (or 'all')"
        raise argparse.ArgumentTypeError(
            f"unknown tasks {unknown or [text]}; registered: {sorted(TASKS)}{also}")
    return names


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


def parse_budget(text: str) -> str:
    """A memory size such as ``8GB`` or ``24GiB`` (checked, returned as given)."""
    try:
        parse_bytes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def parse_formats(text: str) -> list[str]:
    names = [f.strip() for f in text.split(",") if f.strip()]
    bad = [f for f in names if f not in FORMATS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown figure formats {bad or [text]}; allowed: "
                                         f"{list(FORMATS)}")
    return names


# --------------------------------------------------------------------------------------------
# Flags from the registry
# --------------------------------------------------------------------------------------------

_LOAD_OPTIONS = ("dtype", "device", "device_map", "n_devices", "max_memory", "revision")


def _add_model(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--model", default="smollm2-135m",
                     help="built-in name, hub id, local folder or .gguf (default smollm2-135m)")
    group = sub.add_argument_group("model loading (big models: docs/concepts/big-models.md)")
    group.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "fp32", "bf16",
                                           "fp16"),
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


def _load_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in _LOAD_OPTIONS if getattr(args, k) is not None}


def _flag(option: Option) -> str:
    return "--" + option.name.replace("_", "-")


def _add_option(sub: argparse.ArgumentParser | Any, option: Option) -> None:
    """One registry option as a flag (``None`` when not given: the registry's default)."""
    default = option.default
    shown = ",".join(map(str, default)) if isinstance(default, list) else default
    text = f"{option.help} (default {shown})" if default not in (None, [], False) else option.help
    if option.type is bool:
        if option.default:
            sub.add_argument("--no-" + option.name.replace("_", "-"), dest=option.name,
                             action="store_const", const=False, default=None,
                             help=f"not: {option.help}")
        else:
            sub.add_argument(_flag(option), *option.flags, dest=option.name,
                             action="store_const", const=True, default=None, help=option.help)
        return
    kind = option.from_text
    if option.sweep and option.type is not list:
        def kind(text: str, option: Option = option) -> list[Any]:
            return [option.from_text(t.strip()) for t in text.split(",") if t.strip()]
        text += "; comma-separated values run one job each"
    allowed = option.allowed()
    metavar = ("{" + ",".join(map(str, allowed)) + "}" if allowed is not None and len(allowed) < 12
               else option.name.upper())
    sub.add_argument(_flag(option), *option.flags, dest=option.name, type=kind, default=None,
                     metavar=metavar, help=text.replace("%", "%%"))


def _add_common(sub: argparse.ArgumentParser, *, out_required: bool = True) -> None:
    sub.add_argument("--seed", type=int, default=0, help="seed of prompts, draws, resamples")
    sub.add_argument("--store", type=Path, default=None,
                     help="result store folder (default $MECHICL_CACHE/runs)")
    sub.add_argument("--force", action="store_true",
                     help="compute again results that are stored already")
    sub.add_argument("--out", type=Path, required=out_required, help="output folder")
    sub.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_analysis(subparsers: Any, spec: Analysis) -> argparse.ArgumentParser:
    sub = subparsers.add_parser(spec.cli_name, help=spec.help, description=spec.help)
    _add_model(sub)
    if spec.per_task:
        sub.add_argument("--tasks", "--task", dest="tasks", type=parse_tasks, required=True,
                         help="comma-separated task names, task files (.jsonl/.csv), or 'all'")
        sub.add_argument("--shots", type=parse_int_list, default=list(spec.shots),
                         help=f"comma-separated shot counts (default "
                              f"{','.join(map(str, spec.shots))})")
        sub.add_argument("--template", default="{input}",
                         help="prompt template for task files (built-in tasks have their own)")
    group = sub.add_argument_group(f"{spec.name} options")
    sized = spec.memory is not None
    batch = None
    for option in spec.options:
        if option.name == "batch_tokens" and sized:
            batch = sub.add_mutually_exclusive_group()
            _add_option(batch, option)
        else:
            _add_option(group, option)
    if sized:
        (batch or sub).add_argument(
            "--memory-budget", type=parse_budget, default=None,
            help="choose batch sizes so the estimated peak memory (weights included) fits this "
                 "size, e.g. 8GB or 24GiB (see docs/concepts/big-models.md)")
    sub.add_argument("--formats", type=parse_formats, default=["png", "html"],
                     help="figure formats, comma-separated from png,svg,pdf,html")
    _add_common(sub)
    sub.set_defaults(analysis=spec.name)
    return sub


def _given(args: argparse.Namespace, spec: Analysis) -> dict[str, Any]:
    return {o.name: getattr(args, o.name) for o in spec.options
            if getattr(args, o.name, None) is not None}


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def run_analysis_command(args: argparse.Namespace) -> int:
    """Any registered analysis: jobs over tasks x shots x sweep values, outputs in ``--out``."""
    spec = ANALYSES[args.analysis]
    table = run_analysis(
        spec.name, model=args.model, load=_load_kwargs(args),
        tasks=getattr(args, "tasks", ()) or (), shots=getattr(args, "shots", ()) or (),
        seed=args.seed, options=_given(args, spec), out=args.out, store=args.store,
        force=args.force, memory_budget=getattr(args, "memory_budget", None),
        formats=args.formats, template=getattr(args, "template", "{input}"),
        progress=not args.no_progress)
    print(markdown_table(table.astype(object).fillna("")), end="")
    print(f"wrote {args.out}/")
    return 0


def _add_report(subparsers: Any) -> None:
    sub = subparsers.add_parser("report", help=REPORT.help, description=REPORT.help)
    _add_model(sub)
    group = sub.add_argument_group("report options")
    for option in REPORT.options:
        if option.name in ("tasks", "prune_tasks"):  # registered tasks (no task files)
            group.add_argument(_flag(option), dest=option.name, default=None,
                               type=lambda text: parse_tasks(text, files=False),
                               help=option.help)
        else:
            _add_option(group, option)
    sub.add_argument("--memory-budget", type=parse_budget, default=None,
                     help="size every job's batches to fit this memory, e.g. 8GB")
    sub.add_argument("--reuse", type=Path, action="append", default=[],
                     help="another output folder whose results/ may be reused (repeatable)")
    _add_common(sub)
    sub.set_defaults(run=run_report)


def run_report(args: argparse.Namespace) -> int:
    given = _given(args, REPORT)
    config = ReportConfig(**{k: tuple(v) if isinstance(v, list) else v
                             for k, v in given.items()}, seed=args.seed)
    model = load_model(args.model, **_load_kwargs(args))
    report = build_report(model, args.out, config, store=args.store, reuse=args.reuse,
                          force=args.force, memory_budget=args.memory_budget,
                          progress=not args.no_progress)
    overlap = report.tables["overlap"]
    for score, g in overlap.groupby("induction score"):
        print(f"{score:16s} spearman with importance: median {g.spearman.median():.3f} "
              f"(range {g.spearman.min():.3f} .. {g.spearman.max():.3f}) over "
              f"{len(g)} task x shot maps")
    print(f"computed {sum(report.computed.values())} results, reused "
          f"{sum(report.reused.values())}; {report.seconds['total'] / 60:.1f} min")
    print(f"wrote {args.out}/report.md and report.html")
    return 0


def _add_run(subparsers: Any) -> None:
    run = subparsers.add_parser("run", help="run an experiment grid (TOML or YAML) into the "
                                            "result store; finished jobs are never recomputed")
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
    run.add_argument("--formats", type=parse_formats, default=["png", "html"])
    run.add_argument("--no-progress", action="store_true")
    run.set_defaults(run=run_run)


def run_run(args: argparse.Namespace) -> int:
    grid = load_grid(args.grid)
    if args.dry_run:
        jobs = grid.jobs()
        for job in jobs:
            print(job.describe())
        print(f"{len(jobs)} jobs over {len(grid.models)} models")
        return 0
    options: dict[str, Any] = {"threads": args.threads}
    if args.executor == "ray":
        options |= {"address": args.ray_address, "num_cpus": args.ray_num_cpus,
                    "num_gpus": args.ray_num_gpus}
    store = ResultStore(args.store or default_store())
    summary = run_grid(grid, store, executor=args.executor, executor_options=options,
                       progress=not args.no_progress)
    if args.out is not None:
        write_run_outputs(grid, store, summary, args.out, formats=args.formats)
    counts = summary.counts
    skipped = (f", {counts['skipped']} not needed (read only by stored jobs)"
               if counts.get("skipped") else "")
    print(f"{len(summary.jobs)} jobs: {counts['computed']} computed, {counts['cached']} "
          f"already in the store, {counts['failed']} failed{skipped} ({summary.seconds:.1f} "
          f"s, {summary.executor} executor); store {summary.store}")
    for job, error in summary.errors.items():
        print(f"FAILED {job}: {error}")
    if args.out is not None:
        print(f"wrote {args.out}/")
    return 0 if summary.ok else 1


def _add_runs(subparsers: Any) -> None:
    runs = subparsers.add_parser("runs", help="list the result store's finished jobs and "
                                              "provenance")
    runs.add_argument("--store", type=Path, default=None,
                      help="result store folder (default $MECHICL_CACHE/runs)")
    runs.add_argument("--analysis", default=None, help="only this analysis")
    runs.add_argument("--model", default=None, help="only this model (its name in the jobs)")
    runs.add_argument("--key", default=None, help="show one result's full provenance (key "
                                                  "or a unique prefix) as JSON")
    runs.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    runs.set_defaults(run=run_runs)


def run_runs(args: argparse.Namespace) -> int:
    store = ResultStore(args.store or default_store())
    if args.key is not None:
        matches = [k for k in store.keys() if k.startswith(args.key)]
        if len(matches) != 1:
            raise ValueError(f"--key {args.key!r} matches {len(matches)} results in "
                             f"{store.root}; give a longer prefix")
        print(json.dumps(store.get(matches[0]).manifest, indent=2, sort_keys=True))
        return 0
    table = store.table()
    if args.analysis is not None:
        table = table[table.analysis == args.analysis]
    if args.model is not None:
        table = table[table.model == args.model]
    if args.csv:
        print(table.to_csv(index=False), end="")
    elif table.empty:
        print("no results")
    else:
        print(table.drop(columns=["options"]).to_string(index=False))
    return 0


COMMANDS: dict[str, Callable[[Any], None]] = {"report": _add_report, "run": _add_run,
                                               "runs": _add_runs}
"""Subcommands that are not a single analysis (each adds its parser); every registered
analysis is a subcommand too (:func:`build_parser`)."""


def build_parser() -> argparse.ArgumentParser:
    """The parser: one subcommand per registered analysis, plus :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="mechicl", description="Mechanistic interpretability of in-context learning: one "
        "subcommand per analysis, plus report, run (experiment grids) and runs (the store).")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at INFO level and show tracebacks")
    parser.add_argument("--version", action="version", version=f"mechicl {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in sorted(ANALYSES, key=lambda n: ANALYSES[n].cli_name):
        spec = ANALYSES[name]
        if spec.cli_name in COMMANDS:
            continue
        _add_analysis(subparsers, spec).set_defaults(run=run_analysis_command)
    for add in COMMANDS.values():
        add(subparsers)
    return parser


_USER_ERRORS = (ValueError, OptionError, GridError, ModelNotAvailableError, TaskFileError,
                ResultError, OSError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line (``argv`` default: ``sys.argv[1:]``); returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except _USER_ERRORS as err:
        if args.verbose:
            raise
        raise SystemExit(f"mechicl {args.command}: {err}") from None


if __name__ == "__main__":
    sys.exit(main())
