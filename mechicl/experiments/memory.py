"""Memory estimates for the analyses, and batch sizes chosen from a memory budget.

An analysis holds the weights plus, per forward pass, memory that grows with the batch: what
dominates is the logits (``batch x pos x d_vocab``), the attention scores and patterns
(``batch x head x query_pos x key_pos``), the activations autograd keeps for a backward pass, and
the key/value cache Hugging Face builds during every forward pass. :func:`estimate_memory`
models these from a model's shape (:class:`ModelShape`, or a loaded
:class:`~mechicl.model.HookedModel`), so that sizes can be tabulated without loading a model
(:func:`memory_table`, :data:`REFERENCE_SHAPES`); :func:`batch_tokens_for_budget` turns a budget
into the ``batch_tokens`` argument of the analyses (rows x longest row per forward pass, as
:func:`mechicl._batching.length_batches` packs them).

What is modelled, with ``s`` the bytes of one element of the model's dtype (4 for float32, 2 for
bfloat16 / float16), ``N = rows * seq_len`` tokens per pass and ``P = rows * n_heads *
seq_len**2`` attention entries per layer (read from what torch actually allocates and autograd
saves in the TransformerBridge's eager attention; checked against the measured peak resident
memory of SmolLM2-135M in ``benchmarks/bench_memory.py`` and docs/concepts/big-models.md):

* ``weights``: ``n_params * s``; for a loaded model whose linear layers run on packed weights
  (:mod:`mechicl.model.kernels`), plus the packed copies (as much again as the blocks' linear
  weights).
* ``kernel_state``: on packed weights only, the state oneDNN keeps for every width of product
  it has run (products are padded to multiples of ``BUCKET_ROWS`` = 64 rows), bounded by a
  float32 output buffer plus a fixed 2 MiB (:data:`KERNEL_STATE_PER_WIDTH`) per width and
  projection: the sum over the widths ``w = 64, 128, ...`` up to ``N`` of ``4 * w *
  ((n_heads + n_kv_heads) * d_head + 2 * d_model + d_mlp) + 5 * 2 MiB`` (the query, key/value,
  output, gate/up and down projections), ``N`` at most the largest pass a CPU runs (2048
  tokens: packing is for CPUs). It stays for the process, so a pass of ``N`` tokens may find
  all of it there. Fitted on SmolLM2's shapes (``benchmarks/probe_kernel_state.py``: 0.02-9.4
  MiB per new width and shape, 0.29-0.43 of this term at 256-2048 tokens; docs/benchmarks.md).
* ``kv_cache``: ``2 * n_layers * n_kv_heads * d_head * N * s``. The bridge runs the Hugging Face
  model with its default ``use_cache=True``, so every forward pass builds a key/value cache of
  all layers, held until the logits are computed.
* ``activations``: for the forward-only analyses (``"forward"``, ``"scan"``, ``"choices"``), the
  working set of one layer: attention scores and pattern, ``P * 2s``, plus the float32 softmax
  output for half dtypes, ``P * 4``, and ``N * s * (3 * n_heads * d_head + k * d_mlp + 4 *
  d_model)`` for queries/keys/values (repeated to query heads), MLP intermediates (``k`` = 3 for
  a gated MLP, 2 otherwise) and the residual stream. Earlier layers' activations are freed:
  :func:`mechicl.analyses.induction.induction_scan` reduces each layer's pattern inside its hook, no
  pattern is kept. For ``"importance"`` (:func:`mechicl.analyses.importance.head_importance`'s gradient
  methods: a backward pass to head gates, parameters frozen), what autograd saves in every
  layer: the pattern (float32 from the softmax, plus its cast copy in half dtypes),
  queries/keys/values and the gated head outputs (``4 * n_heads * d_head``), the MLP's
  inputs to its nonlinearity and product (3 x ``d_mlp`` gated, 1 x otherwise), the inputs of
  the norms (float32 for RMSNorm), and q/k-norm inputs where the model has them.
* ``circuits`` (``"scan"`` only): the OV-circuit copying score
  (:func:`mechicl.analyses.induction.ov_eigen_copying_scores`, one of the scan's default scores),
  computed once from the weights, between passes. Kept throughout: the folded per-head W_V
  and W_O (``2 * H * s`` with ``H = n_layers * n_heads * d_model * d_head``) and the
  folded unembedding (``d_model * d_vocab * s``; LayerNorm models also keep a centred W_E,
  models that scale their embeddings a scaled one: Gemma). On
  top, the largest of its steps: folding one per-head tensor (``H * s``; LayerNorm models hold
  two more copies while centring), forming W_U W_E in float64 one vocabulary slice at a time
  (``2 * 8 * d_model * min(d_vocab, OV_VOCAB_SLICE)``, plus the ``d_model x d_model`` sum
  and one slice's product), and one layer's W_V, W_O and their
  product with W_U W_E in float64 (``3 * 8 * H / n_layers``). A scan without that score needs
  less: the term is an upper bound there.
* ``logits``: ``N * d_vocab * s``, plus the temporaries of a loss or score over the vocabulary
  (:func:`mechicl.analyses.metrics.logsumexp_slices`: in float32, one slice of at most
  ``E =`` :data:`~mechicl.analyses.metrics.LOGSUMEXP_ELEMENTS` logits at a time):
  ``min(N * d_vocab, E) * 4``, and as much again in half dtypes for the slice's float32 copy.
  The scan's per-position loss, the causal check's later-copy loss and choice scoring take
  their scores so; a pass whose logits feed no such score has the term to spare.
* ``gradients`` (``"importance"`` only): the gradient of the logits or, later in the backward,
  one layer's attention gradients (``P * 8``), whichever is larger; plus the head gates and
  their gradient. Gradient importance unembeds only the answer-predicting positions (a set
  shared by the batch's rows), so its ``logits`` are ``rows * rows * d_vocab * s`` (one such
  position per row, the usual single-token answer; longer answers add theirs).

Since shared-context scoring (issue 20), ``"choices"`` is one forward pass over packed rows
(a prompt's context, then every continuation's tokens but the last: ``seq_len`` is
:func:`mechicl.analyses.evaluation.longest_choice_row`) that unembeds only the positions whose
next token is scored; its ``logits`` term (``N * d_vocab * s``) is kept as an upper bound. Its
``activations`` add the block attention masks, ``rows * seq_len**2 * (2 + s)`` (a boolean mask
per layer type, at most two where sliding-window layers are mixed with full ones, and the
float copy a layer adds to its scores). Take it at the tokens a pass really holds
(:func:`mechicl._batching.device_batch_tokens`: on a CPU 512, 1024 for a pass of packed
choice rows without masks, or 2048 for a pass of masked copies): so taken, the report's
choice-scoring stages measured 0.32-0.63 x their estimate on SmolLM2-135M and 0.13-0.40 x on
Gemma-3-270M, and every stage of the report 0.32-1.03 x and 0.13-0.99 x
(``benchmarks/bench_stage_memory.py``;
``benchmarks/results/stage-memory-every-stage{,-gemma3-270m}.json``).

``total`` is the peak: ``weights + kv_cache + max(activations, logits)`` for a forward-only
pass (the layers' working sets are freed before the logits exist); for ``"scan"`` the larger
of that and ``weights + circuits`` (the OV score runs between passes); ``weights + kv_cache +
activations + logits + gradients`` for ``"importance"`` (all are alive when the backward
starts). Not modelled: the allocator's fragmentation and caching (on GPU, leave 10-20% of the
device and the CUDA context out of the budget), and the copying score's second pass, whose
working tensors are capped at ~8 MB each. GPT-2's tanh GELU, written in elementary ops,
keeps 4 x ``d_mlp`` per layer for the backward instead of 1, so ``"importance"`` is
underestimated for GPT-2 (by ~15%).

Axis names: ``batch pos head query_pos key_pos d_model d_mlp d_vocab``.
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import torch

from mechicl._batching import CPU_CHOICES_PASS_TOKENS, CPU_COPIES_PASS_TOKENS, CPU_PASS_TOKENS
from mechicl._checks import check_choice, check_positive
from mechicl.analyses import MEMORY_MODELS
from mechicl.analyses.induction import OV_VOCAB_SLICE
from mechicl.analyses.metrics import LOGSUMEXP_ELEMENTS
from mechicl.model.hooked import HookedModel, as_hooked_model
from mechicl.model.kernels import BUCKET_ROWS, packed_copies_bytes
from mechicl.model.loading import parse_bytes, resolve_dtype

__all__ = [
    "MEMORY_MODELS",
    "REFERENCE_SHAPES",
    "MemoryEstimate",
    "ModelShape",
    "batch_tokens_for_budget",
    "estimate_memory",
    "memory_table",
]

MemoryModel = Literal["forward", "scan", "importance", "choices"]
"""Memory models :func:`estimate_memory` knows: a plain forward pass with logits, the
induction scan, gradient head importance (forward + backward), choice scoring."""

GiB = 1 << 30

# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------

def _readable(n: int | float) -> str:
    """A readable size: GiB, or MiB / KiB for small ones."""
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size / 10:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """The shape of a decoder-only transformer: what its memory depends on.

    Attributes:
        n_layers, n_heads, d_head, d_model, d_mlp, d_vocab: the usual sizes.
        n_kv_heads: key/value heads (``n_heads`` without grouped-query attention).
        gated_mlp: a gated MLP (``down(act(gate(x)) * up(x))``: Llama, Gemma) rather than
            ``fc2(act(fc1(x)))`` (GPT-2, OPT, Pythia).
        layer_norm: LayerNorm (weight and bias) rather than RMSNorm (weight).
        biases: the linear layers have biases (GPT-2, OPT, Pythia).
        tied_embeddings: the unembedding is the embedding matrix.
        norms_per_layer: normalisations of width ``d_model`` per layer (2; Gemma 3 has 4).
        qk_norm: queries and keys are normalised per head (Gemma 3).
        n_positions: rows of a learned positional embedding (0 for rotary models; OPT keeps
            2 extra rows).
        scaled_embeddings: token embeddings are scaled as they enter the residual stream
            (Gemma: sqrt(d_model)), so the OV-circuit score reads a scaled copy of W_E.
        n_params: the exact parameter count when known; None: computed from the shape
            (:meth:`count_params`).
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    d_mlp: int
    d_vocab: int
    gated_mlp: bool = True
    layer_norm: bool = False
    biases: bool = False
    tied_embeddings: bool = True
    norms_per_layer: int = 2
    qk_norm: bool = False
    n_positions: int = 0
    n_params: int | None = None
    scaled_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("n_layers", "n_heads", "n_kv_heads", "d_head", "d_model", "d_mlp",
                     "d_vocab"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelShape.{name}={value!r}: need an integer >= 1")
        for name in ("norms_per_layer", "n_positions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"ModelShape.{name}={value!r}: need an integer >= 0")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelShape: n_heads={self.n_heads} is not a multiple of "
                             f"n_kv_heads={self.n_kv_heads}")
        if self.n_params is not None and (isinstance(self.n_params, bool)
                                          or not isinstance(self.n_params, int)
                                          or self.n_params < 1):
            raise ValueError(f"ModelShape.n_params={self.n_params!r}: need an integer >= 1 "
                             "or None")

    def count_params(self) -> int:
        """Parameters implied by the shape: embeddings, attention, MLP, norms (and biases).

        >>> REFERENCE_SHAPES["pythia-70m"].count_params()  # the published count
        70426624
        """
        d, heads, kv = self.d_model, self.n_heads * self.d_head, self.n_kv_heads * self.d_head
        norm = 2 * d if self.layer_norm else d
        attn = d * heads + 2 * d * kv + heads * d
        mlp = (3 if self.gated_mlp else 2) * d * self.d_mlp
        if self.biases:
            attn += heads + 2 * kv + d
            mlp += (2 if self.gated_mlp else 1) * self.d_mlp + d
        layer = attn + mlp + self.norms_per_layer * norm + (2 * self.d_head if self.qk_norm else 0)
        embed = self.d_vocab * d * (1 if self.tied_embeddings else 2) + self.n_positions * d
        return embed + self.n_layers * layer + norm

    @property
    def params(self) -> int:
        """``n_params`` if given, else :meth:`count_params`."""
        return self.n_params if self.n_params is not None else self.count_params()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelShape":
        return cls(**data)

    @classmethod
    def from_model(cls, model: HookedModel) -> "ModelShape":
        """The shape of a loaded model, with its exact parameter count (each tensor once)."""
        model = as_hooked_model(model)
        cfg = model.cfg
        unique = {id(p): p for p in model.bridge.original_model.parameters()}
        block: dict[int, tuple[str, torch.nn.Parameter]] = {}
        for name, param in model.bridge.blocks[0].named_parameters():
            block.setdefault(id(param), (name, param))  # the bridge aliases some tensors
        norm_weights = [p for n, p in block.values() if n.endswith("weight") and p.ndim == 1]
        return cls(
            n_layers=model.n_layers, n_heads=model.n_heads, n_kv_heads=model.n_kv_heads,
            d_head=model.d_head, d_model=model.d_model, d_mlp=int(cfg.d_mlp),
            d_vocab=model.d_vocab, gated_mlp=bool(getattr(cfg, "gated_mlp", False)),
            layer_norm=getattr(cfg, "normalization_type", "RMS") in ("LN", "LNPre"),
            biases=any(n.endswith("bias") and p.numel() == int(cfg.d_mlp)
                       for n, p in block.values()),
            tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            norms_per_layer=sum(p.numel() == model.d_model for p in norm_weights),
            qk_norm=any(p.numel() == model.d_head for p in norm_weights),
            n_params=sum(p.numel() for p in unique.values()),
            scaled_embeddings=model.embedding_scale is not None,
        )


def _llama(**kw: Any) -> ModelShape:
    return ModelShape(gated_mlp=True, layer_norm=False, biases=False, **kw)


def _neox(**kw: Any) -> ModelShape:  # Pythia: LayerNorm, biases, untied, rotary, F = 4d
    return ModelShape(gated_mlp=False, layer_norm=True, biases=True, tied_embeddings=False,
                      d_mlp=4 * kw["d_model"], n_kv_heads=kw["n_heads"], **kw)


def _opt(**kw: Any) -> ModelShape:  # OPT: LayerNorm, biases, tied, learned positions (+2 rows)
    return ModelShape(gated_mlp=False, layer_norm=True, biases=True, tied_embeddings=True,
                      d_mlp=4 * kw["d_model"], n_kv_heads=kw["n_heads"], n_positions=2050,
                      d_vocab=50272, **kw)


REFERENCE_SHAPES: dict[str, ModelShape] = {
    "smollm2-135m": _llama(n_layers=30, n_heads=9, n_kv_heads=3, d_head=64, d_model=576,
                           d_mlp=1536, d_vocab=49152, tied_embeddings=True),
    "gemma-3-270m": _llama(n_layers=18, n_heads=4, n_kv_heads=1, d_head=256, d_model=640,
                           d_mlp=2048, d_vocab=262144, tied_embeddings=True, norms_per_layer=4,
                           qk_norm=True, scaled_embeddings=True),
    "pythia-70m": _neox(n_layers=6, n_heads=8, d_head=64, d_model=512, d_vocab=50304),
    "pythia-160m": _neox(n_layers=12, n_heads=12, d_head=64, d_model=768, d_vocab=50304),
    "pythia-1.4b": _neox(n_layers=24, n_heads=16, d_head=128, d_model=2048, d_vocab=50304),
    "pythia-6.9b": _neox(n_layers=32, n_heads=32, d_head=128, d_model=4096, d_vocab=50432),
    "pythia-12b": _neox(n_layers=36, n_heads=40, d_head=128, d_model=5120, d_vocab=50688),
    "opt-125m": _opt(n_layers=12, n_heads=12, d_head=64, d_model=768),
    "opt-1.3b": _opt(n_layers=24, n_heads=32, d_head=64, d_model=2048),
    "opt-6.7b": _opt(n_layers=32, n_heads=32, d_head=128, d_model=4096),
    "opt-13b": _opt(n_layers=40, n_heads=40, d_head=128, d_model=5120),
    "opt-30b": _opt(n_layers=48, n_heads=56, d_head=128, d_model=7168),
    "opt-66b": _opt(n_layers=64, n_heads=72, d_head=128, d_model=9216),
}
"""Shapes of reference models, from their published Hugging Face configs (SmolLM2-135M,
Gemma-3-270M, Pythia, OPT); parameter counts follow from the shapes."""


# --------------------------------------------------------------------------------------------
# Estimates
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    """Estimated memory of one forward pass (and backward, for ``"importance"``), in bytes.

    Attributes:
        analysis: the memory model (one of :data:`MEMORY_MODELS`).
        dtype: the parameter and activation dtype.
        rows: sequences per pass (``max(1, batch_tokens // seq_len)``).
        seq_len: tokens per sequence.
        weights: parameter bytes.
        kv_cache: the key/value cache Hugging Face builds during the pass.
        activations: one layer's working set (forward-only analyses) or every layer's
            activations saved for the backward (``"importance"``).
        logits: logits and the full-vocabulary temporaries of the loss.
        gradients: gradient buffers of the backward pass (0 without one).
        total: the estimated peak: weights plus what the pass adds.
        circuits: the OV-circuit score's working set (``"scan"``; 0 for the others), which
            does not grow with the batch.
        kernel_state: for linear layers on packed weights (``linear_kernel="packed"``), what
            oneDNN keeps per width of product up to this pass's (0 otherwise; see the module
            docstring).
    """

    analysis: str
    dtype: str
    rows: int
    seq_len: int
    weights: int
    kv_cache: int
    activations: int
    logits: int
    gradients: int
    total: int
    circuits: int = 0
    kernel_state: int = 0

    @property
    def batch_tokens(self) -> int:
        return self.rows * self.seq_len

    @property
    def per_pass(self) -> int:
        """What the pass adds to the weights: ``total - weights``."""
        return self.total - self.weights

    @property
    def batch_bytes(self) -> int:
        """What the forward pass (and backward) adds to the weights, without the
        ``circuits`` term: the part that grows with the batch."""
        if self.analysis == "importance":
            return self.kv_cache + self.activations + self.logits + self.gradients
        return self.kv_cache + max(self.activations, self.logits)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MemoryEstimate":
        return cls(**data)

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {_readable(getattr(self, k))}" for k in
                          ("weights", "kv_cache", "activations", "logits", "gradients",
                           "circuits", "kernel_state")
                          if k not in ("circuits", "kernel_state") or getattr(self, k))
        return (f"{self.analysis} of {self.rows} x {self.seq_len} tokens in {self.dtype}: "
                f"{_readable(self.total)} ({parts})")


def _as_shape(shape: ModelShape | HookedModel | Any) -> ModelShape:
    if isinstance(shape, ModelShape):
        return shape
    if isinstance(shape, HookedModel) or hasattr(shape, "run_with_hooks"):
        return ModelShape.from_model(shape)
    raise TypeError(f"expected a ModelShape or a HookedModel, got {type(shape).__name__}")


def _resolve_dtype(shape: ModelShape | HookedModel | Any,
                   dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None and not isinstance(shape, ModelShape):
        return as_hooked_model(shape).dtype
    resolved = resolve_dtype(dtype)
    allowed = (torch.float32, torch.float16, torch.bfloat16)
    if resolved not in allowed:
        raise ValueError(f"dtype {resolved} has no memory model; choose one of "
                         f"{[str(d) for d in allowed]}")
    return resolved


KERNEL_STATE_PER_WIDTH = 2 * 2**20
"""The fixed part of oneDNN's state per width of packed product and projection (bytes): the
``kernel_state`` term (module docstring), from benchmarks/probe_kernel_state.py."""


def _kernel_state(m: ModelShape, tokens: int) -> int:
    """oneDNN's per-width state for packed products of up to ``tokens`` rows (float32)."""
    k = -(-tokens // BUCKET_ROWS)  # widths 64, 128, ..., k * 64
    outputs = (m.n_heads + m.n_kv_heads) * m.d_head + 2 * m.d_model + m.d_mlp
    return (BUCKET_ROWS * k * (k + 1) // 2 * outputs * 4  # an output buffer per width
            + k * 5 * KERNEL_STATE_PER_WIDTH)  # and a fixed part, for 5 projections


def _estimate(m: ModelShape, dtype: torch.dtype, rows: int, seq_len: int,
              analysis: str) -> MemoryEstimate:
    s = dtype.itemsize
    half = s < 4
    n = rows * seq_len  # tokens per pass
    p = rows * m.n_heads * seq_len * seq_len  # attention entries of one layer
    hd, kvd = m.n_heads * m.d_head, m.n_kv_heads * m.d_head
    weights = m.params * s
    kv_cache = 2 * m.n_layers * kvd * n * s
    # the logits and one slice of a score's float32 temporaries (logsumexp_slices)
    logits = n * m.d_vocab * s + min(n * m.d_vocab, LOGSUMEXP_ELEMENTS) * (8 if half else 4)
    gradients = circuits = 0
    if analysis == "importance":
        norm_bytes = s if m.layer_norm else 4  # RMSNorm keeps its float32 input
        per_layer = (n * s * (4 * hd + (3 if m.gated_mlp else 1) * m.d_mlp
                              + ((hd + kvd) if m.qk_norm else 0))
                     + n * norm_bytes * m.norms_per_layer * m.d_model
                     + p * (4 + (s if half else 0)))
        activations = m.n_layers * per_layer
        gates = 2 * m.n_layers * n * m.n_heads * s  # the head gates and their gradient
        # only the answer-predicting positions are unembedded (logits_to_keep), a set shared by
        # the batch's rows: about one position per row, for every row
        logits = rows * rows * m.d_vocab * s
        gradients = max(logits, 8 * p) + gates
    else:
        activations = (p * (2 * s + (4 if half else 0))
                       + n * s * (3 * hd + (3 if m.gated_mlp else 2) * m.d_mlp + 4 * m.d_model))
        if analysis == "choices":  # the packed rows' block masks: two boolean, a float copy
            activations += rows * seq_len * seq_len * (2 + s)
        if analysis == "scan":
            circuits = _ov_circuits(m, s)  # between passes: the larger of the two is the peak
    est = MemoryEstimate(analysis=analysis, dtype=str(dtype).removeprefix("torch."), rows=rows,
                         seq_len=seq_len, weights=weights, kv_cache=kv_cache,
                         activations=activations, logits=logits, gradients=gradients, total=0,
                         circuits=circuits)
    return dataclasses.replace(est, total=weights + max(est.batch_bytes, circuits))


def _ov_circuits(m: ModelShape, s: int) -> int:
    """The OV-circuit score's working set (the module docstring's ``circuits``)."""
    heads = m.n_layers * m.n_heads * m.d_model * m.d_head  # one per-head weight tensor
    vocab = m.d_model * m.d_vocab
    kept = s * (2 * heads + vocab + (vocab if m.layer_norm or m.scaled_embeddings else 0))
    steps = (s * heads * (3 if m.layer_norm else 1),  # folding one tensor
             # W_U W_E, one slice at a time, into a float64 sum (and the slice's product)
             16 * m.d_model * min(m.d_vocab, OV_VOCAB_SLICE) + 16 * m.d_model ** 2,
             24 * heads // m.n_layers)  # one layer's W_V, W_O and product, in float64
    return kept + max(steps)


def estimate_memory(
    shape: ModelShape | HookedModel, *, dtype: torch.dtype | str | None = None,
    batch_tokens: int, seq_len: int, analysis: MemoryModel, linear_kernel: str | None = None,
) -> MemoryEstimate:
    """Estimated peak memory of one pass of ``analysis`` (see the module docstring).

    Args:
        shape: a :class:`ModelShape` (e.g. from :data:`REFERENCE_SHAPES`) or a loaded model.
        dtype: the model's dtype (``"float32"``, ``"bfloat16"``/``"bf16"``,
            ``"float16"``/``"fp16"`` or a torch dtype); default: the loaded model's dtype, or
            float32 for a :class:`ModelShape`.
        batch_tokens: rows x longest row per pass, as the analyses' ``batch_tokens``
            argument: ``max(1, batch_tokens // seq_len)`` rows.
        seq_len: the longest sequence (all rows are padded to it).
        analysis: one of :data:`MEMORY_MODELS`.
        linear_kernel: ``"plain"`` or ``"packed"`` (:mod:`mechicl.model.kernels`: the packed
            copies and ``kernel_state``); default: the loaded model's, or ``"plain"`` for a
            :class:`ModelShape`.

    Returns:
        A :class:`MemoryEstimate` (bytes).

    >>> est = estimate_memory(REFERENCE_SHAPES["smollm2-135m"], dtype="float32",
    ...                       batch_tokens=2048, seq_len=512, analysis="importance")
    >>> est.rows, round(est.weights / 2**20), round(est.total / 2**30, 2)
    (4, 513, 3.57)
    """
    check_choice("analysis", analysis, MEMORY_MODELS)
    check_positive("batch_tokens", batch_tokens)
    check_positive("seq_len", seq_len)
    torch_dtype = _resolve_dtype(shape, dtype)
    estimate = _estimator(shape, torch_dtype, seq_len, analysis, linear_kernel)
    return estimate(max(1, batch_tokens // seq_len))


def _estimator(shape: ModelShape | HookedModel | Any, dtype: torch.dtype, seq_len: int,
               analysis: str, linear_kernel: str | None) -> Callable[[int], MemoryEstimate]:
    """``rows -> MemoryEstimate`` for ``shape`` on ``linear_kernel`` (default: the loaded
    model's, ``"plain"`` for a :class:`ModelShape`): with the packed copies and
    ``kernel_state`` on packed weights."""
    m = _as_shape(shape)
    if linear_kernel is None:
        linear_kernel = ("plain" if isinstance(shape, ModelShape)
                         else as_hooked_model(shape).linear_kernel)
    check_choice("linear_kernel", linear_kernel, ("plain", "packed"))
    copies = _packed_copies(shape, m, dtype) if linear_kernel == "packed" else 0

    def estimate(rows: int) -> MemoryEstimate:
        est = _estimate(m, dtype, rows, seq_len, analysis)
        if linear_kernel == "plain":
            return est
        # packing runs on a CPU only, whose passes hold at most the largest CPU cap of tokens
        state = _kernel_state(m, min(est.batch_tokens, max(
            CPU_PASS_TOKENS, CPU_CHOICES_PASS_TOKENS, CPU_COPIES_PASS_TOKENS)))
        return dataclasses.replace(est, weights=est.weights + copies, kernel_state=state,
                                   total=est.total + copies + state)

    return estimate


def _packed_copies(shape: ModelShape | HookedModel | Any, m: ModelShape,
                   dtype: torch.dtype) -> int:
    """The packed copies of the blocks' linear weights: counted on a loaded model, from the
    shape's projections otherwise."""
    hf = None if isinstance(shape, ModelShape) else getattr(
        as_hooked_model(shape).bridge, "original_model", None)
    if hf is not None:
        return packed_copies_bytes(hf)
    per_layer = m.d_model * ((2 * m.n_heads + 2 * m.n_kv_heads) * m.d_head
                             + (3 if m.gated_mlp else 2) * m.d_mlp)
    return m.n_layers * per_layer * dtype.itemsize


def batch_tokens_for_budget(
    shape: ModelShape | HookedModel, budget: int | str, *,
    dtype: torch.dtype | str | None = None, seq_len: int, analysis: MemoryModel,
    linear_kernel: str | None = None,
) -> int:
    """The largest ``batch_tokens`` (a multiple of ``seq_len``) whose estimated peak memory,
    weights included, fits in ``budget``.

    Pass it as the ``batch_tokens`` of the analysis with ``seq_len`` the longest sequence it
    will see: shorter sequences pack more rows into the same number of tokens and need less.

    Args:
        shape: a :class:`ModelShape` or a loaded model.
        budget: bytes, or a size such as ``"24GiB"`` (:func:`parse_bytes`), for the device
            that holds the model.
        dtype: as in :func:`estimate_memory`.
        seq_len: the longest sequence.
        analysis: one of :data:`MEMORY_MODELS`.
        linear_kernel: as in :func:`estimate_memory`.

    Returns:
        ``rows * seq_len``, at least ``seq_len``.

    Raises:
        ValueError: not even one sequence fits; the message gives the memory it needs.

    >>> batch_tokens_for_budget(REFERENCE_SHAPES["smollm2-135m"], "8GiB", dtype="float32",
    ...                         seq_len=512, analysis="importance")
    4608
    """
    check_choice("analysis", analysis, MEMORY_MODELS)
    check_positive("seq_len", seq_len)
    limit = parse_bytes(budget)
    torch_dtype = _resolve_dtype(shape, dtype)
    estimate = _estimator(shape, torch_dtype, seq_len, analysis, linear_kernel)
    one = estimate(1)
    if one.total > limit:
        raise ValueError(f"budget {_readable(limit)} is too small: {analysis} on one sequence of "
                         f"{seq_len} tokens needs {_readable(one.total)} ({one}); use a shorter "
                         "sequence, a smaller dtype, or split the model over devices")
    # the estimate grows with the rows (not in proportion: the scan's circuits, the score's
    # slice of temporaries): the largest fit by doubling, then bisection
    def fits(rows: int) -> bool:
        return estimate(rows).total <= limit

    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * seq_len


def memory_table(
    shapes: Mapping[str, ModelShape] | None = None,
    dtypes: Sequence[torch.dtype | str] = ("float32", "bfloat16"), *,
    seq_len: int = 512, analysis: MemoryModel = "importance",
    budgets: Sequence[int | str] = ("24GiB", "80GiB"),
) -> pd.DataFrame:
    """Weights and batch sizes that fit memory budgets, per model and dtype.

    Args:
        shapes: name -> shape (default :data:`REFERENCE_SHAPES`).
        dtypes: dtypes to tabulate.
        seq_len: the sequence length of the batch sizes.
        analysis: the memory model (one of :data:`MEMORY_MODELS`).
        budgets: memory budgets (:func:`parse_bytes`).

    Returns:
        One row per model and dtype: ``model``, ``n_params``, ``dtype``, ``weights_gib``,
        ``per_sequence_gib`` (what one sequence of ``seq_len`` adds) and one column
        ``batch_tokens@<budget>`` per budget (0 when not even one sequence fits).
    """
    check_choice("analysis", analysis, MEMORY_MODELS)
    shapes = REFERENCE_SHAPES if shapes is None else shapes
    records = []
    for name, shape in shapes.items():
        for dtype in dtypes:
            one = estimate_memory(shape, dtype=dtype, batch_tokens=seq_len, seq_len=seq_len,
                                  analysis=analysis)
            record: dict[str, Any] = {"model": name, "n_params": shape.params,
                                      "dtype": one.dtype, "weights_gib": one.weights / GiB,
                                      "per_sequence_gib": one.batch_bytes / GiB}
            for budget in budgets:
                try:
                    fit = batch_tokens_for_budget(shape, budget, dtype=dtype, seq_len=seq_len,
                                                  analysis=analysis)
                except ValueError:
                    fit = 0
                record[f"batch_tokens@{budget}"] = fit
            records.append(record)
    return pd.DataFrame.from_records(records)
