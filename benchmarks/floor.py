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

**The per-shape floor** (:class:`Rates`): the same FLOPs, each product at the rate this machine
reaches at its own shape: the check whether a model's smaller matrices (SmolLM2's key and value
projections have 192 outputs) multiply slower than its largest, which would put the single-rate
floor below what its own products can take (on this CPU the answer changed between processes:
docs/benchmarks.md; ``bench_matmul_rows.py`` times the shapes at fewer rows). Here
every distinct weight shape of the blocks is timed as ``F.linear`` of ``[tokens, in] x [out,
in]`` with ``tokens`` the largest pass the pipeline runs on a CPU (512), and the body's FLOPs
are divided by the FLOP-weighted harmonic mean of those rates (each matrix's share of the
FLOPs at its own rate); the unembedding is timed at its own shape; the attention's scores and
weighted sums keep the single rate. It is still a floor for passes of at most 512 tokens: no
pass runs a product at a better shape than the one its rate was measured at.
"""

import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch


def body_matrices(model) -> list[torch.Tensor]:
    """The blocks' weight matrices of a :class:`mechicl.HookedModel`: its 2-d parameters but
    the embeddings, position embeddings and unembedding (anything with a vocabulary or context
    axis)."""
    excluded = {model.d_vocab, model.cfg.n_ctx}
    return [p for p in model.bridge.original_model.parameters()
            if p.dim() == 2 and not excluded & set(p.shape)]


@dataclass(frozen=True)
class Flops:
    """FLOPs of some passes, by kind of product: the blocks' weight matrices, the attention's
    scores and weighted sums, the unembedding. Adds up and scales like a number; ``flops /
    rate`` divides the total (the single-rate floor), :meth:`Rates.seconds` each kind by its own
    rate."""

    body: float = 0.0
    attention: float = 0.0
    unembed: float = 0.0

    @property
    def total(self) -> float:
        return self.body + self.attention + self.unembed

    def __float__(self) -> float:
        return self.total

    def __add__(self, other: "Flops | float") -> "Flops":
        if not isinstance(other, Flops):
            if other == 0:  # sum() starts from 0
                return self
            return NotImplemented
        return Flops(self.body + other.body, self.attention + other.attention,
                     self.unembed + other.unembed)

    __radd__ = __add__

    def __mul__(self, k: float) -> "Flops":
        return Flops(k * self.body, k * self.attention, k * self.unembed)

    __rmul__ = __mul__

    def __truediv__(self, rate: float) -> float:
        return self.total / rate


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
        """From a :class:`mechicl.HookedModel` (its :func:`body_matrices`)."""
        body = sum(p.numel() for p in body_matrices(model))
        return cls(body_params=int(body), n_layers=model.n_layers, n_heads=model.n_heads,
                   d_head=model.d_head, d_model=model.d_model, d_vocab=model.d_vocab)

    def forward(self, lengths: Iterable[int], *, unembedded: int = 0, past: int = 0) -> Flops:
        """FLOPs of forward passes over sequences of ``lengths`` new tokens (each after
        ``past`` cached positions), with ``unembedded`` positions unembedded in total."""
        body = attention = 0.0
        for n in lengths:
            keys = past + (n + 1) / 2  # average key positions seen by a query (causal)
            body += n * 2 * self.body_params
            attention += n * 4 * self.n_layers * self.n_heads * self.d_head * keys
        return Flops(body, attention, 2 * self.d_model * self.d_vocab * unembedded)

    def forward_from(self, lengths: Iterable[int], first_layer: int, *, past: int = 0) -> Flops:
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
    return 2 * tokens * d_model * d_mlp / median_seconds(torch.mm, (a, b), repeats)


def packed_linear(weight: torch.Tensor):
    """``x -> x @ weight.T`` by oneDNN's packed linear kernel (:mod:`mechicl.model.kernels`),
    the weight packed once, no padding of the rows; None where the kernel does not apply."""
    from mechicl.model import kernels

    if not kernels.packed_kernel_available(weight):
        return None
    packed = kernels.pack_weight(weight)
    return lambda x: kernels.packed_linear(x, packed, bucket=1)


def cpu_name() -> str:
    """The CPU's model name and family / model numbers (``/proc/cpuinfo``), for the records:
    how fast each kernel runs depends on them (docs/benchmarks.md)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        return "unknown"
    return (f"{info.get('model name', 'unknown')} (family {info.get('cpu family', '?')}, "
            f"model {info.get('model', '?')})")


def packed_matmul_rate(model, *, tokens: int = 512, repeats: int = 7) -> float:
    """FLOP/s of oneDNN's packed linear kernel (:func:`packed_linear`) at :func:`matmul_rate`'s
    shape, measured now; NaN where the kernel is not available. Not the floor (issue 20 defines
    it by ``torch.mm``)."""
    d_model = model.d_model
    d_mlp = getattr(model.cfg, "d_mlp", None) or 4 * d_model
    fn = packed_linear(torch.randn(d_mlp, d_model, dtype=model.dtype, device=model.device))
    if fn is None:
        return float("nan")
    a = torch.randn(tokens, d_model, dtype=model.dtype, device=model.device)
    return 2 * tokens * d_model * d_mlp / median_seconds(fn, (a,), repeats)


def median_seconds(fn, args: tuple, repeats: int, inner: int = 10) -> float:
    """Median seconds of ``fn(*args)`` over ``repeats`` timings of ``inner`` calls each."""
    for _ in range(3):
        fn(*args)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn(*args)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


@dataclass(frozen=True)
class Rates:
    """This machine's matmul rates for one model, measured now (FLOP/s): ``single`` at the
    largest per-token shape (:func:`matmul_rate`), ``body`` the FLOP-weighted harmonic mean over
    the blocks' weight shapes, ``unembed`` at the unembedding's shape, each with ``tokens``
    rows; ``shapes`` the rate of every ``(in, out)`` weight shape."""

    single: float
    body: float
    unembed: float
    tokens: int
    shapes: dict[str, float]

    @classmethod
    def measure(cls, model, *, tokens: int = 512, repeats: int = 7) -> "Rates":
        dtype, device = model.dtype, model.device
        flops_by_shape: dict[tuple[int, int], float] = {}
        for p in body_matrices(model):
            out_f, in_f = p.shape
            flops_by_shape[(in_f, out_f)] = flops_by_shape.get((in_f, out_f), 0.0) + 2 * p.numel()
        rates = {}
        for in_f, out_f in flops_by_shape:
            x = torch.randn(tokens, in_f, dtype=dtype, device=device)
            w = torch.randn(out_f, in_f, dtype=dtype, device=device)
            seconds = median_seconds(torch.nn.functional.linear, (x, w), repeats)
            rates[(in_f, out_f)] = 2 * tokens * in_f * out_f / seconds
        per_token = sum(flops_by_shape.values())
        body = per_token / sum(f / rates[shape] for shape, f in flops_by_shape.items())
        x = torch.randn(tokens, model.d_model, dtype=dtype, device=device)
        w = torch.randn(model.d_vocab, model.d_model, dtype=dtype, device=device)
        unembed = (2 * tokens * model.d_model * model.d_vocab
                   / median_seconds(torch.nn.functional.linear, (x, w), repeats, inner=2))
        return cls(single=matmul_rate(model, tokens=tokens, repeats=repeats), body=body,
                   unembed=unembed, tokens=tokens,
                   shapes={f"{i}x{o}": r for (i, o), r in sorted(rates.items())})

    def seconds(self, flops: Flops) -> float:
        """The per-shape floor of ``flops``: each kind at its own rate."""
        return (flops.body / self.body + flops.attention / self.single
                + flops.unembed / self.unembed)

    def to_dict(self) -> dict:
        return {"single_gflops": self.single / 1e9, "body_gflops": self.body / 1e9,
                "unembed_gflops": self.unembed / 1e9, "tokens": self.tokens,
                "shapes_gflops": {k: v / 1e9 for k, v in self.shapes.items()}}


def alternated(work: dict, ways: tuple[str, str], rounds: int, run) -> tuple[dict, dict]:
    """Time every workload of ``work`` (name -> item) both ``ways``, alternating them within
    every round (the order reversed every other round) so that the machine's drift cancels in
    the round-by-round ratios; ``run(way, item)`` returns a tensor. Returns ``(times[name][way],
    largest |difference| of the finite results per name)``."""
    times = {name: {way: [] for way in ways} for name in work}
    diffs = dict.fromkeys(work, 0.0)
    for rnd in range(rounds):
        for name, item in work.items():
            outs = {}
            for way in ways if rnd % 2 == 0 else ways[::-1]:
                start = time.perf_counter()
                outs[way] = run(way, item)
                times[name][way].append(time.perf_counter() - start)
            first, second = (outs[w] for w in ways)
            finite = torch.isfinite(first)
            diffs[name] = max(diffs[name], float((first[finite] - second[finite]).abs().max()))
    return times, diffs


def ratio_table(times: dict, diffs: dict, ways: tuple[str, str],
                headers: tuple[str, str, str]) -> list[dict]:
    """Print the markdown table of :func:`alternated`'s times (median [min-max] of each way, the
    round-by-round ratio ``ways[1] / ways[0]``, the largest difference) under ``headers`` (the
    two ways and the ratio); returns its rows for the JSON."""
    print(f"| Workload | {headers[0]} | {headers[1]} | {headers[2]}, round by round "
          "| max \\|diff\\| |")
    print("| --- | --- | --- | --- | --- |")
    rows = []
    for name, t in times.items():
        ratios = [b / a for a, b in zip(t[ways[0]], t[ways[1]], strict=True)]
        rows.append({"workload": name, "times": t, "ratios": ratios,
                     "ratio_median": statistics.median(ratios), "max_abs_diff": diffs[name]})
        cells = [f"{statistics.median(x):.2f} s [{min(x):.2f}-{max(x):.2f}]" for x in t.values()]
        cells.append(f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]")
        print(f"| {name} | " + " | ".join(cells) + f" | {diffs[name]:.1e} |", flush=True)
    return rows


def probe_setup(argv: list[str] | None = None, parser=None):
    """What the plain-forward probes share (probe_compile.py, profile_forward.py,
    probe_fused_forward.py): their arguments (``--model``, ``--seeds``, ``--repeats``,
    ``--out``, added to ``parser`` if a probe has more of its own), two threads, the model, its
    body (blocks and final norm: no unembedding, no hooks attached; under the TransformerBridge
    the layers are the bridge's block and attention wrappers around Hugging Face's weights, which
    probe_fused_forward.py compares with a plain Hugging Face model), the prefix-matching scan's
    sequences (one ``[1, tokens]`` tensor each) and the matmul rate measured now. The model's
    linear layers run on ``F.linear`` (``linear_kernel="plain"``), as when these probes were
    first run; probe_packed_linears.py switches them itself.

    Returns ``(args, model, body, sequences, rate)``.
    """
    import argparse
    from pathlib import Path

    import mechicl
    from mechicl.analyses.induction import repeated_sequences

    parser = parser or argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    model = mechicl.load_model(args.model, linear_kernel="plain")
    body = model.bridge.original_model.model
    sequences = [s[None].to(model.device)
                 for s in repeated_sequences(model, n_seeds=args.seeds)]
    return args, model, body, sequences, matmul_rate(model)
