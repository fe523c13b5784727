"""ICL tasks: prompt construction, file/dataset/hub loaders, scoring against a one-at-a-time
reference, padding invariance, answer masks, bad input."""

import json

import pandas as pd
import pytest
import torch
from torch.testing import assert_close

import mechicl
from mechicl.analyses.evaluation import (
    answer_batch,
    choice_logprobs,
    evaluate,
    resolve_normalization,
)
from mechicl.inputs.tasks import (
    NORMALIZATIONS,
    TASKS,
    Example,
    Prompt,
    Task,
    TaskFileError,
    build_prompts,
    hub_task,
    load_task,
    task_from_dataset,
    task_from_file,
)
from mechicl.stats import wilson_interval


def toy_task(n: int = 40, multi_token: bool = False) -> Task:
    """A classification task over toy-tokenizer words (w0..w95)."""
    examples = []
    for i in range(n):
        label = i % 2
        choices = ("w1 w2", "w3") if multi_token else ("w1", "w3")
        examples.append(Example(id=f"t{i}", input=f"w{10 + i % 50} w{60 + i % 30}",
                                choices=choices, gold=label))
    return Task(name="toy", examples=tuple(examples), template="{input} w7")


def ref_loglik(model, prompt: Prompt, choice: int) -> float:
    """Plain reference: one prompt, one choice, no batching, full log-softmax."""
    text, cont = prompt.text, prompt.continuations[choice]
    stripped = text.rstrip()
    cont, text = text[len(stripped):] + cont, stripped
    tok = model.tokenizer
    ctx = [model.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    ids = tok(cont, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ctx + ids]))[0].double()
    logp = torch.log_softmax(logits, -1)
    return sum(float(logp[len(ctx) - 1 + t, ids[t]]) for t in range(len(ids)))


# ---- prompts --------------------------------------------------------------------------------

def test_demos_never_include_the_query_and_are_deterministic():
    task = toy_task()
    demo_pool, eval_pool = task.pools()
    assert not {e.id for e in demo_pool} & {e.id for e in eval_pool}
    prompts = build_prompts(task, shots=5, seed=3)
    assert len(prompts) == len(eval_pool)
    demo_ids = {e.id for e in demo_pool}
    for p in prompts:
        assert p.id not in p.demo_ids and set(p.demo_ids) <= demo_ids
        assert len(set(p.demo_ids)) == 5
    again = build_prompts(task, shots=5, seed=3)
    assert [p.text for p in again] == [p.text for p in prompts]
    other = build_prompts(task, shots=5, seed=4)
    assert [p.text for p in other] != [p.text for p in prompts]


def test_prompt_text_layout():
    task = toy_task().with_options(separator=" || ", instruction="w9")
    p = build_prompts(task, shots=2, n=1, seed=0)[0]
    demo_pool, _ = task.pools()
    demos = {e.id: e for e in demo_pool}
    parts = p.text.split(" || ")
    assert parts[0] == "w9" and len(parts) == 4
    for part, demo_id, label in zip(parts[1:3], p.demo_ids, p.labels, strict=True):
        assert part == task.render(demos[demo_id]) + " " + label
        assert label == demos[demo_id].answer
    assert p.continuations == (" w1", " w3")


def test_balanced_order_and_corruption():
    task = toy_task()
    for p in build_prompts(task, shots=6, balanced=True, order="by-label", n=10):
        assert list(p.labels) == ["w1"] * 3 + ["w3"] * 3
    flipped = build_prompts(task, shots=4, corruption="flipped", n=5)
    demos = {e.id: e for e in task.pools()[0]}
    for p in flipped:
        assert all(lab != demos[d].answer for d, lab in zip(p.demo_ids, p.labels, strict=True))
    unrelated = build_prompts(task, shots=4, corruption="unrelated",
                              unrelated_labels=("w40", "w41"), n=5)
    for p in unrelated:
        assert set(p.labels) <= {"w40", "w41"} and p.continuations == (" w40", " w41")
        assert all(("w40" if demos[d].answer == "w1" else "w41") == lab
                   for d, lab in zip(p.demo_ids, p.labels, strict=True))


def test_prompt_errors():
    task = toy_task()
    pool = len(task.pools()[0])
    with pytest.raises(ValueError, match=f"shots={pool + 1} is larger than the demonstration "
                                         f"pool of task 'toy' \\({pool} examples\\)"):
        build_prompts(task, shots=pool + 1)
    with pytest.raises((ValueError, TypeError), match="sideways"):
        build_prompts(task, order="sideways")
    non_classification = Task(name="open", template="{input}", examples=tuple(
        Example(id=str(i), input="w1", choices=(f"w{i}", f"w{i + 1}"), gold=0) for i in range(6)))
    with pytest.raises(ValueError, match="classification task"):
        build_prompts(non_classification, shots=2, balanced=True)


# ---- scoring ------------------------------------------------------------------------------

@pytest.mark.parametrize("multi_token", [False, True])
def test_scoring_equals_one_at_a_time_reference(tiny_llama, multi_token):
    prompts = build_prompts(toy_task(multi_token=multi_token), shots=3, n=6, seed=1)
    loglik, n_tok = choice_logprobs(tiny_llama, prompts, batch_tokens=64)
    want = torch.tensor([[ref_loglik(tiny_llama, p, c) for c in range(2)] for p in prompts],
                        dtype=torch.float64)
    assert_close(loglik, want, rtol=1e-5, atol=1e-5)
    assert n_tok[:, 0].tolist() == [2 if multi_token else 1] * 6
    # padding invariance: one big padded batch vs one row per forward pass
    for budget in (1, 100_000):
        again, _ = choice_logprobs(tiny_llama, prompts, batch_tokens=budget)
        assert_close(again, loglik, rtol=1e-5, atol=1e-5)


def test_answer_batch_loss_is_minus_gold_loglik(tiny_gpt2):
    prompts = build_prompts(toy_task(multi_token=True), shots=2, n=4)
    batch = answer_batch(tiny_gpt2, prompts)
    with torch.no_grad():
        logits = tiny_gpt2(batch.tokens, attention_mask=batch.attention_mask).double()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch.tokens[:, 1:, None])[..., 0]
    per_row = (logp * batch.answer_mask[:, 1:]).sum(-1)
    loglik, _ = choice_logprobs(tiny_gpt2, prompts)
    gold = torch.tensor([p.gold for p in prompts])
    assert_close(per_row, loglik[torch.arange(4), gold], rtol=1e-5, atol=1e-5)
    assert batch.answer_mask.sum(-1).tolist() == [2 if p.gold == 0 else 1 for p in prompts]


def test_evaluate_result_and_roundtrip(tiny_llama, tmp_path):
    result = evaluate(tiny_llama, toy_task(), shots=2, n=10, seed=0)
    df = result.predictions
    assert result.n == 10 == len(df) and result.chance == 0.5
    assert result.accuracy == df["correct"].mean()
    assert result.ci_low <= result.accuracy <= result.ci_high
    assert result.params["normalization"] == "none" == result.summary()["normalization"]
    assert df["n_chars"].tolist() == [[2, 2]] * 10  # " w1", " w3": the space not counted
    back = type(result).load(result.save(tmp_path / "r"))
    assert back.summary() == result.summary() and back.params == result.params
    lists = ["loglik", "n_tokens", "n_chars", "demo_ids"]
    assert back.predictions.drop(columns=lists).equals(df.drop(columns=lists))
    for column in lists:
        assert back.predictions[column].tolist() == df[column].tolist(), column
    for rule in NORMALIZATIONS:  # any rule's accuracy from the stored result
        assert back.accuracy_with(rule) == evaluate(
            tiny_llama, toy_task(), shots=2, n=10, seed=0, normalization=rule).accuracy
    normed = evaluate(tiny_llama, toy_task(multi_token=True), shots=0, n=10,
                      normalization="tokens")
    assert normed.params["normalization"] == "tokens" == normed.normalization


def test_evaluation_ranks_by_the_tasks_normalization_unless_overridden(tiny_llama):
    task = toy_task(multi_token=True)
    for rule in NORMALIZATIONS:
        own = evaluate(tiny_llama, task.with_options(normalization=rule), shots=1, n=8)
        given = evaluate(tiny_llama, task, shots=1, n=8, normalization=rule)
        assert own.params["normalization"] == given.params["normalization"] == rule
        assert own.accuracy == given.accuracy
        assert own.predictions["prediction"].tolist() == given.predictions["prediction"].tolist()
    chars = task.with_options(normalization="chars")
    summed = evaluate(tiny_llama, chars, shots=1, n=8, normalization="none")
    assert summed.params["normalization"] == "none"
    assert summed.accuracy == evaluate(tiny_llama, task, shots=1, n=8).accuracy


def test_bad_normalization_names_the_value_and_the_allowed_ones(tiny_llama, tmp_path):
    """A task's rule is checked when the task is made; evaluation's (with "task") too. Under
    the test suite's runtime type checker the annotation may answer first (a TypeError): both
    name the value."""
    with pytest.raises((ValueError, TypeError), match="bytes"):
        toy_task().with_options(normalization="bytes")
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"input": "w1", "choices": ["w2", "w3"], "gold": 0}) + "\n")
    assert task_from_file(path, normalization="chars").normalization == "chars"
    with pytest.raises((ValueError, TypeError), match="acc_norm"):
        task_from_file(path, normalization="acc_norm")
    with pytest.raises((ValueError, TypeError), match="mean"):
        evaluate(tiny_llama, toy_task(), shots=0, n=2, normalization="mean")
    with pytest.raises(ValueError, match=r"normalization='mean' is not allowed; choose one of "
                                         r"\['task', 'none', 'tokens', 'chars'\]"):
        resolve_normalization("mean", toy_task())
    assert resolve_normalization("task", None) == "none"  # prompts without a task: the sum
    assert resolve_normalization("task", "piqa") == "chars"


def test_evaluate_explicit_prompts_equals_built_prompts(tiny_llama):
    task = toy_task()
    built = evaluate(tiny_llama, task, shots=2, n=10, seed=3)
    prompts = build_prompts(task, shots=2, seed=3)
    explicit = evaluate(tiny_llama, task, shots=2, prompts=prompts[:10])
    assert explicit.summary() == built.summary()
    assert explicit.params["prompt_ids"] == built.params["prompt_ids"] == [p.id for p in
                                                                           prompts[:10]]
    pd.testing.assert_frame_equal(explicit.predictions, built.predictions)
    tail = evaluate(tiny_llama, task, shots=2, prompts=prompts[10:14])
    assert tail.n == 4 and tail.params["prompt_ids"] == [p.id for p in prompts[10:14]]
    with pytest.raises(ValueError, match="with prompts= give neither"):
        evaluate(tiny_llama, task, shots=2, prompts=prompts[:3], n=3)
    with pytest.raises(ValueError, match="prompts= is empty"):
        evaluate(tiny_llama, task, shots=2, prompts=[])
    stranger = Prompt(id="not-in-task", text="w1", continuations=(" w2", " w3"), gold=0)
    with pytest.raises(ValueError, match=r"\['not-in-task'\] are not examples of task"):
        evaluate(tiny_llama, task, shots=0, prompts=[stranger])


def test_wilson_interval_against_formula():
    low, high = wilson_interval(0, 20)
    assert low == 0.0 and 0.15 < high < 0.18
    assert wilson_interval(20, 20)[1] == 1.0


def test_bad_scoring_input(tiny_llama):
    empty = Prompt(id="x", text="w1 w2", continuations=("", " w3"), gold=1)
    with pytest.raises(ValueError, match="choice '' of prompt 'x' tokenises to nothing"):
        choice_logprobs(tiny_llama, [empty])
    long = Prompt(id="long", text=" ".join(["w5"] * 600), continuations=(" w1",), gold=0)
    with pytest.raises(ValueError, match=r"prompt 'long' needs 601 tokens, 89 more than the "
                                         r"model's context of 512"):
        choice_logprobs(tiny_llama, [long])


# ---- user tasks from files and datasets ----------------------------------------------------

def test_jsonl_and_csv_tasks(tmp_path, tiny_llama):
    jsonl = tmp_path / "mine.jsonl"
    rows = [{"input": f"w{i}", "choices": ["w1", "w2"], "gold": i % 2, "note": "x"}
            for i in range(12)]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = task_from_file(jsonl, template="{input} w9")
    assert task.name == "mine" and len(task) == 12 and task.examples[0].meta == {"note": "x"}
    csv_path = tmp_path / "mine.csv"
    csv_path.write_text("text,label\n" + "\n".join(f"w{i},{'w2' if i % 2 else 'w1'}"
                                                    for i in range(12)) + "\n")
    task = task_from_file(csv_path, input_fields=["text"], gold_field="label",
                          choices=["w1", "w2"], template="{text} w9")
    assert [e.gold for e in task.examples[:4]] == [0, 1, 0, 1]
    assert evaluate(tiny_llama, task, shots=1, n=3).n == 3


def test_malformed_files_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "w1", "choices": ["a", "b"], "gold": 0}\n{"input": "w1", "cho\n')
    with pytest.raises(TaskFileError, match=r"bad.jsonl:2: not valid JSON"):
        task_from_file(bad)
    bad.write_text('{"input": "w1", "choices": ["a", "b"], "gold": 0}\n'
                   '{"input": "w1", "choices": ["a", "b"], "gold": 5}\n')
    with pytest.raises(TaskFileError, match=r"bad.jsonl:2: gold=5 is not an index"):
        task_from_file(bad)
    bad.write_text('{"input": "w1", "choices": ["a", ""], "gold": 0}\n')
    with pytest.raises(TaskFileError, match=r"bad.jsonl:1: every choice must be a non-empty"):
        task_from_file(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(TaskFileError, match="no examples"):
        task_from_file(empty)
    with pytest.raises(TaskFileError, match="unsupported task file type '.txt'"):
        (tmp_path / "x.txt").write_text("hi")
        task_from_file(tmp_path / "x.txt")


def test_task_from_datasets_dataset():
    from datasets import Dataset

    ds = Dataset.from_list([{"q": f"w{i}", "a": i % 3} for i in range(9)])
    task = task_from_dataset(ds, name="ds", input_fields=["q"], gold_field="a",
                             choices=["w1", "w2", "w3"], template="{q}")
    assert task.labels == ("w1", "w2", "w3") and abs(task.chance - 1 / 3) < 1e-12


# ---- hub loaders through local files of the hub schema -------------------------------------

def test_hub_loaders_on_local_files(tmp_path):
    sst2 = tmp_path / "sst2.jsonl"
    sst2.write_text("\n".join(json.dumps({"idx": i, "sentence": f"fine film {i} ",
                                          "label": i % 2}) for i in range(8)))
    task = hub_task("sst2", data_files=sst2)
    assert task.labels == ("negative", "positive") and task.examples[1].gold == 1
    assert task.examples[0].input == "fine film 0" and "sst2" in task.source
    obqa = tmp_path / "obqa.jsonl"
    obqa.write_text(json.dumps({"id": "7-980", "question_stem": "Sun is a",
                                "choices": {"text": ["star", "moon", "rock", "sea"],
                                            "label": ["A", "B", "C", "D"]},
                                "answerKey": "A"}) + "\n")
    assert hub_task("openbookqa", data_files=obqa).examples[0].answer == "star"
    assert hub_task("openbookqa", data_files=obqa).normalization == "chars"
    boolq = tmp_path / "boolq.jsonl"
    boolq.write_text(json.dumps({"question": "is it", "answer": True, "passage": "It is."}))
    assert hub_task("boolq", data_files=boolq).examples[0].answer == "yes"
    piqa = tmp_path / "piqa.jsonl"
    piqa.write_text(json.dumps({"goal": "open jar", "sol1": "twist", "sol2": "kick",
                                "label": 0}))
    assert hub_task("piqa", data_files=piqa).examples[0].answer == "twist"
    assert hub_task("piqa", data_files=piqa).normalization == "chars"
    assert hub_task("boolq", data_files=boolq).normalization == "none"
    ag = tmp_path / "ag.csv"
    ag.write_text('text,label\n"Stocks rose",2\n')
    assert hub_task("ag_news", data_files=ag).examples[0].answer == "Business"
    with pytest.raises(KeyError, match="unknown hub task 'cb'"):
        hub_task("cb")


# ---- built-in tasks ---------------------------------------------------------------------------

BUILTIN = ["sentiment", "boolq", "piqa", "openbookqa", "sarcasm", "country_capital",
           "country_currency", "antonyms", "capital_analogies", "counterfactual_capital"]


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_tasks_load_with_provenance(name):
    task = load_task(name)
    assert len(task) >= 100 and task.source and task.licence
    assert all(0 <= e.gold < len(e.choices) for e in task.examples)
    build_prompts(task, shots=5, n=3)  # renders


def test_builtin_tasks_score_as_lm_evaluation_harness_reports_them():
    """lm-eval reports acc_norm (log-likelihood per character) for piqa and openbookqa; the
    other built-in tasks keep the summed log-likelihood (lm-eval's acc)."""
    rules = {name: load_task(name).normalization for name in BUILTIN}
    assert {n for n, r in rules.items() if r != "none"} == {"openbookqa", "piqa"}
    assert rules["openbookqa"] == rules["piqa"] == "chars"


def test_registry_errors():
    assert set(BUILTIN) <= set(TASKS)
    with pytest.raises(KeyError, match="unknown task 'nope'; registered tasks: \\["):
        load_task("nope")
    with pytest.raises(ValueError, match="already registered"):
        mechicl.inputs.tasks.register_task("sentiment", lambda: toy_task())


def test_counterfactual_task_records_both_answers():
    task = load_task("counterfactual_capital")
    ex = task.examples[0]
    assert ex.answer == ex.meta["context_answer"] != ex.meta["memorised_answer"]
    assert ex.meta["memorised_answer"] in ex.choices
    assert f"is {ex.fields['context_capital']}." in task.render(ex)


@pytest.mark.slow
def test_default_model_scoring_equals_reference_and_does_icl(smollm2):
    prompts = build_prompts(load_task("country_capital"), shots=3, n=3, seed=0)
    loglik, _ = choice_logprobs(smollm2, prompts)
    want = torch.tensor([[ref_loglik(smollm2, p, c) for c in range(len(p.continuations))]
                         for p in prompts], dtype=torch.float64)
    assert_close(loglik, want, rtol=1e-4, atol=1e-4)
    result = evaluate(smollm2, "country_capital", shots=5, n=40)
    assert result.ci_low > result.chance, result.summary()
