"""Probe: where does the plain forward's time above the FLOP floor go? (issue 20: the <= 1.3x
floor targets of choice and masked scoring are below what the plain eager forward reaches on
this CPU.)

Over the prefix-matching scan's sequences, one sequence per pass, in one process:

* ``plain``: the model's body (blocks and final norm; no unembedding, no hooks attached: the
  bridge's wrappers around Hugging Face's weights, :func:`floor.probe_setup`), as
  probe_compile.py times it;
* ``matmuls only``: the same passes reduced to their matrix products: every ``nn.Linear`` of
  the body applied (``F.linear`` with the real weights) to a ``[tokens, in_features]`` input,
  plus causal ``scaled_dot_product_attention`` at each layer's query / key-value head shapes.
  No norms, rotary, activations, residual adds or copies: what a perfectly fused
  implementation of everything else would still pay in eager matmul calls;
* ``profile``: ``torch.profiler`` self CPU time of the plain forward by operator, grouped into
  matrix products and the rest (the profiler's overhead inflates small operators, so only the
  shares are reported).

Each time is divided by the floor of benchmarks/floor.py measured in the same process. Not a
test; medians of ``--repeats`` runs::

    .venv/bin/python benchmarks/profile_forward.py --out benchmarks/results/profile-forward.json
"""

import json
import statistics
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from floor import CostModel, probe_setup

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear",
              "aten::_scaled_dot_product", "aten::scaled_dot_product")


def _kind(name: str) -> str:
    if name.startswith(MATMUL_OPS):
        return "matrix products"
    for key, kind in (("norm", "norms"), ("pow", "norms"), ("rsqrt", "norms"),
                      ("silu", "activations"), ("gelu", "activations"), ("tanh", "activations"),
                      ("softmax", "softmax"), ("mul", "elementwise"), ("add", "elementwise"),
                      ("neg", "elementwise"), ("cat", "copies"), ("copy", "copies"),
                      ("contiguous", "copies"), ("clone", "copies"), ("embedding", "embedding")):
        if key in name:
            return kind
    return "other"


def main() -> None:
    args, model, body, seqs, rate = probe_setup()
    lengths = [s.shape[1] for s in seqs]
    floor = CostModel.of(model).forward(lengths) / rate
    linears = [m for m in body.modules() if isinstance(m, torch.nn.Linear)]
    n_kv = model.n_kv_heads

    def plain() -> None:
        for s in seqs:
            body(s, use_cache=False)

    # random inputs made beforehand (uninitialised memory may hold denormals, which are slow)
    widths = sorted({lin.in_features for lin in linears})
    inputs = {n: ({w: torch.randn(n, w, dtype=model.dtype) for w in widths},
                  torch.randn(1, model.n_heads, n, model.d_head, dtype=model.dtype),
                  torch.randn(1, n_kv, n, model.d_head, dtype=model.dtype))
              for n in set(lengths)}

    def matmuls_only() -> None:
        for n in lengths:
            x, q, kv = inputs[n]
            for lin in linears:
                F.linear(x[lin.in_features], lin.weight, lin.bias)
            for _ in range(model.n_layers):
                F.scaled_dot_product_attention(q, kv, kv, is_causal=True,
                                               enable_gqa=n_kv != model.n_heads)

    def timed(f) -> list[float]:
        with torch.no_grad():
            f()  # warm-up
            out = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                f()
                out.append(time.perf_counter() - start)
        return out

    plain_s, matmul_s = timed(plain), timed(matmuls_only)
    with torch.no_grad(), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        plain()
    by_kind: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        by_kind[_kind(event.key)] += event.self_cpu_time_total
    total = sum(by_kind.values())
    result = {
        "model": args.model, "tokens": sum(lengths), "sequences": len(lengths),
        "matmul_gflops": rate / 1e9, "floor_s": floor,
        "plain_s": plain_s, "matmuls_only_s": matmul_s,
        "plain_over_floor": statistics.median(plain_s) / floor,
        "matmuls_only_over_floor": statistics.median(matmul_s) / floor,
        "matmuls_share_of_plain": statistics.median(matmul_s) / statistics.median(plain_s),
        "profile_self_cpu_share": {k: v / total for k, v in
                                   sorted(by_kind.items(), key=lambda kv: -kv[1])}}
    print(json.dumps(result, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
