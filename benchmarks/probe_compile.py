"""Probe: does ``torch.compile`` bring the model's own forward closer to the FLOP floor on this
CPU? (issue 20: the <= 1.3x floor targets of choice and masked scoring are below what the
eager forward reaches here.)

The plain Hugging Face body of the model (blocks and final norm, no unembedding, no hooks) over
the prefix-matching scan's sequences, one sequence per pass, eager against
``torch.compile(body, dynamic=True)`` (inductor), each against the floor of benchmarks/floor.py
measured in the same process. Not a test; one process, medians of ``--repeats`` runs::

    .venv/bin/python benchmarks/probe_compile.py --out benchmarks/results/probe-compile.json
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from floor import CostModel, matmul_rate

import mechicl
from mechicl.analyses.induction import repeated_sequences


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = mechicl.load_model(args.model)
    body = model.bridge.original_model.model
    seqs = repeated_sequences(model, n_seeds=args.seeds)
    rate = matmul_rate(model)
    floor = CostModel.of(model).forward([len(s) for s in seqs]) / rate

    def run(f) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for s in seqs:
                f(s[None].to(model.device), use_cache=False)
        return time.perf_counter() - start

    run(body)
    eager = [run(body) for _ in range(args.repeats)]
    compiled_body = torch.compile(body, dynamic=True)
    first = run(compiled_body)  # compilation included
    compiled = [run(compiled_body) for _ in range(args.repeats)]
    result = {"model": args.model, "matmul_gflops": rate / 1e9, "floor_s": floor,
              "eager_s": eager, "compiled_s": compiled, "compile_and_first_run_s": first,
              "eager_over_floor": statistics.median(eager) / floor,
              "compiled_over_floor": statistics.median(compiled) / floor,
              "speedup": statistics.median(eager) / statistics.median(compiled)}
    print(json.dumps(result, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
