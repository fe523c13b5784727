"""Slow, obviously-correct references for activation patching, for testing :mod:`mechicl.analyses.patching`.

Nothing here imports :mod:`mechicl.analyses.patching` (or its forward-pass helpers): every patched run is
ONE plain ``run_with_hooks`` forward pass of the whole (un-expanded) batch with ONE hand-written
hook, and every value is a Python loop over cells. Tests compare mechicl's batched, vectorised
patching against these and against TransformerLens's ``get_act_patch_*`` functions (wrapped by
:func:`tl_patch`).

Conventions (TransformerLens's): a *run* is the forward pass that gets patched (the corrupted
prompt for denoising, the clean one for noising) and the *source* is the run the patched
activation comes from. Metrics are callables ``logits [batch, pos, vocab] -> scalar or [batch]``.
Grouped-query attention: KV head ``j`` serves query heads ``j*g .. j*g+g-1`` (Hugging Face's
``repeat_kv``), ``g = n_heads // n_kv_heads``.
"""

import copy
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch
import transformer_lens.patching as tlp
from torch import Tensor
from transformers import LlamaForCausalLM, PreTrainedModel

__all__ = [
    "TL_FUNCTIONS",
    "logit_diff",
    "mha_equivalent",
    "query_view_reference",
    "resid_reference",
    "run_metric",
    "source_cache",
    "tl_axes",
    "tl_patch",
]

Metric = Callable[[Tensor], Tensor]

# mechicl (target, by_pos) -> the TransformerLens function computing the same grid
TL_FUNCTIONS: dict[tuple[str, bool], Any] = {
    ("resid_pre", True): tlp.get_act_patch_resid_pre,
    ("resid_mid", True): tlp.get_act_patch_resid_mid,
    ("attn_out", True): tlp.get_act_patch_attn_out,
    ("mlp_out", True): tlp.get_act_patch_mlp_out,
    ("head_out", False): tlp.get_act_patch_attn_head_out_all_pos,
    ("head_out", True): tlp.get_act_patch_attn_head_out_by_pos,
    ("q", False): tlp.get_act_patch_attn_head_q_all_pos,
    ("q", True): tlp.get_act_patch_attn_head_q_by_pos,
    ("k", False): tlp.get_act_patch_attn_head_k_all_pos,
    ("k", True): tlp.get_act_patch_attn_head_k_by_pos,
    ("v", False): tlp.get_act_patch_attn_head_v_all_pos,
    ("v", True): tlp.get_act_patch_attn_head_v_by_pos,
    ("pattern", False): tlp.get_act_patch_attn_head_pattern_all_pos,
    ("pattern", True): tlp.get_act_patch_attn_head_pattern_by_pos,
}


# --------------------------------------------------------------------------------------------
# Metrics and plain runs
# --------------------------------------------------------------------------------------------


def logit_diff(logits: Tensor, answer: Tensor, wrong: Tensor) -> Tensor:
    """``logits[i, -1, answer[i]] - logits[i, -1, wrong[i]]`` for each row ``i`` (``[batch]``),
    written as a loop."""
    return torch.stack([logits[i, -1, int(answer[i])] - logits[i, -1, int(wrong[i])]
                        for i in range(logits.shape[0])])


def run_metric(model, tokens: Tensor, metric: Metric, hooks: list | None = None) -> Tensor:
    """``metric`` of one plain forward pass of ``tokens`` ``[batch, pos]`` with ``hooks``."""
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks or [], return_type="logits")
        return torch.as_tensor(metric(logits)).detach().float()


def source_cache(model, tokens: Tensor) -> dict[str, Tensor]:
    """Every activation of a plain run of ``tokens``, detached (name -> tensor)."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    return {name: cache[name].detach().clone() for name in cache.keys()}


# --------------------------------------------------------------------------------------------
# Residual-stream-shaped targets: one forward pass per layer (and position)
# --------------------------------------------------------------------------------------------


def resid_reference(model, run: Tensor, source: Tensor, metric: Metric, kind: str,
                    by_pos: bool) -> Tensor:
    """Patch ``blocks.L.hook_<kind>`` (``kind`` in resid_pre / resid_mid / resid_post /
    attn_out / mlp_out) of ``run`` with its value in ``source``: at every position at once
    (``[layer, *metric]``) or one position at a time (``[layer, pos, *metric]``).
    One forward pass per cell.

    ``resid_mid`` is the residual stream between attention and MLP, which feeds both the MLP
    and the skip connection around it. In TransformerLens 4's bridge ``hook_resid_mid`` is the
    MLP norm's input (``ln2.hook_in``), so a value returned there reaches the MLP only; here
    the block's output is also rebuilt by hand: ``resid_post = patched resid_mid + mlp_out``.
    """
    cache = source_cache(model, source)
    n_layers, n_pos = model.cfg.n_layers, run.shape[1]
    rows = []
    for layer in range(n_layers):
        src = cache[f"blocks.{layer}.hook_{kind}"]
        values = [_resid_cell(model, run, metric, kind, layer, src, pos)
                  for pos in (range(n_pos) if by_pos else [None])]
        rows.append(torch.stack(values) if by_pos else values[0])
    return torch.stack(rows)


def _resid_cell(model, run: Tensor, metric: Metric, kind: str, layer: int, src: Tensor,
                pos: int | None) -> Tensor:
    """One patched forward pass: ``blocks.layer.hook_<kind>`` replaced by ``src`` at ``pos``
    (every position if None)."""
    seen: dict[str, Tensor] = {}

    def replace(act: Tensor, hook: Any) -> Tensor:
        act = act.clone()
        if pos is None:
            act[:] = src
        else:
            act[:, pos] = src[:, pos]
        seen["mid"] = act
        return act

    def keep_mlp_out(act: Tensor, hook: Any) -> None:
        seen["mlp_out"] = act.detach().clone()

    def rebuild_post(act: Tensor, hook: Any) -> Tensor:
        return seen["mid"] + seen["mlp_out"]

    hooks = [(f"blocks.{layer}.hook_{kind}", replace)]
    if kind == "resid_mid":
        hooks += [(f"blocks.{layer}.hook_mlp_out", keep_mlp_out),
                  (f"blocks.{layer}.hook_resid_post", rebuild_post)]
    return run_metric(model, run, metric, hooks)


# --------------------------------------------------------------------------------------------
# The per-query-head view of k/v patching: recompute one head's scores or output by hand
# --------------------------------------------------------------------------------------------


def query_view_reference(model, run: Tensor, source: Tensor, metric: Metric, target: str,
                         layer: int, head: int, pos: int | None = None) -> Tensor:
    """The metric when only query head ``head`` of ``layer`` reads the source run's keys
    (``target="k"``) or values (``target="v"``), at every key position (``pos=None``) or only
    at key position ``pos``; the other query heads of its group keep the run's own.

    One forward pass of ``run`` with explicit loops:

    * ``k``: at ``hook_attn_scores`` the head's causal scores are recomputed as
      ``q[query] . key[k] / sqrt(d_head)``, where ``q`` is the run's (rotated) query and
      ``key[k]`` the source run's (rotated) key of the head's KV group at the patched key
      positions, the run's own elsewhere. Entries above the diagonal are left as they are.
    * ``v``: at ``hook_z`` the head's output is recomputed as
      ``sum_k pattern[query, k] * value[k]`` with the source run's value vectors at the patched
      key positions (the run's own elsewhere) and the run's own attention pattern.
    """
    n_heads = model.cfg.n_heads
    n_kv = getattr(model.cfg, "n_key_value_heads", None) or n_heads
    kv = head // (n_heads // n_kv)
    rotary = f"blocks.{layer}.attn.hook_rot_k" in model.hook_dict
    if target == "k":
        q_name = f"blocks.{layer}.attn.hook_{'rot_q' if rotary else 'q'}"
        k_name = f"blocks.{layer}.attn.hook_{'rot_k' if rotary else 'k'}"
        read_names, write_name = (q_name, k_name), f"blocks.{layer}.attn.hook_attn_scores"
    elif target == "v":
        read_names = (f"blocks.{layer}.attn.hook_v", f"blocks.{layer}.attn.hook_pattern")
        write_name = f"blocks.{layer}.attn.hook_z"
    else:
        raise ValueError(target)
    src_name = read_names[1] if target == "k" else read_names[0]
    src = source_cache(model, source)[src_name]  # [batch, pos, kv_head, d_head]
    seen: dict[str, Tensor] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(act: Tensor, hook: Any) -> None:
            seen[name] = act.detach().clone()
        return hook

    def key_or_value(b: int, k: int) -> Tensor:
        mine = seen[src_name][b, k, kv]
        return src[b, k, kv] if pos is None or k == pos else mine

    def write(act: Tensor, hook: Any) -> Tensor:
        act = act.clone()
        n_pos = act.shape[2] if target == "k" else act.shape[1]
        for b in range(act.shape[0]):
            for query in range(n_pos):
                if target == "k":  # act: [batch, head, query_pos, key_pos]
                    q = seen[read_names[0]][b, query, head]
                    for k in range(query + 1):
                        act[b, head, query, k] = torch.dot(q, key_or_value(b, k)) / q.shape[0] ** 0.5
                else:  # act: [batch, pos, head, d_head]
                    pattern = seen[read_names[1]][b, head, query]
                    out = torch.zeros_like(act[b, query, head])
                    for k in range(n_pos):
                        out += pattern[k] * key_or_value(b, k)
                    act[b, query, head] = out
        return act

    hooks = [(name, keep(name)) for name in read_names] + [(write_name, write)]
    return run_metric(model, run, metric, hooks)


# --------------------------------------------------------------------------------------------
# TransformerLens
# --------------------------------------------------------------------------------------------


def tl_patch(model, run: Tensor, source: Tensor, metric: Metric, target: str, by_pos: bool,
             *, reduce: str = "scalar", index_df: pd.DataFrame | None = None,
             cache: Any = None, grad: bool = False) -> Tensor:
    """TransformerLens's ``get_act_patch_*`` for ``target`` on ``model.bridge``, run on ``run``
    with the cache of ``source`` (``model.run_with_cache(source)``, or ``cache`` if given):
    ``[*axes]`` (``[*axes, batch]`` with ``reduce="none"``), or one value per row of
    ``index_df``.

    Run under ``torch.no_grad()`` unless ``grad``. TransformerLens's patch setters write into
    the activation in place, but clone it first when it requires grad. That matters for one
    hook only: in the bridge ``hook_resid_mid`` is ``ln2.hook_in``, and only the in-place write
    (no grad) also reaches the skip connection around the MLP, i.e. patches the residual
    stream as HookedTransformer did; with grad, TransformerLens patches the MLP input only.
    """
    fn = TL_FUNCTIONS[(target, by_pos)]
    if cache is None:
        with torch.no_grad():
            _, cache = model.run_with_cache(source)
    kwargs: dict[str, Any] = {"reduce": reduce}
    if index_df is not None:
        kwargs |= {"index_df": index_df, "index_axis_names": None}
    with torch.set_grad_enabled(grad):
        out = fn(model.bridge, run, cache, metric, **kwargs)
    return (out.values if reduce == "none" else out).detach().float().cpu()


def tl_axes(target: str, by_pos: bool) -> tuple[str, ...]:
    """TransformerLens's axis names of ``target`` in mechicl's spelling (``head_index`` ->
    ``head``, ``dest_pos`` -> ``pos``)."""
    names = TL_FUNCTIONS[(target, by_pos)].keywords["index_axis_names"]
    return tuple({"head_index": "head", "dest_pos": "pos"}.get(n, n) for n in names)


# --------------------------------------------------------------------------------------------
# A multi-head model computing exactly what a grouped-query model computes
# --------------------------------------------------------------------------------------------


def mha_equivalent(gqa: PreTrainedModel) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` with ``num_key_value_heads = num_attention_heads`` computing the
    same function as the grouped-query Llama ``gqa``: each KV head's rows of ``k_proj`` /
    ``v_proj`` (and biases, if any) are repeated for the ``g`` query heads it serves."""
    config = copy.deepcopy(gqa.config)
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    g = n_heads // n_kv
    d_head = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    config.num_key_value_heads = n_heads
    state = {}
    for name, tensor in gqa.state_dict().items():
        if name.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")):
            rows = tensor.reshape(n_kv, d_head, *tensor.shape[1:])
            tensor = torch.cat([rows[j:j + 1] for j in range(n_kv) for _ in range(g)])
            tensor = tensor.reshape(n_heads * d_head, *tensor.shape[2:])
        state[name] = tensor.clone()
    mha = LlamaForCausalLM(config).to(torch.float32)
    mha.load_state_dict(state)
    return mha.eval()
