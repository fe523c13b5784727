"""Activation patching: which activations carry the information that changes the answer.

Run a prompt pair: a *clean* prompt and a *corrupted* one that differs in a key detail (e.g. IOI
names, Wang et al. 2022). Replace one activation of one run by its value in the other run and
score the output with a metric. *Denoising* (the default, as TransformerLens's ``patching``)
runs the corrupted prompt with a clean activation patched in: a large effect means the activation
suffices to restore the clean behaviour. *Noising* runs the clean prompt with a corrupted
activation: a large effect means the activation is necessary.

Targets (``target=``), each by layer (``by_pos=False``, every position at once) or by layer and
position (``by_pos=True``):

==================  ============================  ==================================
target              all positions                 by position
==================  ============================  ==================================
``resid_pre``,      ``[layer]``                   ``[layer, pos]``
``resid_mid``,
``resid_post``,
``attn_out``,
``mlp_out``
``head_out`` (z),   ``[layer, head]``             ``[layer, pos, head]``
``q``, ``k``, ``v``
``pattern``         ``[layer, head]``             ``[layer, head, pos]`` (pos = query/dest)
==================  ============================  ==================================

The axis orders match TransformerLens's ``get_act_patch_*`` functions, and the numbers equal
theirs (tested to 1e-4 on tiny models and on SmolLM2). One caveat: in the bridge,
``blocks.L.hook_resid_mid`` is the MLP norm's input (``ln2.hook_in``), so a value returned there
reaches the MLP but not the skip connection around it. mechicl patches the residual stream
itself (the MLP input and, by the same change, ``hook_resid_post``); TransformerLens's
``get_act_patch_resid_mid`` on a bridge does so only under ``torch.no_grad()`` (with autograd on
it copies the activation and patches the MLP input alone).

Grouped-query attention: ``hook_k``/``hook_v`` hold one key/value vector per KV head, shared by
the query heads of its group. With ``kv_heads="group"`` (the default, TransformerLens's
behaviour) ``k``/``v`` results are ``[layer, kv_head]``: patching a KV head changes what every
query head of its group reads. With ``kv_heads="query"`` they are ``[layer, head]`` over *query*
heads: only the patched query head sees the other run's keys/values; the others of its group keep
theirs. mechicl computes that view exactly from the hooks (the query head's attention scores
``scale * q . k`` and its output ``pattern @ v``); for multi-head attention both views coincide.

Speed: TransformerLens runs one full forward pass per patched cell. mechicl runs many patched
copies of a prompt in one pass, and runs the layers below the lowest patched layer once for all
copies (:mod:`mechicl._forward`); built-in metrics unembed only the answer position.

Axis names: ``layer head kv_head pos pair copy d_head d_model``.
"""

import logging
import os
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from einops import einsum, repeat
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechicl._checks import check_choice
from mechicl._forward import Hook, run_copies
from mechicl.metrics import Metric, MetricFn, resolve_metric
from mechicl.models import HookedModel, as_hooked_model
from mechicl.pairs import PromptPairs
from mechicl.results import HeadScores, _read_folder, _write_folder

logger = logging.getLogger(__name__)

__all__ = ["TARGETS", "PatchResult", "Target", "patch", "target_axes"]

Target = Literal["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "head_out", "q",
                 "k", "v", "pattern"]
TARGETS: tuple[str, ...] = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out",
                            "head_out", "q", "k", "v", "pattern")
Direction = Literal["denoising", "noising"]
DIRECTIONS: tuple[str, ...] = ("denoising", "noising")
KVHeads = Literal["group", "query"]
KV_VIEWS: tuple[str, ...] = ("group", "query")
FORMAT_VERSION = 1

# target -> (hook kind, activation layout)
_SPECS: dict[str, tuple[str, str]] = {
    "resid_pre": ("resid_pre", "resid"), "resid_mid": ("resid_mid", "resid"),
    "resid_post": ("resid_post", "resid"), "attn_out": ("attn_out", "resid"),
    "mlp_out": ("mlp_out", "resid"), "head_out": ("z", "head"), "q": ("q", "head"),
    "k": ("k", "head"), "v": ("v", "head"), "pattern": ("pattern", "pattern"),
}
# TransformerLens's names for the same axes (index_df columns)
_TL_AXES = {"head_index": "head", "dest_pos": "pos"}


def target_axes(model: HookedModel, target: str, *, by_pos: bool = False,
                kv_heads: str = "group", n_pos: int | None = None,
                ) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The result axes of ``target`` and their sizes (``n_pos`` = prompt length).

    >>> target_axes(model, "head_out", by_pos=True, n_pos=15)  # doctest: +SKIP
    (('layer', 'pos', 'head'), (30, 15, 9))
    """
    check_choice("target", target, TARGETS)
    check_choice("kv_heads", kv_heads, KV_VIEWS)
    layout = _SPECS[target][1]
    grouped = target in ("k", "v") and kv_heads == "group" and model.group_size > 1
    head_axis, n_head = ("kv_head", model.n_kv_heads) if grouped else ("head", model.n_heads)
    pos = n_pos if n_pos is not None else -1
    if layout == "resid":
        return (("layer", "pos"), (model.n_layers, pos)) if by_pos else (("layer",), (model.n_layers,))
    if layout == "head":
        if by_pos:
            return ("layer", "pos", head_axis), (model.n_layers, pos, n_head)
        return ("layer", head_axis), (model.n_layers, n_head)
    if by_pos:
        return ("layer", "head", "pos"), (model.n_layers, model.n_heads, pos)
    return ("layer", "head"), (model.n_layers, model.n_heads)


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class PatchResult:
    """The result of activation, path or attribution patching.

    Attributes:
        target: what was patched (``"head_out"``, ``"resid_pre"``, ... or ``"path:q"``).
        axes: names of the result axes, e.g. ``("layer", "head")`` or ``("layer", "pos", "head")``.
        values: the score of each cell: the metric averaged over pairs (normalised if
            ``normalized``); NaN for cells not computed (see ``cells=``) or that cannot have an
            effect (path patching).
        per_pair: ``[*axes, pair]`` the raw metric of each cell for each pair (None when a user
            metric returns one number for the whole batch).
        clean: the unpatched clean run's metric (``[pair]``, or a scalar).
        corrupted: the unpatched corrupted run's metric (same shape).
        metric: the metric's name.
        normalized: whether ``values`` are ``(patched - corrupted) / (clean - corrupted)``.
        direction: ``"denoising"`` (corrupted run, clean activations patched in) or
            ``"noising"`` (clean run, corrupted activations patched in).
        method: ``"activation"``, ``"path"`` or ``"attribution"``.
        labels: per-axis tick labels, e.g. ``{"pos": [tokens of the first clean prompt]}``.
        params: the protocol (JSON-serialisable).
        model: the model's provenance.
    """

    target: str
    axes: tuple[str, ...]
    values: Float[Tensor, "..."]
    per_pair: Float[Tensor, "... pair"] | None
    clean: Float[Tensor, "..."]
    corrupted: Float[Tensor, "..."]
    metric: str
    normalized: bool
    direction: str
    method: str = "activation"
    labels: dict[str, list[str]] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def baseline(self) -> float:
        """The score of an unpatched run in this direction (0 denoising / 1 noising when
        normalised; the raw corrupted or clean metric otherwise)."""
        if self.normalized:
            return 0.0 if self.direction == "denoising" else 1.0
        base = self.corrupted if self.direction == "denoising" else self.clean
        return float(base.float().mean())

    def effect(self) -> Float[Tensor, "..."]:
        """``values - baseline``: what each patch changes."""
        return self.values - self.baseline

    def to_dataframe(self) -> pd.DataFrame:
        """One row per computed cell: the axis indices, ``value``, ``effect`` and, with
        per-pair values, ``std`` over pairs."""
        idx = torch.nonzero(~torch.isnan(self.values))
        data: dict[str, Any] = {a: idx[:, i].numpy() for i, a in enumerate(self.axes)}
        flat = self.values[tuple(idx.T)]
        data["value"] = flat.numpy()
        data["effect"] = (flat - self.baseline).numpy()
        if self.per_pair is not None and self.per_pair.shape[-1] > 1:
            data["std"] = self.per_pair[tuple(idx.T)].float().std(-1).numpy()
        df = pd.DataFrame(data)
        df.insert(0, "target", self.target)
        return df

    def top(self, k: int = 10, *, by: Literal["effect", "abs_effect"] = "abs_effect"
            ) -> list[tuple[tuple[int, ...], float]]:
        """The ``k`` cells with the largest (absolute) effect, as ``(index tuple, value)``."""
        check_choice("by", by, ("effect", "abs_effect"))
        eff = self.effect()
        key = eff.abs() if by == "abs_effect" else eff
        key = torch.nan_to_num(key, nan=-float("inf"))
        order = torch.argsort(key.flatten(), descending=True, stable=True)[:k]
        out = []
        for flat in order.tolist():
            index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), self.values.shape))
            out.append((index, float(self.values[index])))
        return out

    def head_scores(self, name: str | None = None) -> HeadScores:
        """The result as :class:`~mechicl.results.HeadScores` (``[layer, head]`` results only),
        per-pair rows as "seeds", for heatmaps and overlap analysis."""
        if self.axes not in (("layer", "head"), ("layer", "kv_head")):
            raise ValueError(f"head_scores needs a [layer, head] result, this one is {self.axes}")
        name = name or f"patch_{self.target}"
        if self.per_pair is None or self.normalized:
            per = self.values[None]
        else:
            per = self.per_pair.permute(2, 0, 1)
        scores = HeadScores.from_per_seed(name, per, params=self.params, model=self.model)
        # the reported values (normalised or mean) are the mean
        return HeadScores(name=name, mean=self.values.double(), var=scores.var,
                          per_seed=scores.per_seed, params=self.params, model=self.model)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write as a folder (``tensors.safetensors`` + ``meta.json``), atomically."""
        tensors = {"values": self.values, "clean": self.clean, "corrupted": self.corrupted}
        if self.per_pair is not None:
            tensors["per_pair"] = self.per_pair
        params = {"format": FORMAT_VERSION, "target": self.target, "axes": list(self.axes),
                  "metric": self.metric, "normalized": self.normalized,
                  "direction": self.direction, "method": self.method, "labels": self.labels,
                  "protocol": self.params}
        return _write_folder(path, "PatchResult", self.target, params, self.model, tensors)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "PatchResult":
        meta, t = _read_folder(path, "PatchResult")
        p = meta["params"]
        return cls(target=p["target"], axes=tuple(p["axes"]), values=t["values"],
                   per_pair=t.get("per_pair"), clean=t["clean"], corrupted=t["corrupted"],
                   metric=p["metric"], normalized=p["normalized"], direction=p["direction"],
                   method=p["method"], labels=p["labels"], params=p["protocol"],
                   model=meta["model"])


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    """Prompt pairs as unpadded token rows (private to the patching modules)."""

    clean: list[Tensor]
    corrupted: list[Tensor]
    answer: Tensor | None
    wrong: Tensor | None
    pairs: PromptPairs | None

    def __len__(self) -> int:
        return len(self.clean)

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.clean]

    def describe(self) -> dict[str, Any]:
        if self.pairs is not None:
            return {"pairs": self.pairs.name, "n_pairs": len(self), **dict(self.pairs.params)}
        return {"pairs": "tokens", "n_pairs": len(self)}


def _token_rows(model: HookedModel, x: Any, what: str) -> list[Tensor]:
    if isinstance(x, str):
        x = [x]
    if isinstance(x, Tensor):
        if x.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{what} tokens must be integer ids, got {x.dtype}")
        x = x[None] if x.ndim == 1 else x
        if x.ndim != 2:
            raise ValueError(f"{what} tokens must be [batch, pos], got shape {tuple(x.shape)}")
        return [row.long().cpu() for row in x]
    if isinstance(x, Sequence) and x and all(isinstance(t, str) for t in x):
        return [torch.tensor(model.encode(t), dtype=torch.long) for t in x]
    raise TypeError(f"{what} must be a PromptPairs, a string, a list of strings or a [batch, pos] "
                    f"token tensor, got {type(x).__name__}")


def _token_ids(model: HookedModel, x: Any, n: int, what: str) -> Tensor | None:
    if x is None:
        return None
    if isinstance(x, (str, int)):
        x = [x] * n
    out = []
    for item in x.tolist() if isinstance(x, Tensor) else list(x):
        if isinstance(item, str):
            ids = model.encode(item, prepend_bos=False)
            if len(ids) != 1:
                raise ValueError(f"{what} {item!r} is {len(ids)} tokens "
                                 f"{model.to_str_tokens(ids)}; it must be a single token")
            item = ids[0]
        out.append(int(item))
    if len(out) != n:
        raise ValueError(f"{what} has {len(out)} entries for {n} prompt pairs")
    return torch.tensor(out, dtype=torch.long)


def as_inputs(model: HookedModel, clean: Any, corrupted: Any, answer: Any = None,
              wrong: Any = None) -> Inputs:
    """Normalise the accepted input forms (PromptPairs; strings; token tensors) to rows."""
    if isinstance(clean, PromptPairs):
        if corrupted is not None:
            raise ValueError("clean is a PromptPairs, which holds the corrupted prompts too: pass "
                             "corrupted=None (and the metric as metric=...)")
        if answer is not None or wrong is not None:
            raise ValueError("answer/wrong come from the PromptPairs; do not pass them")
        pairs = clean
        return Inputs([pairs.clean_tokens(i) for i in range(len(pairs))],
                      [pairs.corrupted_tokens(i) for i in range(len(pairs))],
                      pairs.answer.clone(), pairs.wrong.clone(), pairs)
    if corrupted is None:
        raise ValueError("corrupted prompts are missing (or pass a PromptPairs as clean)")
    c, k = _token_rows(model, clean, "clean"), _token_rows(model, corrupted, "corrupted")
    if len(c) != len(k):
        raise ValueError(f"{len(c)} clean prompts but {len(k)} corrupted prompts")
    for i, (a, b) in enumerate(zip(c, k, strict=True)):
        if len(a) != len(b):
            raise ValueError(f"pair {i}: clean has {len(a)} tokens, corrupted {len(b)}; patching "
                             f"needs token-aligned pairs (clean {model.to_str_tokens(a)}, "
                             f"corrupted {model.to_str_tokens(b)})")
    return Inputs(c, k, _token_ids(model, answer, len(c), "answer"),
                  _token_ids(model, wrong, len(c), "wrong"), None)


# --------------------------------------------------------------------------------------------
# Cells and hooks
# --------------------------------------------------------------------------------------------


def grid_cells(sizes: Sequence[int]) -> Int[Tensor, "cell axis"]:
    """Every index of a grid, last axis fastest (TransformerLens's cell order)."""
    grids = torch.meshgrid(*[torch.arange(s) for s in sizes], indexing="ij")
    return torch.stack([g.flatten() for g in grids], dim=-1)


def _user_cells(cells: Any, axes: tuple[str, ...], sizes: tuple[int, ...]) -> Tensor:
    if isinstance(cells, pd.DataFrame):
        df = cells.rename(columns={k: v for k, v in _TL_AXES.items() if k in cells.columns})
        df = df.rename(columns={"head": axes[-1]} if axes[-1] == "kv_head" and "head" in df else {})
        missing = [a for a in axes if a not in df.columns]
        if missing:
            raise ValueError(f"cells lack columns {missing}; this target's axes are {list(axes)}")
        out = torch.tensor(df[list(axes)].to_numpy(), dtype=torch.long)
    else:
        out = torch.as_tensor(cells, dtype=torch.long)
    if out.ndim != 2 or out.shape[1] != len(axes):
        raise ValueError(f"cells must be [n, {len(axes)}] indices over {list(axes)}, got shape "
                         f"{tuple(out.shape)}")
    for i, (a, s) in enumerate(zip(axes, sizes, strict=True)):
        bad = (out[:, i] < 0) | (out[:, i] >= s)
        if bad.any():
            raise ValueError(f"cell {out[bad][0].tolist()} has {a}={int(out[bad][0, i])} outside "
                             f"0..{s - 1}")
    return out


def _selection(layout: str, axes: tuple[str, ...], act_shape: tuple[int, ...],
               cells: Tensor, rows: Tensor, by_pos: bool) -> Tensor:
    """Boolean mask, broadcastable to the activation ``[copy, ...]``, selecting for each copy in
    ``rows`` the slice its cell patches."""
    col = {a: cells[rows, i] for i, a in enumerate(axes)}
    head = col.get("head", col.get("kv_head"))
    c = act_shape[0]
    if layout == "resid":  # [copy, pos, d_model]
        if by_pos:
            sel = torch.zeros(c, act_shape[1], 1, dtype=torch.bool)
            sel[rows, col["pos"]] = True
        else:
            sel = torch.zeros(c, 1, 1, dtype=torch.bool)
            sel[rows] = True
    elif layout == "head":  # [copy, pos, head, d_head]
        sel = torch.zeros(c, act_shape[1] if by_pos else 1, act_shape[2], 1, dtype=torch.bool)
        sel[rows, col["pos"] if by_pos else 0, head] = True
    else:  # pattern [copy, head, query_pos, key_pos]
        sel = torch.zeros(c, act_shape[1], act_shape[2] if by_pos else 1, 1, dtype=torch.bool)
        sel[rows, head, col["pos"] if by_pos else 0] = True
    return sel


def first_rows(x: Tensor, n: int) -> Tensor:
    """The first ``n`` rows of a per-copy tensor (``[copy, ...]``); a tensor shared by all
    copies (leading size 1) unchanged."""
    return x if x.shape[0] == 1 else x[:n]


def _replace_hook(sel: Tensor, source: Tensor) -> Hook:
    def hook(act: Tensor, hook: Any) -> Tensor:  # act: the first k copies
        n = act.shape[0]
        return torch.where(first_rows(sel, n).to(act.device), first_rows(source, n).to(act.dtype),
                           act)
    return hook


def _attention_scale(model: HookedModel, layer: int) -> float:
    attn = model.bridge.blocks[layer].attn
    module = getattr(attn, "original_component", None) or attn
    if getattr(module, "attn_logit_softcapping", None):
        raise ValueError("kv_heads='query' k-patching assumes scores = scale * q . k; this model "
                         "soft-caps its attention logits")
    scale = getattr(module, "scaling", None)
    return float(scale) if scale is not None else model.d_head ** -0.5


def _qk_kinds(model: HookedModel) -> tuple[str, str]:
    """Hook kinds holding the q and k that enter the scores (after rotary, if any)."""
    rotary = model.hook_name("rot_k", 0) in model.hook_dict
    return ("rot_q", "rot_k") if rotary else ("q", "k")


_SCORES_CHECKED: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def check_scores_reconstructable(model: HookedModel) -> None:
    """Check once per model that ``hook_attn_scores == scale * q_rot . k_rot`` (causal part),
    which the per-query-head k view relies on."""
    if model.bridge in _SCORES_CHECKED:
        return
    q_kind, k_kind = _qk_kinds(model)
    names = {model.hook_name(q_kind, 0), model.hook_name(k_kind, 0),
             model.hook_name("attn_scores", 0)}
    probe = torch.arange(3, 3 + min(8, model.d_vocab - 3), device=model.device)
    _, cache = capture(model, probe, names)
    q = cache[model.hook_name(q_kind, 0)]
    k = repeat(cache[model.hook_name(k_kind, 0)], "b pos kv d -> b pos (kv g) d", g=model.group_size)
    mine = _attention_scale(model, 0) * einsum(q, k, "b qp h d, b kp h d -> b h qp kp")
    scores = cache[model.hook_name("attn_scores", 0)]
    causal = torch.tril(torch.ones(len(probe), len(probe), dtype=torch.bool, device=scores.device))
    err = (mine - scores)[..., causal].abs().max() / scores[..., causal].abs().max().clamp_min(1e-6)
    if not bool(err < 1e-4):
        raise ValueError("kv_heads='query' cannot reconstruct this model's attention scores from "
                         f"its q/k hooks (relative error {float(err):.2e}); use kv_heads='group'")
    _SCORES_CHECKED[model.bridge] = True


def capture(model: HookedModel, tokens: Int[Tensor, "*batch pos"], names: set[str],
            ) -> tuple[Float[Tensor, "batch pos d_vocab"], dict[str, Tensor]]:
    """One plain forward pass of ``tokens`` (one prompt or a batch of equal length): its logits
    and the activations at ``names``."""
    cache: dict[str, Tensor] = {}

    def save(name: str) -> Hook:
        def hook(x: Tensor, hook: Any) -> None:
            cache[name] = x.detach()
        return hook

    rows = tokens[None] if tokens.ndim == 1 else tokens
    with torch.no_grad():
        logits = model.run_with_hooks(rows.to(model.device),
                                      fwd_hooks=[(n, save(n)) for n in sorted(names)],
                                      return_type="logits")
    return logits, cache


def _query_view_hooks(model: HookedModel, target: str, layer: int, sel_keys: Tensor,
                      source: dict[str, Tensor]) -> list[tuple[str, Hook]]:
    """Hooks patching ``target`` in {"k", "v"} for single query heads: ``sel_keys``
    ``[copy, key_pos, head]`` marks, per copy, which (key position, query head) read the
    source run's key/value."""
    g = model.group_size
    cur: dict[str, Tensor] = {}

    def keep(kind: str) -> Hook:
        def hook(x: Tensor, hook: Any) -> None:
            cur[kind] = x
        return hook

    if target == "v":
        v_name, pat_name, z_name = (model.hook_name(k, layer) for k in ("v", "pattern", "z"))
        v_src = source[v_name]

        def patch_z(z: Tensor, hook: Any) -> Tensor:
            n = z.shape[0]
            delta = repeat(first_rows(v_src, n) - cur["v"], "c pos kv d -> c pos (kv g) d", g=g)
            delta = delta * first_rows(sel_keys, n)[..., None].to(delta.device, delta.dtype)
            return z + einsum(cur["pattern"], delta, "c h qp kp, c kp h d -> c qp h d")

        return [(v_name, keep("v")), (pat_name, keep("pattern")), (z_name, patch_z)]

    q_kind, k_kind = _qk_kinds(model)
    q_name, k_name = model.hook_name(q_kind, layer), model.hook_name(k_kind, layer)
    k_src = source[k_name]
    scale = _attention_scale(model, layer)

    def patch_scores(scores: Tensor, hook: Any) -> Tensor:
        n = scores.shape[0]
        delta = repeat(first_rows(k_src, n) - cur["k"], "c pos kv d -> c pos (kv g) d", g=g)
        delta = delta * first_rows(sel_keys, n)[..., None].to(delta.device, delta.dtype)
        change = scale * einsum(cur["q"], delta, "c qp h d, c kp h d -> c h qp kp")
        allowed = scores > torch.finfo(scores.dtype).min / 2  # keep masked entries masked
        return torch.where(allowed, scores + change, scores)

    return [(q_name, keep("q")), (k_name, keep("k")),
            (model.hook_name("attn_scores", layer), patch_scores)]


def _source_names(model: HookedModel, target: str, layers: Sequence[int], kv_heads: str
                  ) -> set[str]:
    if target in ("k", "v") and kv_heads == "query":
        kind = _qk_kinds(model)[1] if target == "k" else "v"
    else:
        kind = _SPECS[target][0]
    return {model.hook_name(kind, layer) for layer in layers}


def patch_hooks(model: HookedModel, target: str, axes: tuple[str, ...], cells: Tensor,
                by_pos: bool, kv_heads: str, source: dict[str, Tensor], n_pos: int,
                ) -> list[tuple[str, Hook]]:
    """Hooks patching copy ``i`` of a pass at ``cells[i]`` with the ``source`` activations."""
    kind, layout = _SPECS[target]
    hooks: list[tuple[str, Hook]] = []
    for layer in torch.unique(cells[:, 0]).tolist():
        rows = torch.nonzero(cells[:, 0] == layer)[:, 0]
        if target in ("k", "v") and kv_heads == "query":
            sel = _selection("head", axes, (len(cells), n_pos, model.n_heads), cells, rows, by_pos)
            sel_keys = sel[..., 0].expand(len(cells), n_pos, model.n_heads)  # [copy, key_pos, head]
            hooks += _query_view_hooks(model, target, layer, sel_keys, source)
            continue
        name = model.hook_name(kind, layer)
        src = source[name]
        sel = _selection(layout, axes, (len(cells), *src.shape[1:]), cells, rows, by_pos)
        if target == "resid_mid":
            hooks += _resid_mid_hooks(model, layer, sel, src)
        else:
            hooks.append((name, _replace_hook(sel, src)))
    return hooks


def _resid_mid_hooks(model: HookedModel, layer: int, sel: Tensor, src: Tensor
                     ) -> list[tuple[str, Hook]]:
    """Patch the residual stream between attention and MLP.

    In the bridge, ``hook_resid_mid`` is the MLP norm's input (``ln2.hook_in``): a value
    returned there reaches the MLP but not the skip connection around it. So the patch is
    applied there for the MLP, and the same change is added to ``hook_resid_post``
    (``resid_post = resid_mid + mlp branch``) for the skip connection.
    """
    delta: dict[str, Tensor] = {}

    def mid(x: Tensor, hook: Any) -> Tensor:
        patched = torch.where(first_rows(sel, x.shape[0]).to(x.device), src.to(x.dtype), x)
        delta["d"] = patched - x
        return patched

    def post(x: Tensor, hook: Any) -> Tensor:
        return x + delta.pop("d")

    return [(model.hook_name("resid_mid", layer), mid), (model.hook_name("resid_post", layer), post)]


# --------------------------------------------------------------------------------------------
# The runner shared by activation patching and path patching
# --------------------------------------------------------------------------------------------


def baselines(model: HookedModel, inputs: Inputs, metric: Metric, logits_clean: list[Tensor],
              logits_corrupted: list[Tensor]) -> tuple[Tensor, Tensor]:
    """The metric on the unpatched clean and corrupted runs: ``[pair]`` or scalars."""
    def score(logits: list[Tensor]) -> Tensor:
        if metric.builtin:
            last = torch.stack([lg[0, len(t) - 1] for lg, t in zip(logits, inputs.clean,
                                                                    strict=True)])
            return metric.on_answer_logits(last, _need(inputs.answer, metric),
                                           _wrong(inputs, metric)).cpu()
        return metric.on_logits(_stack_logits([lg[0] for lg in logits])[None])[0].cpu()
    return score(logits_clean), score(logits_corrupted)


def _wrong(inputs: "Inputs", metric: Metric) -> Tensor:
    """The competing tokens; only the logit difference reads them (others get the answers)."""
    if metric.name in ("logit_diff", "logit_diff_normalized"):
        return _need(inputs.wrong, metric)
    return _need(inputs.answer, metric) if inputs.wrong is None else inputs.wrong


def _need(x: Tensor | None, metric: Metric) -> Tensor:
    if x is None:
        raise ValueError(f"metric {metric.name!r} needs answer and wrong tokens: pass a "
                         "PromptPairs, or answer=... and wrong=..., or a callable metric")
    return x


def _stack_logits(rows: list[Tensor]) -> Tensor:
    """Right-pad ``[pos_i, vocab]`` (or ``[copy, pos_i, vocab]``) logits to one length and stack
    them on a pair axis before ``pos`` (one copy of the data; none for a single pair)."""
    if len(rows) == 1:
        return rows[0].unsqueeze(-3)
    width = max(r.shape[-2] for r in rows)
    first = rows[0]
    out = first.new_zeros(*first.shape[:-2], len(rows), width, first.shape[-1])
    for i, r in enumerate(rows):
        out[..., i, : r.shape[-2], :] = r
    return out


def copies_per_pass(model: HookedModel, inputs: Inputs, metric: Metric, batch_tokens: int,
                    max_logit_bytes: int = 1 << 30) -> int:
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens={batch_tokens} must be >= 1")
    longest = max(inputs.lengths)
    n = max(1, batch_tokens // longest)
    if not metric.builtin:  # full logits of every pair are held for each copy
        per_copy = len(inputs) * longest * model.d_vocab * 4
        n = min(n, max(1, max_logit_bytes // per_copy))
    return n


def run_cells(
    model: HookedModel, inputs: Inputs, metric: Metric, *, cells: Tensor,
    base: list[Tensor], hooks_for: Callable[[int, Tensor], list[tuple[str, Hook]]],
    start_layers: Tensor, batch_tokens: int, progress: bool, desc: str,
    pass_starts: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Evaluate ``metric`` with each cell's patch: ``hooks_for(pair, chunk_cells)`` gives the
    hooks of one pass (copy i patched at ``chunk_cells[i]``) on the ``base[pair]`` prompt.

    ``start_layers[cell]`` is the layer below which the cell's copy equals the unpatched prompt;
    cells run in that order (see :func:`mechicl._forward.run_copies`). ``pass_starts(chunk)``
    overrides the start layers of a pass's copies (they must keep its order non-decreasing).

    Returns ``(per_cell [cell], per_pair [cell, pair] or None)``: the metric averaged over
    pairs (or the callable's batch value), and per pair.
    """
    n_cells, n_pairs = len(cells), len(inputs)
    per_copy = copies_per_pass(model, inputs, metric, batch_tokens)
    order = torch.argsort(start_layers, stable=True)
    chunks = [order[i:i + per_copy] for i in range(0, n_cells, per_copy)]
    per_pair = torch.zeros(n_cells, n_pairs) if metric.builtin else None
    per_cell = torch.zeros(n_cells)
    bar = tqdm(total=len(chunks) * n_pairs, desc=desc, disable=not progress)
    with torch.no_grad():
        for chunk in chunks:
            chunk_cells = cells[chunk]
            starts = start_layers[chunk] if pass_starts is None else pass_starts(chunk)
            full: list[Tensor] = []
            for p in range(n_pairs):
                tokens = base[p]
                read = None if not metric.builtin else torch.tensor([len(tokens) - 1])
                out = run_copies(model, tokens, start_layers=starts,
                                 hooks=hooks_for(p, chunk_cells), read_positions=read)
                if metric.builtin:
                    assert per_pair is not None and inputs.answer is not None
                    per_pair[chunk, p] = metric.on_answer_logits(
                        out, inputs.answer[p:p + 1], _wrong(inputs, metric)[p:p + 1]
                    )[:, 0].cpu()
                else:
                    full.append(out)
                bar.update(1)
            if not metric.builtin:
                values = metric.on_logits(_stack_logits(full))  # [copy] or [copy, pair]
                if values.ndim == 2:
                    if per_pair is None:
                        per_pair = torch.full((n_cells, n_pairs), float("nan"))
                    per_pair[chunk] = values.cpu()
                    per_cell[chunk] = values.mean(-1).cpu()
                else:
                    per_cell[chunk] = values.cpu()
    bar.close()
    if metric.builtin:
        assert per_pair is not None
        per_cell = per_pair.mean(-1)
    return per_cell, per_pair


def normalise(values: Tensor, clean: Tensor, corrupted: Tensor) -> Tensor:
    """``(values - corrupted) / (clean - corrupted)`` with pair means."""
    c, k = clean.float().mean(), corrupted.float().mean()
    if bool((c - k).abs() < 1e-8):
        raise ValueError(f"cannot normalise: the clean and corrupted metrics are equal ({float(c):.4g})")
    return (values - k) / (c - k)


# --------------------------------------------------------------------------------------------
# Argument checks shared by patch, attribution_patch and path_patch
# --------------------------------------------------------------------------------------------


def prepare(model: Any, clean: Any, corrupted: Any, metric: str | MetricFn, direction: str,
            normalize: bool, answer: Any, wrong: Any) -> tuple[HookedModel, Metric, Inputs]:
    """The model, the resolved metric and the prompt pairs, with the direction checked."""
    model = as_hooked_model(model)
    check_choice("direction", direction, DIRECTIONS)
    resolved = resolve_metric(metric, normalize)
    return model, resolved, as_inputs(model, clean, corrupted, answer, wrong)


def prepare_target(model: HookedModel, inputs: Inputs, metric: Metric, target: str,
                   by_pos: bool, kv_heads: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Check ``target`` against the model and the prompts; its result axes and sizes."""
    check_choice("target", target, TARGETS)
    check_choice("kv_heads", kv_heads, KV_VIEWS)
    if target == "mlp_out" and model.hook_name("mlp_out", 0) not in model.hook_dict:
        raise ValueError("target='mlp_out': this model has no MLPs (attention-only)")
    lengths = set(inputs.lengths)
    if not metric.builtin and len(lengths) > 1:
        logger.warning("pairs have lengths %s: the metric %s sees right-padded logits [pair, "
                       "%d, vocab]; it must read each pair's last real position (length - 1), "
                       "not position -1", sorted(lengths), metric.name, max(lengths))
    if by_pos and len(lengths) > 1:
        raise ValueError(f"by_pos=True needs prompts of one length, these have lengths "
                         f"{sorted(lengths)}; use PromptPairs.by_length() or a single template")
    if target == "k" and kv_heads == "query":
        check_scores_reconstructable(model)
    return target_axes(model, target, by_pos=by_pos, kv_heads=kv_heads, n_pos=inputs.lengths[0])


# --------------------------------------------------------------------------------------------
# Activation patching
# --------------------------------------------------------------------------------------------


def patch(
    model: HookedModel,
    clean: PromptPairs | str | Sequence[str] | Int[Tensor, "pair pos"],
    corrupted: str | Sequence[str] | Int[Tensor, "pair pos"] | None = None,
    metric: str | MetricFn = "logit_diff",
    *,
    target: Target = "head_out",
    by_pos: bool = False,
    direction: Direction = "denoising",
    kv_heads: KVHeads = "group",
    normalize: bool = False,
    answer: Any = None,
    wrong: Any = None,
    cells: Any = None,
    batch_tokens: int = 8192,
    progress: bool = False,
) -> PatchResult:
    """Activation patching of every cell of ``target`` (see the module docstring).

    Args:
        model: the model.
        clean: a :class:`~mechicl.pairs.PromptPairs` (holding both prompts and the answer
            tokens), or clean prompts (strings or a ``[pair, pos]`` token tensor, BOS
            included).
        corrupted: the corrupted prompts, token-aligned with the clean ones (None with
            PromptPairs).
        metric: a built-in metric name (:data:`mechicl.metrics.METRICS`) or a callable
            ``logits [pair, pos, vocab] -> scalar or [pair]`` (TransformerLens style).
        target: what to patch (:data:`TARGETS`).
        by_pos: one cell per position as well (otherwise all positions at once).
        direction: ``"denoising"`` (run corrupted, patch clean in) or ``"noising"``.
        kv_heads: for ``k``/``v`` of grouped-query models: ``"group"`` (per KV head) or
            ``"query"`` (per query head).
        normalize: report ``(patched - corrupted) / (clean - corrupted)`` (pair means).
        answer: the correct tokens (ids or single-token strings) for built-in metrics when
            ``clean`` is not a PromptPairs.
        wrong: the competing tokens, likewise.
        cells: only these cells (``[n, n_axes]`` indices or a DataFrame with the axis names as
            columns, TransformerLens's ``index_df`` accepted); others are NaN.
        batch_tokens: patched copies x prompt length per forward pass (memory budget).
        progress: show a progress bar.

    Returns:
        A :class:`PatchResult` with ``[layer, head]``-like values (TransformerLens's axis order).

    >>> result = patch(model, mechicl.ioi_pairs(model, 8), metric="logit_diff_normalized")  # doctest: +SKIP
    >>> result.axes, result.values.shape  # doctest: +SKIP
    (('layer', 'head'), torch.Size([30, 9]))
    """
    model, resolved, inputs = prepare(model, clean, corrupted, metric, direction, normalize,
                                      answer, wrong)
    axes, sizes = prepare_target(model, inputs, resolved, target, by_pos, kv_heads)
    all_cells = grid_cells(sizes) if cells is None else _user_cells(cells, axes, sizes)

    denoise = direction == "denoising"
    names = _source_names(model, target, range(model.n_layers), kv_heads)
    sources, logits_clean, logits_corrupted = [], [], []
    for c, k in zip(inputs.clean, inputs.corrupted, strict=True):
        lc, cache_c = capture(model, c, names if denoise else set())
        lk, cache_k = capture(model, k, set() if denoise else names)
        sources.append(cache_c if denoise else cache_k)
        logits_clean.append(lc)
        logits_corrupted.append(lk)
    clean_metric, corrupted_metric = baselines(model, inputs, resolved, logits_clean,
                                               logits_corrupted)
    base = inputs.corrupted if denoise else inputs.clean

    def hooks_for(p: int, chunk_cells: Tensor) -> list[tuple[str, Hook]]:
        return patch_hooks(model, target, axes, chunk_cells, by_pos, kv_heads, sources[p],
                           len(base[p]))

    per_cell, per_pair = run_cells(
        model, inputs, resolved, cells=all_cells, base=base, hooks_for=hooks_for,
        start_layers=all_cells[:, 0], batch_tokens=batch_tokens,
        progress=progress, desc=f"patch {target}")
    if resolved.normalize:
        per_cell = normalise(per_cell, clean_metric, corrupted_metric)
    values = torch.full(sizes, float("nan"))
    values[tuple(all_cells.T)] = per_cell
    grid_pairs = None
    if per_pair is not None:
        grid_pairs = torch.full((*sizes, len(inputs)), float("nan"))
        grid_pairs[tuple(all_cells.T)] = per_pair
    labels: dict[str, list[str]] = {}
    if "pos" in axes:
        labels["pos"] = model.to_str_tokens(inputs.clean[0])
    params = {"target": target, "by_pos": by_pos, "direction": direction, "kv_heads": kv_heads,
              "metric": resolved.name, "normalize": resolved.normalize,
              "n_cells": len(all_cells), **inputs.describe()}
    return PatchResult(target=target, axes=axes, values=values, per_pair=grid_pairs,
                       clean=clean_metric, corrupted=corrupted_metric, metric=resolved.name,
                       normalized=resolved.normalize, direction=direction, method="activation",
                       labels=labels, params=params, model=model.info())
