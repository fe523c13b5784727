"""Would the causal check on repeated sequences (``ablate_induction_loss``) gain from bigger
passes on a CPU? Its passes hold masked copies of equal-length sequences (no padding), like the
passes that choice scoring runs at ``CPU_COPIES_PASS_TOKENS`` (2048). Here the check at the
plain CPU cap (512 tokens, what it uses) against the same check at 2048, in one process,
alternating. Not a test: run by hand on an otherwise idle machine.

    .venv/bin/python benchmarks/bench_causal_pass.py --out benchmarks/results/causal-pass.json

The check's defaults (20 sequences of 4 copies of 25 tokens, ``DEFAULT_KS`` = 5, 10, 27 heads,
20 random draws per k, zero ablation: 63 head sets and the unablated model), heads ranked by a
fixed random score table (the ranking does not change the cost). Prints the median [min-max]
of ``--repeats`` runs per cap and the largest difference of the per-mask losses between the
caps.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import mechicl
import mechicl._batching as batching
from mechicl.analyses.causal import ablate_induction_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = mechicl.load_model(args.model)
    scores = torch.rand(model.n_layers, model.n_heads, generator=torch.Generator().manual_seed(0))
    before, after = batching.CPU_PASS_TOKENS, batching.CPU_COPIES_PASS_TOKENS
    ablate_induction_loss(model, scores, ks=[1], n_seeds=2)  # warm-up
    times: dict[int, list[float]] = {before: [], after: []}
    values = {}
    for _ in range(args.repeats):
        for cap in times:
            batching.CPU_PASS_TOKENS = cap
            start = time.perf_counter()
            values[cap] = ablate_induction_loss(model, scores).values
            times[cap].append(time.perf_counter() - start)
    batching.CPU_PASS_TOKENS = before
    med = {cap: statistics.median(t) for cap, t in times.items()}
    diff = float((values[after] - values[before]).abs().max())
    result = {"model": args.model, "repeats": args.repeats,
              "head_sets": int(values[after][..., 0].numel()),  # k x (top + draws)
              "times": {str(k): v for k, v in times.items()},
              "speedup": med[before] / med[after], "max_abs_diff": diff}
    print(f"| {before} tokens per pass | {after} | speed-up | max |dloss| |")
    print(f"| {med[before]:.1f} s [{min(times[before]):.1f}-{max(times[before]):.1f}] | "
          f"{med[after]:.1f} s [{min(times[after]):.1f}-{max(times[after]):.1f}] | "
          f"{med[before] / med[after]:.2f}x | {diff:.1e} |")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
