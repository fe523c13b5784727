"""Probe: does ``torch.compile`` bring the model's own forward closer to the FLOP floor on this
CPU? (issue 20: the <= 1.3x floor targets of choice and masked scoring are below what the
eager forward reaches here.)

The body of the model (blocks and final norm, no unembedding, no hooks attached: the bridge's
block and attention wrappers around Hugging Face's weights, :func:`floor.probe_setup`) over
the prefix-matching scan's sequences, one sequence per pass, eager against
``torch.compile(body, dynamic=True)`` (inductor), each against the floor of benchmarks/floor.py
measured in the same process. Not a test; one process, medians of ``--repeats`` runs::

    .venv/bin/python benchmarks/probe_compile.py --out benchmarks/results/probe-compile.json
"""

import json
import statistics
import time

import torch
from floor import CostModel, probe_setup


def main() -> None:
    args, model, body, seqs, rate = probe_setup()
    floor = CostModel.of(model).forward([s.shape[1] for s in seqs]) / rate

    def run(f) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for s in seqs:
                f(s, use_cache=False)
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
