"""Benchmark all-heads activation patching on the default model vs TransformerLens (issue 6).

Not a test: run by hand, alone on the machine (2 cores; anything else running skews the ratios).

    .venv/bin/python benchmarks/bench_patching.py                # all_pos and by_pos (~20 min)
    .venv/bin/python benchmarks/bench_patching.py --parts all_pos

Same process, same 15-token IOI prompt pair, same metric (logit difference " Mary" - " John" at
the last position, a TransformerLens-style callable for both):

1. ``transformer_lens.patching.get_act_patch_attn_head_out_all_pos`` (one forward pass per head)
   vs ``mechicl.patch(target="head_out")`` with the same callable metric, and with the built-in
   ``"logit_diff"`` (which unembeds only the answer position).
2. the same for ``_by_pos`` (one forward per head and position: 4050 passes).
3. attribution patching of the same grid (one forward + backward).

Target: mechicl >= 5x faster than TransformerLens, numbers equal (max abs difference reported).
Each grid is also timed against its FLOP floor (benchmarks/floor.py, measured in the same
process): the clean and corrupted passes, plus per cell the layers from the patched head's up
(all_pos), or those layers over the positions from the patched one on after a cached prefix
(by_pos), and one unembedded position per cell (the built-in metric's).
Writes benchmarks/results/patching.json and prints a markdown table for docs/benchmarks.md.
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
import transformer_lens.patching as tl_patching

sys.path.insert(0, str(Path(__file__).resolve().parent))

from floor import CostModel, Rates  # noqa: E402

import mechicl  # noqa: E402

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Alice and Bob went to the store, Carol gave a drink to"


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--parts", default="all_pos,by_pos")
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--no-transformer-lens", action="store_true",
                        help="skip TransformerLens's runs (by_pos takes 13 min): mechicl and "
                             "its floor only")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "patching.json")
    args = parser.parse_args()
    parts = args.parts.split(",")
    model = mechicl.load_model(args.model)
    model.info()  # weights hash, cached: not part of any timing
    clean = model.to_tokens(CLEAN)
    corrupted = model.to_tokens(CORRUPTED)
    assert clean.shape == corrupted.shape, (clean.shape, corrupted.shape)
    answer = model.encode(" Mary", prepend_bos=False)[0]
    wrong = model.encode(" John", prepend_bos=False)[0]

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[0, -1, answer] - logits[0, -1, wrong]

    _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_z"))
    # warm-up both paths once
    tl_patching.get_act_patch_attn_head_out_all_pos(
        model.bridge, corrupted, clean_cache, metric,
        index_df=__import__("pandas").DataFrame({"layer": [0], "head_index": [0]}),
        index_axis_names=None)
    mechicl.patch(model, clean, corrupted, metric, cells=[[0, 0]])

    cost = CostModel.of(model)
    rates = Rates.measure(model)
    rate = rates.single
    length = int(clean.shape[1])
    cell = cost.forward([], unembedded=1)
    floor_flops = {
        "all_pos": 2 * cost.forward([length]) + model.n_heads * sum(
            cost.forward_from([length], layer) + cell for layer in range(model.n_layers)),
        "by_pos": 2 * cost.forward([length]) + model.n_heads * sum(
            cost.forward_from([length - pos], layer, past=pos) + cell
            for layer in range(model.n_layers) for pos in range(length)),
    }
    result: dict = {"model": model.name, "prompt_tokens": int(clean.shape[1]),
                    "matmul_gflops": rate / 1e9,
                    "floor_s": {k: v / rate for k, v in floor_flops.items()},
                    "rates": rates.to_dict(),
                    "shape_floor_s": {k: rates.seconds(v) for k, v in floor_flops.items()},
                    "cells_all_pos": model.n_layers * model.n_heads,
                    "cells_by_pos": model.n_layers * model.n_heads * int(clean.shape[1]),
                    "batch_tokens": args.batch_tokens, "torch_threads": torch.get_num_threads(),
                    "clean_logit_diff": float(metric(model(clean))),
                    "corrupted_logit_diff": float(metric(model(corrupted)))}
    tl_fns = {"all_pos": tl_patching.get_act_patch_attn_head_out_all_pos,
              "by_pos": tl_patching.get_act_patch_attn_head_out_by_pos}
    for part in parts:
        by_pos = part == "by_pos"
        tl, tl_s = (None, float("nan")) if args.no_transformer_lens else timed(
            tl_fns[part], model.bridge, corrupted, clean_cache, metric)
        mine, mine_s = timed(mechicl.patch, model, clean, corrupted, metric, by_pos=by_pos,
                             batch_tokens=args.batch_tokens)
        fast, fast_s = timed(mechicl.patch, model, clean, corrupted, "logit_diff",
                             answer=[answer], wrong=[wrong], by_pos=by_pos,
                             batch_tokens=args.batch_tokens)
        attr, attr_s = timed(mechicl.attribution_patch, model, clean, corrupted, "logit_diff",
                             answer=[answer], wrong=[wrong], by_pos=by_pos)
        agree = mechicl.agreement(fast, attr)
        result[part] = {
            "transformer_lens_s": round(tl_s, 2),
            "mechicl_callable_metric_s": round(mine_s, 2),
            "mechicl_builtin_metric_s": round(fast_s, 2),
            "attribution_s": round(attr_s, 2),
            "speedup_callable": round(tl_s / mine_s, 2),
            "speedup_builtin": round(tl_s / fast_s, 2),
            "builtin_over_floor": round(fast_s / result["floor_s"][part], 2),
            "builtin_over_shape_floor": round(fast_s / result["shape_floor_s"][part], 2),
            "diffs_against": "TransformerLens" if tl is not None else "mechicl, built-in metric",
            "max_abs_diff_callable": float((tl - mine.values).abs().max()) if tl is not None
            else float((fast.values - mine.values).abs().max()),
            "max_abs_diff_builtin": float((tl - fast.values).abs().max()) if tl is not None
            else 0.0,
            "attribution_agreement": agree.to_dict(),
            "peak_rss_gb": round(peak_rss_gb(), 2),
        }
        print(part, json.dumps(result[part], indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    print("\n| grid | TransformerLens | mechicl (callable metric) | mechicl (built-in metric) | "
          "speed-up | max abs diff | attribution (1 fwd+bwd) | attribution vs exact (Pearson) "
          "| floor | built-in / floor | built-in / per-shape floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for part in parts:
        r = result[part]
        cells = result[f"cells_{part}"]
        print(f"| head_out {part} ({cells} cells) | {r['transformer_lens_s']} s | "
              f"{r['mechicl_callable_metric_s']} s | {r['mechicl_builtin_metric_s']} s | "
              f"{r['speedup_callable']}x / {r['speedup_builtin']}x | "
              f"{max(r['max_abs_diff_callable'], r['max_abs_diff_builtin']):.1e} | "
              f"{r['attribution_s']} s | {r['attribution_agreement']['pearson']:.3f} | "
              f"{result['floor_s'][part]:.3f} s | {r['builtin_over_floor']}x | "
              f"{r['builtin_over_shape_floor']}x |")


if __name__ == "__main__":
    main()
