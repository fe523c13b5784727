"""Slow, plain reference implementations of head / FFN importance and masking, for testing.

Every function here works on ONE prompt at a time (batch size 1, so no padding), with explicit
Python loops over layers, heads and answer positions, and hooks written out by hand. The module
never imports :mod:`mechicl.analyses.importance`, :mod:`mechicl.model.masks` or :mod:`mechicl.analyses.pruning`: tests
compare the batched, vectorised implementations against these.

Prompts are tokenised here too (:func:`prompt_tokens`), as ``BOS + prompt + continuation``;
tests check that :func:`mechicl.analyses.evaluation.answer_batch` gives the same tokens.

Conventions: ``hook_z`` is ``[batch, pos, head, d_head]`` (query heads for grouped-query
attention); the answer loss of a prompt is the mean over its answer tokens ``t`` of
``-log softmax(logits[t - 1])[tokens[t]]``.

The last part builds the small synthetic tasks the tests use (copy tasks over the toy words
``w0 .. w95``).
"""

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mechicl.inputs.tasks import Example, Prompt, Task

__all__ = [
    "ablation_reference",
    "attribution_reference",
    "bansal_reference",
    "copy_examples",
    "copy_prompts",
    "copy_task",
    "ffn_reference",
    "head_hook",
    "mean_activations_reference",
    "michel_reference",
    "partial_ablation_reference",
    "prompt_tokens",
    "ref_answer_loss",
    "ref_choice_logliks",
    "ref_correct",
    "zero_mlp_hook",
]

Hook = tuple[str, Callable[..., Any]]


# --------------------------------------------------------------------------------------------
# One prompt at a time
# --------------------------------------------------------------------------------------------


def prompt_tokens(model, prompt: Prompt, which: str | int = "gold") -> tuple[Tensor, list[int]]:
    """``(tokens [pos], answer positions)`` of ``BOS + prompt + continuation`` (the gold or the
    ``which``-th choice); the answer positions index the continuation's tokens.

    Tokenised here, independently of mechicl: as in lm-evaluation-harness, trailing whitespace
    of the prompt moves to the start of the continuation; the context gets BOS, the
    continuation is tokenised on its own, without special tokens.
    """
    choice = prompt.gold if which == "gold" else int(which)
    context, continuation = prompt.text, prompt.continuations[choice]
    while context and context[-1].isspace():
        continuation = context[-1] + continuation
        context = context[:-1]
    tokenizer = model.tokenizer
    context_ids = [model.bos_token_id, *tokenizer(context, add_special_tokens=False)["input_ids"]]
    answer_ids = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
    tokens = torch.tensor(context_ids + answer_ids, dtype=torch.long)
    positions = list(range(len(context_ids), len(tokens)))
    return tokens, positions


def _loss_from_logits(logits: Tensor, tokens: Tensor, positions: list[int]) -> Tensor:
    """Mean over the answer positions t of -log p(tokens[t] | tokens[:t]); logits ``[pos, vocab]``.

    Differentiable (the gradient references call it on a graph)."""
    total = logits.new_zeros((), dtype=torch.float64)
    for t in positions:
        log_probs = torch.log_softmax(logits[t - 1].double(), dim=-1)
        total = total - log_probs[int(tokens[t])]
    return total / len(positions)


def _logits(model, tokens: Tensor, hooks: Sequence[Hook] = ()) -> Tensor:
    """Logits ``[pos, vocab]`` of one sequence, with the given forward hooks."""
    return model.run_with_hooks(tokens[None].to(model.device), fwd_hooks=list(hooks),
                                return_type="logits")[0]


def ref_answer_loss(model, prompt: Prompt, hooks: Sequence[Hook] = ()) -> float:
    """Mean cross-entropy of the gold continuation's tokens, one prompt, no batching."""
    tokens, positions = prompt_tokens(model, prompt)
    with torch.no_grad():
        logits = _logits(model, tokens, hooks)
    return float(_loss_from_logits(logits, tokens, positions))


def ref_choice_logliks(model, prompt: Prompt, hooks: Sequence[Hook] = ()) -> list[float]:
    """Summed log-probability of each continuation, one forward pass per choice."""
    out = []
    for choice in range(len(prompt.continuations)):
        tokens, positions = prompt_tokens(model, prompt, which=choice)
        with torch.no_grad():
            logits = _logits(model, tokens, hooks)
        out.append(-float(_loss_from_logits(logits, tokens, positions)) * len(positions))
    return out


def ref_correct(model, prompt: Prompt, hooks: Sequence[Hook] = (), chars: bool = False) -> bool:
    """Is the highest-likelihood continuation (first one among equal maxima) the gold one?
    ``chars``: the summed log-likelihood divided by the answer's characters without its leading
    space (lm-eval's ``acc_norm``)."""
    logliks = ref_choice_logliks(model, prompt, hooks)
    if chars:
        logliks = [ll / len(c.lstrip()) for ll, c in zip(logliks, prompt.continuations, strict=True)]
    best = 0
    for c in range(len(logliks)):
        if logliks[c] > logliks[best]:
            best = c
    return best == prompt.gold


# --------------------------------------------------------------------------------------------
# Hand-written hooks
# --------------------------------------------------------------------------------------------


def head_hook(model, layer: int, head: int, value: Tensor | float = 0.0,
              factor: float | None = None) -> Hook:
    """A hook on ``blocks.{layer}.attn.hook_z`` that sets head ``head``'s output to ``value``
    (0, or a ``[d_head]`` mean) at every position, or multiplies it by ``factor``."""

    def hook(z: Tensor, hook: Any) -> Tensor:
        z = z.clone()
        if factor is not None:
            z[:, :, head, :] = z[:, :, head, :] * factor
        else:
            z[:, :, head, :] = torch.as_tensor(value, dtype=z.dtype, device=z.device)
        return z

    return f"blocks.{layer}.attn.hook_z", hook


def zero_mlp_hook(model, layer: int) -> Hook:
    """A hook on ``blocks.{layer}.hook_mlp_out`` that returns zeros (the MLP is skipped)."""
    return f"blocks.{layer}.hook_mlp_out", lambda out, hook: torch.zeros_like(out)


@contextlib.contextmanager
def _frozen(model) -> Iterator[None]:
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


# --------------------------------------------------------------------------------------------
# Gradient importance
# --------------------------------------------------------------------------------------------


def _gate_dots(model, prompt: Prompt) -> tuple[list[Tensor], int, int]:
    """One prompt: ``(dots, n_tokens, n_answer)`` with ``dots[layer]`` the ``[pos, head]`` values
    ``sum_d z * dL/dz`` = ``dL/dg`` for a gate ``g`` on each head at each token."""
    tokens, positions = prompt_tokens(model, prompt)
    stored: dict[int, Tensor] = {}
    one = torch.ones((), dtype=model.dtype, device=model.device, requires_grad=True)

    def store(z: Tensor, hook: Any) -> Tensor:
        out = z * one  # a non-leaf node of the graph: its .grad is the full dL/dz
        out.retain_grad()
        stored[int(hook.name.split(".")[1])] = out
        return out

    hooks = [(f"blocks.{layer}.attn.hook_z", store) for layer in range(model.n_layers)]
    with _frozen(model), torch.enable_grad():
        logits = _logits(model, tokens, hooks)
        loss = _loss_from_logits(logits, tokens, positions)
        loss.backward()
    dots = []
    for layer in range(model.n_layers):
        z = stored[layer][0].detach().double()  # [pos, head, d_head]
        grad = stored[layer].grad[0].double()
        dots.append((z * grad).sum(-1))  # [pos, head]
    return dots, len(tokens), len(positions)


def bansal_reference(model, prompts: Sequence[Prompt]) -> Tensor:
    """Bansal et al. (2023) head importance, computed literally, one prompt at a time.

    For each prompt: forward with every ``hook_z`` replaced by ``z * one`` (``one`` a scalar
    that requires grad, so the stored tensor is a non-leaf node of the graph; ``retain_grad``
    keeps its gradient), the mean answer cross-entropy as loss, ``backward``. Then per layer
    ``(z * z.grad).sum(-1)`` is ``dL/dg`` for a gate on every head at every token, and
    ``I[l, h] += sum_t |dL/dg[t, l, h]|``. The total is divided by ``sum_b (N_b - 1)`` (``N_b``
    real tokens) for every layer but the last, which is divided by the number of answer tokens.

    Returns:
        float64 ``[layer, head]``.
    """
    n_layers, n_heads = model.n_layers, model.n_heads
    importance = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    n_positions = 0
    n_answer = 0
    for prompt in prompts:
        dots, n_tokens, n_ans = _gate_dots(model, prompt)
        for layer in range(n_layers):
            for head in range(n_heads):
                for t in range(n_tokens):
                    importance[layer, head] += dots[layer][t, head].abs()
        n_positions += n_tokens - 1
        n_answer += n_ans
    denominators = [float(n_positions)] * (n_layers - 1) + [float(n_answer)]
    for layer in range(n_layers):
        importance[layer] /= denominators[layer]
    return importance


def michel_reference(model, prompts: Sequence[Prompt], eps: float = 1e-5) -> Tensor:
    """Michel et al. (2019) head importance by central finite differences, one prompt and one
    head at a time: ``mean_b |(L_b(1 + eps) - L_b(1 - eps)) / (2 eps)|`` with ``L_b(m)`` the
    answer loss of prompt ``b`` when head ``(l, h)``'s output is multiplied by ``m``.

    Use a float64 model (``tiny_model(...).to(torch.float64)``): the truncation error is
    O(eps^2) and the rounding error ~1e-16 / eps, so the derivative is exact to ~1e-9.

    Returns:
        float64 ``[layer, head]``.
    """
    importance = torch.zeros(model.n_layers, model.n_heads, dtype=torch.float64)
    for prompt in prompts:
        for layer in range(model.n_layers):
            for head in range(model.n_heads):
                up = ref_answer_loss(model, prompt, [head_hook(model, layer, head,
                                                               factor=1 + eps)])
                down = ref_answer_loss(model, prompt, [head_hook(model, layer, head,
                                                                 factor=1 - eps)])
                importance[layer, head] += abs((up - down) / (2 * eps))
    return importance / len(prompts)


def michel_gradient_reference(model, prompts: Sequence[Prompt]) -> Tensor:
    """Michel et al. (2019) from the literal per-prompt gradients (as ``bansal_reference``):
    ``mean_b |sum_t (z * dL_b/dz).sum(-1)|``, for models where finite differences are too slow.

    Returns:
        float64 ``[layer, head]``.
    """
    importance = torch.zeros(model.n_layers, model.n_heads, dtype=torch.float64)
    for prompt in prompts:
        dots, _, _ = _gate_dots(model, prompt)
        for layer in range(model.n_layers):
            for head in range(model.n_heads):
                importance[layer, head] += dots[layer][:, head].sum().abs()
    return importance / len(prompts)


# --------------------------------------------------------------------------------------------
# Knock-out importance
# --------------------------------------------------------------------------------------------


def mean_activations_reference(model, sequences: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
    """Mean of every head's ``hook_z`` and every ``hook_mlp_out`` over positions 1.. (BOS left
    out) of each sequence, one sequence at a time.

    Returns:
        ``(z [layer, head, d_head], mlp_out [layer, d_model] or None for attention-only
        models)``, float64.
    """
    z_names = [f"blocks.{layer}.attn.hook_z" for layer in range(model.n_layers)]
    mlp_names = [f"blocks.{layer}.hook_mlp_out" for layer in range(model.n_layers)]
    has_mlp = all(name in model.hook_dict for name in mlp_names)
    wanted = set(z_names) | (set(mlp_names) if has_mlp else set())
    z_sum = torch.zeros(model.n_layers, model.n_heads, model.d_head, dtype=torch.float64)
    mlp_sum = torch.zeros(model.n_layers, model.d_model, dtype=torch.float64)
    count = 0
    for tokens in sequences:
        with torch.no_grad():
            _, cache = model.run_with_cache(torch.as_tensor(tokens)[None].to(model.device),
                                            names_filter=lambda name: name in wanted)
        for t in range(1, len(tokens)):
            for layer in range(model.n_layers):
                z_sum[layer] += cache[z_names[layer]][0, t].double().cpu()
                if has_mlp:
                    mlp_sum[layer] += cache[mlp_names[layer]][0, t].double().cpu()
            count += 1
    return z_sum / count, (mlp_sum / count if has_mlp else None)


def ablation_reference(model, prompts: Sequence[Prompt], *, metric: str = "loss",
                       means_z: Tensor | None = None, chars: bool = False) -> Tensor:
    """Effect of removing each head on its own, one prompt at a time.

    The head's ``hook_z`` is set to 0 (or to ``means_z[layer, head]``, mean ablation) by a
    hand-written hook. ``metric="loss"``: mean over prompts of the answer-loss increase;
    ``"accuracy"``: mean over prompts of ``correct(unmasked) - correct(head removed)``.

    Returns:
        float64 ``[layer, head]``.
    """
    def value(prompt: Prompt, hooks: Sequence[Hook]) -> float:
        if metric == "loss":
            return ref_answer_loss(model, prompt, hooks)
        return float(ref_correct(model, prompt, hooks, chars))

    base = [value(p, []) for p in prompts]
    out = torch.zeros(model.n_layers, model.n_heads, dtype=torch.float64)
    for layer in range(model.n_layers):
        for head in range(model.n_heads):
            replacement = 0.0 if means_z is None else means_z[layer, head]
            hook = head_hook(model, layer, head, value=replacement)
            total = 0.0
            for i, prompt in enumerate(prompts):
                knocked = value(prompt, [hook])
                total += (knocked - base[i]) if metric == "loss" else (base[i] - knocked)
            out[layer, head] = total / len(prompts)
    return out


def partial_ablation_reference(model, prompts: Sequence[Prompt], fraction: float, *,
                               means_z: Tensor | None = None) -> Tensor:
    """Answer-loss change when each head's output is moved the ``fraction`` of the way to its
    ablated value (0, or ``means_z[layer, head]``): ``z -> z + fraction * (a - z)`` at every
    position, one head and one prompt at a time, averaged over prompts. ``fraction=1`` is
    :func:`ablation_reference` with ``metric="loss"``.

    Returns:
        float64 ``[layer, head]``.
    """
    base = [ref_answer_loss(model, p) for p in prompts]
    out = torch.zeros(model.n_layers, model.n_heads, dtype=torch.float64)
    for layer in range(model.n_layers):
        for head in range(model.n_heads):
            target = 0.0 if means_z is None else means_z[layer, head]

            def hook(z: Tensor, hook: Any, head: int = head, target: Any = target) -> Tensor:
                z = z.clone()
                a = torch.as_tensor(target, dtype=z.dtype, device=z.device)
                z[:, :, head, :] = z[:, :, head, :] + fraction * (a - z[:, :, head, :])
                return z

            total = 0.0
            for i, prompt in enumerate(prompts):
                total += ref_answer_loss(model, prompt, [(f"blocks.{layer}.attn.hook_z", hook)])
                total -= base[i]
            out[layer, head] = total / len(prompts)
    return out


def attribution_reference(model, prompts: Sequence[Prompt], *,
                          means_z: Tensor | None = None) -> Tensor:
    """Attribution patching towards zero (or mean, ``means_z``) ablation, computed literally,
    one prompt at a time: hooks keep every layer's ``hook_z`` output and its gradient (as
    :func:`bansal_reference`), the answer loss is back-propagated, and for every layer, head and
    position ``t`` the product ``(a - z[t, head]) . dL/dz[t, head]`` (``a`` = 0 or the head's
    mean) is added up by hand. Averaged over prompts.

    Returns:
        float64 ``[layer, head]``.
    """
    out = torch.zeros(model.n_layers, model.n_heads, dtype=torch.float64)
    for prompt in prompts:
        tokens, positions = prompt_tokens(model, prompt)
        stored: dict[int, Tensor] = {}
        one = torch.ones((), dtype=model.dtype, device=model.device, requires_grad=True)

        def store(z: Tensor, hook: Any, stored: dict[int, Tensor] = stored,
                  one: Tensor = one) -> Tensor:
            kept = z * one  # a non-leaf node: its .grad is the full dL/dz
            kept.retain_grad()
            stored[int(hook.name.split(".")[1])] = kept
            return kept

        hooks = [(f"blocks.{layer}.attn.hook_z", store) for layer in range(model.n_layers)]
        with _frozen(model), torch.enable_grad():
            loss = _loss_from_logits(_logits(model, tokens, hooks), tokens, positions)
            loss.backward()
        for layer in range(model.n_layers):
            z = stored[layer][0].detach().double()  # [pos, head, d_head]
            grad = stored[layer].grad[0].double()
            for head in range(model.n_heads):
                a = (torch.zeros(z.shape[-1], dtype=torch.float64) if means_z is None
                     else torch.as_tensor(means_z[layer, head], dtype=torch.float64))
                for t in range(len(tokens)):
                    out[layer, head] += float(((a - z[t, head]) * grad[t, head]).sum())
    return out / len(prompts)


def ffn_reference(model, prompts: Sequence[Prompt], *, metric: str = "accuracy",
                  chars: bool = False) -> Tensor:
    """Effect of skipping each layer's MLP (``hook_mlp_out`` -> 0), one prompt at a time:
    accuracy drop or answer-loss increase, averaged over prompts.

    Returns:
        float64 ``[layer]``.
    """
    out = torch.zeros(model.n_layers, dtype=torch.float64)
    for layer in range(model.n_layers):
        hook = zero_mlp_hook(model, layer)
        total = 0.0
        for prompt in prompts:
            if metric == "loss":
                total += ref_answer_loss(model, prompt, [hook]) - ref_answer_loss(model, prompt)
            else:
                total += (float(ref_correct(model, prompt, chars=chars))
                          - float(ref_correct(model, prompt, [hook], chars)))
        out[layer] = total / len(prompts)
    return out


# --------------------------------------------------------------------------------------------
# Synthetic copy tasks over the toy words
# --------------------------------------------------------------------------------------------


def copy_examples(n: int, *, seed: int = 0, n_choices: int = 3,
                  answer_lengths: Sequence[int] = (1, 2), n_words: int = 96) -> list[Example]:
    """Copy examples: ``x_1..x_m a_1..a_k y_1..y_r x_s..x_m`` -> answer ``a_1..a_k`` (what
    followed the earlier occurrence of the last tokens), over distinct toy words.

    Lengths ``m``, ``r`` and the answer length ``k`` (cycling through ``answer_lengths``) vary,
    so prompts have different lengths; distractor choices have the same number of words; the
    gold index is random (so a model with uniform logits is not accidentally right). Example 1
    (if ``n > 1``) has choices of mixed lengths.
    """
    rng = np.random.default_rng([seed, 12345])
    examples = []
    for i in range(n):
        k = answer_lengths[i % len(answer_lengths)]
        m = int(rng.integers(3, 7))
        r = int(rng.integers(0, 3))
        s = int(rng.integers(1, m + 1))
        words = [f"w{int(w)}" for w in rng.permutation(n_words)[: m + r + k * n_choices]]
        x, answer = words[:m], words[m: m + k]
        y = words[m + k: m + k + r]
        spare = words[m + k + r:]
        sequence = x + answer + y + x[s - 1:]
        choices = [" ".join(answer)]
        for c in range(n_choices - 1):
            # one distractor reuses a context word (it appeared, but not after x_m)
            first = y[0] if (c == 0 and y) else spare[c * k]
            length = (k % 2) + 1 if (i == 1 and c == 0) else k
            choices.append(" ".join([first, *spare[c * k + 1: c * k + length]])
                           if length > 1 else first)
        gold = int(rng.integers(n_choices))
        choices[0], choices[gold] = choices[gold], choices[0]
        examples.append(Example(id=f"copy{i}", input=" ".join(sequence), choices=tuple(choices),
                                gold=gold))
    return examples


def copy_prompts(n: int, **kwargs: Any) -> list[Prompt]:
    """Zero-shot prompts of :func:`copy_examples` (what ``build_prompts(shots=0)`` gives for
    ``template="{input}"`` and ``answer_prefix=" "``), in example order."""
    return [Prompt(id=e.id, text=e.input, continuations=tuple(" " + c for c in e.choices),
                   gold=e.gold) for e in copy_examples(n, **kwargs)]


def copy_task(n: int = 24, **kwargs: Any) -> Task:
    """A :class:`~mechicl.inputs.tasks.Task` of :func:`copy_examples` with template ``"{input}"``."""
    return Task(name="copy", examples=tuple(copy_examples(n, **kwargs)), template="{input}",
                separator=" ")
