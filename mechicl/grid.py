"""Declarative experiment grids: a TOML (or YAML) file naming models, tasks, shots, seeds and
analyses, expanded into jobs with content-addressed cache keys. ``mechicl run GRID`` runs them
(:mod:`mechicl.runner`).

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

Analyses that depend on a task run for every task x shots; the others (``scan``, ``patching``,
``report``) once per model and seed. ``overlap`` is derived: it compares the grid's own scan
and importance results and needs no model.

Each job's key is the sha256 of its canonical JSON (analysis, model identity, task, shots,
seed, options, the keys of its inputs, mechicl version): the model identity is the weights and
tokenizer hashes (:meth:`Job.key`), so a renamed copy of the same weights shares results and
any change of weights, options or version gives new keys. Execution settings (``batch_tokens``,
``memory_budget``, devices) are not part of the key: they change speed, not results (up to
floating-point rounding).
"""

import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechicl.induction import SCORES

__all__ = ["ANALYSES", "Analysis", "Grid", "GridError", "Job", "ModelEntry", "load_grid",
           "parse_grid", "task_digest"]


class GridError(ValueError):
    """A grid file that cannot be used; the message names the key and what is allowed."""


@dataclass(frozen=True)
class Analysis:
    """What an analysis runs over and which options it takes.

    Attributes:
        per_task: one job per task x shots (else one per model and seed).
        options: allowed option -> accepted types.
        needs_model: False for analyses derived from other results (``overlap``).
        inputs: analyses whose results this one reads.
    """

    per_task: bool
    options: dict[str, tuple[type, ...]]
    needs_model: bool = True
    inputs: tuple[str, ...] = ()


_NUM = (int, float)
ANALYSES: dict[str, Analysis] = {
    "scan": Analysis(False, {"scores": (list,), "n_seeds": (int,), "length": (int,),
                             "batch_tokens": (int,)}),
    "importance": Analysis(True, {"method": (str,), "n": (int,), "token_normalization": (str,),
                                  "batch_tokens": (int,)}),
    "accuracy": Analysis(True, {"n": (int,), "length_normalize": (bool,),
                                "batch_tokens": (int,)}),
    "ffn_importance": Analysis(True, {"n": (int,), "metric": (str,), "batch_tokens": (int,)}),
    "pruning": Analysis(True, {"n": (int,), "eval_n": (int,), "method": (str,),
                               "percents": (list,), "draws": (int,), "batch_tokens": (int,)}),
    "patching": Analysis(False, {"prompts": (str,), "targets": (list,), "n": (int,),
                                 "batch_tokens": (int,)}),
    "overlap": Analysis(True, {"top_k_percent": _NUM, "n_permutations": (int,)},
                        needs_model=False, inputs=("scan", "importance")),
    "report": Analysis(False, {"n": (int,), "eval_n": (int,), "method": (str,),
                               "scan_seeds": (int,), "scan_length": (int,),
                               "prune_tasks": (list,), "prune_shots": (list,),
                               "percents": (list,), "ffn_percents": (list,), "draws": (int,),
                               "ffn": (bool,), "top_k_percent": _NUM,
                               "n_permutations": (int,), "n_resamples": (int,),
                               "batch_tokens": (int,)}),
}

# Options that change how fast a job runs, not its result: left out of the cache key.
EXECUTION_OPTIONS = frozenset({"batch_tokens"})

# string options with a fixed set of values
_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("importance", "method"): ("bansal", "michel", "ablation"),
    ("pruning", "method"): ("bansal", "michel", "ablation"),
    ("report", "method"): ("bansal", "michel", "ablation"),
    ("importance", "token_normalization"): ("reference", "uniform"),
    ("ffn_importance", "metric"): ("loss", "accuracy"),
}
# integer options where 0 is allowed
_NON_NEGATIVE = {("pruning", "draws"), ("report", "draws")}

_GRID_KEYS = {"models": list, "tasks": list, "shots": list, "seeds": list}
# [models.<name>] keys -> accepted types
_LOAD_KEYS: dict[str, tuple[type, ...]] = {
    "spec": (str,), "dtype": (str,), "device": (str,), "device_map": (str, dict),
    "n_devices": (int,), "max_memory": (dict,), "revision": (str,),
    "memory_budget": (str, int),
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


@dataclass(frozen=True)
class Job:
    """One unit of work: an analysis of one model (at one task and shot count, if the analysis
    uses tasks) with one seed."""

    analysis: str
    model: str
    seed: int
    task: str | None = None
    shots: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        where = f" {self.task} {self.shots}-shot" if self.task is not None else ""
        return f"{self.analysis} {self.model}{where} seed {self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return {"analysis": self.analysis, "model": self.model, "seed": self.seed,
                "task": self.task, "shots": self.shots, "options": self.options}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Job":
        return cls(**data)

    def inputs(self) -> list["Job"]:
        """The jobs whose results this one reads (``overlap``: the scan and the importance of
        the same model, seed, task and shots), with their options from ``options['inputs']``."""
        needed = ANALYSES[self.analysis].inputs
        given = self.options.get("_inputs", {})
        out = []
        for name in needed:
            per_task = ANALYSES[name].per_task
            out.append(Job(analysis=name, model=self.model, seed=self.seed,
                           task=self.task if per_task else None,
                           shots=self.shots if per_task else None,
                           options=dict(given.get(name, {}))))
        return out

    def task_names(self) -> list[str]:
        """The tasks whose data this job reads (its task; a report's tasks)."""
        if self.task is not None:
            return [self.task]
        return list(self.options.get("tasks", []))

    def key(self, model_identity: dict[str, Any], version: str, *,
            inputs: list[str] | tuple[str, ...] = (),
            task_data: dict[str, str] | None = None) -> str:
        """The content address of this job's result: sha256 of the canonical JSON of what
        determines it.

        Args:
            model_identity: e.g. ``{"weights_sha256": ..., "tokenizer_sha256": ...}`` (the
                model's name is left out: the same weights share results; other entries, such
                as ``info``, are ignored).
            version: mechicl's version.
            inputs: the keys of the results this job reads.
            task_data: task name -> hash of the task's data (:func:`task_digest`), so that
                editing a task's examples or template changes the key.
        """
        options = {k: v for k, v in self.options.items()
                   if k not in EXECUTION_OPTIONS and k != "_inputs"}
        identity = {k: model_identity[k] for k in ("weights_sha256", "tokenizer_sha256")}
        payload = {"analysis": self.analysis, "model": identity, "task": self.task,
                   "shots": self.shots, "seed": self.seed, "options": options,
                   "mechicl": version}
        if inputs:
            payload["inputs"] = list(inputs)
        if task_data:
            payload["task_data"] = {name: task_data[name] for name in self.task_names()}
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def task_digest(task: Any) -> str:
    """sha256 of a task's data (examples, template, separators...), for job keys."""
    import dataclasses

    payload = json.dumps(dataclasses.asdict(task), sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class Grid:
    """A parsed grid: the axes, the models (with load options and checkpoint sweeps) and the
    analyses with their options."""

    models: tuple[str, ...]
    tasks: tuple[str, ...]
    shots: tuple[int, ...]
    seeds: tuple[int, ...]
    analyses: dict[str, dict[str, Any]]
    entries: dict[str, ModelEntry] = field(default_factory=dict)

    def entry(self, name: str) -> ModelEntry:
        """How to load the model ``name`` (plain names load as themselves)."""
        return self.entries.get(name) or ModelEntry(name=name, spec=name)

    def jobs(self) -> list["Job"]:
        """Every job, in a stable order (model, analysis, task, shots, seed); derived analyses
        come after the analyses they read."""
        out = []
        order = sorted(self.analyses, key=lambda a: not ANALYSES[a].needs_model)
        for model in self.models:
            for analysis in order:
                options = dict(self.analyses[analysis])
                if ANALYSES[analysis].inputs:
                    options["_inputs"] = {name: self.analyses[name]
                                          for name in ANALYSES[analysis].inputs}
                if analysis == "report":
                    options |= {"tasks": list(self.tasks), "shots": list(self.shots)}
                per_task = ANALYSES[analysis].per_task
                cells = ([(t, s) for t in self.tasks for s in self.shots] if per_task
                         else [(None, None)])
                for task, shots in cells:
                    for seed in self.seeds:
                        out.append(Job(analysis=analysis, model=model, seed=seed, task=task,
                                       shots=shots, options=dict(options)))
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
    from mechicl.pairs import PAIR_GENERATORS
    from mechicl.patching import TARGETS

    if not isinstance(options, dict):
        raise GridError(f"analyses.{name} must be a table of options")
    spec = ANALYSES[name]
    if spec.per_task and not tasks:
        raise GridError(f"[analyses.{name}] runs per task: give grid.tasks = [...]")
    for key, value in options.items():
        if key not in spec.options:
            raise GridError(f"unknown option analyses.{name}.{key}; allowed: "
                            f"{sorted(spec.options)}")
        types = spec.options[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise GridError(f"analyses.{name}.{key} = {value!r}: need "
                            f"{' or '.join(t.__name__ for t in types)}")
        choices = _CHOICES.get((name, key))
        if choices and value not in choices:
            raise GridError(f"analyses.{name}.{key} = {value!r}: choose one of "
                            f"{list(choices)}")
        if isinstance(value, int) and not isinstance(value, bool):
            low = 0 if (name, key) in _NON_NEGATIVE else 1
            if value < low:
                raise GridError(f"analyses.{name}.{key} = {value}: need an integer >= {low}")
    if name == "scan" and "scores" in options:
        bad = [s for s in options["scores"] if s not in SCORES]
        if bad or not options["scores"]:
            raise GridError(f"analyses.scan.scores: unknown scores {bad or []}; allowed: "
                            f"{list(SCORES)}")
    if name == "patching":
        prompts = options.get("prompts", "ioi")
        if prompts not in PAIR_GENERATORS:
            raise GridError(f"analyses.patching.prompts = {prompts!r}: choose one of "
                            f"{sorted(PAIR_GENERATORS)}")
        bad = [t for t in options.get("targets", []) if t not in TARGETS]
        if bad or options.get("targets") == []:
            raise GridError(f"analyses.patching.targets: unknown targets {bad}; allowed: "
                            f"{list(TARGETS)}")
    if name in ("pruning", "report"):
        for key in ("percents", "ffn_percents"):
            values = options.get(key)
            if values is not None and (
                    any(not isinstance(p, int | float) or isinstance(p, bool) or not 0 <= p < 100
                        for p in values) or 0 not in values):
                raise GridError(f"analyses.{name}.{key} = {values!r}: need 0 and numbers in "
                                "[0, 100)")
    if name == "overlap":
        top = options.get("top_k_percent", 10)
        if not 0 < top <= 100:
            raise GridError(f"analyses.overlap.top_k_percent = {top!r}: need a number in "
                            "(0, 100]")
    if name == "report":
        from mechicl.report import ReportConfig

        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()
                  if k != "batch_tokens"}
        try:
            ReportConfig(tasks=tuple(tasks), shots=tuple(shots), **fields)
        except ValueError as err:
            raise GridError(f"[analyses.report]: {err}") from None
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
    from mechicl.models import _placement

    try:  # the checks load_model makes, except that the GPUs be on this machine
        _placement(table.get("device"), table.get("device_map"), table.get("n_devices"),
                   table.get("max_memory"), None, check_gpus=False)
    except ValueError as err:
        raise GridError(f"models.{name}: {err}") from None
    if "memory_budget" in table:
        from mechicl.memory import parse_bytes

        try:
            parse_bytes(table["memory_budget"])
        except ValueError as err:
            raise GridError(f"models.{name}.memory_budget: {err}") from None
    return dict(table)


def _sweep_entries(name: str, table: Any, base: Path | None) -> list[ModelEntry]:
    from mechicl.checkpoints import hub_checkpoints, local_checkpoints

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
    from mechicl.tasks import TASKS

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
    for name in parsed:
        missing = [a for a in ANALYSES[name].inputs if a not in parsed]
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
