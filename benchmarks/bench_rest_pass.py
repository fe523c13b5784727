"""Masked choice scoring (16 prompts x ``--masks`` random head masks, default 20) timed in the
code of a given checkout, to compare two commits each in its own process. Not a test: run by
hand on an otherwise idle machine, once per checkout. Used for one-token continuations leaving
the second pass (commit 5e786ea) and for packed rows replacing the key/value cache
(2026-12-06):

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
    parser.add_argument("--masks", type=int, default=20, help="random head masks (0: unmasked)")
    parser.add_argument("--shots", type=int, default=1)
    args = parser.parse_args()
    model = mechicl.load_model(args.model)
    gen = torch.Generator().manual_seed(0)
    masks = [Mask(heads=(torch.rand(model.n_layers, model.n_heads, generator=gen) > 0.2).float(),
                  ffn=torch.ones(model.n_layers)) for _ in range(args.masks)] or None
    found = {}
    for task in ("antonyms", "country_capital"):
        prompts = build_prompts(load_task(task), shots=args.shots, n=16, seed=0)
        masked_choice_logprobs(model, prompts[:2], masks[:2] if masks else None)  # warm-up
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
