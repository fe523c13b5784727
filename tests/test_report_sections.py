"""The report's sections beyond the paper (`mechicl report --sections`, issue 23): their jobs,
their rendering from real results on a tiny model, and claims that are recomputed from the
stored report."""

import json
import sys
from pathlib import Path

import pandas as pd
import pytest

import mechicl
from mechicl.analyses.circuit_reuse import CIRCUIT_REUSE, circuit_reuse
from mechicl.analyses.recall import (
    ANSWER_ATTRIBUTION,
    ANSWER_DETERMINANTS,
    VALUE_SCALING,
    answer_attribution,
    answer_determinants,
    value_scaling,
)
from mechicl.analyses.sparsity import SPARSITY_CURVES, sparsity_curves
from mechicl.inputs import tasks_registered
from mechicl.inputs.pairs import ioi_pairs
from mechicl.report import ReportConfig
from mechicl.report.build import Report, render_report, report_jobs
from mechicl.report.sections import SECTION_TASK, SECTIONS

sys.path.insert(0, str(Path(__file__).parent))
from test_circuit_reuse import colored_pairs  # noqa: E402
from test_recall import CLOSED, toy_capital_task, toy_pairs  # noqa: E402
from test_sparsity import toy_tasks  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

OTHERS = tuple(s for s in SECTIONS if s != "paper")


def test_section_jobs_are_the_analyses_at_their_defaults():
    jobs = report_jobs(ReportConfig(sections=OTHERS, seed=3), "m")
    assert list(jobs) == ["memorised/attribution", "memorised/value-scaling",
                          "memorised/determinants", "sparsity/curves",
                          "circuit-reuse/ioi-colored-objects"]
    assert jobs["memorised/attribution"] == ANSWER_ATTRIBUTION.job("m", {}, seed=3)
    assert jobs["memorised/value-scaling"] == VALUE_SCALING.job("m", {}, seed=3,
                                                                task=SECTION_TASK, shots=0)
    assert jobs["memorised/determinants"] == ANSWER_DETERMINANTS.job("m", {}, seed=3,
                                                                     task=SECTION_TASK, shots=0)
    assert jobs["sparsity/curves"] == SPARSITY_CURVES.job("m", {}, seed=3)
    assert jobs["circuit-reuse/ioi-colored-objects"] == CIRCUIT_REUSE.job("m", {}, seed=3)
    # value scaling reads the same attribution the section shows (one result, not two)
    assert jobs["memorised/value-scaling"].inputs()["attribution"].key_options() == \
        jobs["memorised/attribution"].key_options()
    # the paper's jobs come only with the paper section, and are unchanged by the others
    paper = report_jobs(ReportConfig(), "m")
    both = report_jobs(ReportConfig(sections=("paper", "sparsity")), "m")
    assert "scan" in paper and "scan" not in jobs
    assert list(both) == [*paper, "sparsity/curves"]


def test_bad_section_names_the_value_and_the_choices():
    with pytest.raises(ValueError, match=r"'nope'.*in-context-vs-memorised"):
        ReportConfig(sections=("nope",))


@pytest.fixture(scope="module")
def results(tiny_llama):
    model = tiny_llama
    attribution = answer_attribution(model, toy_pairs(model, 6), n_resamples=50,
                                     n_permutations=50)
    task = toy_capital_task()
    with tasks_registered(toy_tasks()):
        curves = sparsity_curves(model, methods=["magnitude"], sparsities=[0.0, 50.0, 90.0],
                                 recall_tasks=["toy_recall"], icl_tasks=["toy_copy:1"], n=8)
    ioi = ioi_pairs(model, 4, templates="BABA", names=[f"w{i}" for i in range(10)])
    return {
        "memorised/attribution": attribution,
        "memorised/value-scaling": value_scaling(model, attribution, task, n=10, n_heads=2,
                                                 factors=[0.0, 1.0, 3.0], draws=20),
        "memorised/determinants": answer_determinants(model, task, n=12, closed_book=CLOSED,
                                                      n_resamples=50),
        "sparsity/curves": curves,
        "circuit-reuse/ioi-colored-objects": circuit_reuse(
            model, ioi, colored_pairs(model, 4), n_resamples=50, n_permutations=50,
            top_k_percent=25.0),
    }


def test_sections_render_their_figures_tables_and_claims(results, tmp_path):
    config = ReportConfig(sections=OTHERS)
    report = render_report(config, results)
    claims = report.tables["claims"]
    assert set(claims.section) == {"memorised", "sparsity", "circuit-reuse"}
    for name in ("memorised-heads-dla", "memorised-heads-exact", "memorised-value-scaling",
                 "memorised-determinants", "sparsity-curves",
                 "circuit-reuse-activation-heatmaps", "circuit-reuse-direct-scatter"):
        assert name in report.figures, name
    # the tables are the analyses' own, unchanged
    attribution = results["memorised/attribution"]
    pd.testing.assert_frame_equal(report.tables["memorised-components-all"], attribution.table())
    pd.testing.assert_frame_equal(report.tables["sparsity-thresholds"],
                                  results["sparsity/curves"].thresholds())
    pd.testing.assert_frame_equal(report.tables["circuit-reuse-roles"],
                                  results["circuit-reuse/ioi-colored-objects"].roles)
    # the strongest in-context head is the table's argmax, with its interval
    heads = attribution.table().query("component == 'head'")
    best = heads.loc[heads.dla_mean.idxmax()]
    first = claims.iloc[0]
    assert f"head {best.layer}.{best['head']}" in first.text
    assert (first.estimate, first.low, first.high) == (best.dla_mean, best.dla_low,
                                                       best.dla_high)
    for row in claims.itertuples():  # a finding without significance says so
        if not row.significant and row.statistic != "roles held on one task or none":
            assert "not significant" in row.text.lower(), row.text

    Report.save(report, tmp_path / "r")  # the stored report re-renders to the same claims
    folder = tmp_path / "r"
    md = (folder / "report.md").read_text(encoding="utf-8")
    assert "Weights: " in md  # the provenance of the weights, as in the paper report
    for text in claims.text:
        assert text in md
    meta = json.loads((folder / "result.json").read_text(encoding="utf-8"))
    assert meta["params"]["sections"] == list(OTHERS)
    loaded = {name: mechicl.load_result(folder / "results" / name) for name in results}
    again = render_report(ReportConfig.unchecked(meta["params"]), loaded).tables["claims"]
    pd.testing.assert_frame_equal(again, claims)
    assert "Sections: in-context-vs-memorised, sparsity, circuit-reuse" in md
    assert "## ICL accuracy" not in md  # no paper section
