"""Benchmark choice scoring, masked scoring and induction scans against the FLOP floor (issue 20).

Not a test: run by hand on an otherwise idle machine.

    .venv/bin/python benchmarks/bench_scoring.py --out benchmarks/results/scoring.json

In one process, after measuring the machine's matmul rate (benchmarks/floor.py):
1. multiple-choice scoring of built-in tasks: per-choice rows (the previous scoring, kept as
   ``scoring="rows"``) vs shared-context scoring, each against the floor of the shared passes;
2. masked scoring: FFN knock-out masks (one per layer) and head-pruning masks (every layer) over
   the same prompts, against the floor of the layers the masks recompute;
3. the prefix-matching and copying scans against a plain forward of the model body (no
   unembedding) over the same unpadded sequences, one per pass, and against their floor.

Each timed run of a shared-context scoring (1, 2) is followed by a run of that plain body
forward over the scans' sequences: ``vs_plain`` is the scoring's time per floor FLOP over the
plain forward's, run by run (median [min-max]), so that the machine's drift in speed between
and within processes cancels. Prints a markdown table for docs/benchmarks.md.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from floor import CostModel, Flops, Rates, cpu_name, matmul_rate, packed_matmul_rate  # noqa: E402

import mechicl  # noqa: E402
from mechicl.analyses.evaluation import encode_prompt, masked_choice_logprobs  # noqa: E402
from mechicl.analyses.induction import (  # noqa: E402
    _run_copying,
    _run_repeated,
    bansal_length,
    copying_sequences,
    repeated_sequences,
)
from mechicl.inputs.tasks import build_prompts, load_task  # noqa: E402
from mechicl.model.masks import Mask  # noqa: E402


def timed_runs(fn, repeats: int) -> tuple[tuple[float, float, float], object]:
    """``((median, min, max) seconds over ``repeats`` runs, the last output)``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return (statistics.median(times), min(times), max(times)), out


def scoring_floor(cost: CostModel, model, prompts, masks) -> Flops:
    """FLOPs of shared-context scoring: each prompt's context once per mask from its first
    layer (and once unmasked), the last position unembedded; each choice's tokens but the last
    after the context, unembedded where scored."""
    firsts = [cost.n_layers] + [m.first_layer for m in masks if m is not None and not m.is_identity]
    flops = Flops()
    for p in prompts:
        context, conts = encode_prompt(model, p)
        rest = [len(ids) - 1 for ids in conts if len(ids) > 1]
        for first in firsts:
            start = 0 if first == cost.n_layers else first  # the unmasked row runs every layer
            flops += cost.forward_from([len(context)], start)
            flops += cost.forward_from(rest, start, past=len(context))
            flops += cost.forward([], unembedded=1 + sum(rest))
    return flops


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seeds", type=int, default=12, help="scan sequences")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement")
    parser.add_argument("--linear-kernel", default="auto", choices=("auto", "packed", "plain"),
                        help="load_model's linear_kernel (default auto, as the library)")
    args = parser.parse_args()

    def timed(fn) -> tuple[tuple[float, float, float], object]:
        return timed_runs(fn, args.repeats)

    model = mechicl.load_model(args.model, linear_kernel=args.linear_kernel)
    cost = CostModel.of(model)
    rates = Rates.measure(model)
    # the faster of two measurements of the single rate: one run of 2026-12-06 measured it far
    # below its own per-shape rates (docs/benchmarks.md)
    again = matmul_rate(model)
    rate = max(rates.single, again)
    packed_rate = packed_matmul_rate(model)  # not the floor: issue 20 defines it by torch.mm
    result: dict = {"model": args.model, "threads": torch.get_num_threads(),
                    "cpus": os.cpu_count(), "cpu": cpu_name(),
                    "linear_kernel": model.linear_kernel,
                    "linear_kernel_info": model.linear_kernel_info,
                    "packed_matmul_gflops": packed_rate / 1e9, "matmul_gflops": rate / 1e9,
                    "matmul_gflops_measured": [rates.single / 1e9, again / 1e9],
                    "rates": rates.to_dict(),
                    "body_params": cost.body_params, "rows": []}
    rows = result["rows"]

    def add(name: str, t: tuple[float, float, float], floor_flops: Flops,
            base: tuple[float, float, float] | None = None, baseline_name: str = "",
            vs_plain: list[float] | None = None) -> None:
        floor_s, shape_s = floor_flops / rate, rates.seconds(floor_flops)
        row = {"benchmark": name, "seconds": t[0], "seconds_range": [t[1], t[2]],
               "floor_seconds": floor_s, "time_over_floor": t[0] / floor_s,
               "time_over_floor_range": [t[1] / floor_s, t[2] / floor_s],
               "shape_floor_seconds": shape_s, "time_over_shape_floor": t[0] / shape_s,
               "time_over_shape_floor_range": [t[1] / shape_s, t[2] / shape_s]}
        if base is not None:
            row |= {"baseline": baseline_name, "baseline_seconds": base[0],
                    "baseline_seconds_range": [base[1], base[2]], "speedup": base[0] / t[0],
                    "speedup_range": [base[1] / t[2], base[2] / t[1]]}
        if vs_plain is not None:
            row |= {"vs_plain_runs": vs_plain, "vs_plain": statistics.median(vs_plain)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    # the body: blocks and final norm, no lm_head, no hooks attached (its layers are the bridge's
    # wrappers around Hugging Face's weights: benchmarks/probe_fused_forward.py)
    body = model.bridge.original_model.model
    rep = repeated_sequences(model, n_seeds=args.seeds)
    plain_floor = cost.forward([len(s) for s in rep]) / rate

    def plain(seqs) -> None:
        with torch.no_grad():
            for s in seqs:
                body(s[None].to(model.device))

    def beside_plain(fn, floor_flops: Flops) -> tuple[tuple[float, float, float], object,
                                                      list[float]]:
        """``timed(fn)``, each run followed by a plain forward over the scans' sequences;
        also the runs' time per floor FLOP over the plain forward's."""
        times, ratios = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = fn()
            t = time.perf_counter() - start
            start = time.perf_counter()
            plain(rep)
            t_plain = time.perf_counter() - start
            times.append(t)
            ratios.append((t / (floor_flops / rate)) / (t_plain / plain_floor))
        return (statistics.median(times), min(times), max(times)), out, ratios

    # warm-up: first-call overheads, the shared-context support probe
    warm = build_prompts(load_task("antonyms"), shots=0, n=2, seed=0)
    masked_choice_logprobs(model, warm, None)
    plain(rep[:1])

    # 1. unmasked choice scoring
    for task, shots, n in [("country_capital", 5, 30), ("antonyms", 1, 40), ("antonyms", 0, 40),
                           ("openbookqa", 5, 12), ("sentiment", 5, 30),
                           ("boolq", 5, 8)]:
        prompts = build_prompts(load_task(task), shots=shots, n=n, seed=0)
        t_rows, (want, _) = timed(lambda p=prompts: masked_choice_logprobs(model, p, None,
                                                                            scoring="rows"))
        floor_flops = scoring_floor(cost, model, prompts, [None])
        t_shared, (got, _), vs_plain = beside_plain(
            lambda p=prompts: masked_choice_logprobs(model, p, None, scoring="shared"),
            floor_flops)
        same = bool(torch.equal(got.argmax(-1), want.argmax(-1)))
        finite = torch.isfinite(want)
        diff = float((got[finite] - want[finite]).abs().max())
        add(f"choices {task} {shots}-shot x{n} (max |dll| {diff:.1e}, same predictions {same})",
            t_shared, floor_flops, t_rows, "per-choice rows", vs_plain)

    # 2. masked scoring
    prompts = build_prompts(load_task("country_capital"), shots=1, n=8, seed=0)
    ffn = [Mask.remove(model, ffns=[layer]) for layer in range(model.n_layers)]
    gen = torch.Generator().manual_seed(0)
    heads = [Mask(heads=(torch.rand(model.n_layers, model.n_heads, generator=gen) > f).float(),
                  ffn=torch.ones(model.n_layers)) for f in torch.linspace(0.05, 0.5, 20).tolist()]
    for name, masks in [("FFN knock-out (30 masks)", ffn), ("head pruning (20 masks)", heads)]:
        t_rows, (want, _) = timed(lambda m=masks: masked_choice_logprobs(model, prompts, m,
                                                                          scoring="rows"))
        floor_flops = scoring_floor(cost, model, prompts, masks)
        t_shared, (got, _), vs_plain = beside_plain(
            lambda m=masks: masked_choice_logprobs(model, prompts, m, scoring="shared"),
            floor_flops)
        finite = torch.isfinite(want)
        diff = float((got[finite] - want[finite]).abs().max())
        add(f"masked {name}, country_capital 1-shot x8 (max |dll| {diff:.1e})", t_shared,
            floor_flops, t_rows, "per-choice rows", vs_plain)

    # 3. induction scans vs a plain forward of the body over the unpadded sequences
    blocks = [bansal_length(s) for s in range(args.seeds)]
    cop = copying_sequences(model, n_seeds=args.seeds)
    t_plain_rep, _ = timed(lambda: plain(rep))
    t_rep, _ = timed(lambda: _run_repeated(model, rep, blocks, indexing="exact", batch_tokens=4096,
                                           progress=False, want_loss=False))
    add(f"prefix-matching scan, {args.seeds} sequences of {min(map(len, rep))}-"
        f"{max(map(len, rep))} tokens", t_rep, cost.forward([len(s) for s in rep]), t_plain_rep,
        "plain body forward, unpadded")
    t_plain_cop, _ = timed(lambda: plain(cop))
    t_cop, _ = timed(lambda: _run_copying(model, cop, stream="embeddings", batch_tokens=4096,
                                          progress=False))
    add(f"copying scan, {args.seeds} sequences of {len(cop[0])} tokens", t_cop,
        cost.forward([len(s) for s in cop]), t_plain_cop, "plain body forward, unpadded")
    add("plain body forward (the scans' sequences)",
        tuple(a + b for a, b in zip(t_plain_rep, t_plain_cop, strict=True)),
        cost.forward([len(s) for s in rep + cop]))

    print(f"\nMedian of {args.repeats} runs (min-max in brackets).\n")
    print("| Benchmark | Time | Floor | Time / floor | Per-shape floor | Time / per-shape floor "
          "| Per floor FLOP vs the plain forward, run by run | Baseline (same process) "
          "| Speed-up |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        lo, hi = r["seconds_range"]
        flo, fhi = r["time_over_floor_range"]
        slo_, shi_ = r["time_over_shape_floor_range"]
        base = ("", "")
        if "baseline" in r:
            blo, bhi = r["baseline_seconds_range"]
            slo, shi = r["speedup_range"]
            base = (f"{r['baseline']} {r['baseline_seconds']:.1f} s [{blo:.1f}-{bhi:.1f}]",
                    f"{r['speedup']:.2f}x [{slo:.2f}-{shi:.2f}]")
        vs = (f"{r['vs_plain']:.2f} [{min(r['vs_plain_runs']):.2f}-"
              f"{max(r['vs_plain_runs']):.2f}]" if "vs_plain" in r else "")
        name = r["benchmark"].replace("|", "\\|")
        print(f"| {name} | {r['seconds']:.1f} s [{lo:.1f}-{hi:.1f}] | {r['floor_seconds']:.2f} s | "
              f"{r['time_over_floor']:.2f} [{flo:.2f}-{fhi:.2f}] | {r['shape_floor_seconds']:.2f} s | "
              f"{r['time_over_shape_floor']:.2f} [{slo_:.2f}-{shi_:.2f}] | {vs} | {base[0]} | "
              f"{base[1]} |")
    print(f"\nmatmul rate {rate / 1e9:.1f} GFLOP/s at the largest shape; per shape, {rates.tokens} "
          f"tokens: body {rates.body / 1e9:.1f}, unembedding {rates.unembed / 1e9:.1f} "
          f"({', '.join(f'{k} {v / 1e9:.0f}' for k, v in rates.shapes.items())}); "
          f"{torch.get_num_threads()} threads; {cpu_name()}; linear layers on the "
          f"{model.linear_kernel} kernel; oneDNN's packed kernel at the floor's shape "
          f"{packed_rate / 1e9:.1f} GFLOP/s (not the floor)")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
