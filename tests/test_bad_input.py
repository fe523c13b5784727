"""Hostile input to the library gets one clear error naming the bad value and what is allowed
(issue 22), or, for task files read with ``errors="skip"``, an explicit and recorded skip.

Under pytest the jaxtyping/beartype hook checks annotations first (a ``TypeError`` naming the
value); where an annotation already rejects a value, the library's own message is checked on
the undecorated function (``inspect.unwrap``).
"""

import inspect
import json
import logging
import time

import numpy as np
import pytest
import torch

from mechicl.analyses.induction import SCORES, induction_scan
from mechicl.inputs.tasks import TaskFileError, task_from_dataset, task_from_file
from mechicl.model import as_hooked_model
from mechicl.model.masks import Mask

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def short_context():
    """A tiny GQA model whose context (24 tokens) is shorter than its vocabulary (100)."""
    from mechicl.testing import tiny_model

    return as_hooked_model(tiny_model("llama", n_ctx=24), name="tiny-llama-ctx24")


# ---- induction_scan(tokens=...), scores=, n_seeds= -----------------------------------------

def test_scan_tokens_outside_the_vocabulary(tiny_llama):
    top = tiny_llama.d_vocab
    with pytest.raises(ValueError, match=rf"^tokens\[1\] holds token id {top}, outside the "
                                         rf"vocabulary: ids must be in 0\.\.{top - 1}$"):
        induction_scan(tiny_llama, scores="prefix_matching", tokens=[[5, 6], [7, top]])
    with pytest.raises(ValueError, match=r"^tokens\[0\] holds token id -3, outside"):
        induction_scan(tiny_llama, scores="copying", tokens=[torch.tensor([5, -3])])


def test_scan_tokens_empty_float_bool_or_flat(tiny_llama):
    with pytest.raises(ValueError, match=r"^tokens= is empty: give at least one base sequence"):
        induction_scan(tiny_llama, tokens=[])
    with pytest.raises(ValueError, match=r"^tokens\[0\] has dtype torch\.float32: token ids must "
                                         r"be integers \(floats and bools are not converted\)$"):
        induction_scan(tiny_llama, scores="prefix_matching", tokens=[[5.0, 6.7]])
    with pytest.raises(ValueError, match=r"^tokens\[0\] has dtype torch\.bool"):
        induction_scan(tiny_llama, scores="prefix_matching", tokens=[[True, False]])
    with pytest.raises(ValueError, match=r"^tokens\[0\] has shape \(\): each base sequence must "
                                         r"be a non-empty 1-D"):
        induction_scan(tiny_llama, scores="prefix_matching", tokens=[5, 6, 7])
    with pytest.raises(ValueError, match=r"^tokens= must be a sequence of base sequences"):
        induction_scan(tiny_llama, scores="prefix_matching", tokens=torch.tensor([5, 6, 7]))
    with pytest.raises(ValueError, match=r"^tokens\[0\] repeats a token id"):
        induction_scan(tiny_llama, scores="prefix_matching", tokens=[[5, 6, 5]])


def test_scan_tokens_longer_than_the_context(short_context):
    model = short_context
    base = list(range(4, 4 + model.n_ctx))  # distinct ids, BOS + base is one token too long
    with pytest.raises(ValueError, match=rf"^tokens= \(copying\) needs sequences of "
                                         rf"{model.n_ctx + 1} tokens but the model's context is "
                                         rf"{model.n_ctx}"):
        induction_scan(model, scores="copying", tokens=[base], progress=False)
    # One token shorter fits: the copying branch runs on it.
    scan = induction_scan(model, scores="copying", tokens=[base[:-1]], progress=False)
    assert scan.scores["copying"].per_seed.shape[0] == 1
    with pytest.raises(ValueError, match=r"^tokens= needs sequences of 25 tokens"):
        induction_scan(model, scores="prefix_matching", tokens=[base[:6]], progress=False)


def test_scan_a_single_score_name_as_a_string(induction_toy):
    one = induction_scan(induction_toy, scores="prefix_matching", n_seeds=2, length=6,
                         progress=False)
    listed = induction_scan(induction_toy, scores=["prefix_matching"], n_seeds=2, length=6,
                            progress=False)
    assert list(one.scores) == ["prefix_matching"]
    torch.testing.assert_close(one.scores["prefix_matching"].mean,
                               listed.scores["prefix_matching"].mean)
    with pytest.raises(ValueError, match=rf"^unknown score names \['prefix'\]; allowed: "
                                         rf"{SCORES!r}$".replace("(", r"\[").replace(")", r"\]")):
        induction_scan(induction_toy, scores="prefix")


def test_huge_n_seeds_is_rejected_at_once(tiny_llama):
    # Before issue 22 the longest sequence was found by calling L(s) for every one of the 10**9
    # seed indices (75 s); now in closed form, before any token is drawn.
    for scores in ("prefix_matching", "copying"):
        start = time.perf_counter()
        with pytest.raises(ValueError, match=r"^n_seeds=1000000000 needs sequences of "
                                             r"8000000093 tokens but the model's context is 512"):
            induction_scan(tiny_llama, scores=scores, n_seeds=10**9, progress=False)
        assert time.perf_counter() - start < 2.0
    # A custom length function stops at the first sequence that does not fit.
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"model's context is 512"):
        induction_scan(tiny_llama, scores="prefix_matching", n_seeds=10**9,
                       length=lambda s: 10 if s < 5 else 200, progress=False)
    assert time.perf_counter() - start < 2.0
    with pytest.raises(ValueError, match=r"^length\(1\) = 0: the length function must return "
                                         r"an integer >= 1$"):
        induction_scan(tiny_llama, scores="prefix_matching", n_seeds=3, length=lambda s: 5 - 5 * s)
    with pytest.raises(ValueError, match=r"^seed=-1: need an integer >= 0$"):
        induction_scan(tiny_llama, scores="prefix_matching", n_seeds=1, seed=-1)
    # A mask does not delay the checks.
    with pytest.raises(ValueError, match=r"^n_seeds=1000000000 needs"):
        induction_scan(tiny_llama, n_seeds=10**9, mask=Mask.remove(tiny_llama, heads=[(0, 0)]))


# ---- Mask.remove ---------------------------------------------------------------------------

def test_mask_remove_rejects_bools_floats_and_non_pairs(tiny_gpt2):
    model = tiny_gpt2  # 2 layers x 4 heads
    with pytest.raises(ValueError, match=r"^head \(True, 1\): layer=True: need an integer in "
                                         r"0\.\.1$"):
        Mask.remove(model, heads=[(True, 1)])
    with pytest.raises(ValueError, match=r"^head \(0, False\): head=False: need an integer in "
                                         r"0\.\.3$"):
        Mask.remove(model, heads=[(0, False)])
    with pytest.raises(ValueError, match=r"^head \(1\.0, 0\): layer=1\.0: need an integer"):
        Mask.remove(model, heads=[(1.0, 0)])
    with pytest.raises(ValueError, match=r"^head \(0, 1, 2\) is not a \(layer, head\) pair"):
        Mask.remove(model, heads=[(0, 1, 2)])
    with pytest.raises(ValueError, match=r"^head 3 is not a \(layer, head\) pair"):
        Mask.remove(model, heads=[3])
    with pytest.raises(ValueError, match=r"^heads= takes \(layer, head\) pairs"):
        Mask.remove(model, heads="0.1")
    with pytest.raises(ValueError, match=r"^FFN layer=True: need an integer in 0\.\.1$"):
        Mask.remove(model, ffns=[True])
    with pytest.raises(ValueError, match=r"^head \(0, 4\): head=4: need an integer in 0\.\.3$"):
        Mask.remove(model, heads=[(0, 4)])
    # numpy and tensor integers (e.g. rows of torch.nonzero) are integers.
    expected = Mask.remove(model, heads=[(1, 2)], ffns=[0])
    assert Mask.remove(model, heads=[(np.int64(1), np.int64(2))], ffns=[np.int64(0)]) == expected
    assert Mask.remove(model, heads=[torch.tensor([1, 2])], ffns=[torch.tensor(0)]) == expected
    assert expected.removed_heads == [(1, 2)] and expected.removed_ffns == [0]


# ---- task files: gold, encodings, CSV ------------------------------------------------------

def _rows(n: int, **changes: dict) -> list[dict]:
    rows = [{"input": f"w{i}", "choices": ["a", "b"], "gold": i % 2} for i in range(n)]
    for i, change in changes.items():
        rows[int(i.removeprefix("r"))].update(change)
    return rows


def _jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")


@pytest.mark.parametrize("gold, shown", [(1.7, "1.7"), (1.0, "1.0"), (True, "True"),
                                         ("1.7", "'1.7'"), ("c", "'c'"), ([1], r"\[1\]")])
def test_gold_must_be_an_integer_index_or_a_choice(tmp_path, gold, shown):
    path = tmp_path / "gold.jsonl"
    _jsonl(path, _rows(3, r1={"gold": gold}))
    with pytest.raises(TaskFileError, match=rf"^{path}:2: gold={shown} is not an integer index "
                                            r"0\.\.1 or one of the choices \['a', 'b'\]$"):
        task_from_file(path)


def test_gold_forms_that_are_allowed(tmp_path):
    path = tmp_path / "gold.jsonl"
    _jsonl(path, _rows(4, r0={"gold": "1"}, r1={"gold": "b"}, r2={"gold": 0}))
    assert [e.gold for e in task_from_file(path).examples] == [1, 1, 0, 1]
    _jsonl(path, _rows(2, r1={"gold": 2}))
    with pytest.raises(TaskFileError, match=rf"^{path}:2: gold=2 is not an index into 2 choices "
                                            r"\(allowed: 0\.\.1\)$"):
        task_from_file(path)


def test_a_byte_order_mark_is_accepted(tmp_path):
    rows = _rows(4)
    plain, bom = tmp_path / "plain.jsonl", tmp_path / "bom.jsonl"
    _jsonl(plain, rows)
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert task_from_file(bom).examples == task_from_file(plain).examples
    csv_text = "text,label\nw1,a\nw2,b\n"
    (tmp_path / "plain.csv").write_text(csv_text, encoding="utf-8")
    (tmp_path / "bom.csv").write_text(csv_text, encoding="utf-8-sig")
    kw = {"input_fields": ["text"], "gold_field": "label", "choices": ["a", "b"],
          "template": "{text}"}
    assert (task_from_file(tmp_path / "bom.csv", **kw).examples
            == task_from_file(tmp_path / "plain.csv", **kw).examples)


def test_a_latin1_file_is_rejected_naming_file_line_and_encoding(tmp_path):
    path = tmp_path / "latin.jsonl"
    _jsonl(path, _rows(3, r2={"input": "café"}))
    path.write_bytes(path.read_text(encoding="utf-8").encode("latin-1"))
    with pytest.raises(TaskFileError, match=rf"^{path}:3: not UTF-8 \(byte 0xe9 at column 15\); "
                                            r"task files must be UTF-8 \(a byte-order mark is "
                                            r"allowed\)"):
        task_from_file(path)
    # Not a bad record but a bad file: skipping does not hide it.
    with pytest.raises(TaskFileError, match=rf"^{path}:3: not UTF-8"):
        task_from_file(path, errors="skip")


def test_broken_csv_names_file_and_line(tmp_path):
    path = tmp_path / "broken.csv"
    path.write_text('input,choices,gold\nw1,"[""a"", ""b""]",0\nw2,"[""a"", ""b""",1\n',
                    encoding="utf-8")
    with pytest.raises(TaskFileError, match=rf"^{path}:3: choices '\[\"a\", \"b\"' is not a valid "
                                            r"JSON list \(Expecting ',' delimiter, column 10\); "
                                            r"write a JSON list"):
        task_from_file(path)
    path.write_text("input,choices,gold\nw1,a|b,0\nw2, with a comma,a|b,1\n", encoding="utf-8")
    with pytest.raises(TaskFileError, match=rf"^{path}:3: 4 fields but the header has 3 columns "
                                            r"\['input', 'choices', 'gold'\] \(a comma inside an "
                                            r"unquoted value\?\)$"):
        task_from_file(path)
    path.write_text('input,choices,gold\nw1,a|b,0\nw2,"a|b"x,1\n', encoding="utf-8")
    with pytest.raises(TaskFileError, match=rf"^{path}:3: not valid CSV \(',' expected after "):
        task_from_file(path)
    path.write_text("input,input,gold\nw1,a,0\n", encoding="utf-8")
    with pytest.raises(TaskFileError, match=rf"^{path}:1: the header .* has repeated column "
                                            r"names \['input'\]$"):
        task_from_file(path)


def test_choices_must_be_a_list_of_strings(tmp_path):
    path = tmp_path / "choices.jsonl"
    _jsonl(path, _rows(2, r0={"choices": [4, 5]}))
    assert task_from_file(path).examples[0].choices == ("4", "5")  # integers: their text
    _jsonl(path, _rows(2, r1={"choices": 5}))
    with pytest.raises(TaskFileError, match=rf"^{path}:2: choices=5 must be a list of strings "):
        task_from_file(path)
    _jsonl(path, _rows(2, r1={"choices": ["a", None]}))
    with pytest.raises(TaskFileError, match=rf"^{path}:2: every choice must be a non-empty "
                                            r"string, got \('a', None\)$"):
        task_from_file(path)
    with pytest.raises(ValueError, match=r"^choices= argument repeats \['a'\]"):
        task_from_file(path, choices=["a", "a"])


def test_records_the_template_cannot_render_and_repeated_ids(tmp_path):
    path = tmp_path / "fields.jsonl"
    _jsonl(path, [{"input": {"a": "x", "b": "y"}, "choices": ["p", "q"], "gold": 0},
                  {"input": {"a": "x"}, "choices": ["p", "q"], "gold": 1}])
    with pytest.raises(TaskFileError, match=rf"^{path}:2: the template uses fields \['b'\] that "
                                            r"this record lacks \(it has \['a'\]\)$"):
        task_from_file(path, template="{a} {b}")
    _jsonl(path, [{"id": "q1", **r} for r in _rows(2)])
    with pytest.raises(TaskFileError, match=rf"^{path}:2: id 'q1' repeats \(first at {path}:1\)$"):
        task_from_file(path)


# ---- errors="skip" -------------------------------------------------------------------------

def test_skip_drops_bad_rows_and_records_them(tmp_path, caplog):
    """A multiple-choice file in which a few rows repeat a choice: strict names the first,
    skip loads the rest and reports every skipped line."""
    path = tmp_path / "mc.jsonl"
    rows = [{"input": f"q{i}", "choices": ["a", "b", "c"], "gold": i % 3} for i in range(30)]
    for i in (4, 17, 25):
        rows[i]["choices"] = ["a", "b", "b"]
    _jsonl(path, rows)
    with pytest.raises(TaskFileError, match=rf"^{path}:5: choices repeat \['b'\]: "
                                            r"\('a', 'b', 'b'\)$"):
        task_from_file(path)
    with caplog.at_level(logging.WARNING, logger="mechicl.inputs.tasks"):
        task = task_from_file(path, errors="skip")
    assert len(task) == 27
    assert [e.id for e in task.examples] == [str(i) for i in range(30) if i not in (4, 17, 25)]
    reason = "choices repeat ['b']: ('a', 'b', 'b')"
    assert task.provenance == {"errors": "skip", "skipped": [
        {"line": 5, "reason": reason}, {"line": 18, "reason": reason},
        {"line": 26, "reason": reason}]}
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [m for m in warned if "skipped:" in m] == [f"{path}:{n}: skipped: {reason}"
                                                      for n in (5, 18, 26)]
    assert any("skipped 3 of 30 records" in m for m in warned)
    # The default stays strict and its provenance empty.
    _jsonl(path, rows[:4])
    assert task_from_file(path).provenance == {}


def test_skip_covers_every_kind_of_bad_record(tmp_path):
    path = tmp_path / "mixed.csv"
    path.write_text("input,choices,gold\n"
                    "w1,a|b,0\n"
                    "w2,a|b,1.7\n"          # gold not an integer
                    "w3,a|b\n"              # a field missing
                    'w4,"[""a"", ""b""",0\n'  # broken choices list
                    "w5,a|a,0\n"            # repeated choice
                    "w6,a|b,b\n", encoding="utf-8")
    task = task_from_file(path, errors="skip")
    assert [e.input for e in task.examples] == ["w1", "w6"]
    skipped = task.provenance["skipped"]
    assert [s["line"] for s in skipped] == [3, 4, 5, 6]
    assert skipped[0]["reason"].startswith("gold='1.7' is not an integer index")
    assert skipped[1]["reason"].startswith("2 fields but the header has 3 columns")
    assert "is not a valid JSON list" in skipped[2]["reason"]
    assert skipped[3]["reason"] == "choices repeat ['a']: ('a', 'a')"
    bad = tmp_path / "allbad.jsonl"
    _jsonl(bad, _rows(2, r0={"gold": 9}, r1={"gold": True}))
    with pytest.raises(TaskFileError, match=rf"^{bad}: no examples: all 2 records were skipped "
                                            r"\(the first, line 1: gold=9 is not an index"):
        task_from_file(bad, errors="skip")


def test_skip_in_datasets_records_rows():
    rows = _rows(5, r1={"choices": ["a", "a"]}, r3={"gold": 0.5})
    task = task_from_dataset(rows, name="ds", errors="skip")
    assert [s["row"] for s in task.provenance["skipped"]] == [1, 3]
    assert len(task) == 3
    with pytest.raises(TaskFileError, match=r"^ds\[1\]: choices repeat \['a'\]"):
        task_from_dataset(rows, name="ds")


def test_errors_value_is_checked(tmp_path):
    path = tmp_path / "ok.jsonl"
    _jsonl(path, _rows(2))
    # The annotation (a Literal) rejects it under the test-time type checker ...
    with pytest.raises((ValueError, TypeError), match="ignore"):
        task_from_file(path, errors="ignore")
    # ... and the library's own check names the value and the allowed ones.
    with pytest.raises(ValueError, match=r"^errors='ignore' is not allowed; choose one of "
                                         r"\['strict', 'skip'\]$"):
        inspect.unwrap(task_from_file)(path, errors="ignore")
    with pytest.raises(ValueError, match=r"^errors='lenient' is not allowed"):
        inspect.unwrap(task_from_dataset)(_rows(2), name="x", errors="lenient")
