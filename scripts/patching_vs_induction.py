"""Which heads matter for a patching result, and are they the induction heads? (issue 6 note)

    .venv/bin/python scripts/patching_vs_induction.py \\
        figures/patching/ioi-heads/results/smollm2-135m-ioi-head_out \
        figures/smollm2-135m/results/smollm2-135m-scan --out FILE.json

Reads a saved ``[layer, head]`` PatchResult and the result of an induction scan (``mechicl scan``
writes ``results/<model>-scan``), and reports
the top heads by |effect|, where the top induction heads rank in the patching result, and the
Spearman correlation / top-k overlap between |effect| and each induction score.
"""

import argparse
import json
from pathlib import Path

import torch

from mechicl._io import atomic_write_text
from mechicl.analyses.overlap import spearman, top_k_overlap
from mechicl.analyses.patching import PatchResult
from mechicl.results import load_result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("patch_result", type=Path)
    parser.add_argument("scan_result", type=Path, help="a scan's result folder (ScanResult)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = load_result(args.patch_result)
    if not isinstance(result, PatchResult):
        raise SystemExit(f"{args.patch_result} holds a {type(result).__name__}, not a PatchResult")
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
    for scores in load_result(args.scan_result).scores.values():
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
