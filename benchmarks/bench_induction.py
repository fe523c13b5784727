"""Benchmark the induction scan on the default model (issue 3). Not a test: run by hand.

    .venv/bin/python benchmarks/bench_induction.py --seeds 100 --ref-seeds 3

Measures, in one process and on the same token batches:
1. prefix-matching (+ previous/duplicate/loss) and copying scans vs bare forward passes over the
   same batches (target: <= 1.3x);
2. the fast scan vs the slow reference implementation (tests/reference_scores.py) on a few
   seeds (target: >= 300x);
3. peak resident memory.
Writes benchmarks/results/induction.json and prints a markdown table for docs/benchmarks.md.
"""

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import mechicl  # noqa: E402
from mechicl._batching import length_batches  # noqa: E402
from mechicl.analyses.induction import (  # noqa: E402
    _pad,
    _repeat_targets,
    _run_copying,
    _run_repeated,
    bansal_length,
    copying_sequences,
    repeated_sequences,
)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def bare_forward(model, seqs, batch_tokens: int) -> float:
    start = time.perf_counter()
    for idx in length_batches([len(s) for s in seqs], batch_tokens):
        tokens, _ = _pad([seqs[i] for i in idx], model.pad_token_id, model.device)
        with torch.no_grad():
            model(tokens, return_type="logits")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--ref-seeds", type=int, default=3)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--parts", default="scan,reference",
                        help="scan (vs bare forward), reference (vs the slow reference), or both")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    import reference_scores as ref

    model = mechicl.load_model(args.model)
    rss_loaded = peak_rss_gb()
    rep = repeated_sequences(model, n_seeds=args.seeds)
    blocks = [bansal_length(s) for s in range(args.seeds)]
    cop = copying_sequences(model, n_seeds=args.seeds)
    # warm-up (first-call overheads)
    bare_forward(model, rep[:1], args.batch_tokens)

    result: dict = {"model": args.model, "seeds": args.seeds, "batch_tokens": args.batch_tokens,
                    "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    if "scan" in parts:
        # Bare forwards first: the peak RSS after them is the baseline for the scans' peak.
        t_bare_rep = bare_forward(model, rep, args.batch_tokens)
        t_bare_cop = bare_forward(model, cop, args.batch_tokens)
        rss_bare = peak_rss_gb()
        start = time.perf_counter()
        _run_repeated(model, rep, blocks, indexing="exact", batch_tokens=args.batch_tokens,
                      progress=False, want_loss=True)
        t_rep = time.perf_counter() - start
        start = time.perf_counter()
        _run_copying(model, cop, stream="embeddings", batch_tokens=args.batch_tokens, progress=False)
        t_cop = time.perf_counter() - start
        rss_scan = peak_rss_gb()
        result |= {
            "tokens_repeated": sum(len(s) for s in rep), "tokens_copying": sum(len(s) for s in cop),
            "prefix_scan_s": t_rep, "prefix_bare_forward_s": t_bare_rep,
            "prefix_ratio": t_rep / t_bare_rep,
            "copying_scan_s": t_cop, "copying_bare_forward_s": t_bare_cop,
            "copying_ratio": t_cop / t_bare_cop,
            "total_ratio": (t_rep + t_cop) / (t_bare_rep + t_bare_cop),
            "peak_rss_gb_after_load": rss_loaded, "peak_rss_gb_after_bare_forwards": rss_bare,
            "peak_rss_gb_after_scan": rss_scan,
        }

    if "reference" in parts:
        # Slow reference vs fast on the first few protocol seeds (the shortest), end to end and
        # for the scoring work alone (what each adds on top of the model's own forward pass).
        k = args.ref_seeds
        start = time.perf_counter()
        for s in range(k):
            ref.ref_prefix_matching(model, rep[s], blocks[s])
        t_ref_pm = time.perf_counter() - start
        start = time.perf_counter()
        names = model.hook_names("pattern")
        for s in range(k):  # the reference's own forward pass (run_with_cache of the patterns)
            with torch.no_grad():
                model.run_with_cache(rep[s][None], names_filter=names)
        t_ref_pm_forward = time.perf_counter() - start
        start = time.perf_counter()
        _run_repeated(model, rep[:k], blocks[:k], indexing="exact", batch_tokens=args.batch_tokens,
                      progress=False, want_loss=False)
        t_fast_pm = time.perf_counter() - start
                # The copying reference (full-vocabulary float64 softmax per head and position, one pass
        # per layer) on the protocol's first sequence (BOS + 100 tokens).
        first = [cop[0]]
        start = time.perf_counter()
        ref.ref_copying(model, first[0])
        t_ref_cp = time.perf_counter() - start
        start = time.perf_counter()
        _run_copying(model, first, stream="embeddings", batch_tokens=args.batch_tokens,
                     progress=False)
        t_fast_cp = time.perf_counter() - start
        # Scoring work alone. Prefix: the fast reduction timed directly on cached patterns;
        # the reference's = its total minus its own forward pass. Copying: the reference runs two
        # forward passes per layer, the fast scan one: subtract those (timed on the same sequence).
        names = model.hook_names("pattern")
        caches = []
        for s in range(k):
            with torch.no_grad():
                caches.append(model.run_with_cache(rep[s][None], names_filter=names)[1])
        start = time.perf_counter()
        for s in range(k):
            keys, weights = _repeat_targets(torch.tensor([len(rep[s])]), torch.tensor([blocks[s]]),
                                            len(rep[s]), 4, "exact")
            keys = keys[:, None].expand(-1, model.n_heads, -1, -1)
            for name in names:
                picked = caches[s][name].gather(-1, keys).double()
                torch.einsum("bhqk,bsqk->bsh", picked, weights)
        t_fast_pm_scoring = time.perf_counter() - start
        t_fwd_one = bare_forward(model, first * 3, args.batch_tokens) / 3

        result |= {
            "ref_seeds": k, "ref_prefix_s": t_ref_pm, "fast_prefix_same_seeds_s": t_fast_pm,
            "ref_speedup_prefix": t_ref_pm / t_fast_pm,
            "ref_prefix_scoring_only_s": t_ref_pm - t_ref_pm_forward,
            "fast_prefix_scoring_only_s": t_fast_pm_scoring,
            "ref_speedup_prefix_scoring": (t_ref_pm - t_ref_pm_forward) / t_fast_pm_scoring,
            "ref_copying_s": t_ref_cp, "fast_copying_s": t_fast_cp,
            "ref_copying_tokens": len(first[0]), "ref_speedup_copying": t_ref_cp / t_fast_cp,
            "forward_one_copying_sequence_s": t_fwd_one,
            "ref_copying_scoring_only_s": t_ref_cp - 2 * model.n_layers * t_fwd_one,
            "fast_copying_scoring_only_s": max(t_fast_cp - t_fwd_one, 1e-9),
        }
        result["ref_speedup_copying_scoring"] = (result["ref_copying_scoring_only_s"]
                                                 / result["fast_copying_scoring_only_s"])

    name = "induction.json" if parts == {"scan", "reference"} else f"induction-{args.parts}.json"
    out = Path(__file__).parent / "results" / name
    out.parent.mkdir(exist_ok=True)
    from mechicl._io import atomic_write_text

    atomic_write_text(out, json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
