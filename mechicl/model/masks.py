"""Head and FFN masks applied through hooks: remove, mean-ablate or scale attention heads and MLPs.

transformers 5 removed ``head_mask``; a :class:`Mask` does the same job through TransformerLens
hooks, so it works for every model the bridge loads (including grouped-query attention, where
the mask acts on *query* heads):

* a head's output ``z`` (``blocks.L.attn.hook_z``, the per-head attention output before
  ``W_O``) becomes ``m * z + (1 - m) * mean``: ``m = 0`` removes the head (``mean = 0``, "zero
  ablation"; this equals Bansal et al.'s mask on the attention probabilities, the output bias
  ``b_O`` survives) or replaces it by its mean activation (``ablation="mean"``); other values
  of ``m`` scale the head. Because ``z = A v`` is linear in the value vectors, scaling ``z``
  equals scaling the head's value vectors (Yu, Merullo & Pavlick 2023).
* an MLP's output (``blocks.L.hook_mlp_out``) becomes ``f * out + (1 - f) * mean``: ``f = 0``
  skips the FFN sublayer including its output bias, as in Bansal et al.'s FFN pruning.

Masks compose (``a & b`` multiplies them), serialise to JSON, and apply to any forward pass::

    with mask.applied(model):
        logits = model(tokens)

or through the ``mask=`` argument of :func:`mechicl.evaluate` and :func:`mechicl.induction_scan`.
Many masks can share one forward pass (each masked copy of the batch is a row block), which is
how ablation importance and pruning curves are batched.

Axis names: ``mask layer head d_head d_model batch pos``.
"""

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from einops import rearrange, repeat
from jaxtyping import Float, Int
from torch import Tensor

from mechicl._batching import length_batches, pad_right
from mechicl._checks import check_choice, check_index
from mechicl._io import atomic_write_text
from mechicl.model.hooked import HookedModel, as_hooked_model

__all__ = ["ActivationMeans", "Ablation", "Mask", "mean_activations"]

Ablation = Literal["zero", "mean"]
ABLATIONS: tuple[str, ...] = ("zero", "mean")
FORMAT_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class ActivationMeans:
    """Mean activations for mean ablation.

    Attributes:
        z: ``[layer, head, d_head]`` mean of each head's output (hook_z).
        mlp_out: ``[layer, d_model]`` mean of each MLP's output (hook_mlp_out; zeros for
            attention-only models).
        n_tokens: how many token positions were averaged.
    """

    z: Float[Tensor, "layer head d_head"]
    mlp_out: Float[Tensor, "layer d_model"]
    n_tokens: int


def mean_activations(
    model: HookedModel, tokens: Sequence[Sequence[int]] | Int[Tensor, "batch pos"], *,
    attention_mask: Int[Tensor, "batch pos"] | None = None, skip_bos: bool = True,
    batch_tokens: int = 4096,
) -> ActivationMeans:
    """Mean head outputs and MLP outputs over the real (unpadded) positions of ``tokens``.

    Args:
        model: the model.
        tokens: token sequences (lists of ids of any length), or a padded ``[batch, pos]``
            tensor with its ``attention_mask``.
        attention_mask: 1 for real tokens (only with a tensor ``tokens``).
        skip_bos: leave position 0 out of the mean (the BOS position is an attention sink whose
            activations are atypical).
        batch_tokens: rows x longest row per forward pass.
    """
    model = as_hooked_model(model)
    if isinstance(tokens, Tensor):
        mask = torch.ones_like(tokens) if attention_mask is None else attention_mask
        seqs = [tokens[i, : int(mask[i].sum())].tolist() for i in range(tokens.shape[0])]
    else:
        if attention_mask is not None:
            raise ValueError("attention_mask is only allowed with a padded tensor of tokens")
        seqs = [list(s) for s in tokens]
    if not seqs:
        raise ValueError("no token sequences to average over")
    z_sum = torch.zeros(model.n_layers, model.n_heads, model.d_head, dtype=torch.float64)
    mlp_sum = torch.zeros(model.n_layers, model.d_model, dtype=torch.float64)
    count = 0
    z_names = model.hook_names("z")
    mlp_names = [n if n in model.hook_dict else None for n in model.hook_names("mlp_out")]
    for batch in length_batches([len(s) for s in seqs], batch_tokens):
        toks, lengths = pad_right([seqs[i] for i in batch], model.pad_token_id)
        real = torch.arange(toks.shape[1])[None] < lengths[:, None]
        attn = real.long()
        if skip_bos:
            real[:, 0] = False
        weight = real.to(model.device, model.dtype)
        count += int(real.sum())

        def add_z(z: Tensor, hook: Any, layer: int, w: Tensor = weight) -> None:
            z_sum[layer] += torch.einsum("bphd,bp->hd", z.detach(), w).double().cpu()

        def add_mlp(out: Tensor, hook: Any, layer: int, w: Tensor = weight) -> None:
            mlp_sum[layer] += torch.einsum("bpd,bp->d", out.detach(), w).double().cpu()

        hooks = [(n, _bind(add_z, layer=i)) for i, n in enumerate(z_names)]
        hooks += [(n, _bind(add_mlp, layer=i)) for i, n in enumerate(mlp_names) if n is not None]
        with torch.no_grad():
            model.run_with_hooks(toks.to(model.device), attention_mask=attn.to(model.device),
                                 fwd_hooks=hooks, return_type=None)
    if count == 0:
        raise ValueError("no positions to average over (sequences of only BOS?)")
    return ActivationMeans(z=(z_sum / count).to(model.dtype), mlp_out=(mlp_sum / count).to(model.dtype),
                           n_tokens=count)


def _bind(fn: Callable[..., Any], **kwargs: Any) -> Callable[[Tensor, Any], Any]:
    return lambda x, hook: fn(x, hook, **kwargs)


@dataclass(frozen=True, kw_only=True, eq=False)
class Mask:
    """Multipliers for every attention head (query heads) and every MLP, applied through hooks.

    Attributes:
        heads: ``[layer, head]``: 1 keeps a head, 0 removes it, other values scale it.
        ffn: ``[layer]``: 1 keeps a layer's MLP, 0 removes it.
        ablation: what a removed component is replaced by: ``"zero"`` or ``"mean"``
            (its mean activation, from ``means``).
        means: mean activations (required for ``ablation="mean"`` when anything is masked).
    """

    heads: Float[Tensor, "layer head"]
    ffn: Float[Tensor, " layer"]
    ablation: Ablation = "zero"
    means: ActivationMeans | None = None

    def __post_init__(self) -> None:
        check_choice("ablation", self.ablation, ABLATIONS)
        heads = torch.as_tensor(self.heads, dtype=torch.float32).detach().cpu()
        ffn = torch.as_tensor(self.ffn, dtype=torch.float32).detach().cpu()
        if heads.ndim != 2:
            raise ValueError(f"heads must be [layer, head], got shape {tuple(heads.shape)}")
        if ffn.shape != (heads.shape[0],):
            raise ValueError(f"ffn must be [layer] = [{heads.shape[0]}], got shape "
                             f"{tuple(ffn.shape)}")
        if not (torch.isfinite(heads).all() and torch.isfinite(ffn).all()):
            raise ValueError("mask values must be finite")
        object.__setattr__(self, "heads", heads)
        object.__setattr__(self, "ffn", ffn)
        if self.ablation == "mean" and not self.is_identity and self.means is None:
            raise ValueError("ablation='mean' needs means=mean_activations(model, tokens)")
        if self.means is not None:
            n_layers, n_heads = heads.shape
            if self.means.z.shape[:2] != (n_layers, n_heads) or self.means.mlp_out.shape[0] != n_layers:
                raise ValueError(f"means are for a model of shape {tuple(self.means.z.shape[:2])}, "
                                 f"the mask is [{n_layers}, {n_heads}]")

    # ---- constructors ---------------------------------------------------------------------

    @classmethod
    def keep_all(cls, model: HookedModel | tuple[int, int], **kwargs: Any) -> "Mask":
        """The identity mask for ``model`` (or a ``(n_layers, n_heads)`` shape)."""
        n_layers, n_heads = _shape(model)
        return cls(heads=torch.ones(n_layers, n_heads), ffn=torch.ones(n_layers), **kwargs)

    @classmethod
    def remove(cls, model: HookedModel | tuple[int, int], *,
               heads: Iterable[Any] = (), ffns: Iterable[Any] = (),
               **kwargs: Any) -> "Mask":
        """A mask removing the given ``(layer, head)`` heads and the MLPs of the given layers.

        ``heads`` holds ``(layer, head)`` pairs, ``ffns`` layer numbers: integers (Python or
        numpy integers, integer tensors; not bools, not floats) inside the model's shape;
        anything else raises ``ValueError`` naming it.

        >>> Mask.remove((4, 2), heads=[(2, 1)], ffns=[3]).removed_heads
        [(2, 1)]
        """
        n_layers, n_heads = _shape(model)
        h = torch.ones(n_layers, n_heads)
        f = torch.ones(n_layers)
        if isinstance(heads, (str, bytes)) or isinstance(ffns, (str, bytes)):
            raise ValueError("heads= takes (layer, head) pairs and ffns= layer numbers, not "
                             "strings")
        for pair in heads:
            try:
                items = () if isinstance(pair, (str, bytes, set)) else tuple(pair)
            except TypeError:  # not iterable
                items = ()
            if len(items) != 2:
                raise ValueError(f"head {pair!r} is not a (layer, head) pair of integers")
            layer = check_index(f"head {items!r}: layer", items[0], n_layers)
            head = check_index(f"head {items!r}: head", items[1], n_heads)
            h[layer, head] = 0.0
        for entry in ffns:
            f[check_index("FFN layer", entry, n_layers)] = 0.0
        return cls(heads=h, ffn=f, **kwargs)

    # ---- views ------------------------------------------------------------------------------

    @property
    def n_layers(self) -> int:
        return int(self.heads.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.heads.shape[1])

    @property
    def is_identity(self) -> bool:
        return bool((self.heads == 1).all() and (self.ffn == 1).all())

    @property
    def first_layer(self) -> int:
        """The lowest layer whose heads or FFN the mask changes (``n_layers`` for the identity):
        below it the masked model equals the unmasked one.

        >>> Mask.remove((4, 2), heads=[(2, 1)]).first_layer
        2
        """
        touched = ((self.heads != 1).any(-1) | (self.ffn != 1)).nonzero()
        return int(touched[0, 0]) if len(touched) else self.n_layers

    @property
    def removed_heads(self) -> list[tuple[int, int]]:
        """Heads with multiplier 0, in (layer, head) order."""
        return [(int(a), int(b)) for a, b in torch.nonzero(self.heads == 0).tolist()]

    @property
    def removed_ffns(self) -> list[int]:
        return [int(i) for i in torch.nonzero(self.ffn == 0)[:, 0].tolist()]

    def __and__(self, other: "Mask") -> "Mask":
        """Both masks at once: multipliers multiply."""
        if not isinstance(other, Mask):
            return NotImplemented
        if self.heads.shape != other.heads.shape:
            raise ValueError(f"cannot combine masks of shapes {tuple(self.heads.shape)} and "
                             f"{tuple(other.heads.shape)}")
        if self.ablation != other.ablation and not (self.is_identity or other.is_identity):
            raise ValueError(f"cannot combine a {self.ablation!r} and a {other.ablation!r} mask")
        ablation = other.ablation if self.is_identity else self.ablation
        # The means that matter are those of the side that masks something.
        masking = [m for m in (self, other) if not m.is_identity and m.means is not None]
        if len(masking) == 2 and not _means_equal(masking[0].means, masking[1].means):
            raise ValueError("cannot combine two mean-ablation masks with different means")
        if masking:
            means = masking[0].means
        else:
            means = self.means if self.means is not None else other.means
        return Mask(heads=self.heads * other.heads, ffn=self.ffn * other.ffn, ablation=ablation,
                    means=means)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mask):
            return NotImplemented
        return (self.ablation == other.ablation and torch.equal(self.heads, other.heads)
                and torch.equal(self.ffn, other.ffn) and _means_equal(self.means, other.means))

    __hash__ = None  # type: ignore[assignment]

    def key(self) -> bytes:
        """Bytes identifying the multipliers and ablation (for de-duplicating masks)."""
        return (self.ablation.encode() + self.heads.numpy().tobytes() + self.ffn.numpy().tobytes())

    # ---- serialisation ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``from_dict`` inverts it exactly)."""
        out: dict[str, Any] = {
            "kind": "Mask", "format": FORMAT_VERSION, "n_layers": self.n_layers,
            "n_heads": self.n_heads, "ablation": self.ablation,
            "heads": self.heads.tolist(), "ffn": self.ffn.tolist(),
            "removed_heads": [list(h) for h in self.removed_heads],
            "removed_ffns": self.removed_ffns,
        }
        if self.means is not None:
            out["means"] = {"z": self.means.z.tolist(), "mlp_out": self.means.mlp_out.tolist(),
                            "dtype": str(self.means.z.dtype).removeprefix("torch."),
                            "n_tokens": self.means.n_tokens}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Mask":
        if data.get("kind") != "Mask":
            raise ValueError(f"not a serialised Mask (kind={data.get('kind')!r})")
        means = None
        if data.get("means") is not None:
            m = data["means"]
            dtype = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
                     "bfloat16": torch.bfloat16}.get(m.get("dtype", "float32"))
            if dtype is None:
                raise ValueError(f"unknown means dtype {m.get('dtype')!r}")
            means = ActivationMeans(z=torch.tensor(m["z"], dtype=dtype),
                                    mlp_out=torch.tensor(m["mlp_out"], dtype=dtype),
                                    n_tokens=int(m["n_tokens"]))
        mask = cls(heads=torch.tensor(data["heads"], dtype=torch.float32),
                   ffn=torch.tensor(data["ffn"], dtype=torch.float32),
                   ablation=data.get("ablation", "zero"), means=means)
        if mask.heads.shape != (data["n_layers"], data["n_heads"]):
            raise ValueError(f"heads have shape {tuple(mask.heads.shape)}, the header says "
                             f"[{data['n_layers']}, {data['n_heads']}]")
        return mask

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "Mask":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the mask as JSON, atomically."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Mask":
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    # ---- application -----------------------------------------------------------------------

    def hooks(self, model: HookedModel) -> list[tuple[str, Callable[..., Tensor]]]:
        """Forward hooks applying this mask (for ``run_with_hooks`` / ``model.hooks``)."""
        return stack_hooks(as_hooked_model(model), [self], rows_per_mask=None)

    @contextlib.contextmanager
    def applied(self, model: HookedModel) -> Iterator[HookedModel]:
        """Context in which every forward pass of ``model`` runs with this mask."""
        model = as_hooked_model(model)
        with model.hooks(fwd_hooks=self.hooks(model)):
            yield model


def _means_equal(a: ActivationMeans | None, b: ActivationMeans | None) -> bool:
    if a is None or b is None:
        return a is b
    return torch.equal(a.z, b.z) and torch.equal(a.mlp_out, b.mlp_out)


def _shape(model: HookedModel | tuple[int, int]) -> tuple[int, int]:
    if isinstance(model, tuple):
        return int(model[0]), int(model[1])
    model = as_hooked_model(model)
    return model.n_layers, model.n_heads


def stack_hooks(model: HookedModel, masks: Sequence[Mask], rows_per_mask: int | None,
                ) -> list[tuple[str, Callable[..., Tensor]]]:
    """Hooks applying ``masks[i]`` to rows ``i*rows_per_mask : (i+1)*rows_per_mask`` of a
    batch that holds one copy of the inputs per mask (``rows_per_mask=None``: one mask, every
    row). Layers where every mask keeps everything get no hook.

    A batch with fewer rows than ``len(masks) * rows_per_mask`` gets the gates of its first
    rows: a pass whose batch grows between layers (copies joining at the first layer their
    mask touches) holds the first masks' rows at each layer."""
    if not masks:
        return []
    shapes = {tuple(m.heads.shape) for m in masks}
    if shapes != {(model.n_layers, model.n_heads)}:
        raise ValueError(f"mask shapes {sorted(shapes)} do not match the model's "
                         f"[{model.n_layers}, {model.n_heads}] heads")
    ablations = {m.ablation for m in masks if not m.is_identity}
    if len(ablations) > 1:
        raise ValueError(f"masks in one batch must share one ablation, got {sorted(ablations)}")
    means = next((m.means for m in masks if m.means is not None and not m.is_identity), None)
    if means is not None and not all(m.is_identity or _means_equal(m.means, means) for m in masks):
        raise ValueError("masks in one batch must share the same mean activations")
    heads = torch.stack([m.heads for m in masks]).to(model.device, model.dtype)  # [mask, layer, head]
    ffn = torch.stack([m.ffn for m in masks]).to(model.device, model.dtype)  # [mask, layer]
    if rows_per_mask is None:
        if len(masks) != 1:
            raise ValueError("rows_per_mask is needed for more than one mask")
    else:
        heads = repeat(heads, "mask layer head -> (mask row) layer head", row=rows_per_mask)
        ffn = repeat(ffn, "mask layer -> (mask row) layer", row=rows_per_mask)
    mean_z = means.z.to(model.device, model.dtype) if means is not None else None
    mean_mlp = means.mlp_out.to(model.device, model.dtype) if means is not None else None
    hooks: list[tuple[str, Callable[..., Tensor]]] = []
    for layer in range(model.n_layers):
        h = heads[:, layer]  # [row, head]
        if not bool((h == 1).all()):
            hooks.append((model.hook_name("z", layer),
                          _head_hook(rearrange(h, "row head -> row 1 head 1"),
                                     None if mean_z is None else mean_z[layer])))
        f = ffn[:, layer]  # [row]
        if not bool((f == 1).all()):
            if model.hook_name("mlp_out", layer) not in model.hook_dict:
                raise ValueError(f"the mask changes the MLP of layer {layer}, but the model has no "
                                 "MLPs (attention-only)")
            hooks.append((model.hook_name("mlp_out", layer),
                          _ffn_hook(rearrange(f, "row -> row 1 1"),
                                    None if mean_mlp is None else mean_mlp[layer])))
    return hooks


def _head_hook(m: Tensor, mean: Tensor | None) -> Callable[..., Tensor]:
    def hook(z: Tensor, hook: Any) -> Tensor:  # z: [batch, pos, head, d_head]
        g = m if m.shape[0] == 1 else m[: z.shape[0]]  # the rows present (a growing batch)
        out = z * g
        if mean is not None:
            out = out + (1 - g) * mean  # mean: [head, d_head] broadcasts over batch, pos
        return out
    return hook


def _ffn_hook(f: Tensor, mean: Tensor | None) -> Callable[..., Tensor]:
    def hook(out: Tensor, hook: Any) -> Tensor:  # out: [batch, pos, d_model]
        g = f if f.shape[0] == 1 else f[: out.shape[0]]
        res = out * g
        if mean is not None:
            res = res + (1 - g) * mean
        return res
    return hook


def masked_logits(
    model: HookedModel, tokens: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"],
    masks: Sequence[Mask],
) -> Float[Tensor, "mask batch pos d_vocab"]:
    """Logits of ``tokens`` under each mask, all masks in one forward pass."""
    model = as_hooked_model(model)
    n = len(masks)
    rows = repeat(tokens, "batch pos -> (mask batch) pos", mask=n)
    attn = repeat(attention_mask, "batch pos -> (mask batch) pos", mask=n)
    hooks = stack_hooks(model, masks, rows_per_mask=tokens.shape[0])
    logits = model.run_with_hooks(rows.to(model.device), attention_mask=attn.to(model.device),
                                  fwd_hooks=hooks, return_type="logits")
    return rearrange(logits, "(mask batch) pos vocab -> mask batch pos vocab", mask=n)
