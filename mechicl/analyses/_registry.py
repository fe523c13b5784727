"""The analysis registry: every analysis declared once, read by every entry point.

An :class:`Analysis` record holds what one analysis *is*: its name, its options (types,
defaults, allowed values: :class:`Option`), the function that runs it on a model, its result
type, what it runs over (tasks x shot counts, or once per model), the results it reads
(``inputs``), and its memory model. The command line (one subcommand per analysis, flags
generated from the options), grid files (validation and expansion into jobs), ``mechicl run``
/ ``mechicl runs`` and the report all read the same record, so a default or a list of allowed
values exists in one place; the Python functions' keyword defaults are the record's (a test
compares them).

A :class:`Job` is one request to run an analysis: model, task, shot count, seed and the complete
options (defaults filled in by :meth:`Analysis.resolve`). Its content address
(:meth:`Job.key`) is what the result store files the result under.

Adding an analysis means writing one module that defines its run function and result type and
calls :func:`register_analysis`; see ``docs/architecture.md`` for a worked example.

This module is private to :mod:`mechicl.analyses`, which re-exports its public names.
"""

import argparse
import hashlib
import itertools
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mechicl.inputs.tasks import TASK_FILE_SUFFIXES

__all__ = [
    "ANALYSES",
    "MEMORY_MODELS",
    "Analysis",
    "Call",
    "Job",
    "Option",
    "OptionError",
    "Outputs",
    "batch_tokens_option",
    "get_analysis",
    "job_stem",
    "options_markdown",
    "options_table",
    "register_analysis",
    "task_slug",
]

MEMORY_MODELS: tuple[str, ...] = ("forward", "scan", "importance", "choices")
"""How an analysis's peak memory grows with its batch (:mod:`mechicl.experiments.memory`): a
plain forward pass with logits, the induction scan, gradient head importance (forward +
backward), multiple-choice scoring."""

Role = Literal["result", "execution", "output"]


class OptionError(ValueError):
    """An option value that is not allowed; the message names the option, the value and what is
    allowed."""


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               list: "a list"}


def _type_ok(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


@dataclass(frozen=True, kw_only=True)
class Option:
    """One option of an analysis.

    Attributes:
        name: the option's name (a Python identifier; the CLI flag is ``--name-with-dashes``).
        type: ``int``, ``float``, ``str``, ``bool`` or ``list`` (of ``item``).
        default: the value when the option is not given (checked like any value).
        help: one line for ``--help`` and the docs.
        item: the element type of a list option.
        choices: the allowed values (of the elements, for a list), or a function returning
            them (for registries that grow at run time, e.g. tasks or prompt-pair generators).
        registry: what the values name ("task"): the docs say "naming a registered task" for
            choices from a function instead of listing this process's registry, and a job's
            :meth:`Job.task_names` (whose data enter its key) include a task option's values.
        minimum: the smallest allowed number (of each element, for a list).
        maximum: the largest allowed number.
        below: numbers must be smaller than this.
        nullable: ``None`` is allowed (meaning "the analysis decides", e.g. all prompts; on
            the command line ``none`` or ``all``).
        non_empty: a list must have at least one element.
        must_contain: a list must contain this value (e.g. 0 in a list of percentages).
        sweep: the CLI takes a comma-separated list and grid files a list: one job per value.
        sort: a list's order carries no meaning: it is put in the order of ``choices`` (or
            sorted), so that every spelling gives the same job key.
        role: ``"result"`` (part of the job's key), ``"execution"`` (how fast, not what:
            left out of the key, e.g. ``batch_tokens``) or ``"output"`` (how results are
            presented by the CLI: not passed to the run function).
        flags: more CLI spellings (e.g. ``("--seeds",)``).
        parse: CLI text -> value (default: by ``type``; lists are comma-separated).
    """

    name: str
    type: type
    default: Any
    help: str
    item: type | None = None
    choices: Sequence[Any] | Callable[[], Iterable[Any]] | None = None
    registry: str | None = None
    minimum: int | float | None = None
    maximum: int | float | None = None
    below: int | float | None = None
    nullable: bool = False
    non_empty: bool = True
    must_contain: Any = None
    sweep: bool = False
    sort: bool = False
    role: Role = "result"
    flags: tuple[str, ...] = ()
    parse: Callable[[str], Any] | None = None

    def __post_init__(self) -> None:
        if self.type not in _TYPE_NAMES:
            raise ValueError(f"option {self.name!r}: type {self.type!r} is not one of "
                             f"{[t.__name__ for t in _TYPE_NAMES]}")
        if (self.type is list) != (self.item is not None):
            raise ValueError(f"option {self.name!r}: give item= for list options (only)")
        if self.role not in ("result", "execution", "output"):
            raise ValueError(f"option {self.name!r}: role {self.role!r} is not result, "
                             "execution or output")

    def allowed(self) -> list[Any] | None:
        """The allowed values (of the elements, for a list), or None if any value of the type."""
        if self.choices is None:
            return None
        return list(self.choices() if callable(self.choices) else self.choices)

    def describe(self, *, live: bool = True) -> str:
        """What is allowed, in words: for error messages (``live``: this process's registered
        choices) and the docs (choices from a registry described by name)."""
        kind = self.item if self.type is list else self.type
        what = _TYPE_NAMES[kind]
        if self.type is list:
            what = f"a list of {what.removeprefix('an ').removeprefix('a ')}s"
        if not live and callable(self.choices) and self.registry:
            what += f" naming {'' if self.type is list else 'a '}registered {self.registry}"
            what += "s" if self.type is list else ""
        elif (allowed := self.allowed()) is not None:
            what += f" from {allowed}"
        if self.minimum is not None:
            what += f", each >= {self.minimum:g}" if self.type is list else f" >= {self.minimum:g}"
        if self.maximum is not None:
            what += f" and <= {self.maximum:g}"
        if self.below is not None:
            what += f" and < {self.below:g}"
        if self.must_contain is not None:
            what += f", containing {self.must_contain!r}"
        if self.nullable:
            what += ", or none"
        return what

    def check(self, value: Any, where: str = "") -> Any:
        """``value`` checked (tuples become lists); raises :class:`OptionError` naming
        ``where`` (e.g. ``analyses.importance.method``), the value and what is allowed."""
        label = where or self.name
        if value is None:
            if self.nullable:
                return None
            raise OptionError(f"{label} = None: need {self.describe()}")
        if self.type is list and isinstance(value, tuple):
            value = list(value)
        if self.item is float and isinstance(value, list):  # 10 and 10.0 are one value
            value = [float(v) if isinstance(v, int) and not isinstance(v, bool) else v
                     for v in value]
        if not _type_ok(value, self.type):
            raise OptionError(f"{label} = {value!r}: need {self.describe()}"
                              + (" (booleans are not numbers)" if isinstance(value, bool) else ""))
        items = value if self.type is list else [value]
        if self.type is list:
            assert self.item is not None
            bad = [v for v in items if not _type_ok(v, self.item)]
            if bad:
                raise OptionError(f"{label}: {bad!r} are not {_TYPE_NAMES[self.item]}s; need "
                                  f"{self.describe()}")
            if self.non_empty and not items:
                raise OptionError(f"{label} = []: need {self.describe()}, at least one")
            if len({json.dumps(v) for v in items}) != len(items):
                raise OptionError(f"{label} = {value!r} has duplicates")
            if self.must_contain is not None and self.must_contain not in items:
                raise OptionError(f"{label} = {value!r}: need {self.describe()}")
        allowed = self.allowed()
        if allowed is not None:
            unknown = [v for v in items if v not in allowed]
            if unknown:
                shown = unknown[0] if self.type is not list else unknown
                raise OptionError(f"{label} = {shown!r} is not allowed; choose "
                                  f"{'from' if self.type is list else 'one of'} {allowed}")
        for v in items:
            if isinstance(v, int | float) and not isinstance(v, bool):
                if self.minimum is not None and v < self.minimum:
                    raise OptionError(f"{label} = {value!r}: need {self.describe()}")
                if self.below is not None and v >= self.below:
                    raise OptionError(f"{label} = {value!r}: need {self.describe()}")
                if self.maximum is not None and v > self.maximum:
                    raise OptionError(f"{label} = {value!r}: need {self.describe()}")
        # one spelling per value, so that 10 and 10.0 give the same job key
        if self.type is float:
            return float(value)
        if self.item is float:
            return [float(v) for v in value]
        if self.sort:
            return sorted(value, key=allowed.index) if allowed is not None else sorted(value)
        return value

    def from_text(self, text: str) -> Any:
        """A CLI argument -> the value (checked); argparse reports the error."""
        try:
            if self.nullable and text.strip().lower() in ("none", "all"):
                value = None
            elif self.parse is not None:
                value = self.parse(text)
            elif self.type is list:
                value = [_scalar(self.item, t.strip(), self.name) for t in text.split(",")
                         if t.strip()]
            elif self.type is bool:
                value = _scalar(bool, text, self.name)
            else:
                value = _scalar(self.type, text, self.name)
            return self.check(value, "\0")
        except (OptionError, ValueError) as err:
            # argparse names the flag itself: "argument --n: 0: need an integer >= 1"
            raise argparse.ArgumentTypeError(str(err).replace("\0 = ", "").replace(
                "\0", "value")) from None


def _scalar(kind: type | None, text: str, name: str) -> Any:
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise OptionError(f"--{name.replace('_', '-')} {text!r} is not an integer") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise OptionError(f"--{name.replace('_', '-')} {text!r} is not a number") from None
    if kind is bool:
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise OptionError(f"--{name.replace('_', '-')} {text!r}: write true or false")
        return lowered in ("true", "1", "yes")
    return text


@dataclass(frozen=True)
class Job:
    """One request to run an analysis: on one model (its name in a grid, or what to load), at
    one task and shot count if the analysis runs per task, with one seed and its complete options
    (:meth:`Analysis.resolve`). ``input_options`` sets the options of the jobs it reads, for
    analyses whose inputs a grid configures (:attr:`Analysis.configured_by`); they are not part
    of the key (the inputs' keys are)."""

    analysis: str
    model: str
    seed: int
    task: str | None = None
    shots: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    input_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def describe(self) -> str:
        """One line naming the job: analysis, model, task and shots, seed."""
        where = f" {self.task} {self.shots}-shot" if self.task is not None else ""
        return f"{self.analysis} {self.model}{where} seed {self.seed}"

    def to_dict(self) -> dict[str, Any]:
        """The job as JSON data (:meth:`from_dict` inverts it)."""
        out = {"analysis": self.analysis, "model": self.model, "seed": self.seed,
               "task": self.task, "shots": self.shots, "options": self.options}
        if self.input_options:
            out["input_options"] = self.input_options
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Job":
        """The job :meth:`to_dict` wrote."""
        return cls(**data)

    def record(self) -> "Analysis":
        """The job's analysis (its registry record)."""
        return get_analysis(self.analysis)

    def inputs(self) -> dict[str, "Job"]:
        """The jobs whose results this one reads, by name (see :attr:`Analysis.inputs`)."""
        spec = self.record()
        return dict(spec.inputs(self)) if spec.inputs is not None else {}

    def task_names(self) -> list[str]:
        """The tasks whose data this job reads: its task, and the values of its options that
        name tasks (``registry="task"``, e.g. a report's ``tasks``; an item ``name:shots`` names
        ``name``)."""
        names = [] if self.task is None else [self.task]
        for option in self.record().options:
            value = self.options.get(option.name)
            if option.registry != "task" or value is None:
                continue
            for item in value if isinstance(value, list) else [value]:
                name, colon, shots = str(item).rpartition(":")
                names.append(name if colon and shots.isdigit() else str(item))
        return list(dict.fromkeys(names))

    def key_options(self) -> dict[str, Any]:
        """The options that determine the result (execution and output options left out)."""
        roles = {o.name: o.role for o in self.record().options}
        return {k: v for k, v in self.options.items() if roles.get(k, "result") == "result"}

    def key(self, model_identity: Mapping[str, Any], version: str, *,
            inputs: Mapping[str, str] | None = None,
            task_data: Mapping[str, str] | None = None) -> str:
        """The content address of this job's result: sha256 of the canonical JSON of what
        determines it.

        Args:
            model_identity: ``{"weights_sha256": ..., "tokenizer_sha256": ...}`` (the model's
                name is left out: the same weights share results; other entries are ignored).
            version: mechicl's version.
            inputs: the keys of the results this job reads, by input name.
            task_data: task name -> hash of the task's data, so that editing a task's examples
                or template changes the key (only the job's own tasks count: the key of a job
                without tasks does not depend on what else runs with it).
        """
        identity = {k: model_identity[k] for k in ("weights_sha256", "tokenizer_sha256")}
        payload: dict[str, Any] = {
            "analysis": self.analysis, "model": identity, "task": self.task,
            "shots": self.shots, "seed": self.seed, "options": self.key_options(),
            "mechicl": version}
        code_version = self.record().code_version
        if code_version is not None:
            payload["code_version"] = code_version
        if inputs:
            payload["inputs"] = dict(inputs)
        if task_data and self.task_names():
            payload["task_data"] = {name: task_data[name] for name in self.task_names()}
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class Call:
    """What an analysis's run function gets: the model, the job's task (loaded), shot count,
    seed and complete options, the results of its inputs, and whether to show progress.

    Attributes:
        model: the loaded :class:`~mechicl.model.hooked.HookedModel`.
        job: the job being run.
        task: the job's task (None for analyses that do not run per task).
        inputs: name -> loaded result of each input job.
        provenance: name -> where each input came from (its ``job``, ``key``, ``analysis``
            and the ``seconds`` computing it took).
        progress: show progress bars.
    """

    model: Any
    job: Job
    task: Any = None
    inputs: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, dict[str, Any]] = field(default_factory=dict)
    progress: bool = False

    @property
    def options(self) -> dict[str, Any]:
        """The job's complete options."""
        return self.job.options

    @property
    def shots(self) -> int:
        """The job's shot count (analyses that run per task)."""
        assert self.job.shots is not None, "only analyses that run per task have shots"
        return self.job.shots

    @property
    def seed(self) -> int:
        """The job's seed."""
        return self.job.seed

    def batch(self) -> dict[str, int]:
        """``{"batch_tokens": n}`` if the job sets it, else ``{}`` (the function's default)."""
        value = self.job.options.get("batch_tokens")
        return {} if value is None else {"batch_tokens": int(value)}


@dataclass(frozen=True, kw_only=True)
class Outputs:
    """What the CLI writes for the results of one invocation (several jobs).

    Attributes:
        results: file stem -> a result to save as ``results/<stem>/``.
        figures: file stem -> a plotly figure (written in the requested formats).
        rows: one summary row per result (``<command>-summary.csv`` / ``.md``; the CLI prints
            them).
    """

    results: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class Analysis:
    """The declaration of one analysis (see the module docstring).

    Attributes:
        name: the analysis's name in grid files, job keys and ``mechicl runs``.
        help: one line for ``mechicl --help``.
        run: ``run(call) -> result``: computes the result on ``call.model``.
        result_type: the type ``run`` returns (it has ``save`` and ``load``; see
            :mod:`mechicl.results`).
        options: the options, with defaults.
        per_task: one job per task x shot count (else one per model and seed).
        needs_model: False for analyses computed from other results alone (``overlap``).
        inputs: ``inputs(job) -> {name: job}``: the results this analysis reads (computed
            first, passed to ``run`` as ``call.inputs``).
        memory: the memory model (:data:`MEMORY_MODELS`) of its forward passes, for batch
            sizes from a memory budget (or a function of the job giving it); None for
            analyses without forward passes.
        sequence_length: ``sequence_length(model, job, task) -> int``: the longest token row
            the job feeds the model (for the memory budget).
        command: its CLI subcommand (default: ``name``).
        shots: the shot counts the CLI runs by default (per-task analyses).
        narrow_option, narrow: a list option (e.g. a scan's ``scores``) such that a result
            computed for more values answers a job asking for fewer: ``narrow(result, values)``
            gives that job's result (the runner uses a stored wider result instead of
            computing).
        configured_by: analyses whose options (``Job.input_options``; in a grid file, their
            ``[analyses.X]`` tables) define this analysis's inputs (``overlap`` compares the
            grid's own scan and importance).
        check: ``check(options, tasks, shots)``: checks between options, or against the
            grid's tasks and shot counts; raises ``ValueError``.
        outputs: ``outputs(pairs, call_options) -> Outputs``: what the CLI writes for a list of
            ``(job, result)``; default: each result under ``<task>-<shots>shot`` or the
            analysis's name.
        code_version: part of every job key of this analysis once set: raise it when a change
            of the analysis's code changes its results without changing mechicl's version
            (e.g. the report's rendering), so stored results of the old code are not reused.
            None (the default) leaves the keys as they were.
    """

    name: str
    help: str
    run: Callable[[Call], Any]
    result_type: type
    options: tuple[Option, ...] = ()
    per_task: bool = False
    needs_model: bool = True
    inputs: Callable[[Job], Mapping[str, Job]] | None = None
    memory: str | Callable[[Job], str] | None = "forward"
    sequence_length: Callable[[Any, Job, Any], int] | None = None
    command: str | None = None
    shots: tuple[int, ...] = (0, 1, 5)
    configured_by: tuple[str, ...] = ()
    narrow_option: str | None = None
    narrow: Callable[[Any, list[Any]], Any] | None = None
    check: Callable[[dict[str, Any], Sequence[str], Sequence[int]], None] | None = None
    outputs: Callable[[Sequence[tuple[Job, Any]], Mapping[str, Any]], Outputs] | None = None
    code_version: int | None = None

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"analysis name {self.name!r} must be an identifier")
        names = [o.name for o in self.options]
        if len(set(names)) != len(names):
            raise ValueError(f"analysis {self.name!r} declares an option twice: {names}")
        if isinstance(self.memory, str) and self.memory not in MEMORY_MODELS:
            raise ValueError(f"analysis {self.name!r}: memory={self.memory!r} is not one of "
                             f"{list(MEMORY_MODELS)}")
        for option in self.options:
            option.check(option.default, f"{self.name}.{option.name} (its default)")

    def memory_model(self, job: Job) -> str | None:
        """The memory model of ``job``'s forward passes (None: the analysis sizes its own)."""
        model = self.memory(job) if callable(self.memory) else self.memory
        if model is not None and model not in MEMORY_MODELS:
            raise ValueError(f"analysis {self.name!r}: memory model {model!r} is not one of "
                             f"{list(MEMORY_MODELS)}")
        return model

    @property
    def cli_name(self) -> str:
        """The command-line subcommand."""
        return self.command or self.name

    def option(self, name: str) -> Option:
        """The option ``name`` (unknown names raise, listing the known ones)."""
        for o in self.options:
            if o.name == name:
                return o
        raise OptionError(f"unknown option {self.name}.{name}; allowed: "
                          f"{sorted(o.name for o in self.options)}")

    def variants(self, options: Mapping[str, Any]) -> list[dict[str, Any]]:
        """One option set per combination of the values of sweep options given as lists (the
        command line's comma-separated values, a grid file's lists); the others unchanged.

        >>> [v["method"] for v in get_analysis("importance").variants(
        ...     {"method": ["bansal", "michel"], "n": 20})]
        ['bansal', 'michel']
        """
        sweeps = {o.name for o in self.options if o.sweep and o.type is not list}
        listed = {k: v for k, v in options.items() if k in sweeps and isinstance(v, list)}
        return [{**options, **dict(zip(listed, combo, strict=True))}
                for combo in itertools.product(*listed.values())]

    def defaults(self) -> dict[str, Any]:
        """Every option's default value."""
        return {o.name: list(o.default) if isinstance(o.default, tuple) else o.default
                for o in self.options}

    def resolve(self, options: Mapping[str, Any] | None = None, *, where: str = "",
                tasks: Sequence[str] = (), shots: Sequence[int] = ()) -> dict[str, Any]:
        """The complete options: ``options`` checked, the rest from the defaults. Output
        options are kept (the CLI reads them); the key leaves them out.

        Raises:
            OptionError: an unknown option or a bad value (the message names it).
        """
        prefix = where or self.name
        given = dict(options or {})
        known = {o.name for o in self.options}
        unknown = sorted(set(given) - known)
        if unknown:
            raise OptionError(f"unknown option {prefix}.{unknown[0]}; allowed: {sorted(known)}")
        out = self.defaults()
        for name, value in given.items():
            out[name] = self.option(name).check(value, f"{prefix}.{name}")
        if self.check is not None:
            try:
                self.check(out, tasks, shots)
            except OptionError:
                raise
            except ValueError as err:
                raise OptionError(f"[{prefix}]: {err}") from None
        return out

    def job(self, model: str, options: Mapping[str, Any] | None = None, *, seed: int = 0,
            task: str | None = None, shots: int | None = None,
            input_options: Mapping[str, Mapping[str, Any]] | None = None) -> Job:
        """A job of this analysis on ``model`` with ``options`` resolved (defaults filled in).

        >>> job = get_analysis("importance").job("smollm2-135m", {"n": 20}, task="antonyms",
        ...                                      shots=5)
        >>> job.options["n"], job.options["method"]
        (20, 'bansal')
        """
        if self.per_task and (task is None or shots is None):
            raise ValueError(f"analysis {self.name!r} runs per task: give task= and shots=")
        if not self.per_task and (task is not None or shots is not None):
            raise ValueError(f"analysis {self.name!r} does not run per task: no task= or shots=")
        return Job(analysis=self.name, model=model, seed=seed, task=task, shots=shots,
                   options=self.resolve(options, tasks=[task] if task else (),
                                        shots=[shots] if shots is not None else ()),
                   input_options={k: dict(v) for k, v in (input_options or {}).items()})


ANALYSES: dict[str, Analysis] = {}
"""Every registered analysis by name (:func:`register_analysis`)."""


def batch_tokens_option(default: int | None = 4096,
                        help: str = "rows x longest row per forward pass") -> Option:
    """The ``batch_tokens`` option every batched analysis declares: the tokens of one forward
    pass (an execution option: it never changes a result, so it is not in the result's key;
    None: the analysis chooses).

    >>> o = batch_tokens_option(8192, "patched copies x prompt length per forward pass")
    >>> o.name, o.default, o.role
    ('batch_tokens', 8192, 'execution')
    """
    return Option(name="batch_tokens", type=int, default=default, nullable=default is None,
                  minimum=1, role="execution", help=help)


def register_analysis(analysis: Analysis) -> Analysis:
    """Add ``analysis`` to :data:`ANALYSES`; a name (or CLI command) already taken is an error."""
    if analysis.name in ANALYSES:
        raise ValueError(f"an analysis named {analysis.name!r} is already registered")
    taken = {a.cli_name for a in ANALYSES.values()}
    if analysis.cli_name in taken or analysis.cli_name in RESERVED_COMMANDS:
        raise ValueError(f"the command {analysis.cli_name!r} is already taken")
    ANALYSES[analysis.name] = analysis
    return analysis


RESERVED_COMMANDS: frozenset[str] = frozenset({"run", "runs"})
"""CLI subcommands that are not analyses."""


def get_analysis(name: str) -> Analysis:
    """The registered analysis ``name``; unknown names raise, listing the known ones."""
    try:
        return ANALYSES[name]
    except KeyError:
        raise OptionError(f"unknown analysis {name!r}; known: {sorted(ANALYSES)}") from None


def task_slug(name: str) -> str:
    """A task's name for file names: a task file's stem, else the name."""
    return Path(name).stem if name.endswith(TASK_FILE_SUFFIXES) else name


def job_stem(job: Job, *parts: str) -> str:
    """The file stem of a job's outputs: ``<task>-<shots>shot`` (per-task analyses) or the
    model's short name, then ``parts``, joined by ``-``.

    >>> job_stem(Job(analysis="importance", model="m", seed=0, task="antonyms", shots=5), "bansal")
    'antonyms-5shot-bansal'
    """
    if job.task is not None:
        head = [task_slug(job.task), f"{job.shots}shot"]
    else:
        head = [Path(job.model).name.replace("/", "_")]
    return "-".join([*head, *parts])


def options_table(analyses: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """One row per option of each registered analysis (name, CLI command, option, flag,
    type, default, allowed values, role, help): the defaults table of the docs, generated
    from the registry so that it cannot drift.

    >>> rows = options_table(["importance"])
    >>> [(r["option"], r["default"]) for r in rows][:2]
    [('method', 'bansal'), ('n', 50)]
    """
    rows = []
    for name in sorted(analyses if analyses is not None else ANALYSES):
        spec = get_analysis(name)
        for o in spec.options:
            kind = f"list[{o.item.__name__}]" if o.type is list and o.item else o.type.__name__
            rows.append({"analysis": name, "command": spec.cli_name, "option": o.name,
                         "flag": "--" + o.name.replace("_", "-"), "type": kind,
                         "default": o.default, "allowed": o.describe(live=False),
                         "role": o.role,
                         "sweep": o.sweep, "help": o.help})
    return rows


def _shown(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return {None: "none", True: "true", False: "false"}[value]
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def options_markdown(analyses: Iterable[str] | None = None) -> str:
    """:func:`options_table` as a markdown table (analysis, command, option, default, allowed,
    role): the defaults table of ``docs/architecture.md`` (a test checks that it is current).
    """
    lines = ["| analysis | command | option | default | allowed | role |",
             "|---|---|---|---|---|---|"]
    for r in options_table(analyses):
        lines.append(f"| {r['analysis']} | `{r['command']}` | `{r['option']}` | "
                     f"`{_shown(r['default'])}` | {r['allowed']} | {r['role']} |")
    return "\n".join(lines) + "\n"
