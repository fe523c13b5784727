"""lm-evaluation-harness conventions: its result files for mechicl evaluations, and an ``LM``
adapter that runs lm-eval tasks on a masked, pruned or patched :class:`~mechicl.HookedModel`.

**Result files.** :func:`lm_eval_results` gives the layout of lm-eval's ``results_*.json``
(``results`` -> task -> ``"acc,none"``, ``"acc_stderr,none"``, ``"acc_norm,none"``,
``"acc_norm_stderr,none"``; ``n-shot``, ``n-samples``, ``configs``, ``versions``,
``higher_is_better``, ``config`` with the model and package versions) for
:class:`~mechicl.analyses.evaluation.EvalResult` objects, and :func:`lm_eval_samples` the lines
of its ``--log_samples`` JSONL (one per prompt). The metrics are lm-eval's multiple-choice ones,
recomputed from the stored per-choice log-likelihoods whatever rule ranked the choices in
mechicl (:attr:`~mechicl.analyses.evaluation.EvalResult.normalization`):

* ``acc``: 1 if the choice with the highest summed log-likelihood is the gold one;
* ``acc_norm``: the same after dividing each log-likelihood by the answer's number of
  characters, ``len(choice)`` without the space before it (mechicl's ``"chars"`` rule);
* ``*_stderr``: lm-eval's ``mean_stderr``, the sample standard deviation (``n - 1`` in the
  denominator) over ``sqrt(n)``, i.e. ``sqrt(p (1 - p) / (n - 1))`` for an accuracy ``p`` of
  ``n`` prompts; ``"N/A"`` for one prompt, as lm-eval writes it (:func:`mean_stderr`).

Ties go to the first choice (``numpy.argmax``), as in lm-eval.

**The adapter.** :func:`lm_eval_model` wraps a model (with a :class:`~mechicl.Mask` and any
forward hooks) as an ``lm_eval.api.model.LM``: ``loglikelihood``, ``loglikelihood_rolling`` and
greedy ``generate_until``, each forward pass run with the mask's and the given hooks. The
scoring itself is :class:`HookedScorer`, which needs no lm-eval. It tokenises as mechicl's
evaluation does (:func:`~mechicl.analyses.evaluation.encode_prompt`): BOS first, trailing
whitespace of the context moved to the continuation, context and continuation tokenised
separately, so its log-likelihoods equal :func:`mechicl.evaluate`'s on the same prompts.
lm-evaluation-harness is imported only when :func:`lm_eval_model` is called
(``pip install mechicl[lm-eval]``).

Axis names: ``batch pos d_vocab``.
"""

import functools
import hashlib
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechicl._batching import device_batch_tokens, length_batches, pad_right
from mechicl.analyses.evaluation import EvalResult
from mechicl.inputs.tasks import Prompt
from mechicl.model.hooked import HookedModel, as_hooked_model
from mechicl.model.masks import Mask

__all__ = ["FILTER", "METRICS", "HookedScorer", "lm_eval_model", "lm_eval_results",
           "lm_eval_samples", "mean_stderr", "sample_metrics"]

FILTER = "none"
"""lm-eval's filter name for unfiltered responses: the part after the comma in ``"acc,none"``."""

METRICS: tuple[str, ...] = ("acc", "acc_norm")
"""The per-sample metrics written, as lm-eval's ``multiple_choice`` tasks compute them."""

Hook = tuple[str, Callable[..., Any]]


# --------------------------------------------------------------------------------------------
# lm-eval's result layout for EvalResults
# --------------------------------------------------------------------------------------------


def mean_stderr(values: Sequence[float]) -> float | None:
    """lm-eval's standard error of a mean (``lm_eval.api.metrics.mean_stderr``): the sample
    standard deviation, with ``n - 1`` in the denominator, over ``sqrt(n)``; None for fewer
    than two values (lm-eval writes ``"N/A"``).

    >>> round(mean_stderr([1.0, 0.0, 1.0, 1.0]), 6)   # sqrt(0.75 * 0.25 / 3)
    0.25
    >>> mean_stderr([1.0]) is None
    True
    """
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def _argmax(scores: np.ndarray) -> int:
    return int(np.argmax(scores))  # ties: the first, as lm-eval's numpy.argmax


def sample_metrics(result: EvalResult) -> list[dict[str, float]]:
    """lm-eval's ``acc`` and ``acc_norm`` of each prompt of ``result`` (1.0 or 0.0), from its
    per-choice log-likelihoods and answer lengths in characters.

    Raises:
        ValueError: the result has no character counts (written before mechicl recorded them).

    >>> import pandas as pd
    >>> preds = pd.DataFrame({"gold": [1], "loglik": [[-3.0, -4.0]], "n_chars": [[2, 10]]})
    >>> result = EvalResult(task="t", shots=0, accuracy=0.0, ci_low=0.0, ci_high=1.0, n=1,
    ...                     chance=0.5, predictions=preds)
    >>> sample_metrics(result)
    [{'acc': 0.0, 'acc_norm': 1.0}]
    """
    preds = result.predictions
    if "n_chars" not in preds:
        raise ValueError(f"the {result.task} {result.shots}-shot result has no character counts "
                         "(written before mechicl recorded them): recompute it for acc_norm")
    out = []
    for gold, loglik, n_chars in zip(preds["gold"], preds["loglik"], preds["n_chars"],
                                     strict=True):
        ll = np.asarray(list(loglik), dtype=np.float64)
        norm = ll / np.asarray(list(n_chars), dtype=np.float64)  # lm-eval: lls / len(choice)
        out.append({"acc": 1.0 if _argmax(ll) == int(gold) else 0.0,
                    "acc_norm": 1.0 if _argmax(norm) == int(gold) else 0.0})
    return out


def _hash(text: str) -> str:  # lm_eval.utils.hash_string
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def lm_eval_samples(result: EvalResult, prompts: Sequence[Prompt]) -> list[dict[str, Any]]:
    """One record per prompt of ``result``, in the layout of lm-eval's ``--log_samples`` JSONL
    (``doc_id``, ``doc``, ``target``, ``arguments``, ``resps``, ``filtered_resps``, ``filter``,
    ``metrics``, the three hashes, ``acc``, ``acc_norm``), plus mechicl's ``prompt``,
    ``loglikelihoods`` (floats, per choice), ``n_tokens`` and ``n_chars``.

    ``resps`` hold ``[str(loglikelihood), "None"]`` per choice, strings as lm-eval writes them:
    mechicl's scoring does not compute lm-eval's ``is_greedy``.

    Args:
        result: the evaluation.
        prompts: the prompts it scored, in its order (e.g. rebuilt with
            :func:`~mechicl.analyses.evaluation.task_prompts`).

    Raises:
        ValueError: the prompts are not those of the result (ids or number of choices differ).
    """
    preds = result.predictions
    ids = [str(i) for i in preds["id"]]
    if [p.id for p in prompts] != ids:
        raise ValueError(f"the prompts ({len(prompts)}, first ids {[p.id for p in prompts][:3]}) "
                         f"are not those of the {result.task} {result.shots}-shot result "
                         f"({len(ids)}, first ids {ids[:3]})")
    metrics = sample_metrics(result)
    records = []
    for doc_id, (prompt, row, m) in enumerate(zip(prompts, preds.itertuples(index=False),
                                                  metrics, strict=True)):
        loglik = [float(x) for x in row.loglik]
        if len(loglik) != len(prompt.continuations):
            raise ValueError(f"prompt {prompt.id!r} has {len(prompt.continuations)} choices, "
                             f"the result {len(loglik)} log-likelihoods")
        doc = {"id": prompt.id, "choices": [c.lstrip() for c in prompt.continuations],
               "gold": int(row.gold), "demo_ids": list(prompt.demo_ids)}
        target = str(int(row.gold))
        records.append({
            "doc_id": doc_id, "doc": doc, "target": target,
            "arguments": {f"gen_args_{i}": {"arg_0": prompt.text, "arg_1": cont}
                          for i, cont in enumerate(prompt.continuations)},
            "resps": [[[str(ll), "None"]] for ll in loglik],
            "filtered_resps": [[str(ll), "None"] for ll in loglik],
            "filter": FILTER, "metrics": list(METRICS),
            "doc_hash": _hash(json.dumps(doc, indent=2, ensure_ascii=False)),
            "prompt_hash": _hash(prompt.text), "target_hash": _hash(target),
            **m, "prompt": prompt.text, "loglikelihoods": loglik,
            "n_tokens": [int(x) for x in row.n_tokens], "n_chars": [int(x) for x in row.n_chars],
        })
    return records


def lm_eval_results(results: Sequence[EvalResult], *, model: str,
                    pool_sizes: Mapping[str, int] | None = None) -> dict[str, Any]:
    """lm-eval's results layout for evaluations of one model at one shot count per task.

    Args:
        results: the evaluations (each task at most once).
        model: the model's name (``config.model``).
        pool_sizes: each task's number of evaluation examples (``n-samples.original``;
            default: the number evaluated).

    Returns:
        ``{"results": {task: {"alias", "name", "sample_len", "acc,none", "acc_stderr,none",
        "acc_norm,none", "acc_norm_stderr,none"}}, "group_subtasks", "configs", "versions",
        "n-shot", "higher_is_better", "n-samples", "config", "mechicl_version",
        "transformers_version"}``; a stderr of one prompt is ``"N/A"``.

    Raises:
        ValueError: no results, a task given twice, or results of different models.
    """
    if not results:
        raise ValueError("no results to write in lm-eval's layout")
    tasks = [r.task for r in results]
    repeated = sorted({t for t in tasks if tasks.count(t) > 1})
    if repeated:
        raise ValueError(f"tasks {repeated} are given more than once: lm-eval's layout holds one "
                         "shot count per task (write one file per shot count)")
    weights = {r.model.get("weights_sha256") for r in results}
    if len(weights) > 1:
        raise ValueError(f"the results are of {len(weights)} different models (weights "
                         f"{sorted(map(str, weights))}): lm-eval's layout holds one model")
    table: dict[str, Any] = {}
    configs: dict[str, Any] = {}
    for r in sorted(results, key=lambda r: r.task):
        metrics = sample_metrics(r)
        entry: dict[str, Any] = {"name": r.task, "alias": r.task, "sample_len": len(metrics)}
        for metric in METRICS:
            values = [m[metric] for m in metrics]
            stderr = mean_stderr(values)
            entry[f"{metric},{FILTER}"] = sum(values) / len(values)
            entry[f"{metric}_stderr,{FILTER}"] = "N/A" if stderr is None else stderr
        table[r.task] = entry
        params = {k: v for k, v in r.params.items() if k != "prompt_ids"}
        configs[r.task] = {
            "task": r.task, "output_type": "multiple_choice", "num_fewshot": r.shots,
            "doc_to_text": params.get("template"), "fewshot_delimiter": params.get("separator"),
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                            for m in METRICS],
            "metadata": {"mechicl": params, "mechicl_normalization": r.normalization,
                         "mechicl_accuracy": r.accuracy},
        }
    info = dict(results[0].model)
    versions = dict(info.get("versions") or {})
    return {
        "results": table,
        "group_subtasks": {},
        "configs": configs,
        "versions": {t: None for t in sorted(table)},
        "n-shot": {r.task: r.shots for r in sorted(results, key=lambda r: r.task)},
        "higher_is_better": {t: dict.fromkeys(METRICS, True) for t in sorted(table)},
        "n-samples": {t: {"original": int((pool_sizes or {}).get(t, e["sample_len"])),
                          "effective": e["sample_len"]} for t, e in table.items()},
        "config": {"model": model, "model_args": None, "model_sha": info.get("weights_sha256"),
                   "model_dtype": info.get("dtype"), "batch_size": None, "limit": None,
                   "model_info": info, "versions": versions},
        "mechicl_version": versions.get("mechicl"),
        "transformers_version": versions.get("transformers"),
    }


# --------------------------------------------------------------------------------------------
# Scoring with hooks (no lm-eval needed)
# --------------------------------------------------------------------------------------------


class HookedScorer:
    """What an lm-eval ``LM`` computes, on a :class:`~mechicl.HookedModel`, every forward pass
    under ``mask`` and ``fwd_hooks``; plain strings in, numbers and strings out.

    Args:
        model: a :class:`~mechicl.HookedModel` or bridge.
        mask: a head / FFN mask applied to every forward pass.
        fwd_hooks: further ``(hook name, function)`` forward hooks (e.g. patching hooks), run
            after the mask's; they see right-padded batches of any size.
        batch_tokens: rows x longest row per forward pass.
        max_gen_toks: default number of new tokens for :meth:`generate_until`.
        max_length: the longest token row of a pass (default: the model's context, ``n_ctx``);
            longer inputs are cut on the left, texts are scored in windows of this length.
        progress: show progress bars.

    >>> scorer = HookedScorer(model, mask=Mask.remove(model, heads=[(0, 1)]))
    >>> (ll, greedy), = scorer.loglikelihood([("w1 w2", " w3 w4")])
    >>> ll < 0, type(greedy)
    (True, <class 'bool'>)
    """

    def __init__(self, model: HookedModel, *, mask: Mask | None = None,
                 fwd_hooks: Sequence[Hook] = (), batch_tokens: int = 4096,
                 max_gen_toks: int = 256, max_length: int | None = None,
                 progress: bool = False) -> None:
        self.model = as_hooked_model(model)
        if mask is not None and not isinstance(mask, Mask):
            raise TypeError(f"mask must be a mechicl Mask or None, got {type(mask).__name__}")
        n_ctx = int(self.model.n_ctx)
        for name, value, low in (("batch_tokens", batch_tokens, 1),
                                 ("max_gen_toks", max_gen_toks, 1),
                                 ("max_length", n_ctx if max_length is None else max_length, 2)):
            if value < low:
                raise ValueError(f"{name}={value} is not allowed: give an integer >= {low}")
        if max_length is not None and max_length > n_ctx:
            raise ValueError(f"max_length={max_length} is longer than the model's context of "
                             f"{n_ctx}: give at most {n_ctx}")
        self.max_length = n_ctx if max_length is None else max_length
        self.mask = mask
        self.fwd_hooks = list(fwd_hooks)
        self.batch_tokens = batch_tokens
        self.max_gen_toks = max_gen_toks
        self.progress = progress

    # ---- forward passes ---------------------------------------------------------------------

    def hooks(self) -> list[Hook]:
        """Every forward hook a pass runs with: the mask's, then ``fwd_hooks``."""
        masked = [] if self.mask is None or self.mask.is_identity else self.mask.hooks(self.model)
        return [*masked, *self.fwd_hooks]

    def logits(self, tokens: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"]
               ) -> Float[Tensor, "batch pos d_vocab"]:
        """Logits of a right-padded batch under the mask and hooks."""
        tokens = tokens.to(self.model.device)
        attention_mask = attention_mask.to(self.model.device)
        hooks = self.hooks()
        with torch.no_grad():
            if not hooks:
                return self.model(tokens, attention_mask=attention_mask, return_type="logits")
            return self.model.run_with_hooks(tokens, attention_mask=attention_mask,
                                             fwd_hooks=hooks, return_type="logits")

    def _batches(self, rows: Sequence[Sequence[int]], desc: str
                 ) -> Iterator[tuple[list[int], Tensor]]:
        """``(row indices, logits [batch, pos, vocab])`` over length-sorted right-padded batches."""
        budget = device_batch_tokens(self.model.device, self.batch_tokens)
        batches = length_batches([len(r) for r in rows], budget)
        for batch in tqdm(batches, desc=desc, disable=not self.progress, unit="pass"):
            tokens, lengths = pad_right([list(rows[i]) for i in batch], self.model.pad_token_id)
            attn = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).long()
            yield batch, self.logits(tokens, attn)

    # ---- the three lm-eval requests ---------------------------------------------------------

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of a context (BOS first) and a continuation, as mechicl's evaluation
        tokenises them: the context's trailing whitespace moves to the continuation."""
        stripped = context.rstrip()
        continuation = context[len(stripped):] + continuation
        tokenizer = self.model.tokenizer
        return (self.model.encode(stripped, prepend_bos=True),
                list(tokenizer(continuation, add_special_tokens=False)["input_ids"]))

    def score_tokens(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]
                     ) -> list[tuple[float, bool]]:
        """``(log-likelihood, is_greedy)`` of each continuation's tokens after its context's
        tokens (at least one context token). A row longer than :attr:`max_length` keeps its
        last tokens (the context is cut on the left, as lm-eval does)."""
        n_ctx = self.max_length
        rows, starts, out = [], [], [(0.0, True)] * len(pairs)
        todo = [i for i, (_, cont) in enumerate(pairs) if cont]  # empty: log 1, greedy
        for i in todo:
            context, cont = list(pairs[i][0]), list(pairs[i][1])
            if not context:
                raise ValueError("a continuation needs at least one context token (e.g. BOS)")
            if len(cont) > n_ctx:
                raise ValueError(f"a continuation of {len(cont)} tokens does not fit the "
                                 f"model's context of {n_ctx}")
            row = (context + cont)[:-1][-n_ctx:]  # the inputs; position j predicts token j + 1
            rows.append(row)
            starts.append(len(row) - len(cont))
        for batch, logits in self._batches(rows, "loglikelihood"):
            for b, r in enumerate(batch):
                i = todo[r]
                cont = torch.tensor(list(pairs[i][1]), device=logits.device)
                # log-probabilities in float64 at the continuation's positions only, not over
                # the whole batch (two float64 copies of every position's logits)
                span = torch.log_softmax(
                    logits[b, starts[r]: starts[r] + len(cont)].double(), dim=-1)  # [cont, vocab]
                ll = float(span.gather(-1, cont[:, None]).sum())
                out[i] = (ll, bool((span.argmax(-1) == cont).all()))
        return out

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """lm-eval's ``loglikelihood``: ``(log p(continuation | context), is_greedy)`` per
        ``(context, continuation)``; an empty context is BOS alone."""
        return self.score_tokens([self.encode_pair(c, x) for c, x in requests])

    def loglikelihood_rolling(self, requests: Sequence[str]) -> list[float]:
        """lm-eval's ``loglikelihood_rolling``: the log-likelihood of each whole text after BOS,
        every token predicted once, in windows of :attr:`max_length` tokens (lm-eval's
        ``get_rolling_token_windows`` with ``context_len=1``: each later window conditioned on
        the tokens before its predictions, up to the window's length)."""
        n_ctx = self.max_length
        pairs: list[tuple[list[int], list[int]]] = []
        owners: list[int] = []
        for i, text in enumerate(requests):
            tokens = list(self.model.tokenizer(text, add_special_tokens=False)["input_ids"])
            for context, predicted in rolling_windows(tokens, self.model.bos_token_id, n_ctx):
                pairs.append((context, predicted))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (ll, _) in zip(owners, self.score_tokens(pairs), strict=True):
            totals[owner] += ll
        return totals

    def generate_until(self, requests: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
        """lm-eval's ``generate_until``, greedy: new tokens (every step a full forward pass of
        the text so far, so any hook sees whole sequences) until a stop string of ``until``,
        the tokenizer's EOS token or ``max_gen_toks`` new tokens; the text before the first
        stop string.

        Raises:
            ValueError: sampling was asked for (``do_sample=True`` or a temperature above 0).
        """
        eos = self.model.tokenizer.eos_token_id
        out: list[str] = []
        for context, kwargs in tqdm(requests, desc="generate_until", disable=not self.progress):
            kwargs = dict(kwargs or {})
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0:
                raise ValueError(f"generation options {kwargs} ask for sampling; this adapter "
                                 "decodes greedily only (do_sample=False, temperature=0)")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = self.model.encode(context, prepend_bos=True)
            new: list[int] = []
            text = ""
            for _ in range(max_new):
                row = (ids + new)[-self.max_length:]
                tokens = torch.tensor([row])
                token = int(self.logits(tokens, torch.ones_like(tokens))[0, -1].argmax())
                if eos is not None and token == eos:
                    break
                new.append(token)
                text = self.model.tokenizer.decode(new)
                if any(stop in text for stop in until if stop):
                    break
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            out.append(text)
        return out


def rolling_windows(tokens: Sequence[int], prefix: int, max_len: int
                    ) -> list[tuple[list[int], list[int]]]:
    """``(context, predicted)`` token windows that predict every token once, each pass at most
    ``max_len`` tokens: lm-eval's ``get_rolling_token_windows(tokens, prefix, max_len,
    context_len=1)`` made disjoint (``make_disjoint_window``).

    >>> rolling_windows([5, 6, 7, 8, 9], 1, 3)
    [([1], [5, 6, 7]), ([6, 7], [8, 9])]
    """
    tokens = list(tokens)
    if not tokens:
        return []
    out = []
    first = min(max_len, len(tokens))
    out.append(([prefix], tokens[:first]))  # inputs: prefix + tokens[:first - 1]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        end = done + n
        inputs = tokens[end - max_len - 1: end - 1]  # end > max_len: never a negative start
        out.append((inputs[: len(inputs) - (n - 1)], tokens[done:end]))
        done = end
    return out


# --------------------------------------------------------------------------------------------
# The lm-eval LM (needs lm-evaluation-harness)
# --------------------------------------------------------------------------------------------


@functools.cache
def _lm_class() -> type:
    try:
        from lm_eval.api.model import LM
    except ImportError as err:
        raise ImportError(f"lm-evaluation-harness is not installed ({err}); install it with "
                          "`pip install mechicl[lm-eval]`") from None

    class MechiclLM(LM):  # type: ignore[misc, valid-type]
        """An lm-eval ``LM`` scoring with a :class:`HookedScorer`."""

        def __init__(self, scorer: HookedScorer) -> None:
            super().__init__()
            self.scorer = scorer
            self.tokenizer = scorer.model.tokenizer
            self.max_length = scorer.max_length

        @property
        def tokenizer_name(self) -> str:
            return str(getattr(self.tokenizer, "name_or_path", self.scorer.model.name))

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False
                          ) -> list[tuple[float, bool]]:
            return self.scorer.loglikelihood([tuple(r.args) for r in requests])

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False
                                  ) -> list[float]:
            return self.scorer.loglikelihood_rolling([r.args[0] for r in requests])

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            return self.scorer.generate_until([tuple(r.args) for r in requests])

        def get_model_info(self) -> dict[str, Any]:
            info = self.scorer.model.info()
            return {"model_sha": info["weights_sha256"], "model_dtype": info["dtype"],
                    "mechicl_mask": None if self.scorer.mask is None
                    else self.scorer.mask.to_dict()}

    return MechiclLM


def lm_eval_model(model: HookedModel, *, mask: Mask | None = None,
                  fwd_hooks: Sequence[Hook] = (), batch_tokens: int = 4096,
                  max_gen_toks: int = 256, max_length: int | None = None,
                  progress: bool = False) -> Any:
    """An lm-evaluation-harness ``LM`` (pass it as ``lm_eval.simple_evaluate(model=...)``)
    that runs ``model`` under ``mask`` and ``fwd_hooks`` (arguments as :class:`HookedScorer`).

    Raises:
        ImportError: lm-evaluation-harness is not installed (``pip install mechicl[lm-eval]``).
    """
    scorer = HookedScorer(model, mask=mask, fwd_hooks=fwd_hooks, batch_tokens=batch_tokens,
                          max_gen_toks=max_gen_toks, max_length=max_length, progress=progress)
    return _lm_class()(scorer)
