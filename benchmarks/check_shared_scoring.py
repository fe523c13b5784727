"""Shared-context (packed-row) choice scoring against per-choice rows on a real model: the
largest log-likelihood difference and whether the predictions agree, per task, unmasked and
under random head masks (issue 20: within 1e-4, identical predictions). Not a test (the slow
test of tests/test_scoring.py covers the default model unmasked); run by hand, e.g. for Gemma,
whose sliding-window layers the tiny models only imitate:

    .venv/bin/python benchmarks/check_shared_scoring.py --model gemma3-270m \\
        --out benchmarks/results/shared-vs-rows-gemma3-270m.json
    .venv/bin/python benchmarks/check_shared_scoring.py --masks 20 \\
        --out benchmarks/results/shared-vs-rows-masked.json

Prints one line per case (and the packed rows' lengths); ``--out`` writes them as JSON.
"""

import argparse
import json
from pathlib import Path

import torch

import mechicl
from mechicl.analyses import evaluation
from mechicl.analyses.evaluation import encode_prompt, masked_choice_logprobs
from mechicl.inputs.tasks import build_prompts, load_task
from mechicl.model.masks import Mask

CASES = {0: [("boolq", 5, 3), ("openbookqa", 5, 3), ("country_capital", 5, 4), ("antonyms", 1, 4)],
         20: [("antonyms", 1, 16)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--masks", type=int, default=0, choices=sorted(CASES),
                        help="random head masks (20% of heads removed each)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model = mechicl.load_model(args.model)
    gen = torch.Generator().manual_seed(0)
    masks = [Mask(heads=(torch.rand(model.n_layers, model.n_heads, generator=gen) > 0.2).float(),
                  ffn=torch.ones(model.n_layers)) for _ in range(args.masks)] or None
    rows = []
    for task, shots, n in CASES[args.masks]:
        prompts = build_prompts(load_task(task), shots=shots, n=n, seed=0)
        want, _ = masked_choice_logprobs(model, prompts, masks, scoring="rows")
        got, _ = masked_choice_logprobs(model, prompts, masks, scoring="shared")
        finite = torch.isfinite(want)
        row = {"task": task, "shots": shots, "n": n, "masks": args.masks,
               # (checkouts before packed rows have no packed_length: None)
               "packed_lengths": ([evaluation.packed_length(encode_prompt(model, p))
                                   for p in prompts]
                                  if hasattr(evaluation, "packed_length") else None),
               "max_dll": float((got[finite] - want[finite]).abs().max()),
               "same_predictions": bool(torch.equal(got.argmax(-1), want.argmax(-1)))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps({"model": args.model, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
