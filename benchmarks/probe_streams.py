"""Probe: would two streams of passes, one core each, beat one stream on both cores? (issue 20:
the <= 1.3x floor targets of choice and masked scoring.)

On this 2-core CPU every pass runs with two intra-op threads, and part of a pass does not use
both (Python's work per layer, small products, elementwise work). This probe splits the same
work into two halves (alternate prompts / sequences), runs each half on its own Python thread
with one intra-op thread (``torch.set_num_threads(1)``) on its own copy of the model (a deep
copy of the bridge sharing every parameter and buffer, so that the hooks of one stream are not
seen by the other), and compares with the whole work as one stream on two threads, alternating
the two within every round. Not a test; not a library feature (see docs/benchmarks.md)::

    .venv/bin/python benchmarks/probe_streams.py --rounds 3 \\
        --out benchmarks/results/probe-streams.json

Prints, per workload, the median [min-max] time of each way, the median [min-max] of the
round-by-round ratio (two streams / one), and the largest difference of the results.
"""

import argparse
import copy
import json
import threading
import time

import torch
from floor import alternated, probe_setup, ratio_table

from mechicl.analyses.evaluation import masked_choice_logprobs
from mechicl.analyses.importance import head_importance
from mechicl.inputs.tasks import build_prompts, load_task
from mechicl.model.masks import Mask

CHOICES = [("country_capital", 5, 30), ("antonyms", 1, 40), ("antonyms", 0, 40),
           ("openbookqa", 5, 12), ("sentiment", 5, 30), ("boolq", 5, 8)]


def replica(model):
    """The model again, its bridge deep-copied but every parameter and buffer shared."""
    memo = {id(t): t for t in [*model.bridge.parameters(), *model.bridge.buffers()]}
    twin = copy.copy(model)
    twin.__dict__ = dict(model.__dict__)
    twin.bridge = copy.deepcopy(model.bridge, memo)
    return twin


def interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows of ``a`` (the even items) and ``b`` (the odd ones) back in their order."""
    out = torch.empty((a.shape[0] + b.shape[0], *a.shape[1:]), dtype=a.dtype)
    out[0::2], out[1::2] = a, b
    return out


def two_streams(fn, models, items):
    """``fn(model, half)`` on alternate halves of ``items``, each on its own thread and model
    with one intra-op thread; the two results interleaved."""
    halves = [items[0::2], items[1::2]]
    out: list = [None, None]

    def run(i: int) -> None:
        out[i] = fn(models[i], halves[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        torch.set_num_threads(before)
    return interleave(out[0], out[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args, model, body, seqs, rate = probe_setup(parser=parser)
    if args.rounds < 1:
        raise SystemExit(f"--rounds {args.rounds}: must be >= 1")
    start = time.perf_counter()
    models = [model, replica(model)]
    replica_s = time.perf_counter() - start

    def body_pass(m, ss):
        body_m = m.bridge.original_model.model
        with torch.no_grad():
            return torch.stack([body_m(s, use_cache=False).last_hidden_state[0, -1] for s in ss])

    work = {f"plain body forward, {len(seqs)} sequences, one per pass": (body_pass, seqs)}
    for task, shots, n in CHOICES:
        prompts = build_prompts(load_task(task), shots=shots, n=n, seed=0)
        work[f"choices {task} {shots}-shot x{n}"] = (
            lambda m, p: masked_choice_logprobs(m, p, None)[0][0], prompts)
    ffn = [Mask.remove(model, ffns=[layer]) for layer in range(model.n_layers)]
    knock = build_prompts(load_task("country_capital"), shots=1, n=8, seed=0)
    work[f"masked FFN knock-out ({len(ffn)} masks), country_capital 1-shot x8"] = (
        lambda m, p: masked_choice_logprobs(m, p, ffn)[0].transpose(0, 1), knock)
    grad = build_prompts(load_task("country_capital"), shots=5, n=16, seed=0)
    work["gradient importance (Bansal), country_capital 5-shot x16"] = (
        lambda m, p: head_importance(m, prompts=p).per_seed, grad)

    masked_choice_logprobs(model, build_prompts(load_task("antonyms"), shots=0, n=2, seed=0),
                           None)  # warm-up
    times, diffs = alternated(
        work, ("one", "two"), args.rounds,
        lambda way, w: w[0](model, w[1]) if way == "one" else two_streams(w[0], models, w[1]))
    print(f"matmul rate {rate / 1e9:.1f} GFLOP/s; replica made in {replica_s:.2f} s")
    rows = ratio_table(times, diffs, ("one", "two"), ("one stream, two threads",
                                                      "two streams, one thread each",
                                                      "two / one"))
    if args.out is not None:
        args.out.write_text(json.dumps({"model": args.model, "rounds": args.rounds,
                                        "matmul_gflops": rate / 1e9, "replica_s": replica_s,
                                        "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
