"""Declarative experiment grids: a TOML file naming models, tasks, shots, seeds and analyses,
expanded into jobs with content-addressed cache keys.

A grid file::

    [grid]
    models = ["smollm2-135m", "gemma3-270m"]
    tasks = ["country_capital", "antonyms", "sentiment"]
    shots = [0, 1, 5]
    seeds = [0]

    [analyses.scan]                # one job per model x seed
    scores = ["prefix_matching", "copying"]
    n_seeds = 100

    [analyses.importance]          # one job per model x task x shots x seed
    method = "bansal"
    n = 50

    [analyses.accuracy]
    n = 50

Analyses that depend on a task run for every task x shots; the others (``scan``) once per model
and seed. Each job's key is the sha256 of its canonical JSON (analysis, model identity, task,
shots, seed, options, mechicl version): the model identity is the weights and tokenizer hashes
once the model is loaded (:meth:`Job.key`), so a renamed copy of the same weights shares
results and any change of weights, options or version gives new keys.

Status: the grid format, validation and job expansion (issue 8, part 1). The runner,
``mechicl run`` / ``mechicl runs`` and the executors come next.
"""

import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechicl.induction import SCORES

__all__ = ["ANALYSES", "Grid", "GridError", "Job", "load_grid", "parse_grid"]


class GridError(ValueError):
    """A grid file that cannot be used; the message names the key and what is allowed."""


# analysis -> (runs per task x shots?, allowed options with their types)
ANALYSES: dict[str, tuple[bool, dict[str, tuple[type, ...]]]] = {
    "scan": (False, {"scores": (list,), "n_seeds": (int,), "batch_tokens": (int,)}),
    "importance": (True, {"method": (str,), "n": (int,), "token_normalization": (str,),
                          "batch_tokens": (int,)}),
    "accuracy": (True, {"n": (int,), "length_normalize": (bool,), "batch_tokens": (int,)}),
    "ffn_importance": (True, {"n": (int,), "metric": (str,), "batch_tokens": (int,)}),
}

# string options with a fixed set of values
_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("importance", "method"): ("bansal", "michel", "ablation"),
    ("importance", "token_normalization"): ("reference", "uniform"),
    ("ffn_importance", "metric"): ("loss", "accuracy"),
}

_GRID_KEYS = {"models": list, "tasks": list, "shots": list, "seeds": list}


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

    def key(self, model_identity: dict[str, Any], version: str) -> str:
        """The content address of this job's result: sha256 of the canonical JSON of what
        determines it. ``model_identity``: e.g. ``{"weights_sha256": ..., "tokenizer_sha256":
        ...}`` (the model's name is left out: the same weights share results)."""
        payload = {"analysis": self.analysis, "model": model_identity, "task": self.task,
                   "shots": self.shots, "seed": self.seed, "options": self.options,
                   "mechicl": version}
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Grid:
    """A parsed grid: the axes and the analyses with their options."""

    models: tuple[str, ...]
    tasks: tuple[str, ...]
    shots: tuple[int, ...]
    seeds: tuple[int, ...]
    analyses: dict[str, dict[str, Any]]

    def jobs(self) -> list["Job"]:
        """Every job, in a stable order (model, analysis, task, shots, seed)."""
        out = []
        for model in self.models:
            for analysis, options in self.analyses.items():
                per_task = ANALYSES[analysis][0]
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
        raise GridError(f"{where}: {bad!r} are not {kind.__name__}s")
    if len(set(value)) != len(value):
        raise GridError(f"{where} = {value!r} has duplicates")
    return value


def parse_grid(data: dict[str, Any]) -> Grid:
    """Validate a grid given as a dict (the parsed TOML) and return it."""
    from mechicl.tasks import TASKS

    unknown = sorted(set(data) - {"grid", "analyses"})
    if unknown:
        raise GridError(f"unknown top-level keys {unknown}; allowed: ['analyses', 'grid']")
    grid = data.get("grid")
    if not isinstance(grid, dict):
        raise GridError("missing [grid] table (models, tasks, shots, seeds)")
    unknown = sorted(set(grid) - set(_GRID_KEYS))
    if unknown:
        raise GridError(f"unknown keys {unknown} in [grid]; allowed: {sorted(_GRID_KEYS)}")
    if "models" not in grid:
        raise GridError("[grid] needs models = [...]")
    models = _check_list("grid.models", grid["models"], str)
    tasks = _check_list("grid.tasks", grid.get("tasks", []), str, allow_empty=True)
    unknown_tasks = [t for t in tasks if t not in TASKS]
    if unknown_tasks:
        raise GridError(f"grid.tasks: unknown tasks {unknown_tasks}; registered: {sorted(TASKS)}")
    shots = _check_list("grid.shots", grid.get("shots", [0]), int)
    if any(s < 0 for s in shots):
        raise GridError(f"grid.shots = {shots}: shot counts must be >= 0")
    seeds = _check_list("grid.seeds", grid.get("seeds", [0]), int)

    analyses = data.get("analyses")
    if not isinstance(analyses, dict) or not analyses:
        raise GridError(f"no analyses: add e.g. [analyses.scan]; known: {sorted(ANALYSES)}")
    parsed: dict[str, dict[str, Any]] = {}
    for name, options in analyses.items():
        if name not in ANALYSES:
            raise GridError(f"unknown analysis [analyses.{name}]; known: {sorted(ANALYSES)}")
        if not isinstance(options, dict):
            raise GridError(f"analyses.{name} must be a table of options")
        per_task, allowed = ANALYSES[name]
        if per_task and not tasks:
            raise GridError(f"[analyses.{name}] runs per task: give grid.tasks = [...]")
        for key, value in options.items():
            if key not in allowed:
                raise GridError(f"unknown option analyses.{name}.{key}; allowed: "
                                f"{sorted(allowed)}")
            types = allowed[key]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise GridError(f"analyses.{name}.{key} = {value!r}: need "
                                f"{' or '.join(t.__name__ for t in types)}")
            choices = _CHOICES.get((name, key))
            if choices and value not in choices:
                raise GridError(f"analyses.{name}.{key} = {value!r}: choose one of "
                                f"{list(choices)}")
            if isinstance(value, int) and not isinstance(value, bool) and value < 1:
                raise GridError(f"analyses.{name}.{key} = {value}: need a positive integer")
        if name == "scan" and "scores" in options:
            bad = [s for s in options["scores"] if s not in SCORES]
            if bad or not options["scores"]:
                raise GridError(f"analyses.scan.scores: unknown scores {bad or []}; allowed: "
                                f"{list(SCORES)}")
        parsed[name] = dict(options)
    return Grid(models=tuple(models), tasks=tuple(tasks), shots=tuple(shots),
                seeds=tuple(seeds), analyses=parsed)


def load_grid(path: str | Path) -> Grid:
    """Read and validate a TOML grid file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise GridError(f"{path}: not valid TOML: {err}") from None
    except FileNotFoundError:
        raise GridError(f"grid file {path} does not exist") from None
    try:
        return parse_grid(data)
    except GridError as err:
        raise GridError(f"{path}: {err}") from None
