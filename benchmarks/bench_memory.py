"""Measured peak memory of the analyses vs mechicl.experiments.memory's estimates (issue 8). Run by hand:

    .venv/bin/python benchmarks/bench_memory.py                       # SmolLM2, float32
    .venv/bin/python benchmarks/bench_memory.py --dtype bfloat16 --rows 1,4 --seq-len 512

Each (analysis, batch) runs in a fresh subprocess, which loads the model, warms up on 16 tokens,
then measures the growth of its resident memory (peak minus the resident memory just before the
run) over one pass of the analysis' own code:

* ``forward``: ``model(tokens)`` without gradients;
* ``scan``: :func:`mechicl.induction_scan` (prefix matching with the per-position loss) on
  ``rows`` repeated sequences of ``seq_len`` tokens (BOS + 4 copies of L tokens);
* ``importance``: :func:`mechicl.analyses.importance.token_gate_grads`, the forward + backward of the
  gradient head importance;
* ``choices``: :func:`mechicl.analyses.evaluation.choice_logprobs` on ``rows`` prompts of ``seq_len`` tokens;
* ``circuits``: :func:`mechicl.analyses.induction.ov_eigen_copying_scores`, the scan's OV-circuit
  score, computed once from the weights (against the estimate's ``circuits`` term; ``rows`` and
  ``seq_len`` do not matter).

How memory is measured (Linux): the peak is the kernel's high-water mark of resident memory
(``VmHWM``), reset to the current resident memory by writing 5 to ``/proc/self/clear_refs``
after ``malloc_trim``. The subprocesses run with ``MALLOC_MMAP_THRESHOLD_=65536``, so glibc
serves every tensor larger than 64 KiB with its own ``mmap`` and returns it on free: resident
memory then follows the live tensors instead of the allocator's cache. The estimate is the one
:func:`mechicl.experiments.memory.estimate_memory` gives for the loaded model, minus the weights:
its ``batch_bytes`` (the passes; for ``scan`` without the OV score, which this ``scan`` does not
compute) or its ``circuits``.

Prints a markdown table; with ``--out`` also writes the rows as JSON. Nothing else is written.
"""

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MEMORY_MODELS = ("forward", "scan", "importance", "choices", "circuits")
MiB = 1 << 20


def status() -> tuple[int, int]:
    """(resident, peak resident) bytes of this process."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def reset_peak() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: nothing to trim
        pass
    Path("/proc/self/clear_refs").write_text("5")


def can_measure() -> bool:
    """Whether this machine can reset the peak resident memory (Linux with /proc)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        status()
    except OSError:
        return False
    return True


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Load the model, then measure each ``[analysis, rows]`` of ``spec["runs"]`` in turn."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import mechicl
    from mechicl.analyses.importance import token_gate_grads
    from mechicl.analyses.induction import ov_eigen_copying_scores
    from mechicl.experiments.memory import estimate_memory
    from mechicl.inputs.tasks import Prompt

    torch.set_num_threads(spec.get("threads", 1))
    model = mechicl.load_model(spec["model"], dtype=spec["dtype"])
    model.info()  # hashes the weights once (cached): not part of any measurement
    gen = torch.Generator().manual_seed(0)

    def run(analysis: str, rows: int, seq_len: int) -> int:
        """One pass of the analysis; returns the tokens per row it used."""
        tokens = torch.randint(5, model.d_vocab, (rows, seq_len), generator=gen)
        if analysis == "forward":
            with torch.no_grad():
                model(tokens, return_type="logits")
        elif analysis == "scan":
            block = (seq_len - 1) // 4
            base = [torch.randperm(model.d_vocab - 5, generator=gen)[:block] + 5
                    for _ in range(rows)]
            seq_len = 4 * block + 1
            mechicl.induction_scan(model, scores=["prefix_matching"], tokens=base, n_copies=4,
                                   batch_tokens=rows * seq_len, progress=False)
        elif analysis == "importance":
            answer = torch.zeros_like(tokens, dtype=torch.bool)
            answer[:, -3:] = True
            token_gate_grads(model, tokens, torch.ones_like(tokens), answer)
        elif analysis == "choices":
            text = "x" + " x" * (seq_len - 2)  # BOS + seq_len - 1 tokens on SmolLM2's tokenizer
            if len(model.encode(text)) != seq_len:
                raise RuntimeError("the choices prompt does not tokenise to seq_len tokens")
            prompts = [Prompt(id=str(i), text=text, continuations=(" yes", " no"), gold=0)
                       for i in range(rows)]
            mechicl.analyses.evaluation.choice_logprobs(model, prompts, batch_tokens=rows * seq_len)
        elif analysis == "circuits":
            ov_eigen_copying_scores(model)
        else:
            raise ValueError(f"unknown analysis {analysis!r}; allowed: {list(MEMORY_MODELS)}")
        return seq_len

    for analysis in sorted({a for a, _ in spec["runs"]}):
        run(analysis, 1, 16)  # warm-up: lazy initialisation, thread pools
    records = []
    for analysis, rows in spec["runs"]:
        reset_peak()
        before, _ = status()
        start = time.perf_counter()
        seq_len = run(analysis, rows, spec["seq_len"])
        seconds = time.perf_counter() - start
        _, peak = status()
        estimate = estimate_memory(model, batch_tokens=rows * seq_len, seq_len=seq_len,
                                   analysis="scan" if analysis == "circuits" else analysis)
        estimated = estimate.circuits if analysis == "circuits" else estimate.batch_bytes
        records.append({"model": spec["model"], "analysis": analysis, "dtype": spec["dtype"],
                        "rows": rows, "seq_len": seq_len, "measured": peak - before,
                        "estimated": estimated, "seconds": seconds,
                        "estimate": estimate.to_dict()})
    return {"records": records}


def run_child(script: str, spec: dict[str, Any], timeout: float = 900) -> Any:
    """Run ``script --child SPEC`` in a fresh Python process set up for measuring memory (see
    the module docstring); returns the JSON its last line printed."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error"}
    out = subprocess.run([sys.executable, str(Path(script).resolve()), "--child",
                          json.dumps(spec)], env=env, capture_output=True, text=True,
                         timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"measurement failed ({spec}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def as_child(args: argparse.Namespace, child_fn) -> bool:
    """With ``--child``: print ``child_fn(spec)`` as JSON and return True (the caller stops);
    else check that this machine can measure (exits if not) and return False."""
    if args.child is not None:
        print(json.dumps(child_fn(json.loads(args.child))))
        return True
    if not can_measure():
        raise SystemExit("needs Linux: the peak resident memory is reset via /proc/self/clear_refs")
    return False


def emit(table: str, records: list[dict[str, Any]], out: Path | None) -> None:
    """Print the markdown ``table``; with ``out``, also write ``records`` there as JSON."""
    print(table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(records, indent=2))


def measure(spec: dict[str, Any], timeout: float = 900) -> list[dict[str, Any]]:
    """Run :func:`child` in a fresh Python process (see the module docstring for the setup)."""
    return run_child(__file__, spec, timeout)["records"]


def markdown(records: list[dict[str, Any]]) -> str:
    lines = ["| analysis | dtype | rows x tokens | measured growth (MiB) | estimate (MiB) "
             "| measured / estimate | time (s) |", "|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['analysis']} | {r['dtype']} | {r['rows']} x {r['seq_len']} "
                     f"| {r['measured'] / MiB:,.0f} | {r['estimated'] / MiB:,.0f} "
                     f"| {r['measured'] / r['estimated']:.2f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--analyses", default=",".join(MEMORY_MODELS))
    parser.add_argument("--rows", default="1,2,4", help="batch sizes (rows per pass)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: robust timings on a shared machine)")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if as_child(args, child):
        return
    analyses = args.analyses.split(",")
    unknown = sorted(set(analyses) - set(MEMORY_MODELS))
    if unknown:
        raise SystemExit(f"unknown analyses {unknown}; allowed: {list(MEMORY_MODELS)}")
    records = []
    for analysis in analyses:
        for rows in (int(r) for r in args.rows.split(",")):
            spec = {"model": args.model, "runs": [[analysis, rows]], "dtype": args.dtype,
                    "seq_len": args.seq_len, "threads": args.threads}
            records += measure(spec)
    emit(markdown(records), records, args.out)


if __name__ == "__main__":
    main()
