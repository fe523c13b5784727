"""The hooked model: one uniform per-head view of a TransformerLens bridge, whatever the
architecture.

:class:`HookedModel` is a thin wrapper around a ``TransformerBridge`` that

* delegates everything it does not define to the bridge (``run_with_hooks``, ``run_with_cache``,
  ``hooks``, ...), so TransformerLens code keeps working;
* exposes the same shape names and per-QUERY-head weights for GPT-2-like, Llama-like
  (grouped-query attention) and Gemma models, so later analyses never special-case them;
* gives hook names that do not depend on the bridge's mode, explicit-BOS tokenisation and a
  token frequency ranking;
* keeps TransformerLens habits: ``to_tokens`` / ``to_str_tokens`` / ``to_string`` take
  TransformerLens's arguments, ``model.to(...)``, ``.eval()``, ``.half()``, ``.cuda()`` and
  ``with model.hooks(...)`` give back the wrapper (never the bare bridge), and ``dir(model)``
  lists the bridge's names too (tab completion). Where mechicl deliberately differs
  (per-query-head ``W_K``/``W_V``; BOS added by id whatever the tokenizer's default; a list of
  token ids is one sequence for ``to_str_tokens``), docs/interop.md says so.

The bridge stays in its default mode: its logits equal the Hugging Face model's exactly. Analyses
that want HookedTransformer-style folded weights (OV circuits) use :meth:`HookedModel.folded_weights`.

Axis names used across mechicl: ``layer head kv_head batch pos query_pos key_pos d_model d_head
d_vocab``.
"""

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import inspect
import json
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import einops
import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechicl._version import __version__
from mechicl.model.kernels import (
    choose_linear_kernel,
    invalidate_packed,
    packed_kernel_available,
    set_linear_kernel,
)
from mechicl.model.tokens import FrequencyRanking, frequency_ranking

logger = logging.getLogger(__name__)

__all__ = [
    "HOOK_KINDS",
    "FoldedWeights",
    "HookKind",
    "HookedModel",
    "as_hooked_model",
    "weights_description",
]


# Canonical TransformerLens hook names by kind; ``{layer}`` is filled in by hook_name().
HOOK_KINDS: dict[str, str] = {
    "embed": "hook_embed",
    "pos_embed": "hook_pos_embed",
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "q": "blocks.{layer}.attn.hook_q",
    "k": "blocks.{layer}.attn.hook_k",
    "v": "blocks.{layer}.attn.hook_v",
    "z": "blocks.{layer}.attn.hook_z",
    "rot_q": "blocks.{layer}.attn.hook_rot_q",
    "rot_k": "blocks.{layer}.attn.hook_rot_k",
    "attn_scores": "blocks.{layer}.attn.hook_attn_scores",
    "pattern": "blocks.{layer}.attn.hook_pattern",
    "result": "blocks.{layer}.attn.hook_result",
    "mlp_pre": "blocks.{layer}.mlp.hook_pre",
    "mlp_post": "blocks.{layer}.mlp.hook_post",
    "final_resid": "ln_final.hook_in",
}
_CANONICAL_RE = re.compile(
    "^(" + "|".join(re.escape(p).replace(r"\{layer\}", r"\d+") for p in HOOK_KINDS.values()) + ")$"
)

HookKind = Literal[
    "embed", "pos_embed", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "q", "k",
    "v", "z", "rot_q", "rot_k", "attn_scores", "pattern", "result", "mlp_pre", "mlp_post",
    "final_resid",
]


@dataclass(frozen=True, kw_only=True)
class FoldedWeights:
    """Weights with normalisation scales folded in, per query head (KV heads expanded).

    The linear path of a head's OV circuit is ``W_E -> norm -> W_V -> W_O -> norm -> W_U``;
    each norm is ``(centre?) -> divide by a positive per-position scalar -> * g (+ b)``. Folding
    ``g`` into the next weight (and the centring projection for LayerNorm) gives matrices whose
    product is the circuit up to a positive scalar, as HookedTransformer's ``fold_ln`` does.
    Biases are not part of these linear maps.

    Attributes:
        W_E: ``[d_vocab, d_model]`` token embeddings as the residual stream sees them (with the
            embedding scale of Gemma-like models).
        W_Q, W_K, W_V: ``[layer, head, d_model, d_head]`` with the layer's attention-input norm
            folded in.
        W_O: ``[layer, head, d_head, d_model]`` (with a post-attention norm's scale folded in,
            for models that have one, e.g. Gemma).
        W_U: ``[d_model, d_vocab]`` with the final norm folded in.

    ``W_Q`` and ``W_K`` are None when the weights were folded for the OV circuit alone
    (``folded_weights(qk=False)``).
    """

    W_E: Float[Tensor, "d_vocab d_model"]
    W_Q: Float[Tensor, "layer head d_model d_head"] | None
    W_K: Float[Tensor, "layer head d_model d_head"] | None
    W_V: Float[Tensor, "layer head d_model d_head"]
    W_O: Float[Tensor, "layer head d_head d_model"]
    W_U: Float[Tensor, "d_model d_vocab"]


@dataclass(frozen=True)
class _NormAffine:
    scale: Tensor  # [d_model]
    bias: Tensor  # [d_model]
    centres: bool  # LayerNorm subtracts the mean; RMSNorm does not


def _probe_norm(module: torch.nn.Module | None, d_model: int, dtype: torch.dtype,
                device: torch.device) -> _NormAffine:
    """Read a normalisation layer's affine part by probing it, whatever its parametrisation.

    For s = (+1, -1, +1, ...) (mean 0, rms 1) and a large c, any LayerNorm / RMSNorm maps c*s to
    s*g + b (the eps error is eps / (2 c^2)), so g = (N(cs) - N(-cs)) / (2s), b = (N(cs) + N(-cs)) / 2.
    This covers weight, (1 + weight) (Gemma) and missing weights alike. A norm centres its input
    iff it maps the constant vector to its bias (N(c1) == N(-c1)).
    """
    ones = torch.ones(d_model, dtype=dtype, device=device)
    if module is None:
        return _NormAffine(ones, torch.zeros_like(ones), False)
    c = 1e3
    sign = torch.ones(d_model, dtype=dtype, device=device)
    sign[1::2] = -1.0
    if d_model % 2:
        sign[-1] = 0.0  # keep the mean at zero; this coordinate's scale is read below
    with torch.no_grad():
        probe = torch.stack([c * sign, -c * sign, c * ones, -c * ones])
        out = module(probe[:, None, :].to(dtype))[:, 0, :].to(dtype)
        scale = (out[0] - out[1]) / (2 * torch.where(sign == 0, ones, sign))
        bias = (out[0] + out[1]) / 2
        centres = bool(torch.allclose(out[2], out[3], atol=1e-4))
        if d_model % 2:
            if centres:  # this coordinate did not move: its scale is unobservable from s
                scale[-1] = scale[:-1].mean()
            else:
                scale[-1] = (out[2, -1] - out[3, -1]) / 2
    return _NormAffine(scale, bias, centres)


class HookedModel:
    """A thin wrapper around a TransformerLens ``TransformerBridge`` with a uniform head view.

    Anything not defined here is looked up on the bridge, so ``model.run_with_hooks(...)``,
    ``model.run_with_cache(...)``, ``model.hooks(...)`` and ``model.cfg`` work as in
    TransformerLens. The raw bridge is ``model.bridge``.

    Note that ``W_K``/``W_V``/``b_K``/``b_V`` here are per QUERY head (grouped-query KV heads
    repeated), unlike the bridge's own ``W_K``/``W_V`` which have ``n_kv_heads`` heads.

    Args:
        bridge: a booted ``TransformerBridge``.
        name: short name of the model (built-in name, folder name or hub id).
        hf_id: the Hugging Face id it corresponds to, if known.
        source: where the weights were loaded from.
        weights: what :func:`~mechicl.model.load_model` knows about the weights' file: their
            ``format`` and, for GGUF files, their quantisation (see :meth:`weights_info`). Without
            ``quantisation``, the quantisation is read from the model's config.
    """

    def __init__(self, bridge: Any, *, name: str, hf_id: str | None = None,
                 source: str | None = None, weights: Mapping[str, Any] | None = None) -> None:
        self.bridge = bridge
        self.name = name
        self.hf_id = hf_id
        self.source = source
        self._weights: dict[str, Any] = dict(weights) if weights is not None else {}
        cfg = bridge.cfg
        self.n_layers: int = int(cfg.n_layers)
        self.n_heads: int = int(cfg.n_heads)
        n_kv = getattr(cfg, "n_key_value_heads", None)
        self.n_kv_heads: int = int(n_kv) if n_kv else self.n_heads
        self.d_head: int = int(cfg.d_head)
        self.d_model: int = int(cfg.d_model)
        self.d_vocab: int = int(cfg.d_vocab)
        self.n_ctx: int = int(cfg.n_ctx)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of "
                             f"n_kv_heads={self.n_kv_heads}")
        self.linear_kernel_info: dict[str, Any] = {"asked": "plain"}
        self._packed_layers = 0

    def use_linear_kernel(self, kernel: str = "auto") -> str:
        """Run the blocks' linear layers on ``F.linear`` (``"plain"``) or on oneDNN's kernel
        over weights packed once (``"packed"``; ``"auto"`` measures which is faster here), see
        :mod:`mechicl.model.kernels`. :func:`~mechicl.model.load_model` calls it
        (``linear_kernel="auto"``). Results differ only by float32 summation order.

        Returns:
            The kernel now in use, as :attr:`linear_kernel` gives it; why (what ``"auto"``
            measured) is in :attr:`linear_kernel_info`.

        >>> from mechicl.testing import tiny_model
        >>> model = as_hooked_model(tiny_model())
        >>> model.use_linear_kernel("plain")
        'plain'
        """
        hf = getattr(self.bridge, "original_model", None)
        if hf is None:
            if kernel == "packed":
                raise ValueError("linear_kernel='packed' needs a bridge over a Hugging Face model "
                                 "(bridge.original_model); this bridge has none")
            self.linear_kernel_info = {"asked": kernel, "reason": "no Hugging Face model"}
            return self.linear_kernel
        chosen, self.linear_kernel_info = choose_linear_kernel(hf, kernel)
        self._packed_layers = set_linear_kernel(hf, "packed" if chosen == "packed" else "plain")
        logger.info("%s: linear layers on the %s kernel (%s)", self.name, chosen,
                    self.linear_kernel_info)
        return self.linear_kernel

    @property
    def linear_kernel(self) -> str:
        """``"packed"`` when the blocks' linear layers run on packed weights (set and still
        float32 on a CPU), else ``"plain"``; provenance of results, not part of their keys."""
        if not self._packed_layers:
            return "plain"
        weight = next((p for p in self.bridge.parameters()), None)
        return "packed" if weight is not None and packed_kernel_available(weight) else "plain"

    def __getattr__(self, item: str) -> Any:
        # Only called for attributes not found on the wrapper: delegate to the bridge. A bridge
        # method that returns the bridge itself (``eval``, ``half``, ``float``, ``train``,
        # ``requires_grad_``, ...) returns this wrapper instead, so chained calls keep the
        # per-query-head view.
        if item == "bridge":
            raise AttributeError(item)
        attr = getattr(self.bridge, item)
        if inspect.ismethod(attr) and attr.__self__ is self.bridge:
            return self._returning_self(attr)
        return attr

    def _returning_self(self, method: Any) -> Any:
        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            dtype = self.dtype
            out = method(*args, **kwargs)
            if out is self.bridge:
                self._changed(dtype)
                return self
            return out

        return call

    def _changed(self, dtype_before: torch.dtype) -> None:
        # The weights hash covers dtypes: a cast (``half()``, ``to(torch.bfloat16)``) changes it.
        if self.dtype != dtype_before:
            self.weights_changed()

    def weights_changed(self, known_hash: str | None = None) -> None:
        """Say the weights were changed in place (pruned, edited, restored): :attr:`weights_hash`
        (the key of stored results) is recomputed when next read, or is ``known_hash`` (e.g. the
        hash from before a change that was undone bit-exactly).

        >>> from mechicl.testing import tiny_model
        >>> model = as_hooked_model(tiny_model())
        >>> before = model.weights_hash
        >>> with torch.no_grad():
        ...     model.bridge.original_model.lm_head.weight[0, 0] += 1.0
        >>> model.weights_changed()
        >>> model.weights_hash == before
        False
        """
        self.__dict__.pop("weights_hash", None)
        hf = getattr(self.bridge, "original_model", None)
        if hf is not None:
            invalidate_packed(hf)  # packed copies of the old weights
        if known_hash is not None:
            self.__dict__["weights_hash"] = known_hash

    def __dir__(self) -> list[str]:
        # Tab completion in Jupyter: the wrapper's names and the bridge's.
        return sorted(set(super().__dir__()) | set(dir(self.bridge)))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.bridge(*args, **kwargs)

    # ---- devices and dtypes: like nn.Module, returning the wrapper ----------------------

    def to(self, *args: Any, print_details: bool = False, **kwargs: Any) -> "HookedModel":
        """Move and / or cast the model, as ``torch.nn.Module.to``; returns this model.

        The bridge's own ``to`` prints what it moves unless ``print_details=False``; mechicl
        logs it instead (library code does not print).

        >>> model.to("cpu") is model, model.to(torch.float32).W_K.shape
        (True, torch.Size([2, 4, 64, 16]))
        """
        dtype = self.dtype
        logger.info("moving %s: to(%s)", self.name,
                    ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())]))
        self.bridge.to(*args, print_details=print_details, **kwargs)
        self._changed(dtype)
        return self

    def cuda(self, device: int | str | torch.device | None = None) -> "HookedModel":
        """Move to a CUDA device (``device``: an index or device; default the current one)."""
        if device is None:
            return self.to("cuda")
        return self.to(f"cuda:{device}" if isinstance(device, int) else device)

    def cpu(self) -> "HookedModel":
        """Move to the CPU."""
        return self.to("cpu")

    def mps(self) -> "HookedModel":
        """Move to Apple's MPS device."""
        return self.to("mps")

    @contextlib.contextmanager
    def hooks(self, *args: Any, **kwargs: Any) -> Iterator["HookedModel"]:
        """The bridge's ``hooks(fwd_hooks=..., bwd_hooks=..., ...)`` context, yielding this
        model (as HookedTransformer's yields itself)."""
        with self.bridge.hooks(*args, **kwargs):
            yield self

    def __repr__(self) -> str:
        return (f"HookedModel({self.name!r}, n_layers={self.n_layers}, n_heads={self.n_heads}, "
                f"n_kv_heads={self.n_kv_heads}, d_head={self.d_head}, d_model={self.d_model}, "
                f"d_vocab={self.d_vocab})")

    # ---- shapes -------------------------------------------------------------------------

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for multi-head attention)."""
        return self.n_heads // self.n_kv_heads

    @property
    def device(self) -> torch.device:
        """Where inputs go: the first parameter's device, or, when accelerate has offloaded the
        weights (``device_map`` with ``"cpu"`` / ``"disk"`` entries; they wait on the meta
        device between calls), the device it computes on."""
        device = next(self.bridge.parameters()).device
        if device.type != "meta":
            return device
        hook = getattr(self.bridge.original_model, "_hf_hook", None)
        execution = getattr(hook, "execution_device", None)
        return torch.device(execution) if execution is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return next(self.bridge.parameters()).dtype

    def kv_head_of(self, head: int) -> int:
        """The KV head (group) that query head ``head`` reads keys and values from."""
        if not 0 <= head < self.n_heads:
            raise ValueError(f"head {head} is out of range 0..{self.n_heads - 1}")
        return head // self.group_size

    # ---- weights, per query head ----------------------------------------------------------

    def _expand_kv(self, w: Tensor) -> Tensor:
        # HF's repeat_kv: KV head j serves query heads j*g .. j*g+g-1.
        return einops.repeat(w, "layer kv_head ... -> layer (kv_head group) ...",
                             group=self.group_size)

    def _stacked(self, name: str, shape: tuple[int, ...]) -> Tensor:
        try:
            return getattr(self.bridge, name).detach()
        except AttributeError:  # bias-free projections: the bridge raises, we give zeros
            return torch.zeros(shape, dtype=self.dtype, device=self.device)

    @property
    def W_Q(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self.bridge.W_Q.detach()

    @property
    def W_K(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self._expand_kv(self.bridge.W_K.detach())

    @property
    def W_V(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self._expand_kv(self.bridge.W_V.detach())

    @property
    def W_O(self) -> Float[Tensor, "layer head d_head d_model"]:
        return self.bridge.W_O.detach()

    @property
    def b_Q(self) -> Float[Tensor, "layer head d_head"]:
        return self._stacked("b_Q", (self.n_layers, self.n_heads, self.d_head))

    @property
    def b_K(self) -> Float[Tensor, "layer head d_head"]:
        return self._expand_kv(self._stacked("b_K", (self.n_layers, self.n_kv_heads, self.d_head)))

    @property
    def b_V(self) -> Float[Tensor, "layer head d_head"]:
        return self._expand_kv(self._stacked("b_V", (self.n_layers, self.n_kv_heads, self.d_head)))

    @property
    def b_O(self) -> Float[Tensor, "layer d_model"]:
        return self._stacked("b_O", (self.n_layers, self.d_model))

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        """Token embeddings as they enter the residual stream (Gemma's sqrt(d_model) included:
        then a scaled copy)."""
        w = self.bridge.W_E.detach()
        scale = self.embedding_scale
        return w * scale.to(w.dtype) if scale is not None else w

    @property
    def embedding_scale(self) -> Tensor | None:
        """The factor token embeddings are multiplied by as they enter the residual stream
        (Gemma: sqrt(d_model)); None for models without one."""
        scale = getattr(self._original(self.bridge.embed), "embed_scale", None)
        return scale if isinstance(scale, Tensor) else None

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        """The unembedding, without the final norm (see :meth:`folded_weights`)."""
        return self.bridge.W_U.detach()

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        return self._stacked("b_U", (self.d_vocab,))

    @staticmethod
    def _original(component: Any) -> Any:
        return getattr(component, "original_component", None) or component

    def _norm(self, component: Any) -> _NormAffine:
        module = None if component is None else self._original(component)
        return _probe_norm(module, self.d_model, self.dtype, self.device)

    def norm_affines(self) -> dict[str, Tensor]:
        """The affine scale of every normalisation on the OV path, read by probing.

        Returns a dict with ``ln1`` ``[layer, d_model]`` (attention input), ``ln1_post``
        ``[layer, d_model]`` (post-attention norm, ones if absent), ``ln_final`` ``[d_model]``
        and the bool tensors ``ln1_centres`` ``[layer]``, ``ln_final_centres`` ``[]``.
        """
        blocks = self.bridge.blocks
        ln1 = [self._norm(getattr(b, "ln1", None)) for b in blocks]
        post = [self._norm(getattr(b, "ln1_post", None)) for b in blocks]
        final = self._norm(getattr(self.bridge, "ln_final", None))
        return {
            "ln1": torch.stack([n.scale for n in ln1]),
            "ln1_post": torch.stack([n.scale for n in post]),
            "ln_final": final.scale,
            "ln1_centres": torch.tensor([n.centres for n in ln1]),
            "ln_final_centres": torch.tensor(final.centres),
        }

    def folded_weights(self, *, center_unembed: bool = True, qk: bool = True) -> FoldedWeights:
        """Per-query-head weights with the norms folded in, as HookedTransformer processes them.

        This is the right view for OV/QK-circuit analysis (e.g. the OV eigenvalue copying
        score) and equals the bridge's compatibility mode (``fold_ln``,
        ``center_writing_weights``, ``center_unembed``), without switching the bridge's mode:

        * the attention-input norm scale ``g`` multiplies the rows of W_Q/W_K/W_V, and the final
          norm's the rows of W_U; a post-attention norm's (Gemma) multiplies the columns of W_O;
        * for LayerNorm models (which centre their inputs), reading weights get the centring
          projection ``P = I - 11^T/d`` and writing weights (W_E, W_O) are centred too;
        * with ``center_unembed``, W_U has its mean over the vocabulary removed (softmax is
          invariant to that).

        With ``qk=False`` W_Q and W_K are left out (None): an OV-circuit analysis then holds
        two per-head tensors, not four. Key and value weights are folded per key/value head,
        then expanded to the query heads.
        """
        norms = self.norm_affines()
        d = self.d_model
        layer_norm = bool(norms["ln1_centres"].any())
        centre = (torch.eye(d, dtype=self.dtype, device=self.device) - 1.0 / d
                  if layer_norm or bool(norms["ln_final_centres"]) else None)

        def read(w: Tensor) -> Tensor:  # [layer, head or kv_head, d_model, d_head]
            w = w * norms["ln1"][:, None, :, None]
            if not layer_norm:  # RMSNorm everywhere: nothing to centre (no two more copies)
                return w
            centred = torch.einsum("ij,lhjk->lhik", centre, w)
            return torch.where(norms["ln1_centres"][:, None, None, None], centred, w)

        W_E = self.W_E
        W_O = self.W_O * norms["ln1_post"][:, None, None, :]
        if layer_norm:
            W_E = W_E - W_E.mean(-1, keepdim=True)
            W_O = W_O - W_O.mean(-1, keepdim=True)
        # a new tensor, centred in place: the vocabulary-sized matrix exists once more, not
        # twice (Gemma 3's is 0.67 GB in float32)
        W_U = self.W_U * norms["ln_final"][:, None]
        if bool(norms["ln_final_centres"]):
            W_U = centre @ W_U
        if center_unembed:
            W_U -= W_U.mean(-1, keepdim=True)
        return FoldedWeights(
            W_E=W_E, W_Q=read(self.W_Q) if qk else None,
            W_K=self._expand_kv(read(self.bridge.W_K.detach())) if qk else None,
            W_V=self._expand_kv(read(self.bridge.W_V.detach())), W_O=W_O, W_U=W_U)

    # ---- hooks --------------------------------------------------------------------------

    def hook_name(self, kind: HookKind, layer: int | None = None) -> str:
        """The canonical TransformerLens hook name of ``kind`` (at ``layer``).

        >>> model.hook_name("pattern", 1)
        'blocks.1.attn.hook_pattern'
        """
        if kind not in HOOK_KINDS:
            raise ValueError(f"unknown hook kind {kind!r}; allowed: {sorted(HOOK_KINDS)}")
        template = HOOK_KINDS[kind]
        if "{layer}" in template:
            if layer is None or not 0 <= layer < self.n_layers:
                raise ValueError(f"hook kind {kind!r} needs a layer in 0..{self.n_layers - 1}, "
                                 f"got {layer!r}")
            return template.format(layer=layer)
        return template

    def hook_names(self, kind: HookKind) -> list[str]:
        """``hook_name(kind, layer)`` for every layer."""
        return [self.hook_name(kind, layer) for layer in range(self.n_layers)]

    @functools.cached_property
    def _canonical_by_hook(self) -> dict[int, str]:
        # Several names alias one hook point; prefer the canonical TransformerLens name.
        by_id: dict[int, str] = {}
        for name, hook in self.bridge.hook_dict.items():
            current = by_id.get(id(hook))
            if current is None or (_CANONICAL_RE.match(name) and not _CANONICAL_RE.match(current)):
                by_id[id(hook)] = name
        return by_id

    def canonical_hook_name(self, name: str) -> str:
        """Map any name of a hook point (e.g. ``blocks.5.attn.o.hook_in`` in the bridge's
        default mode) to its canonical TransformerLens name (``blocks.5.attn.hook_z``)."""
        hook = self.bridge.hook_dict.get(name)
        if hook is None:
            raise ValueError(f"{name!r} is not a hook point of this model")
        return self._canonical_by_hook[id(hook)]

    # ---- tokens -------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self.bridge.tokenizer

    @property
    def bos_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        if bos is None:
            raise ValueError(f"the tokenizer of {self.name!r} has no BOS token; "
                             "pass prepend_bos=False")
        return int(bos)

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0

    def encode(self, text: str, *, prepend_bos: bool = True) -> list[int]:
        """Token ids of ``text``; BOS is added iff ``prepend_bos``, whatever the tokenizer's
        own default (tokenizers differ; mechicl never relies on them)."""
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return [self.bos_token_id, *ids] if prepend_bos else ids

    def _default_prepend_bos(self, prepend_bos: bool | None) -> bool:
        # TransformerLens's rule: None means the config's default_prepend_bos (True unless set).
        if prepend_bos is None:
            return bool(getattr(self.cfg, "default_prepend_bos", True))
        return bool(prepend_bos)

    def _default_padding_side(self, padding_side: str | None) -> str:
        side = padding_side if padding_side is not None else (
            getattr(self.tokenizer, "padding_side", None) or "right")
        if side not in ("right", "left"):
            raise ValueError(f"padding_side {side!r} is not 'right' or 'left'")
        return side

    def to_tokens(
        self,
        input: str | Sequence[str],
        prepend_bos: bool | None = None,
        padding_side: Literal["right", "left"] | None = None,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> Int[Tensor, "batch pos"]:
        """Tokenise one text or a batch, with TransformerLens's signature.

        Args:
            input: a string or a list of strings.
            prepend_bos: add BOS (by id, whatever the tokenizer's own default); None means
                ``cfg.default_prepend_bos`` (True unless changed), as in TransformerLens. May be
                passed positionally.
            padding_side: where a batch of different lengths is padded (with
                :attr:`pad_token_id`); None means the tokenizer's ``padding_side``.
            move_to_device: put the tokens on the model's device (else they stay on the CPU).
            truncate: cut each sequence to ``n_ctx`` tokens.

        Returns:
            ``[batch, pos]`` token ids (one row for a single string). Use
            :meth:`to_tokens_and_mask` when the attention mask matters.

        >>> model.to_tokens("w1 w2"), model.to_tokens("w1 w2", False)
        (tensor([[0, 5, 6]]), tensor([[5, 6]]))
        >>> model.to_tokens(["w1", "w1 w2"], padding_side="left")
        tensor([[2, 0, 5],
                [0, 5, 6]])
        """
        return self.to_tokens_and_mask(input, prepend_bos, padding_side, move_to_device,
                                       truncate)[0]

    def to_tokens_and_mask(
        self,
        input: str | Sequence[str],
        prepend_bos: bool | None = None,
        padding_side: Literal["right", "left"] | None = None,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
        """Tokens (as :meth:`to_tokens`) and attention mask (1 = real token)."""
        side = self._default_padding_side(padding_side)
        bos = self._default_prepend_bos(prepend_bos)
        if isinstance(input, str):
            texts = [input]
        elif isinstance(input, Sequence) and all(isinstance(t, str) for t in input):
            texts = list(input)
        else:
            raise TypeError(f"to_tokens takes a string or a list of strings, got "
                            f"{type(input).__name__}")
        if not texts:
            raise ValueError("no text to tokenise: the list is empty")
        rows = [self.encode(t, prepend_bos=bos) for t in texts]
        if truncate:
            rows = [r[: self.n_ctx] for r in rows]
        width = max(len(r) for r in rows)
        tokens = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
            tokens[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
        if move_to_device:
            return tokens.to(self.device), mask.to(self.device)
        return tokens, mask

    def to_str_tokens(
        self,
        input: str | Sequence[str] | Sequence[int] | Tensor | np.ndarray,
        prepend_bos: bool | None = None,
        padding_side: Literal["right", "left"] | None = None,
    ) -> list[str] | list[list[str]]:
        """Each token as a string, with TransformerLens's signature and semantics.

        A string is tokenised (``prepend_bos`` and ``padding_side`` as in :meth:`to_tokens`)
        and gives one list; a list of strings gives one list per string. Token ids (a tensor or
        array of one sequence: ``[pos]``, ``[1, pos]`` or a scalar) give one list, each id
        decoded on its own. Unlike TransformerLens, a list of ints is one sequence of ids too
        (TransformerLens rejects it).

        >>> model.to_str_tokens("w1 w2")
        ['<bos>', 'w1', 'w2']
        >>> model.to_str_tokens(model.to_tokens("w1 w2")) == model.to_str_tokens([0, 5, 6])
        True
        >>> model.to_str_tokens(["w1", "w2 w3"], prepend_bos=False)
        [['w1'], ['w2', 'w3']]
        """
        if isinstance(input, str):
            ids = self.to_tokens(input, prepend_bos, padding_side, move_to_device=False)[0]
            return self._decode_each(ids.tolist())
        if isinstance(input, (Tensor, np.ndarray)):
            array = input.detach().cpu().numpy() if isinstance(input, Tensor) else input
            flat = np.atleast_1d(array.squeeze())
            if flat.ndim != 1:
                raise ValueError(f"to_str_tokens takes the ids of one sequence ([pos] or "
                                 f"[1, pos]), got shape {tuple(array.shape)}: pass one row")
            return self._decode_each([int(i) for i in flat.tolist()])
        if isinstance(input, Sequence):
            items = list(input)
            if all(isinstance(t, str) for t in items) and items:
                return [self.to_str_tokens(t, prepend_bos, padding_side) for t in items]
            if all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in items):
                return self._decode_each([int(t) for t in items])
        raise TypeError(f"to_str_tokens takes a string, a list of strings, or token ids (a "
                        f"tensor, array or list of ints), got {type(input).__name__}")

    def _decode_each(self, ids: list[int]) -> list[str]:
        # One id per decode call, as TransformerLens does (batch_decode of single-id lists;
        # transformers reads an empty batch as one empty sequence, hence the guard).
        if not ids:
            return []
        return list(self.tokenizer.batch_decode([[i] for i in ids],
                                                clean_up_tokenization_spaces=False))

    def to_single_token(self, string: str) -> int:
        """The id of a string that is exactly one token (without BOS).

        >>> model.to_single_token("w1")
        5
        """
        ids = self.encode(string, prepend_bos=False)
        if len(ids) != 1:
            raise ValueError(f"{string!r} is {len(ids)} tokens, not one: "
                             f"{self._decode_each(ids)}")
        return ids[0]

    @functools.cached_property
    def frequency_ranking(self) -> FrequencyRanking:
        """The tokenizer's token frequency ranking (see :func:`mechicl.model.tokens.frequency_ranking`)."""
        return frequency_ranking(self.tokenizer)

    # ---- provenance ---------------------------------------------------------------------

    @functools.cached_property
    def weights_hash(self) -> str:
        """SHA-256 over the model's parameters (names, shapes, dtypes, values), each tensor once
        (the bridge registers the same tensors under several names)."""
        digest = hashlib.sha256()
        params = sorted(_named_weights(self.bridge.original_model), key=lambda kv: kv[0])
        for key, module, name in params:
            with _materialised(module):  # offloaded weights are read back for the hash
                t = getattr(module, name).detach().to("cpu").contiguous()
                digest.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
                digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return digest.hexdigest()

    @functools.cached_property
    def tokenizer_hash(self) -> str:
        """SHA-256 of the tokenizer's vocabulary and special tokens."""
        tok = self.tokenizer
        vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
        payload = json.dumps({"vocab": vocab, "bos": tok.bos_token_id, "eos": tok.eos_token_id})
        return hashlib.sha256(payload.encode()).hexdigest()

    def weights_info(self) -> dict[str, Any]:
        """The weights' format and quantisation: ``info()["weights"]``.

        Keys: ``format`` (the file format they were read from: ``"gguf"``, ``"safetensors"``,
        ``"pytorch"``, or None when unknown, e.g. a bridge built in memory), ``quantisation``
        (the scheme, e.g. ``"Q4_1"`` or ``"bitsandbytes nf4"``; None when not quantised or
        unknown), ``quantised`` (True, False, or None when unknown), ``bits`` (the nominal bits
        of the quantised weights, from the scheme's name or config; None when not quantised or
        unknown) and ``loaded_as`` (the parameters' dtypes now, joined with ``+`` if several).
        GGUF files add ``file_type``, ``tensor_types``, ``bits_per_weight``, ``gguf_sha256``,
        ``dequantised_to``, ``read_from`` and, when something is unknown, ``note``.

        >>> w = model.weights_info()
        >>> w["format"], w["quantisation"], w["quantised"], w["bits"], w["loaded_as"]
        (None, None, False, None, 'float32')
        """
        original = getattr(self.bridge, "original_model", self.bridge)
        given = dict(self._weights)
        entry: dict[str, Any] = {"format": given.pop("format", None)}
        if "quantisation" in given:
            entry.update(quantisation=given.pop("quantisation"),
                         quantised=given.pop("quantised", None), bits=given.pop("bits", None))
        else:
            entry.update(_config_quantisation(getattr(original, "config", None)))
        entry["loaded_as"] = _loaded_as(original)
        return {**entry, **given}

    def info(self) -> dict[str, Any]:
        """Provenance of this model for result files: name, ids, hashes, dtype, the weights'
        format and quantisation (:meth:`weights_info`), shape, package versions."""
        versions: dict[str, str | None] = {"mechicl": __version__}  # not an install's metadata
        for pkg in ("torch", "transformer-lens", "transformers"):
            try:
                versions[pkg] = importlib.metadata.version(pkg)
            except importlib.metadata.PackageNotFoundError:
                versions[pkg] = None
        return {
            "name": self.name, "hf_id": self.hf_id, "source": self.source,
            "weights_sha256": self.weights_hash, "tokenizer_sha256": self.tokenizer_hash,
            "dtype": str(self.dtype).removeprefix("torch."),
            "weights": self.weights_info(),
            "shape": dataclasses.asdict(_Shape(self.n_layers, self.n_heads, self.n_kv_heads,
                                               self.d_head, self.d_model, self.d_vocab)),
            "versions": versions,
        }


def _config_quantisation(config: Any) -> dict[str, Any]:
    """``quantisation``, ``quantised``, ``bits`` (and ``method``) from a Hugging Face config's
    ``quantization_config`` (bitsandbytes, GPTQ, AWQ, ...); not quantised without one."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return {"quantisation": None, "quantised": False, "bits": None}
    raw = qc.to_dict() if hasattr(qc, "to_dict") else qc
    if not isinstance(raw, Mapping):
        return {"quantisation": None, "quantised": True, "bits": None,
                "note": f"quantization_config of type {type(qc).__name__} could not be read"}
    method = raw.get("quant_method")
    method = str(getattr(method, "value", method)) if method is not None else None
    bits = raw.get("bits")
    label = method
    if method == "bitsandbytes":
        four = raw.get("load_in_4bit") or raw.get("_load_in_4bit")
        eight = raw.get("load_in_8bit") or raw.get("_load_in_8bit")
        bits = 4 if four else 8 if eight else None
        label = (f"bitsandbytes {raw.get('bnb_4bit_quant_type') or '4-bit'}" if four
                 else "bitsandbytes int8" if eight else method)
    bits = int(bits) if isinstance(bits, int) and not isinstance(bits, bool) else None
    return {"quantisation": label, "quantised": True, "bits": bits, "method": method}


def _loaded_as(model: Any) -> str | None:
    """The dtypes of a model's parameters, e.g. ``"float32"`` (``"bfloat16+uint8"`` if mixed)."""
    try:
        dtypes = {str(p.dtype).removeprefix("torch.") for p in model.parameters()}
    except (AttributeError, TypeError):
        return None
    return "+".join(sorted(dtypes)) if dtypes else None


_FORMAT_NAMES = {"gguf": "GGUF", "safetensors": "safetensors", "pytorch": "PyTorch .bin"}


def weights_description(info: Mapping[str, Any] | None) -> str:
    """A short human description of a model's weights, for headers and captions.

    Takes a model's :meth:`HookedModel.info` (a result's ``model`` field) or its ``"weights"``
    entry. Unknown facts are said to be unknown, never guessed; results saved before the
    ``"weights"`` entry existed say so.

    >>> gguf = {"format": "gguf", "quantisation": "Q4_1", "quantised": True, "bits": 4,
    ...         "loaded_as": "float32", "dequantised_to": "float32"}
    >>> weights_description({"name": "smollm2-135m", "weights": gguf})
    '4-bit GGUF Q4_1, de-quantised to float32'
    >>> weights_description({**gguf, "loaded_as": "bfloat16"})
    '4-bit GGUF Q4_1, de-quantised to float32, loaded as bfloat16'
    >>> weights_description({"format": "safetensors", "quantisation": None, "quantised": False,
    ...                      "bits": None, "loaded_as": "float32"})
    'float32 safetensors (not quantised)'
    >>> weights_description({"name": "an older result"})
    'weights format and quantisation not recorded'
    """
    if info is None:
        return "weights format and quantisation not recorded"
    if "weights" in info:
        weights = info["weights"]
    elif any(k in info for k in ("format", "quantisation", "quantised")):
        weights = info
    else:
        weights = None
    if not isinstance(weights, Mapping):
        return "weights format and quantisation not recorded"
    fmt = weights.get("format")
    fmt_name = _FORMAT_NAMES.get(fmt, fmt) if fmt else None
    scheme, bits, quantised = weights.get("quantisation"), weights.get("bits"), weights.get("quantised")
    loaded, dequantised = weights.get("loaded_as"), weights.get("dequantised_to")
    note = weights.get("note")
    if quantised is False:
        if fmt == "gguf":
            text = f"GGUF {weights.get('file_type') or ''}".rstrip() + " (not quantised)"
        else:  # the dtype named is the one the weights were loaded as
            text = f"{loaded or 'unknown dtype'} {fmt_name or 'weights'} (not quantised)"
            return text if fmt_name else text + ", file format unknown"
    elif quantised is True and scheme:
        size = f"{bits}-bit " if bits else ""
        text = (f"{size}GGUF {scheme}" if fmt == "gguf"
                else f"{size}{scheme} quantised {fmt_name or 'weights'}")
        if weights.get("read_from") == "registry":
            text += " (declared by mechicl's model registry, not read from the file)"
    else:
        kind = "quantised " if quantised else ""
        text = f"{kind}{fmt_name or 'weights'} of unknown quantisation"
        if note:
            text += f" ({note})"
    if dequantised:
        text += f", {'de-quantised' if quantised else 'converted'} to {dequantised}"
        if loaded and loaded != dequantised:
            text += f", loaded as {loaded}"
    elif loaded:
        text += f", loaded as {loaded}"
    return text


def _named_weights(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, str]]:
    """``(qualified name, owning module, attribute)`` of every parameter, each tensor once, in
    ``named_parameters`` order."""
    out, seen = [], set()
    for prefix, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                out.append((f"{prefix}.{name}" if prefix else name, module, name))
    return out


@contextlib.contextmanager
def _materialised(module: torch.nn.Module) -> Iterator[None]:
    """Inside, a module whose weights accelerate offloaded (meta tensors) holds real ones."""
    if not any(p.device.type == "meta" for p in module.parameters(recurse=False)):
        yield
        return
    from accelerate.utils import align_module_device

    with align_module_device(module, torch.device("cpu")):
        yield


@dataclass(frozen=True)
class _Shape:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    d_vocab: int


def as_hooked_model(model: Any, *, name: str | None = None) -> HookedModel:
    """Wrap a bare ``TransformerBridge`` (or return a :class:`HookedModel` unchanged)."""
    if isinstance(model, HookedModel):
        return model
    if not hasattr(model, "cfg") or not hasattr(model, "run_with_hooks"):
        raise TypeError(f"expected a HookedModel or TransformerBridge, got {type(model).__name__}")
    return HookedModel(model, name=name or str(getattr(model.cfg, "model_name", "model")))

