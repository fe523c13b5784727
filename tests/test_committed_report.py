"""The committed reports' findings are computed from their stored results, and the documentation
quotes them without editing (issue 21: no hand-written findings)."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest

import mechicl
from mechicl.report.build import ReportConfig, render_report

ROOT = Path(__file__).resolve().parent.parent
REPORTS = [ROOT / "figures" / "report", ROOT / "figures" / "report-in-weights",
           ROOT / "figures" / "report-in-weights-gemma3-270m",
           ROOT / "figures" / "report-gemma3-270m", ROOT / "figures" / "report-mean-ablation"]
REMOVALS = ("pruning/", "ffn/", "causal/")  # the results --ablation changes
DOC = ROOT / "docs" / "concepts" / "report.md"
# concept pages quoting one section each of the in-weights reports (issue 23's sections)
SECTION_DOCS = {"recall.md": "memorised", "sparsity.md": "sparsity",
                "circuit-reuse.md": "circuit-reuse"}
# each page's claims blocks: (block name, None for the unnamed one) -> the report quoted
SECTION_BLOCKS = {None: REPORTS[1], "gemma3-270m": REPORTS[2]}


def stored_claims(folder: Path) -> pd.DataFrame:
    path = folder / "tables" / "claims.csv"
    if not path.is_file():
        pytest.fail(f"{path} is missing: regenerate the committed report (docs/concepts/report.md)")
    return pd.read_csv(path)


def quoted_claims(page: Path, block: str | None = None) -> list[str]:
    """The claims quoted between a page's markers (scripts/quote_claims.py ``--block``)."""
    name = "" if block is None else f" {block}"
    begin, end = f"<!-- claims:begin{name} -->", f"<!-- claims:end{name} -->"
    text = page.read_text(encoding="utf-8")
    if begin not in text:
        pytest.fail(f"{page} has no {begin} block")
    quoted = text.split(begin, 1)[1].split(end, 1)[0]
    return [line[2:] for line in quoted.splitlines() if line.startswith("- ")]


def test_docs_quote_exactly_the_default_models_claims():
    quoted = quoted_claims(DOC)
    assert quoted == stored_claims(REPORTS[0]).text.tolist()
    md = (REPORTS[0] / "report.md").read_text(encoding="utf-8")
    for text in quoted:
        assert text in md


@pytest.mark.parametrize("block", SECTION_BLOCKS, ids=lambda b: b or "smollm2-135m")
@pytest.mark.parametrize("page, section", SECTION_DOCS.items())
def test_concept_pages_quote_exactly_their_sections_claims(page, section, block):
    claims = stored_claims(SECTION_BLOCKS[block])
    quoted = quoted_claims(DOC.parent / page, block)
    assert quoted and quoted == claims[claims.section == section].text.tolist()


@pytest.mark.parametrize("folder", REPORTS, ids=lambda p: p.name)
def test_committed_claims_are_recomputed_from_the_stored_results(folder):
    if not (folder / "result.json").is_file():
        pytest.fail(f"{folder} is not a committed report")
    meta = json.loads((folder / "result.json").read_text(encoding="utf-8"))
    config = ReportConfig.unchecked(meta["params"])
    index = json.loads((folder / "results" / "index.json").read_text(encoding="utf-8"))
    names = index.get("results", index)
    results = {name: mechicl.load_result(folder / "results" / name) for name in names}
    claims = render_report(config, results).tables["claims"]
    stored = stored_claims(folder)
    assert claims.text.tolist() == stored.text.tolist()
    numbers = ["estimate", "low", "high", "p"]
    pd.testing.assert_frame_equal(claims[numbers].astype(float).reset_index(drop=True),
                                  stored[numbers].astype(float), atol=1e-9, rtol=1e-9)
    assert claims.significant.tolist() == stored.significant.tolist()
    assert claims.subject.tolist() == stored.subject.tolist()
    # a claim is found by its section and subject: no two share them
    assert not stored.duplicated(["section", "subject"]).any(), \
        stored[stored.duplicated(["section", "subject"], keep=False)][["section", "subject"]]
    for row in stored.itertuples():  # a comparison that is not significant says so
        if row.statistic == "accuracy minus random" and not row.significant:
            assert "not significant" in row.text
        if row.statistic == "icl gain":
            assert row.significant and row.low > 0
    # the weights are 4-bit: the report says so
    assert re.search(r"quantised", (folder / "report.md").read_text(encoding="utf-8"))


def test_cross_model_claims_are_recomputed_from_the_committed_reports():
    """figures/cross-model (scripts/cross_model.py) is what compare_reports computes from the two
    committed mean-ablation paper reports, sentence for sentence: like for like, no warning."""
    from mechicl.report import compare_reports

    stored = pd.read_csv(ROOT / "figures" / "cross-model" / "tables" / "claims.csv")
    found = compare_reports({"smollm2-135m": REPORTS[4], "gemma3-270m": REPORTS[3]})
    assert found.ablations == {"smollm2-135m": "mean", "gemma3-270m": "mean"}
    assert [c.text for c in found.claims] == stored.text.tolist()
    page = (ROOT / "figures" / "cross-model" / "cross-model.md").read_text(encoding="utf-8")
    assert "4-bit GGUF Q4_K_M" in page and "The ablations differ" not in page
    # the zero-ablation report against Gemma's is flagged (what the committed page avoids)
    mixed = compare_reports({"smollm2-135m": REPORTS[0], "gemma3-270m": REPORTS[3]})
    assert mixed.ablations == {"smollm2-135m": "zero", "gemma3-270m": "mean"}


def test_the_mean_ablation_report_recomputed_only_the_removals():
    """figures/report-mean-ablation is figures/report with ``--ablation mean``: the scan,
    accuracies and importance maps are the same results (same keys and checksums), the
    pruning curves, FFN knock-out and causal check were computed again under mean ablation."""
    zero, mean = (json.loads((folder / "results" / "index.json").read_text(encoding="utf-8"))
                  ["results"] for folder in (REPORTS[0], REPORTS[4]))
    assert zero.keys() == mean.keys()
    removals = [name for name in zero if name.startswith(REMOVALS)]
    assert len(removals) == 9
    for name in zero:
        same = zero[name]["key"] == mean[name]["key"]
        assert same != name.startswith(REMOVALS), name
    meta = json.loads((REPORTS[4] / "result.json").read_text(encoding="utf-8"))
    assert meta["params"]["ablation"] == "mean"


ABLATION_RUNS = ROOT / "figures" / "causal-ablation"
ABLATION_MODELS = ("smollm2-135m", "gemma3-270m")


def ablation_statistics(model: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The committed runs of ``mechicl ablate-induction --ablation zero|mean`` on ``model``
    (figures/causal-ablation): zero against mean ablation, and the mean-ablation check."""
    from mechicl.analyses.causal import InductionAblation, ablation_difference

    runs = {a: InductionAblation.load(ABLATION_RUNS / a / model / "results"
                                      / f"{model}-ablate-prefix_matching")
            for a in ("zero", "mean")}
    return ablation_difference(runs["zero"], runs["mean"]), runs["mean"].table()


def ablation_rows(statistics: dict[str, tuple[pd.DataFrame, pd.DataFrame]]) -> list[str]:
    """The rows of docs/concepts/causal.md's zero-vs-mean table."""
    rows = []
    for model, (both, mean_table) in statistics.items():
        for row, m in zip(both.itertuples(), mean_table.itertuples(), strict=True):
            rows.append(
                f"| {model} | {row.k} | {m.unablated:.2f} | {row.top_a:.2f} | {row.top_b:.2f} | "
                f"{row.top_diff:+.2f} [{row.top_diff_low:+.2f}, {row.top_diff_high:+.2f}] | "
                f"{row.random_a:.2f} | {row.random_b:.2f} | "
                f"{m.diff:+.2f} [{m.diff_low:+.2f}, {m.diff_high:+.2f}] | "
                f"{round(m.p_draws * (m.draws + 1))}/{m.draws + 1} |")
    return rows


def test_causal_docs_quote_the_committed_zero_and_mean_ablation_runs():
    page = (DOC.parent / "causal.md").read_text(encoding="utf-8")
    quoted = page.split("<!-- ablation-table:begin -->", 1)[1].split(
        "<!-- ablation-table:end -->", 1)[0]
    table = [line for line in quoted.splitlines() if line.startswith("| ") and "---" not in line]
    statistics = {model: ablation_statistics(model) for model in ABLATION_MODELS}
    assert table[1:] == ablation_rows(statistics)  # table[0] is the header
    # the sentences under the table
    for _, mean_table in statistics.values():
        assert (mean_table.diff_low > 0).all()
    gemma, gemma_mean = statistics["gemma3-270m"]
    assert (gemma.top_diff_low > 0).all() and gemma.top_diff.between(3.8, 4.95).all()
    assert round(gemma_mean.p_draws.iloc[-1] * 21) == 4
    smol, _ = statistics["smollm2-135m"]
    assert smol.top_diff_low[0] < 0 < smol.top_diff_high[0]
    assert (smol.top_diff.abs()[1:] < 1).all()


def test_causal_page_quotes_the_gemma_reports_mean_ablation_check():
    """docs/concepts/causal.md quotes the committed Gemma report's causal claims (mean
    ablation) unedited, and its sentence about them holds: the top 5 and 10 heads are not more
    harmful than random on either prune task, the top 27 are on both, and every k is on the
    repeated sequences."""
    folder = REPORTS[3]
    meta = json.loads((folder / "result.json").read_text(encoding="utf-8"))
    assert meta["params"]["ablation"] == "mean"
    claims = stored_claims(folder)
    causal = claims[claims.section == "causal"]
    assert quoted_claims(DOC.parent / "causal.md", "gemma3-270m-report") == causal.text.tolist()
    table = pd.read_csv(folder / "tables" / "causal.csv")
    acc, loss = table[table.measure == "accuracy"], table[table.measure != "accuracy"]
    assert set(acc.subject) == {"country_capital", "antonyms"}
    # accuracy: lower is worse; "more harmful" = the interval of top minus random below 0
    assert not (acc[acc.k < 27].diff_high < 0).any()
    assert (acc[acc.k == 27].diff_high < 0).all()
    assert (loss.diff_low > 0).all() and len(loss) == 3


def test_causal_page_quotes_smollm2s_mean_ablation_check():
    """docs/concepts/causal.md quotes the causal claims of SmolLM2's mean-ablation report
    unedited, and its sentence about them holds: no k of the top heads is more harmful than
    random heads on either prune task, every k is on the repeated sequences."""
    folder = REPORTS[4]
    claims = stored_claims(folder)
    causal = claims[claims.section == "causal"]
    assert quoted_claims(DOC.parent / "causal.md", "smollm2-135m-mean-report") == \
        causal.text.tolist()
    table = pd.read_csv(folder / "tables" / "causal.csv")
    acc, loss = table[table.measure == "accuracy"], table[table.measure != "accuracy"]
    assert set(acc.subject) == {"country_capital", "antonyms"} and len(acc) == 6
    assert not (acc.diff_high < 0).any()  # none more harmful (accuracy: lower is worse)
    assert (acc.diff_low > 0).any()  # "several are less harmful"
    assert (loss.diff_low > 0).all() and len(loss) == 3
