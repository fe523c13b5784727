"""The paper report (mechicl.report / `mechicl report`) end to end on a tiny GQA model: every
table recomputed independently from the stored results, the cache's reuse rules, the prompt
split, the files written, and bad settings."""

import dataclasses
import json
import re
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import mechicl
from mechicl.analyses.overlap import kendall, spearman, top_k_overlap, top_k_pvalue
from mechicl.analyses.pruning import PruneCurve, prune_order, pruning_mask
from mechicl.inputs.tasks import TASKS, build_prompts, load_task, register_task
from mechicl.report import ReportConfig, build_report
from mechicl.results import HeadScores, LayerScores

sys.path.insert(0, str(Path(__file__).parent))
import reference_importance as ref  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TASK_A, TASK_B = "report_copy_a", "report_copy_b"


def _register() -> None:
    for i, name in enumerate((TASK_A, TASK_B)):
        if name not in TASKS:
            register_task(name, lambda name=name, i=i: dataclasses.replace(
                ref.copy_task(40, seed=i), name=name))


_register()

CONFIG = dict(tasks=(TASK_A, TASK_B), shots=(0, 1), n=6, eval_n=8, scan_seeds=3, scan_length=8,
              prune_tasks=(TASK_A, TASK_B), prune_shots=(1,), percents=(0, 25, 50),
              ffn_percents=(0, 50), draws=2, n_permutations=50, n_resamples=50, causal_ks=(1, 2))
METHODS = ("bansal", "michel", "ablation", "ablation-mean", "attribution", "attribution-mean")


@pytest.fixture(scope="module")
def model(tiny_llama):
    return tiny_llama


@pytest.fixture(scope="module")
def report(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return build_report(model, out, ReportConfig(**CONFIG))


def test_copy_task_helper_takes_a_seed():
    # the two registered tasks must differ, or cross-task results would be trivial
    a, b = load_task(TASK_A), load_task(TASK_B)
    assert [e.input for e in a.examples] != [e.input for e in b.examples]


def test_writes_every_figure_table_and_summary(report):
    out = report.out
    expected_figures = {
        "accuracy", "scan-prefix_matching", "scan-copying", "loss-curve", "cross-task-0shot",
        "cross-task-1shot", "cross-shot", "overlap-spearman", "overlap-topk",
        *(f"importance-{t}-{s}shot" for t in (TASK_A, TASK_B) for s in (0, 1)),
        *(f"{kind}-{t}-1shot" for t in (TASK_A, TASK_B)
          for kind in ("prune-heads", "prune-ffn", "ffn-importance")),
        *(f"scatter-prefix_matching-{t}-1shot" for t in (TASK_A, TASK_B)),
        *(f"method-{t}-1shot-{m}" for t in (TASK_A, TASK_B) for m in METHODS),
        "causal-loss", "causal-accuracy"}
    assert set(report.figures) == expected_figures
    for name in expected_figures:
        assert (out / "img" / f"{name}.png").stat().st_size > 1000, name
    for name, table in report.tables.items():
        stored = pd.read_csv(out / "tables" / f"{name}.csv")
        assert list(stored.columns) == [str(c) for c in table.columns], name
        assert len(stored) == len(table), name
    md = (out / "report.md").read_text()
    linked = set(re.findall(r'src="img/([^"]+)\.png"', md))
    assert linked == expected_figures
    page = (out / "report.html").read_text()
    assert '<script src="plotly.min.js"></script>' in page and (out / "plotly.min.js").is_file()
    assert set(re.findall(r'id="fig-([^"]+)"', page)) == expected_figures
    ids = re.findall(r' id="([^"]+)"', page)
    assert len(ids) == len(set(ids)), "element ids are unique"
    for anchor in re.findall(r'<a href="#([^"]+)">', page):  # the contents link to h2 headings
        assert re.search(f'<h2 id="{anchor}">', page), anchor
    meta = json.loads((out / "result.json").read_text())
    assert meta["kind"] == "Report" and meta["params"]["tasks"] == [TASK_A, TASK_B]
    assert report.seconds["total"] > 0
    assert report.computed == {"scan": 1, "accuracy": 4, "importance": 4 + 2 * 5,
                               "ffn_importance": 2, "pruning": 4, "induction_ablation": 1,
                               "induction_ablation_task": 2}
    # the "highest first" rankings' scan of prefix matching alone: taken from the full scan
    assert report.reused == {"scan": 1}
    loaded = mechicl.load_result(out)  # the folder is a result: verified, loadable
    assert set(loaded.tables) == set(report.tables) and set(loaded.figures) == expected_figures
    index = json.loads((out / "results" / "index.json").read_text())["results"]
    assert set(index) == set(loaded.sources) and len(index) == 15 + 10 + 3  # the shown results
    assert not list(out.rglob("*.tmp")), "no temporary files left behind"


def test_figures_show_the_stored_values(report):
    imp = HeadScores.load(report.out / "results" / "importance" / f"{TASK_A}-1shot-bansal")
    z = torch.tensor(report.figures[f"importance-{TASK_A}-1shot"].data[0].z)
    relative = (imp.mean / imp.mean.max()).double()  # the default colour scale: log10
    torch.testing.assert_close(z, relative.clamp(min=1e-4).log10())
    scan = mechicl.load_result(report.out / "results" / "scan").scores["prefix_matching"]
    torch.testing.assert_close(torch.tensor(report.figures["scan-prefix_matching"].data[0].z),
                               scan.mean.double())
    ffn = LayerScores.load(report.out / "results" / "ffn" / f"{TASK_B}-1shot")
    assert list(report.figures[f"ffn-importance-{TASK_B}-1shot"].data[0].y) == pytest.approx(
        ffn.mean.tolist())


def test_prompt_split_is_disjoint_and_follows_the_seeded_list(report):
    for task in (TASK_A, TASK_B):
        for shots in (0, 1):
            imp = HeadScores.load(report.out / "results" / "importance" /
                                  f"{task}-{shots}shot-bansal")
            acc = mechicl.EvalResult.load(report.out / "results" / "accuracy" /
                                          f"{task}-{shots}shot")
            plist = build_prompts(load_task(task), shots=shots, seed=0)
            assert imp.params["prompt_ids"] == [p.id for p in plist[:6]]
            assert acc.params["prompt_ids"] == [p.id for p in plist[6:14]]
            assert not set(imp.params["prompt_ids"]) & set(acc.params["prompt_ids"])


def test_tables_equal_independent_computation(model, report):
    out = report.out
    # accuracy: evaluate the same evaluation prompts directly
    acc = report.tables["accuracy"].set_index("task")
    for task in (TASK_A, TASK_B):
        plist = build_prompts(load_task(task), shots=1, seed=0)[6:14]
        direct = mechicl.evaluate(model, task, shots=1, prompts=plist)
        assert acc.loc[task, "1-shot"] == pytest.approx(direct.accuracy)
    # overlap: statistics of the stored maps
    overlap = report.tables["overlap"]
    k = 1  # 10% of 8 heads, rounded up
    assert len(overlap) == 2 * 2 * 2  # tasks x shots x induction scores
    for row in overlap.to_dict("records"):
        imp = HeadScores.load(out / "results" / "importance" /
                              f"{row['task']}-{row['shots']}shot-bansal")
        scan = mechicl.load_result(out / "results" / "scan").scores[row["induction score"]]
        assert row["spearman"] == pytest.approx(spearman(scan, imp))
        assert row["kendall"] == pytest.approx(kendall(scan, imp))
        assert row[f"top-{k} overlap"] == pytest.approx(top_k_overlap(scan, imp, k))
        assert row["hypergeom p"] == pytest.approx(top_k_pvalue(scan, imp, k))
        assert 0 < row["permutation p"] <= 1
        assert row["spearman ci low"] <= row["spearman ci high"]
    # cross-task matrix
    cross = report.tables["cross-task-1shot"].set_index("task")
    a = HeadScores.load(out / "results" / "importance" / f"{TASK_A}-1shot-bansal")
    b = HeadScores.load(out / "results" / "importance" / f"{TASK_B}-1shot-bansal")
    assert cross.loc[TASK_A, TASK_B] == pytest.approx(spearman(a, b))
    assert cross.loc[TASK_A, TASK_A] == pytest.approx(1.0)


def test_induction_first_curve_removes_the_highest_prefix_heads(model, report):
    """The 'induction heads first' curve at 25% equals evaluating with the top-scoring prefix
    heads masked; the same-task curve with the least important heads masked."""
    out = report.out
    curve = PruneCurve.load(out / "results" / "pruning" / f"{TASK_A}-1shot-heads")
    scan = mechicl.load_result(out / "results" / "scan").scores["prefix_matching"]
    imp = HeadScores.load(out / "results" / "importance" / f"{TASK_A}-1shot-bansal")
    plist = build_prompts(load_task(TASK_A), shots=1, seed=0)[6:14]
    data = curve.data.set_index(["head_ranking", "head_percent"])
    for name, scores in ((f"same task ({TASK_A})", imp.mean),
                         ("prefix matching, highest first", -scan.mean),
                         (f"other task ({TASK_B})", None)):
        if scores is None:
            scores = HeadScores.load(out / "results" / "importance" / f"{TASK_B}-1shot-bansal").mean
        mask = pruning_mask(model, head_order=prune_order(scores), head_percent=25)
        assert mask.heads.sum() == 6  # 2 of 8 heads removed
        direct = mechicl.evaluate(model, TASK_A, shots=1, prompts=plist, mask=mask)
        assert data.loc[(name, 25.0), "accuracy"] == pytest.approx(direct.accuracy), name
    top2 = set(scan.top_heads(2))
    removed = {(int(i) // 4, int(i) % 4) for i in prune_order(-scan.mean)[:2]}
    assert removed == top2


def test_second_run_reuses_everything_and_writes_the_same_tables(model, report, tmp_path):
    again = build_report(model, report.out, ReportConfig(**CONFIG), store=tmp_path / "fresh")
    # a fresh store: every result is taken from the report folder (its checksums verified)
    # 16 + the compared methods (10) and the causal check (3)
    assert again.computed == {} and sum(again.reused.values()) == 16 + 10 + 3
    for name, table in report.tables.items():
        pd.testing.assert_frame_equal(again.tables[name], table, check_exact=False, rtol=1e-12)


def test_changed_settings_recompute_only_what_they_affect(model, report, tmp_path):
    out = tmp_path / "copy"
    import shutil

    shutil.copytree(report.out, out)
    changed = build_report(model, out, ReportConfig(**{**CONFIG, "n": 5}),
                           store=tmp_path / "fresh")
    # new importance prompts: importance, FFN importance, evaluation slices and curves move;
    # the scan and the causal check on repeated sequences do not depend on n
    assert changed.reused == {"scan": 2, "induction_ablation": 1}
    assert changed.computed["importance"] == 4 + 2 * 5  # + the compared methods
    imp = HeadScores.load(out / "results" / "importance" / f"{TASK_A}-0shot-bansal")
    assert imp.params["n"] == 5


def test_reuse_folder_and_force(model, report, tmp_path):
    out = tmp_path / "elsewhere"
    store = tmp_path / "store"
    reused = build_report(model, out, ReportConfig(**CONFIG), reuse=[report.out], store=store)
    assert reused.computed == {} and (out / "results" / "scan").is_dir()
    forced = build_report(model, out, ReportConfig(**{**CONFIG, "prune_tasks": (TASK_A,),
                                                      "ffn": False}), force=True, store=store)
    # everything computed again (the one-score scan of the rankings: from the new full scan)
    assert forced.reused == {"scan": 1} and forced.computed["pruning"] == 1
    assert forced.computed["scan"] == 1


def test_other_model_and_broken_results_are_not_reused(model, report, tmp_path):
    import shutil

    from mechicl.testing import tiny_model

    out = tmp_path / "other"
    shutil.copytree(report.out, out)
    (out / "results" / "accuracy" / f"{TASK_A}-0shot" / "result.json").write_text("{broken")
    cfg = ReportConfig(**{**CONFIG, "prune_tasks": (), "ffn": False, "tasks": (TASK_A,),
                          "causal_ks": ()})
    same = build_report(model, out, cfg, store=tmp_path / "fresh")
    assert same.computed == {"accuracy": 1}  # the broken one; the rest verified and reused
    other = mechicl.as_hooked_model(tiny_model("llama", seed=1), name="tiny-llama")
    result = build_report(other, out, cfg, store=tmp_path / "fresh")
    assert result.reused == {} and result.computed["accuracy"] == 2
    assert mechicl.EvalResult.load(out / "results" / "accuracy" / f"{TASK_A}-0shot").model[
        "weights_sha256"] == other.weights_hash


@pytest.mark.parametrize("bad, match", [
    ({"tasks": ("nope",)}, r"report.tasks = \['nope'\] is not allowed; choose from"),
    ({"tasks": "sentiment"}, "tasks"),  # a type error under the runtime type checker
    ({"prune_tasks": ("sentiment",)}, "not in tasks"),
    ({"shots": (0, -1)}, "shots"),
    ({"prune_shots": (5,)}, "not in shots"),
    ({"scores": ("induction",)}, r"report.scores = \['induction'\] is not allowed"),
    ({"method": "gradient"}, r"report.method = 'gradient' is not allowed; choose one of"),
    ({"n": 0}, r"report.n = 0: need an integer >= 1"),
    ({"percents": (10, 20)}, "containing 0"),
    ({"ffn_percents": (0, 100)}, "ffn_percents"),
    ({"top_k_percent": 0}, "top_k_percent"),
    ({"formats": ("gif",)}, r"report.formats = \['gif'\] is not allowed"),
    ({"scan_length": 1}, "scan_length"),
    ({"importance_batch_tokens": 0}, r"report.importance_batch_tokens = 0"),
])
def test_bad_settings_name_the_value(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ReportConfig(**{**CONFIG, **bad})


def test_memory_budget_sizes_every_job_of_the_report(model, tmp_path):
    """With a memory budget every job's batch is sized for the longest row it feeds the model
    (slow reference: every prompt with every answer, one row at a time; for choice scoring also
    the packed row of a prompt's context and every answer but its last token) by its
    analysis's memory model; the stored manifests record the sizes."""
    from mechicl.analyses import Job
    from mechicl.analyses.evaluation import answer_batch
    from mechicl.analyses.induction import repeated_sequences
    from mechicl.experiments.memory import batch_tokens_for_budget, estimate_memory
    from mechicl.experiments.store import ResultStore

    config = ReportConfig(**{**CONFIG, "tasks": (TASK_A, TASK_B), "shots": (0, 2),
                             "prune_tasks": (TASK_B,), "prune_shots": (2,), "ffn": False,
                             "percents": (0, 50), "draws": 0})

    def longest_row(prompts):
        return max(int(answer_batch(model, [p], which=c).attention_mask.sum())
                   for p in prompts for c in range(len(p.continuations)))

    def longest_packed(prompts):
        longest = 0
        for p in prompts:
            batches = [answer_batch(model, [p], which=c) for c in range(len(p.continuations))]
            answers = [int(b.answer_mask.sum()) for b in batches]
            context = int(batches[0].attention_mask.sum()) - answers[0]
            longest = max(longest, context + sum(a - 1 for a in answers))
        return longest

    def longest(job):
        if job.analysis == "scan":
            return seq_scan
        if job.analysis == "induction_ablation":  # BOS + 4 copies of `length` tokens
            return 1 + 4 * job.options["length"]
        if job.record().memory_model(job) == "choices":
            return max(longest_row(rows(job)), longest_packed(rows(job)))
        return longest_row(rows(job))

    def rows(job):
        plist = build_prompts(load_task(job.task), shots=job.shots, seed=config.seed)
        if job.analysis == "importance":
            return plist[:config.n]
        return plist[config.n:config.n + config.eval_n]  # accuracy, pruning, causal check

    seq_importance = max(longest_row(build_prompts(load_task(t), shots=s, seed=0)[:config.n])
                         for t in config.tasks for s in config.shots)
    seq_scan = max(len(t) for t in repeated_sequences(model, n_seeds=config.scan_seeds,
                                                      length=lambda s: config.scan_length))
    # A budget with room for exactly two of the longest importance rows.
    budget = estimate_memory(model, batch_tokens=2 * seq_importance, seq_len=seq_importance,
                             analysis="importance").total
    assert estimate_memory(model, batch_tokens=3 * seq_importance, seq_len=seq_importance,
                           analysis="importance").total > budget
    store = ResultStore(tmp_path / "store")
    build_report(model, tmp_path / "budget", config, store=store, memory_budget=budget)
    sizes: dict[str, list[int]] = {}
    for entry in store.entries():
        job = Job.from_dict(entry.manifest["job"])
        kind = job.record().memory_model(job)
        if kind is None or "narrowed_from" in entry.manifest:  # no forward pass of its own
            continue
        seq = longest(job)
        assert entry.manifest["batch_tokens"] == batch_tokens_for_budget(
            model, budget, seq_len=seq, analysis=kind), job.describe()
        sizes.setdefault(job.analysis, []).append((seq, entry.manifest["batch_tokens"]))
    assert max(sizes["importance"]) == (seq_importance, 2 * seq_importance)  # two longest rows
    # forward-only rows are cheaper: more of them fit
    assert min(t // s for s, t in sizes["accuracy"]) > 2
    with pytest.raises(ValueError, match=f"too small: scan on one sequence of {seq_scan} tokens"):
        build_report(model, tmp_path / "small", config, store=tmp_path / "store2",
                     memory_budget=budget // 8)


def test_too_few_examples_is_an_error(model, tmp_path):
    with pytest.raises(ValueError, match="leaves none for evaluation"):
        build_report(model, tmp_path / "r", ReportConfig(**{**CONFIG, "n": 40}))
    assert not (tmp_path / "r" / "report.md").exists()


def test_report_cli(tiny_folder, tmp_path, capsys):
    from mechicl.cli import main

    out = tmp_path / "cli"
    assert main(["report", "--model", str(tiny_folder), "--tasks", f"{TASK_A},{TASK_B}",
                 "--shots", "0,1", "--n", "6", "--eval-n", "8", "--scan-seeds", "3",
                 "--prune-tasks", TASK_A, "--prune-shots", "1", "--percents", "0,50",
                 "--ffn-percents", "0,50", "--draws", "1", "--scan-length", "8", "--no-progress",
                 "--causal-ks", "1,2", "--compare-methods", "ablation", "--out", str(out)]) == 0
    assert " claims, " in capsys.readouterr().out  # per section: how many, how many significant
    assert (out / "report.md").is_file() and (out / "img" / "prune-heads-"
                                             f"{TASK_A}-1shot.png").is_file()
    with pytest.raises(SystemExit, match="unknown tasks|not in tasks"):
        main(["report", "--model", str(tiny_folder), "--tasks", TASK_A,
              "--prune-tasks", TASK_B, "--out", str(out)])


def test_a_report_loads_where_its_tasks_are_not_registered(report):
    """A stored report is read as it was: its settings are not checked against this process's
    task registry again."""
    saved = {name: TASKS.pop(name) for name in (TASK_A, TASK_B)}
    try:
        loaded = mechicl.load_result(report.out)
        assert loaded.config.tasks == (TASK_A, TASK_B) and "accuracy" in loaded.tables
    finally:
        TASKS.update(saved)


def test_claims_are_recomputed_from_the_stored_results(report):
    """Every claim of report.md comes from tables/claims.csv, and rendering the stored results
    again gives the same claims (no hand-written findings)."""
    from mechicl.report.build import render_report, report_jobs

    out = report.out
    stored = pd.read_csv(out / "tables" / "claims.csv")
    assert len(stored) > 0 and set(stored.section) >= {"icl", "pruning heads"}
    md = (out / "report.md").read_text()
    for text in stored.text:
        assert text in md, text
    names = report_jobs(report.config, report.model["name"])
    results = {name: mechicl.load_result(out / "results" / name) for name in names}
    again = render_report(report.config, results).tables["claims"]
    pd.testing.assert_frame_equal(again.reset_index(drop=True),
                                  stored.astype(again.dtypes.to_dict()), check_exact=False)
    # every pruning claim names a ranking the report ran, in both directions of the scan
    pruning = stored[stored.section == "pruning heads"]
    assert pruning.subject.str.contains("prefix matching, highest first").any()
    assert pruning.subject.str.contains("prefix matching, lowest first").any()
    # a claim that is not significant says so
    for row in stored.itertuples():
        if row.statistic == "accuracy minus random" and not row.significant:
            assert "not significant" in row.text


def test_two_models_compared_from_their_stored_results(model, report, tmp_path):
    """compare_reports: paired accuracy differences on the same prompts (equal to a literal
    computation from the stored predictions), task classes side by side, and claims that say
    where the models agree, written atomically."""
    from mechicl.report import compare_reports
    from mechicl.testing import tiny_model

    other_model = mechicl.as_hooked_model(tiny_model("llama", seed=1), name="tiny-llama-b")
    other = build_report(other_model, tmp_path / "b", ReportConfig(**CONFIG))
    cmp = compare_reports({"a": report.out, "b": other})
    acc = cmp.tables["accuracy"]
    assert len(acc) == 4 and set(acc.a) == {"a"} and set(acc.b) == {"b"}
    for row in acc.itertuples(index=False):
        x = mechicl.load_result(report.out / "results" / "accuracy" / f"{row.task}-{row.shots}shot")
        y = mechicl.load_result(other.out / "results" / "accuracy" / f"{row.task}-{row.shots}shot")
        assert x.predictions.id.tolist() == y.predictions.id.tolist()  # the same prompts
        want = x.predictions.correct.mean() - y.predictions.correct.mean()
        assert row.difference == pytest.approx(want, abs=1e-12)
        assert row.low <= row.difference <= row.high
    classes = cmp.tables["classes"]
    assert list(classes.task) == [TASK_A, TASK_B]
    assert classes["same class"].tolist() == (classes.a == classes.b).tolist()
    sections = {c.section for c in cmp.claims}
    assert {"accuracy", "classes", "pruning", "causal"} <= sections
    for c in cmp.claims:  # "agree" is said exactly when both models pass or both fail
        if c.section in ("overlap", "pruning", "agreement", "causal"):
            assert c.significant == ("the models agree" in c.text), c.text
    out = cmp.save(tmp_path / "cmp")
    page = (out / "cross-model.md").read_text()
    assert all(c.text in page for c in cmp.claims)
    stored = pd.read_csv(out / "tables" / "claims.csv")
    assert stored.text.tolist() == [c.text for c in cmp.claims]
    with pytest.raises(ValueError, match="at least two reports"):
        compare_reports({"a": report.out})


def test_mean_ablation_recomputes_only_the_removals(model, report, tmp_path):
    """`ablation="mean"`: pruning curves, FFN knock-out and the causal check are recomputed
    with mean ablation (a curve point equals evaluating the mean-ablated mask directly); the
    scan, accuracy and importance maps do not depend on it and are reused; the text and the
    cross-model tables say which removal each report used."""
    import shutil

    from mechicl.analyses.evaluation import prompt_means
    from mechicl.report import compare_reports

    out = tmp_path / "mean"
    shutil.copytree(report.out, out)
    mean = build_report(model, out, ReportConfig(**{**CONFIG, "ablation": "mean"}),
                        store=tmp_path / "fresh")
    assert mean.computed == {"ffn_importance": 2, "pruning": 4, "induction_ablation": 1,
                             "induction_ablation_task": 2}
    assert "pruning" not in mean.reused and mean.reused["importance"] == 4 + 2 * 5
    curve = PruneCurve.load(out / "results" / "pruning" / f"{TASK_A}-1shot-heads")
    assert curve.params["ablation"] == "mean"
    scan = mechicl.load_result(out / "results" / "scan").scores["prefix_matching"]
    plist = build_prompts(load_task(TASK_A), shots=1, seed=0)[6:14]
    mask = pruning_mask(model, head_order=prune_order(-scan.mean), head_percent=25,
                        ablation="mean", means=prompt_means(model, plist))
    direct = mechicl.evaluate(model, TASK_A, shots=1, prompts=plist, mask=mask)
    data = curve.data.set_index(["head_ranking", "head_percent"])
    assert data.loc[("prefix matching, highest first", 25.0), "accuracy"] == pytest.approx(
        direct.accuracy)
    zero = PruneCurve.load(report.out / "results" / "pruning" / f"{TASK_A}-1shot-heads").data
    zero = zero.set_index(["head_ranking", "head_percent"])
    point = ("prefix matching, highest first", 25.0)
    assert data.loc[point, "gold_logprob"] != pytest.approx(zero.loc[point, "gold_logprob"])
    md = (out / "report.md").read_text()
    assert "**mean ablation**" in md and "zero ablation of" not in md
    assert md.count("mean ablation: ") == 3  # pruning, FFN knock-out, the causal check
    assert "zero ablation of the head's output" in (report.out / "report.md").read_text()

    cmp = compare_reports({"zero": report.out, "mean": mean})
    for name in ("pruning", "causal"):
        table = cmp.tables[name]
        assert dict(zip(table.model, table.ablation, strict=True)) == {"zero": "zero", "mean": "mean"}, name
    assert all("(zero ablation)" in c.text and "(mean ablation)" in c.text
               for c in cmp.claims if c.section == "pruning")
    assert cmp.ablations == {"zero": "zero", "mean": "mean"}
    assert "**The ablations differ" in cmp.markdown()
    same = compare_reports({"a": report.out, "b": report.out})
    assert "`a`: zero ablation; `b`: zero ablation." in same.markdown()
    assert "The ablations differ" not in same.markdown()
