"""Training-checkpoint sweeps (issue 8): local checkpoint folders and their step names, hub
revisions from TransformerLens's checkpoint schedules (offline), identical weights found by the
real weights hash, the long table and the figure of scores across steps."""

import json
import logging

import pandas as pd
import pytest
import torch

from mechicl.experiments.checkpoints import (
    Checkpoint,
    _parse_step,
    checkpoint_hashes,
    checkpoint_table,
    hub_checkpoints,
    identical_groups,
    local_checkpoints,
)
from mechicl.plotting import checkpoint_figure
from mechicl.results import HeadScores

pytestmark = pytest.mark.usefixtures("one_thread")

# folder name -> seed of the tiny model saved there; two names share seed 1 (identical weights)
NAMES = {"300": 2, "checkpoint-200": 1, "step-100": 1, "step0": 0}


@pytest.fixture(scope="module")
def sweep_folder(tmp_path_factory):
    """Four tiny Llama checkpoints named in four styles (out of order on disk), two of them the
    same weights; plus a Trainer-style ``runs`` folder and a file, which are not checkpoints."""
    from mechicl.testing import tiny_hf_model

    root = tmp_path_factory.mktemp("sweep")
    models = {}
    tokenizer = None
    for name, seed in NAMES.items():
        if seed not in models:
            models[seed], tokenizer = tiny_hf_model("llama", seed=seed, n_layers=2, d_model=32,
                                                    n_ctx=64)
        models[seed].save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)  # one tokenizer for every checkpoint
    (root / "runs").mkdir()
    (root / "runs" / "events.out").write_text("")
    (root / "trainer_state.json").write_text("{}")
    return root


def _fake_checkpoint(folder, tokenizer=True):
    """A folder that looks like a checkpoint to local_checkpoints (which loads nothing)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    if tokenizer:
        (folder / "tokenizer.json").write_text("{}")


@pytest.mark.parametrize("name, step", [
    ("step1000", 1000), ("step-1000", 1000), ("step_1000", 1000), ("checkpoint-1000", 1000),
    ("global_step1000", 1000), ("1000", 1000), ("Step0", 0), ("checkpoint_7", 7),
    ("final", None), ("step", None), ("ckpt-10", None), ("step1000-old", None), ("-5", None),
])
def test_step_names(name, step):
    assert _parse_step(name) == step


def test_local_checkpoints_sorted_by_step(sweep_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="mechicl.experiments.checkpoints"):
        found = local_checkpoints(sweep_folder)
    assert [c.label for c in found] == ["step0", "step-100", "checkpoint-200", "300"]
    assert [c.step for c in found] == [0, 100, 200, 300]
    assert all(c.load_kwargs == {} for c in found)
    assert found[1].model == str((sweep_folder / "step-100").resolve())
    # the folder without config.json is named in a warning; the file is not mentioned
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "runs" in warning and "config.json" in warning and "trainer_state" not in warning


def test_local_checkpoints_errors(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        local_checkpoints(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"holds no checkpoints.*step1000, step-1000"):
        local_checkpoints(tmp_path)
    (tmp_path / "logs").mkdir()
    with pytest.raises(ValueError, match=r"no checkpoints.*'logs'"):
        local_checkpoints(tmp_path)

    _fake_checkpoint(tmp_path / "step5")
    _fake_checkpoint(tmp_path / "final")
    _fake_checkpoint(tmp_path / "best-model")
    with pytest.raises(ValueError, match=r"\['best-model', 'final'\].*checkpoint-1000"):
        local_checkpoints(tmp_path)

    dup = tmp_path / "dup"
    for name in ("step100", "checkpoint-100", "step-7", "007"):
        _fake_checkpoint(dup / name)
    with pytest.raises(ValueError, match=r"step 7: 007, step-7; step 100: checkpoint-100, step100"):
        local_checkpoints(dup)

    lone = tmp_path / "lone"
    _fake_checkpoint(lone / "step3", tokenizer=False)
    with caplog.at_level(logging.WARNING, logger="mechicl.experiments.checkpoints"):
        assert [c.step for c in local_checkpoints(lone)] == [3]
    assert "without tokenizer files" in caplog.text and "step3" in caplog.text


def test_checkpoints_load_and_identical_weights_are_found(sweep_folder):
    found = local_checkpoints(sweep_folder)
    hashes = checkpoint_hashes(found)
    assert list(hashes) == ["step0", "step-100", "checkpoint-200", "300"]
    assert len(set(hashes.values())) == 3
    assert identical_groups(hashes) == [["step-100", "checkpoint-200"]]
    model = found[0].load()
    assert (model.n_layers, model.d_model) == (2, 32)
    assert model.weights_hash == hashes["step0"]
    with pytest.raises(ValueError, match="already sets"):
        Checkpoint(model="x", step=1, label="step1", load_kwargs={"revision": "step1"}).load(
            revision="main")


def test_sweep_end_to_end(sweep_folder):
    """A weight-based score on every checkpoint, the table, and the figure: identical weights
    are flagged from the provenance the results carry, without reloading."""
    from mechicl.analyses.induction import ov_eigen_copying_scores

    found = local_checkpoints(sweep_folder)
    results = {c: ov_eigen_copying_scores(c.load()) for c in found}
    table = checkpoint_table(results)
    flagged = table.drop_duplicates("label").set_index("label")["identical_to"]
    assert flagged.to_dict() == {"step0": None, "step-100": None,
                                 "checkpoint-200": "step-100", "300": None}
    fig = checkpoint_figure(table, top_k=2)
    marker = next(t for t in fig.data if t.name == "identical weights")
    assert list(marker.x) == [200]


def test_identical_groups_order():
    assert identical_groups({}) == []
    assert identical_groups({"a": "1", "b": "2"}) == []
    assert identical_groups({"s3": "x", "s1": "y", "s2": "x", "s0": "y", "s4": "x"}) == [
        ["s3", "s2", "s4"], ["s1", "s0"]]


def test_checkpoint_dataclass():
    c = Checkpoint(model="EleutherAI/pythia-70m", step=1000, label="step1000",
                   load_kwargs={"revision": "step1000"})
    data = c.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert Checkpoint.from_dict(data) == c
    assert Checkpoint.from_dict({"model": "m", "step": 0, "label": "0"}).load_kwargs == {}
    assert {c: 1}[Checkpoint.from_dict(data)] == 1  # hashable although load_kwargs is a dict
    with pytest.raises(ValueError, match=r"unknown checkpoint keys \['revision'\]"):
        Checkpoint.from_dict({**data, "revision": "x"})
    with pytest.raises(ValueError, match="step must be >= 0"):
        Checkpoint(model="m", step=-1, label="x")
    with pytest.raises(ValueError, match="empty label"):
        Checkpoint(model="m", step=1, label="")


# ---- hub revisions (no network: TransformerLens holds the schedules) ------------------------


def test_hub_checkpoints_pythia_offline():
    found = hub_checkpoints("EleutherAI/pythia-70m", [143000, 0, 512, 1000])
    assert [c.label for c in found] == ["step0", "step512", "step1000", "step143000"]
    assert [c.step for c in found] == [0, 512, 1000, 143000]
    assert all(c.model == "EleutherAI/pythia-70m" for c in found)
    assert found[2].load_kwargs == {"revision": "step1000"}
    every = hub_checkpoints("EleutherAI/pythia-70m")
    assert len(every) == 154 and (every[0].step, every[-1].step) == (0, 143000)
    assert [c.step for c in every[:12]] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000]
    # a TransformerLens alias resolves to the official hub id
    assert hub_checkpoints("pythia-70m", [0])[0].model == "EleutherAI/pythia-70m"
    # the v0 models were saved every 1000 steps only
    assert len(hub_checkpoints("EleutherAI/pythia-70m-v0")) == 143
    with pytest.raises(ValueError, match=r"steps \[0\] are not published.*pythia-70m-v0"):
        hub_checkpoints("EleutherAI/pythia-70m-v0", [0, 1000])
    crfm = hub_checkpoints("stanford-crfm/alias-gpt2-small-x21", [400000, 10])
    assert [c.load_kwargs["revision"] for c in crfm] == ["checkpoint-10", "checkpoint-400000"]


def test_revisions_match_transformer_lens():
    from transformer_lens.model_bridge.sources.transformers.helpers import (
        _CHECKPOINT_REVISION_FORMATS,
        _resolve_checkpoint_to_revision,
    )

    from mechicl.experiments.checkpoints import REVISION_FORMATS

    assert dict(REVISION_FORMATS) == _CHECKPOINT_REVISION_FORMATS
    for model, step in [("EleutherAI/pythia-160m", 2), ("stanford-crfm/battlestar-gpt2-small-x49",
                                                          1950)]:
        (c,) = hub_checkpoints(model, [step])
        assert c.load_kwargs["revision"] == _resolve_checkpoint_to_revision(model, None, step)


def test_hub_checkpoints_errors_and_explicit_revisions():
    with pytest.raises(ValueError, match=r"steps \[1500, 7\] are not published.*154 steps: 0, 1"):
        hub_checkpoints("EleutherAI/pythia-70m", [1000, 1500, 7])
    with pytest.raises(ValueError, match=r"'gpt2'.*EleutherAI/pythia\* \(step\{value\}\).*"
                                         "revisions="):
        hub_checkpoints("gpt2", [0])
    with pytest.raises(ValueError, match="not both"):
        hub_checkpoints("EleutherAI/pythia-70m", [0], revisions=["step0"])
    with pytest.raises(ValueError, match="list of steps is empty"):
        hub_checkpoints("EleutherAI/pythia-70m", [])
    with pytest.raises(ValueError, match="same step"):
        hub_checkpoints("EleutherAI/pythia-70m", [1000, 1000])
    # explicit revisions: any model, the step read from the name
    mine = hub_checkpoints("me/my-run", revisions=["step-20", "checkpoint-5", "global_step10"])
    assert [(c.step, c.label) for c in mine] == [(5, "checkpoint-5"), (10, "global_step10"),
                                                  (20, "step-20")]
    assert mine[0].load_kwargs == {"revision": "checkpoint-5"} and mine[0].model == "me/my-run"
    with pytest.raises(ValueError, match="revision 'main'"):
        hub_checkpoints("me/my-run", revisions=["step1", "main"])
    # for a known family, revisions must be published checkpoints in its naming
    assert hub_checkpoints("EleutherAI/pythia-70m", revisions=["step2"])[0].step == 2
    for bad in ("step1001", "checkpoint-1000"):
        with pytest.raises(ValueError, match=f"'{bad}' is not a published checkpoint"):
            hub_checkpoints("EleutherAI/pythia-70m", revisions=[bad])


# ---- the long table and the figure ---------------------------------------------------------


def _scores(name, values, weights):
    return HeadScores.from_per_seed(name, torch.as_tensor(values, dtype=torch.float64)[None],
                                    model={"weights_sha256": weights})


def _results():
    gen = torch.Generator().manual_seed(0)
    steps = [(0, "step0", "h0"), (1000, "step1000", "h1"), (10, "step10", "h0"),
             (143000, "step143000", "h2")]
    return {Checkpoint(model="m", step=s, label=lab, load_kwargs={"revision": lab}):
            [_scores("prefix_matching", torch.rand(2, 3, generator=gen), h),
             _scores("copying", torch.rand(2, 3, generator=gen), h)]
            for s, lab, h in steps}


def test_checkpoint_table():
    results = _results()
    table = checkpoint_table(results)
    assert list(table.columns) == ["step", "label", "score", "layer", "head", "mean", "var",
                                   "std", "rank", "identical_to"]
    assert len(table) == 4 * 2 * 6
    assert table.step.is_monotonic_increasing
    assert list(dict.fromkeys(table.label)) == ["step0", "step10", "step1000", "step143000"]
    for checkpoint, scores in results.items():
        for s in scores:
            rows = table[(table.label == checkpoint.label) & (table.score == s.name)]
            expected = s.to_dataframe()
            assert rows["mean"].tolist() == expected["mean"].tolist()
            assert rows["rank"].tolist() == expected["rank"].tolist()
            assert (rows.step == checkpoint.step).all()
    flags = table.drop_duplicates("label").set_index("label").identical_to.to_dict()
    assert flags == {"step0": None, "step10": "step0", "step1000": None, "step143000": None}
    # explicit hashes override the recorded ones
    hashes = {"step0": "a", "step10": "b", "step1000": "b", "step143000": "a"}
    flags = checkpoint_table(results, hashes=hashes).drop_duplicates("label")
    assert flags.identical_to.tolist() == [None, None, "step10", "step0"]
    # one HeadScores per checkpoint is fine; results without provenance flag nothing
    plain = {c: HeadScores.from_per_seed("x", torch.zeros(1, 1, 2)) for c in results}
    assert checkpoint_table(plain).identical_to.isna().all()


def test_checkpoint_table_errors():
    results = _results()
    with pytest.raises(ValueError, match="no entry for checkpoint 'step0'"):
        checkpoint_table(results, hashes={"step10": "x"})
    c = next(iter(results))
    with pytest.raises(ValueError, match=r"score\(s\) \['copying'\] twice"):
        checkpoint_table({c: [results[c][1], results[c][1]]})
    with pytest.raises(ValueError, match="different weights"):
        checkpoint_table({c: [_scores("a", torch.ones(1, 2), "x"),
                              _scores("b", torch.ones(1, 2), "y")]})
    twin = Checkpoint(model="m", step=c.step, label="other")
    with pytest.raises(ValueError, match="same step"):
        checkpoint_table({c: results[c], twin: results[c]})


def test_checkpoint_figure_traces_match_the_table():
    table = checkpoint_table(_results())
    fig = checkpoint_figure(table, top_k=2)
    assert fig.layout.title.text == "scores across training steps"
    assert [a.text for a in fig.layout.annotations] == ["prefix_matching", "copying"]
    for i, score in enumerate(["prefix_matching", "copying"]):
        part = table[table.score == score]
        axis = "x" if i == 0 else "x2"
        traces = [t for t in fig.data if t.xaxis == axis]
        best = part.groupby("step")["mean"].max()
        (mx,) = [t for t in traces if t.name == "max over heads"]
        assert list(mx.x) == best.index.tolist() == [0, 10, 1000, 143000]
        assert list(mx.y) == pytest.approx(best.tolist())
        argmax = part.loc[part.groupby("step")["mean"].idxmax()]
        assert [d[2] for d in mx.customdata] == [f"{r.layer}.{r.head}"
                                                for r in argmax.itertuples()]
        assert [d[1] for d in mx.customdata] == ["step0", "step10", "step1000", "step143000"]
        final = part[part.step == 143000].nlargest(2, "mean")
        heads = [t for t in traces if t.name.startswith("head ")]
        assert [t.name for t in heads] == [f"head {r.layer}.{r.head}"
                                           for r in final.itertuples()]
        for t, r in zip(heads, final.itertuples(), strict=True):
            line = part[(part["layer"] == r.layer) & (part["head"] == r.head)].sort_values("step")
            assert list(t.y) == pytest.approx(line["mean"].tolist())
        (same,) = [t for t in traces if t.name == "identical weights"]
        assert list(same.x) == [10] and list(same.y) == pytest.approx([best[10]])
        assert same.customdata[0][2] == "step0"
    # a head keeps its colour in every subplot
    colors: dict[str, set[str]] = {}
    for t in fig.data:
        if t.name.startswith("head "):
            colors.setdefault(t.name, set()).add(t.line.color)
    assert all(len(c) == 1 for c in colors.values())
    assert len({c.pop() for c in colors.values()}) == len(colors)


def test_checkpoint_figure_options_and_errors():
    table = checkpoint_table(_results())
    one = table[table.score == "copying"].drop(columns=["score", "identical_to"])
    fig = checkpoint_figure(one, value="rank", top_k=0, log_x=True, title="t")
    assert [t.name for t in fig.data] == ["max over heads"]
    assert fig.layout.title.text == "t" and fig.layout.yaxis.title.text == "rank"
    # log axis: step 0 one decade below step 10, labelled 0; the hover keeps the true step
    assert fig.layout.xaxis.type == "log"
    assert list(fig.data[0].x) == [1.0, 10, 1000, 143000]
    assert [d[0] for d in fig.data[0].customdata] == [0, 10, 1000, 143000]
    assert list(fig.layout.xaxis.tickvals) == [1.0, 10, 100, 1000, 10000, 100000]
    assert list(fig.layout.xaxis.ticktext) == ["0", "10", "100", "1k", "10k", "100k"]
    assert checkpoint_figure(one).layout.title.text == "mean across training steps"
    only_zero = checkpoint_figure(one[one.step == 0], log_x=True)
    assert list(only_zero.data[0].x) == [1.0] and list(only_zero.layout.xaxis.ticktext) == ["0"]

    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['step'\]"):
        checkpoint_figure(one.drop(columns="step"))
    with pytest.raises(ValueError, match="several rows for score 'mean', step 0, head 0.0"):
        checkpoint_figure(pd.concat([one, one]))
    with pytest.raises(ValueError, match="top_k"):
        checkpoint_figure(one, top_k=-1)
