"""Unstructured weight pruning in place: magnitude and Wanda (issue 23 §2).

Jin et al. (ICLR 2024, "The Cost of Down-Scaling Language Models: Fact Recall Deteriorates
before In-Context Learning") prune the linear layers of the transformer blocks of a model with
SparseGPT and Wanda at growing sparsity and compare what is lost. :func:`pruned` does the same
to a :class:`~mechicl.model.hooked.HookedModel`, in place:

* **Which weights.** Every linear layer of every transformer block: attention q / k / v / o and
  the MLP's (gate / up / down, or fc / proj). Not the token embeddings, the unembedding
  (``lm_head``), position embeddings or norms, as in Wanda's and Jin et al.'s code (which
  prune ``model.layers``). Biases are kept. The weights pruned are the Hugging Face model's
  own (``bridge.original_model``), each tensor once: grouped-query attention's ``k_proj`` /
  ``v_proj`` hold one row block per KV head (mechicl's per-query-head ``W_K`` / ``W_V`` are
  repeats of them, so they follow), and views the bridge makes of a fused weight (GPT-2's
  ``c_attn`` seen as q / k / v) are not pruned a second time.
* **Comparison group.** Each output row of a weight (the weights that feed one output
  feature; Wanda's per-output comparison, Sun et al. 2024 §3, which they found better than
  per-layer for both criteria): at sparsity ``s`` every row of a layer with ``d_in`` inputs
  loses exactly ``floor(s * d_in)`` weights (``1e-9`` added before the floor so that, e.g.,
  ``0.29 * 100`` gives 29), those of the lowest score, ties broken by the lower input index
  (a stable sort), as Wanda's ``int(W.shape[1] * ratio)``.
* **Scores.** ``"magnitude"``: ``|W_ij|``. ``"wanda"``: ``|W_ij| * ||X_j||_2`` where
  ``||X_j||_2`` is the norm of input feature ``j`` of that layer over the calibration tokens
  (Sun et al. 2024, "A Simple and Effective Pruning Approach for Large Language Models"),
  computed block by block as in their code: the inputs of block ``l`` come from the model
  whose blocks ``0 .. l - 1`` are already pruned; within a block every layer's norms are read
  before any of its layers is pruned. The BOS position is left out of the norms (Wanda's
  calibration windows are cut from running text and rarely start with one; the first
  position's activations are outliers in many models).
* **Restore.** The context manager keeps, per weight, a boolean mask of the pruned entries
  and their original values (never a copy of the model) and writes them back on exit, also
  after an exception: the weights are bit-identical afterwards. While pruned, the model's
  ``weights_hash`` (the key of every stored result) is that of the pruned weights; on exit it
  is the original one again.

Every analysis takes the pruned model: it is the same object.

Axis names: ``batch pos row column``.
"""

import contextlib
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

from mechicl.model.hooked import HookedModel, as_hooked_model

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_SPARSITY",
    "PRUNING_METHODS",
    "PrunableWeight",
    "Pruning",
    "calibration_batch",
    "input_norms",
    "prunable_weights",
    "prune_counts",
    "pruned",
    "row_mask",
]

PruningMethod = Literal["magnitude", "wanda"]
PRUNING_METHODS: tuple[str, ...] = ("magnitude", "wanda")
"""Unstructured pruning criteria: ``|W|``, or ``|W| * ||X||`` (Wanda)."""

MAX_SPARSITY = 0.9
"""The largest sparsity :func:`pruned` accepts (Jin et al. go to 90%)."""

_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


@dataclass(frozen=True)
class PrunableWeight:
    """One weight :func:`pruned` prunes.

    Attributes:
        name: the module's qualified name in the Hugging Face model.
        layer: the transformer block it belongs to.
        module: the ``nn.Linear`` (or GPT-2 ``Conv1D``) that owns the weight.
        transposed: the weight is stored ``[in, out]`` (``Conv1D``), so an output row is a
            column of the stored tensor.
        probes: modules that read the same input (views of a fused weight made by the bridge,
            e.g. q / k / v of GPT-2's ``c_attn``): whichever of them runs gives the input norms.
    """

    name: str
    layer: int
    module: torch.nn.Module
    transposed: bool
    probes: tuple[torch.nn.Module, ...] = ()

    @property
    def weight(self) -> Tensor:
        return self.module.weight

    def rows(self) -> Tensor:
        """The weight as ``[out, in]`` (a view; changes to it bump the weight's version
        counter, so packed copies of it are made again, :mod:`mechicl.model.kernels`)."""
        w = self.module.weight.detach()
        return w.T if self.transposed else w


def _is_linear(module: torch.nn.Module) -> tuple[bool, bool]:
    """(is a linear layer, stores its weight as [in, out])."""
    if isinstance(module, torch.nn.Linear):
        return True, False
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False, False
    return (True, True) if isinstance(module, Conv1D) else (False, False)


def prunable_weights(model: Any) -> list[PrunableWeight]:
    """The weights :func:`pruned` prunes: every linear layer inside a transformer block of the
    Hugging Face model behind ``model`` (a module name with a block index), the output and
    input embeddings excluded, each underlying tensor once (see the module docstring).

    >>> [(w.name.split(".")[-2], w.layer, tuple(w.rows().shape)) for w in
    ...  prunable_weights(model)][:3]
    [('q_proj', 0, (64, 64)), ('k_proj', 0, (32, 64)), ('v_proj', 0, (32, 64))]
    """
    model = as_hooked_model(model)
    hf = getattr(model.bridge, "original_model", None)
    if hf is None:
        raise TypeError("pruning needs a TransformerBridge over a Hugging Face model "
                        "(bridge.original_model); this bridge has none")
    excluded = set()
    for getter in ("get_output_embeddings", "get_input_embeddings"):
        emb = getattr(hf, getter, lambda: None)()
        if emb is not None:
            excluded.add(id(emb.weight))
    found: list[tuple[str, int, torch.nn.Module, bool]] = []
    for name, module in hf.named_modules():
        linear, transposed = _is_linear(module)
        if not linear or id(module.weight) in excluded:
            continue
        match = _LAYER.search(name)
        if match is None:  # outside the blocks (e.g. lm_head, a vision projector)
            continue
        w = module.weight
        if w.device.type == "meta":
            raise ValueError(f"weight {name} is offloaded (meta device): in-place pruning needs "
                             "the weights in memory; load the model without disk/cpu offload")
        if not w.is_floating_point():
            raise ValueError(f"weight {name} has dtype {w.dtype}: pruning needs floating-point "
                             "weights (load the model de-quantised, e.g. from GGUF)")
        found.append((name, int(match.group(1)), module, transposed))
    # Group views of one storage (the bridge's q / k / v views of a fused qkv weight).
    groups: dict[int, list[tuple[str, int, torch.nn.Module, bool]]] = {}
    for entry in found:
        groups.setdefault(entry[2].weight.untyped_storage().data_ptr(), []).append(entry)
    out = []
    for members in groups.values():
        full = [m for m in members if m[2].weight.numel() * m[2].weight.element_size()
                == m[2].weight.untyped_storage().nbytes()]
        owners = full[:1] if full else members
        for name, layer, module, transposed in owners:
            probes = tuple(m[2] for m in members if m[2] is not module) if full else ()
            out.append(PrunableWeight(name, layer, module, transposed, probes))
    order = {id(m): i for i, (_, _, m, _) in enumerate(found)}
    return sorted(out, key=lambda w: (w.layer, order[id(w.module)]))


def prune_counts(n_in: int, sparsity: float) -> int:
    """Weights removed from each output row of ``n_in`` inputs: ``floor(sparsity * n_in)``
    (``1e-9`` added first, against float error).

    >>> prune_counts(100, 0.29), prune_counts(64, 0.5), prune_counts(576, 0.9)
    (29, 32, 518)
    """
    return int(math.floor(sparsity * n_in + 1e-9))


def row_mask(scores: Tensor, sparsity: float) -> Tensor:
    """The pruned entries of ``scores [row, column]``: in each row, the ``floor(sparsity *
    columns)`` lowest scores (ties: the lower column first).

    >>> row_mask(torch.tensor([[3.0, 1.0, 2.0, 1.0]]), 0.5).tolist()
    [[False, True, False, True]]
    """
    k = prune_counts(scores.shape[-1], sparsity)
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k:
        order = torch.sort(scores, dim=-1, stable=True).indices[:, :k]  # [row, k]
        mask.scatter_(-1, order, True)
    return mask


def calibration_batch(model: Any, texts: Sequence[str], *, n_sequences: int = 16,
                      length: int = 128) -> Int[Tensor, "batch pos"]:
    """Calibration tokens from running text, as Wanda cuts them from C4: the texts joined by
    blank lines and tokenised once (no BOS), cut into ``n_sequences`` consecutive windows of
    ``length - 1`` tokens, each with the BOS token in front.

    Args:
        model: the model (its tokenizer and BOS token).
        texts: the text (e.g. :func:`mechicl.inputs.variants.calibration_text`).
        n_sequences: windows.
        length: tokens per window, BOS included.

    Returns:
        ``[n_sequences, length]`` token ids.

    >>> calibration_batch(model, ["w1 w2 w3 w4 w5 w6 w7"], n_sequences=2, length=3).tolist()
    [[0, 5, 6], [0, 7, 8]]
    """
    model = as_hooked_model(model)
    if n_sequences < 1 or length < 2:
        raise ValueError(f"n_sequences={n_sequences} must be >= 1 and length={length} >= 2")
    if isinstance(texts, str) or not texts:
        raise ValueError("texts must be a non-empty list of strings")
    ids = model.encode("\n\n".join(texts), prepend_bos=False)
    need = n_sequences * (length - 1)
    if len(ids) < need:
        raise ValueError(f"the calibration text has {len(ids)} tokens; {n_sequences} windows of "
                         f"{length - 1} need {need}: give more text or fewer / shorter windows")
    body = torch.tensor(ids[:need], dtype=torch.long).reshape(n_sequences, length - 1)
    bos = torch.full((n_sequences, 1), model.bos_token_id, dtype=torch.long)
    return torch.cat([bos, body], dim=1)


class _Stop(Exception):
    """Ends a calibration pass once the block of interest has run."""


def input_norms(model: Any, weights: Sequence[PrunableWeight],
                tokens: Int[Tensor, "batch pos"]) -> dict[int, Tensor]:
    """``||X_j||_2`` of every input feature of each of ``weights`` over ``tokens`` (the BOS
    position left out), from one forward pass that stops after the last block they are in.

    Returns:
        ``id(weight.module) -> [in]`` norms (float64).
    """
    model = as_hooked_model(model)
    sums: dict[int, Tensor] = {}
    handles = []
    last = max(w.layer for w in weights)

    def accumulate(key: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            if x.ndim == 3:
                x = x[:, 1:]  # [batch, pos - 1, in]: no BOS
            sq = x.double().pow(2).reshape(-1, x.shape[-1]).sum(0)  # [in]
            sums[key] = sums[key] + sq if key in sums else sq
        return hook

    def stop(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        raise _Stop

    try:
        for w in weights:
            for m in (w.module, *w.probes):
                handles.append(m.register_forward_pre_hook(accumulate(id(m))))
        for later in prunable_weights(model):
            if later.layer > last:
                handles.append(later.module.register_forward_pre_hook(stop))
                handles += [p.register_forward_pre_hook(stop) for p in later.probes]
        with torch.no_grad(), contextlib.suppress(_Stop):
            model.bridge(tokens.to(model.device), return_type=None)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for w in weights:
        fired = [sums[id(m)] for m in (w.module, *w.probes) if id(m) in sums]
        if not fired:
            raise RuntimeError(f"weight {w.name} was not used in the forward pass: cannot read "
                               "its input norms")
        out[id(w.module)] = fired[0].sqrt()
    return out


@dataclass(frozen=True, kw_only=True)
class Pruning:
    """What :func:`pruned` did (yielded by it).

    Attributes:
        method: ``"magnitude"`` or ``"wanda"``.
        sparsity: the requested share of each output row's weights removed.
        group: the comparison group (``"output row"``).
        weights: the pruned weights' module names.
        n_weights: weights in those layers.
        n_pruned: weights set to zero.
        calibration_tokens: tokens whose norms Wanda used (BOS positions not counted; 0 for
            magnitude).
    """

    method: str
    sparsity: float
    group: str = "output row"
    weights: tuple[str, ...] = field(repr=False)
    n_weights: int
    n_pruned: int
    calibration_tokens: int = 0

    @property
    def achieved(self) -> float:
        """The share of the pruned layers' weights that are now zero by pruning."""
        return self.n_pruned / self.n_weights if self.n_weights else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "sparsity": self.sparsity, "group": self.group,
                "n_weights": self.n_weights, "n_pruned": self.n_pruned,
                "achieved": self.achieved, "calibration_tokens": self.calibration_tokens,
                "n_layers_pruned": len(self.weights)}


def _check_sparsity(sparsity: Any) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, int | float) or not (
            0.0 <= float(sparsity) <= MAX_SPARSITY):
        raise ValueError(f"sparsity={sparsity!r}: need a number from 0 to {MAX_SPARSITY} (the "
                         "share of each output row's weights removed)")
    return float(sparsity)


def _calibration_tokens(model: HookedModel, calibration: Any) -> Tensor:
    if isinstance(calibration, Tensor):
        if calibration.ndim != 2 or calibration.dtype not in (torch.long, torch.int32,
                                                              torch.int64):
            raise ValueError(f"calibration tokens must be an integer tensor [batch, pos], got "
                             f"{calibration.dtype} of shape {tuple(calibration.shape)}")
        return calibration.long()
    if isinstance(calibration, Sequence) and not isinstance(calibration, str) and all(
            isinstance(t, str) for t in calibration) and calibration:
        return calibration_batch(model, list(calibration))
    raise ValueError("method='wanda' needs calibration=: token ids [batch, pos] "
                     "(calibration_batch) or a list of texts (e.g. "
                     "mechicl.inputs.variants.calibration_text())")


@contextlib.contextmanager
def pruned(model: Any, sparsity: float, method: str = "magnitude", *,
           calibration: Tensor | Sequence[str] | None = None) -> Iterator[Pruning]:
    """Prune ``model``'s block linear layers in place for the ``with`` block, then restore them
    bit for bit (see the module docstring for which weights, the groups and the scores).

    Args:
        model: a :class:`~mechicl.model.hooked.HookedModel` (its ``weights_hash`` follows the
            weights) or a bridge.
        sparsity: the share of each output row's weights set to zero, from 0 to 0.9.
        method: ``"magnitude"`` (``|W|``) or ``"wanda"`` (``|W| * ||X||``).
        calibration: Wanda only: token ids ``[batch, pos]`` (each row starting with BOS,
            :func:`calibration_batch`) or a list of texts cut into 16 windows of 128 tokens.

    Yields:
        A :class:`Pruning` record.

    >>> before = model.weights_hash
    >>> with pruned(model, 0.5) as p:
    ...     p.achieved, model.weights_hash == before
    (0.5, False)
    >>> model.weights_hash == before
    True
    """
    check = method
    if check not in PRUNING_METHODS:
        raise ValueError(f"method={method!r} is not allowed; choose one of "
                         f"{list(PRUNING_METHODS)}")
    sparsity = _check_sparsity(sparsity)
    if method == "magnitude" and calibration is not None:
        raise ValueError("calibration= is only used by method='wanda'; magnitude pruning "
                         "reads no activations")
    hooked = model if isinstance(model, HookedModel) else None
    model = as_hooked_model(model)
    weights = prunable_weights(model)
    if not weights:
        raise ValueError(f"{model.name} has no linear layers inside transformer blocks to prune")
    tokens = _calibration_tokens(model, calibration) if method == "wanda" else None
    saved_hash = hooked.weights_hash if hooked is not None else None  # restored on exit
    undo: list[tuple[PrunableWeight, Tensor, Tensor]] = []  # (weight, mask [out, in], values)
    n_pruned = 0
    try:
        with torch.no_grad():
            if method == "magnitude":
                for w in weights:
                    n_pruned += _prune(w, w.rows().abs(), sparsity, undo)
            elif sparsity > 0:
                assert tokens is not None
                for layer in sorted({w.layer for w in weights}):
                    block = [w for w in weights if w.layer == layer]
                    norms = input_norms(model, block, tokens)  # blocks below already pruned
                    for w in block:
                        score = w.rows().abs().double() * norms[id(w.module)][None, :]
                        n_pruned += _prune(w, score, sparsity, undo)
        if hooked is not None and n_pruned:
            hooked.weights_changed()  # the pruned weights' hash, when asked
        n_tokens = 0 if tokens is None else int(tokens.shape[0] * (tokens.shape[1] - 1))
        logger.info("pruned %s: %s at sparsity %.2f, %d weights", model.name, method, sparsity,
                    n_pruned)
        yield Pruning(method=method, sparsity=sparsity,
                      weights=tuple(w.name for w in weights),
                      n_weights=sum(w.weight.numel() for w in weights), n_pruned=n_pruned,
                      calibration_tokens=n_tokens)
    finally:
        with torch.no_grad():
            for w, mask, values in reversed(undo):
                w.rows()[mask] = values
        if hooked is not None:  # the weights are bit-identical again
            hooked.weights_changed(saved_hash)


def _prune(w: PrunableWeight, score: Tensor, sparsity: float,
           undo: list[tuple[PrunableWeight, Tensor, Tensor]]) -> int:
    """Zero the ``sparsity`` lowest-scoring entries of each output row of ``w`` in place,
    recording them in ``undo``; returns how many."""
    mask = row_mask(score, sparsity)
    rows = w.rows()
    undo.append((w, mask, rows[mask].clone()))
    rows[mask] = 0
    return prune_counts(rows.shape[1], sparsity) * rows.shape[0]  # exact per row: no count
