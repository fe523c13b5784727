"""Peak memory of each stage of ``mechicl report`` against its memory estimate (issue 20). By hand:

    .venv/bin/python benchmarks/bench_stage_memory.py --out benchmarks/results/stage-memory.json
    .venv/bin/python benchmarks/bench_stage_memory.py --model gemma3-270m --ablation mean \\
        --out benchmarks/results/stage-memory-gemma3-270m.json

A stage is one kind of job of the report's paper section (:func:`mechicl.report.build.report_jobs`
at the defaults): the scan, accuracy, each head-importance method, the FFN knock-out, the head
and FFN pruning curves, the causal check on repeated sequences and on tasks. For each stage the
job of the task and shot count with the longest prompts is measured (``--jobs``: named jobs
instead), with its prompts
(``n``, ``eval_n``) cut to ``--n`` and its scan to ``--seeds`` sequences: the same pass shapes
(the longest prompts, the report's ``batch_tokens``, every mask and random draw), fewer passes.

Each stage runs in a fresh subprocess (``MALLOC_MMAP_THRESHOLD_=65536``, as in
``bench_memory.py``, whose peak measurement this reuses): load the model, compute the job's
inputs (not measured), reset the peak resident memory, compute the job, read the peak. The
growth is compared with :func:`mechicl.experiments.memory.estimate_memory` for the job's memory
model and longest row (its registry record's ``memory`` and ``sequence_length``), at the job's
``batch_tokens`` and at the tokens per pass the device runs (``device_batch_tokens``: on a CPU
at most 512, 1024 for the passes of packed choice rows, 2048 for the passes of masked copies of
choice scoring).

With ``--repeat N`` each job is computed N times in its process, each run measured: the first
includes what a process's first such job adds once (library code paged in, one-time caches),
the later ones are the job's own memory ("warm").

Prints a markdown table; with ``--out`` also writes the rows as JSON. Nothing else is written.
``--reestimate FILE`` compares the measurements of such a file with the current estimates.
"""

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_memory import MiB, as_child, emit, reset_peak, run_child, status  # noqa: E402

REDUCED = {"n": "n", "eval_n": "n", "n_seeds": "seeds", "scan_seeds": "seeds"}


def stage_of(name: str) -> str:
    """``importance/antonyms-1shot-ablation-mean`` -> ``importance ablation-mean``."""
    kind, _, rest = name.partition("/")
    if not rest or kind == "scan":
        return kind
    if kind == "causal":
        return "causal sequences" if rest == "repeated-sequences" else "causal tasks"
    tail = rest.split("shot", 1)[1].lstrip("-")
    return f"{kind} {tail}".strip()


def reduced(job: Any, args: dict[str, int]) -> Any:
    """``job`` with its prompt and scan-sequence counts cut to ``args``' (never raised)."""
    options = dict(job.options)
    for option, arg in REDUCED.items():
        if options.get(option) is not None:
            options[option] = min(int(options[option]), args[arg])
    return dataclasses.replace(job, options=options)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one stage: ``spec`` has ``model``, ``ablation``, ``stage``, ``n``, ``seeds``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import mechicl
    from mechicl._batching import device_batch_tokens
    from mechicl.analyses.importance import default_batch_tokens
    from mechicl.experiments.memory import ModelShape
    from mechicl.experiments.runner import compute
    from mechicl.inputs.tasks import load_task
    from mechicl.report.build import ReportConfig, report_jobs

    torch.set_num_threads(spec["threads"])
    model = mechicl.load_model(spec["model"])
    model.info()  # hashes the weights once (cached): not part of any measurement
    config = ReportConfig(ablation=spec["ablation"])
    tasks: dict[str, Any] = {}

    def resolved(j: Any) -> Any:
        """``j`` with complete options, its tasks loaded into ``tasks``."""
        for name in j.task_names():
            if name not in tasks:
                tasks[name] = load_task(name)
        return dataclasses.replace(j, options=j.record().resolve(j.options))

    def seq_len(j: Any) -> int:
        return j.record().sequence_length(model, j, tasks.get(j.task))

    jobs = [resolved(reduced(job, spec)) for name, job in report_jobs(config, spec["model"]).items()
            if (name == spec["job"] if spec.get("job") else stage_of(name) == spec["stage"])]
    job = max(jobs, key=seq_len)
    record = job.record()
    done: dict[str, Any] = {}

    def result(j: Any) -> Any:
        key = json.dumps(j.to_dict(), sort_keys=True)
        if key not in done:
            j = resolved(j)
            inputs = {name: result(dep) for name, dep in j.inputs().items()}
            done[key] = compute(j, model=model, tasks=tasks, inputs=inputs)
        return done[key]

    inputs = {name: result(dep) for name, dep in job.inputs().items()}
    runs, seconds = [], []  # the first is the process's first such job; later ones run warm
    for _ in range(spec.get("repeat", 1)):
        reset_peak()
        before, _ = status()
        start = time.perf_counter()
        compute(job, model=model, tasks=tasks, inputs=inputs)
        seconds.append(time.perf_counter() - start)
        _, peak = status()
        runs.append(peak - before)
    budget = job.options["batch_tokens"]
    if budget is None:  # head importance: its own default
        budget = default_batch_tokens(job.options["method"])
    # choice scoring runs passes of packed rows (accuracy) or of masked copies (every other
    # "choices" stage)
    kind = "forward"
    if record.memory_model(job) == "choices":
        kind = "choices" if spec["stage"] == "accuracy" else "copies"
    return with_estimates({
        "model": spec["model"], "stage": spec.get("job") or spec["stage"], "job": job.describe(),
        "n": spec["n"], "seeds": spec["seeds"],
        "shape": ModelShape.from_model(model).to_dict(),
        "dtype": str(model.dtype).removeprefix("torch."), "linear_kernel": model.linear_kernel,
        "memory_model": record.memory_model(job), "seq_len": seq_len(job),
        "batch_tokens": budget, "pass_tokens": device_batch_tokens(
            model.device, budget, kind=kind),
        "measured": runs[0], "measured_runs": runs, "seconds": seconds[0],
        "seconds_runs": seconds})


def with_estimates(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with the current estimates for its stage's memory model, longest row and
    model shape: at its ``batch_tokens`` and at its tokens per pass."""
    from mechicl.experiments.memory import ModelShape, estimate_memory

    at_budget, at_pass = (estimate_memory(
        ModelShape.from_dict(record["shape"]), dtype=record["dtype"], batch_tokens=tokens,
        seq_len=record["seq_len"], analysis=record["memory_model"],
        linear_kernel=record.get("linear_kernel", "plain"))
        for tokens in (record["batch_tokens"], record["pass_tokens"]))
    return {**record, "estimated_at_batch_tokens": at_budget.per_pass,
            "estimated_per_pass": at_pass.per_pass, "estimate_per_pass": at_pass.to_dict()}


def job_names(model: str, ablation: str) -> list[str]:
    """The names of the report's jobs for ``model`` (no model is loaded)."""
    from mechicl.report.build import ReportConfig, report_jobs

    return list(report_jobs(ReportConfig(ablation=ablation), model))


def stages(model: str, ablation: str) -> list[str]:
    """The report's stages for ``model``, in the order of its jobs (no model is loaded)."""
    return list(dict.fromkeys(stage_of(name) for name in job_names(model, ablation)))


def known_names(kind: str, text: str | None, known: list[str]) -> list[str]:
    """The comma-separated names of ``text`` (None: all of ``known``); exits on unknown ones."""
    wanted = known if text is None else text.split(",")
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise SystemExit(f"unknown {kind} {unknown}; allowed: {known}")
    return wanted


def markdown(records: list[dict[str, Any]]) -> str:
    again = any(len(r.get("measured_runs", [])) > 1 for r in records)
    lines = ["| stage | memory model | longest row | tokens per pass (batch_tokens) "
             "| measured growth (MiB) | estimate per pass (MiB) | measured / estimate "
             + ("| again, warm (MiB) | warm / estimate " if again else "")
             + "| estimate at batch_tokens (MiB) | time (s) |",
             "|---" * (11 if again else 9) + "|"]
    for r in records:
        est = r["estimated_per_pass"]
        warm = ""
        if again:
            later = r.get("measured_runs", [])[1:]
            warm = (f"| {max(later) / MiB:,.0f} | {max(later) / est:.2f} " if later else "| | ")
        lines.append(
            f"| {r['stage']} | {r['memory_model']} | {r['seq_len']} "
            f"| {r['pass_tokens']} ({r['batch_tokens']}) | {r['measured'] / MiB:,.0f} "
            f"| {est / MiB:,.0f} | {r['measured'] / est:.2f} {warm}"
            f"| {r['estimated_at_batch_tokens'] / MiB:,.0f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ablation", default="zero", choices=("zero", "mean"))
    parser.add_argument("--stages", default=None, help="comma-separated (default: every stage)")
    parser.add_argument("--jobs", default=None,
                        help="comma-separated job names of the report (e.g. "
                             "accuracy/country_capital-5shot): measure these jobs, not the "
                             "longest-prompt job of each stage")
    parser.add_argument("--n", type=int, default=8, help="prompts per job (n and eval_n)")
    parser.add_argument("--seeds", type=int, default=4, help="scan sequences per job")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1,
                        help="compute each job this many times in its process, each measured: "
                             "the first includes what a process's first such job adds once "
                             "(library code and caches), the later ones run warm")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--reestimate", type=Path, default=None,
                        help="a JSON file this script wrote: its measurements against the "
                             "current estimates (nothing is measured)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reestimate is not None:
        records = [with_estimates(r) for r in json.loads(args.reestimate.read_text())]
        emit(markdown(records), records, args.out)
        return
    if as_child(args, child):
        return
    if args.repeat < 1:
        raise SystemExit(f"--repeat {args.repeat}: need at least 1")
    if args.jobs is not None:
        wanted = known_names("jobs", args.jobs, job_names(args.model, args.ablation))
        specs = [{"stage": stage_of(name), "job": name} for name in wanted]
    else:
        wanted = known_names("stages", args.stages, stages(args.model, args.ablation))
        specs = [{"stage": stage} for stage in wanted]
    records = []
    for spec in specs:
        records.append(run_child(__file__, {
            "model": args.model, "ablation": args.ablation, "n": args.n, "seeds": args.seeds,
            "threads": args.threads, "repeat": args.repeat, **spec}, timeout=3600))
        print(markdown(records[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
        if args.out is not None:  # as it goes: a stopped run keeps the stages it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(records, indent=2))
    emit(markdown(records), records, args.out)


if __name__ == "__main__":
    main()
