"""Benchmark a grid over both offline models through ``mechicl run`` (issue 8). Not a test: run
by hand, alone on the machine.

    .venv/bin/python benchmarks/bench_grid.py [--grid examples/grids/two-models.toml]

In one process, each step a ``mechicl run`` subprocess into a fresh store:
1. the local executor (one model at a time, ``--threads T``);
2. the Ray executor on a local Ray (one actor per model, 1 CPU and ``--threads T`` each, so
   both models run at once on this machine's 2 cores);
3. the local executor again on the finished store (everything cached: no model is loaded).
Then checks that both stores hold the same keys with byte-identical results, and prints a
markdown table for docs/benchmarks.md (``--out FILE`` also writes the numbers as JSON).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mechicl.experiments.grid import load_grid
from mechicl.experiments.store import ResultStore

ROOT = Path(__file__).resolve().parents[1]


def run(grid: Path, store: Path, *extra: str) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "mechicl.cli", "run", str(grid), "--store", str(store),
           "--no-progress", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return seconds, proc.stdout.strip().splitlines()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=Path, default=ROOT / "examples/grids/two-models.toml")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-grid-"))
    grid = load_grid(args.grid)
    n_jobs = len(grid.jobs())
    local, ray_store = work / "local", work / "ray"
    threads = ["--threads", str(args.threads)]
    t_local, line_local = run(args.grid, local, *threads)
    t_ray, line_ray = run(args.grid, ray_store, "--executor", "ray", *threads)
    t_cached, line_cached = run(args.grid, local, *threads)
    a, b = ResultStore(local).contents(), ResultStore(ray_store).contents()
    same_keys = set(a) == set(b)
    identical = same_keys and all(a[k] == b[k] for k in a)
    per_job: dict[str, dict[str, float]] = {}
    for entry in ResultStore(local).entries():
        m = entry.manifest
        name = f"{m['job']['analysis']} ({m['job']['model']})"
        per_job.setdefault(name, {"jobs": 0, "seconds": 0.0})
        per_job[name]["jobs"] += 1
        per_job[name]["seconds"] += m["seconds"]
    numbers = {
        "grid": str(args.grid.relative_to(ROOT) if args.grid.is_relative_to(ROOT) else args.grid),
        "jobs": n_jobs, "threads": args.threads, "cpus": os.cpu_count(),
        "local_s": round(t_local, 1), "ray_s": round(t_ray, 1), "cached_s": round(t_cached, 1),
        "ray_speedup": round(t_local / t_ray, 2), "same_keys": same_keys,
        "identical_bytes": identical, "stdout": [line_local, line_ray, line_cached],
        "per_analysis_local_s": {k: round(v["seconds"], 1) for k, v in sorted(per_job.items())},
    }
    print(f"| run | wall | |\n|---|---|---|\n"
          f"| local executor ({n_jobs} jobs, {args.threads} thread) | {t_local:.0f} s | 1.00 |\n"
          f"| Ray executor, local Ray (2 actors x 1 CPU) | {t_ray:.0f} s | "
          f"{t_local / t_ray:.2f}x faster |\n"
          f"| again, all cached | {t_cached:.1f} s | |\n")
    print(f"same keys: {same_keys}; byte-identical results: {identical}")
    for name, v in sorted(per_job.items()):
        print(f"  {name:36s} {v['jobs']:3d} jobs {v['seconds']:8.1f} s")
    if args.out:
        args.out.write_text(json.dumps(numbers, indent=2))


if __name__ == "__main__":
    main()
