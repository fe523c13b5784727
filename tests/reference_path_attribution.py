"""Slow, textbook reference implementations of path patching and attribution patching, for testing.

Everything here works on ONE prompt pair and ONE cell (one sender set, one patched slice) at a
time, un-batched (batch size 1), with explicit ``model.run_with_hooks`` calls and hooks written
out by hand. The module never imports :mod:`mechicl.analyses.patching`, :mod:`mechicl.analyses.path_patching` or
:mod:`mechicl.analyses.attribution`: tests compare the batched, vectorised implementations with these.

Conventions: tokens are one unpadded row ``[pos]`` (BOS included); the metric is the logit
difference ``logit[answer] - logit[wrong]`` at the last position; ``hook_z`` / ``hook_q`` are
``[1, pos, head, d_head]`` over query heads, ``hook_k`` / ``hook_v`` ``[1, pos, kv_head,
d_head]``; the "base" run is the one that gets patched (clean when noising, corrupted when
denoising) and the "source" run the one the patched values come from.

Grouped-query attention: a per-query-head view of a key/value has no hook of its own. Two
references are given for it: :func:`mha_equivalent` rebuilds a grouped-query Llama as the
equivalent multi-head model (each KV head's ``k_proj``/``v_proj`` rows repeated for its query
heads), where that view is an ordinary ``hook_k``/``hook_v`` head slice; and for values,
:func:`path_patch_reference` can instead rewrite the receiver's ``hook_z`` as ``pattern_h @ v``
(see there).
"""

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "attribution_cell_reference",
    "cache_run",
    "hook",
    "logit_diff",
    "mha_equivalent",
    "path_caches",
    "path_patch_reference",
]

Index = tuple[Any, ...]


def hook(model: Any, kind: str, layer: int) -> str:
    """The TransformerLens hook name, spelled out here (independent of mechicl)."""
    names = {
        "resid_pre": "blocks.{}.hook_resid_pre", "resid_mid": "blocks.{}.hook_resid_mid",
        "resid_post": "blocks.{}.hook_resid_post", "attn_out": "blocks.{}.hook_attn_out",
        "mlp_out": "blocks.{}.hook_mlp_out", "z": "blocks.{}.attn.hook_z",
        "q": "blocks.{}.attn.hook_q", "k": "blocks.{}.attn.hook_k",
        "v": "blocks.{}.attn.hook_v", "pattern": "blocks.{}.attn.hook_pattern",
    }
    return names[kind].format(layer)


def logit_diff(logits: Tensor, answer: int, wrong: int) -> Tensor:
    """``logit[answer] - logit[wrong]`` at the last position of a ``[1, pos, vocab]`` run."""
    last = logits[0, -1].float()
    return last[answer] - last[wrong]


def _n(model: Any, attr: str) -> int:
    cfg = model.cfg
    if attr == "n_kv_heads":
        return int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)
    return int(getattr(cfg, attr))


def cache_run(model: Any, tokens: Tensor, names: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
    """A plain forward pass of one prompt: logits ``[1, pos, vocab]`` and the named activations."""
    cache: dict[str, Tensor] = {}

    def save(name: str) -> Callable[..., None]:
        def fn(x: Tensor, hook: Any) -> None:
            cache[name] = x.detach().clone()
        return fn

    with torch.no_grad():
        logits = model.run_with_hooks(tokens[None], return_type="logits",
                                      fwd_hooks=[(n, save(n)) for n in names])
    return logits, cache


# --------------------------------------------------------------------------------------------
# Path patching (Wang et al. 2022, Sec. 3.1)
# --------------------------------------------------------------------------------------------


def path_caches(model: Any, base: Tensor, source: Tensor,
                ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Step 1 of path patching: the base run's ``hook_z`` and ``hook_mlp_out`` (if any) and the
    source run's ``hook_z``, at every layer."""
    n_layers = _n(model, "n_layers")
    z_names = [hook(model, "z", layer) for layer in range(n_layers)]
    mlp_names = [hook(model, "mlp_out", layer) for layer in range(n_layers)
                 if hook(model, "mlp_out", layer) in model.hook_dict]
    return cache_run(model, base, z_names + mlp_names)[1], cache_run(model, source, z_names)[1]


def path_patch_reference(
    model: Any, base: Tensor, source: Tensor, answer: int, wrong: int, *,
    senders: Sequence[tuple[int, int]], receivers: Sequence[tuple[int, int]] | str,
    receiver_input: Sequence[str] = ("q",), freeze_mlps: bool = False, freeze: bool = True,
    gqa_v_via_z: bool = False, gqa_group_view: bool = False,
    caches: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None,
) -> float:
    """The metric of one path-patched run of one pair, in three explicit steps.

    1. Cache the base run's and the source run's ``hook_z`` at every layer (and ``hook_mlp_out``
       with ``freeze_mlps``).
    2. Run the base prompt with every layer's ``hook_z`` set to the base run's values, except the
       sender heads, which get the source run's (``freeze=False`` leaves the non-senders alone:
       ordinary activation patching, used to show that freezing matters); with ``freeze_mlps``
       every ``hook_mlp_out`` is set to its base value. With ``receivers="logits"`` this run is
       scored and returned. Otherwise record the receivers' layers' ``hook_q`` / ``hook_k`` /
       ``hook_v``.
    3. Run the base prompt with the receiver heads' recorded inputs substituted and score it.

    ``caches`` may pass step 1's result, :func:`path_caches` of the same pair, to reuse it for
    several senders.

    Receiver key/value inputs are substituted as the head's slice of ``hook_k`` / ``hook_v``,
    which is the per-query-head view only for multi-head attention (checked). For values of a
    grouped-query model, ``gqa_v_via_z=True`` instead rewrites the receiver's output: a head's
    output is ``z_h[q] = sum_k pattern_h[q, k] v_{g(h)}[k]`` (``g(h)`` its KV head), so setting
    ``z_h = pattern_h @ v_recorded_{g(h)}`` with the step-3 run's own ``pattern_h`` is exactly
    "this query head reads the recorded values", while the other query heads of the group still
    read the run's own values (they are left alone). ``gqa_group_view=True`` replaces the
    receiver's whole KV head slice instead (every query head of its group reads the recorded
    keys/values): NOT what mechicl computes, used to show the tests tell the views apart.
    """
    n_layers, n_heads, n_kv = _n(model, "n_layers"), _n(model, "n_heads"), _n(model, "n_kv_heads")
    z_names = [hook(model, "z", layer) for layer in range(n_layers)]
    mlp_names = [hook(model, "mlp_out", layer) for layer in range(n_layers)] if freeze_mlps else []
    base_cache, src_cache = caches if caches is not None else path_caches(model, base, source)
    assert all(n in base_cache for n in mlp_names)

    # Step 2: senders from the source run, everything else frozen at the base run.
    def set_z(layer: int) -> Callable[..., Tensor]:
        def fn(z: Tensor, hook: Any) -> Tensor:
            out = base_cache[z_names[layer]].clone() if freeze else z.clone()
            for s_layer, s_head in senders:
                if s_layer == layer:
                    out[:, :, s_head, :] = src_cache[z_names[layer]][:, :, s_head, :]
            return out
        return fn

    def set_mlp(layer: int) -> Callable[..., Tensor]:
        def fn(x: Tensor, hook: Any) -> Tensor:
            return base_cache[mlp_names[layer]].clone()
        return fn

    step2 = [(z_names[layer], set_z(layer)) for layer in range(n_layers)]
    step2 += [(mlp_names[layer], set_mlp(layer)) for layer in range(len(mlp_names))]
    if isinstance(receivers, str):
        assert receivers == "logits"
        with torch.no_grad():
            logits = model.run_with_hooks(base[None], return_type="logits", fwd_hooks=step2)
        return float(logit_diff(logits, answer, wrong))

    recv_layers = sorted({layer for layer, _ in receivers})
    recorded: dict[str, Tensor] = {}

    def record(name: str) -> Callable[..., None]:
        def fn(x: Tensor, hook: Any) -> None:
            recorded[name] = x.detach().clone()
        return fn

    rec_names = [hook(model, kind, layer) for layer in recv_layers for kind in receiver_input]
    with torch.no_grad():
        model.run_with_hooks(base[None], return_type="logits",
                             fwd_hooks=step2 + [(n, record(n)) for n in rec_names])

    # Step 3: only the receivers' inputs replaced by the recorded ones.
    step3: list[tuple[str, Callable[..., Any]]] = []
    for layer, head in receivers:
        for kind in receiver_input:
            name = hook(model, kind, layer)
            if kind == "v" and gqa_v_via_z:
                step3 += _z_from_recorded_v(model, layer, head, recorded[name])
                continue
            index = head
            if kind in ("k", "v") and n_kv != n_heads:
                if not gqa_group_view:
                    raise NotImplementedError("k/v receivers of a grouped-query model: use "
                                              "mha_equivalent(model) (or gqa_v_via_z for v)")
                index = head // (n_heads // n_kv)

            def replace(x: Tensor, hook: Any, name: str = name, index: int = index) -> Tensor:
                x = x.clone()
                x[:, :, index, :] = recorded[name][:, :, index, :]
                return x
            step3.append((name, replace))
    with torch.no_grad():
        logits = model.run_with_hooks(base[None], return_type="logits", fwd_hooks=step3)
    return float(logit_diff(logits, answer, wrong))


def _z_from_recorded_v(model: Any, layer: int, head: int, v_rec: Tensor,
                       ) -> list[tuple[str, Callable[..., Any]]]:
    g = _n(model, "n_heads") // _n(model, "n_kv_heads")
    kv = head // g  # HF repeat_kv: KV head j serves query heads j*g .. j*g+g-1
    seen: dict[str, Tensor] = {}

    def keep_pattern(x: Tensor, hook: Any) -> None:
        seen["pattern"] = x.detach().clone()

    def set_z(z: Tensor, hook: Any) -> Tensor:
        z = z.clone()
        pattern_h = seen["pattern"][0, head]  # [query_pos, key_pos]
        z[0, :, head, :] = pattern_h @ v_rec[0, :, kv, :].to(pattern_h.dtype)
        return z

    return [(hook(model, "pattern", layer), keep_pattern), (hook(model, "z", layer), set_z)]


# --------------------------------------------------------------------------------------------
# Attribution patching (Nanda 2023)
# --------------------------------------------------------------------------------------------


def attribution_cell_reference(
    model: Any, base: Tensor, a_source: Tensor, answer: int, wrong: int, *, name: str,
    index: Index,
) -> float:
    """The first-order estimate of patching ``a_source[index]`` into the base run at hook
    ``name``, computed literally for this one cell:
    ``M(base) + sum over the slice of (a_source - a_base) * dM/da``, with ``dM/da`` from
    ``torch.autograd.grad`` through a fresh forward pass of the base prompt (the model's own
    parameters keep requiring grad, so the activation is an ordinary node of the graph).

    ``a_source`` is the source run's activation at ``name`` (``[1, ...]``, from
    :func:`cache_run`); ``index`` indexes it, batch axis included.
    """
    seen: dict[str, Tensor] = {}

    # The hook returns x unchanged, so the rest of the forward pass is computed from x: for hook
    # points that show a reshaped view of the module's tensor (hook_q/k/v/z, hook_pattern in the
    # bridge), a hook returning None would leave the original tensor, not x, in the graph.
    def keep(x: Tensor, hook: Any) -> Tensor:
        seen["a"] = x
        return x

    with torch.enable_grad():
        logits = model.run_with_hooks(base[None], return_type="logits", fwd_hooks=[(name, keep)])
        metric = logit_diff(logits, answer, wrong)
        a_base = seen["a"]
        if not a_base.requires_grad:
            raise RuntimeError(f"{name} is not in the autograd graph")
        (grad,) = torch.autograd.grad(metric, a_base)
    delta = (a_source - a_base.detach())[index]
    return float(metric.detach()) + float((delta.double() * grad[index].double()).sum())


# --------------------------------------------------------------------------------------------
# Grouped-query attention as multi-head attention
# --------------------------------------------------------------------------------------------


def mha_equivalent(model: Any) -> Any:
    """The multi-head-attention Llama computing exactly what grouped-query ``model`` computes.

    Each KV head's rows of ``k_proj``/``v_proj`` are repeated for the ``g`` query heads it
    serves (HF ``repeat_kv`` order: KV head ``j`` serves query heads ``j*g .. j*g+g-1``); every
    other weight is copied. Booted as a ``TransformerBridge`` with the same tokenizer (as
    mechicl.testing does). Its query head ``h`` has its own ``hook_k``/``hook_v`` slice, so
    patching that slice is the per-query-head view of the grouped model.
    """
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = model.bridge.original_model if hasattr(model, "bridge") else model.original_model
    config = hf.config
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    g = n_heads // n_kv
    d_head = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    new_config = LlamaConfig(**{**config.to_dict(), "num_key_value_heads": n_heads})
    mha = LlamaForCausalLM(new_config)
    # The bridge wraps HF modules: parameter names gain "._original_component" segments.
    params = {k.replace("._original_component", ""): v.detach()
              for k, v in hf.state_dict().items()}
    state = {}
    for key, target in mha.state_dict().items():
        w = params[key]
        if key.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight",
                         "self_attn.k_proj.bias", "self_attn.v_proj.bias")):
            w = w.reshape(n_kv, d_head, *w.shape[1:]).repeat_interleave(g, dim=0)
            w = w.reshape(n_heads * d_head, *w.shape[2:])
        assert w.shape == target.shape, (key, w.shape, target.shape)
        state[key] = w.clone()
    mha.load_state_dict(state)
    mha = mha.to(torch.float32).eval()
    return TransformerBridge.boot_transformers("reference-mha-equivalent", hf_model=mha,
                                               tokenizer=model.tokenizer, device="cpu")
