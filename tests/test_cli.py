"""The command line, end to end on a tiny model saved as a local Hugging Face folder."""

import json

import pytest

import mechicl
from mechicl.cli import build_parser, main, parse_int_list, parse_tasks
from mechicl.experiments.outputs import model_folder


def nested(out):
    """The one model folder a command wrote into ``out`` (outputs are nested by model)."""
    folders = [p for p in out.iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


def test_load_model_from_folder_matches_the_original(tiny_folder):
    import torch

    import mechicl
    from mechicl.testing import tiny_model

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
    assert nested(out).name == model_folder(str(tiny_folder))  # OUT/<model>/, as lm-eval
    assert (nested(out) / "results" / "mini-0shot" / "result.json").is_file()
    assert (nested(out) / "results" / "mini-2shot" / "predictions.parquet").is_file()
    table = (nested(out) / "eval-summary.md").read_text()
    assert table.startswith("| task | shots | accuracy |") and table.count("| mini |") == 2
    assert "accuracy" in capsys.readouterr().out


def test_eval_cli_skips_bad_task_rows_only_when_asked(tiny_folder, tmp_path, capsys):
    rows = [{"input": f"w{10 + i}", "choices": ["w1", "w2"], "gold": i % 2} for i in range(20)]
    rows[3]["choices"] = ["w1", "w1"]
    task_file = tmp_path / "warts.jsonl"
    task_file.write_text("\n".join(json.dumps(r) for r in rows))
    args = ["eval", "--model", str(tiny_folder), "--task", str(task_file), "--shots", "0",
            "--n", "5", "--no-progress"]
    with pytest.raises(SystemExit, match=r"warts.jsonl:4: choices repeat"):
        main([*args, "--out", str(tmp_path / "strict")])
    assert main([*args, "--task-errors", "skip", "--out", str(tmp_path / "skip")]) == 0
    result = mechicl.load_result(nested(tmp_path / "skip") / "results" / "warts-0shot")
    assert result.params["task_provenance"]["skipped"] == [
        {"line": 4, "reason": "choices repeat ['w1']: ('w1', 'w1')"}]
    # the file was a task for those runs only: the process's registry is as before
    assert str(task_file) not in mechicl.inputs.TASKS
    capsys.readouterr()


def test_scan_cli_writes_results_and_figures(tiny_folder, tmp_path, capsys):
    import mechicl

    out = tmp_path / "scan"
    assert main(["scan", "--model", str(tiny_folder), "--scores", "prefix,ov", "--seeds", "2",
                 "--no-progress", "--formats", "png,html", "--out", str(out)]) == 0
    name = tiny_folder.name
    summary = (nested(out) / "scan-summary.csv").read_text().splitlines()
    assert summary[0].startswith("score,top heads") and len(summary) == 3
    assert (nested(out) / f"{name}-prefix_matching.png").stat().st_size > 1000
    assert (nested(out) / f"{name}-ov_eigen.html").is_file() and (nested(out) / "plotly.min.js").is_file()
    scan = mechicl.load_result(nested(out) / "results" / f"{name}-scan")
    assert set(scan.scores) == {"prefix_matching", "ov_eigen"}
    assert (nested(out) / "results" / f"{name}-scan" / "prefix_matching" / "tensors.safetensors").is_file()
    assert "| prefix_matching |" in capsys.readouterr().out


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
    from mechicl.results import HeadScores, LayerScores

    out = tmp_path / "imp"
    assert main(["importance", "--model", str(tiny_folder), "--task", str(copy_task_file),
                 "--shots", "0,1", "--method", "bansal,ablation", "--n", "6",
                 "--no-progress", "--formats", "png", "--out", str(out)]) == 0
    scores = HeadScores.load(nested(out) / "results" / "copy-1shot-ablation")
    assert scores.mean.shape == (2, 4) and scores.params["method"] == "ablation"
    assert (nested(out) / "copy-0shot-bansal.png").stat().st_size > 1000
    table = (nested(out) / "importance-summary.csv").read_text()
    assert "spearman" in table.splitlines()[0] and table.count("ablation") >= 2
    assert main(["ffn-importance", "--model", str(tiny_folder), "--task", str(copy_task_file),
                 "--shots", "1", "--n", "6", "--no-progress", "--formats", "png", "--out",
                 str(out)]) == 0
    assert (nested(out) / "copy-1shot-ffn.png").is_file()
    assert LayerScores.load(nested(out) / "results" / "copy-1shot-ffn").params["n"] == 6


def test_prune_cli_writes_curves(tiny_folder, copy_task_file, tmp_path, capsys):
    from mechicl.analyses.pruning import PruneCurve
    from mechicl.experiments.store import ResultStore

    out, store = tmp_path / "prune", tmp_path / "store"
    assert main(["prune", "--model", str(tiny_folder), "--task", str(copy_task_file),
                 "--shots", "1", "--rankings", "same,prefix", "--ffn-rankings", "same",
                 "--percents", "0,50", "--ffn-percents", "0,50", "--draws", "2", "--eval-n", "8",
                 "--n", "6", "--scan-seeds", "2", "--no-progress", "--formats", "png",
                 "--store", str(store), "--out", str(out)]) == 0
    curve = PruneCurve.load(nested(out) / "results" / "copy-1shot-prune")
    rankings = set(curve.data.head_ranking)
    assert rankings == {"same task (" + str(copy_task_file) + ")",
                        "prefix matching, lowest first", "random"}
    assert set(curve.data.head_percent) == {0.0, 50.0} and set(curve.data.ffn_percent) == {0.0, 50.0}
    assert curve.params["prompt_ids"] and curve.data.n.iloc[0] == 8
    assert (nested(out) / "copy-1shot-prune-heads.png").is_file() and (nested(out) / "copy-1shot-prune-ffn.png").is_file()
    # the rankings are results of their own in the store: head and FFN importance, the scan
    stored = {e.manifest["job"]["analysis"] for e in ResultStore(store).entries()}
    assert stored == {"pruning", "importance", "ffn_importance", "scan"}
    assert "removable" in capsys.readouterr().out  # the summary: the share removable per ranking
    # mean ablation: the means of the evaluated prompts (this failed before: no means given)
    assert main(["prune", "--model", str(tiny_folder), "--task", str(copy_task_file),
                 "--shots", "1", "--rankings", "same", "--ffn-rankings", "same", "--percents",
                 "0,50", "--ffn-percents", "0,50", "--draws", "1", "--eval-n", "8", "--n", "6",
                 "--ablation", "mean", "--no-progress", "--formats", "png", "--store",
                 str(store), "--out", str(tmp_path / "mean")]) == 0
    mean = PruneCurve.load(nested(tmp_path / "mean") / "results" / "copy-1shot-prune")
    assert mean.params["ablation"] == "mean"
    def pruned(c):  # the same-task ranking, half of the heads and FFNs removed
        d = c.data
        return d[d.head_ranking.str.startswith("same") & d.ffn_ranking.str.startswith("same")
                 & (d.head_percent == 50)
                 & (d.ffn_percent == 50)].gold_logprob.item()

    assert pruned(mean) != pruned(curve)  # the same heads and FFNs, mean- vs zero-ablated
    with pytest.raises(SystemExit, match="unknown head ranking 'nope'"):
        main(["prune", "--model", str(tiny_folder), "--task", str(copy_task_file), "--rankings",
              "nope", "--n", "4", "--eval-n", "4", "--out", str(tmp_path / "x")])


def test_patch_cli_writes_results_heatmaps_and_agreement(tiny_folder, tmp_path, capsys):
    import torch

    import mechicl
    from mechicl.analyses.patching import PatchResult

    out = tmp_path / "patch"
    assert main(["patch", "--model", str(tiny_folder), "--prompts", "repeated_tokens", "--n", "3",
                 "--target", "head_out,resid_pre", "--by-pos", "--metric",
                 "logit_diff_normalized", "--formats",
                 "html", "--no-progress", "--out", str(out)]) == 0
    summary = (nested(out) / "patch-summary.csv").read_text().splitlines()
    assert len(summary) == 3 and "layer x pos x head" in summary[1]
    stem = f"{tiny_folder.name}-repeated_tokens-head_out-by-pos"
    assert (nested(out) / f"{stem}-sum-over-pos.html").is_file()
    assert (nested(out) / f"{stem}-sum-over-head.html").is_file()
    saved = PatchResult.load(nested(out) / "results" / stem)
    # the saved result is what the library computes on the same pairs
    model = mechicl.load_model(tiny_folder)
    pairs = mechicl.make_pairs("repeated_tokens", model, n=3, seed=0)
    again = mechicl.patch(model, pairs, metric="logit_diff_normalized", by_pos=True)
    torch.testing.assert_close(saved.values, again.values)
    assert "head_out" in capsys.readouterr().out
    # attribution patching: its own command, compared with the exact result of the same options
    assert main(["attribution", "--model", str(tiny_folder), "--prompts", "repeated_tokens",
                 "--n", "3", "--target", "resid_pre", "--by-pos", "--formats", "html",
                 "--no-progress", "--out", str(out)]) == 0
    estimate = PatchResult.load(nested(out) / "results" / f"{tiny_folder.name}-repeated_tokens-"
                                "resid_pre-by-pos-attribution")
    assert estimate.method == "attribution"
    assert -1.0 <= estimate.params["agreement"]["pearson"] <= 1.0


def test_patch_cli_rejects_unknown_names(tmp_path, capsys):
    for bad in (["patch", "--out", "o", "--target", "nope"],
                ["patch", "--out", "o", "--direction", "sideways"],
                ["patch", "--out", "o", "--prompts", "nope"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(bad)
    assert "argument --prompts: 'nope' is not allowed; choose one of" in capsys.readouterr().err


def test_path_patch_cli(tiny_folder, tmp_path):
    import torch

    import mechicl
    from mechicl.analyses.patching import PatchResult

    out = tmp_path / "path"
    assert main(["path-patch", "--model", str(tiny_folder), "--prompts", "repeated_tokens", "--n",
                 "2", "--receiver-input", "v", "--receivers", "1.0,1.3", "--metric",
                 "logit_diff_normalized", "--formats", "html",
                 "--no-progress", "--out", str(out)]) == 0
    stem = f"{tiny_folder.name}-repeated_tokens-path-v-to-1.0_1.3"
    saved = PatchResult.load(nested(out) / "results" / stem)
    assert saved.method == "path" and saved.direction == "noising"
    assert torch.isnan(saved.values[1:]).all() and not torch.isnan(saved.values[0]).any()
    model = mechicl.load_model(tiny_folder)
    pairs = mechicl.make_pairs("repeated_tokens", model, n=2, seed=0)
    again = mechicl.path_patch(model, pairs, metric="logit_diff_normalized",
                               receivers=[(1, 0), (1, 3)], receiver_input="v")
    torch.testing.assert_close(saved.values, again.values, equal_nan=True)
    with pytest.raises(SystemExit, match=r"'3' is not a head: write layer.head"):
        main(["path-patch", "--model", str(tiny_folder), "--receivers", "3", "--out",
              str(tmp_path / "x")])


def test_load_options_reach_the_model(tiny_folder, tmp_path, capsys):
    """--dtype / --device-map / --max-memory go to load_model; bad values name themselves."""
    out = tmp_path / "scan"
    assert main(["scan", "--model", str(tiny_folder), "--scores", "prefix", "--seeds", "2",
                 "--dtype", "bf16", "--device-map", "cpu", "--no-progress", "--formats", "html",
                 "--out", str(out)]) == 0
    result = json.loads((nested(out) / "results" / f"{tiny_folder.name}-scan" / "prefix_matching"
                         / "result.json").read_text())
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
    args = build_parser().parse_args(["scan", "--out", "o", "--linear-kernel", "plain"])
    assert args.linear_kernel == "plain"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["scan", "--out", "o", "--linear-kernel", "fast"])
    assert "invalid choice: 'fast'" in capsys.readouterr().err


def test_memory_budget_chooses_batch_tokens(tiny_folder, copy_task_file, tmp_path, monkeypatch,
                                            capsys):
    """--memory-budget gives each job the batch size whose estimate fits the budget for the
    longest row it feeds the model (recorded in the store's manifests)."""
    import mechicl
    from mechicl._batching import CPU_CHOICES_PASS_TOKENS, CPU_COPIES_PASS_TOKENS, CPU_PASS_TOKENS
    from mechicl.analyses.evaluation import longest_prompt
    from mechicl.analyses.induction import longest_scan_sequence
    from mechicl.analyses.pruning import split_prompts
    from mechicl.experiments.memory import batch_tokens_for_budget, estimate_memory
    from mechicl.experiments.store import ResultStore
    from mechicl.inputs.tasks import build_prompts, task_from_file

    def sizes(store, analysis):
        return sorted((e.manifest["job"]["shots"] or 0, e.manifest["batch_tokens"])
                      for e in ResultStore(store).entries()
                      if e.manifest["job"]["analysis"] == analysis)

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
                 "--store", str(tmp_path / "s1"), "--out", str(out)]) == 0
    assert sizes(tmp_path / "s1", "scan") == [(0, 3 * seq)]
    assert main(["scan", "--model", str(tiny_folder), "--scores", "prefix", "--seeds", "3",
                 "--no-progress", "--formats", "html", "--store", str(tmp_path / "s2"),
                 "--out", str(tmp_path / "scan2")]) == 0
    assert sizes(tmp_path / "s2", "scan") == [(0, 4096)]  # the default without a budget
    # the tokens each kind of pass held on this device: provenance beside the job's budget
    (scan,) = [e.manifest for e in ResultStore(tmp_path / "s2").entries()
               if e.manifest["job"]["analysis"] == "scan"]
    assert [scan[k] for k in ("pass_tokens", "choices_pass_tokens", "copies_pass_tokens")] == [
        CPU_PASS_TOKENS, CPU_CHOICES_PASS_TOKENS, CPU_COPIES_PASS_TOKENS]
    # what ran the linear layers, provenance: "auto" decides once per process, as for `model`
    assert scan["linear_kernel"] == model.linear_kernel

    # Importance: each task and shot count is sized for its own longest prompt.
    task = task_from_file(copy_task_file)
    seq = longest_prompt(model, build_prompts(task, shots=2, n=6))
    seq0 = longest_prompt(model, build_prompts(task, shots=0, n=6))
    assert seq > seq0
    budget = estimate_memory(model, batch_tokens=2 * seq, seq_len=seq,
                             analysis="importance").total
    assert main(["importance", "--model", str(tiny_folder), "--task", str(copy_task_file),
                 "--shots", "0,2", "--n", "6", "--memory-budget", f"{budget}B",
                 "--store", str(tmp_path / "s3"), "--no-progress", "--formats", "html",
                 "--out", str(tmp_path / "imp")]) == 0
    assert sizes(tmp_path / "s3", "importance") == [
        (0, batch_tokens_for_budget(model, budget, seq_len=seq0, analysis="importance")),
        (2, 2 * seq)]

    # Prune: the ranking fits the budget as importance on its prompts, the curve as scoring
    # on its evaluation prompts.
    rank, evaluation = split_prompts(task, shots=1, n_rank=6, n_eval=8)
    seq = longest_prompt(model, rank)
    budget = estimate_memory(model, batch_tokens=2 * seq, seq_len=seq, analysis="importance").total
    assert main(["prune", "--model", str(tiny_folder), "--task", str(copy_task_file),
                 "--shots", "1", "--rankings", "same", "--percents", "0,50", "--draws", "1",
                 "--eval-n", "8", "--n", "6", "--memory-budget", str(budget),
                 "--store", str(tmp_path / "s4"), "--no-progress", "--formats", "html",
                 "--out", str(tmp_path / "prune")]) == 0
    assert sizes(tmp_path / "s4", "importance") == [(1, 2 * seq)]
    assert sizes(tmp_path / "s4", "pruning") == [(1, batch_tokens_for_budget(
        model, budget, seq_len=longest_prompt(model, evaluation), analysis="choices"))]

    # Report: the budget reaches build_report (which sizes every job: test_report.py).
    seen = []

    class Captured(Exception):
        pass

    def capture(model, out, config, **kw):
        seen.append(kw["memory_budget"])
        raise Captured

    monkeypatch.setattr("mechicl.cli.build_report", capture)
    with pytest.raises(Captured):
        main(["report", "--model", str(tiny_folder), "--tasks", "antonyms", "--shots", "0",
              "--n", "4", "--eval-n", "4", "--scan-seeds", "2", "--scan-length", "8",
              "--prune-tasks", "antonyms", "--prune-shots", "0", "--memory-budget", "64MB",
              "--no-progress", "--out", str(tmp_path / "report")])
    assert seen == ["64MB"]

    # Bad budgets name themselves; a fixed batch size and a budget exclude each other.
    with pytest.raises(SystemExit, match=r"mechicl scan: budget .* is too small: scan "
                                         r"on one sequence of 109 tokens needs"):
        main(["scan", "--model", str(tiny_folder), "--seeds", "2", "--memory-budget", "1KB",
              "--store", str(tmp_path / "s5"), "--out", str(out)])
    for bad in (["--memory-budget", "lots"], ["--memory-budget", "1GB", "--batch-tokens", "64"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["scan", "--out", "o", *bad])
    err = capsys.readouterr().err
    assert "memory size 'lots' is not a number" in err
    assert "not allowed with argument" in err
