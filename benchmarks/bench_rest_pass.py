"""Shared-context scoring before and after one-token continuations left the second pass
(commit 5e786ea): masked scoring of 16 prompts x 20 random head masks, timed in the code of a
given checkout. Not a test: run by hand on an otherwise idle machine, once per checkout.

    git worktree add /tmp/wt-old 5e786ea~1
    PYTHONPATH=/tmp/wt-old .venv/bin/python benchmarks/bench_rest_pass.py --out /tmp/old.pt
    PYTHONPATH=. .venv/bin/python benchmarks/bench_rest_pass.py --out /tmp/new.pt --against /tmp/old.pt

Prints the median [min-max] of ``--repeats`` timed runs per task; with ``--against``, the
largest log-likelihood difference to the other checkout and the speed-up (ratio of medians).
"""

import argparse
import statistics
import time

import torch

import mechicl
from mechicl.analyses.evaluation import masked_choice_logprobs
from mechicl.inputs.tasks import build_prompts, load_task
from mechicl.model.masks import Mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", required=True)
    parser.add_argument("--against", default=None)
    args = parser.parse_args()
    model = mechicl.load_model(args.model)
    gen = torch.Generator().manual_seed(0)
    masks = [Mask(heads=(torch.rand(model.n_layers, model.n_heads, generator=gen) > 0.2).float(),
                  ffn=torch.ones(model.n_layers)) for _ in range(20)]
    found = {}
    for task in ("antonyms", "country_capital"):
        prompts = build_prompts(load_task(task), shots=1, n=16, seed=0)
        masked_choice_logprobs(model, prompts[:2], masks[:2])  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            scores, _ = masked_choice_logprobs(model, prompts, masks)
            times.append(time.perf_counter() - start)
        found[task] = {"times": times, "scores": scores}
        print(f"{task}: {statistics.median(times):.1f} s [{min(times):.1f}-{max(times):.1f}]")
    torch.save(found, args.out)
    if args.against:
        other = torch.load(args.against)
        for task, mine in found.items():
            a, b = other[task]["scores"], mine["scores"]
            finite = torch.isfinite(a)
            print(f"{task}: max |dll| {float((a[finite] - b[finite]).abs().max()):.1e}, "
                  f"speed-up {statistics.median(other[task]['times']) / statistics.median(mine['times']):.2f}x")


if __name__ == "__main__":
    main()
