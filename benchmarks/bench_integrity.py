"""The cost of issue 22's checks, as ratios against a baseline measured in the same process.
Run by hand:

    .venv/bin/python benchmarks/bench_integrity.py            # 64 MiB result, 7 repeats
    .venv/bin/python benchmarks/bench_integrity.py --mib 256 --repeats 3

* ``verify``: :meth:`mechicl.ResultStore.verify` of one stored result (sha256 of every file
  against job.json, and the result folder's own checksums) against the floor of any check,
  reading the same files' bytes once (``read_tree``).
* ``n_seeds``: how long ``induction_scan(n_seeds=10**9)`` takes to be rejected on a tiny model,
  against one forward pass of that model on one 16-token sequence (the smallest real work).

Prints a markdown table; nothing is written outside a temporary folder.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mechicl.analyses.induction import induction_scan
from mechicl.experiments.store import ResultStore, read_tree
from mechicl.results import HeadScores
from mechicl.testing import tiny_model


def timed(fn, repeats: int) -> list[float]:
    """``repeats`` timed calls (seconds), sorted."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)


def ratio_row(check: str, size: float | None, times: list[float], baseline: str,
              base: list[float]) -> dict:
    """Median times and the median ratio, with the range of ratios over the repeats (each
    check timing against each baseline timing: min/max and max/min)."""
    med, base_med = statistics.median(times), statistics.median(base)
    return {"check": check, "size MiB": size, "seconds (median)": f"{med:.2g}",
            "baseline": baseline, "baseline seconds (median)": f"{base_med:.2g}",
            "ratio (median)": f"{med / base_med:.3g}",
            "ratio range": f"{times[0] / base[-1]:.3g}-{times[-1] / base[0]:.3g}"}


def bench_verify(mib: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        n_seed = max(1, mib * (1 << 20) // (8 * 30 * 9))  # float64 [seed, 30, 9]
        scores = HeadScores.from_per_seed("bench", torch.randn(n_seed, 30, 9,
                                                               dtype=torch.float64))
        folder = scores.save(Path(tmp) / "result")
        store = ResultStore(Path(tmp) / "store")
        key = "ab" * 32
        store.put_folder(key, {"job": {"analysis": "bench"}}, folder)
        size = sum(len(b) for b in read_tree(store.path(key)).values())
        verify = timed(lambda: store.verify(key), repeats)
        read = timed(lambda: read_tree(store.path(key)), repeats)
    return ratio_row("verify", round(size / (1 << 20), 1), verify, "read the files once", read)


def bench_n_seeds(repeats: int) -> dict:
    model = tiny_model("gpt2")
    tokens = torch.randint(0, model.cfg.d_vocab, (1, 16))

    def reject() -> None:
        try:
            induction_scan(model, scores=["prefix_matching"], n_seeds=10**9)
        except ValueError:
            return
        raise AssertionError("n_seeds=10**9 was accepted")

    with torch.no_grad():
        forward = timed(lambda: model(tokens), repeats)
    rejected = timed(reject, repeats)
    return ratio_row("n_seeds=10**9 rejected", None, rejected, "one 16-token forward pass",
                     forward)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=64, help="size of the stored result")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rows = [bench_verify(args.mib, args.repeats), bench_n_seeds(args.repeats)]
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join("" if row[c] is None else str(row[c]) for c in columns) + " |")


if __name__ == "__main__":
    main()
