"""Training-checkpoint sweeps: the same analyses over a model's checkpoints, to see when heads
form during training (Olsson et al. 2022, "In-context Learning and Induction Heads", follow
induction heads across training; Pythia, Biderman et al. 2023, publishes 154 checkpoints per
model for exactly this).

A sweep is a list of :class:`Checkpoint` objects, each an ordinary model spec for
:func:`mechicl.load_model` plus the training step and the loading arguments that select it:

* :func:`local_checkpoints` reads a folder of Hugging Face checkpoint subfolders whose names
  give the step (``step1000``, ``step-1000``, ``step_1000``, ``checkpoint-1000`` as written by the
  HF Trainer, ``global_step1000``, or a plain ``1000``);
* :func:`hub_checkpoints` names hub revisions (``revision="step1000"`` for Pythia), checked
  against TransformerLens's published checkpoint schedules where it knows the model family.

Checkpoints whose weights are identical (the same weights saved twice, or a run that saved before
its first update) are found by their weights hash (:attr:`mechicl.HookedModel.weights_hash`):
:func:`identical_groups`, :func:`checkpoint_hashes`. :func:`checkpoint_table` gathers the per-head
scores of every checkpoint into one long DataFrame for
:func:`mechicl.plotting.checkpoint_figure` (scores across training steps).

Axis names: ``layer head``.
"""

import gc
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mechicl.model.hooked import HookedModel
from mechicl.model.loading import load_model
from mechicl.results import HeadScores

__all__ = ["REVISION_FORMATS", "STEP_NAMES", "Checkpoint", "checkpoint_hashes",
           "checkpoint_table", "hub_checkpoints", "identical_groups", "local_checkpoints"]

logger = logging.getLogger(__name__)

STEP_NAMES = ("step1000", "step-1000", "step_1000", "checkpoint-1000", "global_step1000", "1000")
"""Examples of the checkpoint names whose training step can be read (case-insensitive)."""

_STEP_RE = re.compile(r"^(?:(?:global_step|step|checkpoint)[-_]?)?(\d+)$", re.IGNORECASE)

REVISION_FORMATS: Mapping[str, str] = {
    "EleutherAI/pythia": "step{value}",
    "stanford-crfm": "checkpoint-{value}",
}
"""Hub revision names of training checkpoints, by model-id prefix: the same table as
TransformerLens's ``checkpoint_index`` / ``checkpoint_value`` arguments use (a test checks)."""

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _parse_step(name: str) -> int | None:
    """The training step in a checkpoint's name, or None.

    >>> [_parse_step(n) for n in ("step1000", "checkpoint-200", "global_step_3", "7", "final")]
    [1000, 200, 3, 7, None]
    """
    match = _STEP_RE.match(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    """One training checkpoint of a model: what to load, and which step it is.

    Attributes:
        model: the spec :func:`mechicl.load_model` loads: a local checkpoint folder or a hub id.
        step: the training step.
        label: a short unique name within the sweep, e.g. ``"step1000"`` (the revision for hub
            checkpoints, the subfolder's name for local ones).
        load_kwargs: further keyword arguments of :func:`mechicl.load_model` that select this
            checkpoint, e.g. ``{"revision": "step1000"}``; empty for local folders.

    >>> c = Checkpoint(model="EleutherAI/pythia-70m", step=1000, label="step1000",
    ...                load_kwargs={"revision": "step1000"})
    >>> Checkpoint.from_dict(c.to_dict()) == c
    True
    """

    model: str
    step: int
    label: str
    # excluded from the hash (a dict is unhashable) so that checkpoints can key a dict
    load_kwargs: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.step < 0:
            raise ValueError(f"checkpoint {self.label!r}: step must be >= 0, got {self.step}")
        if not self.label:
            raise ValueError(f"checkpoint of {self.model!r} at step {self.step} has an empty label")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (inverse of :meth:`from_dict`)."""
        return {"model": self.model, "step": self.step, "label": self.label,
                "load_kwargs": dict(self.load_kwargs)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Checkpoint":
        """Rebuild from :meth:`to_dict`; unknown keys are an error."""
        allowed = {"model", "step", "label", "load_kwargs"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"unknown checkpoint keys {unknown}; allowed: {sorted(allowed)}")
        return cls(model=data["model"], step=data["step"], label=data["label"],
                   load_kwargs=dict(data.get("load_kwargs", {})))

    def load(self, **kwargs: Any) -> "HookedModel":
        """Load this checkpoint: :func:`mechicl.load_model` with :attr:`load_kwargs` and ``kwargs``
        (e.g. ``dtype``, ``device``), which must not repeat a key of :attr:`load_kwargs`."""
        clash = sorted(set(kwargs) & set(self.load_kwargs))
        if clash:
            raise ValueError(f"checkpoint {self.label!r} already sets {clash} "
                             f"({self.load_kwargs}); do not pass them again")
        return load_model(self.model, **self.load_kwargs, **kwargs)


def _sorted_unique(checkpoints: list[Checkpoint], where: str) -> list[Checkpoint]:
    """Sorted by step; two checkpoints of one step are an error naming both."""
    by_step: dict[int, list[str]] = {}
    for c in checkpoints:
        by_step.setdefault(c.step, []).append(c.label)
    dups = {step: labels for step, labels in by_step.items() if len(labels) > 1}
    if dups:
        listed = "; ".join(f"step {s}: {', '.join(labels)}" for s, labels in sorted(dups.items()))
        raise ValueError(f"{where}: several checkpoints of the same step ({listed})")
    return sorted(checkpoints, key=lambda c: c.step)


def local_checkpoints(folder: str | os.PathLike[str]) -> list[Checkpoint]:
    """The checkpoints in a folder of Hugging Face checkpoint subfolders, sorted by step.

    Each subfolder holding a ``config.json`` is one checkpoint; its name gives the step
    (:data:`STEP_NAMES`: ``step1000``, ``step-1000``, ``step_1000``, ``checkpoint-1000``,
    ``global_step1000`` or ``1000``). Subfolders without ``config.json`` (e.g. the HF Trainer's
    ``runs``) are skipped with a logged warning, as are hidden ones silently; files, and a model
    saved in ``folder`` itself, are not checkpoints. Each checkpoint needs its own tokenizer
    files (the HF Trainer writes them only when given the tokenizer): a warning names the
    checkpoints without any.

    Args:
        folder: the folder holding the checkpoint subfolders.

    Returns:
        One :class:`Checkpoint` per subfolder (``model`` its absolute path, ``label`` its name,
        no ``load_kwargs``), sorted by step.

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
        ValueError: no checkpoint subfolders; a checkpoint whose name gives no step; two
            checkpoints of the same step.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint folder {root} does not exist or is not a folder")
    found: list[Checkpoint] = []
    unnamed: list[str] = []
    no_config: list[str] = []
    no_tokenizer: list[str] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (sub / "config.json").is_file():
            no_config.append(sub.name)
            continue
        step = _parse_step(sub.name)
        if step is None:
            unnamed.append(sub.name)
            continue
        if not any((sub / f).is_file() for f in _TOKENIZER_FILES):
            no_tokenizer.append(sub.name)
        found.append(Checkpoint(model=str(sub.resolve()), step=step, label=sub.name))
    patterns = ", ".join(STEP_NAMES)
    if no_config:
        logger.warning("%s: ignoring subfolders without config.json (not Hugging Face "
                       "checkpoints): %s", root, ", ".join(no_config))
    if unnamed:
        raise ValueError(f"{root}: cannot read a training step from the checkpoint name(s) "
                         f"{unnamed}; name checkpoint folders like {patterns}")
    if not found:
        raise ValueError(f"{root} holds no checkpoints: expected subfolders with a config.json "
                         f"named like {patterns} (subfolders without config.json: {no_config})")
    if no_tokenizer:
        logger.warning("%s: checkpoints without tokenizer files (%s) will fail to load; copy "
                       "the tokenizer files into them: %s", root, ", ".join(_TOKENIZER_FILES),
                       ", ".join(no_tokenizer))
    return _sorted_unique(found, str(root))


def _known_schedule(model_id: str) -> tuple[str, str, list[int]] | None:
    """(official model id, revision format, published checkpoint steps) when TransformerLens
    knows the model family's checkpoints, else None. Offline: the schedules are tables inside
    TransformerLens (only its legacy NeelNanda/... repos, which keep checkpoints as files rather
    than revisions, would list the hub, and they are not revision families)."""
    from transformer_lens.tools.model_registry.checkpoints import get_checkpoint_labels
    from transformer_lens.tools.model_registry.registry_io import resolve_model_alias

    official = resolve_model_alias(model_id) or model_id  # e.g. "pythia-70m"
    fmt = next((f for prefix, f in REVISION_FORMATS.items() if official.startswith(prefix)), None)
    if fmt is None:
        return None
    labels, _kind = get_checkpoint_labels(official)
    return official, fmt, list(labels)


def _describe(steps: list[int]) -> str:
    """A short description of a published schedule for error messages."""
    head = ", ".join(str(s) for s in steps[:12])
    return f"{len(steps)} steps: {head}, ... {steps[-1]}" if len(steps) > 12 else head


def hub_checkpoints(model_id: str, steps: Sequence[int] | None = None, *,
                    revisions: Sequence[str] | None = None) -> list[Checkpoint]:
    """Training checkpoints of a hub model stored as revisions (git branches), sorted by step.

    For the families whose checkpoint schedule TransformerLens knows (:data:`REVISION_FORMATS`:
    ``EleutherAI/pythia*`` with revisions ``step{N}``, ``stanford-crfm/*`` with
    ``checkpoint-{N}``), ``steps`` are checked against the published schedule offline and
    ``steps=None`` means all of them (154 for Pythia). Any other model needs explicit
    ``revisions`` whose names give the step (:data:`STEP_NAMES`, e.g. ``"step1000"``).
    Nothing is downloaded here.

    Args:
        model_id: a hub id such as ``"EleutherAI/pythia-70m"`` (TransformerLens aliases such as
            ``"pythia-70m"`` are resolved).
        steps: training steps to take (default: every published checkpoint).
        revisions: explicit revision names instead of ``steps``.

    Returns:
        One :class:`Checkpoint` per step with ``load_kwargs={"revision": ...}`` and the
        revision as its label.

    Raises:
        ValueError: both ``steps`` and ``revisions``; an empty list; a step outside the
            published schedule; a revision whose step cannot be read; no known schedule and no
            ``revisions``; a repeated step.

    >>> [c.label for c in hub_checkpoints("EleutherAI/pythia-70m", [1000, 0])]
    ['step0', 'step1000']
    """
    if steps is not None and revisions is not None:
        raise ValueError(f"{model_id}: give steps or revisions, not both")
    if (steps is not None and not steps) or (revisions is not None and not revisions):
        raise ValueError(f"{model_id}: the list of {'steps' if steps is not None else 'revisions'}"
                         " is empty")
    known = _known_schedule(model_id)
    where = f"checkpoints of {model_id}"
    if revisions is not None:
        found = []
        for revision in revisions:
            step = _parse_step(revision)
            if step is None:
                raise ValueError(f"{where}: cannot read a training step from revision "
                                 f"{revision!r}; name revisions like {', '.join(STEP_NAMES)}")
            if known is not None:
                official, fmt, schedule = known
                if revision != fmt.format(value=step) or step not in schedule:
                    raise ValueError(f"{where}: {revision!r} is not a published checkpoint of "
                                     f"{official}; its revisions are {fmt.format(value='N')} for "
                                     f"N in the schedule ({_describe(schedule)})")
            found.append(Checkpoint(model=known[0] if known else model_id, step=step,
                                    label=revision, load_kwargs={"revision": revision}))
        return _sorted_unique(found, where)
    if known is None:
        families = ", ".join(f"{prefix}* ({fmt})" for prefix, fmt in REVISION_FORMATS.items())
        raise ValueError(f"TransformerLens knows no checkpoint schedule for {model_id!r} (known "
                         f"families: {families}); pass revisions=[...] named like "
                         f"{', '.join(STEP_NAMES[:3])}, or a local folder of checkpoints "
                         "(local_checkpoints)")
    official, fmt, schedule = known
    if steps is None:
        steps = schedule
    bad = [s for s in steps if s not in schedule]
    if bad:
        raise ValueError(f"{where}: steps {bad} are not published checkpoints of {official} "
                         f"({_describe(schedule)})")
    found = [Checkpoint(model=official, step=int(s), label=fmt.format(value=s),
                        load_kwargs={"revision": fmt.format(value=s)}) for s in steps]
    return _sorted_unique(found, where)


def identical_groups(hashes: Mapping[str, str]) -> list[list[str]]:
    """Labels whose weights hashes are equal: groups of two or more, each in the mapping's order,
    groups in order of their first member.

    Args:
        hashes: label -> weights hash (e.g. :attr:`mechicl.HookedModel.weights_hash`, or the
            ``weights_sha256`` of a result's ``model`` info).

    >>> identical_groups({"step0": "a", "step1": "b", "step2": "a", "step3": "c", "step4": "b"})
    [['step0', 'step2'], ['step1', 'step4']]
    """
    groups: dict[str, list[str]] = {}
    for label, digest in hashes.items():
        groups.setdefault(digest, []).append(label)
    return [labels for labels in groups.values() if len(labels) > 1]


def checkpoint_hashes(checkpoints: Sequence[Checkpoint], **load_kwargs: Any) -> dict[str, str]:
    """The weights hash of each checkpoint (label -> sha256), loading one model at a time and
    freeing it before the next, so that a sweep fits in the memory of one model.

    Args:
        checkpoints: the sweep.
        **load_kwargs: passed to :meth:`Checkpoint.load` (e.g. ``dtype``; the hash depends on
            the dtype, so use the same one for every checkpoint).

    Returns:
        label -> :attr:`mechicl.HookedModel.weights_hash`, in the order given; pass it to
        :func:`identical_groups`.
    """
    hashes: dict[str, str] = {}
    for checkpoint in checkpoints:
        if checkpoint.label in hashes:
            raise ValueError(f"two checkpoints are labelled {checkpoint.label!r}")
        model = checkpoint.load(**load_kwargs)
        hashes[checkpoint.label] = model.weights_hash
        del model
        gc.collect()
    return hashes


def checkpoint_table(results: Mapping[Checkpoint, HeadScores | Sequence[HeadScores]], *,
                     hashes: Mapping[str, str] | None = None) -> pd.DataFrame:
    """One long table of per-head scores over a sweep, for
    :func:`mechicl.plotting.checkpoint_figure`.

    Args:
        results: checkpoint -> its scores (one :class:`~mechicl.results.HeadScores` or several
            with different names).
        hashes: label -> weights hash; by default each result's ``model["weights_sha256"]``
            (recorded by every mechicl analysis).

    Returns:
        The rows of :meth:`HeadScores.to_dataframe` (``score layer head mean var std rank``)
        with ``step`` and ``label`` in front and ``identical_to``: for a checkpoint whose weights
        equal those of an earlier one, the label of the earliest such checkpoint, else None
        (also when no hash is known). Sorted by step, then as the results were given.

    Raises:
        ValueError: two checkpoints with one label or step; one score twice for a checkpoint;
            results of one checkpoint recorded from different weights; ``hashes`` missing a
            checkpoint.
    """
    order = _sorted_unique(list(results), "checkpoint_table")
    labels = [c.label for c in order]
    if len(set(labels)) != len(labels):
        raise ValueError(f"checkpoint labels repeat: {labels}")
    known: dict[str, str] = {}
    frames = []
    for checkpoint in order:
        scores = results[checkpoint]
        scores = [scores] if isinstance(scores, HeadScores) else list(scores)
        names = [s.name for s in scores]
        if len(set(names)) != len(names):
            raise ValueError(f"checkpoint {checkpoint.label!r} has the score(s) "
                             f"{sorted({n for n in names if names.count(n) > 1})} twice")
        if hashes is not None:
            if checkpoint.label not in hashes:
                raise ValueError(f"hashes has no entry for checkpoint {checkpoint.label!r}")
            known[checkpoint.label] = hashes[checkpoint.label]
        else:
            recorded = {s.model["weights_sha256"] for s in scores if "weights_sha256" in s.model}
            if len(recorded) > 1:
                raise ValueError(f"the results of checkpoint {checkpoint.label!r} come from "
                                 f"different weights ({len(recorded)} weights hashes)")
            if recorded:
                known[checkpoint.label] = recorded.pop()
        for s in scores:
            frame = s.to_dataframe()
            frame.insert(0, "label", checkpoint.label)
            frame.insert(0, "step", checkpoint.step)
            frames.append(frame)
    if not frames:
        raise ValueError("checkpoint_table needs at least one checkpoint with scores")
    first_of = {label: group[0] for group in identical_groups(known) for label in group[1:]}
    table = pd.concat(frames, ignore_index=True)
    table["identical_to"] = pd.Series([first_of.get(label) for label in table["label"]],
                                      dtype=object)
    return table
