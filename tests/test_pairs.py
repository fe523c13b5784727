"""Clean/corrupted prompt pairs: the container's invariants and serialisation (toy tokenizer),
and each generator's structure on the real default model's tokenizer (English words)."""

import json
import logging

import pytest
import torch

from mechicl.inputs.pairs import (
    IOI_ABBA_TEMPLATES,
    IOI_BABA_TEMPLATES,
    IOI_NAMES,
    PAIR_GENERATORS,
    PromptPairs,
    capital_pairs,
    colored_objects_pairs,
    ioi_pairs,
    make_pairs,
    register_pairs,
    repeated_token_pairs,
)
from mechicl.inputs.tasks import load_task
from mechicl.testing import FIRST_WORD_ID, SPECIAL_TOKEN_IDS

# Forward passes here are few and short; one thread is faster on a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")

W = FIRST_WORD_ID  # toy word wk has id W + k


def assert_pairs_equal(a: PromptPairs, b: PromptPairs) -> None:
    assert a.name == b.name
    for label in ("clean", "corrupted", "lengths", "answer", "wrong"):
        assert torch.equal(getattr(a, label), getattr(b, label)), label
    for label in ("clean_text", "corrupted_text", "answer_text", "wrong_text"):
        assert getattr(a, label) == getattr(b, label), label
    assert a.positions.keys() == b.positions.keys()
    for key in a.positions:
        assert torch.equal(a.positions[key], b.positions[key]), key
    assert a.params == b.params


def decode(model, ids) -> str:
    return model.tokenizer.decode(ids.tolist() if isinstance(ids, torch.Tensor) else ids)


# ---- the container, on the toy tokenizer (fast) ---------------------------------------------


@pytest.fixture(scope="module")
def toy_pairs(tiny_gpt2):
    return PromptPairs.from_texts(
        tiny_gpt2,
        clean=["w1 w2 w3", "w4 w5", "w6 w7 w8 w9"],
        corrupted=["w1 w20 w3", "w40 w5", "w6 w7 w8 w90"],
        answers=[" w11", " w12", " w13"],
        wrongs=[" w21", " w22", " w23"],
        name="toy",
        params={"note": "test"},
        positions={"changed": [2, 1, 4]},
    )


def test_from_texts_tokenises_pads_and_decodes(tiny_gpt2, toy_pairs):
    p = toy_pairs
    bos, pad = SPECIAL_TOKEN_IDS["<bos>"], SPECIAL_TOKEN_IDS["<pad>"]
    assert len(p) == 3 and p.clean.shape == p.corrupted.shape == (3, 5)
    assert p.lengths.tolist() == [4, 3, 5]
    assert p.clean[0].tolist() == [bos, W + 1, W + 2, W + 3, pad]
    assert p.corrupted[1].tolist() == [bos, W + 40, W + 5, pad, pad]
    assert p.answer.tolist() == [W + 11, W + 12, W + 13]
    assert p.wrong.tolist() == [W + 21, W + 22, W + 23]
    assert p.answer_text == ("w11", "w12", "w13")  # the toy tokenizer decodes without spaces
    assert p.answer_pos.tolist() == [3, 2, 4]
    assert p.params["pad_id"] == pad == p.pad_id
    assert p.params["note"] == "test" and p.params["generator"] == "from_texts"
    assert p.positions["changed"].tolist() == [2, 1, 4]
    for i in range(3):
        assert p.clean_tokens(i).tolist() == tiny_gpt2.encode(p.clean_text[i])
        assert p.corrupted_tokens(i).tolist() == tiny_gpt2.encode(p.corrupted_text[i])
        differ = (p.clean_tokens(i) != p.corrupted_tokens(i)).nonzero().flatten().tolist()
        assert differ == [int(p.positions["changed"][i])]
    no_bos = PromptPairs.from_texts(tiny_gpt2, ["w1 w2"], ["w3 w2"], ["w5"], ["w6"],
                                    prepend_bos=False)
    assert no_bos.clean.tolist() == [[W + 1, W + 2]]


def test_length_select_and_by_length(toy_pairs):
    p = toy_pairs
    assert not p.same_length
    with pytest.raises(ValueError, match=r"pairs have lengths \[3, 4, 5\].*by_length"):
        _ = p.length
    sub = p.select([2, 0])
    assert sub.clean_text == (p.clean_text[2], p.clean_text[0])
    assert sub.answer.tolist() == [W + 13, W + 11]
    assert sub.positions["changed"].tolist() == [4, 2]
    assert torch.equal(sub.clean_tokens(1), p.clean_tokens(0))
    one = p.select(torch.tensor([False, True, False]))
    assert one.same_length and one.length == 3 and one.clean.shape == (1, 3)  # padding trimmed
    groups = p.by_length()
    assert list(groups) == [3, 4, 5]
    for n, group in groups.items():
        assert group.length == n and group.clean.shape[1] == n
    assert groups[4].clean_text == (p.clean_text[0],)
    with pytest.raises(ValueError, match="out of range"):
        p.select([3])
    with pytest.raises(ValueError, match="at least one index"):
        p.select([])


def test_dict_round_trip_is_exact(toy_pairs):
    data = json.loads(json.dumps(toy_pairs.to_dict()))
    back = PromptPairs.from_dict(data)
    assert_pairs_equal(back, toy_pairs)
    sub = toy_pairs.select([1])  # no padding at all
    assert_pairs_equal(PromptPairs.from_dict(json.loads(json.dumps(sub.to_dict()))), sub)
    with pytest.raises(ValueError, match="lacks keys"):
        PromptPairs.from_dict({"name": "x"})


def test_dataframe_has_one_row_per_pair(toy_pairs):
    frame = toy_pairs.to_dataframe()
    assert len(frame) == 3
    assert frame["length"].tolist() == [4, 3, 5]
    assert frame["pos_changed"].tolist() == [2, 1, 4]
    assert frame["answer_text"].tolist() == list(toy_pairs.answer_text)
    assert frame["wrong"].tolist() == toy_pairs.wrong.tolist()
    assert frame["clean_text"][1] == "w4 w5"


def test_from_texts_rejects_multi_token_answers(tiny_gpt2):
    with pytest.raises(ValueError, match=r"answer of pair 1, ' w3 w4'.*2: \['w3', 'w4'\]"):
        PromptPairs.from_texts(tiny_gpt2, ["w1", "w2"], ["w5", "w6"], [" w7", " w3 w4"],
                               [" w8", " w9"])
    with pytest.raises(ValueError, match=r"wrong answer of pair 0, ''.*0: \[\]"):
        PromptPairs.from_texts(tiny_gpt2, ["w1"], ["w5"], [" w7"], [""])


def test_from_texts_rejects_length_mismatch(tiny_gpt2):
    with pytest.raises(ValueError) as err:
        PromptPairs.from_texts(tiny_gpt2, ["w1 w2", "w1 w2 w3"], ["w1 w3", "w1 w3"],
                               [" w7", " w7"], [" w8", " w8"])
    msg = str(err.value)
    assert "pair 1" in msg and "4 tokens" in msg and "3" in msg
    assert "['<bos>', 'w1', 'w2', 'w3']" in msg and "['<bos>', 'w1', 'w3']" in msg
    with pytest.raises(ValueError, match="one entry per pair"):
        PromptPairs.from_texts(tiny_gpt2, ["w1"], ["w2", "w3"], [" w7"], [" w8"])
    with pytest.raises(ValueError, match="not one string"):
        PromptPairs.from_texts(tiny_gpt2, "w1", ["w2"], [" w7"], [" w8"])


def _fields(**changes):
    base = dict(
        name="x", clean=torch.tensor([[0, 5, 6, 2], [0, 7, 8, 9]]),
        corrupted=torch.tensor([[0, 5, 7, 2], [0, 7, 9, 9]]), lengths=torch.tensor([3, 4]),
        answer=torch.tensor([10, 11]), wrong=torch.tensor([12, 13]),
        clean_text=("a", "b"), corrupted_text=("c", "d"), answer_text=("e", "f"),
        wrong_text=("g", "h"), positions={"end": torch.tensor([2, 3])}, params={"pad_id": 2},
    )
    base.update(changes)
    return base


def test_validation_names_the_problem():
    PromptPairs(**_fields())  # valid
    with pytest.raises(ValueError, match="answer equals wrong .*pair 1"):
        PromptPairs(**_fields(wrong=torch.tensor([12, 11])))
    with pytest.raises(ValueError, match="beyond lengths must be padding"):
        PromptPairs(**_fields(clean=torch.tensor([[0, 5, 6, 3], [0, 7, 8, 9]])))
    with pytest.raises(ValueError, match="the pad id 7"):
        PromptPairs(**_fields(params={"pad_id": 7}))
    with pytest.raises(ValueError, match=r"lengths must be in 1\.\.4.*pair 0"):
        PromptPairs(**_fields(lengths=torch.tensor([0, 4])))
    with pytest.raises(ValueError, match=r"positions\['end'\] = 3 for pair 0"):
        PromptPairs(**_fields(positions={"end": torch.tensor([3, 3])}))
    with pytest.raises(ValueError, match="torch.long"):  # int32 passes jaxtyping's Int
        PromptPairs(**_fields(answer=torch.tensor([10, 11], dtype=torch.int32)))
    with pytest.raises(ValueError, match="JSON"):
        PromptPairs(**_fields(params={"pad_id": 2, "bad": object()}))
    with pytest.raises((ValueError, TypeError)):  # jaxtyping may catch it first under pytest
        PromptPairs(**_fields(corrupted=torch.tensor([[0, 5, 7], [0, 7, 9]])))


# ---- registry --------------------------------------------------------------------------------


def test_registry_rejects_duplicates_and_lists_known_names(tiny_gpt2):
    assert set(PAIR_GENERATORS) >= {"ioi", "colored_objects", "capitals", "repeated_tokens"}
    with pytest.raises(ValueError, match="already registered"):
        register_pairs("ioi", ioi_pairs)
    with pytest.raises(ValueError, match=r"unknown pair generator 'nope'.*'capitals'.*'ioi'"):
        make_pairs("nope", tiny_gpt2)
    made = make_pairs("repeated_tokens", tiny_gpt2, n=3, length=6, seed=4)
    assert_pairs_equal(made, repeated_token_pairs(tiny_gpt2, 3, length=6, seed=4))


def test_registering_a_new_generator(tiny_gpt2):
    def mine(model, n=1, *, seed=0):
        return PromptPairs.from_texts(model, ["w1"] * n, ["w2"] * n, [" w3"] * n, [" w4"] * n,
                                      name="mine", params={"seed": seed})

    register_pairs("test-mine", mine)
    try:
        assert len(make_pairs("test-mine", tiny_gpt2, n=2)) == 2
    finally:
        del PAIR_GENERATORS["test-mine"]


# ---- repeated tokens: structure (toy and real tokenizer) ------------------------------------


def check_repeated(model, p: PromptPairs, length: int, prefix_len: int = 0) -> None:
    m = length // 2
    start = 1 + prefix_len
    assert p.same_length and p.length == start + length + m
    assert (p.positions["first"] == start + m).all()
    assert (p.positions["end"] == p.length - 1).all()
    assert (p.clean[:, 0] == model.bos_token_id).all()
    for i in range(len(p)):
        clean, corrupted = p.clean_tokens(i), p.corrupted_tokens(i)
        seq = clean[start: start + length]
        assert len(set(seq.tolist())) == length  # distinct: induction is unambiguous
        assert torch.equal(clean[start + length:], seq[:m])  # second copy = first half
        differ = (clean != corrupted).nonzero().flatten().tolist()
        assert differ == [start + m]
        assert int(p.answer[i]) == int(seq[m]) == int(clean[start + m])
        assert int(p.wrong[i]) == int(corrupted[start + m])
        assert int(p.wrong[i]) not in seq.tolist()
        assert p.answer_text[i] == decode(model, [int(p.answer[i])])
    special = set(model.tokenizer.all_special_ids)
    assert not special & set(p.clean[:, start:].flatten().tolist())


def test_repeated_tokens_toy(tiny_gpt2):
    p = repeated_token_pairs(tiny_gpt2, 5, length=8, seed=1)
    check_repeated(tiny_gpt2, p, 8)
    assert_pairs_equal(p, repeated_token_pairs(tiny_gpt2, 5, length=8, seed=1))
    assert not torch.equal(p.clean, repeated_token_pairs(tiny_gpt2, 5, length=8, seed=2).clean)
    with pytest.raises(ValueError, match="length=1 must be at least 2"):
        repeated_token_pairs(tiny_gpt2, 2, length=1)
    with pytest.raises(ValueError, match="distinct tokens"):
        repeated_token_pairs(tiny_gpt2, 2, length=500)


@pytest.mark.slow
def test_repeated_tokens_real(smollm2):
    p = repeated_token_pairs(smollm2, 16, length=20, seed=0)
    check_repeated(smollm2, p, 20)
    prefixed = repeated_token_pairs(smollm2, 4, length=10, seed=0, prefix="Random words:")
    n_prefix = len(smollm2.encode("Random words:", prepend_bos=False))
    check_repeated(smollm2, prefixed, 10, n_prefix)
    assert (prefixed.clean[:, 1: 1 + n_prefix] ==
            torch.tensor(smollm2.encode("Random words:", prepend_bos=False))).all()
    # The model predicts by induction: the clean answer beats the corrupted one and vice versa.
    small = p.select(range(4))  # few prompts: CPU time
    with torch.no_grad():
        for tokens, sign in ((small.clean, 1), (small.corrupted, -1)):
            last = smollm2(tokens)[:, -1]
            diff = last.gather(1, small.answer[:, None]) - last.gather(1, small.wrong[:, None])
            assert (sign * diff > 0).all()


# ---- IOI -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ioi(smollm2):
    return ioi_pairs(smollm2, 40, seed=0)


@pytest.mark.slow
def test_ioi_is_deterministic_by_seed(smollm2, ioi):
    assert_pairs_equal(ioi, ioi_pairs(smollm2, 40, seed=0))
    other = ioi_pairs(smollm2, 40, seed=1)
    assert other.clean_text != ioi.clean_text
    assert other.params["seed"] == 1 and ioi.params["generator"] == "ioi"


@pytest.mark.slow
def test_ioi_structure(smollm2, ioi):
    names = set(ioi.params["names"])
    assert names <= set(IOI_NAMES)
    templates = set(IOI_BABA_TEMPLATES + IOI_ABBA_TEMPLATES)
    assert not ioi.same_length  # 30 templates of different lengths
    n_abba = 0
    for i in range(len(ioi)):
        clean, corrupted = ioi.clean_tokens(i), ioi.corrupted_tokens(i)
        assert len(clean) == len(corrupted) == int(ioi.lengths[i])
        assert decode(smollm2, clean[1:]) == ioi.clean_text[i]
        assert decode(smollm2, corrupted[1:]) == ioi.corrupted_text[i]
        io, s1, s2 = (int(ioi.positions[k][i]) for k in ("IO", "S1", "S2"))
        assert int(ioi.positions["end"][i]) == len(clean) - 1
        assert s1 < s2 and io < s2
        n_abba += io < s1
        assert int(ioi.answer[i]) == int(clean[io])
        assert int(ioi.wrong[i]) == int(clean[s1]) == int(clean[s2])
        assert decode(smollm2, [int(ioi.answer[i])]) == ioi.answer_text[i]
        io_name, s_name = ioi.answer_text[i].strip(), ioi.wrong_text[i].strip()
        assert ioi.answer_text[i] == " " + io_name and {io_name, s_name} <= names
        assert io_name != s_name
        assert ioi.clean_text[i].endswith(" to")
        # The text is one of Wang et al.'s templates filled in.
        assert any(ioi.clean_text[i].startswith(t.split("[")[0]) for t in templates)
        # p_ABC: three new names, distinct, none equal to IO or S; all else identical.
        new = [smollm2.to_str_tokens([int(corrupted[p])])[0].strip() for p in (io, s1, s2)]
        assert len(set(new)) == 3 and not set(new) & {io_name, s_name} and set(new) <= names
        differ = (clean != corrupted).nonzero().flatten().tolist()
        assert differ == sorted([io, s1, s2])
    assert 0 < n_abba < len(ioi)  # both orders were sampled


@pytest.mark.slow
def test_ioi_template_selection_and_model_behaviour(smollm2):
    baba = ioi_pairs(smollm2, 12, seed=3, templates="BABA")
    assert (baba.positions["S1"] < baba.positions["IO"]).all()
    abba = ioi_pairs(smollm2, 12, seed=3, templates="ABBA")
    assert (abba.positions["IO"] < abba.positions["S1"]).all()
    one = ioi_pairs(smollm2, 8, seed=0, templates=[IOI_BABA_TEMPLATES[0]])
    assert one.same_length and one.params["template_list"] == [IOI_BABA_TEMPLATES[0]]
    # SmolLM2 does IOI: on clean prompts the IO beats the subject for most pairs.
    few = baba.select(range(8))
    with torch.no_grad():
        logits = smollm2(few.clean)[torch.arange(len(few)), few.answer_pos]
    diff = logits.gather(1, few.answer[:, None]) - logits.gather(1, few.wrong[:, None])
    assert (diff > 0).float().mean() >= 0.75


@pytest.mark.slow
def test_ioi_rejects_bad_arguments(smollm2, caplog):
    with pytest.raises(ValueError, match=r"'Tiffany' -> \[' T', 'iff', 'any'\]"):
        ioi_pairs(smollm2, 2, names=["Mary", "John", "Anna", "Paul", "Mark", "Tiffany"])
    with pytest.raises(ValueError, match="only 3 names .*at least 5"):
        ioi_pairs(smollm2, 2, names=["Mary", "John", "Anna"])
    with pytest.raises(ValueError, match=r"templates='CABA' is not allowed.*'ABBA'"):
        ioi_pairs(smollm2, 2, templates="CABA")
    with pytest.raises(ValueError, match="exactly one \\[A\\]"):
        ioi_pairs(smollm2, 2, templates=["Then, [A] and [B] left. [A] thanked"])
    with pytest.raises(ValueError, match="must follow a space"):
        ioi_pairs(smollm2, 2, templates=["[B] and [A] left. [B] thanked"])
    with pytest.raises(ValueError, match="unknown slots"):
        ioi_pairs(smollm2, 2, templates=["Then, [B] and [A] saw a [ANIMAL]. [B] thanked"])
    with pytest.raises((ValueError, TypeError), match="swap"):
        ioi_pairs(smollm2, 2, corruption="swap")
    with caplog.at_level(logging.INFO, logger="mechicl.inputs.pairs"):
        p = ioi_pairs(smollm2, 2)
    assert "default names are not single tokens" in caplog.text
    custom = ioi_pairs(smollm2, 4, names=["Mary", "John", "Anna", "Paul", "Mark"])
    assert set(custom.params["names"]) == {"Mary", "John", "Anna", "Paul", "Mark"}
    # Golden for the pinned SmolLM2 tokenizer: 18 of Wang et al.'s 99 names are split.
    assert "18 of 99 default names" in caplog.text and len(p.params["names"]) == 81


# ---- colored objects ------------------------------------------------------------------------


@pytest.mark.slow
def test_colored_objects_structure(smollm2):
    p = colored_objects_pairs(smollm2, 24, seed=0)
    assert_pairs_equal(p, colored_objects_pairs(smollm2, 24, seed=0))
    assert p.clean_text != colored_objects_pairs(smollm2, 24, seed=1).clean_text
    assert p.same_length  # single-token colours and objects: one length for all pairs
    word = lambda ids, pos: smollm2.to_str_tokens([int(ids[pos])])[0].strip()  # noqa: E731
    for i in range(len(p)):
        clean, corrupted = p.clean_tokens(i), p.corrupted_tokens(i)
        assert decode(smollm2, clean[1:]) == p.clean_text[i]
        q = int(p.positions["queried"][i])
        assert (clean != corrupted).nonzero().flatten().tolist() == [q]
        obj, other = word(clean, q), word(corrupted, q)
        answer, wrong = p.answer_text[i].strip(), p.wrong_text[i].strip()
        listed = p.clean_text[i].split(". What")[0]
        # The answer is the colour of the queried object, wrong the other object's colour.
        assert f" {answer} {obj}" in listed and f" {wrong} {other}" in listed
        assert f"What is the color of the {obj}?" in p.clean_text[i]
        assert f"What is the color of the {other}?" in p.corrupted_text[i]
        assert word(clean, int(p.positions["answer_color"][i])) == answer
        assert word(clean, int(p.positions["wrong_color"][i])) == wrong
        colours = [w.split()[1] for w in listed.split("I see ")[1].replace("and ", "").split(", ")]
        assert len(set(colours)) == 3 and answer in colours and wrong in colours
        assert p.clean_text[i].endswith("A: The color is")
    two = colored_objects_pairs(smollm2, 4, n_objects=2, colors=["red", "blue"],
                                objects=["cup", "pen"])
    assert {t.strip() for t in two.answer_text} <= {"red", "blue"}
    assert " and a" in two.clean_text[0] and ", and" not in two.clean_text[0]
    with pytest.raises(ValueError, match=r"'teal' -> \[' te', 'al'\]"):
        colored_objects_pairs(smollm2, 2, colors=["red", "blue", "teal"])
    with pytest.raises(ValueError, match="n_objects=1"):
        colored_objects_pairs(smollm2, 2, n_objects=1)


# ---- counterfactual capitals ----------------------------------------------------------------


@pytest.mark.slow
def test_capitals_structure(smollm2):
    p = capital_pairs(smollm2, 20, seed=0)
    assert_pairs_equal(p, capital_pairs(smollm2, 20, seed=0))
    assert p.params["example_ids"] != capital_pairs(smollm2, 20, seed=1).params["example_ids"]
    assert len(set(p.params["example_ids"])) == 20
    examples = {e.id: e for e in load_task("counterfactual_capital").examples}
    for i, ex_id in enumerate(p.params["example_ids"]):
        ex = examples[ex_id]
        context, memorised = ex.input["context_capital"], ex.meta["memorised_answer"]
        clean, corrupted = p.clean_tokens(i), p.corrupted_tokens(i)
        assert decode(smollm2, clean[1:]) == p.clean_text[i]
        assert f"is {context}. Q:" in p.clean_text[i]
        assert p.corrupted_text[i] == p.clean_text[i].replace(f" {context}.", f" {memorised}.")
        pos = int(p.positions["context_capital"][i])
        span = len(smollm2.encode(" " + context, prepend_bos=False))
        differ = (clean != corrupted).nonzero().flatten().tolist()
        assert differ and differ[0] == pos and differ[-1] < pos + span
        assert int(p.answer[i]) == int(clean[pos]) == smollm2.encode(" " + context,
                                                                     prepend_bos=False)[0]
        assert int(p.wrong[i]) == int(corrupted[pos]) == smollm2.encode(" " + memorised,
                                                                        prepend_bos=False)[0]
        assert (" " + context).startswith(p.answer_text[i])
    with pytest.raises(ValueError, match=r"only \d+ of 243 .*usable.*n=10000"):
        capital_pairs(smollm2, 10_000)
