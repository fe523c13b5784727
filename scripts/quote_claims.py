"""Quote a committed report's claims in a documentation page (between the claims markers),
so that the documentation states no finding by hand.

    .venv/bin/python scripts/quote_claims.py [--report figures/report] [--doc docs/concepts/report.md]
        [--sections memorised,...] [--block NAME]

The quoted sentences are ``tables/claims.csv`` of the report, grouped by section, unedited;
``--sections`` keeps only those claim sections (e.g. ``sparsity`` for docs/concepts/sparsity.md
from figures/report-in-weights). ``--block NAME`` fills the block between
``<!-- claims:begin NAME -->`` and ``<!-- claims:end NAME -->`` instead of the unnamed one (a
page quoting two models' reports has one block per model).
"""

import argparse
from pathlib import Path

import pandas as pd

from mechicl._io import atomic_write_text


def markers(block: str | None = None) -> tuple[str, str]:
    """The comments around a page's quoted claims (``block``: a named block)."""
    name = "" if block is None else f" {block}"
    return f"<!-- claims:begin{name} -->", f"<!-- claims:end{name} -->"


TITLES = {"icl": "Is each task in-context learning?", "agreement": "Agreement between tasks",
          "pruning heads": "Pruning heads", "pruning ffn": "Pruning FFNs",
          "overlap": "Induction heads vs important heads", "methods": "Importance methods",
          "causal": "Causal check", "memorised": "In-context vs memorised answers",
          "sparsity": "Weight sparsity", "circuit-reuse": "Circuit reuse"}


def quoted(claims: pd.DataFrame) -> str:
    """The claims as markdown: one heading per section, one quoted bullet per claim."""
    lines = []
    for section, g in claims.groupby("section", sort=False):
        lines += [f"**{TITLES.get(section, section)}**", ""]
        lines += [f"- {text}" for text in g.text] + [""]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, default=Path("figures/report"))
    parser.add_argument("--doc", type=Path, default=Path("docs/concepts/report.md"))
    parser.add_argument("--sections", type=lambda text: text.split(","), default=None,
                        help="claim sections to quote (default: all)")
    parser.add_argument("--block", default=None,
                        help="the named claims block of the page to fill (default: unnamed)")
    args = parser.parse_args()
    claims = pd.read_csv(args.report / "tables" / "claims.csv")
    if args.sections is not None:
        unknown = sorted(set(args.sections) - set(claims.section))
        if unknown:
            raise SystemExit(f"sections {unknown} are not in {args.report}; it has "
                             f"{sorted(set(claims.section))}")
        claims = claims[claims.section.isin(args.sections)]
    page = args.doc.read_text(encoding="utf-8")
    begin, end = markers(args.block)
    if begin not in page or end not in page:
        raise SystemExit(f"{args.doc} has no {begin} ... {end} block to fill")
    head, rest = page.split(begin, 1)
    _, tail = rest.split(end, 1)
    atomic_write_text(args.doc, head + begin + "\n" + quoted(claims) + end + tail)


if __name__ == "__main__":
    main()
