"""The command line, end to end on a tiny model saved as a local Hugging Face folder."""

import json

import pytest

from mechicl.cli import build_parser, main, parse_int_list, parse_tasks


def test_load_model_from_folder_matches_the_original(tiny_folder):
    import torch

    import mechicl
    from mechicl.toy_models import tiny_model

    loaded = mechicl.load_model(tiny_folder)
    original = mechicl.as_hooked_model(tiny_model("llama"))
    assert loaded.name == tiny_folder.name and loaded.n_kv_heads == original.n_kv_heads
    assert loaded.weights_hash == original.weights_hash
    tokens = loaded.to_tokens("w1 w2 w3")
    assert tokens[0, 0].item() == loaded.bos_token_id
    torch.testing.assert_close(loaded(tokens), original(tokens))


def test_parsers():
    assert parse_int_list("0,1,5") == [0, 1, 5]
    assert "sentiment" in parse_tasks("all") and parse_tasks("boolq,x.jsonl") == ["boolq", "x.jsonl"]
    for bad in (["eval", "--out", "o", "--task", "nope"], ["eval", "--out", "o", "--task",
                "boolq", "--shots", "1,-2"], ["eval", "--out", "o", "--task", "boolq", "--shots",
                "a"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(bad)


def test_eval_cli_writes_results(tiny_folder, tmp_path, capsys):
    task_file = tmp_path / "mini.jsonl"
    task_file.write_text("\n".join(json.dumps({"input": f"w{10 + i}", "choices": ["w1", "w2"],
                                               "gold": i % 2}) for i in range(20)))
    out = tmp_path / "out"
    assert main(["eval", "--model", str(tiny_folder), "--task", str(task_file), "--shots", "0,2",
                 "--n", "5", "--template", "{input} w7", "--no-progress", "--out", str(out)]) == 0
    assert (out / "results" / "mini-0shot" / "result.json").is_file()
    assert (out / "results" / "mini-2shot" / "predictions.parquet").is_file()
    table = (out / "eval-summary.md").read_text()
    assert table.startswith("| task | shots | accuracy |") and table.count("| mini |") == 2
    assert "accuracy" in capsys.readouterr().out


def test_scan_cli_writes_results_and_figures(tiny_folder, tmp_path):
    out = tmp_path / "scan"
    assert main(["scan", "--model", str(tiny_folder), "--scores", "prefix,ov", "--seeds", "2",
                 "--no-progress", "--formats", "png,html", "--out", str(out)]) == 0
    name = tiny_folder.name
    summary = json.loads((out / f"{name}-summary.json").read_text())
    assert set(summary["scores"]) == {"prefix_matching", "ov_eigen"}
    assert (out / f"{name}-prefix_matching.png").stat().st_size > 1000
    assert (out / f"{name}-ov_eigen.html").is_file() and (out / "plotly.min.js").is_file()
    assert (out / "results" / f"{name}-prefix_matching" / "tensors.safetensors").is_file()


@pytest.fixture()
def copy_task_file(tmp_path):
    """A copy task in the toy vocabulary: the answer is the token after the earlier occurrence."""
    import random

    rng = random.Random(0)
    lines = []
    for _ in range(40):
        words = [f"w{i}" for i in rng.sample(range(10, 90), 6)]
        lines.append(json.dumps({"input": " ".join(words + words[:3]),
                                 "choices": [words[3], words[5]], "gold": 0}))
    path = tmp_path / "copy.jsonl"
    path.write_text("\n".join(lines))
    return path


def test_importance_cli_writes_results_heatmaps_and_correlations(tiny_folder, copy_task_file,
                                                                  tmp_path):
    from mechicl.results import HeadScores

    out = tmp_path / "imp"
    assert main(["importance", "--model", str(tiny_folder), "--task", str(copy_task_file),
                 "--shots", "0,1", "--method", "bansal,ablation", "--n", "6", "--ffn",
                 "--no-progress", "--formats", "png", "--out", str(out)]) == 0
    scores = HeadScores.load(out / "results" / "copy-1shot-ablation")
    assert scores.mean.shape == (2, 4) and scores.params["method"] == "ablation"
    assert (out / "copy-0shot-bansal.png").stat().st_size > 1000
    assert (out / "copy-1shot-ffn.png").is_file()
    table = (out / "importance-summary.csv").read_text()
    assert "spearman" in table.splitlines()[0] and table.count("ablation") >= 2


def test_prune_cli_writes_curves(tiny_folder, copy_task_file, tmp_path, capsys):
    from mechicl.pruning import PruneCurve

    out = tmp_path / "prune"
    assert main(["prune", "--model", str(tiny_folder), "--task", str(copy_task_file),
                 "--shots", "1", "--rankings", "same,prefix", "--ffn-rankings", "same",
                 "--percents", "0,50", "--ffn-percents", "0,50", "--draws", "2", "--n", "8",
                 "--importance-n", "6", "--scan-seeds", "2", "--no-progress", "--formats", "png",
                 "--out", str(out)]) == 0
    curve = PruneCurve.load(out / "results" / "copy-1shot-prune")
    rankings = set(curve.data.head_ranking)
    assert rankings == {"same task (" + str(copy_task_file) + ")", "prefix matching", "random"}
    assert set(curve.data.head_percent) == {0.0, 50.0} and set(curve.data.ffn_percent) == {0.0, 50.0}
    assert curve.params["prompt_ids"] and curve.data.n.iloc[0] == 8
    assert (out / "copy-1shot-prune-heads.png").is_file() and (out / "copy-1shot-prune-ffn.png").is_file()
    assert (out / "rankings" / "copy-1shot-bansal" / "meta.json").is_file()
    assert "keeps accuracy" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown heads ranking 'nope'"):
        main(["prune", "--model", str(tiny_folder), "--task", str(copy_task_file), "--rankings",
              "nope", "--n", "4", "--importance-n", "4", "--out", str(tmp_path / "x")])


def test_patch_cli_writes_results_heatmaps_and_agreement(tiny_folder, tmp_path, capsys):
    import torch

    import mechicl
    from mechicl.patching import PatchResult

    out = tmp_path / "patch"
    assert main(["patch", "--model", str(tiny_folder), "--prompts", "repeated_tokens", "--n", "3",
                 "--target", "head_out,resid_pre", "--by-pos", "--attribution", "--formats",
                 "html", "--no-progress", "--out", str(out)]) == 0
    summary = json.loads((out / "patch-summary.json").read_text())
    assert summary["n_pairs"] == 3 and set(summary["results"]) == {"head_out", "resid_pre"}
    assert summary["results"]["head_out"]["axes"] == ["layer", "pos", "head"]
    assert -1.0 <= summary["results"]["resid_pre"]["agreement"]["pearson"] <= 1.0
    stem = f"{tiny_folder.name}-repeated_tokens-head_out-by-pos"
    assert (out / f"{stem}-sum-over-pos.html").is_file()
    assert (out / f"{stem}-sum-over-head.html").is_file()
    saved = PatchResult.load(out / "results" / stem)
    # the saved result is what the library computes on the same pairs
    model = mechicl.load_model(tiny_folder)
    pairs = mechicl.make_pairs("repeated_tokens", model, n=3, seed=0)
    again = mechicl.patch(model, pairs, metric="logit_diff_normalized", by_pos=True)
    torch.testing.assert_close(saved.values, again.values)
    assert "head_out" in capsys.readouterr().out


def test_patch_cli_rejects_unknown_names(tmp_path):
    for bad in (["patch", "--out", "o", "--target", "nope"],
                ["patch", "--out", "o", "--direction", "sideways"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(bad)
    with pytest.raises(SystemExit, match="unknown --prompts"):
        main(["patch", "--model", "smollm2-135m", "--prompts", "nope", "--out", str(tmp_path)])


def test_patch_cli_path_target(tiny_folder, tmp_path):
    import torch

    import mechicl
    from mechicl.patching import PatchResult

    out = tmp_path / "path"
    assert main(["patch", "--model", str(tiny_folder), "--prompts", "repeated_tokens", "--n", "2",
                 "--target", "path:v", "--receivers", "1.0,1.3", "--formats", "html",
                 "--no-progress", "--out", str(out)]) == 0
    stem = f"{tiny_folder.name}-repeated_tokens-path-v-to-1.0_1.3"
    saved = PatchResult.load(out / "results" / stem)
    assert saved.method == "path" and saved.direction == "noising"
    assert torch.isnan(saved.values[1:]).all() and not torch.isnan(saved.values[0]).any()
    model = mechicl.load_model(tiny_folder)
    pairs = mechicl.make_pairs("repeated_tokens", model, n=2, seed=0)
    again = mechicl.path_patch(model, pairs, metric="logit_diff_normalized",
                               receivers=[(1, 0), (1, 3)], receiver_input="v")
    torch.testing.assert_close(saved.values, again.values, equal_nan=True)
    with pytest.raises(SystemExit, match="needs --receivers"):
        main(["patch", "--model", str(tiny_folder), "--prompts", "repeated_tokens", "--n", "2",
              "--target", "path:q", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["patch", "--out", "o", "--receivers", "3"])


def test_load_options_reach_the_model(tiny_folder, tmp_path, capsys):
    """--dtype / --device-map / --max-memory go to load_model; bad values name themselves."""
    out = tmp_path / "scan"
    assert main(["scan", "--model", str(tiny_folder), "--scores", "prefix", "--seeds", "2",
                 "--dtype", "bf16", "--device-map", "cpu", "--no-progress", "--formats", "html",
                 "--out", str(out)]) == 0
    result = json.loads((out / "results" / f"{tiny_folder.name}-prefix_matching"
                         / "meta.json").read_text())
    assert result["model"]["dtype"] == "bfloat16"
    with pytest.raises(SystemExit, match=r"mechicl scan: max_memory only applies when the "
                                         "model is split"):
        main(["scan", "--model", str(tiny_folder), "--max-memory", "cpu=1GiB",
              "--out", str(out)])
    with pytest.raises(SystemExit, match=r"device_map='sideways' is neither a strategy"):
        main(["eval", "--model", str(tiny_folder), "--task", "boolq", "--device-map",
              "sideways", "--out", str(out)])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["scan", "--out", "o", "--max-memory", "cpu:1GiB"])
    assert "'cpu:1GiB' in --max-memory is not DEVICE=SIZE" in capsys.readouterr().err


def test_memory_budget_chooses_batch_tokens(tiny_folder, copy_task_file, tmp_path, monkeypatch,
                                            capsys):
    """--memory-budget gives the analyses the batch size whose estimate fits the budget."""
    import mechicl
    from mechicl.memory import estimate_memory, longest_prompt, longest_scan_sequence
    from mechicl.tasks import build_prompts, task_from_file

    model = mechicl.load_model(tiny_folder)
    # Scan: a budget that holds exactly three of the longest sequences (3 seeds: L = 29).
    seq = longest_scan_sequence(3)
    assert seq == 4 * 29 + 1
    budget = estimate_memory(model, batch_tokens=3 * seq, seq_len=seq, analysis="scan").total
    assert estimate_memory(model, batch_tokens=4 * seq, seq_len=seq,
                           analysis="scan").total > budget
    out = tmp_path / "scan"
    assert main(["scan", "--model", str(tiny_folder), "--scores", "prefix", "--seeds", "3",
                 "--memory-budget", str(budget), "--no-progress", "--formats", "html",
                 "--out", str(out)]) == 0
    summary = json.loads((out / f"{tiny_folder.name}-summary.json").read_text())
    assert summary["batch_tokens"] == 3 * seq
    assert main(["scan", "--model", str(tiny_folder), "--scores", "prefix", "--seeds", "3",
                 "--no-progress", "--formats", "html", "--out", str(out)]) == 0
    assert json.loads((out / f"{tiny_folder.name}-summary.json").read_text()
                      )["batch_tokens"] == 4096  # the default without a budget

    # Importance: the longest prompt over every task and shot count sets the sequence length.
    task = task_from_file(copy_task_file)
    seq = longest_prompt(model, [p for k in (0, 2) for p in build_prompts(task, shots=k, n=6)])
    assert seq > longest_prompt(model, build_prompts(task, shots=0, n=6))
    budget = estimate_memory(model, batch_tokens=2 * seq, seq_len=seq,
                             analysis="importance").total
    seen = []
    real = mechicl.head_importance
    monkeypatch.setattr(mechicl, "head_importance",
                        lambda *a, **kw: seen.append(kw["batch_tokens"]) or real(*a, **kw))
    assert main(["importance", "--model", str(tiny_folder), "--task", str(copy_task_file),
                 "--shots", "0,2", "--n", "6", "--memory-budget", f"{budget}B",
                 "--no-progress", "--formats", "html", "--out", str(tmp_path / "imp")]) == 0
    assert seen == [2 * seq, 2 * seq]

    # Prune: the rankings fit the budget as importance on their prompts, the curve as scoring
    # on its evaluation prompts.
    from mechicl.memory import batch_tokens_for_budget
    from mechicl.pruning import split_prompts

    rank, evaluation = split_prompts(task, shots=1, n_rank=6, n_eval=8)
    seq = longest_prompt(model, rank)
    budget = estimate_memory(model, batch_tokens=2 * seq, seq_len=seq, analysis="importance").total
    seen.clear()
    curves = []
    real_curve = mechicl.prune_curve
    monkeypatch.setattr(mechicl, "prune_curve",
                        lambda *a, **kw: curves.append(kw["batch_tokens"]) or real_curve(*a, **kw))
    assert main(["prune", "--model", str(tiny_folder), "--task", str(copy_task_file),
                 "--shots", "1", "--rankings", "same", "--percents", "0,50", "--draws", "1",
                 "--n", "8", "--importance-n", "6", "--memory-budget", str(budget),
                 "--no-progress", "--formats", "html", "--out", str(tmp_path / "prune")]) == 0
    assert seen == [2 * seq]
    assert curves == [batch_tokens_for_budget(model, budget, seq_len=longest_prompt(
        model, evaluation), analysis="choices")]

    # Report: the configuration report.fit_memory_budget gives (tested in test_report.py).
    from mechicl.report import ReportConfig, fit_memory_budget

    class Captured(Exception):
        pass

    configs = []

    def capture(model, out, config, **kw):
        configs.append(config)
        raise Captured

    monkeypatch.setattr("mechicl.report.build_report", capture)
    with pytest.raises(Captured):
        main(["report", "--model", str(tiny_folder), "--tasks", "antonyms", "--shots", "0",
              "--n", "4", "--eval-n", "4", "--scan-seeds", "2", "--scan-length", "8",
              "--prune-tasks", "antonyms", "--prune-shots", "0", "--memory-budget", "64MB",
              "--no-progress", "--out", str(tmp_path / "report")])
    (config,) = configs
    plain = ReportConfig(tasks=("antonyms",), shots=(0,), n=4, eval_n=4, scan_seeds=2,
                         scan_length=8, prune_tasks=("antonyms",), prune_shots=(0,))
    assert config == fit_memory_budget(model, plain, "64MB") != plain

    # Bad budgets name themselves; a fixed batch size and a budget exclude each other.
    with pytest.raises(SystemExit, match=r"--memory-budget 1KB: budget .* is too small: scan "
                                         r"on one sequence of 109 tokens needs"):
        main(["scan", "--model", str(tiny_folder), "--seeds", "2", "--memory-budget", "1KB",
              "--out", str(out)])
    for bad in (["--memory-budget", "lots"], ["--memory-budget", "1GB", "--batch-tokens", "64"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["scan", "--out", "o", *bad])
    err = capsys.readouterr().err
    assert "memory size 'lots' is not a number" in err
    assert "not allowed with argument" in err
