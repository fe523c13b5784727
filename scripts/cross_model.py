"""Compare the committed reports of two models (the cross-model section of issue 21).

    .venv/bin/python scripts/cross_model.py figures/report-mean-ablation figures/report-gemma3-270m \
        --names smollm2-135m gemma3-270m --out figures/cross-model

Writes ``cross-model.md`` and ``tables/*.csv`` (every sentence a row of ``claims.csv``),
computed by :func:`mechicl.report.compare_reports` from the reports' stored results.
"""

import argparse
from pathlib import Path

from mechicl.report import compare_reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", type=Path, nargs="+", help="report folders (two or more)")
    parser.add_argument("--names", nargs="+", help="a label per report (default: folder names)")
    parser.add_argument("--out", type=Path, default=Path("figures/cross-model"))
    args = parser.parse_args()
    names = args.names or [p.name for p in args.reports]
    if len(names) != len(args.reports):
        raise SystemExit(f"--names has {len(names)} labels for {len(args.reports)} reports")
    comparison = compare_reports(dict(zip(names, args.reports, strict=True)))
    comparison.save(args.out)
    print(f"wrote {args.out / 'cross-model.md'} ({len(comparison.claims)} claims)")


if __name__ == "__main__":
    main()
