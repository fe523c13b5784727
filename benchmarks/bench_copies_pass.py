"""Passes of masked copies on a CPU: 512 tokens with prompts sharing a pass (before) against
2048 tokens with one prompt per pass where the masks leave the lowest layers alone (after,
``CPU_COPIES_PASS_TOKENS``), in one process, alternating. Not a test: run by hand on an
otherwise idle machine.

    .venv/bin/python benchmarks/bench_copies_pass.py --out benchmarks/results/copies-pass.json

Cases: FFN knock-out (30 masks, one per layer) and random head pruning (20 masks, all touching
layer 0) over 8 country_capital 1-shot prompts, and per-head ablation (270 one-head masks) over
2 country_capital 5-shot prompts, all choices scored. Prints each case's median [min-max] of
``--repeats`` runs per policy (``--caps``: several 'after' pass sizes) and the largest
log-likelihood difference between the policies.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import mechicl
import mechicl._batching as batching
from mechicl.analyses import evaluation
from mechicl.inputs.tasks import build_prompts, load_task
from mechicl.model.masks import Mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--caps", default=None,
                        help="comma-separated tokens per pass of copies to time as 'after' "
                             "(default: CPU_COPIES_PASS_TOKENS)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = mechicl.load_model(args.model)
    default_cap, passes = batching.CPU_COPIES_PASS_TOKENS, evaluation._shared_passes
    caps = [int(c) for c in args.caps.split(",")] if args.caps else [default_cap]

    def policy(cap: int | None) -> None:  # None: before
        batching.CPU_COPIES_PASS_TOKENS = batching.CPU_PASS_TOKENS if cap is None else cap
        evaluation._shared_passes = passes if cap is not None else (
            lambda lengths, n, budget, alone=False: passes(lengths, n, budget, alone=False))

    one_shot = build_prompts(load_task("country_capital"), shots=1, n=8, seed=0)
    gen = torch.Generator().manual_seed(0)
    cases = [
        ("FFN knock-out, 30 masks x 8 prompts", one_shot,
         [Mask.remove(model, ffns=[layer]) for layer in range(model.n_layers)]),
        ("random head pruning, 20 masks x 8 prompts", one_shot,
         [Mask(heads=(torch.rand(model.n_layers, model.n_heads, generator=gen) > f).float(),
               ffn=torch.ones(model.n_layers)) for f in torch.linspace(0.05, 0.5, 20).tolist()]),
        ("per-head ablation, 270 masks x 2 prompts (5-shot)",
         build_prompts(load_task("country_capital"), shots=5, n=2, seed=0),
         [Mask.remove(model, heads=[(layer, head)]) for layer in range(model.n_layers)
          for head in range(model.n_heads)]),
    ]
    evaluation.masked_choice_logprobs(model, one_shot[:1], cases[0][2][:3])  # warm-up
    rows = []
    print("| case | before (512, prompts share passes) | "
          + " | ".join(f"{cap} | speed-up" for cap in caps) + " | max \\|dll\\| |")
    print("| --- " * (3 + 2 * len(caps)) + "|")
    for name, prompts, masks in cases:
        times: dict[int | None, list[float]] = {cap: [] for cap in [None, *caps]}
        scores = {}
        for _ in range(args.repeats):
            for cap in times:
                policy(cap)
                start = time.perf_counter()
                scores[cap], _ = evaluation.masked_choice_logprobs(model, prompts, masks)
                times[cap].append(time.perf_counter() - start)
        policy(default_cap)
        finite = torch.isfinite(scores[None])
        diff = max(float((scores[cap][finite] - scores[None][finite]).abs().max()) for cap in caps)
        med = {cap: statistics.median(t) for cap, t in times.items()}
        rows.append({"case": name, "times": {str(k): v for k, v in times.items()},
                     "speedup": {str(cap): med[None] / med[cap] for cap in caps},
                     "max_dll": diff})
        cells = [f"{med[cap]:.1f} s [{min(times[cap]):.1f}-{max(times[cap]):.1f}]"
                 for cap in times]
        after = [f"{cell} | {med[None] / med[cap]:.2f}x"
                 for cell, cap in zip(cells[1:], caps, strict=True)]
        print(f"| {name} | {cells[0]} | " + " | ".join(after) + f" | {diff:.1e} |", flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps({"model": args.model, "repeats": args.repeats,
                                        "caps": caps, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
