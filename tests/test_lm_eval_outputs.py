"""Output folders nested by model (two models into one --out keep both), the old flat layout
still seeding the store, and evaluations written in lm-evaluation-harness's layout: a results
JSON per shot count (acc, acc_norm and lm-eval's standard errors) and per-sample JSONL."""

import json
import math
import shutil

import numpy as np
import pytest

import mechicl
from mechicl.analyses.evaluation import task_prompts
from mechicl.experiments.outputs import LM_EVAL_DIR, model_folder, run_analysis
from mechicl.experiments.store import ResultStore, read_index
from mechicl.inputs.tasks import task_from_file
from mechicl.interop.lm_eval import mean_stderr

pytestmark = pytest.mark.usefixtures("one_thread")

CHOICES = ["w1 w2 w3", "w4", "w50 w51"]


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("task") / "mini.jsonl"
    path.write_text("".join(json.dumps({"input": f"w{10 + i} w{40 + i % 7}", "choices": CHOICES,
                                        "gold": i % 3}) + "\n" for i in range(40)))
    return path


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    from mechicl.testing import tiny_hf_model

    hf_model, tokenizer = tiny_hf_model("gpt2")
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    hf_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


TEMPLATE = "{input} w7"


def evaluate_into(out, model, task_file, store, shots=(0, 2)):
    return run_analysis("accuracy", model=str(model), tasks=[str(task_file)], shots=list(shots),
                        options={"n": 9}, out=out, store=store, progress=False,
                        template=TEMPLATE)


def test_model_folder_names():
    assert model_folder("smollm2-135m") == "smollm2-135m"
    assert model_folder("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB__SmolLM2-135M"
    assert model_folder("../a:b|c") == "__a__b__c"
    assert model_folder("x\ny") == "x_y"
    assert model_folder(".") and not model_folder(".").startswith(".")
    long_a, long_b = "m/" + "a" * 300, "m/" + "a" * 299 + "b"
    assert len(model_folder(long_a)) <= 120 and model_folder(long_a) != model_folder(long_b)
    with pytest.raises(ValueError, match="model spec '' is empty"):
        model_folder("")


def test_two_models_into_one_out_keep_both(tiny_folder, gpt2_folder, task_file, tmp_path):
    out, store = tmp_path / "out", tmp_path / "store"
    evaluate_into(out, tiny_folder, task_file, store)
    first = out / model_folder(str(tiny_folder))
    before = {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()}
    assert (first / "results" / "mini-0shot" / "result.json").is_file()
    evaluate_into(out, gpt2_folder, task_file, store)
    second = out / model_folder(str(gpt2_folder))
    after = {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()}
    assert after == before  # the first model's outputs are untouched
    assert not (out / "results").exists()
    for folder, spec in ((first, tiny_folder), (second, gpt2_folder)):
        index = read_index(folder / "results")
        assert sorted(index) == ["mini-0shot", "mini-2shot"]
        assert {e["job"]["model"] for e in index.values()} == {str(spec)}
        assert (folder / "eval-summary.csv").is_file()
    a = mechicl.load_result(first / "results" / "mini-2shot")
    b = mechicl.load_result(second / "results" / "mini-2shot")
    assert a.model["weights_sha256"] != b.model["weights_sha256"]


def test_lm_eval_files(tiny_folder, task_file, tmp_path):
    out = tmp_path / "out"
    evaluate_into(out, tiny_folder, task_file, tmp_path / "store")
    folder = out / model_folder(str(tiny_folder))
    lm_dir = folder / LM_EVAL_DIR
    assert sorted(p.name for p in lm_dir.iterdir()) == [
        "results_0shot.json", "results_2shot.json", "samples_mini_0shot.jsonl",
        "samples_mini_2shot.jsonl"]
    index = read_index(folder / "results")
    for shots in (0, 2):
        data = json.loads((lm_dir / f"results_{shots}shot.json").read_text())
        result = mechicl.load_result(folder / "results" / f"mini-{shots}shot")
        job = mechicl.Job.from_dict(index[f"mini-{shots}shot"]["job"])
        prompts = task_prompts(task_from_file(task_file, template=TEMPLATE), job)  # as the run read it
        # independent of the stored counts: the choices' strings, a loop per prompt
        acc, acc_norm = [], []
        for prompt, ll in zip(prompts, result.predictions["loglik"], strict=True):
            ll, gold = [float(x) for x in ll], prompt.gold
            acc.append(float(max(range(3), key=lambda c: (ll[c], -c)) == gold))
            norm = [ll[c] / len(CHOICES[c]) for c in range(3)]
            acc_norm.append(float(max(range(3), key=lambda c: (norm[c], -c)) == gold))
        n = len(acc)
        entry = data["results"]["mini"]
        assert entry["sample_len"] == n == 9
        for name, values in (("acc", acc), ("acc_norm", acc_norm)):
            p = sum(values) / n
            assert entry[f"{name},none"] == pytest.approx(p)
            # lm-eval's stderr: sample standard deviation (n - 1) over sqrt(n)
            assert entry[f"{name}_stderr,none"] == pytest.approx(
                math.sqrt(p * (1 - p) / (n - 1)))
            assert entry[f"{name}_stderr,none"] == pytest.approx(
                float(np.std(values, ddof=1) / math.sqrt(n)))
        assert entry["acc,none"] == pytest.approx(result.accuracy_with("none"))
        assert entry["acc_norm,none"] == pytest.approx(result.accuracy_with("chars"))
        assert data["n-shot"] == {"mini": shots}
        assert data["n-samples"]["mini"] == {"original": len(task_from_file(task_file, template=TEMPLATE).pools()[1]),
                                            "effective": n}
        assert data["config"]["model"] == str(tiny_folder)
        assert data["config"]["model_sha"] == result.model["weights_sha256"]
        assert data["config"]["versions"]["mechicl"] == mechicl.__version__
        assert data["higher_is_better"]["mini"] == {"acc": True, "acc_norm": True}
        lines = (lm_dir / f"samples_mini_{shots}shot.jsonl").read_text().splitlines()
        samples = [json.loads(line) for line in lines]
        assert [s["doc_id"] for s in samples] == list(range(n))
        assert [s["prompt"] for s in samples] == [p.text for p in prompts]
        assert [s["doc"]["id"] for s in samples] == [p.id for p in prompts]
        assert [s["acc"] for s in samples] == acc and [s["acc_norm"] for s in samples] == acc_norm
        for s, ll in zip(samples, result.predictions["loglik"], strict=True):
            assert s["loglikelihoods"] == [float(x) for x in ll]
            assert [float(r[0]) for r in s["filtered_resps"]] == s["loglikelihoods"]
            assert s["arguments"]["gen_args_1"] == {"arg_0": s["prompt"], "arg_1": " w4"}
            assert s["target"] == str(s["doc"]["gold"]) and s["filter"] == "none"


def test_results_of_an_earlier_run_stay_in_the_lm_eval_results(tiny_folder, task_file, tmp_path):
    out, store = tmp_path / "out", tmp_path / "store"
    evaluate_into(out, tiny_folder, task_file, store, shots=(0,))
    other = tmp_path / "other.jsonl"
    other.write_text(task_file.read_text())
    evaluate_into(out, tiny_folder, other, store, shots=(0,))
    data = json.loads((out / model_folder(str(tiny_folder)) / LM_EVAL_DIR /
                       "results_0shot.json").read_text())
    assert sorted(data["results"]) == ["mini", "other"]


def test_the_flat_layout_still_seeds_the_store(tiny_folder, task_file, tmp_path):
    """Results in OUT/results/index.json (mechicl before the nesting) are reused."""
    out = tmp_path / "out"
    evaluate_into(out, tiny_folder, task_file, tmp_path / "store-a", shots=(0,))
    flat = tmp_path / "flat"
    shutil.copytree(out / model_folder(str(tiny_folder)) / "results", flat / "results")
    key = read_index(flat / "results")["mini-0shot"]["key"]
    store_b = ResultStore(tmp_path / "store-b")
    evaluate_into(flat, tiny_folder, task_file, store_b, shots=(0,))
    manifest = store_b.get(key).manifest
    assert str(flat / "results" / "mini-0shot") in json.dumps(manifest)
    assert (flat / model_folder(str(tiny_folder)) / "results" / "mini-0shot").is_dir()


def test_mean_stderr_is_lm_evals():
    import lm_eval.api.metrics as metrics  # the test extra installs lm-eval
    rng = np.random.default_rng(0)
    for n in (2, 3, 10, 57):
        values = [float(x) for x in rng.integers(0, 2, n)]
        assert mean_stderr(values) == pytest.approx(metrics.mean_stderr(values), rel=1e-12)
    assert mean_stderr([1.0]) is None
