"""Clean/corrupted prompt pairs for activation patching.

Activation patching (causal tracing, interchange intervention) runs a model on a *clean* prompt
and on a minimally different *corrupted* prompt, copies activations from one run into the other
and measures how the logit difference between the clean answer and a competing answer moves.
That needs pairs of prompts with the same number of tokens, so that position ``p`` of one means
the same slot as position ``p`` of the other, and single-token answers. :class:`PromptPairs`
holds such a set; the generators build the standard ones:

* :func:`ioi_pairs` -- indirect object identification (Wang et al. 2022, "Interpretability in
  the Wild: a Circuit for Indirect Object Identification in GPT-2 small"): their 15 templates in
  BABA and ABBA order, their name, place and object lists, and their ``p_ABC`` corruption (the
  three name slots replaced by three other names).
* :func:`colored_objects_pairs` -- BIG-bench "reasoning about colored objects", which Merullo,
  Eickhoff & Pavlick (2023, "Circuit Component Reuse Across Tasks in Transformer Language
  Models") show reuses the IOI circuit; the corrupted prompt asks about another object.
* :func:`capital_pairs` -- in-context vs memorised answers (Yu, Merullo & Pavlick 2023,
  "Characterizing Mechanisms for Factual Recall in Language Models"): a counterfactual capital
  in the context against the true one.
* :func:`repeated_token_pairs` -- induction (Olsson et al. 2022, "In-context Learning and
  Induction Heads"): a repeated random sequence whose first copy is changed at the token that
  the second copy should predict.

:func:`make_pairs` builds a registered set by name; :func:`register_pairs` adds generators.

Token ids are right-padded (exact under causal attention: no real position attends to a pad)
and kept on the CPU; the scored position of pair ``i`` is ``lengths[i] - 1``.

Axis names: ``pair pos``.
"""

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from mechicl._checks import check_choice
from mechicl.inputs.tasks import load_task
from mechicl.model.hooked import HookedModel, as_hooked_model

logger = logging.getLogger(__name__)

__all__ = [
    "COLORED_OBJECTS",
    "COLORS",
    "IOI_ABBA_TEMPLATES",
    "IOI_BABA_TEMPLATES",
    "IOI_NAMES",
    "IOI_OBJECTS",
    "IOI_PLACES",
    "PAIR_GENERATORS",
    "PromptPairs",
    "capital_pairs",
    "colored_objects_pairs",
    "ioi_pairs",
    "make_pairs",
    "register_pairs",
    "repeated_token_pairs",
]


# --------------------------------------------------------------------------------------------
# The container
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, eq=False)
class PromptPairs:
    """Clean/corrupted prompt pairs with single-token answers, ready for activation patching.

    Attributes:
        name: what the pairs test, e.g. ``"ioi"``.
        clean: ``[pair, pos]`` token ids (BOS included), right-padded with the pad id.
        corrupted: ``[pair, pos]`` the corrupted prompts, same layout; ``clean[i]`` and
            ``corrupted[i]`` have the same length.
        lengths: ``[pair]`` real length of pair ``i`` (both prompts).
        answer: ``[pair]`` the correct next token after the clean prompt.
        wrong: ``[pair]`` the competing token (e.g. the corrupted prompt's answer, or the IOI
            subject); never equal to ``answer``.
        clean_text: the clean prompts.
        corrupted_text: the corrupted prompts.
        answer_text: ``answer`` decoded, leading space included (e.g. ``" Mary"``).
        wrong_text: ``wrong`` decoded.
        positions: named ``[pair]`` positions in the prompts (e.g. IOI ``"IO"``, ``"S1"``,
            ``"S2"``, ``"end"``).
        params: how the pairs were made (generator, seed, n, templates, word lists, ``pad_id``
            ...); JSON-serialisable. If it holds ``pad_id``, padding must be that id.

    >>> pairs = PromptPairs(
    ...     name="demo", clean=torch.tensor([[1, 5, 6, 7], [1, 8, 9, 0]]),
    ...     corrupted=torch.tensor([[1, 4, 6, 7], [1, 3, 9, 0]]), lengths=torch.tensor([4, 3]),
    ...     answer=torch.tensor([5, 8]), wrong=torch.tensor([4, 3]),
    ...     clean_text=("a b c", "d e"), corrupted_text=("f b c", "g e"),
    ...     answer_text=(" a", " d"), wrong_text=(" f", " g"), params={"pad_id": 0})
    >>> pairs.answer_pos.tolist(), sorted(pairs.by_length())
    ([3, 2], [3, 4])
    """

    name: str
    clean: Int[Tensor, "pair pos"]
    corrupted: Int[Tensor, "pair pos"]
    lengths: Int[Tensor, " pair"]
    answer: Int[Tensor, " pair"]
    wrong: Int[Tensor, " pair"]
    clean_text: tuple[str, ...]
    corrupted_text: tuple[str, ...]
    answer_text: tuple[str, ...]
    wrong_text: tuple[str, ...]
    positions: Mapping[str, Int[Tensor, " pair"]] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for label in ("clean", "corrupted", "lengths", "answer", "wrong"):
            t = getattr(self, label)
            if not isinstance(t, Tensor) or t.dtype != torch.long:
                raise ValueError(f"{label} must be a torch.long tensor, got "
                                 f"{getattr(t, 'dtype', type(t).__name__)}")
        if self.clean.ndim != 2:
            raise ValueError(f"clean must be [pair, pos], got shape {tuple(self.clean.shape)}")
        if self.corrupted.shape != self.clean.shape:
            raise ValueError(f"corrupted has shape {tuple(self.corrupted.shape)} but clean has "
                             f"{tuple(self.clean.shape)}; they must match")
        n_pair, width = self.clean.shape
        if n_pair == 0:
            raise ValueError("PromptPairs needs at least one pair")
        for label in ("lengths", "answer", "wrong"):
            shape = tuple(getattr(self, label).shape)
            if shape != (n_pair,):
                raise ValueError(f"{label} has shape {shape}; expected ({n_pair},), one per pair")
        for label in ("clean_text", "corrupted_text", "answer_text", "wrong_text"):
            texts = getattr(self, label)
            if len(texts) != n_pair or any(not isinstance(t, str) for t in texts):
                raise ValueError(f"{label} must hold {n_pair} strings, one per pair, got "
                                 f"{len(texts)}")
        bad = ((self.lengths < 1) | (self.lengths > width)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"lengths must be in 1..{width} (the pos axis); pair {bad[0]} has "
                             f"length {int(self.lengths[bad[0]])}")
        same = (self.answer == self.wrong).nonzero().flatten().tolist()
        if same:
            raise ValueError(f"answer equals wrong (token {int(self.answer[same[0]])}) for pair "
                             f"{same[0]} ({len(same)} pairs in all); the competing token must "
                             "differ from the answer")
        beyond = torch.arange(width, device=self.clean.device)[None, :] >= \
            self.lengths.to(self.clean.device)[:, None]  # [pair, pos]
        pads = torch.cat([self.clean[beyond], self.corrupted[beyond]]).unique().tolist()
        pad_id = self.params.get("pad_id")
        if len(pads) > 1 or (pads and pad_id is not None and pads[0] != pad_id):
            expected = f"the pad id {pad_id}" if pad_id is not None else "one pad id"
            raise ValueError(f"tokens beyond lengths must be padding ({expected}); found ids "
                             f"{pads[:10]}")
        positions = {}
        for key, pos in self.positions.items():
            if not isinstance(pos, Tensor) or pos.dtype != torch.long or \
                    tuple(pos.shape) != (n_pair,):
                raise ValueError(f"positions[{key!r}] must be a torch.long tensor of shape "
                                 f"({n_pair},)")
            out = ((pos < 0) | (pos >= self.lengths.to(pos.device))).nonzero().flatten().tolist()
            if out:
                raise ValueError(f"positions[{key!r}] = {int(pos[out[0]])} for pair {out[0]} is "
                                 f"outside its prompt (length {int(self.lengths[out[0]])})")
            positions[str(key)] = pos
        try:
            json.dumps(dict(self.params))
        except TypeError as err:
            raise ValueError(f"params must be JSON-serialisable: {err}") from None
        # Own copies, so that a caller's dict cannot change a frozen object.
        object.__setattr__(self, "positions", positions)
        object.__setattr__(self, "params", dict(self.params))

    # ---- shape --------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    @property
    def answer_pos(self) -> Int[Tensor, " pair"]:
        """The position whose next-token logits are scored: ``lengths - 1``."""
        return self.lengths - 1

    @property
    def same_length(self) -> bool:
        """Whether every pair has the same length."""
        return bool((self.lengths == self.lengths[0]).all())

    @property
    def length(self) -> int:
        """The common length of all pairs; ValueError if they differ."""
        if not self.same_length:
            raise ValueError(f"pairs have lengths {sorted(set(self.lengths.tolist()))}; "
                             "position-wise results need one length: use .by_length() or a "
                             "single template")
        return int(self.lengths[0])

    @property
    def pad_id(self) -> int | None:
        """The padding id: ``params["pad_id"]``, else the id found beyond the lengths (None if
        there is no padding)."""
        if self.params.get("pad_id") is not None:
            return int(self.params["pad_id"])
        beyond = torch.arange(self.clean.shape[1])[None, :] >= self.lengths.cpu()[:, None]
        found = self.clean.cpu()[beyond]
        return int(found[0]) if found.numel() else None

    # ---- subsets ------------------------------------------------------------------------

    def select(self, indices: Sequence[int] | Tensor) -> "PromptPairs":
        """The pairs at ``indices`` (ints, or a ``[pair]`` bool mask), in that order, named
        positions included; the padding is trimmed to the longest selected pair.

        >>> second = pairs.select([1])
        >>> len(second), second.clean_text == pairs.clean_text[1:]
        (1, True)
        """
        idx = torch.as_tensor(indices if isinstance(indices, Tensor) else list(indices))
        if idx.dtype == torch.bool:
            if tuple(idx.shape) != (len(self),):
                raise ValueError(f"a bool mask must have shape ({len(self)},), got "
                                 f"{tuple(idx.shape)}")
            idx = idx.nonzero().flatten()
        idx = idx.to(torch.long).flatten().cpu()
        if idx.numel() == 0:
            raise ValueError("select() needs at least one index")
        bad = [i for i in idx.tolist() if not 0 <= i < len(self)]
        if bad:
            raise ValueError(f"indices {bad[:10]} are out of range 0..{len(self) - 1}")
        rows = idx.tolist()
        width = int(self.lengths[idx.to(self.lengths.device)].max())

        def take(t: Tensor) -> Tensor:
            return t[idx.to(t.device)]

        def texts(t: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(t[i] for i in rows)

        return PromptPairs(
            name=self.name,
            clean=take(self.clean)[:, :width], corrupted=take(self.corrupted)[:, :width],
            lengths=take(self.lengths), answer=take(self.answer), wrong=take(self.wrong),
            clean_text=texts(self.clean_text), corrupted_text=texts(self.corrupted_text),
            answer_text=texts(self.answer_text), wrong_text=texts(self.wrong_text),
            positions={k: take(v) for k, v in self.positions.items()},
            params=self.params,
        )

    def by_length(self) -> dict[int, "PromptPairs"]:
        """The pairs grouped by length (ascending), each group unpadded: for position-wise
        patching results, which need one length."""
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(self.lengths.tolist()):
            groups.setdefault(int(n), []).append(i)
        return {n: self.select(groups[n]) for n in sorted(groups)}

    def clean_tokens(self, i: int) -> Int[Tensor, " _pos"]:
        """The clean prompt of pair ``i`` without padding."""
        return self.clean[i, : int(self.lengths[i])]

    def corrupted_tokens(self, i: int) -> Int[Tensor, " _pos"]:
        """The corrupted prompt of pair ``i`` without padding."""
        return self.corrupted[i, : int(self.lengths[i])]

    # ---- serialisation ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (unpadded token lists, texts, positions, params); the exact
        inverse of :meth:`from_dict`."""
        n = len(self)
        return {
            "name": self.name,
            "clean": [self.clean_tokens(i).tolist() for i in range(n)],
            "corrupted": [self.corrupted_tokens(i).tolist() for i in range(n)],
            "answer": self.answer.tolist(),
            "wrong": self.wrong.tolist(),
            "clean_text": list(self.clean_text),
            "corrupted_text": list(self.corrupted_text),
            "answer_text": list(self.answer_text),
            "wrong_text": list(self.wrong_text),
            "positions": {k: v.tolist() for k, v in self.positions.items()},
            "params": dict(self.params),
            "pad_id": self.pad_id,
            "width": int(self.clean.shape[1]),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PromptPairs":
        """Rebuild from :meth:`to_dict` output."""
        required = ("name", "clean", "corrupted", "answer", "wrong", "clean_text",
                    "corrupted_text", "answer_text", "wrong_text")
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"PromptPairs dict lacks keys {missing}")
        clean_rows, corrupted_rows = list(data["clean"]), list(data["corrupted"])
        if len(clean_rows) != len(corrupted_rows):
            raise ValueError(f"{len(clean_rows)} clean rows but {len(corrupted_rows)} corrupted")
        lengths = [len(r) for r in clean_rows]
        for i, (a, b) in enumerate(zip(clean_rows, corrupted_rows, strict=True)):
            if len(a) != len(b):
                raise ValueError(f"pair {i}: clean has {len(a)} tokens, corrupted {len(b)}")
        width = int(data.get("width") or max(lengths, default=0))
        pad_id = data.get("pad_id")
        if pad_id is None and any(n < width for n in lengths):
            raise ValueError("the dict has padded rows but no pad_id")
        clean = _pad(clean_rows, width, 0 if pad_id is None else int(pad_id))
        corrupted = _pad(corrupted_rows, width, 0 if pad_id is None else int(pad_id))
        return cls(
            name=str(data["name"]), clean=clean, corrupted=corrupted,
            lengths=torch.tensor(lengths, dtype=torch.long),
            answer=torch.tensor(data["answer"], dtype=torch.long),
            wrong=torch.tensor(data["wrong"], dtype=torch.long),
            clean_text=tuple(data["clean_text"]), corrupted_text=tuple(data["corrupted_text"]),
            answer_text=tuple(data["answer_text"]), wrong_text=tuple(data["wrong_text"]),
            positions={k: torch.tensor(v, dtype=torch.long)
                       for k, v in dict(data.get("positions", {})).items()},
            params=dict(data.get("params", {})),
        )

    def to_dataframe(self) -> pd.DataFrame:
        """One row per pair: texts, answer and wrong ids and strings, length, and one
        ``pos_<name>`` column per named position."""
        frame = pd.DataFrame({
            "pair": range(len(self)),
            "clean_text": list(self.clean_text),
            "corrupted_text": list(self.corrupted_text),
            "answer_text": list(self.answer_text),
            "wrong_text": list(self.wrong_text),
            "answer": self.answer.tolist(),
            "wrong": self.wrong.tolist(),
            "length": self.lengths.tolist(),
        })
        for key, pos in self.positions.items():
            frame[f"pos_{key}"] = pos.tolist()
        return frame

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_texts(
        cls,
        model: HookedModel,
        clean: Sequence[str],
        corrupted: Sequence[str],
        answers: Sequence[str],
        wrongs: Sequence[str],
        *,
        name: str = "custom",
        prepend_bos: bool = True,
        params: Mapping[str, Any] | None = None,
        positions: Mapping[str, Sequence[int]] | None = None,
    ) -> "PromptPairs":
        """Pairs from texts, tokenised with ``model.encode(text, prepend_bos=...)``.

        Args:
            model: gives the tokenizer (and the pad id, ``model.pad_token_id``).
            clean: the clean prompts.
            corrupted: the corrupted prompts; each must tokenise to as many tokens as its
                clean prompt.
            answers: the correct next token after each clean prompt, as a string that encodes
                (without BOS) to exactly one token, e.g. ``" Mary"``.
            wrongs: the competing token of each pair, same rule.
            name: the set's name.
            prepend_bos: put BOS in front of every prompt.
            params: extra JSON-serialisable provenance.
            positions: optional named positions, one int per pair.

        Returns:
            The pairs; ``answer_text`` and ``wrong_text`` hold the decoded tokens.

        Raises:
            ValueError: an answer is not one token, or a pair's prompts differ in length (the
                message gives the token pieces).

        On a real model the prompts are sentences, e.g. clean ``"When Mary and John left, John
        thanked"``, corrupted ``"When Anna and Paul left, Mark thanked"``, answer ``" Mary"``,
        wrong ``" John"``. The tiny test model's toy tokenizer knows only the words ``w0 ...
        w95`` (ids 4 to 99; BOS is 0):

        >>> pairs = PromptPairs.from_texts(model, ["w1 w2 w3"], ["w1 w9 w3"], [" w4"], [" w5"])
        >>> pairs.clean.tolist(), pairs.corrupted.tolist(), pairs.answer.tolist()
        ([[0, 5, 6, 7]], [[0, 5, 13, 7]], [8])
        """
        seqs = {"clean": clean, "corrupted": corrupted, "answers": answers, "wrongs": wrongs}
        for label, seq in seqs.items():
            if isinstance(seq, str):
                raise ValueError(f"{label} must be a sequence of strings, not one string")
        counts = {label: len(seq) for label, seq in seqs.items()}
        if len(set(counts.values())) != 1:
            raise ValueError(f"clean, corrupted, answers and wrongs must have one entry per "
                             f"pair; got {counts}")
        model = as_hooked_model(model)
        answer_ids = [_single_token(model, a, f"answer of pair {i}") for i, a in enumerate(answers)]
        wrong_ids = [_single_token(model, w, f"wrong answer of pair {i}")
                     for i, w in enumerate(wrongs)]
        clean_ids = [model.encode(t, prepend_bos=prepend_bos) for t in clean]
        corrupted_ids = [model.encode(t, prepend_bos=prepend_bos) for t in corrupted]
        base: dict[str, Any] = {"generator": "from_texts", "prepend_bos": prepend_bos}
        return _assemble(
            model, name=name, clean_ids=clean_ids, corrupted_ids=corrupted_ids,
            answer_ids=answer_ids, wrong_ids=wrong_ids, clean_text=list(clean),
            corrupted_text=list(corrupted),
            positions={k: list(v) for k, v in (positions or {}).items()},
            params={**base, **dict(params or {})},
        )


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _pad(rows: Sequence[Sequence[int]], width: int, pad: int) -> Tensor:
    out = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
    return out


def _single_token(model: HookedModel, text: str, what: str) -> int:
    ids = model.encode(text, prepend_bos=False)
    if len(ids) != 1:
        raise ValueError(f"the {what}, {text!r}, must encode to exactly one token; it encodes "
                         f"to {len(ids)}: {model.to_str_tokens(ids)}")
    return int(ids[0])


def _assemble(
    model: HookedModel, *, name: str, clean_ids: list[list[int]],
    corrupted_ids: list[list[int]], answer_ids: list[int], wrong_ids: list[int],
    clean_text: list[str], corrupted_text: list[str], positions: dict[str, list[int]],
    params: dict[str, Any],
) -> PromptPairs:
    """Pad token rows into a :class:`PromptPairs`, checking that each pair has one length."""
    for i, (a, b) in enumerate(zip(clean_ids, corrupted_ids, strict=True)):
        if len(a) != len(b):
            raise ValueError(
                f"pair {i}: the clean prompt has {len(a)} tokens but the corrupted one has "
                f"{len(b)}; patching needs equal lengths.\n  clean:     "
                f"{model.to_str_tokens(a)}\n  corrupted: {model.to_str_tokens(b)}")
    pad_id = int(model.pad_token_id)
    width = max(len(r) for r in clean_ids)
    return PromptPairs(
        name=name, clean=_pad(clean_ids, width, pad_id), corrupted=_pad(corrupted_ids, width,
                                                                         pad_id),
        lengths=torch.tensor([len(r) for r in clean_ids], dtype=torch.long),
        answer=torch.tensor(answer_ids, dtype=torch.long),
        wrong=torch.tensor(wrong_ids, dtype=torch.long),
        clean_text=tuple(clean_text), corrupted_text=tuple(corrupted_text),
        answer_text=tuple(model.to_str_tokens(answer_ids)),
        wrong_text=tuple(model.to_str_tokens(wrong_ids)),
        positions={k: torch.tensor(v, dtype=torch.long) for k, v in positions.items()},
        params={**params, "pad_id": pad_id},
    )


def _word_tokens(model: HookedModel, words: Sequence[str] | None, default: Sequence[str], *,
                 what: str, minimum: int) -> dict[str, int]:
    """word -> its single token id with a leading space. Defaults are filtered (logged);
    user-supplied words must all be single tokens."""
    user = words is not None
    candidates = list(words) if user else list(default)
    if isinstance(words, str):
        raise ValueError(f"{what} must be a sequence of words, not one string")
    blank = [w for w in candidates if not isinstance(w, str) or not w or w != w.strip()]
    if blank:
        raise ValueError(f"{what} must be words without surrounding spaces (a leading space is "
                         f"added); got {blank[:5]}")
    repeated = sorted({w for w in candidates if candidates.count(w) > 1})
    if repeated:
        raise ValueError(f"{what} repeat: {repeated}")
    pieces = {w: model.encode(" " + w, prepend_bos=False) for w in candidates}
    multi = {w: ids for w, ids in pieces.items() if len(ids) != 1}
    if multi and user:
        detail = "; ".join(f"{w!r} -> {model.to_str_tokens(ids)}" for w, ids in multi.items())
        raise ValueError(f"these {what} are not single tokens (with a leading space) for this "
                         f"tokenizer: {detail}")
    if multi:
        logger.info("%d of %d default %s are not single tokens for this tokenizer and were "
                    "dropped: %s", len(multi), len(candidates), what, sorted(multi))
    kept = {w: int(ids[0]) for w, ids in pieces.items() if len(ids) == 1}
    if len(kept) < minimum:
        raise ValueError(f"only {len(kept)} {what} are single tokens for this tokenizer "
                         f"({sorted(kept)}); at least {minimum} are needed: pass your own "
                         f"{what}")
    return kept


_SLOT_RE = re.compile(r"\[([A-Z_]+)\]")


def _slot_value(values: Mapping[str, str | Sequence[str]], label: str, occurrence: int) -> str:
    value = values[label]
    return value if isinstance(value, str) else value[occurrence]


def _fill(template: str, values: Mapping[str, str | Sequence[str]],
          ) -> tuple[str, list[tuple[str, int, int]]]:
    """Fill each ``[SLOT]`` with ``values[SLOT]`` (a string, or one string per occurrence);
    returns the text and, per slot in text order, (label, occurrence, character offset of the
    filled value)."""
    parts: list[str] = []
    starts: list[tuple[str, int, int]] = []
    seen: dict[str, int] = {}
    offset = last = 0
    for match in _SLOT_RE.finditer(template):
        literal = template[last:match.start()]
        label = match.group(1)
        occurrence = seen.get(label, 0)
        seen[label] = occurrence + 1
        filled = _slot_value(values, label, occurrence)
        parts += [literal, filled]
        starts.append((label, occurrence, offset + len(literal)))
        offset += len(literal) + len(filled)
        last = match.end()
    parts.append(template[last:])
    return "".join(parts), starts


def _word_position(model: HookedModel, text: str, start: int) -> int:
    """Token position of the space-prefixed word starting at character ``start`` of ``text``
    (BOS counted): the length of the encoded text before its space."""
    if start < 1 or text[start - 1] != " ":
        raise ValueError(f"the word at character {start} of {text!r} must follow a space")
    return len(model.encode(text[: start - 1], prepend_bos=True))


def _expect_token(model: HookedModel, ids: list[int], pos: int, token: int, what: str,
                  text: str) -> None:
    if pos >= len(ids) or ids[pos] != token:
        raise ValueError(
            f"the tokenizer does not keep {what} ({model.to_str_tokens([token])}) as its own "
            f"token at position {pos} of {text!r}: {model.to_str_tokens(ids)}")


def _check_n(n: int) -> None:
    if n < 1:
        raise ValueError(f"n={n} must be at least 1")


# --------------------------------------------------------------------------------------------
# IOI (Wang et al. 2022)
# --------------------------------------------------------------------------------------------

IOI_BABA_TEMPLATES: tuple[str, ...] = (
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a "
    "[OBJECT] to",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to",
)
"""Wang et al.'s 15 IOI templates in BABA order, without the final ``" [A]"`` (the answer).
``[A]`` is the indirect object (IO), ``[B]`` the subject (S1, then S2)."""

IOI_ABBA_TEMPLATES: tuple[str, ...] = tuple(
    t.replace("[B] and [A]", "[A] and [B]", 1) for t in IOI_BABA_TEMPLATES
)
"""The ABBA forms: the first two names swapped."""

IOI_PLACES: tuple[str, ...] = ("store", "garden", "restaurant", "school", "hospital", "office",
                               "house", "station")
"""Wang et al.'s places."""

IOI_OBJECTS: tuple[str, ...] = ("ring", "kiss", "bone", "basketball", "computer", "necklace",
                                "drink", "snack")
"""Wang et al.'s objects."""

IOI_NAMES: tuple[str, ...] = (
    "Michael", "Christopher", "Jessica", "Matthew", "Ashley", "Jennifer", "Joshua", "Amanda",
    "Daniel", "David", "James", "Robert", "John", "Joseph", "Andrew", "Ryan", "Brandon", "Jason",
    "Justin", "Sarah", "William", "Jonathan", "Stephanie", "Brian", "Nicole", "Nicholas",
    "Anthony", "Heather", "Eric", "Elizabeth", "Adam", "Megan", "Melissa", "Kevin", "Steven",
    "Thomas", "Timothy", "Christina", "Kyle", "Rachel", "Laura", "Lauren", "Amber", "Brittany",
    "Danielle", "Richard", "Kimberly", "Jeffrey", "Amy", "Crystal", "Michelle", "Tiffany",
    "Jeremy", "Benjamin", "Mark", "Emily", "Aaron", "Charles", "Rebecca", "Jacob", "Stephen",
    "Patrick", "Sean", "Erin", "Jamie", "Kelly", "Samantha", "Nathan", "Sara", "Dustin", "Paul",
    "Angela", "Tyler", "Scott", "Katherine", "Andrea", "Gregory", "Erica", "Mary", "Travis",
    "Lisa", "Kenneth", "Bryan", "Lindsey", "Kristen", "Jose", "Alexander", "Jesse", "Katie",
    "Lindsay", "Shannon", "Vanessa", "Courtney", "Christine", "Alicia", "Cody", "Allison",
    "Bradley", "Samuel",
)
"""The common US first names of Wang et al.'s IOI dataset (99 names)."""

IoiTemplates = Literal["all", "ABBA", "BABA"]
IoiCorruption = Literal["abc"]
_IOI_SLOTS = {"A", "B", "PLACE", "OBJECT"}


def _ioi_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(templates, str):
        check_choice("templates", templates, ("all", "ABBA", "BABA"))
        return {"all": IOI_BABA_TEMPLATES + IOI_ABBA_TEMPLATES, "ABBA": IOI_ABBA_TEMPLATES,
                "BABA": IOI_BABA_TEMPLATES}[templates]
    chosen = tuple(templates)
    if not chosen:
        raise ValueError("templates is empty")
    for t in chosen:
        labels = _SLOT_RE.findall(t)
        unknown = sorted(set(labels) - _IOI_SLOTS)
        problem = None
        if unknown:
            problem = f"unknown slots {unknown} (allowed: [A] [B] [PLACE] [OBJECT])"
        elif labels.count("A") != 1 or labels.count("B") != 2:
            problem = "it needs exactly one [A] (the IO) and two [B] (S1 and S2)"
        elif re.search(r"(^|[^ ])\[(A|B)\]", t):
            problem = "every [A] and [B] must follow a space (names are ' Name' tokens)"
        elif t != t.rstrip():
            problem = "it must not end with whitespace (the answer token starts with a space)"
        if problem:
            raise ValueError(f"IOI template {t!r} is not usable: {problem}")
    return chosen


def ioi_pairs(
    model: HookedModel,
    n: int = 32,
    *,
    seed: int = 0,
    templates: IoiTemplates | Sequence[str] = "all",
    names: Sequence[str] | None = None,
    corruption: IoiCorruption = "abc",
) -> PromptPairs:
    """Indirect-object-identification pairs (Wang et al. 2022).

    Clean: a template filled with two distinct names, the subject S repeated (``"Then, John and
    Mary went to the store. John gave a drink to"``); ``answer`` is the indirect object
    (``" Mary"``), ``wrong`` the subject (``" John"``). Corrupted (``"abc"``, Wang et al.'s
    ``p_ABC``): the same template, place and object with the three name slots (IO, S1, S2)
    replaced by three random names, distinct from each other and from IO and S.

    Places and objects are shared by the two prompts of a pair, so only the names need to be
    single tokens; the generator checks that each name is one token at its position in both
    prompts, which makes the two prompts the same length.

    Args:
        model: gives the tokenizer.
        n: number of pairs.
        seed: seeds ``numpy.random.default_rng``; each pair draws a template (uniformly from
            the selected set), five names, a place and an object.
        templates: ``"all"`` (15 BABA + 15 ABBA), ``"BABA"``, ``"ABBA"``, or a sequence of
            your own templates with one ``[A]`` (IO), two ``[B]`` (S1, S2), each after a
            space, and optionally ``[PLACE]`` and ``[OBJECT]``, without the final answer (a
            single string is always read as one of the three names). Templates differ in
            length, so pairs may too (see :meth:`PromptPairs.by_length`).
        names: first names; each must be one token with a leading space. Default
            :data:`IOI_NAMES`, filtered to the names that are single tokens (logged).
        corruption: ``"abc"``.

    Returns:
        Pairs named ``"ioi"`` with positions ``"IO"``, ``"S1"``, ``"S2"`` (the name tokens in
        the clean prompt) and ``"end"`` (the last position).

    The tiny test model's toy tokenizer knows no first names (other words become ``<unk>``),
    so this example gives it word tokens as names:

    >>> pairs = ioi_pairs(model, 8, templates="BABA", names=[f"w{i}" for i in range(10)])
    >>> pairs.clean_text[0]
    'Then, w6 and w2 had a long argument. Afterwards w6 said to'
    >>> pairs.answer_text[0], pairs.wrong_text[0]
    ('w2', 'w6')
    """
    model = as_hooked_model(model)
    _check_n(n)
    check_choice("corruption", corruption, ("abc",))
    chosen = _ioi_templates(templates)
    name_ids = _word_tokens(model, names, IOI_NAMES, what="names", minimum=5)
    name_list, place_list, object_list = list(name_ids), list(IOI_PLACES), list(IOI_OBJECTS)
    rng = np.random.default_rng(seed)

    rows: dict[str, list[Any]] = {k: [] for k in ("clean", "corrupted", "ct", "rt", "ans",
                                                   "wrong", "IO", "S1", "S2", "end")}
    for _ in range(n):
        template = chosen[int(rng.integers(len(chosen)))]
        io, s, c_io, c_s1, c_s2 = (name_list[int(j)]
                                   for j in rng.choice(len(name_list), size=5, replace=False))
        place = place_list[int(rng.integers(len(place_list)))]
        obj = object_list[int(rng.integers(len(object_list)))]
        clean_values = {"A": io, "B": s, "PLACE": place, "OBJECT": obj}
        corrupt_values = {"A": c_io, "B": (c_s1, c_s2), "PLACE": place, "OBJECT": obj}
        clean_text, slots = _fill(template, clean_values)
        corrupted_text, _ = _fill(template, corrupt_values)
        clean_ids = model.encode(clean_text)
        corrupted_ids = model.encode(corrupted_text)
        for lab, k, start in slots:
            if lab not in ("A", "B"):
                continue
            key = "IO" if lab == "A" else f"S{k + 1}"
            pos = _word_position(model, clean_text, start)
            for ids, text, values in ((clean_ids, clean_text, clean_values),
                                      (corrupted_ids, corrupted_text, corrupt_values)):
                word = _slot_value(values, lab, k)
                _expect_token(model, ids, pos, name_ids[word], f"the name {word!r}", text)
            rows[key].append(pos)
        rows["end"].append(len(clean_ids) - 1)
        rows["clean"].append(clean_ids)
        rows["corrupted"].append(corrupted_ids)
        rows["ct"].append(clean_text)
        rows["rt"].append(corrupted_text)
        rows["ans"].append(name_ids[io])
        rows["wrong"].append(name_ids[s])

    return _assemble(
        model, name="ioi", clean_ids=rows["clean"], corrupted_ids=rows["corrupted"],
        answer_ids=rows["ans"], wrong_ids=rows["wrong"], clean_text=rows["ct"],
        corrupted_text=rows["rt"],
        positions={k: rows[k] for k in ("IO", "S1", "S2", "end")},
        params={"generator": "ioi", "n": n, "seed": seed, "corruption": corruption,
                "templates": templates if isinstance(templates, str) else list(chosen),
                "template_list": list(chosen), "names": name_list, "places": place_list,
                "objects": object_list},
    )


# --------------------------------------------------------------------------------------------
# Colored objects (BIG-bench; Merullo et al. 2023)
# --------------------------------------------------------------------------------------------

COLORS: tuple[str, ...] = (
    "red", "orange", "yellow", "green", "blue", "brown", "magenta", "fuchsia", "mauve", "teal",
    "turquoise", "burgundy", "silver", "gold", "black", "grey", "purple", "pink", "white",
)
"""The colours of BIG-bench "reasoning about colored objects" (plus white)."""

COLORED_OBJECTS: tuple[str, ...] = (
    "pencil", "notebook", "paperclip", "keychain", "cup", "booklet", "plate", "crayon",
    "puzzle", "jug", "mug", "pen", "necklace", "bracelet", "envelope", "textbook", "ball",
    "book", "hat", "bag", "box", "key", "lamp", "phone", "scarf", "bowl", "spoon", "bottle",
)
"""Objects in the style of BIG-bench "reasoning about colored objects" (singular nouns)."""

_COLORED_PREFIX = "Q: On the table, I see {items}. What is the color of the"
_COLORED_SUFFIX = "?\nA: The color is"


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def colored_objects_pairs(
    model: HookedModel,
    n: int = 32,
    *,
    seed: int = 0,
    n_objects: int = 3,
    colors: Sequence[str] | None = None,
    objects: Sequence[str] | None = None,
) -> PromptPairs:
    """Colored-objects pairs (BIG-bench "reasoning about colored objects"), the task that
    Merullo et al. (2023) show reuses the IOI circuit.

    Clean: ``"Q: On the table, I see a silver pen, a red cup, and a blue book. What is the
    color of the cup?\\nA: The color is"`` -> `` red``. The answer prefix ``"The color is"``
    makes the next token a colour (a bare ``"A:"`` is mostly followed by `` The``). Corrupted:
    the same prompt asking about another listed object, so its answer is that object's colour,
    which is ``wrong``. Colours within a prompt are distinct, and so are objects; the prompts
    differ at one position only.

    Args:
        model: gives the tokenizer.
        n: number of pairs.
        seed: seeds ``numpy.random.default_rng``.
        n_objects: objects on the table (at least 2).
        colors: colour words, each one token with a leading space. Default :data:`COLORS`,
            filtered to single tokens (logged).
        objects: object words, same rule. Default :data:`COLORED_OBJECTS`, filtered.

    Returns:
        Pairs named ``"colored_objects"`` with positions ``"queried"`` (the object in the
        question), ``"answer_color"`` and ``"wrong_color"`` (the clean answer's and the wrong
        answer's colour in the list) and ``"end"``.
    """
    model = as_hooked_model(model)
    _check_n(n)
    if n_objects < 2:
        raise ValueError(f"n_objects={n_objects} must be at least 2 (the corrupted prompt asks "
                         "about another object)")
    color_ids = _word_tokens(model, colors, COLORS, what="colors", minimum=n_objects)
    object_ids = _word_tokens(model, objects, COLORED_OBJECTS, what="objects", minimum=n_objects)
    color_list, object_list = list(color_ids), list(object_ids)
    rng = np.random.default_rng(seed)
    rows: dict[str, list[Any]] = {k: [] for k in ("clean", "corrupted", "ct", "rt", "ans",
                                                   "wrong", "queried", "answer_color",
                                                   "wrong_color", "end")}
    for _ in range(n):
        cols = [color_list[int(j)] for j in rng.choice(len(color_list), n_objects, replace=False)]
        objs = [object_list[int(j)]
                for j in rng.choice(len(object_list), n_objects, replace=False)]
        q = int(rng.integers(n_objects))
        other = (q + 1 + int(rng.integers(n_objects - 1))) % n_objects
        # "a red cup, a blue pen, and a gold key" ("a red cup and a blue pen" for two),
        # recording where each colour word starts in the prompt.
        listed, color_start = "", []
        list_start = _COLORED_PREFIX.index("{items}")
        for j, (c, o) in enumerate(zip(cols, objs, strict=True)):
            if j:
                listed += ", " if j < n_objects - 1 else ("," if n_objects > 2 else "") + " and "
            listed += f"{_article(c)} "
            color_start.append(list_start + len(listed))
            listed += f"{c} {o}"
        prefix = _COLORED_PREFIX.format(items=listed)
        clean_text = f"{prefix} {objs[q]}{_COLORED_SUFFIX}"
        corrupted_text = f"{prefix} {objs[other]}{_COLORED_SUFFIX}"
        clean_ids, corrupted_ids = model.encode(clean_text), model.encode(corrupted_text)
        queried = len(model.encode(prefix))
        _expect_token(model, clean_ids, queried, object_ids[objs[q]], f"the object {objs[q]!r}",
                      clean_text)
        _expect_token(model, corrupted_ids, queried, object_ids[objs[other]],
                      f"the object {objs[other]!r}", corrupted_text)
        for key, j in (("answer_color", q), ("wrong_color", other)):
            pos = _word_position(model, clean_text, color_start[j])
            _expect_token(model, clean_ids, pos, color_ids[cols[j]], f"the colour {cols[j]!r}",
                          clean_text)
            rows[key].append(pos)
        rows["queried"].append(queried)
        rows["end"].append(len(clean_ids) - 1)
        rows["clean"].append(clean_ids)
        rows["corrupted"].append(corrupted_ids)
        rows["ct"].append(clean_text)
        rows["rt"].append(corrupted_text)
        rows["ans"].append(color_ids[cols[q]])
        rows["wrong"].append(color_ids[cols[other]])
    return _assemble(
        model, name="colored_objects", clean_ids=rows["clean"], corrupted_ids=rows["corrupted"],
        answer_ids=rows["ans"], wrong_ids=rows["wrong"], clean_text=rows["ct"],
        corrupted_text=rows["rt"],
        positions={k: rows[k] for k in ("queried", "answer_color", "wrong_color", "end")},
        params={"generator": "colored_objects", "n": n, "seed": seed, "n_objects": n_objects,
                "template": _COLORED_PREFIX + " {object}" + _COLORED_SUFFIX,
                "colors": color_list, "objects": object_list},
    )


# --------------------------------------------------------------------------------------------
# Counterfactual capitals (Yu, Merullo & Pavlick 2023)
# --------------------------------------------------------------------------------------------


def capital_pairs(model: HookedModel, n: int = 32, *, seed: int = 0) -> PromptPairs:
    """In-context vs memorised capitals (Yu, Merullo & Pavlick 2023), from the built-in task
    ``counterfactual_capital``.

    Clean: ``"The capital of Afghanistan is Freetown. Q: What is the capital of Afghanistan?
    A:"``, whose in-context answer is the counterfactual capital. Corrupted: the same text
    with the true (memorised) capital in the context. ``answer`` is the first token of
    `` Freetown``, ``wrong`` the first token of the memorised capital (`` Kabul``): capitals
    may be several tokens, and the FIRST token is scored.

    Only examples whose two capitals tokenise (in context) to the same number of tokens, with
    different first tokens, are usable; ``n`` of them are drawn without replacement with
    ``numpy.random.default_rng(seed)``.

    Args:
        model: gives the tokenizer.
        n: number of pairs.
        seed: seeds the draw.

    Returns:
        Pairs named ``"capitals"`` with positions ``"context_capital"`` (the capital's first
        token in the context) and ``"end"``; ``params["example_ids"]`` names the examples.

    Raises:
        ValueError: fewer than ``n`` usable examples (the message says how many).
    """
    model = as_hooked_model(model)
    _check_n(n)
    task = load_task("counterfactual_capital")
    slot = "{context_capital}"
    head = task.template[: task.template.index(slot)]
    if not head.endswith(" "):
        raise ValueError(f"the template {task.template!r} must put a space before {slot}")
    usable = []
    for ex in task.examples:
        fields = ex.fields
        country, context, memorised = (fields["country"], fields["context_capital"],
                                       str(ex.meta["memorised_answer"]))
        if context == memorised:
            continue
        clean_text = task.template.format(**fields)
        corrupted_text = task.template.format(**{**fields, "context_capital": memorised})
        clean_ids, corrupted_ids = model.encode(clean_text), model.encode(corrupted_text)
        pos = len(model.encode(head.format(country=country).rstrip(" ")))
        span = len(model.encode(" " + context, prepend_bos=False))
        differ = [i for i, (a, b) in enumerate(zip(clean_ids, corrupted_ids, strict=False))
                  if a != b]
        if (len(clean_ids) != len(corrupted_ids) or not differ or differ[0] != pos
                or differ[-1] >= pos + span
                or clean_ids[pos] != model.encode(" " + context, prepend_bos=False)[0]
                or corrupted_ids[pos] != model.encode(" " + memorised, prepend_bos=False)[0]):
            continue
        usable.append((ex.id, clean_text, corrupted_text, clean_ids, corrupted_ids, pos))
    if len(usable) < n:
        raise ValueError(f"only {len(usable)} of {len(task.examples)} counterfactual_capital "
                         f"examples are usable with this tokenizer (both capitals the same "
                         f"number of tokens, different first tokens); asked for n={n}")
    rng = np.random.default_rng(seed)
    chosen = [usable[int(j)] for j in rng.choice(len(usable), size=n, replace=False)]
    return _assemble(
        model, name="capitals", clean_ids=[c[3] for c in chosen],
        corrupted_ids=[c[4] for c in chosen], answer_ids=[c[3][c[5]] for c in chosen],
        wrong_ids=[c[4][c[5]] for c in chosen], clean_text=[c[1] for c in chosen],
        corrupted_text=[c[2] for c in chosen],
        positions={"context_capital": [c[5] for c in chosen],
                   "end": [len(c[3]) - 1 for c in chosen]},
        params={"generator": "capitals", "n": n, "seed": seed, "task": task.name,
                "template": task.template, "n_usable": len(usable),
                "example_ids": [c[0] for c in chosen], "scored": "first token"},
    )


# --------------------------------------------------------------------------------------------
# Repeated random tokens (induction; Olsson et al. 2022)
# --------------------------------------------------------------------------------------------


def repeated_token_pairs(
    model: HookedModel,
    n: int = 32,
    *,
    seed: int = 0,
    length: int = 20,
    prefix: str | None = None,
    exclude_top: float = 0.04,
    exclude_bottom: float = 0.04,
) -> PromptPairs:
    """Induction pairs (Olsson et al. 2022): a random sequence R, then its first half again.

    Clean: ``BOS + P + R + R[:m]`` with ``m = length // 2``, so the next token is ``R[m]``,
    predictable only by induction (``answer``). Corrupted: ``BOS + P + R' + R[:m]`` where
    ``R'`` is ``R`` with ``R'[m]`` replaced by a random token ``C`` not in ``R``; induction
    now predicts ``C`` (``wrong``). The prompts differ at one position. ``P`` is the optional
    ``prefix`` text (encoded without BOS).

    Tokens are drawn without replacement from the middle of the model's frequency ranking
    (:attr:`mechicl.HookedModel.frequency_ranking`, ``exclude_top`` and ``exclude_bottom`` of
    it dropped, as in the induction scans), which excludes special tokens. The texts are the
    decoded tokens, for display: they need not re-tokenise to the same ids.

    Args:
        model: gives the tokenizer.
        n: number of pairs.
        seed: seeds ``numpy.random.default_rng``.
        length: tokens in R (at least 2).
        prefix: optional text between BOS and R.
        exclude_top: most frequent fraction of the ranking left out.
        exclude_bottom: least frequent fraction left out.

    Returns:
        Pairs named ``"repeated_tokens"``, all of length ``1 + len(P) + length + m``, with
        positions ``"first"`` (``R[m]`` in the first copy, ``1 + len(P) + m``) and ``"end"``.
    """
    model = as_hooked_model(model)
    _check_n(n)
    if length < 2:
        raise ValueError(f"length={length} must be at least 2")
    pool = model.frequency_ranking.middle(exclude_top, exclude_bottom)
    if len(pool) < length + 1:
        raise ValueError(f"length={length} needs {length + 1} distinct tokens but the ranking "
                         f"keeps {len(pool)}; use a shorter length or exclude less")
    head = [model.bos_token_id] + (model.encode(prefix, prepend_bos=False) if prefix else [])
    m = length // 2
    total = len(head) + length + m
    n_ctx = getattr(model, "n_ctx", None)
    if isinstance(n_ctx, int) and total > n_ctx:
        raise ValueError(f"the prompts need {total} tokens but the model's context is {n_ctx}")
    rng = np.random.default_rng(seed)
    clean, corrupted, answers, wrongs = [], [], [], []
    for _ in range(n):
        drawn = pool[torch.from_numpy(rng.choice(len(pool), size=length + 1, replace=False))]
        seq, other = drawn[:length].tolist(), int(drawn[length])
        changed = list(seq)
        changed[m] = other
        clean.append(head + seq + seq[:m])
        corrupted.append(head + changed + seq[:m])
        answers.append(seq[m])
        wrongs.append(other)
    decode = model.tokenizer.decode
    return _assemble(
        model, name="repeated_tokens", clean_ids=clean, corrupted_ids=corrupted,
        answer_ids=answers, wrong_ids=wrongs,
        clean_text=[decode(c[1:]) for c in clean], corrupted_text=[decode(c[1:]) for c in corrupted],
        positions={"first": [len(head) + m] * n, "end": [total - 1] * n},
        params={"generator": "repeated_tokens", "n": n, "seed": seed, "length": length,
                "prefix": prefix, "exclude_top": exclude_top, "exclude_bottom": exclude_bottom,
                "ranking": model.frequency_ranking.method},
    )


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

PairGenerator = Callable[..., PromptPairs]

PAIR_GENERATORS: dict[str, PairGenerator] = {}
"""Name -> generator ``(model, n=..., *, seed=0, ...) -> PromptPairs``; add with
:func:`register_pairs`."""


def register_pairs(name: str, fn: PairGenerator) -> None:
    """Register a pair generator under ``name`` (duplicates are rejected)."""
    if name in PAIR_GENERATORS:
        raise ValueError(f"a pair generator named {name!r} is already registered")
    if not callable(fn):
        raise ValueError(f"the generator for {name!r} must be callable, got {type(fn).__name__}")
    PAIR_GENERATORS[name] = fn


def make_pairs(name: str, model: HookedModel, **kwargs: Any) -> PromptPairs:
    """Build the registered pair set ``name`` (``"ioi"``, ``"colored_objects"``,
    ``"capitals"``, ``"repeated_tokens"``, ...) with the generator's keyword arguments.

    >>> pairs = make_pairs("repeated_tokens", model, n=4, seed=1)
    >>> pairs.name, len(pairs)
    ('repeated_tokens', 4)
    """
    if name not in PAIR_GENERATORS:
        raise ValueError(f"unknown pair generator {name!r}; known: {sorted(PAIR_GENERATORS)}")
    return PAIR_GENERATORS[name](model, **kwargs)


for _name, _fn in (("ioi", ioi_pairs), ("colored_objects", colored_objects_pairs),
                   ("capitals", capital_pairs), ("repeated_tokens", repeated_token_pairs)):
    register_pairs(_name, _fn)
