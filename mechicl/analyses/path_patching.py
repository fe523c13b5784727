"""Path patching: the effect of sender heads on receiver heads through one input (q, k or v).

Activation patching measures a head's total effect; path patching (Wang et al. 2022, "Interpretability
in the Wild", Sec. 3.1; reused by Merullo et al. 2023 to show the IOI circuit reused on Colored
Objects) measures only the part that flows along a path ``sender -> receiver``:

1. Run the base prompt with the sender heads' outputs (``hook_z``) taken from the other prompt
   and every other attention head *frozen* at its base value (MLPs recompute, as in Wang et
   al.; ``freeze_mlps=True`` freezes them too). Record the receivers' chosen input (their
   query, key or value vectors).
2. Run the base prompt again with only the receivers' inputs replaced by the recorded ones, and
   score it with the metric.

With ``receivers="logits"`` step 1 runs to the end and is scored directly: the sender's effect
on the logits through no other attention head.

Direction: Wang et al. patch corrupted (their "ABC") senders into the clean run, ``"noising"``,
the default here: a large drop means the path carries the clean behaviour. ``"denoising"``
patches clean senders into the corrupted run.

Grouped-query attention: a receiver's key/value input is patched for that query head only (the
other query heads of its KV group keep theirs), with the exact per-query-head view of
:mod:`mechicl.analyses.patching`.

Batching: each sender (or sender set) is one copy of the prompt; many copies share one forward
pass and the layers below the lowest sender run once for all of them.

Axis names: ``layer head pos pair copy``.
"""

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

from mechicl._checks import check_choice
from mechicl.analyses._engine import (
    Hook,
    baselines,
    capture,
    check_scores_reconstructable,
    first_rows,
    normalise,
    prepare,
    qk_kinds,
    query_view_hooks,
    replace_hook,
    run_cells,
    run_copies,
    source_names,
)
from mechicl.analyses._registry import (
    Analysis,
    Call,
    Job,
    Option,
    Outputs,
    batch_tokens_option,
    job_stem,
    register_analysis,
)
from mechicl.analyses.metrics import MetricFn
from mechicl.analyses.patching import (
    PAIR_OPTIONS,
    PatchResult,
    job_pairs,
    pair_length,
    patch_figures,
    patch_summary,
)
from mechicl.inputs.pairs import PromptPairs
from mechicl.model.hooked import HookedModel

__all__ = ["RECEIVER_INPUTS", "parse_head", "path_patch"]

ReceiverInput = Literal["q", "k", "v"]
RECEIVER_INPUTS: tuple[str, ...] = ("q", "k", "v")


def _heads(model: HookedModel, heads: Any, what: str) -> list[tuple[int, int]]:
    out = []
    for item in heads:
        if not (isinstance(item, Sequence) and len(item) == 2):
            raise ValueError(f"{what} must be (layer, head) pairs, got {item!r}")
        layer, head = int(item[0]), int(item[1])
        if not (0 <= layer < model.n_layers and 0 <= head < model.n_heads):
            raise ValueError(f"{what} head ({layer}, {head}) is outside the model's "
                             f"{model.n_layers} layers x {model.n_heads} heads")
        out.append((layer, head))
    if not out:
        raise ValueError(f"no {what} heads given")
    return out


def path_patch(
    model: HookedModel,
    clean: PromptPairs | str | Sequence[str] | Int[Tensor, "pair pos"],
    corrupted: str | Sequence[str] | Int[Tensor, "pair pos"] | None = None,
    metric: str | MetricFn = "logit_diff",
    *,
    receivers: Sequence[tuple[int, int]] | Literal["logits"],
    receiver_input: ReceiverInput | Sequence[ReceiverInput] = "q",
    senders: Sequence[tuple[int, int] | Sequence[tuple[int, int]]] | None = None,
    direction: Literal["denoising", "noising"] = "noising",
    freeze_mlps: bool = False,
    normalize: bool = False,
    answer: Any = None,
    wrong: Any = None,
    batch_tokens: int = 8192,
    progress: bool = False,
) -> PatchResult:
    """Path patching from sender heads to receiver heads (see the module docstring).

    Args:
        model: the model.
        clean: a :class:`~mechicl.inputs.pairs.PromptPairs` or clean prompts (as :func:`mechicl.patch`).
        corrupted: the corrupted prompts (None with PromptPairs).
        metric: a built-in metric name or a callable ``logits [pair, pos, vocab] -> scalar or
            [pair]``.
        receivers: the receiver heads ``[(layer, head), ...]`` (patched together), or
            ``"logits"`` for the path to the logits through no other attention head.
        receiver_input: which input of the receivers carries the path: ``"q"``, ``"k"``,
            ``"v"`` or several of them.
        senders: None for every head separately (a ``[layer, head]`` grid; heads that cannot
            reach a receiver are NaN), or a list whose items are a head ``(layer, head)`` or a
            set of heads patched together (result axis ``sender``).
        direction: ``"noising"`` (Wang et al.: run clean, senders from corrupted) or
            ``"denoising"``.
        freeze_mlps: also freeze the MLPs between senders and receivers.
        normalize: report ``(patched - corrupted) / (clean - corrupted)``.
        answer: correct tokens for built-in metrics (without PromptPairs).
        wrong: competing tokens, likewise.
        batch_tokens: patched copies x prompt length per forward pass.
        progress: show a progress bar.

    Returns:
        A :class:`~mechicl.analyses.patching.PatchResult` (``method="path"``).

    >>> res = path_patch(model, pairs, receivers=[(1, 0), (1, 3)], receiver_input="v")
    >>> res.axes, res.values.shape
    (('layer', 'head'), torch.Size([2, 4]))
    >>> res.values[1].isnan().all().item()  # layer-1 senders cannot reach layer-1 receivers
    True
    """
    model, resolved, inputs = prepare(model, clean, corrupted, metric, direction, normalize,
                                      answer, wrong)
    to_logits = isinstance(receivers, str)
    if to_logits:
        if receivers != "logits":
            raise ValueError(f"receivers={receivers!r}: give (layer, head) pairs or 'logits'")
        recv: list[tuple[int, int]] = []
        inputs_kinds: list[str] = []
        top = model.n_layers  # senders anywhere
    else:
        recv = _heads(model, receivers, "receiver")
        kinds = [receiver_input] if isinstance(receiver_input, str) else list(receiver_input)
        if not kinds:
            raise ValueError(f"receiver_input is empty; give one or more of {list(RECEIVER_INPUTS)}")
        for kind in kinds:
            check_choice("receiver_input", kind, RECEIVER_INPUTS)
        inputs_kinds = sorted(set(kinds))
        if "k" in inputs_kinds:
            check_scores_reconstructable(model)
        top = max(layer for layer, _ in recv)

    # Sender sets: one copy each.
    if senders is None:
        sets = [[(layer, head)] for layer in range(model.n_layers) for head in range(model.n_heads)]
        grid = True
    else:
        sets = [_heads(model, [s] if len(s) and isinstance(s[0], int) else s, "sender")
                for s in senders]
        if not sets:
            raise ValueError("senders is empty; give (layer, head) heads or sets of heads, or None "
                             "for every head")
        grid = False
    valid = torch.tensor([min(layer for layer, _ in s) < top for s in sets])
    if not grid and not bool(valid.all()):
        bad = [s for s, ok in zip(sets, valid.tolist(), strict=True) if not ok]
        raise ValueError(f"sender sets {bad} have no head below the last receiver layer {top}: "
                         "they cannot reach a receiver")
    # membership[set, layer, head]
    membership = torch.zeros(len(sets), model.n_layers, model.n_heads, dtype=torch.bool)
    for i, s in enumerate(sets):
        for layer, head in s:
            membership[i, layer, head] = True
    cells = torch.nonzero(valid)[:, 0]  # indices of sender sets that can have an effect
    first_layer = torch.tensor([min(layer for layer, _ in s) for s in sets])

    denoise = direction == "denoising"
    z_names = {model.hook_name("z", layer) for layer in range(top)}
    mlp_names = {model.hook_name("mlp_out", layer) for layer in range(top)} if freeze_mlps else set()
    if freeze_mlps and model.hook_name("mlp_out", 0) not in model.hook_dict:
        raise ValueError("freeze_mlps=True: this model has no MLPs")
    recv_layers = sorted({layer for layer, _ in recv})
    captured_names = sorted(set().union(*[source_names(model, kind, recv_layers, "query")
                                          if kind in ("k", "v") else
                                          {model.hook_name("q", layer) for layer in recv_layers}
                                          for kind in inputs_kinds])) if recv else []
    base_runs, src_runs, logits_clean, logits_corrupted = [], [], [], []
    for c, k in zip(inputs.clean, inputs.corrupted, strict=True):
        lc, cache_c = capture(model, c, z_names | mlp_names | set(captured_names))
        lk, cache_k = capture(model, k, z_names | mlp_names | set(captured_names))
        base_runs.append(cache_k if denoise else cache_c)
        src_runs.append(cache_c if denoise else cache_k)
        logits_clean.append(lc)
        logits_corrupted.append(lk)
    clean_metric, corrupted_metric = baselines(model, inputs, resolved, logits_clean,
                                               logits_corrupted)
    base = inputs.corrupted if denoise else inputs.clean

    def sender_hooks(p: int, chunk: Tensor) -> list[tuple[str, Hook]]:
        """Step 1: senders from the source run, all other heads (and MLPs) frozen."""
        hooks: list[tuple[str, Hook]] = []
        lo = int(first_layer[chunk].min())
        member = membership[chunk]  # [copy, layer, head]
        for layer in range(lo, top):
            z_name = model.hook_name("z", layer)
            sel = member[:, layer][:, None, :, None]  # [copy, 1, head, 1]
            hooks.append((z_name, _freeze_hook(sel, src_runs[p][z_name], base_runs[p][z_name])))
            if freeze_mlps:
                name = model.hook_name("mlp_out", layer)
                hooks.append((name, replace_hook(torch.ones(1, 1, 1, dtype=torch.bool),
                                                  base_runs[p][name])))
        return hooks

    if to_logits:
        def hooks_for(p: int, chunk_cells: Tensor) -> list[tuple[str, Hook]]:
            return sender_hooks(p, chunk_cells[:, 0])
        pass_starts = None
    else:
        recv_sel = torch.zeros(model.n_layers, model.n_heads, dtype=torch.bool)
        for layer, head in recv:
            recv_sel[layer, head] = True

        def hooks_for(p: int, chunk_cells: Tensor) -> list[tuple[str, Hook]]:
            chunk = chunk_cells[:, 0]
            got: dict[str, Tensor] = {}

            def keep(name: str) -> Hook:
                def hook(x: Tensor, hook: Any) -> None:
                    got[name] = x.detach()
                return hook

            step1 = sender_hooks(p, chunk) + [(n, keep(n)) for n in captured_names]
            run_copies(model, base[p], start_layers=first_layer[chunk], hooks=step1,
                       read_positions=None, stop_at=model.hook_name("z", top))
            for name, x in got.items():  # copies that start above a receiver's layer read the
                missing = len(chunk) - x.shape[0]  # base run's input there
                if missing:
                    base_x = base_runs[p][name]
                    got[name] = torch.cat([x, base_x.expand(missing, *base_x.shape[1:])])
            return _receiver_hooks(model, recv_sel, recv_layers, inputs_kinds, got, len(chunk),
                                   len(base[p]))

        def pass_starts(chunk: Tensor) -> Tensor:  # step 2: every copy from the receivers up
            return torch.full((len(chunk),), recv_layers[0], dtype=torch.long)

    per_cell, per_pair = run_cells(
        model, inputs, resolved, cells=cells[:, None], base=base, hooks_for=hooks_for,
        start_layers=first_layer[cells], pass_starts=pass_starts, batch_tokens=batch_tokens,
        progress=progress, desc="path patching")
    if resolved.normalize:
        per_cell = normalise(per_cell, clean_metric, corrupted_metric)
    n_sets = len(sets)
    values = torch.full((n_sets,), float("nan"))
    values[cells] = per_cell
    pairs_values = None
    if per_pair is not None:
        pairs_values = torch.full((n_sets, len(inputs)), float("nan"))
        pairs_values[cells] = per_pair
    if grid:
        axes: tuple[str, ...] = ("layer", "head")
        values = values.reshape(model.n_layers, model.n_heads)
        if pairs_values is not None:
            pairs_values = pairs_values.reshape(model.n_layers, model.n_heads, len(inputs))
        labels: dict[str, list[str]] = {}
    else:
        axes = ("sender",)
        labels = {"sender": [" ".join(f"{a}.{b}" for a, b in s) for s in sets]}
    params = {"receivers": "logits" if to_logits else [list(r) for r in recv],
              "receiver_input": inputs_kinds, "senders": None if grid else labels["sender"],
              "direction": direction, "freeze_mlps": freeze_mlps, "metric": resolved.name,
              "normalize": resolved.normalize, **inputs.describe()}
    target = "path:logits" if to_logits else "path:" + "+".join(inputs_kinds)
    return PatchResult(target=target, axes=axes, values=values, per_pair=pairs_values,
                       clean=clean_metric, corrupted=corrupted_metric, metric=resolved.name,
                       normalized=resolved.normalize, direction=direction, method="path",
                       labels=labels, params=params, model=model.info())


def _freeze_hook(sel: Tensor, source: Tensor, frozen: Tensor) -> Hook:
    def hook(z: Tensor, hook: Any) -> Tensor:  # the first k copies [k, pos, head, d_head]
        return torch.where(first_rows(sel, z.shape[0]).to(z.device), source.to(z.dtype),
                           frozen.to(z.dtype)).expand_as(z)
    return hook


def _receiver_hooks(model: HookedModel, recv_sel: Tensor, layers: list[int], kinds: list[str],
                    got: dict[str, Tensor], copies: int, n_pos: int) -> list[tuple[str, Hook]]:
    """Step 2: each receiver's input replaced by what step 1 recorded for its copy."""
    hooks: list[tuple[str, Hook]] = []
    for layer in layers:
        heads = recv_sel[layer]  # [head]
        for kind in kinds:
            if kind == "q":
                name = model.hook_name("q", layer)
                hooks.append((name, replace_hook(heads[None, None, :, None], got[name])))
            else:
                sel_keys = heads[None, None, :].expand(copies, n_pos, model.n_heads)
                src_kind = qk_kinds(model)[1] if kind == "k" else "v"
                source = {model.hook_name(src_kind, layer): got[model.hook_name(src_kind, layer)]}
                hooks += query_view_hooks(model, kind, layer, sel_keys, source)
    return hooks


# --------------------------------------------------------------------------------------------
# The registered analysis
# --------------------------------------------------------------------------------------------


def parse_head(text: str) -> tuple[int, int]:
    """``"23.3"`` -> ``(23, 3)``.

    >>> parse_head("23.3")
    (23, 3)
    """
    try:
        layer, head = (int(x) for x in text.split("."))
    except ValueError:
        raise ValueError(f"{text!r} is not a head: write layer.head, e.g. 23.3") from None
    return layer, head


def _check(options: dict[str, Any], tasks: Sequence[str], shots: Sequence[int]) -> None:
    receivers = options["receivers"]
    if "logits" in receivers and len(receivers) > 1:
        raise ValueError(f"receivers={receivers}: 'logits' stands alone")
    for r in receivers:
        if r != "logits":
            parse_head(r)


def _receivers(options: Mapping[str, Any]) -> list[tuple[int, int]] | Literal["logits"]:
    if options["receivers"] == ["logits"]:
        return "logits"
    return [parse_head(r) for r in options["receivers"]]


def _run(call: Call) -> PatchResult:
    o = call.options
    return path_patch(call.model, job_pairs(call.model, call.job), metric=o["metric"],
                      receivers=_receivers(o), receiver_input=o["receiver_input"],
                      direction=o["direction"], progress=call.progress, **call.batch())


def _outputs(pairs: Sequence[tuple[Job, PatchResult]], options: Mapping[str, Any]) -> Outputs:
    results, figures, rows = {}, {}, []
    for job, result in pairs:
        o = job.options
        to = ("logits" if o["receivers"] == ["logits"]
              else f"{o['receiver_input']}-to-" + "_".join(o["receivers"]))
        stem = job_stem(job, o["prompts"], "path", to)
        results[stem] = result
        figures |= patch_figures(stem, result)
        rows.append({"prompts": o["prompts"], "receivers": " ".join(o["receivers"]),
                     **patch_summary(result)})
    return Outputs(results=results, figures=figures, rows=rows)


PATH_PATCHING = register_analysis(Analysis(
    name="path_patching", command="path-patch",
    help="path patching: every sender head -> receiver heads (via q, k or v) or the logits",
    run=_run, result_type=PatchResult, memory="forward", sequence_length=pair_length,
    check=_check, outputs=_outputs,
    options=(*PAIR_OPTIONS,
             Option(name="receivers", type=list, item=str, default=["logits"],
                    help="receiver heads as layer.head (e.g. 23.3,24.4), or logits"),
             Option(name="receiver_input", type=str, default="q", choices=RECEIVER_INPUTS,
                    sweep=True, help="which input of the receivers the path reaches"),
             Option(name="direction", type=str, default="noising",
                    choices=("denoising", "noising"),
                    help="noising (Wang et al.'s default) or denoising"),
             batch_tokens_option(8192, "patched copies x prompt length per pass")),
))
