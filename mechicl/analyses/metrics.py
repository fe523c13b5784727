"""Patching metrics: what a patched run is scored by; and the next-token cross-entropy the
analyses share.

A metric turns the logits of a run into one number per prompt pair. The built-in metrics read
the next-token logits at each pair's answer position (the last real token) and compare the
correct answer token with the competing ("wrong") one:

* ``"logit_diff"``: ``logit[answer] - logit[wrong]`` (Wang et al. 2022's IOI metric);
* ``"logprob"`` / ``"prob"``: log-probability / probability of the answer token;
* ``"loss"``: cross-entropy of the answer token (``-logprob``);
* ``"logit_diff_normalized"``: the logit difference, reported normalised so that the unpatched
  clean run scores 1 and the unpatched corrupted run 0 (Wang et al. 2022; Conmy et al. 2023):
  ``(mean patched - mean corrupted) / (mean clean - mean corrupted)``, means over pairs.
  Any metric can be normalised the same way with ``normalize=True``.

A user metric is any callable ``logits [pair, pos, vocab] -> scalar or [pair]``, as in
TransformerLens's ``patching`` module (e.g. a mean logit difference over the batch). mechicl
evaluates it for many patched copies at once with :func:`torch.vmap` (falling back to a
loop, with a log message, for callables vmap cannot trace).

Scores over the whole vocabulary (the later-copy loss of the causal check, the scan's
per-position loss, choice scoring) take their ``logsumexp`` with :func:`logsumexp_slices`: in
float32 (float64 for float64 logits), over slices of at most :data:`LOGSUMEXP_ELEMENTS`
logits, so that its temporaries (a float32 copy of the slice in half dtypes, and the shifted
exponentials) stay that small however many positions a pass unembeds;
``mechicl.experiments.memory`` counts one slice of them. (The per-choice reference rows of
choice scoring, the masked answer losses and gradient importance's loss pick their few scored
positions first and take the ``logsumexp`` of those alone: in float64, or in the model's
dtype under autograd.)

Axis names: ``copy pair pos d_vocab``.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechicl._checks import check_choice

logger = logging.getLogger(__name__)

__all__ = ["LOGSUMEXP_ELEMENTS", "METRICS", "MetricFn", "MetricName", "answer_metric",
           "logsumexp_slices", "next_token_nll", "resolve_metric"]

MetricName = Literal["logit_diff", "logit_diff_normalized", "logprob", "prob", "loss"]
METRICS: tuple[str, ...] = ("logit_diff", "logit_diff_normalized", "logprob", "prob", "loss")
MetricFn = Callable[[Float[Tensor, "pair pos d_vocab"]], Tensor]


def answer_metric(
    name: str, logits: Float[Tensor, "*copy pair d_vocab"], answer: Int[Tensor, " pair"],
    wrong: Int[Tensor, " pair"],
) -> Float[Tensor, "*copy pair"]:
    """A built-in metric from the answer-position logits of every pair (any leading axes).

    >>> logits = torch.tensor([[0.0, 2.0, 1.0]])
    >>> answer_metric("logit_diff", logits, torch.tensor([1]), torch.tensor([2]))
    tensor([1.])
    """
    check_choice("metric", name, METRICS)
    logits = logits.float()
    lead = logits.shape[:-1]
    a = answer.to(logits.device).expand(lead)[..., None]
    if name in ("logit_diff", "logit_diff_normalized"):
        w = wrong.to(logits.device).expand(lead)[..., None]
        return (logits.gather(-1, a) - logits.gather(-1, w))[..., 0]
    logprob = torch.log_softmax(logits, dim=-1).gather(-1, a)[..., 0]
    if name == "logprob":
        return logprob
    if name == "prob":
        return logprob.exp()
    return -logprob  # loss


LOGSUMEXP_ELEMENTS = 1 << 20
"""Logits per slice of :func:`logsumexp_slices` (4 MiB of float32)."""


def logsumexp_slices(logits: Float[Tensor, "*lead d_vocab"],
                     max_elements: int | None = None) -> Float[Tensor, "*lead"]:
    """``logsumexp`` over the vocabulary in float32 (float64 logits: in float64), a slice of
    at most ``max_elements`` logits (default :data:`LOGSUMEXP_ELEMENTS`) at a time along the
    leading axes: no copy of the whole logits is made (``logits`` may be a strided view). The
    values are those of one ``torch.logsumexp`` over the logits in that dtype (bit for bit
    when a slice holds two positions or more; a single position may be summed in another
    order, ~1 ulp).

    >>> logits = torch.randn(3, 5, 7)
    >>> torch.equal(logsumexp_slices(logits, max_elements=14), torch.logsumexp(logits, -1))
    True
    """
    limit = LOGSUMEXP_ELEMENTS if max_elements is None else max_elements
    dtype = _at_least_float32(logits.dtype)
    if logits.numel() <= limit or logits.ndim < 2:
        return torch.logsumexp(logits.to(dtype), -1)
    row = logits[0].numel()
    if row <= limit or logits.ndim == 2:  # whole rows per slice (at least one)
        return torch.cat([torch.logsumexp(part.to(dtype), -1)
                          for part in logits.split(max(1, limit // row))])
    return torch.stack([logsumexp_slices(x, limit) for x in logits])  # a row is too big


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """float32 for half dtypes, else the dtype itself (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def next_token_nll(logits: Float[Tensor, "*lead d_vocab"],
                   targets: Int[Tensor, "*lead"]) -> Float[Tensor, "*lead"]:
    """Cross-entropy of each target token, ``logsumexp(logits) - logits[target]``, in float32
    (float64 logits: in float64), without log-probabilities over the vocabulary
    (:func:`logsumexp_slices`).

    >>> logits = torch.randn(2, 4, 9)
    >>> targets = torch.randint(9, (2, 4))
    >>> reference = -torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    >>> bool(torch.allclose(next_token_nll(logits, targets), reference, atol=1e-6))
    True
    """
    picked = logits.gather(-1, targets.to(logits.device)[..., None])[..., 0]
    return logsumexp_slices(logits) - picked.to(_at_least_float32(logits.dtype))


@dataclass(frozen=True)
class Metric:
    """A resolved metric.

    Attributes:
        name: the built-in name, or the callable's name.
        fn: the user callable (None for built-ins).
        normalize: report ``(patched - corrupted) / (clean - corrupted)``.
    """

    name: str
    fn: MetricFn | None
    normalize: bool

    @property
    def builtin(self) -> bool:
        return self.fn is None

    def on_answer_logits(self, logits: Float[Tensor, "*copy pair d_vocab"],
                         answer: Int[Tensor, " pair"],
                         wrong: Int[Tensor, " pair"]) -> Float[Tensor, "*copy pair"]:
        return answer_metric(self.name, logits, answer, wrong)

    def on_logits(self, logits: Float[Tensor, "copy pair pos d_vocab"]) -> Tensor:
        """The user callable on each copy's logits: ``[copy]`` or ``[copy, pair]``."""
        assert self.fn is not None
        fn = self.fn
        try:
            out = torch.vmap(lambda x: torch.as_tensor(fn(x)))(logits)
        except Exception as err:  # noqa: BLE001 - vmap cannot trace every callable
            logger.info("metric %s cannot be vmapped (%s: %s); evaluating copy by copy",
                        self.name, type(err).__name__, err)
            out = torch.stack([torch.as_tensor(fn(x)) for x in logits])
        n_pairs = logits.shape[1]
        if out.ndim == 2 and out.shape[1] != n_pairs:
            raise ValueError(f"metric {self.name!r} returned {out.shape[1]} values for "
                             f"{n_pairs} pairs; it must return a scalar or one value per pair")
        if out.ndim > 2:
            raise ValueError(f"metric {self.name!r} must return a scalar or [pair], got shape "
                             f"{tuple(out.shape[1:])}")
        return out.float()


def resolve_metric(metric: str | MetricFn, normalize: bool = False) -> Metric:
    """A :class:`Metric` from a built-in name or a callable."""
    if isinstance(metric, str):
        check_choice("metric", metric, METRICS)
        return Metric(metric, None, normalize or metric == "logit_diff_normalized")
    if not callable(metric):
        raise TypeError(f"metric must be one of {list(METRICS)} or a callable "
                        f"logits[pair, pos, vocab] -> scalar or [pair], got {metric!r}")
    return Metric(getattr(metric, "__name__", type(metric).__name__), metric, normalize)
