"""Which heads matter for a patching result, and are they the induction heads? (issue 6 note)

    .venv/bin/python scripts/patching_vs_induction.py \\
        figures/patching/results/smollm2-135m-ioi-head_out figures/results --out FILE.json

Reads a saved ``[layer, head]`` PatchResult and the HeadScores folders of an induction scan
(``mechicl scan`` writes ``<model>-prefix_matching`` etc. into ``figures/results``), and reports
the top heads by |effect|, where the top induction heads rank in the patching result, and the
Spearman correlation / top-k overlap between |effect| and each induction score.
"""

import argparse
import json
from pathlib import Path

import torch

from mechicl._io import atomic_write_text
from mechicl.overlap import spearman, top_k_overlap
from mechicl.patching import PatchResult
from mechicl.results import HeadScores


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("patch_result", type=Path)
    parser.add_argument("scan_results", type=Path, help="folder holding the scan's HeadScores")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = PatchResult.load(args.patch_result)
    if result.axes != ("layer", "head"):
        raise SystemExit(f"need a [layer, head] result, got {result.axes}")
    effect = result.effect().abs()
    n_heads = effect.shape[1]
    order = torch.argsort(effect.flatten(), descending=True, stable=True)
    rank_of = torch.empty_like(order)
    rank_of[order] = torch.arange(1, order.numel() + 1)
    report: dict = {"patch_result": str(args.patch_result), "target": result.target,
                    "metric": result.metric, "normalized": result.normalized,
                    "top_heads": [{"head": [int(i) // n_heads, int(i) % n_heads],
                                   "effect": float(result.effect().flatten()[i])}
                                  for i in order[: args.k]],
                    "scores": {}}
    for folder in sorted(args.scan_results.iterdir()):
        if not (folder / "meta.json").is_file():
            continue
        scores = HeadScores.load(folder)
        if scores.mean.shape != effect.shape:
            continue
        top = scores.top_heads(args.k)
        report["scores"][scores.name] = {
            "spearman_vs_abs_effect": spearman(effect, scores.mean),
            f"top{args.k}_overlap": top_k_overlap(effect, scores.mean, args.k),
            "top_heads_rank_in_patching": {f"{a}.{b}": int(rank_of[a * n_heads + b])
                                           for a, b in top[:5]},
        }
    text = json.dumps(report, indent=2)
    if args.out:
        atomic_write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
