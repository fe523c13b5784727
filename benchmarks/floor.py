"""The FLOP floor: what an analysis's passes must compute, and how fast this machine multiplies.

Every benchmark divides its time by a floor measured in the same process:

    floor seconds = FLOPs the analysis cannot avoid / the machine's dense-matmul rate

FLOPs of a forward pass over ``n`` tokens of one sequence (``s`` key positions on average), as
multiply-adds x 2:

* the body: ``2 * P_body`` per token, ``P_body`` the parameters of the blocks' matrices
  (attention projections, MLP; read from the model's 2-d weights, so GQA, gated MLPs and biases
  are whatever the model has), plus the attention itself, ``2 * 2 * n_heads * d_head * s`` per
  token and layer (scores and the weighted sum of values);
* the unembedding: ``2 * d_model * d_vocab`` per position whose logits are used (not per token:
  an analysis that needs only the answer positions' logits has only those in its floor).

A backward pass to activations (gradient importance: the parameters are frozen, so no weight
gradients) costs about as much again as the forward through the same matrices; its floor is
``2 x`` the forward's. Embedding lookups, norms, softmax and elementwise work are not counted:
the floor is a lower bound, and a ratio of 1.0 is not reachable.

The rate is ``torch.mm`` of a ``[tokens, d_model] x [d_model, d_mlp]`` product (the model's
largest per-token matrix) in the model's dtype, the median of repeated runs after a warm-up,
measured in the calling process with its thread count.
"""

import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CostModel:
    """Per-token FLOPs of one model."""

    body_params: int  # parameters of the blocks' weight matrices
    n_layers: int
    n_heads: int
    d_head: int
    d_model: int
    d_vocab: int

    @classmethod
    def of(cls, model) -> "CostModel":
        """From a :class:`mechicl.HookedModel`: the blocks' 2-d weights (embeddings, position
        embeddings and the unembedding excluded: anything with a vocabulary or context axis)."""
        excluded = {model.d_vocab, model.cfg.n_ctx}
        body = sum(p.numel() for name, p in model.bridge.original_model.named_parameters()
                   if p.dim() == 2 and not excluded & set(p.shape))
        return cls(body_params=int(body), n_layers=model.n_layers, n_heads=model.n_heads,
                   d_head=model.d_head, d_model=model.d_model, d_vocab=model.d_vocab)

    def forward(self, lengths: Iterable[int], *, unembedded: int = 0, past: int = 0) -> float:
        """FLOPs of forward passes over sequences of ``lengths`` new tokens (each after
        ``past`` cached positions), with ``unembedded`` positions unembedded in total."""
        flops = 0.0
        for n in lengths:
            keys = past + (n + 1) / 2  # average key positions seen by a query (causal)
            flops += n * (2 * self.body_params
                          + 4 * self.n_layers * self.n_heads * self.d_head * keys)
        return flops + 2 * self.d_model * self.d_vocab * unembedded

    def forward_from(self, lengths: Iterable[int], first_layer: int, *, past: int = 0) -> float:
        """The body FLOPs of the layers ``first_layer..`` only (a masked copy that joins at
        its first masked layer)."""
        share = (self.n_layers - first_layer) / self.n_layers
        return share * self.forward(lengths, past=past)


def matmul_rate(model, *, tokens: int = 512, repeats: int = 7) -> float:
    """FLOP/s of ``torch.mm`` at the model's largest per-token shape and dtype, measured now."""
    d_model = model.d_model
    d_mlp = getattr(model.cfg, "d_mlp", None) or 4 * d_model
    a = torch.randn(tokens, d_model, dtype=model.dtype, device=model.device)
    b = torch.randn(d_model, d_mlp, dtype=model.dtype, device=model.device)
    for _ in range(3):
        torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(10):
            torch.mm(a, b)
        times.append((time.perf_counter() - t0) / 10)
    return 2 * tokens * d_model * d_mlp / statistics.median(times)


def probe_setup(argv: list[str] | None = None):
    """What the plain-forward probes share (probe_compile.py, profile_forward.py): their
    arguments (``--model``, ``--seeds``, ``--repeats``, ``--out``), two threads, the model, its
    plain Hugging Face body (blocks and final norm: no unembedding, no hooks), the prefix-matching
    scan's sequences (one ``[1, tokens]`` tensor each) and the matmul rate measured now.

    Returns ``(args, model, body, sequences, rate)``.
    """
    import argparse
    from pathlib import Path

    import mechicl
    from mechicl.analyses.induction import repeated_sequences

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    model = mechicl.load_model(args.model)
    body = model.bridge.original_model.model
    sequences = [s[None].to(model.device)
                 for s in repeated_sequences(model, n_seeds=args.seeds)]
    return args, model, body, sequences, matmul_rate(model)
