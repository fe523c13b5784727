"""Many patched copies of one prompt in one forward pass, sharing the unpatched lower layers.

Every patched copy of a prompt equals the unpatched run below the first layer it patches. So a
pass starts with one row, the unpatched prompt, and at each layer's ``hook_resid_pre`` appends
the copies that start patching at that layer (copies of row 0's residual stream); each copy is
then patched by vectorised hooks. A copy patched at layer ``L`` costs ``n_layers - L`` blocks,
not ``n_layers``. The bridge accepts a batch that grows between blocks only when its attention
mask and position embeddings broadcast, which holds for a single unpadded prompt (batch 1):
this is why patching runs one prompt (pair) per pass, with the copies as the batch.

The pass stops at the final residual stream (``ln_final.hook_in``) and unembeds only the answer
positions, unless full logits are asked for; :func:`answer_logits_exact` checks once per model
that this equals the model's own logits.

Axis names: ``copy pos d_model d_vocab``.
"""

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechicl.models import HookedModel

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
    stop_at: str | None = None, _trust_unembed: bool = False,
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

    Returns:
        Logits at ``read_positions`` (or all positions), or the activation at ``stop_at``.
    """
    starts = start_layers.tolist()
    if any(b < a for a, b in zip(starts, starts[1:], strict=False)):
        raise ValueError(f"start_layers must be non-decreasing, got {starts}")
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
    try:
        logits = model.run_with_hooks(tokens[None].to(model.device), fwd_hooks=fwd,
                                      return_type="logits")
    except _Stop as stopped:
        if stop_at is not None:
            return stopped.value[1:]
        resid = stopped.value[1:, read_positions]  # [copy, n, d_model]
        return unembed(model, resid)
    if stop_at is not None:
        raise RuntimeError(f"the forward pass never reached {stop_at!r}")
    logits = logits[1:]
    return logits if read_positions is None else logits[:, read_positions]


def unembed(model: HookedModel, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
    """Final norm and unembedding of final-residual vectors."""
    return model.bridge.unembed(model.bridge.ln_final(resid))


_EXACT: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def answer_logits_exact(model: HookedModel) -> bool:
    """Whether ``unembed(ln_final(resid))`` reproduces the model's logits (checked once per
    model on a short probe; False e.g. for models that post-process logits)."""
    bridge = model.bridge
    if bridge not in _EXACT:
        probe = torch.arange(3, 3 + min(8, model.d_vocab - 3), device=model.device)
        with torch.no_grad():
            full = model.run_with_hooks(probe[None], return_type="logits")
            mine = run_copies(model, probe, start_layers=torch.zeros(1, dtype=torch.long), hooks=[],
                              read_positions=torch.arange(len(probe)), _trust_unembed=True)
        scale = full.abs().max().clamp_min(1.0)
        _EXACT[bridge] = bool(((full - mine).abs().max() / scale) < 1e-4)
    return _EXACT[bridge]


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
