"""Derived tasks built from the shipped data (issue 23 §2): closed-book recall against
in-context information processing, after Jin et al. (ICLR 2024, "The Cost of Down-Scaling
Language Models: Fact Recall Deteriorates before In-Context Learning").

Nothing here is downloaded: every task is rebuilt, deterministically, from the files of
``mechicl/inputs/data/tasks`` (see its ``PROVENANCE.md``), so its source and licence are those
of the task it is derived from.

* **Closed-book recall** (:data:`CLOSED_BOOK_TASKS`): ``country_capital`` and
  ``country_currency`` at 0 shots (built-in tasks; the answer is only in the weights).
* **In-context processing** (:data:`IN_CONTEXT_TASKS`), where the answer is in the prompt:

  - ``capital_in_context`` (new): the true fact stated in the context, "The capital of
    {country} is {capital}. Q: What is the capital of {country}? A:", with
    ``counterfactual_capital``'s two choices (the true capital, gold, and its counterfactual
    capital);
  - ``counterfactual_capital`` (built-in): a counterfactual fact in the context; gold is the
    in-context answer;
  - ``sentiment_unrelated`` (new): label mapping with semantically unrelated labels (Wei et
    al. 2023, "Larger language models do in-context learning differently"): the Rotten
    Tomatoes snippets of ``sentiment`` with the labels negative / positive replaced by ``foo``
    / ``bar`` (:data:`~mechicl.inputs.tasks.UNRELATED_LABELS`) in every example, and the cue
    word "Sentiment" replaced by "Label", so the mapping can only be learnt from the
    demonstrations (run it k-shot);
  - ``repeated_words`` (new): copying of a repeated sequence, the text analogue of the
    repeated random tokens of induction scans: 8 distinct words (from the ``antonyms``
    inputs) followed by their first ``m`` words again (``1 <= m <= 7``); the answer is the
    next word of the repeat, against 3 other words of the same sequence (all four are in the
    context once, so only copying the order answers it).

:data:`VARIANT_TASKS` names the new tasks; they are registered in
:data:`~mechicl.inputs.tasks.TASKS` but are not in
:data:`~mechicl.inputs.tasks.BUILTIN_TASKS`. :func:`calibration_text` gives held-out running
text (BoolQ's Wikipedia passages, used by no task of the curves) for activation-aware pruning.

Axis names: ``example choice``.
"""

import dataclasses

import numpy as np

from mechicl.inputs.tasks import UNRELATED_LABELS, Example, Task, load_task, register_task

__all__ = [
    "CLOSED_BOOK_TASKS",
    "IN_CONTEXT_TASKS",
    "REPEAT_LENGTH",
    "VARIANT_TASKS",
    "calibration_text",
    "capital_in_context",
    "repeated_words",
    "sentiment_unrelated",
]

REPEAT_LENGTH = 8
"""Distinct words per ``repeated_words`` sequence."""

_N_REPEATED = 300
_REPEAT_SALT = 0x11D  # separates the word draws from other streams seeded by an example index


def capital_in_context() -> Task:
    """The true capital stated in the context, then asked for (gold: the true capital, against
    the counterfactual capital of ``counterfactual_capital``).

    >>> task = capital_in_context()
    >>> task.render(task.examples[0]), task.examples[0].answer
    ('The capital of Afghanistan is Kabul. Q: What is the capital of Afghanistan? A:', 'Kabul')
    """
    base = load_task("counterfactual_capital")
    examples = []
    for ex in base.examples:
        true = str(ex.meta["memorised_answer"])
        fields = dict(ex.fields, context_capital=true)
        examples.append(Example(id=ex.id.replace("counterfactual_capital", "capital_in_context"),
                                input=fields, choices=ex.choices, gold=ex.choices.index(true),
                                meta=dict(ex.meta)))
    return dataclasses.replace(
        base, name="capital_in_context", examples=tuple(examples),
        description="The true capital stated in the context, then asked for (derived from "
                    "counterfactual_capital: gold is the true capital, the distractor its "
                    "counterfactual one)")


def sentiment_unrelated() -> Task:
    """``sentiment`` with unrelated labels (negative -> foo, positive -> bar) and a neutral cue.

    >>> task = sentiment_unrelated()
    >>> task.labels, task.template
    (('foo', 'bar'), 'Review: {input}\\nLabel:')
    """
    base = load_task("sentiment")
    labels = base.labels
    assert labels is not None
    relabel = dict(zip(labels, UNRELATED_LABELS, strict=False))
    examples = tuple(dataclasses.replace(
        ex, id=ex.id.replace("sentiment", "sentiment_unrelated"),
        choices=tuple(relabel[c] for c in ex.choices),
        meta={**ex.meta, "original_answer": ex.answer}) for ex in base.examples)
    return dataclasses.replace(
        base, name="sentiment_unrelated", examples=examples,
        template=base.template.replace("Sentiment:", "Label:"),
        description="Label mapping with unrelated labels (Wei et al. 2023): sentiment with "
                    f"{list(labels)} shown as {list(relabel.values())}; learnt in context")


def _word_pool() -> list[str]:
    words = sorted({ex.fields["input"] for ex in load_task("antonyms").examples})
    return [w for w in words if w.isalpha()]


def repeated_words() -> Task:
    """Copy the next word of a repeated sequence of 8 distinct words.

    Example ``i`` draws its words, the repeat's length ``m`` and the distractors with
    ``numpy.random.default_rng([i, 0x11D])``; the gold position is ``i % 4``.

    >>> task = repeated_words()
    >>> ex = task.examples[0]
    >>> words = ex.fields["input"].split()
    >>> len(words) > 8, words[len(words) - 8] == ex.answer, len(task)
    (True, True, 300)
    """
    pool = _word_pool()
    base = load_task("antonyms")
    examples = []
    for i in range(_N_REPEATED):
        rng = np.random.default_rng([i, _REPEAT_SALT])
        words = [pool[j] for j in rng.choice(len(pool), size=REPEAT_LENGTH, replace=False)]
        m = int(rng.integers(1, REPEAT_LENGTH))
        gold_word = words[m]
        others = [w for w in words if w != gold_word]
        distractors = [others[j] for j in rng.choice(len(others), size=3, replace=False)]
        gold = i % 4
        choices = distractors[:gold] + [gold_word] + distractors[gold:]
        examples.append(Example(id=f"repeated_words-{i}", input=" ".join(words + words[:m]),
                                choices=tuple(choices), gold=gold,
                                meta={"repeat_shown": m, "sequence": " ".join(words)}))
    return Task(name="repeated_words", examples=tuple(examples), template="{input}",
                source=f"words of the antonyms task ({base.source})", licence=base.licence,
                split="derived",
                description="Copy the next word of a repeated sequence of 8 distinct words "
                            "(in-context copying; distractors are other words of the sequence)")


VARIANT_TASKS: tuple[str, ...] = ("capital_in_context", "sentiment_unrelated", "repeated_words")
"""The names of the derived tasks registered here (not in ``BUILTIN_TASKS``)."""

CLOSED_BOOK_TASKS: tuple[str, ...] = ("country_capital", "country_currency")
"""Closed-book fact recall, run at 0 shots."""

IN_CONTEXT_TASKS: tuple[str, ...] = ("capital_in_context", "counterfactual_capital",
                                     "sentiment_unrelated", "repeated_words")
"""In-context information processing: the answer is in the prompt."""

for _name, _loader in (("capital_in_context", capital_in_context),
                       ("sentiment_unrelated", sentiment_unrelated),
                       ("repeated_words", repeated_words)):
    register_task(_name, _loader)


def calibration_text(n_passages: int | None = None) -> list[str]:
    """Held-out running text for activation-aware pruning: the passages of the ``boolq`` task
    (English Wikipedia, CC BY-SA 3.0; see PROVENANCE.md) in file order, without questions or
    answers. No task of the sparsity curves reads them.

    Args:
        n_passages: the first ``n_passages`` (default all 300).

    >>> text = calibration_text(3)
    >>> len(text), all(len(t) > 100 for t in text)
    (3, True)
    """
    passages = [ex.fields["passage"] for ex in load_task("boolq").examples]
    if n_passages is not None:
        if n_passages < 1:
            raise ValueError(f"n_passages={n_passages} must be >= 1")
        passages = passages[:n_passages]
    return passages
