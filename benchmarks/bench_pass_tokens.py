"""Would bigger CPU passes than 512 tokens pay, now that choice scoring packs each prompt into
one row? Times choice scoring, gradient head importance and the prefix-matching scan
(``--workloads``; ``make-scan``: the whole scan of ``make scan``) at each cap in ``--caps``
(set as both ``CPU_PASS_TOKENS`` and ``CPU_CHOICES_PASS_TOKENS``; the passes of
masked copies are not run here), in one process, alternating the caps within every round (the
order reversed every other round), so that the machine's drift between rounds cancels in the
round-by-round ratios. Not a test: run by hand on an otherwise idle machine.

    .venv/bin/python benchmarks/bench_pass_tokens.py --out benchmarks/results/pass-tokens.json
    .venv/bin/python benchmarks/bench_pass_tokens.py --workloads make-scan --rounds 3 \
        --out benchmarks/results/pass-tokens-make-scan.json

Prints, per workload, the median [min-max] time at each cap, the median [min-max] of the
round-by-round ratio of each cap's time to the first cap's, and the largest difference of the
results between the caps (log-likelihoods, importance scores, prefix-matching scores).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import mechicl
import mechicl._batching as batching
from mechicl.analyses.evaluation import encode_prompt, masked_choice_logprobs, packed_length
from mechicl.analyses.importance import head_importance
from mechicl.analyses.induction import induction_scan, prefix_matching_scores
from mechicl.inputs.tasks import build_prompts, load_task

CHOICES = [("antonyms", 0, 50), ("antonyms", 1, 50), ("country_capital", 1, 50),
           ("country_capital", 5, 30), ("openbookqa", 5, 12), ("piqa", 5, 20),
           ("sarcasm", 5, 30), ("sentiment", 5, 30)]
IMPORTANCE = [("country_capital", 1, 40), ("piqa", 5, 20), ("sarcasm", 5, 20)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--caps", default="512,1024", help="tokens per pass, comma-separated")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workloads", default="choices,importance,scan",
                        help="comma-separated groups: choices, importance, scan (12 short "
                             "sequences), make-scan (the scan of `make scan`: 100 sequences of "
                             "101-893 tokens, every default score)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    caps = [int(c) for c in args.caps.split(",")]
    groups = args.workloads.split(",")
    unknown = sorted(set(groups) - {"choices", "importance", "scan", "make-scan"})
    if unknown:
        raise SystemExit(f"unknown workloads {unknown}; allowed: choices, importance, scan, "
                         "make-scan")
    model = mechicl.load_model(args.model)
    work = {}
    for task, shots, n in CHOICES if "choices" in groups else ():
        prompts = build_prompts(load_task(task), shots=shots, n=n, seed=0)
        lengths = [packed_length(encode_prompt(model, p)) for p in prompts]
        work[f"choices {task} {shots}-shot x{n} (rows of {min(lengths)}-{max(lengths)} tokens)"] = (
            lambda p=prompts: masked_choice_logprobs(model, p, None)[0])
    for task, shots, n in IMPORTANCE if "importance" in groups else ():
        work[f"gradient importance {task} {shots}-shot x{n}"] = (
            lambda t=task, s=shots, k=n: head_importance(model, t, shots=s, n=k).mean)
    if "scan" in groups:
        work["prefix-matching scan, 12 sequences"] = (
            lambda: prefix_matching_scores(model, n_seeds=12, progress=False).mean)
    if "make-scan" in groups:
        work["the scan of make scan (100 sequences of 101-893 tokens, every default score)"] = (
            lambda: torch.stack([s.mean for s in induction_scan(model, progress=False)
                                 .scores.values()]))
    default = batching.CPU_PASS_TOKENS, batching.CPU_CHOICES_PASS_TOKENS
    masked_choice_logprobs(model, build_prompts(load_task("antonyms"), shots=0, n=2, seed=0),
                           None)  # warm-up
    times = {name: {cap: [] for cap in caps} for name in work}
    diffs = dict.fromkeys(work, 0.0)
    for rnd in range(args.rounds):
        for name, fn in work.items():
            first = None
            for cap in caps if rnd % 2 == 0 else caps[::-1]:
                batching.CPU_PASS_TOKENS = batching.CPU_CHOICES_PASS_TOKENS = cap
                start = time.perf_counter()
                out = fn()
                times[name][cap].append(time.perf_counter() - start)
                if first is None:
                    first = out
                else:
                    finite = torch.isfinite(first)
                    diffs[name] = max(diffs[name],
                                      float((out[finite] - first[finite]).abs().max()))
    batching.CPU_PASS_TOKENS, batching.CPU_CHOICES_PASS_TOKENS = default
    rows = []
    print("| Workload | " + " | ".join(f"{c} tokens per pass" for c in caps)
          + " | " + " | ".join(f"{c} / {caps[0]}, round by round" for c in caps[1:])
          + " | max \\|diff\\| |")
    print("| --- " * (1 + 2 * len(caps)) + "|")
    for name, per_cap in times.items():
        ratios = {c: [b / a for a, b in zip(per_cap[caps[0]], per_cap[c], strict=True)]
                  for c in caps[1:]}
        rows.append({"workload": name, "times": {str(c): t for c, t in per_cap.items()},
                     "ratios": {str(c): r for c, r in ratios.items()},
                     "ratio_medians": {str(c): statistics.median(r) for c, r in ratios.items()},
                     "max_abs_diff": diffs[name]})
        cells = [f"{statistics.median(t):.2f} s [{min(t):.2f}-{max(t):.2f}]"
                 for t in per_cap.values()]
        cells += [f"{statistics.median(r):.2f} [{min(r):.2f}-{max(r):.2f}]"
                  for r in ratios.values()]
        print(f"| {name} | " + " | ".join(cells) + f" | {diffs[name]:.1e} |", flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps({"model": args.model, "caps": caps,
                                        "rounds": args.rounds,
                                        "threads": torch.get_num_threads(), "rows": rows},
                                       indent=1) + "\n")


if __name__ == "__main__":
    main()
