"""The lm-evaluation-harness adapter (mechicl.interop.lm_eval): its scores against slow literal
references (one forward pass per predicted token), masks and hooks honoured, and lm-eval itself
running a local task (a YAML in a temp folder, ``dataset_path: json``) offline on a tiny model,
its numbers equal to mechicl's own evaluation of the same prompts, masked and unmasked."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mechicl
from mechicl.inputs.tasks import Example, Task, build_prompts
from mechicl.interop.lm_eval import HookedScorer, lm_eval_results, rolling_windows

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    from mechicl.testing import tiny_model

    return mechicl.as_hooked_model(tiny_model("llama", seed=3), name="tiny-llama-3")


@pytest.fixture(scope="module")
def mask(model):
    return mechicl.Mask.remove(model, heads=[(0, 0), (0, 1), (1, 2)])


def literal_logprob(model, tokens, mask=None):
    """log p(tokens[-1] | tokens[:-1]): one unpadded forward pass of the prefix, its last
    position, under ``mask`` (applied as a context)."""
    prefix = torch.tensor([tokens[:-1]])
    with torch.no_grad():
        if mask is None:
            logits = model(prefix, return_type="logits")
        else:
            with mask.applied(model):
                logits = model(prefix, return_type="logits")
    logp = torch.log_softmax(logits[0, -1].double(), -1)
    return float(logp[tokens[-1]]), int(logp.argmax()) == tokens[-1]


def literal_loglikelihood(model, context, continuation, mask=None):
    """The continuation's log-likelihood, a loop over its tokens (BOS + context as mechicl
    tokenises it, the context's trailing space moved to the continuation)."""
    stripped = context.rstrip()
    ctx = [model.bos_token_id, *model.tokenizer(stripped, add_special_tokens=False)["input_ids"]]
    cont = model.tokenizer(context[len(stripped):] + continuation,
                           add_special_tokens=False)["input_ids"]
    total, greedy = 0.0, True
    for t in range(len(cont)):
        lp, g = literal_logprob(model, ctx + cont[: t + 1], mask)
        total += lp
        greedy &= g
    return total, greedy


REQUESTS = [("w1 w2 w3", " w4"), ("w1 w2 w3 ", "w4 w5 w6"), ("", "w7 w8"),
            ("w9 w10 w11 w12 w13", " w14 w15"), ("w20", " w21 w22 w23 w24")]


@pytest.mark.parametrize("masked", [False, True])
def test_loglikelihood_matches_a_token_loop(model, mask, masked):
    m = mask if masked else None
    scorer = HookedScorer(model, mask=m, batch_tokens=12)  # several padded batches
    got = scorer.loglikelihood(REQUESTS)
    for (context, cont), (ll, greedy) in zip(REQUESTS, got, strict=True):
        ref_ll, ref_greedy = literal_loglikelihood(model, context, cont, m)
        assert ll == pytest.approx(ref_ll, abs=1e-4)
        assert greedy == ref_greedy


def test_mask_and_hooks_change_the_scores(model, mask):
    plain = [ll for ll, _ in HookedScorer(model).loglikelihood(REQUESTS)]
    masked = [ll for ll, _ in HookedScorer(model, mask=mask).loglikelihood(REQUESTS)]
    assert max(abs(a - b) for a, b in zip(plain, masked, strict=True)) > 1e-3

    # a forward hook that zeroes the same heads' z equals the mask
    def zero(z, hook, heads):
        z = z.clone()
        z[:, :, heads] = 0.0
        return z

    hooks = [(model.hook_name("z", 0), lambda z, hook: zero(z, hook, [0, 1])),
             (model.hook_name("z", 1), lambda z, hook: zero(z, hook, [2]))]
    hooked = [ll for ll, _ in HookedScorer(model, fwd_hooks=hooks).loglikelihood(REQUESTS)]
    assert hooked == pytest.approx(masked, abs=1e-5)


def test_greedy_matches_a_literal_argmax(model):
    scorer = HookedScorer(model)
    context = "w3 w4 w5"
    ids = [model.bos_token_id, *model.tokenizer(context, add_special_tokens=False)["input_ids"]]
    expected = []
    for _ in range(5):
        with torch.no_grad():
            token = int(model(torch.tensor([ids + expected]), return_type="logits")[0, -1].argmax())
        if token == model.tokenizer.eos_token_id:
            break
        expected.append(token)
    text = model.tokenizer.decode(expected)
    assert scorer.generate_until([(context, {"max_gen_toks": 5})]) == [text]
    words = text.split()
    assert len(words) >= 3, "the random model should emit a few words"
    stop = words[2]
    want = text.split(stop)[0]
    assert scorer.generate_until([(context, {"until": [stop], "max_gen_toks": 5})]) == [want]


def test_generation_runs_under_the_mask(model, mask):
    context = "w3 w4 w5"
    ids = [model.bos_token_id, *model.tokenizer(context, add_special_tokens=False)["input_ids"]]
    new = []
    for _ in range(4):
        with torch.no_grad(), mask.applied(model):
            new.append(int(model(torch.tensor([ids + new]), return_type="logits")[0, -1].argmax()))
    got = HookedScorer(model, mask=mask).generate_until([(context, {"max_gen_toks": 4})])
    assert got == [model.tokenizer.decode([t for t in new if t != model.tokenizer.eos_token_id])]


def test_rolling_loglikelihood_matches_a_token_loop(model, mask):
    text = " ".join(f"w{(7 * i) % 90 + 3}" for i in range(40))
    tokens = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(tokens) == 40
    # whole text in one window: log p(t_i | BOS, t_<i) summed, one forward per token
    ref = sum(literal_logprob(model, [model.bos_token_id, *tokens[: i + 1]], mask)[0]
              for i in range(len(tokens)))
    got = HookedScorer(model, mask=mask).loglikelihood_rolling([text])
    assert got[0] == pytest.approx(ref, abs=1e-3)
    # windows of 16 tokens: each token predicted from at most the 15 tokens before it
    windows = rolling_windows(tokens, model.bos_token_id, 16)
    assert [t for _, pred in windows for t in pred] == tokens
    ref16 = sum(literal_logprob(model, ctx + pred[: j + 1], mask)[0]
                for ctx, pred in windows for j in range(len(pred)))
    got16 = HookedScorer(model, mask=mask, max_length=16).loglikelihood_rolling([text, "w5"])
    assert got16[0] == pytest.approx(ref16, abs=1e-3) and got16[0] != pytest.approx(ref, abs=1e-3)
    (w5,) = model.tokenizer("w5", add_special_tokens=False)["input_ids"]
    assert got16[1] == pytest.approx(literal_logprob(model, [model.bos_token_id, w5], mask)[0],
                                     abs=1e-4)


def test_rolling_windows_are_lm_evals():
    import lm_eval.utils as lm_utils  # the test extra installs lm-eval: never skipped
    for n in (1, 5, 16, 17, 40):
        tokens = list(range(10, 10 + n))
        ours = rolling_windows(tokens, 1, 16)
        theirs = [lm_utils.make_disjoint_window(w)
                  for w in lm_utils.get_rolling_token_windows(tokens, 1, 16, 1)]
        assert ours == [(list(a), list(b)) for a, b in theirs]


def test_bad_arguments_name_the_value(model):
    with pytest.raises(TypeError, match="mask"):  # at test time the type checker says so first
        HookedScorer(model, mask={"heads": []})
    with pytest.raises(ValueError, match=r"max_length=100000 is longer than the model's context"):
        HookedScorer(model, max_length=100000)
    with pytest.raises(ValueError, match="batch_tokens=0 is not allowed"):
        HookedScorer(model, batch_tokens=0)
    with pytest.raises(ValueError, match="ask for sampling"):
        HookedScorer(model).generate_until([("w1", {"do_sample": True})])


def test_importing_mechicl_does_not_need_lm_eval():
    code = ("import sys, mechicl, mechicl.interop.lm_eval, mechicl.experiments.outputs, "
            "mechicl.cli; assert not [m for m in sys.modules if m.split('.')[0] == 'lm_eval'], "
            "'lm_eval imported'")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


def test_without_lm_eval_the_adapter_says_how_to_install(model, monkeypatch):
    from mechicl.interop import lm_eval as interop

    interop._lm_class.cache_clear()
    monkeypatch.setitem(sys.modules, "lm_eval.api.model", None)  # import fails
    try:
        with pytest.raises(ImportError, match=r"pip install mechicl\[lm-eval\]"):
            interop.lm_eval_model(model)
    finally:
        interop._lm_class.cache_clear()


# ---- lm-eval itself, on a local task ------------------------------------------------------


def toy_task():
    """Choices of different lengths in characters and tokens, so acc and acc_norm differ."""
    examples = tuple(Example(id=f"q{i}", input=f"w{10 + i} w{40 + i % 7} w7",
                             choices=("w1 w2 w3", "w4", "w50 w51"), gold=i % 3)
                     for i in range(30))
    return Task(name="toy_mc", template="{input}", examples=examples)


@pytest.fixture(scope="module")
def local_task(tmp_path_factory):
    """The toy task's 0-shot prompts as a local lm-eval task (YAML + JSONL), and the prompts."""
    folder = tmp_path_factory.mktemp("lm_eval_task")
    task = toy_task()
    prompts = build_prompts(task, shots=0)
    data = folder / "toy.jsonl"
    data.write_text("".join(json.dumps({"question": p.text,
                                        "choices": [c.lstrip() for c in p.continuations],
                                        "gold": p.gold}) + "\n" for p in prompts))
    (folder / "toy_mc.yaml").write_text(
        "task: toy_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {folder / 'cache'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{gold}}'\n"
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n")
    return folder, task, prompts


def run_lm_eval(lm, folder: Path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    return lm_eval.simple_evaluate(model=lm, tasks=["toy_mc"], num_fewshot=0,
                                   task_manager=TaskManager(include_path=str(folder)),
                                   log_samples=True)


@pytest.mark.parametrize("masked", [False, True])
def test_lm_eval_runs_a_local_task_like_mechicl(model, mask, local_task, masked):
    from mechicl.interop.lm_eval import lm_eval_model

    folder, task, prompts = local_task
    m = mask if masked else None
    out = run_lm_eval(lm_eval_model(model, mask=m), folder)
    ours = mechicl.evaluate(model, task, shots=0, prompts=prompts, mask=m)
    samples = sorted(out["samples"]["toy_mc"], key=lambda s: s["doc_id"])
    lm_lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    assert len(lm_lls) == len(prompts) == len(task.pools()[1]) > 10
    for got, want in zip(lm_lls, ours.predictions["loglik"], strict=True):
        assert got == pytest.approx(list(want), abs=1e-4)
    # mechicl's lm-eval layout of its own evaluation: the same numbers as lm-eval's
    mine = lm_eval_results([ours], model="tiny")["results"]["toy_mc"]
    theirs = out["results"]["toy_mc"]
    metric_keys = {k for k in theirs if "," in k}
    assert metric_keys == {k for k in mine if "," in k} == {
        "acc,none", "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none"}
    for key in metric_keys:
        assert mine[key] == pytest.approx(theirs[key], abs=1e-12), key
    assert theirs["acc,none"] != theirs["acc_norm,none"]  # the task tells them apart
    assert ours.accuracy_with("none") == pytest.approx(theirs["acc,none"])
    assert ours.accuracy_with("chars") == pytest.approx(theirs["acc_norm,none"])
    assert out["config"]["mechicl_mask"] == (None if m is None else m.to_dict())
    if masked:  # removing the heads changes what lm-eval sees
        plain = mechicl.evaluate(model, task, shots=0, prompts=prompts).predictions["loglik"]
        diff = max(abs(a - b) for got, want in zip(lm_lls, plain, strict=True)
                   for a, b in zip(got, want, strict=True))
        assert diff > 1e-3
