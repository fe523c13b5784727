"""Diff the results of two report folders, result by result (issue 20: "the same tables"); not
to be confused with :func:`mechicl.report.compare_reports`, which compares two models.

Not a test: run by hand, e.g. the committed report before and after issue 20's speed-ups:

    mkdir -p /tmp/old && git archive 71ad53b figures/report/results | tar -x -C /tmp/old
    .venv/bin/python benchmarks/diff_report_results.py /tmp/old/figures/report figures/report \
        --out benchmarks/results/report-before-after-issue20.json

For every result both folders index: accuracies (and whether every prediction is identical) and
the largest log-likelihood difference; the largest absolute and relative (to the largest
magnitude) difference of importance maps; the largest difference of any number in pruning
curves' tables and whether their accuracy columns are identical (curves of other settings,
e.g. another number of random orders, only as ``same_params: false``; causal checks: the
largest difference of their values and whether the same heads were removed). Prints one line per
kind and writes the per-result rows with ``--out``.
"""

import argparse
import dataclasses
import json
from pathlib import Path

import pandas as pd

from mechicl import load_result
from mechicl.experiments.store import read_index


def compare(old, new) -> dict:
    kind = type(new).__name__
    row: dict = {"kind": kind}
    if kind == "EvalResult":
        row["accuracy_diff"] = abs(new.accuracy - old.accuracy)
        row["same_predictions"] = bool((new.predictions.prediction
                                        == old.predictions.prediction).all())
        row["max_loglik_diff"] = max(abs(a - b) for x, y in zip(new.predictions.loglik,
                                                                old.predictions.loglik,
                                                                strict=True)
                                     for a, b in zip(x, y, strict=True))
    elif kind in ("HeadScores", "LayerScores"):
        diff = float((new.mean.double() - old.mean.double()).abs().max())
        row["max_abs_diff"] = diff
        row["max_rel_diff"] = diff / max(float(old.mean.abs().max()), 1e-30)
    elif kind == "InductionAblation":
        row["max_abs_diff"] = float((new.values - old.values).abs().max())
        row["same_heads"] = bool((new.heads == old.heads).all())
    elif kind == "PruneCurve" and new.params != old.params:
        # different settings (e.g. 3 random orders against 20): not the same table
        row["same_params"] = False
    elif kind == "PruneCurve":
        for f in dataclasses.fields(new):
            a, b = getattr(new, f.name), getattr(old, f.name)
            if isinstance(a, pd.DataFrame):
                na, nb = a.select_dtypes("number"), b.select_dtypes("number")
                row["max_number_diff"] = float((na - nb).abs().max().max())
                acc = [c for c in na.columns if "accuracy" in c]
                row["same_accuracies"] = bool((na[acc] == nb[acc]).all().all())
        row["same_params"] = new.params == old.params
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    old_index = read_index(args.old / "results")
    new_index = read_index(args.new / "results")
    rows = {}
    for name in sorted(set(old_index) & set(new_index)):
        rows[name] = compare(load_result(args.old / "results" / name),
                             load_result(args.new / "results" / name))
    by_kind: dict[str, list[dict]] = {}
    for row in rows.values():
        by_kind.setdefault(row["kind"], []).append(row)
    summary = {}
    for kind, rs in sorted(by_kind.items()):
        s = {"n": len(rs)}
        for key in rs[0]:
            values = [r[key] for r in rs]
            if key == "kind":
                continue
            s[key] = all(values) if isinstance(values[0], bool) else max(values)
        summary[kind] = s
        print(kind, json.dumps(s))
    if args.out is not None:
        args.out.write_text(json.dumps({"summary": summary, "results": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
