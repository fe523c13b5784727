"""Batching helpers shared by the forward-pass engines: length-sorted batches under a token
budget, and right padding (exact under causal attention: no real position attends to a pad)."""

from typing import Literal, get_args

import torch
from torch import Tensor

# Tokens per forward pass on a CPU. Measured on the 2-core machine with SmolLM2-135M
# (benchmarks/bench_scoring.py, docs/benchmarks.md): a pass costs ~85 ms even for one token (the
# weights are read once per pass), so short sequences are packed, but beyond ~512 tokens bigger
# passes only add padding (choice scoring, antonyms 1-shot: 3.1 s at 512, 3.5 s at 2048;
# country_capital 5-shot under 30 FFN masks: 11.8 s at 512, 17.1 s at 8192; a 12-sequence
# prefix-matching scan of 421-509 tokens: 13.9-15.5 s in 4096-token batches, 8.9-9.3 s one
# sequence per pass). On an accelerator batching pays and the caller's budget is used as is.
CPU_PASS_TOKENS = 512

# Tokens per forward pass on a CPU when the pass holds packed choice rows (shared-context choice
# scoring without masks: one row per prompt, its context then its choices). Measured on the
# 2-core machine with SmolLM2 (benchmarks/bench_pass_tokens.py, docs/benchmarks.md; 5 alternated
# rounds, round-by-round ratio 1024 / 512): 5-shot prompts of 63-286 tokens 0.89-0.95 (0.88-0.99
# in three scratch runs; a pass of 512 holds few such rows, and its products few rows), 0- and
# 1-shot prompts of 8-36 tokens 0.96-1.01 (0.97-1.06); 2048 was not consistently better.
CPU_CHOICES_PASS_TOKENS = 1024

# Tokens per forward pass on a CPU when the pass holds masked copies of one prompt (choice
# scoring under many masks): the copies have no padding between them, and fewer, larger passes
# recompute the layers below the masks less often. Measured on the 2-core machine with SmolLM2
# (benchmarks/bench_copies_pass.py, docs/benchmarks.md): 270 one-head masks x 2 country_capital
# 5-shot prompts took 58.5 s in passes of 512 tokens, 41.6 s at 1024, 38.2 s at 2048, 36.6 s
# at 4096; FFN knock-out (30 masks x 8 prompts) 8.5, 7.5, 7.1 and 7.1 s.
CPU_COPIES_PASS_TOKENS = 2048

PassKind = Literal["forward", "choices", "copies"]
"""What a forward pass holds, for :func:`device_batch_tokens`: sequences (scans, gradients,
patching), packed choice rows, or masked copies of choice rows."""
PASS_KINDS: tuple[str, ...] = get_args(PassKind)


def device_batch_tokens(device: torch.device, batch_tokens: int, *,
                        kind: PassKind = "forward") -> int:
    """``batch_tokens`` for a forward pass on ``device``: capped on a CPU at
    :data:`CPU_PASS_TOKENS`, at :data:`CPU_CHOICES_PASS_TOKENS` for a pass of packed choice
    rows (``kind="choices"``), or at :data:`CPU_COPIES_PASS_TOKENS` for a pass of masked copies
    (``kind="copies"``).

    >>> device_batch_tokens(torch.device("cpu"), 4096), device_batch_tokens(torch.device("cpu"), 100)
    (512, 100)
    >>> [device_batch_tokens(torch.device("cpu"), 4096, kind=k) for k in ("choices", "copies")]
    [1024, 2048]
    """
    caps = {"forward": CPU_PASS_TOKENS, "choices": CPU_CHOICES_PASS_TOKENS,
            "copies": CPU_COPIES_PASS_TOKENS}
    if kind not in caps:
        raise ValueError(f"kind={kind!r}: expected one of {', '.join(PASS_KINDS)}")
    if device.type != "cpu":
        return batch_tokens
    return min(batch_tokens, caps[kind])


def length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Group sequence indices, sorted by length, so that rows x longest <= ``batch_tokens``
    (a sequence longer than the budget gets a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and (len(current) + 1) * lengths[i] > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pad_right(seqs: list[Tensor] | list[list[int]], pad: int = 0) -> tuple[Tensor, Tensor]:
    """Stack 1-d token sequences of different lengths: ``([n, max_len] tokens, [n] lengths)``."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    out = torch.full((len(seqs), int(lengths.max()) if len(seqs) else 0), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out, lengths
