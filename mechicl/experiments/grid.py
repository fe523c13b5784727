"""Declarative experiment grids: a TOML (or YAML) file naming models, tasks, shots, seeds and
analyses, expanded into jobs with content-addressed cache keys. ``mechicl run GRID`` runs them
(:mod:`mechicl.experiments.runner`).

A grid file::

    [grid]
    models = ["smollm2-135m", "gemma3-270m"]
    tasks = ["country_capital", "antonyms", "sentiment"]
    shots = [0, 1, 5]
    seeds = [0]

    [models.gemma3-270m]           # optional: how to load one model
    dtype = "bfloat16"
    memory_budget = "8GB"          # batch sizes from a memory budget

    [checkpoints.pythia]           # optional: a training-checkpoint sweep
    model = "EleutherAI/pythia-160m"
    steps = [0, 1000, 143000]      # or revisions = [...], or folder = "local/checkpoints"

    [analyses.scan]                # one job per model x seed
    scores = ["prefix_matching", "copying"]
    n_seeds = 100

    [analyses.importance]          # one job per model x task x shots x seed
    method = "bansal"
    n = 50

    [analyses.patching]            # sweep options take a list: one job per value
    target = ["head_out", "v"]

The analyses, their options, defaults and allowed values are those of the analysis registry
(:data:`mechicl.analyses.ANALYSES`; ``docs/architecture.md`` lists them): an ``[analyses.X]``
table is checked against analysis X's record, and every job carries its complete options
(defaults filled in). Analyses that depend on a task run for every task x shots; the others
(``scan``, ``patching``, ``report``) once per model and seed. ``overlap`` is derived: it
compares the grid's own scan and importance results (configured by their tables) and needs no
model. Analyses that read other results (``pruning``: its rankings; ``attribution``: exact
patching; ``report``: everything) have those computed first by the runner, as jobs of their own.

Each job's key is the sha256 of its canonical JSON (analysis, model identity, task, shots,
seed, options, the keys of its inputs, mechicl version): the model identity is the weights and
tokenizer hashes (:meth:`Job.key`), so a renamed copy of the same weights shares results and
any change of weights, options or version gives new keys. Execution settings (``batch_tokens``,
``memory_budget``, devices) are not part of the key: they change speed, not results (up to
floating-point rounding).
"""

import dataclasses
import hashlib
import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechicl.analyses import ANALYSES, Analysis, Job, OptionError, get_analysis
from mechicl.experiments.checkpoints import hub_checkpoints, local_checkpoints
from mechicl.inputs.tasks import TASKS
from mechicl.model.kernels import LINEAR_KERNELS
from mechicl.model.loading import parse_bytes, placement_kwargs

__all__ = ["Grid", "GridError", "Job", "ModelEntry", "load_grid", "parse_grid", "task_digest"]


class GridError(ValueError):
    """A grid file that cannot be used; the message names the key and what is allowed."""


_GRID_KEYS = {"models": list, "tasks": list, "shots": list, "seeds": list}
# [models.<name>] keys -> accepted types
_LOAD_KEYS: dict[str, tuple[type, ...]] = {
    "spec": (str,), "dtype": (str,), "device": (str,), "device_map": (str, dict),
    "n_devices": (int,), "max_memory": (dict,), "revision": (str,),
    "memory_budget": (str, int), "linear_kernel": (str,),
}
_DTYPES = ("float32", "float16", "bfloat16", "fp32", "fp16", "bf16")
_SWEEP_KEYS = {"model", "steps", "revisions", "folder"}


@dataclass(frozen=True)
class ModelEntry:
    """One model of a grid: its name in the grid, what to load and how.

    Attributes:
        name: the grid's name for it (e.g. ``"smollm2-135m"`` or ``"pythia@step1000"``).
        spec: what :func:`mechicl.load_model` loads (a built-in name, folder, .gguf or hub id).
        load: keyword arguments of :func:`mechicl.load_model` (dtype, device_map, revision...).
        memory_budget: bytes (or "8GB") from which batch sizes are chosen; None: the analyses'
            own defaults.
        sweep: the checkpoint sweep it belongs to, with ``step``.
    """

    name: str
    spec: str
    load: dict[str, Any] = field(default_factory=dict)
    memory_budget: str | int | None = None
    sweep: str | None = None
    step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "spec": self.spec, "load": self.load,
                "memory_budget": self.memory_budget, "sweep": self.sweep, "step": self.step}


def task_digest(task: Any) -> str:
    """sha256 of a task's data (examples, template, separators, scoring rule...), for job keys.

    A field at its original default (``normalization="none"``, added in mechicl 0.3) is left
    out, so that tasks which do not use it keep the keys of their stored results; so is an
    empty ``provenance`` (added in mechicl 0.3; records skipped rows, ``errors="skip"``)."""
    data = dataclasses.asdict(task)
    if data.get("normalization") == "none":
        del data["normalization"]
    if not data.get("provenance"):
        data.pop("provenance", None)
    payload = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def _axis_defaults(spec: Analysis, options: Mapping[str, Any], tasks: tuple[str, ...],
                   shots: tuple[int, ...]) -> dict[str, Any]:
    """An analysis that runs once per model but over tasks (the report) takes the grid's
    tasks and shot counts unless its table sets them."""
    names = {o.name for o in spec.options}
    out = dict(options)
    if not spec.per_task:
        if "tasks" in names and "tasks" not in out:
            out["tasks"] = list(tasks)
        if "shots" in names and "shots" not in out:
            out["shots"] = list(shots)
    return out


@dataclass(frozen=True)
class Grid:
    """A parsed grid: the axes, the models (with load options and checkpoint sweeps) and the
    analyses with the options their tables give."""

    models: tuple[str, ...]
    tasks: tuple[str, ...]
    shots: tuple[int, ...]
    seeds: tuple[int, ...]
    analyses: dict[str, dict[str, Any]]
    entries: dict[str, ModelEntry] = field(default_factory=dict)

    def entry(self, name: str) -> ModelEntry:
        """How to load the model ``name`` (plain names load as themselves)."""
        return self.entries.get(name) or ModelEntry(name=name, spec=name)

    def jobs(self) -> list[Job]:
        """Every job, in a stable order (model, analysis, sweep values, task, shots, seed), each
        with its complete options (defaults filled in from the analysis's record); analyses
        computed from other results come after those that need a model."""
        out = []
        order = sorted(self.analyses, key=lambda a: not get_analysis(a).needs_model)
        for model in self.models:
            for analysis in order:
                spec = get_analysis(analysis)
                inputs = {name: self.analyses[name] for name in spec.configured_by}
                cells = ([(t, s) for t in self.tasks for s in self.shots] if spec.per_task
                         else [(None, None)])
                given = _axis_defaults(spec, self.analyses[analysis], self.tasks, self.shots)
                for options in spec.variants(given):
                    for task, shots in cells:
                        for seed in self.seeds:
                            out.append(spec.job(model, options, seed=seed, task=task,
                                                shots=shots, input_options=inputs))
        return out


def _check_list(where: str, value: Any, kind: type, *, allow_empty: bool = False) -> list:
    if not isinstance(value, list) or (not value and not allow_empty):
        raise GridError(f"{where} = {value!r}: need a non-empty list")
    # bool is a subclass of int: reject True / False where integers are asked for
    bad = [v for v in value if not isinstance(v, kind) or (kind is int and isinstance(v, bool))]
    if bad:
        raise GridError(f"{where}: {bad!r} are not {kind.__name__}s (booleans are not ints)"
                        if kind is int else f"{where}: {bad!r} are not {kind.__name__}s")
    if len(set(value)) != len(value):
        raise GridError(f"{where} = {value!r} has duplicates")
    return value


def _check_options(name: str, options: Any, tasks: list[str], shots: list[int]) -> dict:
    """The table [analyses.<name>], checked against the analysis's record (sweep options may
    list several values: one job each)."""
    if not isinstance(options, dict):
        raise GridError(f"analyses.{name} must be a table of options")
    spec = get_analysis(name)
    if spec.per_task and not tasks:
        raise GridError(f"[analyses.{name}] runs per task: give grid.tasks = [...]")
    try:
        for variant in spec.variants(_axis_defaults(spec, options, tuple(tasks),
                                                      tuple(shots))):
            spec.resolve(variant, where=f"analyses.{name}", tasks=tasks, shots=shots)
    except OptionError as err:
        raise GridError(str(err)) from None
    return dict(options)


def _check_entry(name: str, table: Any) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise GridError(f"models.{name} must be a table of load options")
    for key, value in table.items():
        if key not in _LOAD_KEYS:
            raise GridError(f"unknown key models.{name}.{key}; allowed: {sorted(_LOAD_KEYS)}")
        if not isinstance(value, _LOAD_KEYS[key]) or isinstance(value, bool):
            raise GridError(f"models.{name}.{key} = {value!r}: need "
                            f"{' or '.join(t.__name__ for t in _LOAD_KEYS[key])}")
    if "dtype" in table and table["dtype"] not in _DTYPES:
        raise GridError(f"models.{name}.dtype = {table['dtype']!r}: choose one of {list(_DTYPES)}")
    if "linear_kernel" in table and table["linear_kernel"] not in LINEAR_KERNELS:
        raise GridError(f"models.{name}.linear_kernel = {table['linear_kernel']!r}: choose one "
                        f"of {list(LINEAR_KERNELS)}")
    try:  # the checks load_model makes, except that the GPUs be on this machine
        placement_kwargs(table.get("device"), table.get("device_map"), table.get("n_devices"),
                   table.get("max_memory"), None, check_gpus=False)
    except ValueError as err:
        raise GridError(f"models.{name}: {err}") from None
    if "memory_budget" in table:
        try:
            parse_bytes(table["memory_budget"])
        except ValueError as err:
            raise GridError(f"models.{name}.memory_budget: {err}") from None
    return dict(table)


def _sweep_entries(name: str, table: Any, base: Path | None) -> list[ModelEntry]:
    if not isinstance(table, dict):
        raise GridError(f"checkpoints.{name} must be a table (model + steps / revisions, "
                        "or folder)")
    unknown = sorted(set(table) - _SWEEP_KEYS)
    if unknown:
        raise GridError(f"unknown keys {unknown} in [checkpoints.{name}]; allowed: "
                        f"{sorted(_SWEEP_KEYS)}")
    try:
        if "folder" in table:
            if set(table) != {"folder"}:
                raise GridError(f"checkpoints.{name}: folder = ... takes no model, steps or "
                                "revisions")
            folder = Path(table["folder"]).expanduser()
            if base is not None and not folder.is_absolute():
                folder = base / folder
            found = local_checkpoints(folder)
        elif "model" in table:
            steps = table.get("steps")
            revisions = table.get("revisions")
            if steps is not None:
                steps = _check_list(f"checkpoints.{name}.steps", steps, int)
            if revisions is not None:
                revisions = _check_list(f"checkpoints.{name}.revisions", revisions, str)
            found = hub_checkpoints(table["model"], steps, revisions=revisions)
        else:
            raise GridError(f"[checkpoints.{name}] needs folder = \"...\" or model = \"...\" "
                            "with steps = [...] or revisions = [...]")
    except (ValueError, FileNotFoundError) as err:
        if isinstance(err, GridError):
            raise
        raise GridError(f"[checkpoints.{name}]: {err}") from None
    return [ModelEntry(name=f"{name}@{c.label}", spec=str(c.model), load=dict(c.load_kwargs),
                       sweep=name, step=c.step) for c in found]


def parse_grid(data: dict[str, Any], *, base: str | Path | None = None) -> Grid:
    """Validate a grid given as a dict (the parsed TOML or YAML) and return it. ``base``: the folder
    relative checkpoint folders are read from (the grid file's)."""
    allowed_top = ["analyses", "checkpoints", "grid", "models"]
    unknown = sorted(set(data) - set(allowed_top))
    if unknown:
        raise GridError(f"unknown top-level keys {unknown}; allowed: {allowed_top}")
    grid = data.get("grid")
    if not isinstance(grid, dict):
        raise GridError("missing [grid] table (models, tasks, shots, seeds)")
    unknown = sorted(set(grid) - set(_GRID_KEYS))
    if unknown:
        raise GridError(f"unknown keys {unknown} in [grid]; allowed: {sorted(_GRID_KEYS)}")
    sweeps = data.get("checkpoints", {})
    if not isinstance(sweeps, dict):
        raise GridError("checkpoints must be tables [checkpoints.<name>]")
    if "models" not in grid and not sweeps:
        raise GridError("[grid] needs models = [...] (or a [checkpoints.<name>] sweep)")
    models = (_check_list("grid.models", grid["models"], str) if "models" in grid else [])
    tasks = _check_list("grid.tasks", grid.get("tasks", []), str, allow_empty=True)
    unknown_tasks = [t for t in tasks if t not in TASKS]
    if unknown_tasks:
        raise GridError(f"grid.tasks: unknown tasks {unknown_tasks}; registered: {sorted(TASKS)}")
    shots = _check_list("grid.shots", grid.get("shots", [0]), int)
    if any(s < 0 for s in shots):
        raise GridError(f"grid.shots = {shots}: shot counts must be >= 0")
    seeds = _check_list("grid.seeds", grid.get("seeds", [0]), int)

    tables = data.get("models", {})
    if not isinstance(tables, dict):
        raise GridError("models must be tables [models.<name>] of load options")
    entries: dict[str, ModelEntry] = {}
    for name, table in tables.items():
        if name not in models:
            raise GridError(f"[models.{name}] is not in grid.models = {models}")
        options = _check_entry(name, table)
        budget = options.pop("memory_budget", None)
        entries[name] = ModelEntry(name=name, spec=options.pop("spec", name), load=options,
                                   memory_budget=budget)
    base_dir = Path(base) if base is not None else None
    for sweep, table in sweeps.items():
        for entry in _sweep_entries(sweep, table, base_dir):
            if entry.name in models:
                raise GridError(f"checkpoint {entry.name!r} is also in grid.models")
            models.append(entry.name)
            entries[entry.name] = entry

    analyses = data.get("analyses")
    if not isinstance(analyses, dict) or not analyses:
        raise GridError(f"no analyses: add e.g. [analyses.scan]; known: {sorted(ANALYSES)}")
    parsed: dict[str, dict[str, Any]] = {}
    for name, options in analyses.items():
        if name not in ANALYSES:
            raise GridError(f"unknown analysis [analyses.{name}]; known: {sorted(ANALYSES)}")
        parsed[name] = _check_options(name, options, tasks, shots)
    per_task = [a for a in parsed if get_analysis(a).per_task]
    if per_task and "shots" not in grid:
        raise GridError(f"[analyses.{per_task[0]}] runs per task and shot count: give "
                        "grid.shots = [...] (e.g. [0, 1, 5])")
    for name in parsed:
        for source in get_analysis(name).configured_by:
            swept = [k for k, v in parsed.get(source, {}).items()
                     if isinstance(v, list) and get_analysis(source).option(k).sweep]
            if swept:
                raise GridError(f"[analyses.{name}] compares the grid's own [analyses.{source}] "
                                f"results: give one value of {source}.{swept[0]}, not a list")
        missing = [a for a in get_analysis(name).configured_by if a not in parsed]
        if missing:
            raise GridError(f"[analyses.{name}] compares the grid's own results: add "
                            + ", ".join(f"[analyses.{a}]" for a in missing))
    return Grid(models=tuple(models), tasks=tuple(tasks), shots=tuple(shots),
                seeds=tuple(seeds), analyses=parsed, entries=entries)


def load_grid(path: str | Path) -> Grid:
    """Read and validate a grid file: TOML (``.toml``) or YAML (``.yaml`` / ``.yml``, the same
    tables as mappings)."""
    path = Path(path)
    yaml_file = path.suffix.lower() in (".yaml", ".yml")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GridError(f"grid file {path} does not exist") from None
    if yaml_file:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise GridError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise GridError(f"{path}: a grid file is a mapping with a 'grid' table, got "
                            f"{type(data).__name__}")
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise GridError(f"{path}: not valid TOML: {err}") from None
    try:
        return parse_grid(data, base=path.parent)
    except GridError as err:
        raise GridError(f"{path}: {err}") from None
