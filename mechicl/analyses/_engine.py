"""Many patched copies of one prompt in one forward pass, sharing the unpatched lower layers.

Every patched copy of a prompt equals the unpatched run below the first layer it patches. So a
pass starts with one row, the unpatched prompt, and at each layer's ``hook_resid_pre`` appends
the copies that start patching at that layer (copies of row 0's residual stream); each copy is
then patched by vectorised hooks. A copy patched at layer ``L`` costs ``n_layers - L`` blocks,
not ``n_layers``. The bridge accepts a batch that grows between blocks only when its attention
mask and position embeddings broadcast, which holds for a single unpadded prompt (batch 1):
this is why patching runs one prompt (pair) per pass, with the copies as the batch.

By position, a copy patched at position ``p`` also equals the unpatched prompt before ``p``:
such passes run the prefix once into a key/value cache (each layer's repeated to the rows
present there) and the copies over the remaining positions only (``start_pos``).

The pass stops at the final residual stream (``ln_final.hook_in``) and unembeds only the answer
positions, unless full logits are asked for; :func:`answer_logits_exact` checks once per model
that this equals the model's own logits.

It also holds the machinery shared by activation patching (:mod:`mechicl.analyses.patching`),
path patching and attribution patching: the targets and their hooks, prompt pairs as token
rows, cells, baselines and the metric loop over patched copies. It is a declared private module
of the analyses package: those three modules import from it; users import from them.

Axis names: ``copy pos layer head kv_head pair d_head d_model d_vocab``.
"""

import contextlib
import logging
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import torch
from einops import einsum, repeat
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformers import DynamicCache

from mechicl._checks import check_choice
from mechicl.analyses.metrics import Metric, MetricFn, resolve_metric
from mechicl.inputs.pairs import PromptPairs
from mechicl.model.hooked import HookedModel, as_hooked_model

logger = logging.getLogger(__name__)

Hook = Callable[[Tensor, Any], Tensor | None]


class _Stop(Exception):
    """Raised by a hook to end a forward pass early, carrying the activation it saw."""

    def __init__(self, value: Tensor) -> None:
        super().__init__("forward pass stopped early")
        self.value = value


def compose(fns: list[Hook]) -> Hook:
    """One hook running ``fns`` in order (each sees the previous one's output)."""
    if len(fns) == 1:
        return fns[0]

    def hook(x: Tensor, hook: Any) -> Tensor:
        for fn in fns:
            out = fn(x, hook)
            x = x if out is None else out
        return x
    return hook


def grow_hook(n: int) -> Hook:
    """Append ``n`` copies of row 0 (the unpatched prompt) to the batch."""
    def hook(x: Tensor, hook: Any) -> Tensor:  # [rows, pos, d_model] -> [rows + n, pos, d_model]
        return torch.cat([x, x[:1].expand(n, *x.shape[1:])])
    return hook


def copies_only(fn: Hook) -> Hook:
    """Run ``fn`` on the copies (rows 1..) only; row 0, the unpatched prompt, passes through."""
    def hook(x: Tensor, hook: Any) -> Tensor:
        out = fn(x[1:], hook)
        return x if out is None else torch.cat([x[:1], out])
    return hook


def run_copies(
    model: HookedModel, tokens: Int[Tensor, " pos"], *, start_layers: Int[Tensor, " copy"],
    hooks: Iterable[tuple[str, Hook]], read_positions: Int[Tensor, " n"] | None,
    stop_at: str | None = None, start_pos: int = 0, _trust_unembed: bool = False,
) -> Tensor:
    """Run copies of ``tokens`` with ``hooks``, each copy joining at its start layer.

    Row 0 of the batch is the unpatched prompt. At ``hook_resid_pre`` of layer ``L`` the copies
    whose start layer is ``L`` are appended as copies of row 0, so a copy costs nothing below
    its start layer, and the batch grows towards the top of the model.

    Args:
        tokens: one unpadded prompt.
        start_layers: ``[copy]``, non-decreasing: the layer below which copy ``i`` equals the
            unpatched prompt.
        hooks: (hook name, fn) pairs. Each fn sees the copies present at that point: the first
            ``k`` copies, rows ``[k, ...]`` (``k`` may be 0), and must return them (or None).
            Several fns on one name run in the given order.
        read_positions: positions whose logits are returned (``[copy, n, vocab]``); None for
            the full logits ``[copy, pos, vocab]``.
        stop_at: a hook name at which to stop; the copies' activation there is returned (the
            hooks are expected to have captured what they need).
        start_pos: no copy differs from the unpatched prompt before this position: the prefix
            runs once, unpatched, into a key/value cache, and the pass covers positions
            ``start_pos..`` only. The hooks then see (and ``read_positions`` index) those
            positions, as :func:`suffix_slices` arranges.

    Returns:
        Logits at ``read_positions`` (or all positions), or the activation at ``stop_at``.
    """
    starts = start_layers.tolist()
    if any(b < a for a, b in zip(starts, starts[1:], strict=False)):
        raise ValueError(f"start_layers must be non-decreasing, got {starts}")
    if not 0 <= start_pos < len(tokens):
        raise ValueError(f"start_pos={start_pos} must be in 0..{len(tokens) - 1}")
    by_name: dict[str, list[Hook]] = {}
    for layer in sorted(set(starts)):
        by_name[model.hook_name("resid_pre", layer)] = [grow_hook(starts.count(layer))]
    for name, fn in hooks:
        by_name.setdefault(name, []).append(copies_only(fn))
    fast = read_positions is not None and (_trust_unembed or answer_logits_exact(model))
    stop_name = stop_at if stop_at is not None else ("ln_final.hook_in" if fast else None)
    if stop_name is not None:
        def stop(x: Tensor, hook: Any) -> None:
            raise _Stop(x)
        by_name.setdefault(stop_name, []).append(stop)
    fwd = [(name, compose(fns)) for name, fns in by_name.items()]
    kwargs: dict[str, Any] = {}
    if start_pos:
        kwargs["past_key_values"] = prefix_cache(model, tokens[:start_pos], starts)
        tokens = tokens[start_pos:]
    try:
        logits = model.run_with_hooks(tokens[None].to(model.device), fwd_hooks=fwd,
                                      return_type="logits", **kwargs)
    except _Stop as stopped:
        if stop_at is not None:
            return stopped.value[1:]
        resid = stopped.value[1:, read_positions]  # [copy, n, d_model]
        return unembed(model, resid)
    if stop_at is not None:
        raise RuntimeError(f"the forward pass never reached {stop_at!r}")
    logits = logits[1:]
    return logits if read_positions is None else logits[:, read_positions]


def prefix_cache(model: HookedModel, prefix: Int[Tensor, " pos"], starts: Sequence[int]) -> Any:
    """The key/value cache of the unpatched ``prefix``, each layer's repeated to the rows a
    pass of copies with these start layers holds there (row 0 and the copies started)."""
    cache = DynamicCache()
    with torch.no_grad():
        model.run_with_hooks(prefix[None].to(model.device), return_type="logits",
                             past_key_values=cache, logits_to_keep=1)
    counts = torch.bincount(torch.tensor(list(starts), dtype=torch.long),
                            minlength=model.n_layers)[: model.n_layers]
    rows = 1 + counts.cumsum(0)  # rows present at each layer
    if len(cache.layers) != model.n_layers:
        raise RuntimeError(f"the cache has {len(cache.layers)} layers, the model {model.n_layers}")
    for layer, n in zip(cache.layers, rows.tolist(), strict=True):
        layer.batch_select_indices(torch.zeros(n, dtype=torch.long, device=layer.keys.device))
    return cache


_EXACT_PREFIX: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def prefix_reuse_exact(model: HookedModel) -> bool:
    """Whether a pass over a suffix after :func:`prefix_cache` reproduces the model's logits
    (checked once per model on a short probe with copies joining at two layers; False e.g. for
    a bridge without a key/value cache)."""
    probe = torch.arange(3, 3 + min(8, model.d_vocab - 3))
    starts = torch.tensor([0, model.n_layers - 1])

    def same() -> bool:
        full = run_copies(model, probe, start_layers=starts, hooks=[], read_positions=None)
        mine = run_copies(model, probe, start_layers=starts, hooks=[], read_positions=None,
                          start_pos=3)
        return close_to(mine, full[:, 3:])

    return checked_once(_EXACT_PREFIX, model, same, "prefix reuse")


def suffix_slices(sel: Tensor, source: Tensor, pos_dim: int, start_pos: int
                  ) -> tuple[Tensor, Tensor]:
    """``sel`` and ``source`` of a patch for a pass over positions ``start_pos..``: sliced
    along their position axis ``pos_dim`` (a size-1 axis broadcasts and stays)."""
    def cut(x: Tensor) -> Tensor:
        return x if x.shape[pos_dim] == 1 else x.narrow(pos_dim, start_pos,
                                                         x.shape[pos_dim] - start_pos)
    return cut(sel), cut(source)


def unembed(model: HookedModel, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
    """Final norm and unembedding of final-residual vectors."""
    return model.bridge.unembed(model.bridge.ln_final(resid))


def close_to(got: Tensor, want: Tensor, rtol: float = 1e-4) -> bool:
    """``got`` equals ``want`` up to ``rtol`` of the larger of 1 and ``want``'s largest
    magnitude (the check of the once-per-model probes)."""
    scale = want.abs().max().clamp_min(1.0)
    return bool(((got - want).abs().max() / scale) < rtol)


def checked_once(table: "weakref.WeakKeyDictionary[Any, bool]", model: HookedModel,
                 check: Callable[[], bool], what: str) -> bool:
    """``check()`` run once per model (cached in ``table`` by bridge): a fast path's probe
    against the plain computation. An exception or a mismatch means False (the caller then
    takes the plain path), logged."""
    bridge = model.bridge
    if bridge not in table:
        try:
            with torch.no_grad():
                ok = check()
        except Exception as err:  # noqa: BLE001 - any failure means: use the plain path
            logger.info("%s unavailable for %s (%s)", what, model.name, err)
            ok = False
        else:
            if not ok:
                logger.warning("%s differs from the plain computation on %s: not used", what,
                               model.name)
        table[bridge] = ok
    return table[bridge]


_EXACT: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def answer_logits_exact(model: HookedModel) -> bool:
    """Whether ``unembed(ln_final(resid))`` reproduces the model's logits (checked once per
    model on a short probe; False e.g. for models that post-process logits)."""
    probe = torch.arange(3, 3 + min(8, model.d_vocab - 3), device=model.device)

    def same() -> bool:
        full = model.run_with_hooks(probe[None], return_type="logits")
        mine = run_copies(model, probe, start_layers=torch.zeros(1, dtype=torch.long), hooks=[],
                          read_positions=torch.arange(len(probe)), _trust_unembed=True)
        return close_to(mine, full)

    return checked_once(_EXACT, model, same, "unembedding the final residual stream")


@contextlib.contextmanager
def frozen_parameters(model: HookedModel) -> Iterator[None]:
    """Parameters do not require grad inside (restored after): only the activations the caller
    marks get gradients, and no parameter ``.grad`` is written."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------

Target = Literal["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "head_out", "q",
                 "k", "v", "pattern"]
TARGETS: tuple[str, ...] = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out",
                            "head_out", "q", "k", "v", "pattern")
Direction = Literal["denoising", "noising"]
DIRECTIONS: tuple[str, ...] = ("denoising", "noising")
KVHeads = Literal["group", "query"]
KV_VIEWS: tuple[str, ...] = ("group", "query")

# target -> (hook kind, activation layout)
TARGET_SPECS: dict[str, tuple[str, str]] = {
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

    >>> target_axes(model, "head_out", by_pos=True, n_pos=15)  # 2 layers, 4 heads
    (('layer', 'pos', 'head'), (2, 15, 4))
    """
    check_choice("target", target, TARGETS)
    check_choice("kv_heads", kv_heads, KV_VIEWS)
    layout = TARGET_SPECS[target][1]
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


def token_rows(model: HookedModel, x: Any, what: str) -> list[Tensor]:
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


def token_ids(model: HookedModel, x: Any, n: int, what: str) -> Tensor | None:
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
    c, k = token_rows(model, clean, "clean"), token_rows(model, corrupted, "corrupted")
    if len(c) != len(k):
        raise ValueError(f"{len(c)} clean prompts but {len(k)} corrupted prompts")
    for i, (a, b) in enumerate(zip(c, k, strict=True)):
        if len(a) != len(b):
            raise ValueError(f"pair {i}: clean has {len(a)} tokens, corrupted {len(b)}; patching "
                             f"needs token-aligned pairs (clean {model.to_str_tokens(a)}, "
                             f"corrupted {model.to_str_tokens(b)})")
    return Inputs(c, k, token_ids(model, answer, len(c), "answer"),
                  token_ids(model, wrong, len(c), "wrong"), None)


# --------------------------------------------------------------------------------------------
# Cells and hooks
# --------------------------------------------------------------------------------------------


def grid_cells(sizes: Sequence[int]) -> Int[Tensor, "cell axis"]:
    """Every index of a grid, last axis fastest (TransformerLens's cell order)."""
    grids = torch.meshgrid(*[torch.arange(s) for s in sizes], indexing="ij")
    return torch.stack([g.flatten() for g in grids], dim=-1)


def user_cells(cells: Any, axes: tuple[str, ...], sizes: tuple[int, ...]) -> Tensor:
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


def selection(layout: str, axes: tuple[str, ...], act_shape: tuple[int, ...],
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


def replace_hook(sel: Tensor, source: Tensor) -> Hook:
    def hook(act: Tensor, hook: Any) -> Tensor:  # act: the first k copies
        n = act.shape[0]
        return torch.where(first_rows(sel, n).to(act.device), first_rows(source, n).to(act.dtype),
                           act)
    return hook


def attention_scale(model: HookedModel, layer: int) -> float:
    attn = model.bridge.blocks[layer].attn
    module = getattr(attn, "original_component", None) or attn
    if getattr(module, "attn_logit_softcapping", None):
        raise ValueError("kv_heads='query' k-patching assumes scores = scale * q . k; this model "
                         "soft-caps its attention logits")
    scale = getattr(module, "scaling", None)
    return float(scale) if scale is not None else model.d_head ** -0.5


def qk_kinds(model: HookedModel) -> tuple[str, str]:
    """Hook kinds holding the q and k that enter the scores (after rotary, if any)."""
    rotary = model.hook_name("rot_k", 0) in model.hook_dict
    return ("rot_q", "rot_k") if rotary else ("q", "k")


_SCORES_CHECKED: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def check_scores_reconstructable(model: HookedModel) -> None:
    """Check once per model that ``hook_attn_scores == scale * q_rot . k_rot`` (causal part),
    which the per-query-head k view relies on."""
    if model.bridge in _SCORES_CHECKED:
        return
    q_kind, k_kind = qk_kinds(model)
    names = {model.hook_name(q_kind, 0), model.hook_name(k_kind, 0),
             model.hook_name("attn_scores", 0)}
    probe = torch.arange(3, 3 + min(8, model.d_vocab - 3), device=model.device)
    _, cache = capture(model, probe, names)
    q = cache[model.hook_name(q_kind, 0)]
    k = repeat(cache[model.hook_name(k_kind, 0)], "b pos kv d -> b pos (kv g) d", g=model.group_size)
    mine = attention_scale(model, 0) * einsum(q, k, "b qp h d, b kp h d -> b h qp kp")
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


def query_view_hooks(model: HookedModel, target: str, layer: int, sel_keys: Tensor,
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

    q_kind, k_kind = qk_kinds(model)
    q_name, k_name = model.hook_name(q_kind, layer), model.hook_name(k_kind, layer)
    k_src = source[k_name]
    scale = attention_scale(model, layer)

    def patch_scores(scores: Tensor, hook: Any) -> Tensor:
        n = scores.shape[0]
        delta = repeat(first_rows(k_src, n) - cur["k"], "c pos kv d -> c pos (kv g) d", g=g)
        delta = delta * first_rows(sel_keys, n)[..., None].to(delta.device, delta.dtype)
        change = scale * einsum(cur["q"], delta, "c qp h d, c kp h d -> c h qp kp")
        allowed = scores > torch.finfo(scores.dtype).min / 2  # keep masked entries masked
        return torch.where(allowed, scores + change, scores)

    return [(q_name, keep("q")), (k_name, keep("k")),
            (model.hook_name("attn_scores", layer), patch_scores)]


def source_names(model: HookedModel, target: str, layers: Sequence[int], kv_heads: str
                  ) -> set[str]:
    if target in ("k", "v") and kv_heads == "query":
        kind = qk_kinds(model)[1] if target == "k" else "v"
    else:
        kind = TARGET_SPECS[target][0]
    return {model.hook_name(kind, layer) for layer in layers}


def patch_hooks(model: HookedModel, target: str, axes: tuple[str, ...], cells: Tensor,
                by_pos: bool, kv_heads: str, source: dict[str, Tensor], n_pos: int,
                start_pos: int = 0) -> list[tuple[str, Hook]]:
    """Hooks patching copy ``i`` of a pass at ``cells[i]`` with the ``source`` activations
    (in a pass over positions ``start_pos..``, see :func:`run_copies`)."""
    kind, layout = TARGET_SPECS[target]
    hooks: list[tuple[str, Hook]] = []
    if start_pos and not prefix_reusable(target, kv_heads):
        raise ValueError(f"target={target!r} with kv_heads={kv_heads!r} patches whole prompts")
    for layer in torch.unique(cells[:, 0]).tolist():
        rows = torch.nonzero(cells[:, 0] == layer)[:, 0]
        if target in ("k", "v") and kv_heads == "query":
            sel = selection("head", axes, (len(cells), n_pos, model.n_heads), cells, rows, by_pos)
            sel_keys = sel[..., 0].expand(len(cells), n_pos, model.n_heads)  # [copy, key_pos, head]
            hooks += query_view_hooks(model, target, layer, sel_keys, source)
            continue
        name = model.hook_name(kind, layer)
        src = source[name]
        sel = selection(layout, axes, (len(cells), *src.shape[1:]), cells, rows, by_pos)
        if start_pos:  # positions are axis 1, the query positions of a pattern axis 2
            sel, src = suffix_slices(sel, src, 2 if layout == "pattern" else 1, start_pos)
        if target == "resid_mid":
            hooks += resid_mid_hooks(model, layer, sel, src)
        else:
            hooks.append((name, replace_hook(sel, src)))
    return hooks


def prefix_reusable(target: str, kv_heads: str) -> bool:
    """Whether patches of ``target`` can run over a suffix after a cached prefix: not the
    query-head view of keys / values, whose hooks rebuild whole attention patterns."""
    return not (target in ("k", "v") and kv_heads == "query")


def resid_mid_hooks(model: HookedModel, layer: int, sel: Tensor, src: Tensor
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
            return metric.on_answer_logits(last, need_tokens(inputs.answer, metric),
                                           wrong_tokens(inputs, metric)).cpu()
        return metric.on_logits(stack_logits([lg[0] for lg in logits])[None])[0].cpu()
    return score(logits_clean), score(logits_corrupted)


def wrong_tokens(inputs: "Inputs", metric: Metric) -> Tensor:
    """The competing tokens; only the logit difference reads them (others get the answers)."""
    if metric.name in ("logit_diff", "logit_diff_normalized"):
        return need_tokens(inputs.wrong, metric)
    return need_tokens(inputs.answer, metric) if inputs.wrong is None else inputs.wrong


def need_tokens(x: Tensor | None, metric: Metric) -> Tensor:
    if x is None:
        raise ValueError(f"metric {metric.name!r} needs answer and wrong tokens: pass a "
                         "PromptPairs, or answer=... and wrong=..., or a callable metric")
    return x


def stack_logits(rows: list[Tensor]) -> Tensor:
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
    base: list[Tensor], hooks_for: Callable[..., list[tuple[str, Hook]]],
    start_layers: Tensor, batch_tokens: int, progress: bool, desc: str,
    pass_starts: Callable[[Tensor], Tensor] | None = None,
    start_positions: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Evaluate ``metric`` with each cell's patch: ``hooks_for(pair, chunk_cells)`` gives the
    hooks of one pass (copy i patched at ``chunk_cells[i]``) on the ``base[pair]`` prompt.

    ``start_layers[cell]`` is the layer below which the cell's copy equals the unpatched prompt;
    cells run in that order (see :func:`mechicl.analyses._engine.run_copies`). ``pass_starts(chunk)``
    overrides the start layers of a pass's copies (they must keep its order non-decreasing).

    ``start_positions[cell]``, if given, is the position before which the cell's copy equals
    the unpatched prompt (by-position patching): cells then run in order of position, each
    pass over the positions from its smallest one after a cached prefix, and
    ``hooks_for(pair, chunk_cells, start_pos)`` gives hooks for that suffix. Used only for
    metrics of the answer logits (others read full logits) and where
    :func:`prefix_reuse_exact` holds.

    Returns ``(per_cell [cell], per_pair [cell, pair] or None)``: the metric averaged over
    pairs (or the callable's batch value), and per pair.
    """
    n_cells, n_pairs = len(cells), len(inputs)
    per_copy = copies_per_pass(model, inputs, metric, batch_tokens)
    if start_positions is not None and not (metric.builtin and prefix_reuse_exact(model)):
        start_positions = None
    if start_positions is None:
        order = torch.argsort(start_layers, stable=True)
        chunks = [order[i:i + per_copy] for i in range(0, n_cells, per_copy)]
    else:  # by position; within a pass, by start layer
        order = torch.argsort(start_positions * (model.n_layers + 1) + start_layers, stable=True)
        chunks = [order[i:i + per_copy] for i in range(0, n_cells, per_copy)]
        chunks = [c[torch.argsort(start_layers[c], stable=True)] for c in chunks]
    per_pair = torch.zeros(n_cells, n_pairs) if metric.builtin else None
    per_cell = torch.zeros(n_cells)
    bar = tqdm(total=len(chunks) * n_pairs, desc=desc, disable=not progress)
    with torch.no_grad():
        for chunk in chunks:
            chunk_cells = cells[chunk]
            starts = start_layers[chunk] if pass_starts is None else pass_starts(chunk)
            first = 0 if start_positions is None else int(start_positions[chunk].min())
            full: list[Tensor] = []
            for p in range(n_pairs):
                tokens = base[p]
                read = None if not metric.builtin else torch.tensor([len(tokens) - 1 - first])
                hooks = (hooks_for(p, chunk_cells) if start_positions is None
                         else hooks_for(p, chunk_cells, first))
                out = run_copies(model, tokens, start_layers=starts, hooks=hooks,
                                 read_positions=read, start_pos=first)
                if metric.builtin:
                    assert per_pair is not None and inputs.answer is not None
                    per_pair[chunk, p] = metric.on_answer_logits(
                        out, inputs.answer[p:p + 1], wrong_tokens(inputs, metric)[p:p + 1]
                    )[:, 0].cpu()
                else:
                    full.append(out)
                bar.update(1)
            if not metric.builtin:
                values = metric.on_logits(stack_logits(full))  # [copy] or [copy, pair]
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
