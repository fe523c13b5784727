"""Benchmark head importance on the default model (issue 5). Not a test: run by hand, alone.

    .venv/bin/python benchmarks/bench_importance.py --task country_capital --shots 5 --n 8

Measures, in one process and on the same prompts and batches:
1. gradient importance (Bansal et al.'s form; Michel's costs the same pass) vs a bare forward +
   backward with the same loss (parameters frozen, gradient taken to the embedding output so
   the backward runs through every layer). Target: <= 1.3x.
2. per-head ablation importance (one masked copy per head, batched) vs gradient importance.
   Target: gradient >= n_layers * n_heads / 4 times faster.
3. peak resident memory after each part;
4. each against the FLOP floor (benchmarks/floor.py) measured in the same process: gradient
   importance must run one forward over the unpadded prompts (unembedding the answer positions)
   and one backward to the activations (parameters frozen: as much again, floor.py); ablation importance one unmasked
   forward plus, per head, the layers from the head's own up (a masked copy joins there) and
   the answer positions' unembedding.
Writes benchmarks/results/importance.json and prints a markdown table for docs/benchmarks.md.
"""

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from floor import CostModel, Rates  # noqa: E402

import mechicl  # noqa: E402
from mechicl._batching import length_batches  # noqa: E402
from mechicl.analyses._engine import frozen_parameters as _frozen  # noqa: E402
from mechicl.analyses.evaluation import answer_batch  # noqa: E402


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def bare_forward_backward(model, batch, batch_tokens: int) -> float:
    """Same batches and loss as head_importance, with no gates: the backward goes to hook_embed."""
    lengths = batch.attention_mask.sum(-1).tolist()
    start = time.perf_counter()
    for rows in length_batches(lengths, batch_tokens):
        width = max(lengths[i] for i in rows)
        tokens = batch.tokens[rows, :width]
        attn = batch.attention_mask[rows, :width]
        target = batch.answer_mask[rows, :width].clone()
        target[:, 0] = False
        b_idx, pos = torch.nonzero(target, as_tuple=True)
        counts = target.sum(-1)
        leaves: list = []

        def leaf(x, hook, leaves=leaves):
            x = x.detach().requires_grad_(True)
            leaves.append(x)
            return x

        with _frozen(model), torch.enable_grad():
            logits = model.run_with_hooks(tokens, attention_mask=attn,
                                          fwd_hooks=[("hook_embed", leaf)], return_type="logits")
            picked = logits[b_idx, pos - 1]
            nll = torch.logsumexp(picked, -1) - picked.gather(-1, tokens[b_idx, pos][:, None])[:, 0]
            loss = (nll / counts[b_idx]).sum()
            torch.autograd.grad(loss, leaves)
    return time.perf_counter() - start


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="country_capital")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--parts", default="gradient,ablation")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "importance.json")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    torch.manual_seed(0)
    model = mechicl.load_model(args.model)
    task = mechicl.load_task(args.task)
    prompts = mechicl.build_prompts(task, shots=args.shots, n=args.n, seed=0)
    batch = answer_batch(model, prompts)
    n_tokens = int(batch.attention_mask.sum())
    lengths = batch.attention_mask.sum(-1).tolist()
    answers = int(batch.answer_mask[:, 1:].sum())  # positions whose next token is scored
    cost = CostModel.of(model)
    rates = Rates.measure(model)
    rate = rates.single
    forward = cost.forward(lengths, unembedded=answers)
    floors = {"gradient": 2 * forward,  # forward + a backward to activations (floor.py)
              "ablation": forward + sum(model.n_heads * (cost.forward_from(lengths, layer)
                                                         + cost.forward([], unembedded=answers))
                                        for layer in range(model.n_layers))}
    result: dict = {"model": model.name, "task": args.task, "shots": args.shots, "n": args.n,
                    "tokens": n_tokens, "batch_tokens": args.batch_tokens,
                    "n_heads_total": model.n_layers * model.n_heads,
                    "torch_threads": torch.get_num_threads(), "matmul_gflops": rate / 1e9,
                    "floor_s": {k: v / rate for k, v in floors.items()},
                    "rates": rates.to_dict(),
                    "shape_floor_s": {k: rates.seconds(v) for k, v in floors.items()}}

    def grad_run(method: str):
        return lambda: mechicl.head_importance(model, prompts=prompts, method=method,
                                               batch_tokens=args.batch_tokens)

    bare_forward_backward(model, batch, args.batch_tokens)  # warm-up
    if "gradient" in parts:
        bare, bare_all = timed(lambda: bare_forward_backward(model, batch, args.batch_tokens),
                               args.repeats)
        bansal, bansal_all = timed(grad_run("bansal"), args.repeats)
        michel, michel_all = timed(grad_run("michel"), args.repeats)
        result |= {"bare_fwd_bwd_s": bare, "bansal_s": bansal, "michel_s": michel,
                   "bansal_ratio": bansal / bare, "michel_ratio": michel / bare,
                   "bansal_over_floor": bansal / result["floor_s"]["gradient"],
                   "bare_over_floor": bare / result["floor_s"]["gradient"],
                   "bansal_over_shape_floor": bansal / result["shape_floor_s"]["gradient"],
                   "bare_over_shape_floor": bare / result["shape_floor_s"]["gradient"],
                   "all_times": {"bare": bare_all, "bansal": bansal_all, "michel": michel_all},
                   "peak_rss_gb_after_gradient": peak_rss_gb()}
    if "ablation" in parts:
        start = time.perf_counter()
        mechicl.head_importance(model, prompts=prompts, method="ablation", metric="loss",
                                batch_tokens=4096)
        ablation = time.perf_counter() - start
        result |= {"ablation_s": ablation, "peak_rss_gb_after_ablation": peak_rss_gb(),
                   "ablation_over_floor": ablation / result["floor_s"]["ablation"],
                   "ablation_over_shape_floor": ablation / result["shape_floor_s"]["ablation"]}
        if "bansal_s" in result:
            result["ablation_over_bansal"] = ablation / result["bansal_s"]
            result["ablation_target"] = result["n_heads_total"] / 4
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    rows = [("tokens (prompts x length)", f"{n_tokens} ({args.n} prompts)"),
            ("floor: gradient / ablation", f"{result['floor_s']['gradient']:.2f} s / "
             f"{result['floor_s']['ablation']:.1f} s ({rate / 1e9:.0f} GFLOP/s matmul)")]
    if "bansal_s" in result:
        rows += [("bare forward + backward", f"{result['bare_fwd_bwd_s']:.2f} s "
                  f"({result['bare_over_floor']:.2f}x floor, "
                  f"{result['bare_over_shape_floor']:.2f}x per-shape floor)"),
                 ("gradient importance, bansal", f"{result['bansal_s']:.2f} s "
                  f"({result['bansal_ratio']:.2f}x bare, "
                  f"{result['bansal_over_floor']:.2f}x floor, "
                  f"{result['bansal_over_shape_floor']:.2f}x per-shape floor)"),
                 ("gradient importance, michel", f"{result['michel_s']:.2f} s "
                  f"({result['michel_ratio']:.2f}x)")]
    if "ablation_s" in result:
        rows.append(("per-head ablation importance", f"{result['ablation_s']:.1f} s "
                     f"({result['ablation_over_floor']:.2f}x floor, "
                     f"{result['ablation_over_shape_floor']:.2f}x per-shape floor)"))
    if "ablation_over_bansal" in result:
        rows.append(("ablation / gradient", f"{result['ablation_over_bansal']:.0f}x "
                     f"(target >= {result['ablation_target']:.1f}x)"))
    print("| measure | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
