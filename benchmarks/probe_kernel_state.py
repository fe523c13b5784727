"""Probe: the resident memory oneDNN's packed linear kernel keeps for every width (rows) of
product it has run, per weight shape of SmolLM2-135M: what the ``kernel_state`` term of
``mechicl.experiments.memory`` bounds. Not a test; each shape in a fresh process, one thread::

    .venv/bin/python benchmarks/probe_kernel_state.py \\
        --out benchmarks/results/probe-kernel-state.json

For each (in, out) shape: one weight packed, a first product of 64 rows, then products of
128, 192, ..., 2048 rows (each twice); the growth of the resident memory after each new width.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

SHAPES = [(576, 1536), (1536, 576), (576, 576), (576, 192)]  # SmolLM2's block products


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(d_in: int, d_out: int) -> dict:
    import torch

    from mechicl.model.kernels import BUCKET_ROWS, pack_weight, packed_linear

    torch.set_num_threads(1)
    packed = pack_weight(torch.randn(d_out, d_in))
    growth = []
    with torch.no_grad():
        packed_linear(torch.randn(BUCKET_ROWS, d_in), packed)
        before = rss_mib()
        for rows in range(2 * BUCKET_ROWS, 2049, BUCKET_ROWS):
            for _ in range(2):
                packed_linear(torch.randn(rows, d_in), packed)
            now = rss_mib()
            growth.append({"rows": rows, "mib": now - before})
            before = now
    return {"shape": [d_in, d_out], "growth": growth,
            "total_mib": sum(g["mib"] for g in growth)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    records = []
    for d_in, d_out in SHAPES:
        out = subprocess.run([sys.executable, __file__, "--child", str(d_in), str(d_out)],
                             check=True, capture_output=True, text=True).stdout
        record = json.loads(out.strip().splitlines()[-1])
        per_width = [g["mib"] for g in record["growth"]]
        print(f"{d_in}x{d_out}: {record['total_mib']:.1f} MiB over {len(per_width)} widths "
              f"(per width {min(per_width):.2f}-{max(per_width):.2f} MiB)")
        records.append(record)
    if args.out is not None:
        args.out.write_text(json.dumps({"records": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()
