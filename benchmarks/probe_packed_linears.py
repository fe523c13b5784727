"""Probe: the model's linear layers on weights packed once for oneDNN's kernel
(:func:`floor.packed_linear`) against the plain ``F.linear`` products. Not a library feature
(docs/benchmarks.md, "Packed linear weights": the speed, and why mechicl does not do it). Not a
test; run by hand on an otherwise idle machine::

    .venv/bin/python benchmarks/probe_packed_linears.py --rounds 4 \\
        --out benchmarks/results/probe-packed-linears.json
    .venv/bin/python benchmarks/probe_packed_linears.py --rounds 4 --bucket 64 \\
        --out benchmarks/results/probe-packed-linears-bucket64.json
    .venv/bin/python benchmarks/probe_packed_linears.py --memory plain \\
        --out benchmarks/results/probe-packed-linears-memory-plain.json
    .venv/bin/python benchmarks/probe_packed_linears.py --memory packed \\
        --out benchmarks/results/probe-packed-linears-memory-packed.json
    .venv/bin/python benchmarks/probe_packed_linears.py --memory packed --bucket 64 \\
        --out benchmarks/results/probe-packed-linears-memory-packed-bucket64.json

Speed, in one process, alternating the two within every round (the order reversed every other
round) so that the machine's drift cancels in the round-by-round ratios: first the products
alone at each of the blocks' weight shapes (512 tokens) and at the floor's shape; then whole
workloads with the blocks' linear layers packed (every ``nn.Linear`` but the unembedding given
a forward on its packed copy) and unpacked. Prints the median [min-max] times, the
round-by-round ratio packed / plain and the largest difference of the results.

``--memory plain|packed``: the resident memory (``/proc/self/statm``, one thread) after loading
and packing, and after forward passes of one sequence at each of 130 lengths (10-397 tokens),
the way analyses send passes of many widths. ``--bucket B`` (speed or memory) pads every packed product's rows
(the pass's tokens) up to a multiple of B and drops the padding's outputs, so that the kernel
sees a few widths only.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from floor import (
    alternated,
    matmul_rate,
    median_seconds,
    packed_linear,
    packed_matmul_rate,
    probe_setup,
    ratio_table,
)

from mechicl.analyses.evaluation import masked_choice_logprobs
from mechicl.analyses.induction import prefix_matching_scores
from mechicl.inputs.tasks import build_prompts, load_task
from mechicl.model.kernels import set_linear_kernel
from mechicl.model.masks import Mask

CHOICES = [("country_capital", 5, 30), ("antonyms", 0, 40), ("sentiment", 5, 30)]


def pack(model, on: bool, bucket: int = 0) -> None:
    """Run the blocks' linear layers (not the unembedding) on packed weights, or not; with
    ``bucket``, on rows padded to a multiple of it (the library pads to
    :data:`mechicl.model.kernels.BUCKET_ROWS`; 0 here: no padding)."""
    set_linear_kernel(model.bridge.original_model, "packed" if on else "plain",
                      bucket=bucket or 1)


def memory(which: str, out, bucket: int = 0) -> None:
    """Resident memory after loading (and packing) and after passes of 130 lengths."""
    import mechicl

    def rss() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    torch.set_num_threads(1)
    model = mechicl.load_model("smollm2-135m", linear_kernel="plain")
    with torch.no_grad():
        for p in model.bridge.original_model.parameters():
            p.sum()  # page the weights in: their pages are not resident until read
    record = {"which": which, "bucket": bucket, "loaded_mib": rss()}
    pack(model, which == "packed", bucket)
    record["packed_mib"] = rss()
    lengths = list(range(10, 400, 3))
    record["lengths"] = lengths
    record["after_mib"] = []
    with torch.no_grad():
        for n in lengths:
            model(torch.randint(5, 1000, (1, n)), return_type="logits")
            record["after_mib"].append(rss())
    print(f"{which}{f' (bucket {bucket})' if bucket else ''}: {record['loaded_mib']:.0f} MiB loaded, {record['packed_mib']:.0f} after "
          f"packing, {record['after_mib'][0]:.0f} after the first pass, "
          f"{record['after_mib'][-1]:.0f} after {len(lengths)} lengths")
    if out is not None:
        out.write_text(json.dumps(record, indent=1) + "\n")


def product_rates(model, tokens: int = 512, repeats: int = 7) -> dict[str, dict[str, float]]:
    """GFLOP/s of ``F.linear`` and of the packed kernel at each (in, out) shape of a block."""
    block = model.bridge.original_model.model.layers[0]
    shapes = sorted({(m.in_features, m.out_features) for m in block.modules()
                     if isinstance(m, torch.nn.Linear)})
    out = {}
    for k, n in shapes:
        x = torch.randn(tokens, k)
        layer = torch.nn.Linear(k, n, bias=False)
        flops = 2 * tokens * k * n
        with torch.no_grad():
            plain = flops / median_seconds(F.linear, (x, layer.weight), repeats) / 1e9
            packed = flops / median_seconds(packed_linear(layer.weight), (x,), repeats) / 1e9
        out[f"{k}x{n}"] = {"plain": plain, "packed": packed}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--memory", choices=("plain", "packed"), default=None)
    parser.add_argument("--bucket", type=int, default=0,
                        help="with --memory packed: pad products' rows to a multiple of this")
    if "--memory" in sys.argv:
        args = parser.parse_known_args()[0]
        if args.bucket < 0 or (args.bucket and args.memory != "packed"):
            raise SystemExit(f"--bucket {args.bucket}: must be >= 0, and only with --memory packed")
        parser.add_argument("--out", type=Path)
        memory(args.memory, parser.parse_known_args()[0].out, args.bucket)
        return
    args, model, body, seqs, rate = probe_setup(parser=parser)
    if args.rounds < 1 or args.bucket < 0:
        raise SystemExit(f"--rounds {args.rounds}, --bucket {args.bucket}: must be >= 1 and >= 0")
    if packed_linear(torch.zeros(1, 1, dtype=model.dtype)) is None:
        raise SystemExit("no oneDNN packed linear kernel here (or the model is not float32)")
    products = product_rates(model)
    floor_rates = {"torch.mm": matmul_rate(model) / 1e9, "packed": packed_matmul_rate(model) / 1e9}

    def body_pass():
        with torch.no_grad():
            return torch.stack([body(s, use_cache=False).last_hidden_state[0, -1] for s in seqs])

    work = {f"plain body forward, {len(seqs)} sequences, one per pass": body_pass,
            f"prefix-matching scan, {len(seqs)} sequences":
                lambda: prefix_matching_scores(model, n_seeds=len(seqs), progress=False).mean}
    for task, shots, n in CHOICES:
        prompts = build_prompts(load_task(task), shots=shots, n=n, seed=0)
        work[f"choices {task} {shots}-shot x{n}"] = (
            lambda p=prompts: masked_choice_logprobs(model, p, None)[0])
    ffn = [Mask.remove(model, ffns=[layer]) for layer in range(model.n_layers)]
    knock = build_prompts(load_task("country_capital"), shots=1, n=8, seed=0)
    work[f"masked FFN knock-out ({len(ffn)} masks), country_capital 1-shot x8"] = (
        lambda: masked_choice_logprobs(model, knock, ffn)[0])
    heads = [Mask.remove(model, heads=[(layer, 0)]) for layer in range(0, model.n_layers, 3)]
    work[f"masked head pruning ({len(heads)} masks), country_capital 1-shot x8"] = (
        lambda: masked_choice_logprobs(model, knock, heads)[0])
    # no gradient importance: the packed kernel has no backward

    masked_choice_logprobs(model, knock[:2], None)  # warm-up

    def run(way: str, fn) -> torch.Tensor:
        pack(model, way == "packed", args.bucket)
        return fn()

    times, diffs = alternated(work, ("plain", "packed"), args.rounds, run)
    pack(model, False)
    print("products at 512 tokens (GFLOP/s, F.linear / packed): "
          + ", ".join(f"{k} {v['plain']:.0f} / {v['packed']:.0f}" for k, v in products.items())
          + f"; the floor's torch.mm {floor_rates['torch.mm']:.1f}, packed at its shape "
          f"{floor_rates['packed']:.1f} (probe_setup's measurement {rate / 1e9:.1f})")
    rows = ratio_table(times, diffs, ("plain", "packed"), ("F.linear", "packed",
                                                           "packed / F.linear"))
    if args.out is not None:
        args.out.write_text(json.dumps({
            "model": args.model, "rounds": args.rounds, "bucket": args.bucket,
            "threads": torch.get_num_threads(),
            "products_gflops": products, "floor_shape_gflops": floor_rates,
            "probe_setup_gflops": rate / 1e9, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
