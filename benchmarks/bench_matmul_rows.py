"""The matmul rate at each of the model's weight shapes against the rows a product has (issue 20).

Not a test: run by hand on an otherwise idle machine.

    .venv/bin/python benchmarks/bench_matmul_rows.py --out benchmarks/results/matmul-rows.json

:class:`floor.Rates` measures every weight shape at 512 rows, the largest pass a CPU runs. Masked
scoring's growing batch runs its lower layers with far fewer rows (one masked copy of a ~30-token
prompt), and short prompts' passes hold fewer tokens than 512: this measures the same shapes at
16 to 1024 rows in one process, to say how much of a pass's time above its floor is its products'
row count. Prints a markdown table (GFLOP/s).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from floor import Rates  # noqa: E402

import mechicl  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", default="16,32,64,128,256,512,1024")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = mechicl.load_model(args.model)
    found = {int(n): Rates.measure(model, tokens=int(n)).to_dict() for n in args.rows.split(",")}
    shapes = list(next(iter(found.values()))["shapes_gflops"])
    print("| rows | " + " | ".join(shapes) + " | body (FLOP-weighted) | unembedding |")
    print("| --- " * (len(shapes) + 3) + "|")
    for n, r in found.items():
        cells = [f"{r['shapes_gflops'][s]:.0f}" for s in shapes]
        print(f"| {n} | " + " | ".join(cells)
              + f" | {r['body_gflops']:.0f} | {r['unembed_gflops']:.0f} |")
    if args.out is not None:
        args.out.write_text(json.dumps({"model": args.model, "threads": torch.get_num_threads(),
                                        "rates": found}, indent=1) + "\n")


if __name__ == "__main__":
    main()
