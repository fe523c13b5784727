"""Induction scan on the default model: cross-checks recorded in docs/benchmarks.md.

    .venv/bin/python benchmarks/compare_induction.py [--prefix-result figures/smollm2-135m/results/smollm2-135m-scan/prefix_matching]

1. TransformerLens ``detect_head(model, text, "induction_head")`` on identical inputs: random
   whole-word tokens whose text re-tokenises to exactly BOS + the tokens repeated 4 times. On such
   inputs TL's "mul" score equals mechicl's exact prefix-matching score x 3L / (4L + 1), so
   the two must agree to float precision and rank heads identically.
2. Zero-ablating the top-5 prefix-matching heads vs 5 random heads (5 draws): loss on the
   repeated copies.
Writes benchmarks/results/compare_induction.json.
"""

import json
import time
from pathlib import Path

import numpy as np
import torch
from transformer_lens.head_detector import detect_head

import mechicl
from mechicl._io import atomic_write_text
from mechicl.analyses.induction import repeated_sequences


def round_trip_bases(model, n: int, L: int, seed: int) -> list[tuple[torch.Tensor, str]]:
    """Base sequences of L distinct whole-word tokens whose repeated text re-tokenises exactly."""
    pool = model.frequency_ranking.middle()
    words = [int(t) for t in pool if (s := model.tokenizer.decode([int(t)])).startswith(" ")
             and s[1:].isalpha()]
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        base = torch.tensor(rng.choice(words, size=L, replace=False))
        text = model.tokenizer.decode(base.repeat(4).tolist())
        if torch.equal(model.to_tokens(text)[0].cpu(),
                       torch.cat([torch.tensor([model.bos_token_id]), base.repeat(4)])):
            out.append((base, text))
    return out


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--prefix-result", default=None,
                        help="a saved 100-seed prefix-matching result to reuse (mechicl scan output)")
    args = parser.parse_args()
    model = mechicl.load_model()
    L, n = 25, 4
    bases = round_trip_bases(model, n, L, seed=0)
    start = time.perf_counter()
    ours = mechicl.analyses.induction.prefix_matching_scores(model, tokens=[b for b, _ in bases], progress=False)
    t_ours = time.perf_counter() - start
    start = time.perf_counter()
    tl = torch.stack([detect_head(model.bridge, text, "induction_head").double()
                      for _, text in bases]).mean(0)
    t_tl = time.perf_counter() - start
    scaled = tl * (4 * L + 1) / (3 * L)
    flat_ours, flat_tl = ours.mean.flatten(), scaled.flatten()
    rank = lambda x: torch.argsort(torch.argsort(x)).double()  # noqa: E731 (no ties here)
    spearman = float(torch.corrcoef(torch.stack([rank(flat_ours), rank(flat_tl)]))[0, 1])
    top_ours = ours.top_heads(10)
    top_tl = [(int(i) // model.n_heads, int(i) % model.n_heads)
              for i in torch.argsort(flat_tl, descending=True)[:10]]
    detect = {
        "L": L, "n_sequences": n, "max_abs_diff_after_scaling": float((scaled - ours.mean).abs().max()),
        "spearman": spearman, "top10_mechicl": top_ours, "top10_transformerlens": top_tl,
        "top10_overlap": len(set(top_ours) & set(top_tl)),
        "seconds_mechicl": t_ours, "seconds_transformerlens": t_tl,
    }

    # Ablation: top-5 prefix-matching heads (100-seed scan) vs 5 random heads.
    if args.prefix_result:
        pm = mechicl.HeadScores.load(args.prefix_result)
        if pm.model.get("weights_sha256") != model.weights_hash:
            raise SystemExit(f"{args.prefix_result} was computed on other weights")
    else:
        pm = mechicl.analyses.induction.prefix_matching_scores(model, n_seeds=100, progress=False)
    tokens = torch.stack([repeated_sequences(model, n_seeds=1, seed=1000 + i)[0]
                          for i in range(8)])  # fresh sequences, L = 25

    def later_loss(heads):
        by_layer: dict[int, list[int]] = {}
        for layer, head in heads:
            by_layer.setdefault(layer, []).append(head)

        def ablate(z, hook, heads):
            z[:, :, heads] = 0.0
            return z

        hooks = [(model.hook_name("z", layer), lambda z, hook, hs=hs: ablate(z, hook, hs))
                 for layer, hs in by_layer.items()]
        with torch.no_grad():
            loss = model.run_with_hooks(tokens, fwd_hooks=hooks, return_type="loss",
                                        loss_per_token=True)
        return {"first_copy": float(loss[:, 1:L].mean()), "later_copies": float(loss[:, L + 1:].mean())}

    gen = torch.Generator().manual_seed(0)
    n_heads = model.n_layers * model.n_heads
    random_draws = [[(int(i) // model.n_heads, int(i) % model.n_heads)
                     for i in torch.randperm(n_heads, generator=gen)[:5]] for _ in range(5)]
    ablation = {
        "top5_heads": pm.top_heads(5), "none": later_loss([]), "top5": later_loss(pm.top_heads(5)),
        "random5": [later_loss(h) for h in random_draws], "random5_heads": random_draws,
    }
    ablation["random5_mean_later"] = float(np.mean([r["later_copies"] for r in ablation["random5"]]))
    result = {"detect_head": detect, "ablation": ablation}
    out = Path(__file__).parent / "results" / "compare_induction.json"
    out.parent.mkdir(exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
