"""Which kernel runs the model's linear layers on a CPU: PyTorch's ``F.linear`` or oneDNN's on
weights packed once.

``F.linear`` hands float32 products to the BLAS PyTorch was built with (MKL), which on AMD
processors ran at less than half the rate of oneDNN's kernel on a Zen 5 machine (as if on its
AVX2 path; MKL is known to pick its paths by vendor); oneDNN, the library ``torch.compile``'s
freezing pass and Intel's extension for PyTorch use for the same products, runs them on a copy
of the weight reordered once into its kernel's blocked layout
(``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``). How much that gains
depends on the processor, so ``"auto"`` measures it, once per process
(docs/benchmarks.md, "Packed linear weights": 2.3x on the products of a Zen 5 machine, 1.1x on
a Zen 4 one, where ``"auto"`` keeps ``F.linear``).

What packing costs, and how it is bounded:

* a packed copy of every linear weight of the blocks (as much memory again as they take; the
  unembedding and embeddings are not packed): ``"auto"`` packs only when the copies take at most
  :data:`AUTO_MAX_MEMORY_SHARE` of the memory available;
* oneDNN keeps state per width of product it has run (about 3 MiB per width on SmolLM2-135M,
  measured; not released), so every product's rows (the pass's tokens) are padded up to a
  multiple of :data:`BUCKET_ROWS` and the padding's outputs dropped: a few widths, not one per
  pass length.

The packed forward gives the same products up to float32 summation order (log-likelihoods
within about 1e-4 of ``F.linear``'s on the built-in tasks). Gradients to the inputs flow through
it (``grad @ W`` by ``torch.mm``); a layer whose weight or bias needs a gradient, an input off
the CPU or not float32, and a weight changed since it was packed (its version counter, or
:meth:`~mechicl.model.hooked.HookedModel.weights_changed`) fall back to ``F.linear`` or pack
again, so results never come from stale weights.
"""

import copy
import functools
import logging
import os
import statistics
import time
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

logger = logging.getLogger(__name__)

LINEAR_KERNELS: tuple[str, ...] = ("auto", "packed", "plain")
"""``load_model(..., linear_kernel=)``: ``"auto"`` (packed where it measures at least
:data:`AUTO_MIN_SPEEDUP` times faster and its copies fit), ``"packed"``, ``"plain"``. The
arguments taking them are typed ``str``, so that a runtime type checker does not pre-empt the
``ValueError`` listing them."""

BUCKET_ROWS = 64
"""Packed products pad their rows (tokens) up to a multiple of this: oneDNN's per-width state
then grows with ``max tokens / 64`` widths, not with every pass length (docs/benchmarks.md)."""

AUTO_MIN_SPEEDUP = 1.3
"""``"auto"`` packs when the packed kernel runs a reference product at least this many times as
fast as ``F.linear`` (:func:`cpu_packed_speedup`, measured once per process)."""

AUTO_MAX_MEMORY_SHARE = 0.25
"""``"auto"`` packs only when the packed copies take at most this share of the memory
available (``MemAvailable``)."""


def packed_kernel_available(weight: Tensor) -> bool:
    """Whether this PyTorch build has oneDNN's packed linear kernel for ``weight`` (a float32
    CPU tensor).

    >>> packed_kernel_available(torch.zeros(2, 2, dtype=torch.float16))
    False
    """
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and _in_build()


@functools.cache
def _in_build() -> bool:
    """Whether this PyTorch build has oneDNN and its packed linear kernel (once per process)."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


def pack_weight(weight: Float[Tensor, "d_out d_in"]) -> Tensor:
    """``weight`` reordered once into oneDNN's blocked layout (an opaque tensor for
    :func:`packed_linear`), as ``torch.compile``'s freezing pass packs it."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 512)


def packed_linear(x: Float[Tensor, "*batch d_in"], packed: Tensor,
                  bias: Float[Tensor, " d_out"] | None = None, *,
                  bucket: int = BUCKET_ROWS) -> Float[Tensor, "*batch d_out"]:
    """``x @ W.T + bias`` by oneDNN's kernel on ``packed`` (:func:`pack_weight` of ``W``), the
    rows of ``x`` padded up to a multiple of ``bucket`` (the padding's outputs dropped).

    >>> w, x = torch.randn(3, 4), torch.randn(2, 5, 4)
    >>> torch.allclose(packed_linear(x, pack_weight(w)), x @ w.T, atol=1e-5)
    True
    """
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    pad = -n % bucket
    if pad:
        rows = F.pad(rows, (0, 0, 0, pad))
    out = torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")
    if pad:
        out = out[:n]
    return out.reshape(*x.shape[:-1], out.shape[-1])


class _PackedLinearFunction(torch.autograd.Function):
    """The packed forward with a backward to the input only (``grad @ W``): weights frozen."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, packed: Tensor, bias: Tensor | None,
                bucket: int) -> Tensor:
        ctx.save_for_backward(weight)
        return packed_linear(x, packed, bias, bucket=bucket)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        (weight,) = ctx.saved_tensors
        return grad @ weight, None, None, None, None


class PackedForward:
    """The ``forward`` of one ``nn.Linear`` on a packed copy of its weight, packed again when
    the weight changes (its storage or version counter, or :meth:`invalidate`); ``F.linear``
    where packing does not apply (see the module docstring)."""

    def __init__(self, module: torch.nn.Linear, *, bucket: int = BUCKET_ROWS) -> None:
        self.module = module
        self.bucket = bucket
        self.packed: Tensor | None = None
        self.key: tuple[int, int] | None = None

    def pack(self) -> None:
        """Pack the weight now (where packing applies), not at the first call: the copies are
        then part of the loaded model, as memory estimates count them."""
        weight = self.module.weight
        if packed_kernel_available(weight):
            self.packed, self.key = pack_weight(weight), (weight.data_ptr(), weight._version)

    def invalidate(self) -> None:
        """Drop the packed copy: the next call packs the weight as it is then."""
        self.packed, self.key = None, None

    def __deepcopy__(self, memo: dict[int, Any]) -> "PackedForward":
        # a deep copy of the module (or of a model holding it) gets its own forward, on the
        # copied module, packed on first use: oneDNN's opaque tensors are not copied
        return PackedForward(copy.deepcopy(self.module, memo), bucket=self.bucket)

    def __call__(self, x: Tensor) -> Tensor:
        weight, bias = self.module.weight, self.module.bias
        grad = torch.is_grad_enabled()
        if (x.device.type != "cpu" or x.dtype != torch.float32
                or not packed_kernel_available(weight)
                or grad and (weight.requires_grad or (bias is not None and bias.requires_grad))):
            return F.linear(x, weight, bias)
        if self.packed is None or (weight.data_ptr(), weight._version) != self.key:
            self.pack()
        if grad and x.requires_grad:
            return _PackedLinearFunction.apply(x, weight.detach(), self.packed, bias,
                                               self.bucket)
        return packed_linear(x, self.packed, bias, bucket=self.bucket)


def packable_linears(hf_model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The ``nn.Linear`` layers of a Hugging Face model that packing applies to: all but the
    unembedding (any layer with the vocabulary as its outputs, or sharing a weight with the
    input or output embeddings, wrapped by the bridge or not)."""
    vocab = getattr(getattr(hf_model, "config", None), "vocab_size", None)
    shared = set()
    for getter in ("get_output_embeddings", "get_input_embeddings"):
        emb = getattr(hf_model, getter, lambda: None)()
        weight = getattr(emb, "weight", None)
        if isinstance(weight, Tensor):
            shared.add(weight.data_ptr())
    return [m for m in hf_model.modules()
            if isinstance(m, torch.nn.Linear) and m.out_features != vocab
            and m.weight.data_ptr() not in shared]


def packed_copies_bytes(hf_model: torch.nn.Module) -> int:
    """Bytes of the packed copies of ``hf_model``'s :func:`packable_linears` weights (as much
    again as those weights: oneDNN's blocked layout of a float32 weight is not smaller)."""
    return sum(m.weight.numel() * m.weight.element_size() for m in packable_linears(hf_model))


def packed_speedup(d_in: int, d_out: int, *, rows: int = 512, repeats: int = 5) -> float:
    """``F.linear``'s time over the packed kernel's for a ``[rows, d_in] x [d_in, d_out]``
    float32 product on this CPU, now (median of ``repeats`` timings of 5 calls each); NaN
    where the kernel is not available."""
    weight = torch.randn(d_out, d_in)
    if not packed_kernel_available(weight):
        return float("nan")
    x = torch.randn(rows, d_in)
    packed = pack_weight(weight)

    def seconds(fn: Callable[[], Tensor]) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(5):
                fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    with torch.no_grad():
        return seconds(lambda: F.linear(x, weight)) / seconds(lambda: packed_linear(x, packed))


@functools.cache
def cpu_packed_speedup() -> float:
    """:func:`packed_speedup` at a reference product (512 x 1024 by 1024 x 1024; under a second to
    measure), once per process: what ``"auto"`` decides by, a property of the CPU, so that
    every model loaded in a process gets the same kernel."""
    return packed_speedup(1024, 1024)


def available_memory() -> int | None:
    """The memory available to a new allocation now, in bytes (Linux ``MemAvailable``; else the
    free pages), or None where neither can be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def choose_linear_kernel(hf_model: torch.nn.Module,
                         kernel: str = "auto") -> tuple[str, dict[str, Any]]:
    """Which kernel to run ``hf_model``'s linear layers on, and why.

    Returns:
        ``("packed" | "plain", reason)``; ``reason`` holds what ``"auto"`` measured
        (``speedup``, ``copies_bytes``, ``available_bytes``) or why packing does not apply.

    Raises:
        ValueError: ``kernel`` is not one of :data:`LINEAR_KERNELS`, or ``"packed"`` was asked
            for where the kernel does not apply (not float32 on a CPU, or not in this build).
    """
    if kernel not in LINEAR_KERNELS:
        raise ValueError(f"linear_kernel={kernel!r} is not allowed; choose one of "
                         f"{list(LINEAR_KERNELS)}")
    if kernel == "plain":
        return "plain", {"asked": "plain"}
    linears = packable_linears(hf_model)
    if not linears:
        reason = "no nn.Linear layers to pack"
    elif not all(packed_kernel_available(m.weight) for m in linears):
        weight = linears[0].weight
        reason = (f"oneDNN's packed kernel needs float32 weights on a CPU and a build that has "
                  f"it (here {weight.dtype} on {weight.device.type}, oneDNN "
                  f"{'available' if torch.backends.mkldnn.is_available() else 'not available'})")
    else:
        reason = ""
    if reason:
        if kernel == "packed":
            raise ValueError(f"linear_kernel='packed' does not apply: {reason}; use 'auto' or "
                             "'plain'")
        return "plain", {"asked": kernel, "reason": reason}
    if kernel == "packed":
        return "packed", {"asked": "packed"}
    speedup = cpu_packed_speedup()
    copies = packed_copies_bytes(hf_model)
    available = available_memory()
    info = {"asked": "auto", "speedup": round(speedup, 3), "copies_bytes": copies,
            "available_bytes": available}
    fits = available is None or copies <= AUTO_MAX_MEMORY_SHARE * available
    return ("packed" if speedup >= AUTO_MIN_SPEEDUP and fits else "plain"), info


def set_linear_kernel(hf_model: torch.nn.Module, kernel: Literal["packed", "plain"], *,
                      bucket: int = BUCKET_ROWS) -> int:
    """Run ``hf_model``'s linear layers (:func:`packable_linears`) on ``kernel``; returns how many
    layers run packed. ``"plain"`` restores ``nn.Linear``'s own forward; ``bucket``: see
    :func:`packed_linear` (1: no padding, for benchmarks)."""
    if kernel not in ("packed", "plain"):
        raise ValueError(f"kernel={kernel!r} is not allowed; choose 'packed' or 'plain'")
    n = 0
    for m in packable_linears(hf_model):
        m.__dict__.pop("forward", None)  # the class's forward again
        if kernel == "packed":
            m.forward = forward = PackedForward(m, bucket=bucket)
            forward.pack()
            n += 1
    return n


def invalidate_packed(hf_model: torch.nn.Module) -> None:
    """Drop every packed copy of ``hf_model``'s weights (they are packed again on next use):
    for weights changed in place where their version counter does not see it (``.data``)."""
    for m in hf_model.modules():
        forward = m.__dict__.get("forward")
        if isinstance(forward, PackedForward):
            forward.invalidate()
